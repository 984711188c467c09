"""Connectionist temporal classification for the non-autoregressive decoder
(``model.length: ctc``; Libovický & Helcl 2018, Gu & Kong 2021).

The decoder has more positions than the target has tokens (the source length
times ``model.upsample``); each position emits a token or the *blank*, and the
output is what remains after merging repeated tokens and dropping blanks, so the
length falls out of the decoding and no length has to be predicted. The loss,
the sum over every alignment of the target to the positions, is PyTorch's
``ctc_loss``; what is written here is what PyTorch does not have:

- ``upsample_index``: which source position each decoder position reads;
- ``collapse``: the output of a row of emitted tokens;
- ``best_alignment``: the single most probable alignment of the target to the
  positions (Viterbi over the CTC lattice), which glancing needs to know which
  target token sits where (torchaudio's ``forced_align``, the well-kept
  implementation, has no release for this PyTorch).

The blank is ``<mask>``'s id: the CTC decoder reads no ``<mask>`` tokens.
"""

from __future__ import annotations

import torch

from rosetta.data.tokenizer import MASK_ID

BLANK_ID = MASK_ID


def decoder_lengths(src_lengths: torch.Tensor, upsample: float, cap: int) -> torch.Tensor:
    """The decoder positions of each source: ceil(upsample x its length), at most
    ``cap`` (the model's positions) and at least 1."""
    lengths = torch.ceil(src_lengths.double() * upsample).long()
    return lengths.clamp(min=1, max=cap)


def upsample_index(src_lengths: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(batch, max length) source position each decoder position reads: position p of
    a row of T positions over S source positions reads floor(p * S / T) (each source
    position read upsample times in a row); past T, 0."""
    width = int(lengths.max())
    positions = torch.arange(width, device=lengths.device)[None, :]
    index = (positions * src_lengths[:, None]).div(lengths[:, None], rounding_mode="floor")
    return index.masked_fill(positions >= lengths[:, None], 0)


def collapse(tokens: list[int], blank: int = BLANK_ID) -> list[int]:
    """CTC's output of a row of emitted tokens: repeats merged, then blanks dropped
    (``a a _ a b b`` -> ``a a b``)."""
    out, previous = [], None
    for token in tokens:
        if token != previous and token != blank:
            out.append(token)
        previous = token
    return out


def best_alignment(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = BLANK_ID,
) -> torch.Tensor:
    """The most probable CTC alignment of each row's target to its positions (Viterbi
    over the CTC lattice, every row at once).

    log_probs (batch, positions, vocab); targets (batch, n) padded; ``lengths`` and
    ``target_lengths`` (batch,). Returns (batch, positions): the token each position
    emits on the best alignment (``collapse`` of a row's first ``lengths`` is its
    target), ``blank`` past a row's length. A row needs lengths >= its target length
    plus its adjacent repeats (a blank must separate them)."""
    batch, positions, _ = log_probs.shape
    n = targets.size(1)
    device = log_probs.device
    width = 2 * n + 1
    states = torch.full((batch, width), blank, dtype=torch.long, device=device)
    states[:, 1::2] = targets  # _ y1 _ y2 _ ... yn _
    emit = log_probs.float().gather(2, states[:, None, :].expand(-1, positions, -1))
    # a state is entered from itself, the one before, or two before when that skips
    # the blank between two different tokens
    skip = torch.zeros(batch, width, dtype=torch.bool, device=device)
    if n > 1:
        skip[:, 3::2] = targets[:, 1:] != targets[:, :-1]
    in_target = torch.arange(width, device=device)[None, :] <= 2 * target_lengths[:, None]
    minus = float("-inf")
    score = torch.full((batch, width), minus, device=device)
    score[:, 0] = emit[:, 0, 0]
    if n:
        score[:, 1] = torch.where(target_lengths > 0, emit[:, 0, 1], minus)
    score = score.masked_fill(~in_target, minus)
    own = torch.arange(width, device=device).expand(batch, -1)
    back = own[:, None, :].repeat(1, positions, 1)  # (batch, positions, states): from
    for t in range(1, positions):
        step = torch.nn.functional.pad(score[:, :-1], (1, 0), value=minus)
        jump = torch.nn.functional.pad(score[:, :-2], (2, 0), value=minus).masked_fill(~skip, minus)
        best, choice = torch.stack([score, step, jump]).max(0)
        running = (t < lengths)[:, None]
        score = torch.where(running, (best + emit[:, t]).masked_fill(~in_target, minus), score)
        back[:, t] = torch.where(running, own - choice, own)
    last = 2 * target_lengths
    before = (last - 1).clamp(min=0)
    end_blank, end_token = score.gather(1, last[:, None]), score.gather(1, before[:, None])
    state = torch.where(
        (target_lengths > 0)[:, None] & (end_token > end_blank), before[:, None], last[:, None]
    )
    path = torch.full((batch, positions), blank, dtype=torch.long, device=device)
    for t in range(positions - 1, -1, -1):
        running = (t < lengths)[:, None]
        path[:, t : t + 1] = torch.where(running, states.gather(1, state), blank)
        state = torch.where(running, back[:, t].gather(1, state), state)
    return path
