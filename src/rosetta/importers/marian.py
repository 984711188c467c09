"""``rosetta import marian``: OPUS-MT (Marian) models from the HuggingFace layout.

The Helsinki-NLP OPUS-MT collection publishes Marian Transformers in
HuggingFace's ``MarianMTModel`` layout::

    SOURCE/config.json                          the architecture (``MarianConfig``)
    SOURCE/model.safetensors or pytorch_model.bin   the weights
    SOURCE/source.spm, SOURCE/target.spm        SentencePiece models of each side
    SOURCE/vocab.json                           piece -> id of the one joint vocabulary

``import_marian`` writes an ordinary rosetta model directory that computes the
same thing:

* **The vocabulary in rosetta's order.** rosetta's ids 0-3 are ``<pad>``,
  ``<unk>``, ``<bos>``, ``<eos>`` (``rosetta.data.tokenizer``); Marian's
  ``</s>`` is 0, ``<unk>`` 1 and ``<pad>`` last, and its decoder starts from
  ``<pad>``. The joint vocabulary is laid out as rosetta's four, then every
  other piece in Marian's order; the embedding rows (and ``final_logits_bias``)
  are permuted the same way, ``<bos>`` taking the row of Marian's decoder start
  token. That row is Marian's ``<pad>`` too, so ``<bos>``'s output bias is set
  to -1e9: the softmax sees Marian's ``<pad>`` once, as Marian's does.
* **SentencePiece models whose ids are those ids.** Each side's model is
  rewritten with the joint vocabulary's pieces in that order: the pieces the
  side's own model has keep their scores and types (so text segments exactly
  as before: segmentation reads scores, never ids), the other side's are
  ``UNUSED`` (never produced by segmentation). Written as ``spm.src.model``
  and ``spm.tgt.model``, with the tokenizer options ``source_eos`` (the source
  ends with ``</s>``) and ``lookup_pieces`` (a piece's id is its string's in the
  joint vocabulary, so a character one side's model does not know still gets
  the other side's piece), as Marian and HuggingFace tokenise.
* **The architecture as model options**, never special cases in the search:
  post-norm layers, ``swish`` (SiLU) or the other activations, sinusoidal
  positions in Marian's layout (``sinusoidal_halves``), embeddings scaled by
  sqrt(d_model), the output bias, tied or untied output and embeddings.

An option of ``config.json`` that this mapping does not cover is refused with
its name (``MarianImportError``), never approximated.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from rosetta.config import config_from_dict
from rosetta.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SOURCE_MODEL,
    SPECIAL_PIECES,
    TARGET_MODEL,
    UNK_ID,
    Tokenizer,
    TokenizerOptions,
    write_options,
)
from rosetta.model import model_for
from rosetta.modeldir import save_model_dir

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# config.json keys this import reads (below), or that change nothing it computes:
# bookkeeping, training-only rates, generation defaults (rosetta's search is its own)
_KNOWN = frozenset(
    {
        # what this import reads
        "vocab_size", "decoder_vocab_size", "pad_token_id", "eos_token_id",
        "decoder_start_token_id", "unk_token_id", "d_model", "encoder_layers",
        "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
        "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings",
        "activation_function", "dropout", "attention_dropout",
        "share_encoder_decoder_embeddings", "tie_word_embeddings", "num_beams",
        # bookkeeping
        "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
        "model_type", "id2label", "label2id", "num_labels", "_num_labels", "problem_type",
        "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
        "is_encoder_decoder", "is_decoder", "add_cross_attention",
        "cross_attention_hidden_size", "num_hidden_layers", "use_cache", "return_dict",
        "output_hidden_states", "output_attentions", "output_past", "torchscript",
        "use_bfloat16", "chunk_size_feed_forward", "tf_legacy_loss", "gradient_checkpointing",
        # training only
        "init_std", "encoder_layerdrop", "decoder_layerdrop", "activation_dropout",
        "classif_dropout", "classifier_dropout",
        # generation defaults: rosetta's search settings are its own
        "bos_token_id", "sep_token_id", "forced_eos_token_id", "forced_bos_token_id",
        "max_length", "min_length", "bad_words_ids", "do_sample", "early_stopping",
        "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
        "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "num_return_sequences", "output_scores",
        "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty",
        "suppress_tokens", "begin_suppress_tokens",
        # flags of the BART code Marian's came from, which Marian's code never reads
        "add_bias_logits",
    }
)  # fmt: skip
# options the mapping covers only at one value: another value is refused by name
_FIXED = {
    "tie_encoder_decoder": False,
    "pruned_heads": {},
    "scale_embedding": True,
    "static_position_embeddings": True,
    "normalize_before": False,
    "add_final_layer_norm": False,
    "normalize_embedding": False,
}
_ACTIVATIONS = {"swish": "swish", "silu": "swish", "relu": "relu", "gelu": "gelu"}


class MarianImportError(ValueError):
    """A Marian model this import cannot reproduce exactly; names the reason."""


def _read_config(source: Path) -> dict[str, Any]:
    path = source / "config.json"
    if not path.exists():
        raise MarianImportError(f"{source} is not a Marian model directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MarianImportError(f"{path} is not valid JSON ({error})") from None
    if config.get("model_type") != "marian":
        raise MarianImportError(f"{path}: model_type is {config.get('model_type')!r}, not 'marian'")
    unknown = sorted(set(config) - _KNOWN - set(_FIXED))
    if unknown:
        raise MarianImportError(f"{path}: option(s) this import does not map: {', '.join(unknown)}")
    for key, value in _FIXED.items():
        if key in config and config[key] != value:
            raise MarianImportError(
                f"{path}: {key} = {config[key]!r} is not supported (only {value!r})"
            )
    return config


def _model_section(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """rosetta's model section for a Marian ``config.json`` (refusing what differs)."""

    def same(first: str, second: str) -> Any:
        if config.get(second, config[first]) != config[first]:
            raise MarianImportError(
                f"{path}: {first} = {config[first]} and {second} = {config[second]} differ; "
                "rosetta's encoder and decoder share that size"
            )
        return config[first]

    activation = config.get("activation_function", "swish")
    if activation not in _ACTIVATIONS:
        raise MarianImportError(
            f"{path}: activation_function {activation!r} is not supported "
            f"(only {', '.join(sorted(_ACTIVATIONS))})"
        )
    vocab = config["vocab_size"]
    if config.get("decoder_vocab_size") not in (None, vocab):
        raise MarianImportError(
            f"{path}: decoder_vocab_size {config['decoder_vocab_size']} differs from "
            f"vocab_size {vocab}: separate vocabularies are not supported"
        )
    return {
        "arch": "transformer",
        "d_model": config["d_model"],
        "d_ff": same("encoder_ffn_dim", "decoder_ffn_dim"),
        "heads": same("encoder_attention_heads", "decoder_attention_heads"),
        "encoder_layers": config["encoder_layers"],
        "decoder_layers": config["decoder_layers"],
        "dropout": config.get("dropout", 0.1),
        "attention_dropout": config.get("attention_dropout", 0.0),
        "activation": _ACTIVATIONS[activation],
        "norm": "post",
        "positional": "sinusoidal_halves",
        "max_positions": config.get("max_position_embeddings", 512),
        "output_bias": True,
    }


