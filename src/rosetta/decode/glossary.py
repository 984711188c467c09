"""Glossaries: source terms and the target terms a translation must use for them.

A glossary file is UTF-8 text, one term per line: ``source term<TAB>target
term``, more tab-separated target terms for a term with several acceptable
translations; blank lines and lines starting with ``#`` are skipped; a source
term on several lines gathers their targets.

A term matches a sentence on **normalised words**: both are NFKC-normalised and
case-folded and split into words (runs of letters, digits and ``_``), and the
term's words must equal consecutive words of the sentence, so "cat" never
matches inside "cats" or "concatenate". Matches are taken **leftmost-longest**:
scanning the sentence from its start, at each word the longest term beginning
there matches and the scan goes on after it, so overlapping terms never both
match ("New York" before "York" at the same word; "York" alone elsewhere). A
term that matches twice gives one constraint. Each match becomes one lexical
constraint (``rosetta.decode.constraints``) whose alternatives are the term's
target terms and, for a target term that starts with a lower-case letter, the
same with its first letter upper-cased (``with_capitals``): the form it takes at
the start of a sentence ("vier" is met by "Vier weiße Hunde ..."; the search
matches subwords, and the capitalised word is other subwords). The constraint
is reported by the terms as written.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_WORD = re.compile(r"\w+")


def words(text: str) -> tuple[str, ...]:
    """``text``'s normalised words (NFKC, case-folded)."""
    return tuple(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def with_capitals(targets: list[str]) -> list[str]:
    """``targets`` and, after them, each one that starts lower-case with its first
    letter upper-cased (the module docstring)."""
    capitals = [t[0].upper() + t[1:] for t in targets if t[:1].islower()]
    return list(dict.fromkeys([*targets, *capitals]))


@dataclass
class Glossary:
    """Source terms (as normalised words) and each one's target terms, in the
    order given."""

    terms: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    longest: int = 0

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, Iterable[str]]], origin: str = "") -> Glossary:
        """A glossary from ``(source term, target terms)`` pairs; ``origin`` names
        where they came from in errors."""
        glossary = cls()
        for number, (source, targets) in enumerate(pairs, start=1):
            where = f"{origin}: term {number}" if origin else f"term {number}"
            key = words(source)
            targets = [t.strip() for t in targets if t.strip()]
            if not key:
                raise ValueError(f"{where}: source term {source!r} has no words")
            if not targets:
                raise ValueError(f"{where}: source term {source!r} has no target term")
            known = glossary.terms.setdefault(key, [])
            known += [t for t in targets if t not in known]
            glossary.longest = max(glossary.longest, len(key))
        return glossary

    @classmethod
    def load(cls, path: str | Path) -> Glossary:
        """Reads a glossary file (see the module's docstring)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read glossary {path}: {error}") from None
        pairs = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            source, *targets = line.split("\t")
            if not targets:
                raise ValueError(
                    f"{path}:{number}: expected 'source term<TAB>target term', got {line!r}"
                )
            pairs.append((source, targets))
        return cls.from_pairs(pairs, str(path))

    def match(self, sentence: str) -> list[tuple[str, list[str]]]:
        """The terms in ``sentence``, leftmost-longest, each once: ``(source term as
        normalised words joined by spaces, its target terms)``."""
        found: dict[tuple[str, ...], list[str]] = {}
        tokens = words(sentence)
        i = 0
        while i < len(tokens):
            for width in range(min(self.longest, len(tokens) - i), 0, -1):
                key = tokens[i : i + width]
                if key in self.terms:
                    found.setdefault(key, self.terms[key])
                    i += width
                    break
            else:
                i += 1
        return [(" ".join(key), targets) for key, targets in found.items()]

    def __len__(self) -> int:
        return len(self.terms)
