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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.decode.common import (
    DEFAULT_LENGTHS,
    Found,
    Hypothesis,
    Lengths,
    SearchOptions,
    Trace,
    force_eos,
    length_penalty,
)
from rosetta.decode.constraints import Constraint, ConstraintTables
from rosetta.decode.engine import Engine, LeftToRightSearch, Rows, run_all
from rosetta.decode.greedy import TokenRows, forbid_early_eos
from rosetta.model.interface import Seq2Seq

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
    ordered_constraints: bool = Field(
        False,
        description="lexical constraints must appear in the order given "
        "(default: anywhere, in any order)",
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

    def start(self, rows: list[int], beam: int) -> None:
        """Roots for the sentences numbered ``rows``."""
        for row in rows:
            root = {"id": 0, "parent": None, "step": 0, "token": BOS_ID, "log_prob": 0.0}
            self.nodes[row] = [{**root, "status": "root"}]
            self._alive[row] = [0] + [None] * (beam - 1)
            self._finished[row] = [None] * beam

    def step(
        self,
        steps: torch.Tensor,
        active: torch.Tensor,
        candidates: dict[str, torch.Tensor],
        pick: torch.Tensor,
        picked_scores: torch.Tensor,
        keep: torch.Tensor,
        kept_scores: torch.Tensor,
    ) -> None:
        """Records one step for the ``active`` rows, each at its own step (``steps``:
        the steps done before this one). ``candidates`` holds (n, 2 * beam)
        ``origin``, ``token``, ``log_prob``, ``score`` (finished ones); ``pick`` the
        finished n-best drawn from [previous finished; candidates] and
        ``picked_scores`` their scores (-inf: an empty slot), ``keep`` the candidates
        kept alive and ``kept_scores`` theirs."""
        columns = {name: values.tolist() for name, values in candidates.items()}
        for i, (row, step) in enumerate(zip(active.tolist(), steps.tolist())):
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


class BeamRows(Rows):
    """Beam search's bookkeeping for the sentences in an engine, on tensors of shape
    (sentences, beam, ...), each sentence at its own step (``ages``).

    ``constrained``: sentences may carry lexical constraints
    (``rosetta.decode.constraints``), and the beam is filled by dynamic beam
    allocation (``_advance_constrained``); a sentence without any is searched
    exactly as without the option."""

    def __init__(
        self,
        lengths: Lengths,
        scores: bool,
        trace: bool,
        options: BeamOptions,
        constrained: bool = False,
    ) -> None:
        super().__init__(lengths, scores, trace)
        self.constrained = constrained
        self.group = self.beam = options.beam
        self.alpha, self.nbest = options.length_penalty, options.nbest
        self.eos_within_beam = options.eos_within_beam
        beam = self.beam
        self.serials = torch.zeros(0, dtype=torch.long)  # the engine's number of each
        self.ages = torch.zeros(0, dtype=torch.long)
        self.budget = torch.zeros(0, dtype=torch.long)
        # live hypotheses: scores, and tokens (sentences, beam, longest budget)
        self.live_scores = torch.zeros(0, beam)
        self.alive = torch.zeros(0, beam, 0, dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)  # (sentences * beam,)
        # finished hypotheses (tokens without <eos>), best first
        self.fin_scores = torch.zeros(0, beam)
        self.fin_log_probs = torch.zeros(0, beam)
        self.fin_tokens = torch.zeros(0, beam, 0, dtype=torch.long)
        self.tree = BeamTrace() if trace else None
        self.settings = {"size": beam, "length_penalty": self.alpha}
        if constrained:
            self.tables = ConstraintTables(options.ordered_constraints)
            # each hypothesis's automaton node and the bit mask of constraints it met
            self.node = torch.zeros(0, beam, dtype=torch.long)
            self.met = torch.zeros(0, beam, dtype=torch.long)
            self.fin_met = torch.zeros(0, beam, dtype=torch.long)  # constraints met, counted

    def admit(
        self,
        budget: torch.Tensor,
        sources: Sequence[Sequence[int]],
        copies: list[int],
        serials: torch.Tensor,
        constraints: Sequence[Sequence[Constraint]] | None = None,
    ) -> None:
        device, count, beam = budget.device, budget.size(0), self.beam
        if self.constrained:
            self.tables.admit(constraints or [()] * count, device)
            zeros = torch.zeros(count, beam, dtype=torch.long, device=device)
            self.node, self.met, self.fin_met = (
                torch.cat([t.to(device), zeros]) for t in (self.node, self.met, self.fin_met)
            )
        elif constraints and any(constraints):
            raise ValueError("this beam search was not set up for lexical constraints")
        width = max(self.alive.size(2), int(budget.max()))

        def widened(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            return torch.nn.functional.pad(t, (0, width - t.size(2)), value=PAD_ID)

        empty = torch.full((count, beam, width), PAD_ID, dtype=torch.long, device=device)
        self.alive = torch.cat([widened(self.alive), empty])
        self.fin_tokens = torch.cat([widened(self.fin_tokens), empty])
        # only beam 0 starts alive, so the first step has no duplicates
        start = torch.full((count, beam), NEG_INF, device=device)
        start[:, 0] = 0.0
        self.live_scores = torch.cat([self.live_scores.to(device), start])
        nothing = torch.full((count, beam), NEG_INF, device=device)
        self.fin_scores = torch.cat([self.fin_scores.to(device), nothing])
        self.fin_log_probs = torch.cat([self.fin_log_probs.to(device), nothing])
        self.ages = torch.cat([self.ages.to(device), torch.zeros_like(budget)])
        self.budget = torch.cat([self.budget.to(device), budget])
        self.serials = torch.cat([self.serials.to(device), serials])
        bos = torch.full((count * beam,), BOS_ID, dtype=torch.long, device=device)
        self.last = torch.cat([self.last.to(device), bos])
        self.budgets_admitted(budget)
        if self.tree is not None:
            self.tree.start(serials.tolist(), beam)

    def tokens(self) -> torch.Tensor:
        return self.last

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.constrained:
            return self._advance_constrained(logits)
        beam, n, device = self.beam, self.ages.size(0), logits.device
        ages = self.ages
        logits = logits.float()
        normalizer = logits.logsumexp(dim=-1, keepdim=True)
        min_len = self.lengths.min_len
        logits = forbid_early_eos(
            logits, ages.repeat_interleave(beam) if min_len else ages, min_len
        )
        if self.budget_may_end():
            logits = force_eos(logits, (self.budget <= ages + 1).repeat_interleave(beam))
        # Every hypothesis's best 2 * beam continuations hold the sentence's best
        # 2 * beam: a continuation outranked within its own row is outranked overall.
        vocab = logits.size(-1)
        width = min(2 * beam, vocab)
        row_logits, row_tokens = logits.topk(width, dim=-1)  # (n * beam, width)
        candidates = (self.live_scores.view(-1, 1) + (row_logits - normalizer)).view(n, -1)
        top_scores, top_index = candidates.topk(min(2 * beam, beam * width), dim=1)
        origin = top_index // width  # (n, 2 * beam): the hypothesis each one extends
        token = row_tokens.view(n, beam * width).gather(1, top_index)
        ends = token.eq(EOS_ID)
        ending = ends
        if self.eos_within_beam:  # candidates are sorted, best first
            ending = ends & (torch.arange(ends.size(1), device=device) < beam)

        # Finished: merge this step's <eos> candidates into the n-best so far.
        penalty = length_penalty(ages + 1, self.alpha)[:, None]  # (n, 1)
        new_fin = torch.where(ending, top_scores / penalty, NEG_INF)
        steps = self.alive.size(2)
        prefix = self.alive.gather(1, origin[..., None].expand(-1, -1, steps))  # (n, 2b, T)
        fin_scores, pick = torch.cat([self.fin_scores, new_fin], dim=1).topk(beam, dim=1)
        self.fin_log_probs = torch.cat([self.fin_log_probs, top_scores], 1).gather(1, pick)
        pool_tokens = torch.cat([self.fin_tokens, prefix], dim=1)
        self.fin_tokens = pool_tokens.gather(1, pick[..., None].expand(-1, -1, steps))
        self.fin_scores = fin_scores

        # Alive: the best `beam` continuations that did not end.
        scores, keep = torch.where(ends, NEG_INF, top_scores).topk(beam, dim=1)
        kept_origin, kept_token = origin.gather(1, keep), token.gather(1, keep)  # (n, beam)
        alive = self.alive.gather(1, kept_origin[..., None].expand(-1, -1, steps))
        alive.scatter_(2, ages[:, None, None].expand(-1, beam, 1), kept_token[..., None])
        if self.tree is not None:
            considered = {"origin": origin, "token": token, "log_prob": top_scores,
                          "score": new_fin}  # fmt: skip
            self.tree.step(ages, self.serials, considered, pick, fin_scores, keep, scores)
        self.alive, self.live_scores, self.last = alive, scores, kept_token.view(-1)
        self.ages = ages + 1
        offsets = (torch.arange(n, device=device) * beam)[:, None]  # (n, 1)
        order = (kept_origin + offsets).view(-1)

        best_reachable = scores.max(dim=1).values / length_penalty(self.budget, self.alpha)
        done = (self.fin_scores[:, -1] >= best_reachable) | (self.ages >= self.budget)
        return order, done

    def results(self, index: torch.Tensor) -> list[Found]:
        if self.tree is not None:
            self.tree.finish(self.serials[index], self.nbest)
        tokens = self.fin_tokens[index, : self.nbest]
        scores = self.fin_scores[index, : self.nbest].tolist()
        log_probs = self.fin_log_probs[index, : self.nbest].tolist()
        found = []
        for i, serial in enumerate(self.serials[index].tolist()):
            hyps = [
                Hypothesis(seq[seq.ne(PAD_ID)].tolist(), scores[i][rank], log_probs[i][rank])
                for rank, seq in enumerate(tokens[i])
            ]
            trace = None
            if self.tree is not None:
                tree = self.settings | self.tree.of_row(serial)
                trace = Trace.left_to_right(hyps[0].tokens, tree)
            found.append(Found(hyps, trace))
        return found

    def keep(self, index: torch.Tensor) -> None:
        if not len(index):
            self.emptied()
        self.serials, self.ages, self.budget = (
            self.serials[index],
            self.ages[index],
            self.budget[index],
        )
        self.live_scores, self.alive = self.live_scores[index], self.alive[index]
        self.fin_scores, self.fin_log_probs = self.fin_scores[index], self.fin_log_probs[index]
        self.fin_tokens = self.fin_tokens[index]
        self.last = self.last.view(-1, self.beam)[index].view(-1)
        if self.constrained:
            self.tables.keep(index)
            self.node, self.met = self.node[index], self.met[index]
            self.fin_met = self.fin_met[index]

    def _advance_constrained(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``advance`` with dynamic beam allocation (Post & Vilar 2018; vectorised as
        Hu et al. 2019). Each hypothesis is extended by the sentence's best ``2 *
        beam`` continuations (as without constraints: only these may end), its own
        best token, and every token of the sentence's constraints; a hypothesis
        that has not met every constraint may not end before its length limit.
        The ``beam`` kept are taken round-robin over the banks (constraint tokens
        produced), most first, best first within a bank. Finished hypotheses rank
        by the constraints they met, then by score."""
        beam, n, device = self.beam, self.ages.size(0), logits.device
        ages, tables = self.ages, self.tables
        logits = logits.float()
        normalizer = logits.logsumexp(dim=-1, keepdim=True)
        min_len = self.lengths.min_len
        logits = forbid_early_eos(
            logits, ages.repeat_interleave(beam) if min_len else ages, min_len
        )
        at_limit = self.budget <= ages + 1
        if self.budget_may_end():
            logits = force_eos(logits, at_limit.repeat_interleave(beam))
        unmet = ~tables.satisfied(self.met) & ~at_limit[:, None]
        logits[:, EOS_ID] = logits[:, EOS_ID].masked_fill(unmet.view(-1), NEG_INF)
        log_probs = (logits - normalizer).view(n, beam, -1)
        vocab = log_probs.size(-1)
        width = min(2 * beam, vocab)
        live = self.live_scores

        # candidates (n, m): origin hypothesis, token, score
        row_scores, row_tokens = log_probs.topk(width, dim=-1)  # (n, beam, width)
        row_scores = row_scores + live[..., None]
        top_scores, top_index = row_scores.view(n, -1).topk(min(2 * beam, beam * width), dim=1)
        hypotheses = torch.arange(beam, device=device)[None, :, None]
        wanted = tables.tokens[:, None, :].expand(-1, beam, -1)  # (n, beam, R), -1: none
        wanted_scores = log_probs.gather(2, wanted.clamp(min=0)) + live[..., None]
        wanted_scores = wanted_scores.masked_fill(wanted.lt(0), NEG_INF)
        parts = [
            (top_index // width, row_tokens.view(n, -1).gather(1, top_index), top_scores),
            (hypotheses[..., 0].expand(n, -1), row_tokens[..., 0], row_scores[..., 0]),
            (hypotheses.expand_as(wanted).reshape(n, -1), wanted.clamp(min=0).reshape(n, -1),
             wanted_scores.reshape(n, -1)),
        ]  # fmt: skip
        origin, token, scores = (torch.cat([part[i] for part in parts], dim=1) for i in range(3))
        first = top_scores.size(1)  # only the first part's <eos> may end a hypothesis
        extra = torch.arange(origin.size(1), device=device) >= first
        scores = scores.masked_fill(extra & token.eq(EOS_ID), NEG_INF)
        # one candidate per (hypothesis, token): the first of its copies
        ordered_keys, by_key = (origin * vocab + token).sort(dim=1, stable=True)
        again = torch.zeros_like(ordered_keys, dtype=torch.bool)
        again[:, 1:] = ordered_keys[:, 1:].eq(ordered_keys[:, :-1])
        scores = scores.masked_fill(torch.zeros_like(again).scatter(1, by_key, again), NEG_INF)
        node, met = tables.step(self.node.gather(1, origin), self.met.gather(1, origin), token)

        ends = token.eq(EOS_ID)
        ending = ends & ~extra
        if self.eos_within_beam:
            ending = ending & (torch.arange(ends.size(1), device=device) < beam)
        penalty = length_penalty(ages + 1, self.alpha)[:, None]
        new_fin = torch.where(ending, scores / penalty, NEG_INF)
        steps = self.alive.size(2)
        prefix = self.alive.gather(1, origin[..., None].expand(-1, -1, steps))
        pool_scores = torch.cat([self.fin_scores, new_fin], dim=1)
        pool_met = torch.cat([self.fin_met, tables.count(met)], dim=1)
        rank = pool_met.double() * 1e9 + pool_scores.double()  # met first, then score
        pick = rank.masked_fill(pool_scores.eq(NEG_INF), NEG_INF).topk(beam, dim=1).indices
        fin_scores = pool_scores.gather(1, pick)
        self.fin_met = pool_met.gather(1, pick)
        self.fin_log_probs = torch.cat([self.fin_log_probs, scores], 1).gather(1, pick)
        pool_tokens = torch.cat([self.fin_tokens, prefix], dim=1)
        self.fin_tokens = pool_tokens.gather(1, pick[..., None].expand(-1, -1, steps))
        self.fin_scores = fin_scores

        # alive: round-robin over banks, best first within each
        open_scores = scores.masked_fill(ends, NEG_INF)
        by_score, order = open_scores.sort(dim=1, descending=True, stable=True)
        banks = tables.progress(node, met).gather(1, order)
        top = int(banks.max()) + 1 if banks.numel() else 1
        members = F.one_hot(banks, top)  # (n, m, banks)
        within = (members.cumsum(dim=1) * members).sum(dim=-1) - 1  # rank within its bank
        turn = (within * top + (top - 1 - banks)).masked_fill(by_score.eq(NEG_INF), 1 << 40)
        keep = order.gather(1, turn.topk(beam, dim=1, largest=False).indices)
        kept_scores = open_scores.gather(1, keep)
        kept_origin, kept_token = origin.gather(1, keep), token.gather(1, keep)
        alive = self.alive.gather(1, kept_origin[..., None].expand(-1, -1, steps))
        alive.scatter_(2, ages[:, None, None].expand(-1, beam, 1), kept_token[..., None])
        if self.tree is not None:
            considered = {"origin": origin, "token": token, "log_prob": scores, "score": new_fin}
            self.tree.step(ages, self.serials, considered, pick, fin_scores, keep, kept_scores)
        self.node, self.met = node.gather(1, keep), met.gather(1, keep)
        self.alive, self.live_scores, self.last = alive, kept_scores, kept_token.view(-1)
        self.ages = ages + 1
        order = (kept_origin + (torch.arange(n, device=device) * beam)[:, None]).view(-1)
        best_reachable = kept_scores.max(dim=1).values / length_penalty(self.budget, self.alpha)
        done = (self.fin_scores[:, -1] >= best_reachable) | (self.ages >= self.budget)
        return order, done


@torch.inference_mode()
def beam_search(
    model: Seq2Seq,
    src: torch.Tensor,
    beam: int = BeamOptions().beam,
    alpha: float = BeamOptions().length_penalty,
    nbest: int = 1,
    lengths: Lengths = DEFAULT_LENGTHS,
    eos_within_beam: bool = False,
) -> list[list[Hypothesis]]:
    """Decodes a padded source batch (batch, src_len) into ``nbest`` hypotheses per row,
    best first. ``eos_within_beam``: an <eos> ranked below the step's best ``beam``
    candidates ends nothing (it is dropped, as fairseq, Marian and HuggingFace drop
    it)."""
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must be between 1 and the beam size ({beam}), got {nbest}")
    options = BeamOptions(beam=beam, nbest=nbest, length_penalty=alpha,
                          eos_within_beam=eos_within_beam)  # fmt: skip
    found = BeamSearch(options).beam_run(model, src, lengths)
    return [result.hypotheses for result in found]


class BeamSearch(LeftToRightSearch):
    in_ctranslate2 = True
    Options = BeamOptions
    options: BeamOptions

    takes_constraints = True

    def rows(self, lengths: Lengths, scores: bool, trace: bool, constrained: bool = False) -> Rows:
        opts = self.options
        if opts.beam == 1 and opts.nbest == 1 and not constrained:
            return TokenRows(lengths, scores, trace)  # greedy search, without a tree (as cheap)
        return BeamRows(lengths, scores, trace, opts, constrained)

    def beam_run(self, model: Any, src: torch.Tensor, lengths: Lengths) -> list[Found]:
        """The beam search itself on a padded batch, even with a beam of 1."""
        with torch.inference_mode():
            rows = BeamRows(lengths, True, False, self.options)
            return run_all(Engine(model, rows, lengths, 1, src.size(0), 1 << 62), src)

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
