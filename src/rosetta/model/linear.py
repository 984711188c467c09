"""A linear layer with an optional inference form laid out for CPU GEMM kernels.

``nn.Linear`` computes x Wᵀ with W stored (out, in), and ATen hands the BLAS
the transposed operand on every call. Decoding multiplies few rows at a time
(a batch of hypotheses, or a single one), where that is slow. So a model put
in inference mode (``Seq2Seq.prepare_for_inference``, which calls
``Linear.prepare_for_inference`` on every layer) gets, per weight, copies laid
out for the kernel each row count runs fastest on:

* one row: two half-width GEMVs in one ``bmm`` (both cores read the weight);
* from ``onednn_min_rows`` rows (2 for weights of 2^19 elements or more, 4
  from 2^17, never for smaller ones): oneDNN with W reordered once into its
  blocked layout;
* otherwise a contiguous copy of Wᵀ.

The figures behind these thresholds are in ``benchmarks/results/linear_kernels.md``.

oneDNN's linear is reached through two operators PyTorch keeps private
(``torch.ops.mkldnn._reorder_linear_weight`` and ``_linear_pointwise``). They
are used only after a capability check (``onednn_usable``: both exist and give
``F.linear``'s result on a small product) and can be switched off
(``prepare_for_inference(onednn=False)``); the plain copies are the fallback,
and the tests run both.

The inference form is used only when no gradient is recorded, on float32
inputs; it is dropped when the module returns to training mode or loads a
state dict. Training never sees it: the parameters and the state dict are
those of ``nn.Linear``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (weight elements, rows from which oneDNN beats the BLAS against Wᵀ), largest first;
# smaller weights never go through oneDNN
ONEDNN_TIERS = ((1 << 19, 2), (1 << 17, 4))


def onednn_min_rows(weight: torch.Tensor) -> int | None:
    """From how many rows a product with ``weight`` is faster through oneDNN (None:
    never)."""
    for elements, rows in ONEDNN_TIERS:
        if weight.numel() >= elements:
            return rows
    return None


@functools.cache
def onednn_usable() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear and it computes ``F.linear``."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        # its own generator: a check made on first use must not move the global
        # random stream (exact resume replays that stream from the checkpoint)
        generator = torch.Generator().manual_seed(0)
        weight, bias = torch.randn(8, 16, generator=generator), torch.randn(8, generator=generator)
        rows = torch.randn(3, 16, generator=generator)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 3)
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
        return torch.allclose(out, F.linear(rows, weight, bias), atol=1e-5, rtol=1e-4)
    except (AttributeError, RuntimeError, TypeError):
        return False


class InferenceWeights:
    """A weight's copies laid out for CPU inference, each made on first use, and the
    product ``(rows, in) -> (rows, out)`` through the fastest kernel for the rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> None:
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.min_onednn_rows = onednn_min_rows(weight) if onednn else None
        self.splittable = weight.size(0) % 2 == 0  # into two halves of the outputs
        self._copies: dict[str, torch.Tensor] = {}
        self._one_row: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _copy(self, kind: str, make) -> torch.Tensor:
        if kind not in self._copies:
            with torch.no_grad():
                self._copies[kind] = make(self.weight)
        return self._copies[kind]

    def transposed(self) -> torch.Tensor:
        """Contiguous Wᵀ (in, out)."""
        return self._copy("transposed", lambda w: w.t().contiguous())

    def halves(self) -> torch.Tensor:
        """Wᵀ's two halves of the output features, (2, in, out / 2)."""
        out, inputs = self.weight.shape
        return self._copy(
            "halves", lambda w: w.t().reshape(inputs, 2, out // 2).transpose(0, 1).contiguous()
        )

    def packed(self) -> torch.Tensor:
        """W in oneDNN's blocked layout."""
        return self._copy("packed", lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 64))

    def one_row(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The product of one row (1, in) as two half-width GEMVs in one ``bmm``."""
        if self._one_row is None:
            halves, inputs = self.halves(), self.weight.size(1)
            if self.bias is None:

                def product(row: torch.Tensor) -> torch.Tensor:
                    return torch.bmm(row.expand(2, 1, inputs), halves).view(1, -1)
            else:
                bias = self.bias.view(2, 1, -1)

                def product(row: torch.Tensor) -> torch.Tensor:
                    return torch.baddbmm(bias, row.expand(2, 1, inputs), halves).view(1, -1)

            self._one_row = product
        return self._one_row

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        count = rows.size(0)
        if count == 1 and self.splittable and torch.get_num_threads() > 1:
            return (self._one_row or self.one_row())(rows)
        if self.min_onednn_rows is not None and count >= self.min_onednn_rows:
            return torch.ops.mkldnn._linear_pointwise(
                rows, self.packed(), self.bias, "none", [], ""
            )
        if self.bias is None:
            return rows @ self.transposed()
        return torch.addmm(self.bias, rows, self.transposed())


class Linear(nn.Linear):
    """``nn.Linear`` that can carry an inference form of its weight (see the module)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inference: InferenceWeights | None = None

    def prepare_for_inference(self, onednn: bool | None = None) -> None:
        """Lays the weight out for CPU inference (float32 weights on the CPU only).
        ``onednn``: use oneDNN's packed weights where they pay; None = where usable."""
        if self.weight.device.type != "cpu" or self.weight.dtype != torch.float32:
            self.inference = None
            return
        use_onednn = onednn_usable() if onednn is None else onednn and onednn_usable()
        self.inference = InferenceWeights(self.weight, self.bias, use_onednn)

    def train(self, mode: bool = True) -> Linear:
        if mode:
            self.inference = None  # training changes the weight
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.inference = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        # copies and pickles leave the inference form behind: a oneDNN-packed
        # tensor has no storage to copy
        return {**super().__getstate__(), "inference": None}

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        inference = self.inference
        if inference is None or x.dtype is not torch.float32 or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if x.dim() == 2:
            return inference(x)
        out = inference(x.reshape(-1, x.size(-1)))
        return out.view(*x.shape[:-1], out.size(-1))

    forward = project
    # Called straight, without the ``nn.Module`` call machinery (hooks are not run):
    # a decoding step makes ~20 of these calls, and the machinery costs more than
    # some of the products. Other linear modules (``nn.Linear``, PyTorch's dynamically
    # quantized one) keep their usual call.
    __call__ = project


def as_plain_linear(model: nn.Module) -> nn.Module:
    """Replaces every ``Linear`` by an ``nn.Linear`` holding the same parameters (tied
    weights stay tied), for tools that want the exact ``nn.Linear`` type, such as
    PyTorch's dynamic quantization."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                plain = nn.Linear(
                    child.in_features, child.out_features, child.bias is not None, device="meta"
                )
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
    return model
