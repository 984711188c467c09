"""The built-in toy task: English-like sentences into "Zeta", a made-up language.

Zeta is small but has the structure that makes translation more than a word
lookup:

* **its own words**: dog -> kano, big -> granda, see -> vid-, ...;
* **reordering**: English is subject-verb-object, Zeta subject-object-verb;
  adjectives follow their noun; a prepositional phrase ("near the river")
  comes first in Zeta and last in English;
* **agreement**: plural nouns take ``-j`` and so do their adjectives and the
  article (the -> ``la`` / ``laj``); the object takes the accusative ``-n`` on
  noun and adjective; the verb ending marks tense and the subject's number
  (``-as``/``-an`` present singular/plural, ``-is``/``-in`` past);
* **irregular English**: men, women, children; saw, found, heard; a/an.

Example::

    two small children saw the old dog near the river.
    apud la rivero du infanoj malgrandaj la kanon maljunan vidin.

The generator is deterministic for a seed, so the corpus never needs to be
shipped: ``write_corpus`` regenerates it anywhere.

**The long-input task** puts a run of consecutive sentences on each line (a
"document"; ``sentences=(25, 250)`` gives ~200 to 2,000 subwords): its
translation is the sentences' translations in the same order, so reordering
stays inside sentence boundaries while the input is as long as asked.

**The referent task** (``referent=True``) is built so that translating needs
something said far away: each document opens with its topic, "this is about the
king." ("ĉi tio temas pri la reĝo."), and in the sentences after it some noun
phrases are "someone", which Zeta renders from the topic alone, by its stem with
``-ulo`` ("reĝulo"; accusative "reĝulon"). Nothing near "someone" says which
noun it stands for: only the first sentence does. ``referent_agreement`` scores
a translation by how many of the reference's referent words it renders with the
right stem.

With ``referent_style`` the referent's ending is drawn per document, ``-ulo`` or
``-eto``, and shown only on the target side, in the opening ("ĉi tio temas pri
la reĝeto."): the source never says which, so a decoder can only keep it by
looking back at its own first sentence. Cross-attention can find the topic in
the source from anywhere; the style it cannot.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from rosetta.safeio import atomic_write_text

# English singular, English plural, Zeta stem
NOUNS = [
    ("dog", "dogs", "kano"),
    ("cat", "cats", "kato"),
    ("bird", "birds", "birdo"),
    ("child", "children", "infano"),
    ("man", "men", "viro"),
    ("woman", "women", "virino"),
    ("horse", "horses", "ĉevalo"),
    ("teacher", "teachers", "instruisto"),
    ("farmer", "farmers", "farmisto"),
    ("girl", "girls", "knabino"),
    ("boy", "boys", "knabo"),
    ("king", "kings", "reĝo"),
]
ADJECTIVES = [
    ("big", "granda"),
    ("small", "malgranda"),
    ("old", "maljuna"),
    ("young", "juna"),
    ("happy", "feliĉa"),
    ("tired", "laca"),
    ("red", "ruĝa"),
    ("clever", "saĝa"),
]
# English 3rd-person singular present, plural present, past, Zeta stem
VERBS = [
    ("sees", "see", "saw", "vid"),
    ("likes", "like", "liked", "ŝat"),
    ("finds", "find", "found", "trov"),
    ("follows", "follow", "followed", "sekv"),
    ("helps", "help", "helped", "help"),
    ("hears", "hear", "heard", "aŭd"),
]
NUMBERS = [("two", "du"), ("three", "tri"), ("four", "kvar"), ("five", "kvin")]
PLACES = [("river", "rivero"), ("house", "domo"), ("tree", "arbo"), ("market", "bazaro")]
PREPOSITIONS = [("near", "apud"), ("in", "en"), ("under", "sub"), ("behind", "malantaŭ")]


@dataclass(frozen=True)
class ToySplits:
    """Number of pairs in each split."""

    train: int = 20000
    valid: int = 500
    test: int = 500


REFERENT_SHARE = 0.3  # the referent task: the share of noun phrases that are "someone"
REFERENT_SUFFIX = "ulo"  # Zeta's "someone": the topic's stem, less its -o, with -ulo
REFERENT_STYLES = (REFERENT_SUFFIX, "eto")  # ... or, with referent_style, either per document


def referent_word(stem: str, accusative: bool, style: str = REFERENT_SUFFIX) -> str:
    """Zeta's "someone" for the topic noun ``stem`` (reĝo -> reĝulo, reĝulon; in the
    ``eto`` style reĝeto, reĝeton)."""
    return stem[:-1] + style + ("n" if accusative else "")


def _noun_phrase(
    rng: random.Random,
    accusative: bool,
    topic: str | None = None,
    style: str = REFERENT_SUFFIX,
) -> tuple[list[str], list[str], bool]:
    """A determiner, an optional adjective and a noun, or (with a ``topic`` stem, at
    ``REFERENT_SHARE``) "someone"; returns (English, Zeta, plural)."""
    if topic is not None and rng.random() < REFERENT_SHARE:
        return ["someone"], [referent_word(topic, accusative, style)], False
    singular, plural_form, stem = rng.choice(NOUNS)
    plural = rng.random() < 0.4
    adjective = rng.choice(ADJECTIVES) if rng.random() < 0.5 else None
    case = "n" if accusative else ""
    number = "j" if plural else ""
    if plural and rng.random() < 0.5:
        english_det, zeta_det = rng.choice(NUMBERS)
    elif plural:
        english_det, zeta_det = "the", "laj"
    elif rng.random() < 0.6:
        english_det, zeta_det = "the", "la"
    else:
        english_det, zeta_det = "a", "unu"
    english = [english_det] + ([adjective[0]] if adjective else [])
    english.append(plural_form if plural else singular)
    if english_det == "a" and english[1][0] in "aeiou":
        english[0] = "an"  # "an old dog"; Zeta says "unu" either way
    zeta = [zeta_det, stem + number + case]
    if adjective:
        zeta.append(adjective[1] + number + case)  # the adjective follows and agrees
    return english, zeta, plural


def generate_pair(
    rng: random.Random, topic: str | None = None, style: str = REFERENT_SUFFIX
) -> tuple[str, str]:
    """One (English, Zeta) sentence pair drawn from the grammar (with a ``topic``
    stem, some noun phrases are "someone", ending in ``style``; without, the draws
    are unchanged)."""
    subject_en, subject_zeta, plural_subject = _noun_phrase(rng, False, topic, style)
    object_en, object_zeta, _ = _noun_phrase(rng, True, topic, style)
    third_singular, base, past, stem = rng.choice(VERBS)
    is_past = rng.random() < 0.4
    if is_past:
        verb_en, ending = past, ("in" if plural_subject else "is")
    else:
        verb_en, ending = (base, "an") if plural_subject else (third_singular, "as")
    english = [*subject_en, verb_en, *object_en]
    zeta = subject_zeta + object_zeta + [stem + ending]
    if rng.random() < 0.3:
        (place_en, place_zeta), (prep_en, prep_zeta) = rng.choice(PLACES), rng.choice(PREPOSITIONS)
        english += [prep_en, "the", place_en]
        zeta = [prep_zeta, "la", place_zeta, *zeta]
    return " ".join(english) + ".", " ".join(zeta) + "."


def generate_document(
    rng: random.Random, sentences: tuple[int, int], referent: bool = False, style: bool = False
) -> tuple[str, str]:
    """Between ``sentences[0]`` and ``sentences[1]`` consecutive sentence pairs, each
    side joined by spaces; one sentence (the sentence task) at (1, 1). With
    ``referent``, the topic's sentence first and "someone" after; with ``style``
    too, the referent's ending drawn for the document and shown in the opening's
    target (module doc)."""
    fewest, most = sentences
    if not referent:
        if most == 1:
            return generate_pair(rng)  # draws exactly what the sentence task always drew
        pairs = [generate_pair(rng) for _ in range(rng.randint(fewest, most))]
    else:
        singular, _, topic = rng.choice(NOUNS)
        ending = rng.choice(REFERENT_STYLES) if style else REFERENT_SUFFIX
        shown = referent_word(topic, False, ending) if style else topic
        opening = (f"this is about the {singular}.", f"ĉi tio temas pri la {shown}.")
        count = rng.randint(fewest, most)
        pairs = [opening, *(generate_pair(rng, topic, ending) for _ in range(count))]
    return " ".join(s for s, _ in pairs), " ".join(t for _, t in pairs)


def is_referent(word: str) -> bool:
    """Whether a Zeta word (its full stop stripped) is a referent word, of either style."""
    return any(
        word.endswith(ending) and len(word) > len(ending)
        for style in REFERENT_STYLES
        for ending in (style, style + "n")
    )


def referent_words(text: str) -> list[str]:
    """The referent words of a Zeta text ("reĝulo", "kanulon", "kateto"), as their
    topic stems ("reĝo", "kano", "kato")."""
    stems = []
    for word in (w.rstrip(".") for w in text.split()):
        if is_referent(word):
            bare = word[:-1] if word.endswith("n") else word
            stems.append(bare[:-3] + "o")
    return stems


def referent_agreement(outputs: list[str], references: list[str]) -> dict[str, float]:
    """How well translations of referent documents render "someone": of the
    reference's referent words, the share the output renders with the right stem
    (per document at most as many as the reference has: ``accuracy``), and the
    output's referent words with another stem (``wrong``, a count)."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    expected = right = wrong = 0
    for output, reference in zip(outputs, references):
        wanted = referent_words(reference)
        if not wanted:
            continue
        topic = wanted[0]
        got = referent_words(output)
        expected += len(wanted)
        right += min(sum(stem == topic for stem in got), len(wanted))
        wrong += sum(stem != topic for stem in got)
    return {
        "accuracy": right / expected if expected else float("nan"),
        "expected": expected,
        "right": right,
        "wrong": wrong,
    }


