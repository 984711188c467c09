"""Multi-head attention against hand-computed values and a reference implementation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rosetta.model.attention import CrossAttention, MultiHeadAttention, SelfAttention


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
    mask = ~pad[:, None, None, :]
    out, _ = ours(x, mask=mask)
    out_explicit, weights = ours(x, mask=mask, need_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_explicit, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-4)


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
    attention = CrossAttention(8, 2).eval()
    x = torch.randn(1, 3, 8)
    memory = torch.randn(1, 4, 8)
    padded = torch.cat([memory, torch.randn(1, 2, 8) * 100], dim=1)  # 2 junk positions
    mask = torch.tensor([[True] * 4 + [False] * 2])[:, None, None, :]
    out_padded, weights = attention(x, attention.project_memory(padded), mask, need_weights=True)
    out_plain, _ = attention(x, attention.project_memory(memory), need_weights=need_weights)
    assert torch.all(weights[..., 4:] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 3))
    torch.testing.assert_close(out_padded, out_plain, atol=1e-5, rtol=1e-4)


def test_memory_projected_on_real_tokens_only_equals_the_padded_projection():
    """With a ``Packing``, cross-attention K/V are computed for real source tokens
    only: equal at real positions, zero at padded ones, same attention output."""
    from rosetta.model.packing import Packing

    torch.manual_seed(3)
    attention = CrossAttention(8, 2).eval()
    memory = torch.randn(3, 5, 8)
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    packed = attention.project_memory(memory, Packing(real))
    plain = attention.project_memory(memory)
    where = real[:, None, :, None].expand_as(plain[0])  # (batch, heads, src_len, head_dim)
    for got, expected in zip(packed, plain):
        torch.testing.assert_close(got[where], expected[where])
        assert torch.all(got[~where] == 0)
    x = torch.randn(3, 4, 8)
    mask = real[:, None, None, :]
    torch.testing.assert_close(attention(x, packed, mask)[0], attention(x, plain, mask)[0])
