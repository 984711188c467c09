"""Running the encoder's position-wise work on the real tokens of a padded batch.

Everything in an encoder layer except the attention scores works on each
position alone: the Q/K/V and output projections, the feed-forward network,
LayerNorm, the residual additions. A batch padded to its longest sentence
spends that work on padding too; for a batch in input order (the first 32
sentences of Multi30k's test set) more than half of the positions are padding.
``Packing`` gathers the real tokens into (tokens, d_model) rows for that work
and scatters them back to (batch, src_len, ...) for the attention product only
(the "remove padding" of FasterTransformer and TurboTransformers).
"""

from __future__ import annotations

import torch

MIN_PADDING = 0.1  # below this fraction of padded positions, packing is not worth it


class Packing:
    """Where the real tokens of a padded (batch, length) layout are."""

    def __init__(self, real: torch.Tensor) -> None:
        """real: (batch, length), True on real tokens."""
        self.batch, self.length = real.shape
        flat = real.reshape(-1)
        self.index = flat.nonzero().squeeze(1)  # flat positions of real tokens
        self.padding = flat.logical_not().nonzero().squeeze(1)  # and of padding

    @classmethod
    def worthwhile(cls, real: torch.Tensor) -> Packing | None:
        """A packing, if at least ``MIN_PADDING`` of the positions are padding."""
        padded = real.numel() - int(real.sum())
        return cls(real) if padded >= MIN_PADDING * real.numel() else None

    @property
    def tokens(self) -> int:
        return self.index.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, dim) -> (tokens, dim)."""
        return x.reshape(self.batch * self.length, x.size(-1)).index_select(0, self.index)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """(tokens, dim) -> (batch, length, dim), zeros at padded positions. Each
        position is written once (not zeroed first, then copied)."""
        padded = rows.new_empty(self.batch * self.length, rows.size(-1))
        padded.index_fill_(0, self.padding, 0.0).index_copy_(0, self.index, rows)
        return padded.view(self.batch, self.length, -1)
