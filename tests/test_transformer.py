"""Behaviour of the Transformer: shapes, causality, cached = full decoding, tying."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rosetta.config import TransformerConfig
from rosetta.data.tokenizer import BOS_ID, PAD_ID
from rosetta.decode.common import Lengths
from rosetta.model import build_model
from rosetta.model.attention import SelfAttention

VOCAB = 40


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        d_model=32,
        d_ff=64,
        heads=4,
        encoder_layers=2,
        decoder_layers=2,
        dropout=0.0,
        **overrides,
    )
    return build_model(cfg, VOCAB, VOCAB).eval()


def random_batch(batch: int = 3, src_len: int = 7, tgt_len: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (batch, src_len), generator=generator)
    src[0, src_len - 2 :] = PAD_ID
    tgt = torch.randint(4, VOCAB, (batch, tgt_len), generator=generator)
    tgt[:, 0] = BOS_ID
    return src, tgt


def test_forward_shape():
    model = tiny_model()
    src, tgt = random_batch()
    assert model(src, tgt).shape == (3, 6, VOCAB)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_future_target_tokens_do_not_change_earlier_outputs(norm):
    model = tiny_model(norm=norm)
    src, tgt = random_batch(tgt_len=8)
    before = model(src, tgt)
    for t in range(1, 8):
        changed = tgt.clone()
        changed[:, t] = (changed[:, t] + 1 - 4) % (VOCAB - 4) + 4
        after = model(src, changed)
        torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(after[:, t:], before[:, t:])


def test_source_padding_does_not_change_outputs():
    model = tiny_model()
    src, tgt = random_batch()
    longer = torch.cat([src, torch.full((3, 4), PAD_ID)], dim=1)
    torch.testing.assert_close(model(longer, tgt), model(src, tgt), atol=1e-5, rtol=1e-4)


PATHS = ["autograd", "inference", "inference_matmul", "inference_no_onednn"]


def search_context(path: str, model, monkeypatch):
    """The one step path under each of its kernel choices. ``autograd``: gradients
    on (plain ``F.linear``, SDPA); ``inference``: the model prepared for inference
    (transposed / oneDNN-packed weights) under ``inference_mode``, attending through
    SDPA, or (``_matmul``) through batched matrix products, as it does for many
    hypotheses; ``_no_onednn``: the fallback without PyTorch's private oneDNN ops."""
    if path == "autograd":
        return contextlib.nullcontext()
    if path.endswith("_matmul"):
        monkeypatch.setattr("rosetta.model.attention.MATMUL_MIN_ROWS", 1)
    model.prepare_for_inference(onednn=not path.endswith("_no_onednn"))
    return torch.inference_mode()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "overrides",
    [{}, {"norm": "post"}, {"positional": "learned"}, {"activation": "gelu"}],
)
def test_cached_incremental_decoding_equals_full_recomputation(overrides, path, monkeypatch):
    model = tiny_model(**overrides)
    # tiny weights through oneDNN from 4 rows, as larger ones go: 9 rows take it,
    # 2 rows the transposed weight, 1 row the half-width GEMVs
    monkeypatch.setattr("rosetta.model.linear.ONEDNN_TIERS", ((0, 4),))
    src, tgt = random_batch(batch=9, tgt_len=9)
    full = model(src, tgt)
    for rows in (slice(0, 9), slice(0, 2), slice(0, 1)):
        with search_context(path, model, monkeypatch):
            state = model.init_state(model.encode(src[rows]))
            for t in range(tgt.size(1)):
                step_logits = model.decode_step(tgt[rows, t], state)
                torch.testing.assert_close(step_logits, full[rows, t], atol=1e-5, rtol=1e-4)
    assert state.step == tgt.size(1)
    # one cached key/value per generated position in every layer
    assert all(cache.length == tgt.size(1) for cache in state.tensors["caches"])


