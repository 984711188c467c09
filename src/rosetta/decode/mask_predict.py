"""Mask-predict: the search of a non-autoregressive model (Ghazvininejad et al. 2019).

1. The length classifier proposes the ``length_beam`` most probable target
   lengths of each source, distinct, from 1 to the output budget (``Lengths``,
   less the <eos> it counts); every
   (source, length) pair becomes one row of a batch, so all candidates of all
   sources are decoded together.
2. The first pass fills in every position from all ``<mask>`` inputs.
3. Each of the ``iterations - 1`` further passes re-masks the least confident
   tokens of each row, ``length * (iterations - t) / iterations`` of them at pass
   ``t`` (a linear schedule), and fills those in again; a token keeps the
   probability it had when it was last predicted.
4. Each source keeps its candidates ranked by their average token
   log-probability (the best first), which is also the ``score``.

A model without a length classifier (``model.length``: ``eos``, ``ctc`` or
``crf``) has no lengths to propose and nothing to re-mask: ``emit_once`` fills
its ceil(upsample x source length) positions in one pass and takes the most
probable token at each (``crf``: the CRF's Viterbi path over each position's
``crf_beam`` best tokens, ``rosetta.model.crf``); ``eos`` and ``crf`` cut the
output at the first <eos> (or <pad>), ``ctc`` merges repeats and drops blanks
(``rosetta.model.ctc``). The ``score`` is the average per-position
log-probability of the tokens kept (``ctc``: of the path, over the output's
length). ``iterations`` and ``length_beam`` do not apply; it gives one
hypothesis per source.

``iterations = 1`` is single-pass decoding. The decoder runs exactly
``iterations`` times per batch, on ``sources x length_beam`` rows; the output
projection (a product with the whole vocabulary) runs only on the positions a
pass fills in, never on padding, so a batch of mixed lengths and the later,
sparser passes cost what they decode.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from rosetta.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID
from rosetta.decode.common import (
    DEFAULT_LENGTHS,
    Found,
    Hypothesis,
    Lengths,
    Search,
    SearchOptions,
    Trace,
)
from rosetta.model.ctc import BLANK_ID, collapse
from rosetta.model.interface import IterativeRefiner

NEVER = (PAD_ID, BOS_ID, EOS_ID, MASK_ID)  # ids a filled-in position never takes


class MaskPredictOptions(SearchOptions):
    """``kind: mask-predict``: the search of a model that fills in every position at
    once; ``nbest`` <= ``length_beam`` (one hypothesis per target length tried)."""

    kind: Literal["mask-predict"] = "mask-predict"
    iterations: int = Field(
        10, ge=1, description="refinement passes; 1 = single pass",
        json_schema_extra={"work": True},
    )  # fmt: skip
    length_beam: int = Field(
        5, ge=1, description="target lengths tried per input", json_schema_extra={"work": True}
    )
    nbest: int = Field(
        1, ge=1, description="hypotheses returned per input (<= length_beam)",
        json_schema_extra={"work": True},
    )  # fmt: skip

    @model_validator(mode="after")
    def _nbest_within_length_beam(self) -> MaskPredictOptions:
        if self.nbest > self.length_beam:
            raise ValueError(
                f"nbest ({self.nbest}) cannot exceed length_beam ({self.length_beam}): "
                "mask-predict returns one hypothesis per target length tried"
            )
        return self


@torch.inference_mode()
def mask_predict(
    model: IterativeRefiner,
    src: torch.Tensor,
    iterations: int = MaskPredictOptions().iterations,
    length_beam: int = MaskPredictOptions().length_beam,
    nbest: int = 1,
    lengths: Lengths = DEFAULT_LENGTHS,
    final_inputs: list[tuple[list[int], list[int]]] | None = None,
) -> list[list[Hypothesis]]:
    """Decodes a padded source batch (batch, src_len) into at most ``nbest``
    hypotheses per row (one per possible length candidate), best first.
    ``final_inputs``, a list, receives for each row's best hypothesis what the
    decoder read in the last pass (its tokens, ``<mask>`` where it filled in) and
    what it produced: what attention is shown for."""
    if iterations < 1 or length_beam < 1:
        raise ValueError("iterations and length_beam must be at least 1")
    mode = getattr(model, "length_mode", "classifier")
    if mode != "classifier":
        if nbest > 1:
            raise ValueError(
                f"a model with length {mode} gives one hypothesis per source (nbest 1)"
            )
        return emit_once(model, src, lengths, final_inputs)
    device, batch = src.device, src.size(0)
    src_lengths = src.ne(PAD_ID).sum(1)
    encoded = model.encode(src)
    budget = (lengths.per_source(src) - 1).clamp(min=1)  # less the <eos> NAT does not emit
    candidates, possible = model.predict_lengths(encoded, src_lengths, length_beam, budget)
    beam = candidates.size(1)
    rows = torch.arange(batch, device=device).repeat_interleave(beam)
    memories = [memory.select_rows(rows) for memory in model.memories(encoded)]
    target_lengths = candidates.reshape(-1)  # (batch * beam,)
    width = int(target_lengths.max())
    real = torch.arange(width, device=device)[None, :] < target_lengths[:, None]

    tokens = torch.full(real.shape, MASK_ID, dtype=torch.long, device=device)
    tokens.masked_fill_(~real, PAD_ID)
    probs = torch.zeros(real.shape, device=device)  # log-probability of each token
    masked = real.clone()
    never = torch.tensor(NEVER, device=device)
    for step in range(iterations):
        last_input = tokens
        # the output projection only at the positions filled in: (masked count, vocab)
        log_probs = model.fill_in(memories, tokens, masked).float().log_softmax(-1)
        log_probs.index_fill_(-1, never, float("-inf"))
        best, guess = log_probs.max(-1)
        tokens = tokens.masked_scatter(masked, guess)
        probs = probs.masked_scatter(masked, best)
        if step == iterations - 1:
            break
        remask = (target_lengths.float() * (iterations - 1 - step) / iterations).long()
        order = probs.masked_fill(~real, float("inf")).argsort(dim=1).argsort(dim=1)
        masked = order < remask[:, None]  # the least confident real positions
        tokens = tokens.masked_fill(masked, MASK_ID)

    total = (probs * real).sum(1)
    average = total / target_lengths
    ranking = average.masked_fill(~possible.view(-1), float("-inf")).view(batch, beam)
    ranked = ranking.argsort(dim=1, descending=True)
    results = []
    for row in range(batch):
        hyps = []
        for rank in ranked[row, :nbest].tolist():
            if hyps and not possible[row, rank]:  # a stand-in: only when nothing else
                break
            k = row * beam + rank
            length = int(target_lengths[k])
            hyps.append(Hypothesis(tokens[k, :length].tolist(), float(average[k]), float(total[k])))
            if final_inputs is not None and len(hyps) == 1:
                final_inputs.append((last_input[k, :length].tolist(), hyps[0].tokens))
        results.append(hyps)
    return results


def emit_once(
    model: IterativeRefiner,
    src: torch.Tensor,
    lengths: Lengths = DEFAULT_LENGTHS,
    final_inputs: list[tuple[list[int], list[int]]] | None = None,
) -> list[list[Hypothesis]]:
    """The single pass of a model with length ``eos``, ``ctc`` or ``crf`` (module
    doc); ``final_inputs`` receives, per row, what its decoder read (``<mask>`` at
    each of its positions) and what each position emitted: what attention is shown
    for."""
    ctc = model.length_mode == "ctc"
    encoded = model.encode(src)
    positions = model.positions(src.ne(PAD_ID).sum(1))
    logits = model.emit(encoded, model.memories(encoded), positions).float()
    banned = (PAD_ID, BOS_ID, EOS_ID) if ctc else (BOS_ID, MASK_ID)  # ctc: <mask> is blank
    logits.index_fill_(-1, torch.tensor(banned, device=src.device), float("-inf"))
    log_probs = logits.log_softmax(-1)
    if model.length_mode == "crf":
        real = torch.arange(logits.size(1), device=src.device)[None, :] < positions[:, None]
        guess = model.crf.viterbi(logits, real, model.crf_beam)[0]
        best = log_probs.gather(2, guess[..., None]).squeeze(-1)
    else:
        best, guess = log_probs.max(-1)
    budget = (lengths.per_source(src) - 1).clamp(min=1).tolist()
    results = []
    for row, (count, limit) in enumerate(zip(positions.tolist(), budget)):
        emitted = guess[row, :count].tolist()
        if ctc:
            tokens, used = collapse(emitted, BLANK_ID)[:limit], count
        else:
            ends = [i for i, t in enumerate(emitted) if t in (EOS_ID, PAD_ID)]
            cut = ends[0] if ends else count
            tokens, used = emitted[:cut][:limit], min(cut + 1, count)
        total = float(best[row, :used].sum())
        results.append([Hypothesis(tokens, total / max(len(tokens), 1), total)])
        if final_inputs is not None:
            final_inputs.append(([MASK_ID] * count, emitted))
    return results


class MaskPredictSearch(Search):
    Options = MaskPredictOptions
    needs = IterativeRefiner
    options: MaskPredictOptions

    def run(
        self,
        model: Any,
        src: torch.Tensor,
        lengths: Lengths,
        *,
        scores: bool = True,
        trace: bool = False,
    ) -> list[Found]:
        opts = self.options
        inputs: list[tuple[list[int], list[int]]] | None = [] if trace else None
        found = mask_predict(
            model, src, opts.iterations, opts.length_beam, opts.nbest, lengths, inputs
        )
        if inputs is None:
            return [Found(hyps) for hyps in found]
        # the decoder read its last pass's input and produced the output, position by position
        return [Found(hyps, Trace(*traced)) for hyps, traced in zip(found, inputs)]

    def for_hypotheses(self, count: int) -> dict[str, Any]:
        return {"length_beam": max(self.options.length_beam, count), "nbest": count}
