"""The inference form of ``Linear`` (transposed / oneDNN-packed weights) equals
``F.linear`` with and without oneDNN, is made and dropped at the right moments,
and leaves quantization working."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rosetta.model.linear import Linear, as_plain_linear, onednn_min_rows, onednn_usable

# (in, out) of a small weight (never oneDNN), a middle one (oneDNN from 4 rows)
# and a large one (from 2 rows)
SIZES = [(48, 300), (128, 1024), (128, 4096)]


def test_weight_sizes_pick_their_kernels():
    assert [onednn_min_rows(torch.empty(out, inputs)) for inputs, out in SIZES] == [None, 4, 2]
    assert onednn_min_rows(torch.empty(256, 256)) is None  # small's attention projections
    assert onednn_min_rows(torch.empty(8000, 256)) == 2  # an output projection


def test_onednn_capability_check_passes_on_this_build():
    """The pinned PyTorch has the private operators; the check runs them for real."""
    assert onednn_usable() == torch.backends.mkldnn.is_available()


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9])
@pytest.mark.parametrize(("inputs", "out"), SIZES)
@pytest.mark.parametrize("bias", [True, False])
def test_inference_path_equals_f_linear(rows, inputs, out, bias, onednn):
    """Every kernel (halves for one row, Wᵀ, oneDNN from its tier's rows, or the
    plain fallback without oneDNN) gives ``F.linear``'s result."""
    torch.manual_seed(0)
    layer = Linear(inputs, out, bias=bias)
    layer.prepare_for_inference(onednn=onednn)
    x = torch.randn(rows, 2, inputs)
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (rows, 2, out)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    minimum = onednn_min_rows(layer.weight)
    packed = "packed" in layer.inference._copies
    assert packed == (onednn and minimum is not None and 2 * rows >= minimum)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("out_features", "bias"), [(300, True), (300, False), (301, True)])
def test_one_row_in_halves_equals_f_linear(threads, out_features, bias):
    """One row goes through two half-width GEMVs when there are threads to share
    them (even widths), else against Wᵀ; the result is the same."""
    torch.manual_seed(4)
    layer = Linear(48, out_features, bias=bias)
    layer.prepare_for_inference()
    x = torch.randn(1, 48)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = layer(x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    halves_used = "halves" in layer.inference._copies
    assert halves_used == (threads > 1 and out_features % 2 == 0)


def test_the_inference_form_is_used_only_without_gradients_and_dropped_on_change():
    torch.manual_seed(1)
    layer = Linear(16, 8)
    x = torch.randn(10, 16)
    assert layer.inference is None  # nothing is decided until it is asked for
    layer.prepare_for_inference()
    layer(x).sum().backward()  # gradients on: the plain path, which records them
    assert layer.weight.grad is not None and layer.inference is not None
    layer.train()
    assert layer.inference is None  # training changes the weight
    layer.prepare_for_inference()
    layer.load_state_dict({"weight": torch.ones(8, 16), "bias": torch.zeros(8)})
    assert layer.inference is None
    layer.prepare_for_inference()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), x.sum(-1, keepdim=True).expand(10, 8))


@pytest.mark.parametrize("fused", [True, False])
def test_validation_inside_a_training_loop_sees_every_optimizer_step(fused):
    """Fused Adam updates parameters without bumping their version counter; the
    inference form, made when the model is prepared, follows every step."""
    from rosetta.model.interface import Seq2Seq

    torch.manual_seed(2)
    # a middle-sized and a small weight: the oneDNN and Wᵀ paths, and halves for one row
    model = torch.nn.Sequential(Linear(16, 8192), torch.nn.ReLU(), Linear(8192, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
    x = torch.randn(6, 16)
    for _ in range(3):
        model.train()
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        Seq2Seq.prepare_for_inference(model)  # what Translator does at every validation
        with torch.inference_mode():
            fast, single = model(x), model(x[:1])
        hidden = torch.relu(F.linear(x, model[0].weight, model[0].bias))
        plain = F.linear(hidden, model[2].weight, model[2].bias)
        torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(single, plain[:1], atol=1e-4, rtol=1e-5)


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

    layer = Linear(128, 1024)
    layer.prepare_for_inference()
    x = torch.randn(4, 128)
    with torch.inference_mode():
        expected = layer(x)  # packs the weight for oneDNN
    assert layer.inference._copies["packed"] is not None
    for clone in (copy.deepcopy(layer), torch.load(_pickled(layer), weights_only=False)):
        assert clone.inference is None
        with torch.inference_mode():
            torch.testing.assert_close(clone(x), expected)


def _pickled(layer: torch.nn.Module):
    import io

    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    return buffer


def test_int8_quantization_reaches_every_layer_a_step_calls():
    """``quantize_dynamic`` swaps modules in ``_modules``; a ``Block`` keeps attribute
    copies, which must follow, or the model would go on running float layers."""
    from rosetta.config import TransformerConfig
    from rosetta.model import build_model
    from rosetta.model.quantize import quantize_int8

    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=32, d_ff=64, heads=2, encoder_layers=1, decoder_layers=1)
    model = build_model(cfg, 40, 40).eval()
    src, tgt_in = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[2, 9, 10]])
    with torch.no_grad():
        before = model(src, tgt_in)
        quantized = quantize_int8(model)
        after = quantized(src, tgt_in)
    for module in quantized.modules():  # what attribute lookup finds: never a float layer
        for name in module._modules:
            found = getattr(module, name)
            assert found is module._modules[name]
            assert type(found) is not torch.nn.Linear, name
    assert not torch.equal(before, after)  # int8 arithmetic, not the float layers
    torch.testing.assert_close(after, before, atol=0.5, rtol=0.1)
