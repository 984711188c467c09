"""Batched beam search with GNMT length penalty and n-best lists.

All bookkeeping is on tensors of shape (sentences, beam, ...): there is no
Python loop over hypotheses, and a sentence whose search is over leaves the
batch, so the model only runs on sentences still searching. Each step takes
the top ``2 * beam`` continuations of every sentence; those ending in <eos>
compete for the ``beam`` finished slots (scored with the length penalty), the
best ``beam`` others stay alive.

A sentence stops when its worst finished hypothesis beats the best score any
live one could still reach: log-probabilities only fall as a hypothesis grows,
so a live score ``s`` can at best become ``s / lp(max_len)``. With this exact
stopping rule a beam wide enough to hold every prefix returns the same best
sequence as exhaustive search (see the tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.decode.common import (
    DEFAULT_LENGTHS,
    Found,
    Hypothesis,
    Lengths,
    Search,
    SearchOptions,
    Trace,
    forbid_tokens,
    force_eos,
    length_penalty,
)
from rosetta.decode.greedy import GreedySearch
from rosetta.model.interface import IncrementalDecoder, Seq2Seq

NEG_INF = float("-inf")


class BeamOptions(SearchOptions):
    """``kind: beam``: the ``beam`` best prefixes kept at every step, ranked with the
    GNMT length penalty; ``nbest`` <= ``beam`` of the finished returned."""

    kind: Literal["beam"] = "beam"
    beam: int = Field(
        5, ge=1, description="beam size; 1 = greedy search", json_schema_extra={"work": True}
    )
    nbest: int = Field(
        1, ge=1, description="hypotheses returned per input (<= beam)",
        json_schema_extra={"work": True},
    )  # fmt: skip
    length_penalty: float = Field(0.6, ge=0.0, description="GNMT length penalty alpha; 0 = none")
    eos_within_beam: bool = Field(
        False,
        description="a hypothesis ends only when <eos> is among the step's best `beam` "
        "candidates, as in fairseq, Marian and HuggingFace (default: among the best 2 x beam)",
    )

    @model_validator(mode="after")
    def _nbest_within_beam(self) -> BeamOptions:
        if self.nbest > self.beam:
            raise ValueError(
                f"nbest ({self.nbest}) cannot exceed the beam size ({self.beam}) unless sampling"
            )
        return self


@dataclass
class BeamTrace:
    """What a beam search considered, kept and dropped: one tree per source row, for
    people who want to see why the search chose what it chose (the service's search
    view; Seq2Seq-Vis, Strobelt et al. 2018).

    ``nodes[row]`` lists dicts ``{id, parent, step, token, log_prob, status}``: node 0
    is the root (<bos>); each step adds the ``2 * beam`` best continuations of the
    live hypotheses, each marked ``alive`` (kept in the beam), ``pruned`` (not kept),
    ``finished`` (ended in <eos> and is among the best ``beam`` finished; it also has
    ``score``, its length-normalised score) or ``finished_dropped`` (ended, then was
    pushed out by better finished ones). ``chosen[row]`` holds the node ids of the
    returned n-best, best first; parents lead from each back to the root.

    Recording costs a host sync per step: pass a trace only when it is wanted.
    """

    nodes: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    chosen: dict[int, list[int]] = field(default_factory=dict)
    _alive: dict[int, list[int | None]] = field(default_factory=dict)
    _finished: dict[int, list[int | None]] = field(default_factory=dict)

    def start(self, batch: int, beam: int) -> None:
        for row in range(batch):
            root = {"id": 0, "parent": None, "step": 0, "token": BOS_ID, "log_prob": 0.0}
            self.nodes[row] = [{**root, "status": "root"}]
            self._alive[row] = [0] + [None] * (beam - 1)
            self._finished[row] = [None] * beam

    def step(
        self,
        step: int,
        active: torch.Tensor,
        candidates: dict[str, torch.Tensor],
        pick: torch.Tensor,
        picked_scores: torch.Tensor,
        keep: torch.Tensor,
        kept_scores: torch.Tensor,
    ) -> None:
        """Records one step for the ``active`` rows. ``candidates`` holds (n, 2 * beam)
        ``origin``, ``token``, ``log_prob``, ``score`` (finished ones); ``pick`` the
        finished n-best drawn from [previous finished; candidates] and
        ``picked_scores`` their scores (-inf: an empty slot), ``keep`` the candidates
        kept alive and ``kept_scores`` theirs."""
        columns = {name: values.tolist() for name, values in candidates.items()}
        for i, row in enumerate(active.tolist()):
            nodes, alive = self.nodes[row], self._alive[row]
            made: list[int | None] = []
            for origin, token, log_prob, score in zip(
                *(columns[name][i] for name in ("origin", "token", "log_prob", "score"))
            ):
                if log_prob == NEG_INF or alive[origin] is None:
                    made.append(None)
                    continue
                node = {"id": len(nodes), "parent": alive[origin], "step": step + 1}
                node |= {"token": token, "log_prob": log_prob, "status": "pruned"}
                if token == EOS_ID:
                    node |= {"status": "finished_dropped", "score": score}
                nodes.append(node)
                made.append(node["id"])
            pool = self._finished[row] + made
            finished = [
                pool[j] if score != NEG_INF else None
                for j, score in zip(pick[i].tolist(), picked_scores[i].tolist())
            ]
            for node_id in set(self._finished[row]) - set(finished) - {None}:
                nodes[node_id]["status"] = "finished_dropped"
            for node_id in finished:
                if node_id is not None:
                    nodes[node_id]["status"] = "finished"
            self._finished[row] = finished
            self._alive[row] = [
                made[j] if score != NEG_INF else None
                for j, score in zip(keep[i].tolist(), kept_scores[i].tolist())
            ]
            for node_id in self._alive[row]:
                if node_id is not None:
                    nodes[node_id]["status"] = "alive"

    def finish(self, rows: torch.Tensor, nbest: int) -> None:
        for row in rows.tolist():
            self.chosen[row] = [n for n in self._finished[row][:nbest] if n is not None]

    def of_row(self, row: int) -> dict[str, Any]:
        """Row ``row``'s tree: ``{nodes, chosen}``."""
        return {"nodes": self.nodes[row], "chosen": self.chosen.get(row, [])}


