"""A linear layer whose inference path suits CPU GEMM kernels.

``nn.Linear`` computes x Wᵀ with W stored (out, in), and ATen hands MKL the
transposed operand on every call. Decoding multiplies few rows at a time
(a batch of hypotheses, or a single one), where that is slow. Measured on this
project's 2-core machine (``benchmarks/speed.py`` has the end-to-end effect):

* one row (batch-1 greedy search) by the 256 x 8000 output projection: 4
  GFLOP/s with ``F.linear``, 11 against a contiguous copy of Wᵀ;
* 32 rows: 28 GFLOP/s with ``F.linear``, 34 against Wᵀ, 60 through oneDNN
  with W reordered once into its blocked layout (160 rows: 46 / 54 / 68).

* the 256 x 8000 output projection by 2 to 7 rows (beam search at batch 1,
  the last sentences of a greedy batch): 2.2-2.6x faster through oneDNN than
  against Wᵀ (5 rows: 0.86 against 2.2 ms); for the layers of 256 x 1024 and
  smaller, the two are within noise of each other up to 32 rows.

So when no gradient is being recorded, ``Linear`` multiplies through oneDNN
with a packed copy of W from 8 rows on (from 2 rows for a weight of 2^20
elements or more), and otherwise against a contiguous copy of Wᵀ
(``onednn_min_rows``). Training, anything that needs gradients, other devices and
``torch.compile`` take the plain ``F.linear`` path; the parameters and the
state dict are those of ``nn.Linear``.

The copies are made on first use and dropped whenever the weight may have
changed: when the weight's storage or version counter moves (``load_state_dict``,
in-place updates, a move to another device), when the module is switched to
training mode, and at every forward pass that records gradients. The last two
matter: PyTorch's fused Adam updates parameters without bumping their version
counter, so validation inside a training loop would otherwise decode with the
weights of its first validation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_MIN_ROWS = 8  # below this, the transposed weight and MKL win ...
ONEDNN_MIN_ROWS_LARGE = 2  # ... except for large weights (the output projection)
LARGE_WEIGHT = 1 << 20  # elements
_onednn = {"available": torch.backends.mkldnn.is_available()}


def onednn_min_rows(weight: torch.Tensor) -> int:
    """From how many rows on a product with ``weight`` is faster through oneDNN."""
    return ONEDNN_MIN_ROWS_LARGE if weight.numel() >= LARGE_WEIGHT else ONEDNN_MIN_ROWS


def _weight_key(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), weight._version, weight.device, weight.dtype, weight.shape)


class Linear(nn.Linear):
    """``nn.Linear`` with inference copies of its weight laid out for CPU kernels."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._inference_weights: dict[str, tuple[tuple, torch.Tensor | None]] = {}

    def _cached(self, kind: str, make) -> torch.Tensor | None:
        key = _weight_key(self.weight)
        cached = self._inference_weights.get(kind)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, make(self.weight.detach()))
            self._inference_weights[kind] = cached
        return cached[1]

    def transposed_weight(self) -> torch.Tensor:
        """Contiguous Wᵀ (in, out)."""
        return self._cached("transposed", lambda w: w.t().contiguous())

    def packed_weight(self) -> torch.Tensor | None:
        """W in oneDNN's blocked layout, or None where oneDNN cannot take it."""

        def pack(weight: torch.Tensor) -> torch.Tensor | None:
            if not _onednn["available"] or weight.dtype != torch.float32:
                return None
            try:
                return torch.ops.mkldnn._reorder_linear_weight(weight, 64)
            except (AttributeError, RuntimeError):  # an op this PyTorch build lacks
                _onednn["available"] = False
                return None

        return self._cached("packed", pack)

    def __getstate__(self) -> dict:
        # copies and pickles leave the inference copies behind: a oneDNN-packed
        # tensor has no storage to copy, and they are remade on first use anyway
        return {**super().__getstate__(), "_inference_weights": {}}

    def train(self, mode: bool = True) -> Linear:
        self._inference_weights.clear()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recording = torch.is_grad_enabled()
        if recording:  # a training step may follow and leave the copies stale
            self._inference_weights.clear()
        if (
            recording
            or torch.compiler.is_compiling()
            or x.device.type != "cpu"
            or x.dtype != self.weight.dtype
        ):
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.size(-1))
        packed = self.packed_weight() if rows.size(0) >= onednn_min_rows(self.weight) else None
        if packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(rows, packed, self.bias, "none", [], "")
        elif self.bias is None:
            out = rows @ self.transposed_weight()
        else:
            out = torch.addmm(self.bias, rows, self.transposed_weight())
        return out.view(*x.shape[:-1], out.size(-1))


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
