"""The efficient attention variants: each equals its definition written out as the
n×n computation, is causal where it must be, decodes step by step exactly as its
full pass (with a fixed-size state where it promises one), and plugs into the
model by configuration alone."""

from __future__ import annotations

import pytest
import torch

from rosetta.config import AttentionConfig, ConfigError, TransformerConfig, config_from_dict
from rosetta.data.tokenizer import BOS_ID, PAD_ID
from rosetta.decode.beam import beam_search
from rosetta.decode.common import Lengths
from rosetta.decode.greedy import greedy_search
from rosetta.model import build_model
from rosetta.model.efficient_attention import (
    LinearSelfAttention,
    LinearState,
    LocalSelfAttention,
    LowRankSelfAttention,
    LSHSelfAttention,
    SparseSelfAttention,
    WindowCache,
    band,
    causal_linear_attention,
    local_attention,
    sparse_allowed,
    sparse_attention,
)

VOCAB = 40
VARIANTS = {
    "local": {"variant": "local", "radius": 3},
    "linear": {"variant": "linear"},
    "favor": {"variant": "linear", "feature_map": "favor", "features": 16},
    "lowrank": {"variant": "lowrank", "rank": 5},
    "sparse": {"variant": "sparse", "radius": 2, "global_tokens": 2},
    "lsh": {"variant": "lsh", "bucket_size": 4, "hashes": 2},
}
DECODER_VARIANTS = ["local", "linear", "favor", "sparse"]


def qkv(batch=2, heads=3, n=50, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=generator) for _ in range(3)]