def _vocabulary(source: Path, config: dict[str, Any]) -> tuple[list[str], list[int]]:
    """rosetta's pieces in id order, and for each the Marian id whose rows it takes."""
    path = source / "vocab.json"
    if not path.exists():
        raise MarianImportError(f"{source} has no vocab.json (the joint vocabulary)")
    vocab: dict[str, int] = json.loads(path.read_text(encoding="utf-8"))
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise MarianImportError(f"{path}: the ids are not 0 .. {len(by_id) - 1}, each once")
    if len(by_id) != config["vocab_size"]:
        raise MarianImportError(
            f"{path} holds {len(by_id):,} pieces but config.json's vocab_size is "
            f"{config['vocab_size']:,}: they do not belong together"
        )
    pieces = [piece for piece, _ in by_id]
    pad, eos = config["pad_token_id"], config["eos_token_id"]
    start = config.get("decoder_start_token_id", pad)
    unk = vocab.get("<unk>")
    if unk is None or config.get("unk_token_id", unk) != unk:
        raise MarianImportError(f"{path} has no <unk> piece where config.json says")
    specials = {PAD_ID: pad, UNK_ID: unk, BOS_ID: start, EOS_ID: eos}
    taken = {pad, unk, eos}
    order = [specials[i] for i in range(len(specials))]
    order += [i for i in range(len(pieces)) if i not in taken]
    names = [SPECIAL_PIECES[i] for i in range(len(specials))]
    names += [pieces[i] for i in order[len(specials) :]]
    return names, order


