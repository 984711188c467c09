"""The non-autoregressive Transformer (``model.arch: nat``): a conditional masked
language model over the Transformer's encoder (CMLM, Ghazvininejad et al. 2019).

The decoder fills in every target position at once. Its input is the target
with some tokens replaced by ``<mask>`` (all of them, for the first pass of
decoding), its self-attention sees every real position of the target (no causal
mask, never the padding), and its output at each position is a distribution
over that position's token. How long the target is comes first, from a
classifier on the mean-pooled encoder output: the offset of the target length
from the source length, within ``±max_length_offset``.

Training (``rosetta.train.objectives.MaskedLM``) minimises the token loss on
the positions to predict plus ``length_loss_weight`` times the length
classifier's loss; the model gives it the two ways of choosing those positions:

- CMLM (``mask_uniformly``): a number of target tokens drawn uniformly from
  1..length is masked and predicted from the rest;
- glancing (``glance``; GLAT, Qian et al. 2021; ``glancing > 0``): a first pass
  predicts every token from all masks (no gradient); a share ``glancing`` of its
  wrong tokens' count is revealed as gold tokens at random positions, and the
  second pass learns the rest. The better the model, the less it is shown, which
  is what makes single-pass decoding good.

Without a classifier (``model.length``) the decoder has ceil(upsample x source
length) positions and reads the encoder output up-sampled to as many (each
source position ``upsample`` times in turn: the uniform copy of Gu et al. 2018
and GLAT, never a row of identical ``<mask>``s, from which a model trained with
glancing learns to emit ``<pad>`` everywhere). ``eos`` teaches it the target,
``<eos>``, then ``<pad>``; ``ctc`` trains it with CTC (``rosetta.model.ctc``);
``crf`` has ``eos``'s targets and decodes them jointly with a linear-chain CRF
(``rosetta.model.crf``), its transitions learned with the decoder. Each is one
pass (``emit``), trained by ``rosetta.train.objectives.PositionsNAT``.

Validation scores the single-pass case, every token from all masks at the gold
length, which is deterministic, and counts the sentences whose length the
classifier gets right. Search is ``rosetta.decode.mask_predict``.
"""

from __future__ import annotations

import torch

from rosetta.config import NATConfig
from rosetta.data.tokenizer import MASK_ID, PAD_ID
from rosetta.model.attention import Memory
from rosetta.model.crf import LinearChainCRF
from rosetta.model.ctc import decoder_lengths, upsample_index
from rosetta.model.interface import EncoderOutput
from rosetta.model.linear import Linear
from rosetta.model.packing import SourcePadding
from rosetta.model.transformer import TransformerBase