def reference(q, k, v, allowed):
    """softmax over the allowed keys, written out: (batch, heads, n, n) scores."""
    scores = (q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


# ---- local ------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,radius", [(50, 3), (200, 40), (97, 32), (7, 16), (130, 1)])
def test_local_attention_by_blocks_equals_the_banded_n_by_n_computation(n, radius, causal):
    q, k, v = qkv(n=n)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, n - n // 3 :] = False  # the second sentence is padded
    positions = torch.arange(n)
    allowed = band(positions, positions, radius, causal) & keep[:, None, None, :]
    allowed |= torch.eye(n, dtype=torch.bool)  # a padded query sees itself
    expected = reference(q, k, v, allowed)
    out, _ = local_attention(q, k, v, radius, keep, causal)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    # the real positions' outputs never depend on padding
    out_alone, _ = local_attention(
        *(t[1:, :, : n - n // 3] for t in (q, k, v)), radius, None, causal
    )
    torch.testing.assert_close(out[1:, :, : n - n // 3], out_alone, atol=1e-5, rtol=1e-4)


def test_local_attention_weights_are_zero_outside_the_window():
    q, k, v = qkv(n=40)
    _, weights = local_attention(q, k, v, radius=4, need_weights=True)
    offset = torch.arange(40)[:, None] - torch.arange(40)[None, :]
    assert weights[..., offset.abs() > 4].abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 40))


def test_local_attention_backward_through_blocks_matches_the_reference():
    q, k, v = (t.requires_grad_() for t in qkv(n=150))
    positions = torch.arange(150)
    out, _ = local_attention(q, k, v, 33, None, True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = reference(q, k, v, band(positions, positions, 33, True))
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_window_cache_keeps_only_the_last_radius_plus_one_positions():
    module = LocalSelfAttention(16, 2, radius=3).eval()
    cache = module.new_cache()
    assert isinstance(cache, WindowCache)
    x = torch.randn(2, 12, 16)
    full, _ = module(x, causal=True)
    for t in range(12):
        torch.testing.assert_close(module.step(x[:, t], cache), full[:, t], atol=1e-5, rtol=1e-4)
        assert cache.keys.shape == (2, 2, 4, 8)  # the ring never grows


# ---- linear -----------------------------------------------------------------------------


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_equals_its_n_by_n_form(feature_map, causal):
    torch.manual_seed(0)  # the random features: the same draw whatever ran before
    module = LinearSelfAttention(24, 3, feature_map=feature_map, features=16)
    q, k, v = qkv(n=150)
    keep = torch.ones(2, 150, dtype=torch.bool)
    if not causal:
        keep[0, 100:] = False
    fq, fk = module.features(q, query=True), module.features(k) * keep[:, None, :, None]
    scores = fq @ fk.transpose(-1, -2)
    if causal:
        scores = scores.tril()
    expected = (scores / scores.sum(-1, keepdim=True)) @ v
    out, weights = module.attend(q, k, v, keep[:, None, None, :], causal, need_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weights @ v, expected, atol=1e-4, rtol=1e-4)


def test_causal_linear_attention_by_chunks_handles_lengths_off_the_chunk_size():
    generator = torch.Generator().manual_seed(3)
    fq, fk = (torch.rand(1, 2, 131, 6, generator=generator) for _ in range(2))
    v = torch.randn(1, 2, 131, 5, generator=generator)
    scores = (fq @ fk.transpose(-1, -2)).tril()
    expected = (scores / scores.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(causal_linear_attention(fq, fk, v), expected, atol=1e-5, rtol=1e-4)


def test_favor_features_approximate_softmax_attention():
    """Performer's estimator: with many random features, φ(q)·φ(k) ≈ exp(q·k/√d)."""
    torch.manual_seed(0)
    module = LinearSelfAttention(16, 1, feature_map="favor", features=4096)
    q, k, v = (0.5 * t for t in qkv(batch=1, heads=1, n=20, dim=16))
    out, _ = module.attend(q, k, v)
    exact = reference(q, k, v, torch.ones(20, 20, dtype=torch.bool))
    assert (out - exact).abs().max() < 0.1


def test_linear_decoding_carries_a_fixed_size_state():
    module = LinearSelfAttention(16, 2).eval()
    cache = module.new_cache()
    assert isinstance(cache, LinearState)
    x = torch.randn(3, 20, 16)
    full, _ = module(x, causal=True)
    for t in range(20):
        torch.testing.assert_close(module.step(x[:, t], cache), full[:, t], atol=1e-5, rtol=1e-4)
        assert cache.summed.shape == (3, 2, 8, 8) and cache.key_sum.shape == (3, 2, 8)


# ---- low-rank ---------------------------------------------------------------------------


def test_lowrank_attention_equals_attention_over_projected_keys_and_values():
    module = LowRankSelfAttention(24, 3, rank=5, max_length=64)
    q, k, v = qkv(n=30)
    keep = torch.ones(2, 30, dtype=torch.bool)
    keep[1, 20:] = False
    out, weights = module.attend(q, k, v, keep[:, None, None, :], need_weights=True)
    masked = keep[:, None, :, None]
    k_low = module.key_length_proj[:, :30] @ (k * masked)
    v_low = module.value_length_proj[:, :30] @ (v * masked)
    expected = reference(q, k_low, v_low, torch.ones(30, 5, dtype=torch.bool))
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights @ (v * masked), out.detach(), atol=1e-5, rtol=1e-4)
    # the padded sentence's real positions see what they would alone
    alone, _ = module.attend(*(t[1:, :, :20] for t in (q, k, v)))
    torch.testing.assert_close(out[1:, :, :20], alone, atol=1e-5, rtol=1e-4)


def test_lowrank_attention_refuses_inputs_longer_than_its_projection():
    module = LowRankSelfAttention(24, 3, rank=5, max_length=16)
    with pytest.raises(ValueError, match="at most 16 positions"):
        module.attend(*qkv(n=17))
    with pytest.raises(ValueError, match="not causal"):
        module.attend(*qkv(n=10), causal=True)


# ---- sparse with global positions ---------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,radius,globals_", [(100, 3, 2), (97, 32, 5), (200, 1, 1), (70, 4, 0)])
def test_sparse_attention_by_blocks_equals_its_n_by_n_mask(n, radius, globals_, causal):
    q, k, v = qkv(n=n)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, n - 9 :] = False  # padding at the end of row 2
    got, _ = sparse_attention(q, k, v, radius, globals_, keep, causal)
    allowed = sparse_allowed(n, radius, globals_, causal)
    allowed = allowed & (keep[:, None, None, :] | torch.eye(n, dtype=torch.bool))
    torch.testing.assert_close(got, reference(q, k, v, allowed), atol=1e-5, rtol=1e-4)


def test_sparse_attention_pattern_window_plus_global_rows_and_columns():
    allowed = sparse_allowed(8, 1, 2, causal=False)
    assert allowed[0].all() and allowed[:, 1].all()  # global: sees and is seen by all
    assert allowed[5].tolist() == [True, True, False, False, True, True, True, False]
    causal = sparse_allowed(8, 1, 2, causal=True)
    assert causal[5].tolist() == [True, True, False, False, True, True, False, False]
    assert not causal.triu(1).any()


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_attention_with_a_window_covering_everything_is_full_attention(causal):
    q, k, v = qkv(n=90)
    got, _ = sparse_attention(q, k, v, radius=90, globals_=3, causal=causal)
    full = torch.ones(90, 90, dtype=torch.bool)
    torch.testing.assert_close(got, reference(q, k, v, full.tril() if causal else full))


def test_causal_sparse_attention_never_looks_ahead():
    """The gradient of each output position reaches no later input position."""
    module = SparseSelfAttention(16, 2, radius=3, globals_=2)
    x = torch.randn(1, 80, 16, requires_grad=True)
    out, _ = module(x, causal=True)
    for t in (0, 1, 5, 40, 79):
        (grad,) = torch.autograd.grad(out[0, t].sum(), x, retain_graph=True)
        seen = grad[0].abs().sum(-1) > 0
        assert not seen[t + 1 :].any() and seen[t]
        assert seen[: min(2, t + 1)].all()  # the global positions (before it)
        assert not seen[2 : max(2, t - 3)].any()  # outside the window


# ---- LSH (Reformer) ---------------------------------------------------------------------


def shared_qk_reference(q, v, keep=None):
    """Full attention with Reformer's rules, written out: keys = q / |q|, a query's
    score on itself -1e5 (used only when nothing else is there)."""
    keys = torch.nn.functional.normalize(q, dim=-1)
    scores = (q @ keys.transpose(-1, -2)) / q.size(-1) ** 0.5
    n = q.size(2)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], -1e9)
    scores = scores.masked_fill(torch.eye(n, dtype=torch.bool), -1e5)
    return scores.softmax(-1) @ v


def test_lsh_with_one_chunk_is_full_attention_with_shared_qk():
    module = LSHSelfAttention(24, 3, bucket_size=64, hashes=3)
    q, _, v = qkv(heads=3, n=50)
    keep = torch.ones(2, 50, dtype=torch.bool)
    keep[1, 41:] = False
    got, weights = module.attend(q, q, v, keep[:, None, None, :], need_weights=True)
    expected = shared_qk_reference(q, v, keep)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1, :, :41], expected[1, :, :41], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights @ v, got, atol=1e-5, rtol=1e-4)  # the maps are exact