def _rewrite_spm(path: Path, names: list[str], out: Path) -> None:
    """``path``'s SentencePiece model with ``names`` as its pieces in that order (see
    the module docstring), written to ``out``."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    if not path.exists():
        raise MarianImportError(f"{path} is missing: each side needs its SentencePiece model")
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf's DecodeError, and anything a bad file raises
        raise MarianImportError(f"{path} is not a SentencePiece model ({error})") from None
    Piece = model_pb2.ModelProto.SentencePiece
    own = {p.piece: p for p in proto.pieces}
    lost = [
        piece for piece, p in own.items()
        if p.type in (Piece.NORMAL, Piece.USER_DEFINED) and piece not in set(names)
    ]  # fmt: skip
    if lost:
        raise MarianImportError(
            f"{path} segments text into {len(lost)} piece(s) vocab.json lacks "
            f"(e.g. {lost[0]!r}): their ids would be unknown"
        )
    del proto.pieces[:]
    types = {PAD_ID: Piece.CONTROL, UNK_ID: Piece.UNKNOWN, BOS_ID: Piece.CONTROL,
             EOS_ID: Piece.CONTROL}  # fmt: skip
    for index, name in enumerate(names):
        piece = proto.pieces.add()
        piece.piece = name
        if index in types:
            piece.type, piece.score = types[index], 0.0
        elif name in own and own[name].type in (Piece.NORMAL, Piece.USER_DEFINED):
            piece.type, piece.score = own[name].type, own[name].score
        else:
            piece.type, piece.score = Piece.UNUSED, 0.0
    spec = proto.trainer_spec
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = UNK_ID, BOS_ID, EOS_ID, PAD_ID
    spec.unk_piece, spec.bos_piece = SPECIAL_PIECES[UNK_ID], SPECIAL_PIECES[BOS_ID]
    spec.eos_piece, spec.pad_piece = SPECIAL_PIECES[EOS_ID], SPECIAL_PIECES[PAD_ID]
    out.write_bytes(proto.SerializeToString())
    # the human-readable list SentencePiece writes beside a model: piece, score
    vocab = "".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces)
    out.with_suffix(".vocab").write_text(vocab, encoding="utf-8")


def _read_weights(source: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, or of ``pytorch_model.bin`` read with
    ``weights_only`` (PyTorch's restricted unpickler: no code of the file runs)."""
    if (source / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(source / "model.safetensors")
    if (source / "pytorch_model.bin").exists():
        try:
            state = torch.load(source / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as error:  # an unpickling error names what the file tried to load
            raise MarianImportError(
                f"{source / 'pytorch_model.bin'} cannot be read as plain tensors ({error})"
            ) from None
        return dict(state)
    raise MarianImportError(f"{source} has no weights ({' or '.join(WEIGHT_FILES)})")


def _rosetta_state(
    weights: dict[str, torch.Tensor], config: dict[str, Any], order: list[int], path: Path
) -> dict[str, torch.Tensor]:
    """Marian's tensors under rosetta's names, vocabulary rows in rosetta's order."""

    def take(name: str) -> torch.Tensor:
        for prefix in ("model.", ""):
            if prefix + name in weights:
                return weights[prefix + name].float()
        raise MarianImportError(f"{path} lacks the tensor {name}")

    def first(*names: str) -> torch.Tensor:
        for name in names:
            for prefix in ("model.", ""):
                if prefix + name in weights:
                    return weights[prefix + name].float()
        raise MarianImportError(f"{path} lacks the tensor {names[0]}")

    rows = torch.tensor(order)
    vocab = config["vocab_size"]
    shared = first("shared.weight", "encoder.embed_tokens.weight")
    if shared.shape != (vocab, config["d_model"]):
        raise MarianImportError(
            f"{path}: the embeddings are {tuple(shared.shape)}, config.json says "
            f"({vocab}, {config['d_model']})"
        )
    source_embed = first("encoder.embed_tokens.weight", "shared.weight")
    target_embed = first("decoder.embed_tokens.weight", "shared.weight")
    output = weights.get("lm_head.weight", target_embed).float()
    bias = first("final_logits_bias").reshape(-1).clone()
    state = {
        "src_embed.tokens.weight": source_embed[rows],
        "tgt_embed.tokens.weight": target_embed[rows],
        "output.weight": output[rows],
        "output.bias": bias[rows],
    }
    # <bos> takes the decoder start token's rows, which another id has too: its own
    # logit must not count twice in the softmax
    state["output.bias"][BOS_ID] = -1e9

    def attention(marian: str, qkv: str) -> None:
        for part in ("weight", "bias"):
            state[f"{qkv}.qkv_proj.{part}"] = torch.cat(
                [take(f"{marian}.{p}_proj.{part}") for p in "qkv"]
            )
            state[f"{qkv}.out_proj.{part}"] = take(f"{marian}.out_proj.{part}")

    def copy(marian: str, ours: str) -> None:
        for part in ("weight", "bias"):
            state[f"{ours}.{part}"] = take(f"{marian}.{part}")

    for i in range(config["encoder_layers"]):
        m, r = f"encoder.layers.{i}", f"encoder.layers.{i}"
        attention(f"{m}.self_attn", f"{r}.self_attn")
        copy(f"{m}.self_attn_layer_norm", f"{r}.attn_residual.norm")
        copy(f"{m}.fc1", f"{r}.feed_forward.fc1")
        copy(f"{m}.fc2", f"{r}.feed_forward.fc2")
        copy(f"{m}.final_layer_norm", f"{r}.ff_residual.norm")
    for i in range(config["decoder_layers"]):
        m, r = f"decoder.layers.{i}", f"decoder.layers.{i}"
        attention(f"{m}.self_attn", f"{r}.self_attn")
        copy(f"{m}.self_attn_layer_norm", f"{r}.self_residual.norm")
        for part in ("weight", "bias"):
            state[f"{r}.cross_attn.q_proj.{part}"] = take(f"{m}.encoder_attn.q_proj.{part}")
            state[f"{r}.cross_attn.kv_proj.{part}"] = torch.cat(
                [take(f"{m}.encoder_attn.{p}_proj.{part}") for p in "kv"]
            )
            state[f"{r}.cross_attn.out_proj.{part}"] = take(f"{m}.encoder_attn.out_proj.{part}")
        copy(f"{m}.encoder_attn_layer_norm", f"{r}.cross_residual.norm")
        copy(f"{m}.fc1", f"{r}.feed_forward.fc1")
        copy(f"{m}.fc2", f"{r}.feed_forward.fc2")
        copy(f"{m}.final_layer_norm", f"{r}.ff_residual.norm")
    return state


def import_marian(
    source: str | Path,
    output_dir: str | Path,
    src_lang: str = "src",
    tgt_lang: str = "tgt",
    log=print,
) -> Path:
    """Converts a Marian model in the HuggingFace layout (a local folder, or a hub
    name such as ``Helsinki-NLP/opus-mt-en-de`` when ``huggingface_hub`` can reach
    the hub) into a rosetta model directory at ``output_dir``; returns it."""
    source = _local(source, log)
    config = _read_config(source)
    path = source / "config.json"
    model_section = _model_section(config, path)
    names, order = _vocabulary(source, config)
    weights = _read_weights(source)
    state = _rosetta_state(weights, config, order, source)
    # shared and tied as the weights are: what Marian's code computes with (the two
    # config flags mean different things across transformers versions)
    model_section["tie_all"] = torch.equal(
        state["src_embed.tokens.weight"], state["tgt_embed.tokens.weight"]
    )
    model_section["tie_output"] = torch.equal(
        state["output.weight"], state["tgt_embed.tokens.weight"]
    )
    experiment = config_from_dict(
        {
            "experiment_dir": str(output_dir),
            "data": {"root": str(source), "src_lang": src_lang, "tgt_lang": tgt_lang},
            "model": model_section,
            "decode": {"search": {"kind": "beam", "beam": config.get("num_beams") or 4,
                                  "length_penalty": 1.0, "eos_within_beam": True}},
        }
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp)
        _rewrite_spm(source / "source.spm", names, tokenizer_dir / SOURCE_MODEL)
        _rewrite_spm(source / "target.spm", names, tokenizer_dir / TARGET_MODEL)
        write_options(tokenizer_dir, TokenizerOptions(source_eos=True, lookup_pieces=True))
        tokenizer = Tokenizer.load(tokenizer_dir)
        model = model_for(experiment.model, tokenizer)
        _check_positions(weights, model, source)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MarianImportError(
                f"{source}: the weights do not fit rosetta's Transformer "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        metadata = {"imported_from": str(source), "marian_config": config}
        directory = save_model_dir(Path(output_dir), experiment, tokenizer_dir, model, metadata)
    log(
        f"imported {source} ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(names):,} pieces) into {directory}"
    )
    return directory


def _check_positions(weights: dict[str, torch.Tensor], model, source: Path) -> None:
    """Marian's stored positional table (when the file has one) must be the one the
    model computes (``sinusoidal_halves``)."""
    for prefix in ("model.", ""):
        stored = weights.get(f"{prefix}encoder.embed_positions.weight")
        if stored is not None:
            ours = model.src_embed.positions(stored.size(0))
            if not torch.allclose(stored.float(), ours, atol=1e-5):
                raise MarianImportError(
                    f"{source}: the stored positional encodings are not sinusoids in "
                    "Marian's layout"
                )
            return


def _local(source: str | Path, log) -> Path:
    """``source`` as a local folder: a hub name is downloaded with huggingface_hub."""
    path = Path(source)
    if path.exists():
        return path
    if str(source).count("/") != 1:
        raise MarianImportError(f"{source} is neither a folder nor a hub name (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MarianImportError(
            f"{source} is not a folder; to fetch it from the hub, pip install huggingface_hub"
        ) from None
    log(f"downloading {source} from the HuggingFace hub")
    try:
        return Path(snapshot_download(str(source)))
    except Exception as error:  # no network, no such repository, ...
        raise MarianImportError(f"cannot download {source}: {error}") from None
