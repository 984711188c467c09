"""Lexically constrained beam search on Multi30k test2016: quality, term usage, speed.

    python benchmarks/constraints.py MODEL_DIR [--data ../shared/data/multi30k]
        [--repeats 2] [--seed 1] [--name constraints]

Four systems, all beam 5 at batch 32 (the model's length penalty):

* ``unconstrained``: plain beam search;
* ``reference phrases``: each test sentence gets 1-3 random phrases of 1-3
  consecutive reference words, non-overlapping (trailing punctuation stripped),
  unordered: the simulated-user setting of Post & Vilar (2018) and Hu et al.
  (2019);
* ``glossary``: terms the model mistranslates, built **on val** and used on
  test2016: a word translation table from the training corpus (for every source
  word, the target word with the highest Dice coefficient of sentence
  co-occurrence, at least 0.3, both outside the 100 most frequent words of their
  side, seen together at least 5 times), with that word's other forms as
  alternatives (target words seen with the source word at least 5 times whose
  spelling without umlauts starts with the word's, bar its last two letters, and
  is at most three letters longer: Baum, Bäume, Bäumen; each in its most
  frequent spelling in the training targets), kept where one of the forms is in
  at least 70% of the training targets whose source has the word; an entry
  becomes a glossary term where the unconstrained model's val output has none of
  its forms in at least 2 val sentences whose source has the source word and
  whose reference has one of them. Each term then applies wherever test2016 has
  the source word (``rosetta.decode.glossary``), and any one of its forms meets
  it: a glossary of a language with inflection lists the forms, as a person
  writing one would. The target words' spelling is their most frequent one
  inside sentences (a sentence's first word is capitalised whatever it is);
* ``glossary, terms in the reference``: the same glossary applied only where one
  of the term's forms is in the reference, as the terminology test sets of Dinu
  et al. (2019) are made: it stands for a glossary that is right for the text it
  is used on (a person's glossary for their domain), where the automatic one
  above is also wrong in places (``cotton -> Zuckerwatte`` is right only for
  cotton candy).

Reported: BLEU and chrF (sacreBLEU), the term usage rate (required constraints
met in the output, as the search counts them), the same over the sentences
where a hypothesis meeting every constraint fits the length limit (the phrases'
subwords, end to end, within the limit), output words per reference word, and
sentences/s (median of ``--repeats`` alternating runs, after one warm-up).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_io import write_results
from rosetta.decode.common import Lengths
from rosetta.decode.glossary import Glossary, with_capitals, words
from rosetta.decode.translator import Translator
from rosetta.evaluate.metrics import bleu, chrf

_EDGE = re.compile(r"^[^\w]+|[^\w]+$")


def reference_phrases(reference: str, rng: random.Random) -> list[str]:
    """1-3 non-overlapping phrases of 1-3 consecutive reference words."""
    tokens = reference.split()
    wanted, phrases, taken = rng.randint(1, 3), [], set()
    for _ in range(20):
        if len(phrases) == wanted or not tokens:
            break
        width = rng.randint(1, min(3, len(tokens)))
        start = rng.randrange(0, len(tokens) - width + 1)
        span = set(range(start, start + width))
        if span & taken:
            continue
        text = _EDGE.sub("", " ".join(tokens[start : start + width]))
        if text:
            phrases.append(text)
            taken |= span
    return phrases


def fold(word: str) -> str:
    """A German word without its umlauts (Baum, Bäume: baum, baume)."""
    return word.translate(str.maketrans("äöü", "aou"))


def word_table(sources: list[str], targets: list[str]) -> dict[str, list[str]]:
    """Each source word's likeliest target word by Dice coefficient and that word's
    other forms, each as it is most often spelled (module doc)."""
    spelled: Counter[tuple[str, str]] = Counter(  # not a sentence's first word (Vier)
        (words(w)[0], w) for t in targets for w in re.findall(r"\w+", t)[1:]
    )
    spelling: dict[str, str] = {}
    for (folded, surface), _ in spelled.most_common():
        spelling.setdefault(folded, surface)
    src_sets = [set(words(s)) for s in sources]
    tgt_sets = [set(words(t)) for t in targets]
    src_count = Counter(w for s in src_sets for w in s)
    tgt_count = Counter(w for t in tgt_sets for w in t)
    common_src = {w for w, _ in src_count.most_common(100)}
    common_tgt = {w for w, _ in tgt_count.most_common(100)}
    together: Counter[tuple[str, str]] = Counter()
    pairs_with: dict[str, list[int]] = {}
    for k, (s, t) in enumerate(zip(src_sets, tgt_sets)):
        content = [w for w in t if w not in common_tgt]
        for a in s - common_src:
            together.update((a, b) for b in content)
            pairs_with.setdefault(a, []).append(k)
    best: dict[str, tuple[float, str]] = {}
    partners: dict[str, list[str]] = {}
    for (a, b), n in together.items():
        if n < 5:
            continue
        dice = 2 * n / (src_count[a] + tgt_count[b])
        partners.setdefault(a, []).append(b)
        if dice >= 0.3 and dice > best.get(a, (0.0, ""))[0]:
            best[a] = (dice, b)
    table: dict[str, list[str]] = {}
    for a, (_, b) in best.items():
        stem = fold(b)[: max(3, len(b) - 2)]
        others = [
            w for w in partners[a]
            if w != b and fold(w).startswith(stem) and len(w) <= len(b) + 3
        ]  # fmt: skip
        forms = [b, *sorted(others, key=lambda w: -together[(a, w)])]
        covered = sum(1 for k in pairs_with[a] if tgt_sets[k] & set(forms))
        if covered >= 0.7 * src_count[a]:
            table[a] = [spelling.get(w, w) for w in forms]
    return table


def build_glossary(
    translator: Translator, data: Path, table: dict[str, list[str]]
) -> tuple[Glossary, list[tuple[str, list[str], int]]]:
    """Terms the model mistranslates on val (module doc)."""
    sources = (data / "val.en").read_text(encoding="utf-8").splitlines()
    references = (data / "val.de").read_text(encoding="utf-8").splitlines()
    outputs = [t.text for t in translator.translate(sources)]
    misses: Counter[str] = Counter()
    for source, reference, output in zip(sources, references, outputs):
        out_words, ref_words = set(words(output)), set(words(reference))
        for a in set(words(source)):
            forms = {words(b)[0] for b in table.get(a, [])}
            if forms & ref_words and not forms & out_words:
                misses[a] += 1
    chosen = sorted(((a, table[a], n) for a, n in misses.items() if n >= 2), key=lambda x: -x[2])
    return Glossary.from_pairs([(a, forms) for a, forms, _ in chosen], "val misses"), chosen


def in_reference(
    glossary: Glossary, sources: list[str], references: list[str]
) -> list[list[list[str]]]:
    """Each sentence's glossary terms whose target (one of its forms) is in the
    reference, as constraints with alternatives: the terminology test sets of Dinu
    et al. (2019), which stand for a glossary that is right for its text."""
    constraints = []
    for source, reference in zip(sources, references):
        ref_words = set(words(reference))
        constraints.append(
            [
                with_capitals(forms)  # as the translator makes a glossary's constraints
                for _, forms in glossary.match(source)
                if any(words(form)[0] in ref_words for form in forms)
            ]
        )
    return constraints


def fits(translator: Translator, source_ids: list[int], constraints) -> bool:
    """Whether the constraints end to end fit the output limit of the source."""
    room = Lengths.of(translator.options, translator.max_source_len).budget(len(source_ids)) - 1
    return sum(c.shortest for c in constraints) <= room


def run(translator: Translator, sources, constraints, glossary):
    encoded = translator.encode(sources, constraints, glossary)
    start = time.perf_counter()
    translations = translator.translate_encoded(encoded)
    return translations, time.perf_counter() - start, encoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--name", default="constraints")
    args = parser.parse_args()
    torch.set_num_threads(2)
    translator = Translator.load(args.model_dir, beam=5, batch_size=32)
    sources = (args.data / "test2016.en").read_text(encoding="utf-8").splitlines()
    references = (args.data / "test2016.de").read_text(encoding="utf-8").splitlines()
    rng = random.Random(args.seed)
    drawn = [reference_phrases(r, rng) for r in references]
    train_src = (args.data / "train.en").read_text(encoding="utf-8").splitlines()
    train_tgt = (args.data / "train.de").read_text(encoding="utf-8").splitlines()
    glossary, terms = build_glossary(translator, args.data, word_table(train_src, train_tgt))
    systems = {
        "unconstrained": (None, None),
        "reference phrases": (drawn, None),
        "glossary": (None, glossary),
        "glossary, terms in the reference": (in_reference(glossary, sources, references), None),
    }
    times: dict[str, list[float]] = {name: [] for name in systems}
    outputs = {}
    for repeat in range(args.repeats + 1):  # the first: warm-up
        names = list(systems)
        names = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in names:
            translations, seconds, encoded = run(translator, sources, *systems[name])
            if repeat:
                times[name].append(seconds)
            outputs[name] = (translations, encoded)
    rows, results = [], {"glossary_terms": terms, "systems": {}}
    base_speed = None
    for name in systems:
        translations, encoded = outputs[name]
        texts = [t.text for t in translations]
        required = sum(len(t.constraints) for t in translations)
        met = sum(c["met"] for t in translations for c in t.constraints)
        feasible = [fits(translator, s.ids, s.constraints) for s in encoded]
        req_ok = sum(len(t.constraints) for t, ok in zip(translations, feasible) if ok)
        met_ok = sum(c["met"] for t, ok in zip(translations, feasible) if ok for c in t.constraints)
        ratio = sum(len(t.split()) for t in texts) / sum(len(r.split()) for r in references)
        speed = len(sources) / statistics.median(times[name])
        base_speed = base_speed or speed
        figures = {
            "bleu": round(bleu(texts, references).score, 2),
            "chrf": round(chrf(texts, references).score, 2),
            "constrained_sentences": sum(1 for t in translations if t.constraints),
            "required": required,
            "met": met,
            "usage": met / required if required else None,
            "feasible_required": req_ok,
            "feasible_met": met_ok,
            "infeasible_sentences": sum(
                1 for s, ok in zip(encoded, feasible) if s.constraints and not ok
            ),
            "length_ratio": round(ratio, 3),
            "sentences_per_s": round(speed, 1),
            "speed_vs_unconstrained": round(speed / base_speed, 3),
        }
        results["systems"][name] = figures
        usage = f"{100 * met / required:.1f}% ({met}/{required})" if required else "-"
        usage_ok = f"{100 * met_ok / req_ok:.1f}%" if req_ok else "-"
        rows.append(
            f"| {name} | {figures['bleu']:.1f} | {figures['chrf']:.1f} | {usage} | {usage_ok} "
            f"| {ratio:.3f} | {speed:.1f} | {speed / base_speed:.2f} |"
        )
    free, drawn_bleu = results["systems"]["unconstrained"], results["systems"]["reference phrases"]
    gloss = results["systems"]["glossary"]
    right = results["systems"]["glossary, terms in the reference"]
    bars = [
        ("reference phrases: BLEU >= unconstrained + 3",
         drawn_bleu["bleu"] >= free["bleu"] + 3, f"{drawn_bleu['bleu'] - free['bleu']:+.1f}"),
        ("glossary: BLEU >= unconstrained", gloss["bleu"] >= free["bleu"],
         f"{gloss['bleu'] - free['bleu']:+.1f}"),
        ("glossary, terms in the reference: BLEU >= unconstrained", right["bleu"] >= free["bleu"],
         f"{right['bleu'] - free['bleu']:+.1f}"),
        ("term usage 100% where every constraint fits",
         all(s["feasible_met"] == s["feasible_required"] for s in results["systems"].values()),
         ", ".join(f"{s['feasible_met']}/{s['feasible_required']}"
                   for s in results["systems"].values() if s["feasible_required"])),
        ("reference phrases: speed >= 0.5x unconstrained",
         drawn_bleu["speed_vs_unconstrained"] >= 0.5, f"{drawn_bleu['speed_vs_unconstrained']}x"),
    ]  # fmt: skip
    results["bars"] = {text: {"pass": ok, "value": value} for text, ok, value in bars}
    table = "\n".join(
        [
            f"`python benchmarks/constraints.py {args.model_dir} --repeats {args.repeats}`",
            "",
            f"test2016 ({len(sources)} sentences), beam 5, batch 32, 2 threads; "
            f"glossary: {len(terms)} terms built on val; medians of {args.repeats} "
            "alternating runs",
            "",
            "| system | BLEU | chrF | term usage | usage where all fit | words / ref words "
            "| sentences/s | speed vs unconstrained |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            *(f"- {'PASS' if ok else 'FAIL'} {text} ({value})" for text, ok, value in bars),
            "",
            "Glossary terms (source word -> target forms, any one of which meets the "
            "constraint; val sentences missed): "
            + ", ".join(f"{a} -> {'|'.join(b)} ({n})" for a, b, n in terms[:40]),
        ]
    )
    write_results(args.name, results, table + "\n")


if __name__ == "__main__":
    main()