def test_lsh_attends_within_hash_chunks_and_its_maps_give_its_output():
    torch.manual_seed(0)
    module = LSHSelfAttention(16, 2, bucket_size=8, hashes=1)
    q, _, v = qkv(heads=2, n=64, dim=8)
    got, weights = module.attend(q, q, v, need_weights=True)
    torch.testing.assert_close(weights @ v, got, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 64))
    # each query sees at most its chunk and the one before: 2 x 8 keys
    assert int((weights > 0).sum(-1).max()) <= 16
    # the keys it sees are of its own bucket (8 buckets of 64 positions)
    buckets = module.buckets(q)[:, :, 0]  # (batch, heads, n)
    same = buckets[..., :, None] == buckets[..., None, :]
    assert float((weights * ~same).sum()) < 1e-6


def test_lsh_gradients_equal_those_of_its_definition():
    """Backward through the sorted chunks and the rounds' combination: with one chunk,
    the gradient of full attention with shared QK."""
    module = LSHSelfAttention(16, 2, bucket_size=64, hashes=2)
    q, _, v = qkv(heads=2, n=40, dim=8)
    q.requires_grad_(True)
    v.requires_grad_(True)
    (grad_q, grad_v) = torch.autograd.grad(module.attend(q, q, v)[0].square().sum(), (q, v))
    (want_q, want_v) = torch.autograd.grad(shared_qk_reference(q, v).square().sum(), (q, v))
    torch.testing.assert_close(grad_q, want_q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_v, want_v, atol=1e-4, rtol=1e-4)
    # several chunks and rounds: backward runs and reaches every input position
    module = LSHSelfAttention(16, 2, bucket_size=8, hashes=2)
    (grad,) = torch.autograd.grad(module.attend(q, q, v)[0].sum(), q)
    assert grad.abs().sum(-1).gt(0).all()