def test_state_select_sources_reorders_the_batch():
    model = tiny_model()
    src, tgt = random_batch()
    full = model(src, tgt)
    state = model.init_state(model.encode(src))
    model.decode_step(tgt[:, 0], state)
    order = torch.tensor([2, 0, 0])
    state.select_sources(order)
    torch.testing.assert_close(
        model.decode_step(tgt[order, 1], state), full[order, 1], atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("path", PATHS)
def test_grouped_hypotheses_share_one_copy_of_their_source(path, monkeypatch):
    """Beam search's layout: ``expand(beam)`` gives each source ``beam`` rows that
    attend to its single memory; re-ranking within groups (``select``) and dropping
    sources (``select_sources``) match a full pass over the same prefixes."""
    model = tiny_model()
    src, _ = random_batch(batch=3)
    beam, steps = 3, 5
    generator = torch.Generator().manual_seed(5)
    prefixes = torch.randint(4, VOCAB, (3 * beam, steps), generator=generator)
    prefixes[:, 0] = BOS_ID
    with search_context(path, model, monkeypatch):
        state = model.init_state(model.encode(src))
        state.expand(beam)
        assert state.num_sources == 3 and state.tensors["caches"][0].length == 0
        rows = torch.arange(3 * beam)  # which prefix each hypothesis row carries
        for t in range(steps):
            logits = model.decode_step(prefixes[rows, t], state)
            expected = model(src.repeat_interleave(beam, 0)[rows], prefixes[rows, : t + 1])
            torch.testing.assert_close(logits, expected[:, t], atol=1e-5, rtol=1e-4)
            # source 1: rotate its hypotheses; source 2: its first one three times
            reorder = torch.tensor([0, 1, 2, 4, 5, 3, 6, 6, 6])
            state.select(reorder)
            rows = rows[reorder]
        state.select_sources(torch.tensor([2, 0]))
        assert state.num_sources == 2 and state.tensors["caches"][0].batch == 2 * beam
        assert state.sources["memory"][0].keys.size(0) == 2
        rows = rows[[6, 7, 8, 0, 1, 2]]
        logits = model.decode_step(prefixes[rows, steps - 1], state)
    kept = torch.cat([prefixes[rows, :steps], prefixes[rows, steps - 1 :]], dim=1)
    expected = model(src[[2, 2, 2, 0, 0, 0]], kept)[:, steps]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


def test_packed_encoder_equals_the_padded_one_forward_and_backward(monkeypatch):
    """Position-wise work on the real tokens only (``SourcePadding`` packing) changes
    nothing at real positions, in outputs or gradients; padded positions come out
    zero."""
    from rosetta.model import packing

    model = tiny_model(seed=2).train()  # dropout is 0: both passes are deterministic
    src, _ = random_batch(batch=4, src_len=9)
    src[1, 3:] = PAD_ID
    src[2, 6:] = PAD_ID
    real = src.ne(PAD_ID)
    results = []
    for min_padding in (2.0, 0.1):  # never packed, packed
        monkeypatch.setattr(packing, "MIN_PADDING", min_padding)
        padding = packing.SourcePadding(~real)
        assert padding.packed == (min_padding < 1)
        assert padding.tokens == (int(real.sum()) if padding.packed else real.numel())
        model.zero_grad()
        memory, _ = model.encoder(model.src_embed(src), padding)
        memory[real].square().sum().backward()
        grads = [p.grad.clone() for p in model.encoder.parameters()]
        results.append((memory.detach(), grads))
    (padded, padded_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-4)
    assert torch.all(packed[~real] == 0)
    for packed_grad, padded_grad in zip(packed_grads, padded_grads):
        torch.testing.assert_close(packed_grad, padded_grad, atol=1e-4, rtol=1e-4)
    assert not packing.SourcePadding(torch.zeros(4, 9, dtype=torch.bool)).packed


def test_weight_tying():
    tied = tiny_model()
    assert tied.output.weight is tied.tgt_embed.tokens.weight
    assert tied.src_embed.tokens is tied.tgt_embed.tokens
    untied = tiny_model(tie_output=False, tie_all=False)
    assert untied.output.weight is not untied.tgt_embed.tokens.weight
    assert untied.src_embed.tokens is not untied.tgt_embed.tokens
    separate_vocab = build_model(TransformerConfig(preset="toy"), 30, 50)
    assert separate_vocab.src_embed.tokens.weight.shape == (30, 128)
    assert separate_vocab.output.weight.shape == (50, 128)


def test_attention_maps_are_distributions_over_real_source_positions():
    model = tiny_model()
    src, tgt = random_batch()
    maps = model.attention_maps(src, tgt)
    assert len(maps["cross"]) == 2 and len(maps["encoder_self"]) == 2
    cross = maps["cross"][1]
    assert cross.shape == (3, 4, 6, 7)  # (batch, heads, tgt_len, src_len)
    torch.testing.assert_close(cross.sum(-1), torch.ones(3, 4, 6))
    assert torch.all(cross[0, :, :, -2:] == 0)  # padded source positions
    decoder_self = maps["decoder_self"][0]
    assert torch.all(decoder_self.triu(1) == 0)  # nothing attends to the future


def test_presets_and_sizes():
    assert TransformerConfig(preset="small").d_model == 256
    base = TransformerConfig(preset="base")
    assert (base.d_model, base.d_ff, base.heads, base.encoder_layers) == (512, 2048, 8, 6)
    assert TransformerConfig(preset="small", d_model=128).d_model == 128  # explicit key wins


def fused(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Keys and values (batch, heads, len, head_dim) in the layout of a fused QKV
    projection's K/V part: (batch, len, 2, heads, head_dim)."""
    return torch.stack([k.transpose(1, 2), v.transpose(1, 2)], dim=2)


def test_cache_buffers_grow_and_hold_every_position():
    from rosetta.model.attention import KVCache

    generator = torch.Generator().manual_seed(0)
    cache = KVCache()
    keys = [torch.randn(3, 2, 1, 4, generator=generator) for _ in range(40)]
    for t, key in enumerate(keys):
        k, v = cache.append(fused(key, -key))
        assert cache.length == t + 1 and cache.buffer.size(0) >= t + 1
        torch.testing.assert_close(k, torch.cat(keys[: t + 1], dim=2))
        torch.testing.assert_close(v, -torch.cat(keys[: t + 1], dim=2))
        # the (batch * heads) rows the matrix-product attention reads, without a copy
        assert k.flatten(0, 1).data_ptr() == k.data_ptr()
        torch.testing.assert_close(k.flatten(0, 1), k.reshape(6, t + 1, 4))
    assert cache.buffer.size(0) < 2 * 40 + 16  # grown by doubling, not per step


def test_cache_reorders_rows_in_place_and_keeps_appending():
    """Beam search's reordering (same batch size: the spare buffer is swapped in)
    and dropping rows (a smaller batch) keep every position of the chosen rows."""
    from rosetta.model.attention import KVCache

    generator = torch.Generator().manual_seed(1)
    cache = KVCache()
    history = torch.randn(4, 2, 0, 3)  # what the cache must hold, (batch, heads, len, dim)
    for t, index in enumerate([[1, 1, 0, 3], [3, 2, 1, 0], [0, 2], [1, 1, 0]]):
        key = torch.randn(history.size(0), 2, 1 + t % 2, 3, generator=generator)
        history = torch.cat([history, key], dim=2)
        k, v = cache.append(fused(key, 2 * key))
        torch.testing.assert_close(k, history)
        torch.testing.assert_close(v, 2 * history)
        buffers = {b.data_ptr() for b in (cache._memory, cache._spare) if b is not None}
        cache.select_rows(torch.tensor(index))
        history = history[index]
        if t > 0:  # the two buffers take turns, whatever the batch size
            assert cache.buffer.data_ptr() in buffers
    k, v = cache.append(fused(history[:, :, :1], history[:, :, :1]))
    torch.testing.assert_close(k[:, :, :-1], history)
    torch.testing.assert_close(v[:, :, :-1], 2 * history)
    assert cache.length == history.size(2) + 1


@pytest.mark.parametrize("large", [False, True])
def test_fast_inference_path_decodes_like_the_plain_layers(large, monkeypatch):
    """Transposed / oneDNN-packed weights, attention by SDPA or by matrix products,
    and grouped beams give the tokens that plain ``nn.Linear`` layers give, for
    greedy and beam search. ``large``: the tiny model takes the kernels that large
    weights and many hypotheses take."""
    import copy

    if large:
        monkeypatch.setattr("rosetta.model.linear.ONEDNN_TIERS", ((0, 2),))
        monkeypatch.setattr("rosetta.model.attention.MATMUL_MIN_ROWS", 2)

    from rosetta.decode import beam_search, greedy_search
    from rosetta.model.linear import Linear, as_plain_linear

    model = tiny_model(seed=3)
    with torch.no_grad():
        model.output.weight.mul_(4.0)  # sharper distributions: no float-noise ties
    plain = as_plain_linear(copy.deepcopy(model))
    assert not any(isinstance(m, Linear) for m in plain.modules())
    src, _ = random_batch(batch=12, src_len=9, seed=4)
    model.prepare_for_inference()
    for search in (
        lambda m: [h.tokens for h in greedy_search(m, src, lengths=Lengths(b=10))],
        lambda m: [h[0].tokens for h in beam_search(m, src, beam=4, lengths=Lengths(b=10))],
    ):
        assert search(model) == search(plain)


class ScaledQueries(SelfAttention):
    """An attention variant that changes the scores: queries scaled by 3."""

    def attend(self, q, k, v, mask=None, causal=False, need_weights=False):
        return super().attend(3 * q, k, v, mask, causal, need_weights)


def test_an_attention_variant_reaches_cached_decoding_as_the_full_pass(monkeypatch):
    """Decoding goes through the very code training runs: a subclass that changes the
    scores changes the cached steps exactly as it changes the teacher-forced pass, on
    every kernel path, and greedy search's output is the full pass's arg-max."""
    from rosetta.decode import greedy_search

    model = tiny_model(seed=6, tie_output=False)
    src, tgt = random_batch(batch=5, src_len=8, tgt_len=7, seed=7)
    original = model(src, tgt)
    for layer in model.decoder.layers:
        layer.self_attn.__class__ = ScaledQueries
    full = model(src, tgt)
    assert not torch.allclose(full, original, atol=1e-3)
    for path in PATHS:
        with search_context(path, model, monkeypatch):
            state = model.init_state(model.encode(src))
            for t in range(tgt.size(1)):
                logits = model.decode_step(tgt[:, t], state)
                torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-4)
        model.train()
    for hypothesis, row in zip(
        greedy_search(model.prepare_for_inference(), src, Lengths(1.5, 8, 64)), src
    ):
        tgt_in = torch.tensor([[BOS_ID, *hypothesis.tokens]])
        logits = model(row[None], tgt_in)[0]
        logits[:, [PAD_ID, BOS_ID]] = float("-inf")  # as the search forbids them
        assert logits.argmax(-1).tolist()[: len(hypothesis.tokens)] == hypothesis.tokens
