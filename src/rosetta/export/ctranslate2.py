"""Export a rosetta Transformer to CTranslate2, and translate with it.

The conversion goes through CTranslate2's own Python specifications
(``ctranslate2.specs.TransformerSpec``): every weight of rosetta's modules is
assigned to the matching spec variable, then CTranslate2 validates, optionally
quantises and saves the model. The exported folder also holds the rosetta
configuration and SentencePiece model, so tokenisation is identical:

    OUT/model.bin, OUT/config.json, OUT/*_vocabulary.json   the CTranslate2 model
    OUT/config.yaml, OUT/spm.model, OUT/spm.vocab            as in the model directory

CTranslate2 is an optional dependency (``pip install rosetta-nmt[export]``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rosetta.config import DecodeConfig, load_config
from rosetta.data.tokenizer import BOS_ID, PAD_ID, SPECIAL_PIECES, Tokenizer
from rosetta.decode.common import Hypothesis
from rosetta.decode.translator import Translator, check_search_options
from rosetta.device import resolve_device
from rosetta.model.attention import CrossAttention, MultiHeadAttention, SelfAttention
from rosetta.model.transformer import Transformer
from rosetta.modeldir import CONFIG, load_model_dir, verify_checksums, write_metadata
from rosetta.safeio import replace_directory

# below it, logits / temperature can pass float32's largest value in CTranslate2
# (NaN probabilities from 1e-39 on a toy model); a logit would have to be over
# 3e8 to overflow at this one
GREEDY_TEMPERATURE = 1e-30


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "CTranslate2 is not installed: pip install 'rosetta-nmt[export]'"
        ) from error
    return ctranslate2


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _linear(spec, module: torch.nn.Linear) -> None:
    spec.weight = _numpy(module.weight)
    if module.bias is not None:
        spec.bias = _numpy(module.bias)


def _layer_norm(spec, module: torch.nn.LayerNorm) -> None:
    spec.gamma = _numpy(module.weight)
    spec.beta = _numpy(module.bias)


def _inputs(spec, embed, positions_for: int) -> None:
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = _numpy(embed.tokens.weight)
    spec.scale_embeddings = True  # rosetta multiplies embeddings by sqrt(d_model)
    spec.position_encodings.encodings = _numpy(embed.positions(positions_for))


def _feed_forward(spec, layer) -> None:
    _layer_norm(spec.layer_norm, layer.ff_residual.norm)
    _linear(spec.linear_0, layer.feed_forward.fc1)
    _linear(spec.linear_1, layer.feed_forward.fc2)


def check_representable(model: torch.nn.Module) -> None:
    """Raises ``ValueError`` for a model CTranslate2's Transformer cannot hold: another
    architecture, or any attention other than standard softmax attention (a variant
    is a subclass, so it is caught without being named here)."""
    if not isinstance(model, Transformer):  # the left-to-right family only
        arch = getattr(getattr(model, "cfg", None), "arch", type(model).__name__)
        raise ValueError(f"CTranslate2 export supports the Transformer only, not {arch!r}")
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention) and type(module) not in (
            SelfAttention,
            CrossAttention,
        ):
            raise ValueError(
                f"CTranslate2 cannot represent {type(module).__name__} at {name}: "
                "it runs standard softmax attention only"
            )


def build_spec(model: Transformer, tokenizer: Tokenizer):
    """The ``TransformerSpec`` holding ``model``'s weights and vocabularies."""
    _ctranslate2()  # a clear error if it is missing
    from ctranslate2.specs import common_spec, transformer_spec

    check_representable(model)
    cfg = model.cfg
    activation = (
        common_spec.Activation.GELU if cfg.activation == "gelu" else (common_spec.Activation.RELU)
    )
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.encoder_layers, cfg.decoder_layers),
        cfg.heads,
        pre_norm=cfg.norm == "pre",
        activation=activation,
    )
    positions = cfg.max_positions
    _inputs(spec.encoder, model.src_embed, positions)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder.layers):
        attention = layer_spec.self_attention
        _linear(attention.linear[0], layer.self_attn.qkv_proj)  # fused Q, K, V
        _linear(attention.linear[1], layer.self_attn.out_proj)
        _layer_norm(attention.layer_norm, layer.attn_residual.norm)
        _feed_forward(layer_spec.ffn, layer)
    _inputs(spec.decoder, model.tgt_embed, positions)
    _linear(spec.decoder.projection, model.output)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder.layers):
        _linear(layer_spec.self_attention.linear[0], layer.self_attn.qkv_proj)
        _linear(layer_spec.self_attention.linear[1], layer.self_attn.out_proj)
        _layer_norm(layer_spec.self_attention.layer_norm, layer.self_residual.norm)
        _linear(layer_spec.attention.linear[0], layer.cross_attn.q_proj)
        _linear(layer_spec.attention.linear[1], layer.cross_attn.kv_proj)  # fused K, V
        _linear(layer_spec.attention.linear[2], layer.cross_attn.out_proj)
        _layer_norm(layer_spec.attention.layer_norm, layer.cross_residual.norm)
        _feed_forward(layer_spec.ffn, layer)
    if cfg.norm == "pre":
        _layer_norm(spec.encoder.layer_norm, model.encoder.final_norm)
        _layer_norm(spec.decoder.layer_norm, model.decoder.final_norm)
    spec.register_source_vocabulary(tokenizer.source_pieces(range(tokenizer.src_vocab_size)))
    spec.register_target_vocabulary(tokenizer.target_pieces(range(tokenizer.tgt_vocab_size)))
    config = spec.config
    config.unk_token, config.bos_token, config.eos_token = (
        SPECIAL_PIECES[1],
        SPECIAL_PIECES[2],
        SPECIAL_PIECES[3],
    )
    config.decoder_start_token = SPECIAL_PIECES[2]
    config.add_source_bos = config.add_source_eos = False
    config.layer_norm_epsilon = model.encoder.layers[0].attn_residual.norm.eps
    return spec