def test_lsh_outputs_do_not_depend_on_the_padding_of_a_batch():
    """A row's buckets and chunks come from its own length: padding it (which changes
    the batch's length, and so would the bucket count) changes none of its outputs."""
    module = LSHSelfAttention(16, 2, bucket_size=4, hashes=2)
    q, _, v = qkv(batch=1, heads=2, n=23, dim=8)
    alone, _ = module.attend(q, q, v)
    for extra in (1, 9, 40):
        padded_q, padded_v = (torch.nn.functional.pad(t, (0, 0, 0, extra)) for t in (q, v))
        keep = torch.arange(23 + extra)[None, :] < 23
        got, _ = module.attend(padded_q, padded_q, padded_v, keep[:, None, None, :])
        torch.testing.assert_close(got[:, :, :23], alone, atol=1e-5, rtol=1e-4)


def test_lsh_refuses_the_decoder():
    module = LSHSelfAttention(16, 2)
    with pytest.raises(ValueError, match="not causal"):
        module.attend(*qkv(heads=2, n=10), causal=True)
    with pytest.raises(ConfigError, match=r"decoder_attention\.variant lsh"):
        config_from_dict(
            {
                "experiment_dir": "x",
                "data": {"toy": {}},
                "model": {"decoder_attention": {"variant": "lsh"}},
            }
        )


# ---- in the model -----------------------------------------------------------------------


def variant_model(encoder: str, decoder: str = "full", seed: int = 0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        d_model=32,
        d_ff=64,
        heads=4,
        encoder_layers=2,
        decoder_layers=2,
        dropout=0.0,
        max_positions=64,
        tie_output=False,
        encoder_attention=VARIANTS.get(encoder, {}),
        decoder_attention=VARIANTS.get(decoder, {}),
    )
    return build_model(cfg, VOCAB, VOCAB).eval()


def random_batch(batch=4, src_len=23, tgt_len=14, seed=1):
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (batch, src_len), generator=generator)
    src[0, src_len - 6 :] = PAD_ID
    tgt = torch.randint(4, VOCAB, (batch, tgt_len), generator=generator)
    tgt[:, 0] = BOS_ID
    return src, tgt


