"""The inference path of ``Linear`` (transposed / oneDNN-packed weights) equals
``F.linear``, follows weight updates and leaves quantization working."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rosetta.model.linear import (
    LARGE_WEIGHT,
    ONEDNN_MIN_ROWS,
    Linear,
    as_plain_linear,
    onednn_min_rows,
)


@pytest.mark.parametrize("rows", [1, 3, ONEDNN_MIN_ROWS, 37])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_path_equals_f_linear(rows, bias):
    torch.manual_seed(0)
    layer = Linear(48, 300, bias=bias)
    x = torch.randn(rows, 2, 48)
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (rows, 2, 300)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_large_weights_take_onednn_from_two_rows(rows):
    """An output projection's size: few rows already go through oneDNN."""
    torch.manual_seed(3)
    layer = Linear(128, LARGE_WEIGHT // 128, bias=False)
    assert onednn_min_rows(layer.weight) == 2 < ONEDNN_MIN_ROWS
    x = torch.randn(rows, 128)
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, F.linear(x, layer.weight), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("out_features", "bias"), [(300, True), (300, False), (301, True)])
def test_one_row_in_halves_equals_f_linear(threads, out_features, bias):
    """One row goes through two half-width GEMVs when there are threads to share
    them (even widths), else against Wᵀ; the result is the same."""
    torch.manual_seed(4)
    layer = Linear(48, out_features, bias=bias)
    x = torch.randn(1, 48)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = layer(x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    halves_used = "halves" in layer.inference_weights()._copies
    assert halves_used == (threads > 1 and out_features % 2 == 0)


def test_cached_weights_follow_updates_and_training_keeps_gradients():
    torch.manual_seed(1)
    layer = Linear(16, 8)
    x = torch.randn(10, 16)
    with torch.no_grad():
        first = layer(x)
        layer.weight.add_(1.0)  # an optimizer step, in place
        second = layer(x)
    torch.testing.assert_close(second, F.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(first, second)
    layer(x).sum().backward()  # the training path records gradients
    assert layer.weight.grad is not None


@pytest.mark.parametrize("fused", [True, False])
def test_validation_inside_a_training_loop_sees_every_optimizer_step(fused):
    """Fused Adam updates parameters without bumping their version counter: the
    inference copies must still follow it (train()/eval() switches, training
    forward passes)."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(Linear(16, 32), torch.nn.ReLU(), Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    x = torch.randn(ONEDNN_MIN_ROWS + 2, 16)
    for _ in range(3):
        model.train()
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.inference_mode():
            fast, single = model(x), model(x[:1])
        hidden = torch.relu(F.linear(x, model[0].weight, model[0].bias))
        plain = F.linear(hidden, model[2].weight, model[2].bias)
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single, plain[:1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model[2].weight.mul_(2.0)  # an ordinary in-place update bumps the version counter
    with torch.inference_mode():
        doubled = model(x)
    hidden = torch.relu(F.linear(x, model[0].weight, model[0].bias))
    torch.testing.assert_close(doubled, F.linear(hidden, model[2].weight, model[2].bias))


def test_as_plain_linear_keeps_tied_parameters():
    model = torch.nn.Sequential(Linear(4, 6), Linear(6, 4, bias=False))
    model[1].weight = torch.nn.Parameter(model[0].weight.t().contiguous())
    tied = model[1].weight
    plain = as_plain_linear(model)
    assert [type(m) for m in plain] == [torch.nn.Linear, torch.nn.Linear]
    assert plain[1].weight is tied
    quantized = torch.ao.quantization.quantize_dynamic(plain, {torch.nn.Linear})
    assert quantized(torch.randn(2, 4)).shape == (2, 4)


def test_a_layer_that_ran_inference_can_be_copied_and_pickled():
    import copy

    layer = Linear(16, 24)
    x = torch.randn(ONEDNN_MIN_ROWS, 16)
    with torch.inference_mode():
        expected = layer(x)  # packs the weight for oneDNN
    for clone in (copy.deepcopy(layer), torch.load(_pickled(layer), weights_only=False)):
        with torch.inference_mode():
            torch.testing.assert_close(clone(x), expected)


def _pickled(layer: torch.nn.Module):
    import io

    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    return buffer