def export_ctranslate2(
    model_dir: str | Path, output_dir: str | Path, quantization: str | None = None
) -> Path:
    """Converts a rosetta model directory into a CTranslate2 model directory."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    _, tokenizer, model = load_model_dir(model_dir)
    spec = build_spec(model, tokenizer)
    spec.validate()
    spec.optimize(quantization=quantization)
    with replace_directory(output_dir) as staging:  # a failed export leaves the old one
        spec.save(str(staging))
        for name in [CONFIG, *tokenizer.files()]:
            shutil.copyfile(model_dir / name, staging / name)
        write_metadata(
            staging, {"exported_from": str(model_dir), "quantization": quantization or "none"}
        )
    return output_dir


class CTranslate2Translator(Translator):
    """The same ``translate`` as ``rosetta.decode.translator.TorchTranslator``, run by
    CTranslate2 (``Translator.load(..., engine="ctranslate2")``).

    Everything around the search (cleaning, long inputs, n-best assembly,
    streaming, the lock) is ``Translator``'s, shared with rosetta's own engine. Within
    the search, as rosetta does: <bos> and <pad> can never be produced; sampling
    draws with beam 1 (CTranslate2's random sampling), ``nbest`` samples per
    input, seeded once per translator by ``options.seed``. Each hypothesis's
    ``log_prob`` (with ``options.scores``) is CTranslate2's own scoring of it:
    the total log-probability with <eos>, as rosetta reports. Differences: beam
    search ranks by log-probability / length ** length_penalty rather than the
    GNMT penalty, and ``score`` is that normalised value. The length limit is one
    number per call, so sentences go to it in groups of equal length budget
    (``max_len_a * source length + max_len_b``), as rosetta's search gives each
    sentence its own: an output that runs to the limit ends where rosetta's does.
    """

    def __init__(
        self,
        export_dir: str | Path,
        options: DecodeConfig | None = None,
        device: str = "cpu",
        threads: int = 0,
    ) -> None:
        """``options``: the search settings (default: the export's ``decode`` section);
        ``device``: cpu, cuda or cuda:N."""
        ct2 = _ctranslate2()
        export_dir = Path(export_dir)
        if not (export_dir / "model.bin").exists():
            raise FileNotFoundError(
                f"{export_dir} is not a CTranslate2 export (run `rosetta export` first)"
            )
        verify_checksums(export_dir)
        self.config = load_config(export_dir / CONFIG)
        options = options if options is not None else self.config.decode
        tokenizer = Tokenizer.load(export_dir)
        super().__init__(tokenizer, options, self.config.model.max_positions - 1)
        # CTranslate2's sampling generators are seeded when its worker threads start
        ct2.set_random_seed(options.seed)
        kind, _, index = device.partition(":")
        self.engine = ct2.Translator(
            str(export_dir),
            device=kind,
            device_index=int(index or 0),
            inter_threads=1,
            intra_threads=threads or torch.get_num_threads(),
        )

    @classmethod
    def from_export(
        cls, export_dir: str | Path, device: str | None = None, **search: Any
    ) -> CTranslate2Translator:
        """An export with its own ``decode`` settings, overridden by ``search``, on
        ``device`` (None: the export's ``decode.device``)."""
        config = load_config(Path(export_dir) / CONFIG)
        place = resolve_device(device or config.decode.device)
        name = place.type if place.index is None else f"{place.type}:{place.index}"
        options = config.decode.with_overrides(**search)
        check_search_options(options, search, autoregressive=True)
        return cls(export_dir, options, name)

    def engine_search(self, sources: list[list[int]]) -> list[list[Hypothesis]]:
        opts = self.options
        limit = self.max_source_len
        pieces = [self.tokenizer.source_pieces(ids) for ids in sources]
        # rosetta's budget counts the <eos>; CTranslate2's limit counts tokens before it
        groups: dict[int, list[int]] = {}
        for k, p in enumerate(pieces):
            budget = min(int(len(p) * opts.max_len_a + opts.max_len_b), limit) - 1
            groups.setdefault(max(budget, 1), []).append(k)
        found: list = [None] * len(pieces)
        for budget, members in groups.items():
            outputs = self.engine.translate_batch(
                [pieces[k] for k in members],
                beam_size=1 if opts.sampling else opts.beam,
                num_hypotheses=opts.nbest,
                length_penalty=0.0 if opts.sampling or opts.beam == 1 else opts.length_penalty,
                max_decoding_length=budget,
                max_input_length=0,  # sources are within the limit already; never cut
                max_batch_size=opts.batch_size,
                batch_type="examples",
                return_scores=True,
                suppress_sequences=[[SPECIAL_PIECES[BOS_ID]], [SPECIAL_PIECES[PAD_ID]]],
                **self.sampling_options(),
            )
            for k, output in zip(members, outputs):
                found[k] = output
        target = self.tokenizer.target
        results = [
            [
                Hypothesis([target.piece_to_id(p) for p in tokens], float(score), float("nan"))
                for tokens, score in zip(output.hypotheses, output.scores)
            ]
            for output in found
        ]
        if opts.scores:
            self._score(pieces, results, [output.hypotheses for output in found])
        return results

    def sampling_options(self) -> dict[str, Any]:
        """CTranslate2's sampling arguments for ``options``, as rosetta's sampling reads
        them: a ``top_k`` over the vocabulary keeps every token (CTranslate2 refuses
        it), and a temperature under ``GREEDY_TEMPERATURE``, whose float32 division
        could overflow to NaN there, draws the best token, which is what sampling
        at such a temperature does (``rosetta.decode.sampling.tempered``)."""
        opts = self.options
        if not opts.sampling:
            return {"sampling_topk": 1, "sampling_topp": 1.0, "sampling_temperature": 1.0}
        top_k = min(opts.top_k, self.tokenizer.tgt_vocab_size)
        if opts.temperature < GREEDY_TEMPERATURE:
            top_k = 1
        return {
            "sampling_topk": top_k,
            "sampling_topp": opts.top_p,
            "sampling_temperature": max(opts.temperature, GREEDY_TEMPERATURE),
        }

    def _score(
        self, pieces: list[list[str]], results: list[list[Hypothesis]], outputs: list
    ) -> None:
        """Sets each hypothesis's ``log_prob`` to its total log-probability with <eos>.

        CTranslate2's search score leaves out the <eos> of an output cut at the
        length limit and is divided by length ** length_penalty in beam search;
        scoring the output again gives exactly rosetta's quantity.
        """
        sources = [p for p, hyps in zip(pieces, outputs) for _ in hyps]
        targets = [tokens for hyps in outputs for tokens in hyps]
        scored = iter(self.engine.score_batch(sources, targets, max_input_length=0))
        for hyps in results:
            for hypothesis in hyps:
                hypothesis.log_prob = float(sum(next(scored).log_probs))