@pytest.mark.parametrize("encoder", ["full", *VARIANTS])
def test_the_encoder_variant_is_chosen_by_configuration_and_ignores_padding(encoder):
    model = variant_model(encoder)
    expected = {"full": "SelfAttention", "lowrank": "LowRankSelfAttention"}
    kind = {
        "local": "LocalSelfAttention",
        "linear": "LinearSelfAttention",
        "sparse": "SparseSelfAttention",
        "lsh": "LSHSelfAttention",
    }
    name = expected.get(encoder) or kind.get(encoder, "LinearSelfAttention")
    assert all(type(layer.self_attn).__name__ == name for layer in model.encoder.layers)
    src, tgt = random_batch()
    longer = torch.cat([src, torch.full((4, 5), PAD_ID)], dim=1)
    torch.testing.assert_close(model(longer, tgt), model(src, tgt), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("decoder", DECODER_VARIANTS)
def test_decoder_variants_are_causal(decoder):
    model = variant_model("full", decoder)
    src, tgt = random_batch()
    before = model(src, tgt)
    for t in (1, 6, 13):
        changed = tgt.clone()
        changed[:, t] = (changed[:, t] + 1 - 4) % (VOCAB - 4) + 4
        after = model(src, changed)
        torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(after[:, t:], before[:, t:])


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize(
    "encoder,decoder", [(v, v) for v in DECODER_VARIANTS] + [("lowrank", "full")]
)
def test_cached_decoding_equals_the_full_pass(encoder, decoder, inference, monkeypatch):
    model = variant_model(encoder, decoder)
    src, tgt = random_batch(tgt_len=20)  # longer than the local radius
    full = model(src, tgt)
    if inference:  # prepared weights, and attention by matrix products as for many rows
        model.prepare_for_inference()
        monkeypatch.setattr("rosetta.model.attention.MATMUL_MIN_ROWS", 1)
    with torch.inference_mode(inference):
        state = model.init_state(model.encode(src))
        for t in range(tgt.size(1)):
            torch.testing.assert_close(
                model.decode_step(tgt[:, t], state), full[:, t], atol=1e-4, rtol=1e-4
            )
        # beam search re-ranks rows: the states follow their hypotheses
        state.select_sources(torch.tensor([3, 1, 1, 0]))
        expected = model(src[[3, 1, 1, 0]], torch.cat([tgt[[3, 1, 1, 0]], tgt[:4, :1]], 1))
        torch.testing.assert_close(
            model.decode_step(tgt[:4, 0], state), expected[:, -1], atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("encoder,decoder", [("local", "local"), ("lowrank", "linear")])
def test_search_and_attention_maps_run_on_the_variants(encoder, decoder):
    model = variant_model(encoder, decoder, seed=3)
    src, _ = random_batch()
    lengths = Lengths(1.0, 5, 64)
    greedy = greedy_search(model, src, lengths)
    beams = beam_search(model, src, beam=3, lengths=lengths)
    assert len(greedy) == len(beams) == 4
    for hypothesis, row in zip(greedy, src):  # greedy = the full pass's arg-max
        tgt_in = torch.tensor([[BOS_ID, *hypothesis.tokens]])
        logits = model(row[None], tgt_in)[0]
        logits[:, [PAD_ID, BOS_ID]] = float("-inf")
        assert logits.argmax(-1).tolist()[: len(hypothesis.tokens)] == hypothesis.tokens
    tgt_in = torch.tensor([[BOS_ID, *greedy[1].tokens]])
    maps = model.attention_maps(src[1:2], tgt_in)
    n, m = src.size(1), tgt_in.size(1)
    assert [w.shape for w in maps["encoder_self"]] == [(1, 4, n, n)] * 2
    assert [w.shape for w in maps["decoder_self"]] == [(1, 4, m, m)] * 2
    assert [w.shape for w in maps["cross"]] == [(1, 4, m, n)] * 2


def test_configuration_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"decoder_attention\.variant lowrank"):
        config_from_dict(
            {
                "experiment_dir": "x",
                "data": {"toy": {}},
                "model": {"decoder_attention": {"variant": "lowrank"}},
            }
        )
    with pytest.raises(ConfigError, match=r"model\.encoder_attention\.radius"):
        config_from_dict(
            {
                "experiment_dir": "x",
                "data": {"toy": {}},
                "model": {"encoder_attention": {"variant": "local", "radius": 0}},
            }
        )
    assert AttentionConfig().variant == "full"


def test_ctranslate2_export_refuses_a_variant():
    from rosetta.export.ctranslate2 import check_representable

    check_representable(variant_model("full"))
    with pytest.raises(ValueError, match="LocalSelfAttention"):
        check_representable(variant_model("local"))
