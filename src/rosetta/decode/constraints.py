"""Lexical constraints: target phrases a translation must contain.

A sentence carries a list of ``Constraint``s; one is met when one of its
alternatives (a sequence of target ids: a phrase, or one of a glossary term's
translations) appears contiguously in the output. Beam search honours them with
**dynamic beam allocation** (Post & Vilar, NAACL 2018), vectorised after Hu et
al. (NAACL 2019): every step, each hypothesis is extended by its best tokens and
by every token that could advance a constraint, each candidate's *bank* is the
number of constraint tokens it has produced, and the beam is filled round-robin
over the banks, best first within each, so that hypotheses that met more
constraints are not crowded out by likelier ones that met fewer
(``rosetta.decode.beam``). A hypothesis may end only once it has met every
constraint, or at its length limit.

What a hypothesis has met is tracked by an **Aho-Corasick automaton** over the
sentence's alternatives (the state after a token depends only on the state
before it and the token), built once per sentence, in Python, when the sentence
joins a search; after that every step is tensor lookups over all the sentences
at once (``ConstraintTables``): the automaton's node after each candidate token,
and a bit mask of the constraints met. The automaton finds every occurrence of
every alternative, overlapping ones included ("a b" and "b c" are both met by
"a b c"). A constraint counts once, however often it appears.

``ordered`` constraints must be met in the order given: one counts only once
those before it are met, and only in the part of the output after them.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_CONSTRAINTS = 62  # a sentence's constraints are bits of an int64


@dataclass(frozen=True)
class Constraint:
    """Target phrases of which one must appear: ``alternatives`` (id sequences, not
    empty) and the ``text`` a person gave for it (error messages, highlighting)."""

    alternatives: tuple[tuple[int, ...], ...]
    text: str = ""

    def __post_init__(self) -> None:
        if not self.alternatives or not all(self.alternatives):
            raise ValueError(f"constraint {self.text!r} has no target subwords")

    @property
    def credit(self) -> int:
        """What meeting it adds to a hypothesis's bank: its longest alternative, so
        that progress through any alternative never outgrows it."""
        return max(len(alternative) for alternative in self.alternatives)

    @property
    def shortest(self) -> int:
        return min(len(alternative) for alternative in self.alternatives)

    def met_by(self, tokens: Sequence[int]) -> bool:
        """Whether ``tokens`` contains one of the alternatives contiguously."""
        return any(_end(tokens, alternative, 0) >= 0 for alternative in self.alternatives)


def _end(tokens: Sequence[int], phrase: Sequence[int], after: int) -> int:
    """The end (exclusive) of the first occurrence of ``phrase`` in ``tokens`` that
    ends after position ``after``, or -1."""
    width = len(phrase)
    for i in range(max(0, after - width + 1), len(tokens) - width + 1):
        if tuple(tokens[i : i + width]) == tuple(phrase):
            return i + width
    return -1


def met(constraints: Sequence[Constraint], tokens: Sequence[int], ordered: bool) -> list[bool]:
    """Which ``constraints`` an output meets, as the search counts them: unordered,
    each anywhere; ordered, each with an occurrence that ends after the point where
    the one before it was first met, the ones after an unmet one unmet."""
    if not ordered:
        return [constraint.met_by(tokens) for constraint in constraints]
    result, start = [], 0
    for constraint in constraints:
        ends = [_end(tokens, alt, start) for alt in constraint.alternatives]
        ends = [end for end in ends if end >= 0]
        if not ends or (result and not result[-1]):
            result.append(False)
            continue
        result.append(True)
        start = min(ends)
    return result


@dataclass
class Automaton:
    """One sentence's Aho-Corasick automaton as a complete transition table over the
    tokens its constraints use (``tokens``; any other token leads to the root, 0):
    ``goto[node][i]`` follows ``tokens[i]``; ``depth`` is a node's length,
    ``prefix_of`` the bit mask of the constraints one of whose alternatives begins
    with the node's sequence, ``completes`` those of which an alternative ends at
    the node (its own, or a suffix's)."""

    tokens: list[int]
    goto: list[list[int]]
    depth: list[int]
    prefix_of: list[int]
    completes: list[int]
    credits: list[int]

    @classmethod
    def build(cls, constraints: Sequence[Constraint]) -> Automaton:
        if len(constraints) > MAX_CONSTRAINTS:
            raise ValueError(
                f"{len(constraints)} constraints on one sentence: at most {MAX_CONSTRAINTS}"
            )
        children: list[dict[int, int]] = [{}]
        depth, prefix_of, completes = [0], [0], [0]
        for bit, constraint in enumerate(constraints):
            for alternative in constraint.alternatives:
                node = 0
                for token in alternative:
                    if token not in children[node]:
                        children[node][token] = len(children)
                        children.append({})
                        depth.append(depth[node] + 1)
                        prefix_of.append(0)
                        completes.append(0)
                    node = children[node][token]
                    prefix_of[node] |= 1 << bit
                completes[node] |= 1 << bit
        tokens = sorted({token for node in children for token in node})
        column = {token: i for i, token in enumerate(tokens)}
        goto = [[0] * len(tokens) for _ in children]
        fail = [0] * len(children)
        # breadth first: a node's failure link (its longest proper suffix in the
        # trie) is settled before its children's
        queue = deque([0])
        while queue:
            node = queue.popleft()
            for token, i in column.items():
                child = children[node].get(token)
                if child is None:
                    goto[node][i] = goto[fail[node]][i] if node else 0
                    continue
                goto[node][i] = child
                fail[child] = goto[fail[node]][i] if node else 0
                completes[child] |= completes[fail[child]]
                queue.append(child)
        credits = [constraint.credit for constraint in constraints]
        return cls(tokens, goto, depth, prefix_of, completes, credits)


class ConstraintTables:
    """The automata of the sentences in a search, as padded tensors over those
    sentences (the order of the search's other bookkeeping): sentences are admitted
    at the end and leave by ``keep``, as in ``rosetta.decode.engine.Rows``.

    A hypothesis's state is two (sentences, k) tensors: its automaton ``node`` and
    ``met``, the bit mask of the constraints it has met.
    """

    def __init__(self, ordered: bool, device: torch.device | str = "cpu") -> None:
        self.ordered = ordered
        long = {"dtype": torch.long, "device": device}
        self.tokens = torch.zeros(0, 0, **long)  # (S, R), -1 padding
        self.goto = torch.zeros(0, 1, 0, **long)  # (S, N, R)
        self.depth = torch.zeros(0, 1, **long)  # (S, N)
        self.prefix_of = torch.zeros(0, 1, **long)
        self.completes = torch.zeros(0, 1, **long)
        self.credits = torch.zeros(0, 0, **long)  # (S, C)
        self.required = torch.zeros(0, **long)  # (S,) every constraint's bit

    def admit(self, constraints: Sequence[Sequence[Constraint]], device: torch.device) -> None:
        automata = [Automaton.build(c) for c in constraints]
        count = len(automata)
        tokens = max([self.tokens.size(1)] + [len(a.tokens) for a in automata])
        nodes = max([self.goto.size(1)] + [len(a.goto) for a in automata])
        bits = max([self.credits.size(1)] + [len(a.credits) for a in automata])
        long = {"dtype": torch.long, "device": device}
        new_tokens = torch.full((count, tokens), -1, **long)
        goto = torch.zeros(count, nodes, tokens, **long)
        tables = [torch.zeros(count, nodes, **long) for _ in range(3)]
        credits = torch.zeros(count, bits, **long)
        for i, a in enumerate(automata):
            new_tokens[i, : len(a.tokens)] = torch.tensor(a.tokens, dtype=torch.long)
            if a.tokens:
                goto[i, : len(a.goto), : len(a.tokens)] = torch.tensor(a.goto, dtype=torch.long)
            for table, values in zip(tables, (a.depth, a.prefix_of, a.completes)):
                table[i, : len(values)] = torch.tensor(values, dtype=torch.long)
            credits[i, : len(a.credits)] = torch.tensor(a.credits, dtype=torch.long)
        required = torch.tensor([(1 << len(a.credits)) - 1 for a in automata], **long)

        def grown(old: torch.Tensor, *size: int, value: int = 0) -> torch.Tensor:
            pads = []
            for dim in range(old.dim() - 1, 0, -1):
                pads += [0, size[dim - 1] - old.size(dim)]
            return F.pad(old.to(device), pads, value=value)

        self.tokens = torch.cat([grown(self.tokens, tokens, value=-1), new_tokens])
        self.goto = torch.cat([grown(self.goto, nodes, tokens), goto])
        self.depth, self.prefix_of, self.completes = (
            torch.cat([grown(old, nodes), new])
            for old, new in zip((self.depth, self.prefix_of, self.completes), tables)
        )
        self.credits = torch.cat([grown(self.credits, bits), credits])
        self.required = torch.cat([self.required.to(device), required])

    def keep(self, index: torch.Tensor) -> None:
        for name in ("tokens", "goto", "depth", "prefix_of", "completes", "credits", "required"):
            setattr(self, name, getattr(self, name)[index])

    # ---- per step, on (sentences, k) states ---------------------------------------------
    def step(
        self, node: torch.Tensor, met: torch.Tensor, token: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The states after ``token``, from states ``node`` and ``met``; all three
        (sentences, k)."""
        tokens = self.goto.size(2)
        if not tokens:  # no sentence has a constraint
            return torch.zeros_like(node), met
        match = token[..., None].eq(self.tokens[:, None, :])  # (S, k, R)
        column = match.long().argmax(dim=-1)
        after = self.goto.view(self.goto.size(0), -1).gather(1, node * tokens + column)
        after = torch.where(match.any(dim=-1), after, torch.zeros_like(after))
        completed = self.completes.gather(1, after)
        if self.ordered:  # only the first unmet one counts: its bit is met + 1
            completed = completed & (met + 1)
        return after, met | completed

    def progress(self, node: torch.Tensor, met: torch.Tensor) -> torch.Tensor:
        """The bank of each state: the credit of the constraints met, plus the
        length of a partial match of one still to meet."""
        bits = torch.arange(self.credits.size(1), device=met.device)
        done = (met[..., None] >> bits) & 1  # (S, k, C)
        credit = (done * self.credits[:, None, :]).sum(dim=-1)
        wanted = (met + 1) if self.ordered else ~met
        partial = (self.prefix_of.gather(1, node) & wanted & self.required[:, None]).ne(0)
        return credit + torch.where(partial, self.depth.gather(1, node), 0)

    def satisfied(self, met: torch.Tensor) -> torch.Tensor:
        """(S, k) whether every constraint is met."""
        return met.eq(self.required[:, None])

    def count(self, met: torch.Tensor) -> torch.Tensor:
        """(S, k) how many constraints are met."""
        bits = torch.arange(max(self.credits.size(1), 1), device=met.device)
        return ((met[..., None] >> bits) & 1).sum(dim=-1)


def read_constraint_lines(path: str | Path) -> Iterator[list[str | list[str]]]:
    """A constraints file, one JSON list per input line as ``fairseq-interactive
    --constraints`` takes them (``["Hund", ["Katze", "Kater"]]``: a list item is a
    set of alternatives); a blank line or ``[]`` is no constraint. A line that is
    not such a list is a one-line error naming it."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                yield []
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            good = isinstance(item, list) and all(
                isinstance(x, str)
                or (isinstance(x, list) and x and all(isinstance(y, str) for y in x))
                for x in item
            )
            if not good:
                raise ValueError(
                    f"{path}:{number}: expected a JSON list of phrases or lists of "
                    f"phrases, got {line.strip()[:80]!r}"
                )
            yield item
