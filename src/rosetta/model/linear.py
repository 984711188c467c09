"""A linear layer whose inference path suits CPU GEMM kernels.

``nn.Linear`` computes x Wᵀ with W stored (out, in), and ATen hands MKL the
transposed operand on every call. Decoding multiplies few rows at a time
(a batch of hypotheses, or a single one), where that is slow. Measured on this
project's 2-core machine (``benchmarks/speed.py`` has the end-to-end effect):

* one row (batch-1 greedy search) by the 256 x 8000 output projection: 4
  GFLOP/s with ``F.linear``, 11 against a contiguous copy of Wᵀ;
* 32 rows: 28 GFLOP/s with ``F.linear``, 34 against Wᵀ, 60 through oneDNN
  with W reordered once into its blocked layout (160 rows: 46 / 54 / 68);
* the 256 x 8000 output projection by 2 to 7 rows (beam search at batch 1,
  the last sentences of a greedy batch): 2.2-2.6x faster through oneDNN than
  against Wᵀ (5 rows: 0.86 against 2.2 ms);
* oneDNN costs ~35 us per call before any arithmetic, so small weights never
  catch up: on a later session's machine (AMD EPYC, Zen 1 cores, a 2048^2
  GEMM at ~66 GFLOP/s), 256 x 256 by 8,
  32 and 160 rows took 73 / 121 / 361 us through oneDNN against 38 / 85 / 339
  against Wᵀ; 256 x 768 and 512 x 512 are faster through oneDNN from about 4
  rows, and 512 x 1536, 512 x 2048 and larger from 2 (5 rows of 512 x 2048:
  284 against 764 us);
* one row is a GEMV that reads every weight once, from memory: MKL reads at
  10-15 GB/s with 1 thread or 2, while a 2-thread ``sum`` reads 21 GB/s. Split
  into two half-width GEMVs in one ``bmm``, both cores read: batch-1 greedy
  search went from 237-246 to 263-271 tokens/s (``small``) and from 71-74 to
  81-82 (``base``);
* at one row the Python around the product shows: the ``small`` decoder's 19
  GEMVs of a step took 1.65 ms as bare ``baddbmm`` calls, 1.94 ms behind the
  general dispatch and 1.87 ms with the one-row product as a closure made once
  (medians of 40).

So when no gradient is being recorded, ``Linear`` multiplies (``InferenceWeights``)
one row as two halves of Wᵀ when there are threads to share them; from
``onednn_min_rows`` rows (2 for weights of 2^19 elements or more, 4 from 2^17,
never below) through oneDNN with a packed copy of W; otherwise against a
contiguous copy of Wᵀ.
Training, anything that needs gradients, other devices and ``torch.compile``
take the plain ``F.linear`` path; the parameters and the state dict are those
of ``nn.Linear``.

The copies are made on first use and dropped whenever the weight may have
changed: when the weight's storage or version counter moves (``load_state_dict``,
in-place updates, a move to another device), when the module is switched to
training mode, and at every forward pass that records gradients. The last two
matter: PyTorch's fused Adam updates parameters without bumping their version
counter, so validation inside a training loop would otherwise decode with the
weights of its first validation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (weight elements, rows from which oneDNN beats MKL against Wᵀ), largest first;
# smaller weights never go through oneDNN
ONEDNN_TIERS = ((1 << 19, 2), (1 << 17, 4))
_onednn = {"available": torch.backends.mkldnn.is_available()}


def onednn_min_rows(weight: torch.Tensor) -> int | None:
    """From how many rows a product with ``weight`` is faster through oneDNN (None:
    never)."""
    for elements, rows in ONEDNN_TIERS:
        if weight.numel() >= elements:
            return rows
    return None


def _weight_key(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), weight._version, weight.device, weight.dtype, weight.shape)


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    """W in oneDNN's blocked layout, or None where oneDNN cannot take it."""
    if not _onednn["available"] or weight.dtype != torch.float32:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 64)
    except (AttributeError, RuntimeError):  # an op this PyTorch build lacks
        _onednn["available"] = False
        return None


class InferenceWeights:
    """A weight's copies laid out for CPU inference, each made on first use, and the
    product ``(rows, in) -> (rows, out)`` through the fastest kernel for the rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.min_onednn_rows = onednn_min_rows(weight)
        self.splittable = weight.size(0) % 2 == 0  # into two halves of the outputs
        self._copies: dict[str, torch.Tensor | None] = {}
        self._one_row: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _copy(self, kind: str, make) -> torch.Tensor | None:
        if kind not in self._copies:
            with torch.no_grad():
                self._copies[kind] = make(self.weight.detach())
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

    def packed(self) -> torch.Tensor | None:
        return self._copy("packed", _pack)

    def one_row(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The product of one row (1, in) as two half-width GEMVs in one ``bmm``."""
        if self._one_row is None:
            halves, inputs = self.halves(), self.weight.size(1)
            if self.bias is None:

                def product(row: torch.Tensor) -> torch.Tensor:
                    return torch.bmm(row.expand(2, 1, inputs), halves).view(1, -1)
            else:
                bias = self.bias.detach().view(2, 1, -1)

                def product(row: torch.Tensor) -> torch.Tensor:
                    return torch.baddbmm(bias, row.expand(2, 1, inputs), halves).view(1, -1)

            self._one_row = product
        return self._one_row

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        count = rows.size(0)
        if count == 1 and self.splittable and torch.get_num_threads() > 1:
            return self.one_row()(rows)
        if self.min_onednn_rows is not None and count >= self.min_onednn_rows:
            packed = self.packed()
            if packed is not None:
                return torch.ops.mkldnn._linear_pointwise(rows, packed, self.bias, "none", [], "")
        if self.bias is None:
            return rows @ self.transposed()
        return torch.addmm(self.bias, rows, self.transposed())


class Linear(nn.Linear):
    """``nn.Linear`` with inference copies of its weight laid out for CPU kernels."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._inference: tuple[tuple, InferenceWeights] | None = None

    def inference_weights(self) -> InferenceWeights:
        """The current weight's inference copies (new ones if the weight changed)."""
        key = (_weight_key(self.weight), _weight_key(self.bias) if self.bias is not None else None)
        if self._inference is None or self._inference[0] != key:
            self._inference = (key, InferenceWeights(self.weight, self.bias))
        return self._inference[1]

    def __getstate__(self) -> dict:
        # copies and pickles leave the inference copies behind: a oneDNN-packed
        # tensor has no storage to copy, and they are remade on first use anyway
        return {**super().__getstate__(), "_inference": None}

    def train(self, mode: bool = True) -> Linear:
        self._inference = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recording = torch.is_grad_enabled()
        if recording:  # a training step may follow and leave the copies stale
            self._inference = None
        if (
            recording
            or torch.compiler.is_compiling()
            or x.device.type != "cpu"
            or x.dtype != self.weight.dtype
        ):
            return F.linear(x, self.weight, self.bias)
        out = self.inference_weights()(x.reshape(-1, x.size(-1)))
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