def generate_corpus(
    seed: int = 1,
    sizes: ToySplits = ToySplits(),
    sentences: tuple[int, int] = (1, 1),
    referent: bool = False,
    style: bool = False,
) -> dict[str, list[tuple[str, str]]]:
    """Train/valid/test pairs, deterministic for ``seed``; each pair a run of
    ``sentences`` (fewest, most) consecutive sentences (``referent``, ``style``:
    documents of the referent task).

    Valid and test hold only lines that appear in no other split, so the
    scores measure generalisation rather than memory.
    """
    rng = random.Random(seed)
    held_out: set[str] = set()  # valid + test sources
    corpus: dict[str, list[tuple[str, str]]] = {}
    for split in ("valid", "test", "train"):
        wanted, pairs = getattr(sizes, split), []
        while len(pairs) < wanted:
            source, target = generate_document(rng, sentences, referent, style)
            if source in held_out:
                continue
            if split != "train":
                held_out.add(source)
            pairs.append((source, target))
        corpus[split] = pairs
    return {split: corpus[split] for split in ("train", "valid", "test")}


def write_corpus(
    dest: str | Path,
    seed: int = 1,
    sizes: ToySplits = ToySplits(),
    src_lang: str = "en",
    tgt_lang: str = "zeta",
    sentences: tuple[int, int] = (1, 1),
    referent: bool = False,
    style: bool = False,
) -> dict[str, tuple[Path, Path]]:
    """Writes ``dest/{train,valid,test}.{src_lang,tgt_lang}``; returns the paths."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, pairs in generate_corpus(seed, sizes, sentences, referent, style).items():
        src_path, tgt_path = dest / f"{split}.{src_lang}", dest / f"{split}.{tgt_lang}"
        atomic_write_text(src_path, "".join(s + "\n" for s, _ in pairs))
        atomic_write_text(tgt_path, "".join(t + "\n" for _, t in pairs))
        paths[split] = (src_path, tgt_path)
    return paths