@torch.inference_mode()
def beam_search(
    model: Seq2Seq,
    src: torch.Tensor,
    beam: int = BeamOptions().beam,
    alpha: float = BeamOptions().length_penalty,
    nbest: int = 1,
    lengths: Lengths = DEFAULT_LENGTHS,
    trace: BeamTrace | None = None,
    eos_within_beam: bool = False,
) -> list[list[Hypothesis]]:
    """Decodes a padded source batch (batch, src_len) into ``nbest`` hypotheses per row,
    best first; ``trace`` records the search tree of every row. ``eos_within_beam``:
    an <eos> ranked below the step's best ``beam`` candidates ends nothing (it is
    dropped, as fairseq, Marian and HuggingFace drop it)."""
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must be between 1 and the beam size ({beam}), got {nbest}")
    device = src.device
    batch = src.size(0)
    budget = lengths.per_source(src)  # (batch,)
    steps, first_budget = int(budget.max()), int(budget.min())
    state = model.init_state(model.encode(src))
    # The first step reads only <bos>, the same for a sentence's whole beam: it runs
    # once per sentence, and the sentence gets its beam hypotheses (sharing its
    # encoder side) afterwards.
    bos = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
    first_logits = model.decode_step(bos, state)
    state.expand(beam)
    tokens = bos.repeat_interleave(beam)  # (batch * beam,): what each hypothesis read last

    # Results of finished sentences, by original row.
    out_scores = torch.full((batch, beam), NEG_INF, device=device)
    out_log_probs = torch.full((batch, beam), NEG_INF, device=device)
    out_tokens = torch.full((batch, beam, steps), PAD_ID, dtype=torch.long, device=device)

    # Working set: the sentences still searching (`active` holds their original rows).
    active = torch.arange(batch, device=device)
    # Live hypotheses; only beam 0 starts alive so the first step has no duplicates.
    scores = torch.full((batch, beam), NEG_INF, device=device)
    scores[:, 0] = 0.0
    alive = torch.empty((batch, beam, 0), dtype=torch.long, device=device)
    # Finished hypotheses of the active sentences (tokens without <eos>), best first.
    fin_scores = torch.full((batch, beam), NEG_INF, device=device)
    fin_log_probs = torch.full((batch, beam), NEG_INF, device=device)
    fin_tokens = torch.full((batch, beam, steps), PAD_ID, dtype=torch.long, device=device)
    if trace is not None:
        trace.start(batch, beam)

    for step in range(steps):
        n = len(active)
        if step == 0:  # rows of beam 0, the only one alive, are what count
            logits = first_logits.float().repeat_interleave(beam, dim=0)
        else:
            logits = model.decode_step(tokens, state).float()  # (n * beam, vocab)
        normalizer = logits.logsumexp(dim=-1, keepdim=True)
        logits = forbid_tokens(logits, step, lengths.min_len)
        if step + 1 >= first_budget:  # some sentence may have reached its length budget
            row_budget = budget[active].repeat_interleave(beam)  # (n * beam,)
            logits = force_eos(logits, row_budget <= step + 1)
        # Every hypothesis's best 2 * beam continuations hold the sentence's best
        # 2 * beam: a continuation outranked within its own row is outranked overall.
        vocab = logits.size(-1)
        width = min(2 * beam, vocab)
        row_logits, row_tokens = logits.topk(width, dim=-1)  # (n * beam, width)
        candidates = (scores.view(-1, 1) + (row_logits - normalizer)).view(n, beam * width)
        top_scores, top_index = candidates.topk(min(2 * beam, beam * width), dim=1)
        origin = top_index // width  # (n, 2 * beam): the hypothesis each one extends
        token = row_tokens.view(n, beam * width).gather(1, top_index)
        ends = token.eq(EOS_ID)
        ending = ends
        if eos_within_beam:  # candidates are sorted, best first
            ending = ends & (torch.arange(ends.size(1), device=device) < beam)
        if trace is not None:
            considered = {"origin": origin, "token": token, "log_prob": top_scores}

        # Finished: merge this step's <eos> candidates into the n-best so far.
        penalty = length_penalty(torch.tensor(step + 1, device=device), alpha)
        new_fin = torch.where(ending, top_scores / penalty, NEG_INF)
        if trace is not None:
            considered["score"] = new_fin
        prefix = alive.gather(1, origin[..., None].expand(-1, -1, step))  # (n, 2b, step)
        prefix = torch.nn.functional.pad(prefix, (0, steps - step), value=PAD_ID)
        fin_scores, pick = torch.cat([fin_scores, new_fin], dim=1).topk(beam, dim=1)
        fin_log_probs = torch.cat([fin_log_probs, top_scores], 1).gather(1, pick)
        pool_tokens = torch.cat([fin_tokens, prefix], dim=1)
        fin_tokens = pool_tokens.gather(1, pick[..., None].expand(-1, -1, steps))

        # Alive: the best `beam` continuations that did not end.
        scores, keep = torch.where(ends, NEG_INF, top_scores).topk(beam, dim=1)
        origin, token = origin.gather(1, keep), token.gather(1, keep)  # (n, beam)
        alive = torch.cat(
            [alive.gather(1, origin[..., None].expand(-1, -1, step)), token[..., None]], dim=2
        )
        offsets = (torch.arange(n, device=device) * beam)[:, None]  # (n, 1)
        state.select((origin + offsets).view(-1))
        if trace is not None:
            trace.step(step, active, considered, pick, fin_scores, keep, scores)
        tokens = token.view(-1)

        best_reachable = scores.max(dim=1).values / length_penalty(budget[active], alpha)
        done = fin_scores[:, -1] >= best_reachable
        if step == steps - 1:
            done[:] = True
        if bool(done.any()):
            # store the finished sentences' n-best and drop them from the working set
            rows = active[done]
            if trace is not None:
                trace.finish(rows, nbest)
            out_scores[rows], out_log_probs[rows] = fin_scores[done], fin_log_probs[done]
            out_tokens[rows] = fin_tokens[done]
            if bool(done.all()):
                break
            keep = (~done).nonzero().squeeze(1)
            active = active[keep]
            scores, alive, tokens = scores[keep], alive[keep], tokens.view(n, beam)[keep].view(-1)
            fin_scores, fin_log_probs = fin_scores[keep], fin_log_probs[keep]
            fin_tokens = fin_tokens[keep]
            state.select_sources(keep)

    results = []
    for row in range(batch):
        hyps = []
        for rank in range(nbest):
            seq = out_tokens[row, rank]
            hyps.append(
                Hypothesis(
                    seq[seq.ne(PAD_ID)].tolist(),
                    float(out_scores[row, rank]),
                    float(out_log_probs[row, rank]),
                )
            )
        results.append(hyps)
    return results


