"""Where the real tokens of a padded source batch are.

``SourcePadding`` is the one object the encoder stack and the cross-attention
receive about padding: the attention mask, and, when enough of the batch is
padding, a packing of the real tokens. Everything in an encoder layer except
the attention product works on each position alone (the Q/K/V and output
projections, the feed-forward network, LayerNorm, the residuals); a batch
padded to its longest sentence spends that work on padding too (more than
half of the positions of a batch of Multi30k's test set in input order). With
a packing, that work runs on (tokens, d_model) rows of the real tokens and only
the attention product sees the padded layout (the "remove padding" of
FasterTransformer and TurboTransformers).
"""

from __future__ import annotations

import torch

MIN_PADDING = 0.1  # below this fraction of padded positions, packing is not worth it


class SourcePadding:
    """The padding of a (batch, length) source batch; ``pad_mask`` is True on padding.
    ``pack=False``: the mask only, for a stack that keeps the padded layout."""

    def __init__(self, pad_mask: torch.Tensor, pack: bool = True) -> None:
        self.pad_mask = pad_mask
        self.batch, self.length = pad_mask.shape
        flat = pad_mask.reshape(-1)
        padded = int(flat.sum())  # one host sync per batch
        # (batch, 1, 1, src_len), True where attention is allowed; None without padding,
        # which lets SDPA run its faster unmasked kernels
        self.mask = ~pad_mask[:, None, None, :] if padded else None
        self.packed = pack and padded >= MIN_PADDING * flat.numel()
        if self.packed:
            self.index = flat.logical_not().nonzero().squeeze(1)  # flat positions of real tokens
            self.padding = flat.nonzero().squeeze(1)  # and of padding

    @property
    def tokens(self) -> int:
        return self.index.numel() if self.packed else self.batch * self.length

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask as 0 / -inf to add to the scores, (batch, 1, 1, src_len): the form
        SDPA converts a boolean mask to at every call, made once for a whole search."""
        if self.mask is None:
            return None
        additive = torch.zeros(self.pad_mask.shape, dtype=dtype, device=self.pad_mask.device)
        return additive.masked_fill_(self.pad_mask, float("-inf"))[:, None, None, :]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, dim) -> (tokens, dim); unchanged when not packed."""
        if not self.packed:
            return x
        return x.reshape(self.batch * self.length, x.size(-1)).index_select(0, self.index)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """(tokens, dim) -> (batch, length, dim), zeros at padded positions (each
        position written once); unchanged when not packed."""
        if not self.packed:
            return rows
        padded = rows.new_empty(self.batch * self.length, rows.size(-1))
        padded.index_fill_(0, self.padding, 0.0).index_copy_(0, self.index, rows)
        return padded.view(self.batch, self.length, -1)
