"""Export a rosetta Transformer to CTranslate2 (translating with the export is
``rosetta.decode.translator.CTranslate2Translator``'s).

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

import numpy as np
import torch

from rosetta.data.tokenizer import SPECIAL_PIECES, Tokenizer
from rosetta.decode.translator import CTranslate2Translator, ctranslate2_module
from rosetta.model.attention import CrossAttention, MultiHeadAttention, SelfAttention
from rosetta.model.transformer import Transformer
from rosetta.modeldir import CONFIG, load_model_dir, write_metadata
from rosetta.safeio import replace_directory


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
    counts = sorted({m.heads for m in model.modules() if isinstance(m, MultiHeadAttention)})
    if len(counts) > 1:
        raise ValueError(
            "CTranslate2's format holds one number of heads for every attention layer; "
            f"this pruned model has {counts[0]} to {counts[-1]} (prune the same number of "
            "heads in every attention module to export it)"
        )


def head_count(model: Transformer) -> int:
    """The number of heads of each attention layer (``check_representable``: one for all;
    fewer than ``model.heads`` in a uniformly pruned model)."""
    return model.encoder.layers[0].self_attn.heads


def build_spec(model: Transformer, tokenizer: Tokenizer):
    """The ``TransformerSpec`` holding ``model``'s weights and vocabularies."""
    ctranslate2_module()  # a clear error if it is missing
    from ctranslate2.specs import common_spec, transformer_spec

    check_representable(model)
    cfg = model.cfg
    activation = {
        "relu": common_spec.Activation.RELU,
        "gelu": common_spec.Activation.GELU,
        "swish": common_spec.Activation.SWISH,
    }[cfg.activation]
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.encoder_layers, cfg.decoder_layers),
        head_count(model),
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


__all__ = ["CTranslate2Translator", "build_spec", "check_representable", "export_ctranslate2"]
