"""Multi-head attention against hand-computed values and a reference implementation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rosetta.model import attention as attention_module
from rosetta.model.attention import CrossAttention, MultiHeadAttention, SelfAttention, attention
from rosetta.model.packing import SourcePadding


def test_worked_example_from_the_notes():
    """The seeds' 我/爱/你 example: d_model = 1, values 1, 2, 3, each word attending
    0.6 to itself and 0.2 to the others. The notes print 1.4/1.8/2.2, an arithmetic
    slip: 0.6*1 + 0.2*2 + 0.2*3 = 1.6, and likewise 2.0 and 2.4."""
    attention = MultiHeadAttention(d_model=1, heads=1)
    with torch.no_grad():
        attention.out_proj.weight.fill_(1.0)
        attention.out_proj.bias.zero_()
    q = torch.zeros(1, 1, 3, 1)  # equal raw scores; the bias below sets the weights
    k = torch.zeros(1, 1, 3, 1)
    v = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    bias = math.log(3.0) * torch.eye(3)  # softmax([ln 3, 0, 0]) = [0.6, 0.2, 0.2]
    fused, _ = attention.attend(q, k, v, mask=bias)
    explicit, weights = attention.attend(q, k, v, mask=bias, need_weights=True)
    expected = torch.tensor([1.6, 2.0, 2.4])
    torch.testing.assert_close(fused.flatten(), expected)
    torch.testing.assert_close(explicit.flatten(), expected)
    torch.testing.assert_close(weights[0, 0], torch.full((3, 3), 0.2).fill_diagonal_(0.6))


def test_self_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    d_model, heads = 16, 4
    ours = SelfAttention(d_model, heads)
    reference = nn.MultiheadAttention(d_model, heads, batch_first=True)
    with torch.no_grad():
        # nn.MultiheadAttention stacks W_Q, W_K, W_V in in_proj like our fused W_QKV
        ours.qkv_proj.weight.copy_(reference.in_proj_weight)
        ours.qkv_proj.bias.copy_(reference.in_proj_bias)
        ours.out_proj.weight.copy_(reference.out_proj.weight)
        ours.out_proj.bias.copy_(reference.out_proj.bias)
    x = torch.randn(3, 7, d_model)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 3:] = True
    expected, expected_weights = reference(
        x, x, x, key_padding_mask=pad, average_attn_weights=False
    )
    padding = SourcePadding(pad)
    assert padding.packed  # the encoder's layout: real tokens' rows in and out
    out, _ = ours(padding.pack(x), padding)
    out_explicit, weights = ours(padding.pack(x), padding, need_weights=True)
    real = ~pad
    torch.testing.assert_close(padding.unpack(out)[real], expected[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        padding.unpack(out_explicit)[real], expected[real], atol=1e-5, rtol=1e-4
    )
    # the rows of real queries (padded positions' queries are never read)
    queries = real[:, None, :, None].expand_as(weights)
    torch.testing.assert_close(weights[queries], expected_weights[queries], atol=1e-6, rtol=1e-4)


def test_causal_self_attention_matches_reference_with_attn_mask():
    torch.manual_seed(1)
    ours = SelfAttention(8, 2)
    reference = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        ours.qkv_proj.weight.copy_(reference.in_proj_weight)
        ours.qkv_proj.bias.copy_(reference.in_proj_bias)
        ours.out_proj.load_state_dict(reference.out_proj.state_dict())
    x = torch.randn(2, 5, 8)
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    expected, _ = reference(x, x, x, attn_mask=future)
    out, _ = ours(x, causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("need_weights", [False, True])
def test_padded_keys_get_zero_weight_and_do_not_change_outputs(need_weights):
    torch.manual_seed(2)
    cross = CrossAttention(8, 2).eval()
    x = torch.randn(1, 3, 8)
    memory = torch.randn(1, 4, 8)
    padded = torch.cat([memory, torch.randn(1, 2, 8) * 100], dim=1)  # 2 junk positions
    padding = SourcePadding(torch.tensor([[False] * 4 + [True] * 2]))
    out_padded, weights = cross(x, cross.project_memory(padded, padding), need_weights=True)
    out_plain, _ = cross(x, cross.project_memory(memory), need_weights=need_weights)
    assert torch.all(weights[..., 4:] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 3))
    torch.testing.assert_close(out_padded, out_plain, atol=1e-5, rtol=1e-4)


def test_memory_projected_on_real_tokens_only_equals_the_padded_projection(monkeypatch):
    """With a packing, cross-attention K/V are computed for real source tokens
    only: equal at real positions, zero at padded ones, same attention output."""
    from rosetta.model import packing

    torch.manual_seed(3)
    cross = CrossAttention(8, 2).eval()
    memory = torch.randn(3, 5, 8)
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    packed = cross.project_memory(memory, SourcePadding(~real))
    monkeypatch.setattr(packing, "MIN_PADDING", 2.0)  # the same padding, never packed
    plain = cross.project_memory(memory, SourcePadding(~real))
    where = real[:, None, :, None].expand_as(plain.keys)  # (batch, heads, src_len, head_dim)
    for got, expected in ((packed.keys, plain.keys), (packed.values, plain.values)):
        torch.testing.assert_close(got[where], expected[where])
        assert torch.all(got[~where] == 0)
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(cross(x, packed)[0], cross(x, plain)[0])


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "causal"])
def test_the_three_forms_of_the_attention_function_agree(mask_kind, monkeypatch):
    """SDPA, the written-out product that returns weights, and the batched matrix
    products a search step takes on many rows: one function, one result."""
    torch.manual_seed(4)
    q, k, v = torch.randn(6, 2, 3, 4), torch.randn(6, 2, 5, 4), torch.randn(6, 2, 5, 4)
    pad = torch.zeros(6, 5, dtype=torch.bool)
    pad[1, 3:] = pad[4, 1:] = True
    mask, causal = None, mask_kind == "causal"
    if causal:
        k, v = k[:, :, :3], v[:, :, :3]
    elif mask_kind == "bool":
        mask = ~pad[:, None, None, :]
    elif mask_kind == "additive":
        mask = SourcePadding(pad).additive_mask(torch.float32)
    fused, none = attention(q, k, v, mask, causal)
    explicit, weights = attention(q, k, v, mask, causal, need_weights=True)
    monkeypatch.setattr(attention_module, "MATMUL_MIN_ROWS", 1)
    with torch.no_grad():
        by_matmul, _ = attention(q, k, v, mask, causal)
    assert none is None and weights.shape == (6, 2, 3, k.size(2))
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(by_matmul, fused, atol=1e-5, rtol=1e-4)
    if mask_kind in ("bool", "additive"):
        assert torch.all(weights[4, :, :, 1:] == 0)