class NATransformer(TransformerBase):
    """Encoder as the Transformer's; a decoder without the causal mask reading
    ``<mask>`` tokens; a target-length classifier. An ``IterativeRefiner``
    (``rosetta.model.interface``): it has no step-by-step decoding."""

    def __init__(self, cfg: NATConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
        super().__init__(cfg, src_vocab_size, tgt_vocab_size)
        self.length_mode = cfg.length
        self.upsample = cfg.upsample
        self.max_positions = cfg.max_positions
        self.max_offset = cfg.max_length_offset
        if cfg.length == "classifier":
            self.length_head = Linear(cfg.d_model, 2 * cfg.max_length_offset + 1)
        if cfg.length == "crf":
            self.crf = LinearChainCRF(tgt_vocab_size, cfg.crf_rank)
            self.crf_beam = cfg.crf_beam

    # ---- lengths ---------------------------------------------------------------------
    def length_logits(self, encoder_output: EncoderOutput) -> torch.Tensor:
        """(batch, 2 * max_length_offset + 1): scores of the target length minus the
        source length, from -max_length_offset (class 0) up, over the mean of the
        encoder output at the real source positions."""
        real = (~encoder_output.pad_mask).unsqueeze(-1).to(encoder_output.memory.dtype)
        pooled = (encoder_output.memory * real).sum(1) / real.sum(1).clamp(min=1.0)
        return self.length_head(pooled)

    def length_classes(self, tgt_lengths: torch.Tensor, src_lengths: torch.Tensor) -> torch.Tensor:
        """The class of each target length (offsets beyond the range are clipped)."""
        offset = (tgt_lengths - src_lengths).clamp(-self.max_offset, self.max_offset)
        return offset + self.max_offset

    def predict_lengths(
        self,
        encoder_output: EncoderOutput,
        src_lengths: torch.Tensor,
        candidates: int,
        max_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``candidates`` most probable target lengths of each source among those
        from 1 to its ``max_lengths``, best first: (batch, candidates) lengths, and
        whether each is one (False where a source has fewer possible lengths; such
        a length is a clipped stand-in, ranked last)."""
        offsets = torch.arange(-self.max_offset, self.max_offset + 1, device=src_lengths.device)
        lengths = src_lengths[:, None] + offsets  # (batch, classes)
        possible = (lengths >= 1) & (lengths <= max_lengths[:, None])
        scores = self.length_logits(encoder_output).float().masked_fill(~possible, float("-inf"))
        top = scores.topk(min(candidates, scores.size(-1)), dim=-1)
        chosen = lengths.gather(1, top.indices)
        chosen = torch.minimum(chosen.clamp(min=1), max_lengths[:, None].clamp(min=1))
        return chosen, top.values.isfinite()

    # ---- lengths without a classifier: ``eos``, ``ctc`` and ``crf`` -------------------
    def positions(self, src_lengths: torch.Tensor) -> torch.Tensor:
        """Decoder positions of each source (``eos``, ``ctc``, ``crf``): ceil(upsample x
        its length), within the model's positions."""
        return decoder_lengths(src_lengths, self.upsample, self.max_positions)

    def emit(
        self,
        encoded: EncoderOutput,
        memories: list[Memory],
        lengths: torch.Tensor,
        shown: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, positions, vocab) of one pass over each row's ``lengths``
        positions. The decoder reads the encoder output up-sampled, each source position
        ``upsample`` times in turn; ``shown`` (batch, positions), glancing's gold
        tokens, replaces what a position reads where it is not ``<pad>``."""
        return self.output(self._emit_states(encoded, memories, lengths, shown)[0])

    def _emit_states(
        self,
        encoded: EncoderOutput,
        memories: list[Memory],
        lengths: torch.Tensor,
        shown: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor | None]]]:
        """``emit``'s decoder states (batch, positions, d_model), and its attention
        weights when asked."""
        x, reads = self._emit_inputs(encoded, lengths, shown)
        return self.decoder(x, memories, need_weights, self.target_padding(reads))

    def _emit_inputs(
        self, encoded: EncoderOutput, lengths: torch.Tensor, shown: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``emit``'s decoder reads (batch, positions, d_model), and which of its
        positions are real, as tokens (``<mask>`` at the real positions, ``<pad>`` after)."""
        width = int(lengths.max())
        real = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
        reads = torch.full(real.shape, MASK_ID, device=lengths.device).masked_fill(~real, PAD_ID)
        src_lengths = (~encoded.pad_mask).sum(1)
        index = upsample_index(src_lengths, lengths)[..., None]
        memory = encoded.memory.gather(1, index.expand(-1, -1, encoded.memory.size(-1)))
        x = self.tgt_embed.dropout(memory + self.tgt_embed.positions(width))
        if shown is not None:
            x = torch.where(shown.ne(PAD_ID)[..., None], self.tgt_embed(shown), x)
        return x, reads

    def hidden_states(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """As the Transformer's; without a classifier the decoder reads the up-sampled
        source at as many positions as ``tgt_in`` has (what a pass emitted)."""
        if self.length_mode == "classifier":
            return super().hidden_states(src, tgt_in)
        encoded = self.encode(src)
        lengths = tgt_in.ne(PAD_ID).sum(1)
        return self._emit_states(encoded, self.memories(encoded), lengths)[0]

    @torch.no_grad()
    def attention_maps(
        self, src: torch.Tensor, tgt_in: torch.Tensor
    ) -> dict[str, list[torch.Tensor]]:
        """As the Transformer's; without a classifier, over the positions
        ``hidden_states`` reads."""
        if self.length_mode == "classifier":
            return super().attention_maps(src, tgt_in)
        encoded = self.encode(src, need_weights=True)
        lengths = tgt_in.ne(PAD_ID).sum(1)
        _, weights = self._emit_states(encoded, self.memories(encoded), lengths, None, True)
        return self.maps(encoded, weights)

    # ---- the decoder -----------------------------------------------------------------
    def target_padding(self, tgt_in: torch.Tensor) -> SourcePadding:
        return SourcePadding(tgt_in.eq(PAD_ID), pack=False)

    def fill_in(
        self, memories: list[Memory], tokens: torch.Tensor, where: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One pass of the decoder over ``tokens`` (target tokens, ``<mask>`` where
        unknown, ``<pad>`` past the length; no ``<bos>``): logits (batch, tgt_len, vocab) for
        every position, or with ``where`` (a boolean (batch, tgt_len)) logits (n, vocab)
        for its n true positions only, in row-major order (``tokens[where]``'s). The
        decoder always reads every position; the output projection, the largest
        product of a pass with a vocabulary of thousands, is paid only where asked:
        the real positions, or in mask-predict's later passes the re-masked ones."""
        states = self.decoder_states(memories, tokens)
        if where is None:
            return self.output(states)
        if bool(where.all()):  # every position (a single length, one pass): no gather
            return self.output(states).flatten(0, 1)
        return self.output(states[where])

    # ---- training: which target positions a pass learns -------------------------------
    # (``target``: (batch, tgt_len) gold tokens without <eos>, <pad> after; ``real``:
    # its non-padding positions. Each returns the decoder input, ``<mask>`` where a
    # token is to be predicted, and those positions, both (batch, tgt_len).)
    @staticmethod
    def _random_order(real: torch.Tensor) -> torch.Tensor:
        """Each real position's rank in a random order of its row's real positions
        (padding ranks last)."""
        noise = torch.rand(real.shape, device=real.device).masked_fill(~real, 2.0)
        return noise.argsort(dim=1).argsort(dim=1)

    def mask_uniformly(
        self, target: torch.Tensor, real: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CMLM: ``n ~ U{1..length}`` random real positions of each row masked."""
        lengths = real.sum(1)
        count = (torch.rand(lengths.shape, device=real.device) * lengths).long() + 1
        masked = self._random_order(real) < count[:, None]
        return target.masked_fill(masked, MASK_ID), masked

    def glance(
        self, memories: list[Memory], target: torch.Tensor, real: torch.Tensor, share: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GLAT: reveal ``share`` x (wrong tokens of a first pass from all masks) gold
        tokens at random positions; the rest stay masked."""
        all_masked = target.masked_fill(real, MASK_ID)
        with torch.no_grad():
            guess = self.fill_in(memories, all_masked, real).argmax(-1)
            wrong = torch.zeros_like(target).masked_scatter(real, guess.ne(target[real]).long())
            wrong = wrong.sum(1)
        reveal = (wrong.float() * share).long()
        shown = self._random_order(real) < reveal[:, None]
        return torch.where(shown, target, all_masked), real & ~shown