class BeamSearch(Search):
    in_ctranslate2 = True
    Options = BeamOptions
    needs = IncrementalDecoder
    options: BeamOptions

    def run(
        self,
        model: Any,
        src: torch.Tensor,
        lengths: Lengths,
        *,
        scores: bool = True,
        trace: bool = False,
        generator: torch.Generator | None = None,
    ) -> list[Found]:
        opts = self.options
        if opts.beam == 1 and opts.nbest == 1:  # greedy search, without a tree (as cheap)
            greedy = GreedySearch(GreedySearch.Options())
            return greedy.run(model, src, lengths, scores=scores, trace=trace)
        tree = BeamTrace() if trace else None
        found = beam_search(
            model, src, opts.beam, opts.length_penalty, opts.nbest, lengths, tree,
            opts.eos_within_beam,
        )  # fmt: skip
        if tree is None:
            return [Found(hyps) for hyps in found]
        settings = {"size": opts.beam, "length_penalty": opts.length_penalty}
        return [
            Found(hyps, Trace.left_to_right(hyps[0].tokens, settings | tree.of_row(row)))
            for row, hyps in enumerate(found)
        ]

    def for_hypotheses(self, count: int) -> dict[str, Any]:
        return {"beam": max(self.options.beam, count), "nbest": count}

    def tree_width(self) -> int:
        return 2 * self.options.beam if self.options.beam > 1 else 0

    def ctranslate2(self, vocab_size: int) -> dict[str, Any]:
        opts = self.options
        return {
            "beam_size": opts.beam,
            "num_hypotheses": opts.nbest,
            "length_penalty": opts.length_penalty if opts.beam > 1 else 0.0,
        }
