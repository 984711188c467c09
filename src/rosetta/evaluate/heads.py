"""What each attention head does over a test set, how much it matters, and the
heads a model can do without (``rosetta heads``).

The questions are Voita et al.'s (2019, *Specialized heads do the heavy lifting,
the rest can be pruned*) and Michel et al.'s (2019, *Are sixteen heads really
better than one?*); the answers are measured here on any rosetta Transformer.

**What a head does** (``head_statistics``): the model runs teacher-forced on the
sources and references, and every head's weights give, averaged over every
query position of the set (padding left out)

- ``confidence``: the largest weight of a query (Voita's "confidence");
- ``entropy``: of a query's weights, in nats, and ``entropy_share``: the same
  over the entropy of uniform weights on that query's keys (1 = uniform);
- ``offsets`` (self-attention): the weight on the key at relative position -1,
  0 and +1 of the query, and the rest (``other``); in the decoder, key 0 is the
  token the query position reads and -1 the one before it;
- ``rare``: the weight on the sentence's rarest key piece (fewest occurrences
  over the whole analysed set, <bos>/<eos> left out), with ``rare_uniform``, its
  value under uniform weights;
- ``distance``: mean |query - key| under the weights (cross-attention: distance
  from the length-scaled diagonal, key - query * source/target length);
- ``agreement`` (cross-attention): how often the head's strongest source position
  is the model's own best alignment, the argmax of the cross-attention averaged
  over every head of every layer. No external word aligner is used: none that
  is a well-kept package works offline without downloading a model.

A **role** per head, first rule that holds (``ROLE_THRESHOLDS``): *positional*
(one offset carries >= 0.5 of the weight), *rare-word* (>= 0.3 on the rarest
piece and >= 3x uniform), *alignment* (cross, agreement >= 0.5), *diffuse*
(entropy_share >= 0.75), *local* (mean distance <= 2), else *mixed*.

**How much it matters**: with that head alone removed (the columns of W_O that
read it scaled by a gate of 0, ``gated``), the increase in the references' NLL
per token and the loss of BLEU of the translations; and Michel et al.'s proxy,
E_batch |dL/dg| of the head's gate g at 1, from one backward pass per batch,
normalised per attention module (L2) as they do, beside the signed first-order
estimate of masking's NLL change, -dL/dg over the set. How well the measures
agree: Spearman's rank correlation.

**What a model loses without them** (``iterative_order``, ``pruning_curve``):
heads are removed least important first in chunks, the importance measured
again before each chunk with the heads removed so far left out (as Michel et
al. prune): by masking (NLL), by the gradient proxy, and in a seeded random
order (the control); BLEU is measured at the end of every chunk, and every
attention module keeps at least one head. The area between an importance curve
and the random one is reported in BLEU x heads.

**Pruned models** (``prune``): the chosen heads are cut out of the weights
(their rows of W_Q, W_K, W_V, their columns of W_O), the model section records
each module's head count (``model.head_counts``), and the result is an ordinary
model directory; ``metadata.json`` records the original number of every head
kept (``pruned_heads``).

The RNN has one attention (Bahdanau's alignment): it is described like a cross-
attention head; removing it is not measured (it would remove the context).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.decode.common import pad_batch
from rosetta.decode.translator import TorchTranslator
from rosetta.evaluate.metrics import bleu
from rosetta.model.attention import MultiHeadAttention
from rosetta.model.interface import IncrementalDecoder
from rosetta.modeldir import read_metadata, save_model_dir

KINDS = ("encoder_self", "decoder_self", "cross")
ROLE_THRESHOLDS = {
    "positional": 0.5,  # weight on one relative offset (-1, 0, +1)
    "rare_word": 0.3,  # weight on the sentence's rarest piece ...
    "rare_word_over_uniform": 3.0,  # ... and at least this many times uniform's
    "alignment": 0.5,  # share of target positions where the head agrees with the model
    "local": 2.0,  # mean attention distance, in positions
    "diffuse": 0.75,  # entropy over the entropy of uniform weights
}
ROLES = {
    "positional": "most weight on one relative position (previous, same or next token)",
    "rare-word": "most weight on the sentence's rarest piece",
    "alignment": "points where the model's averaged cross-attention points (word alignment)",
    "local": "weight on a few nearby positions",
    "diffuse": "weight spread evenly: close to uniform",
    "mixed": "none of the above",
}
BATCH_SENTENCES = 64


@dataclass(frozen=True)
class Head:
    """One head: its ``kind`` (``KINDS``), layer, its number in the original model
    (``head``) and its position among its module's current heads (``index``)."""

    kind: str
    layer: int
    head: int
    index: int

    @property
    def module(self) -> str:
        """The attention module's name in ``TransformerConfig.head_counts``."""
        part, kind = {"encoder_self": ("encoder", "self"), "decoder_self": ("decoder", "self")}.get(
            self.kind, ("decoder", "cross")
        )
        return f"{part}.{self.layer}.{kind}"

    @property
    def name(self) -> str:
        return f"{self.module}.{self.head}"


def attention_modules(model: torch.nn.Module) -> dict[str, MultiHeadAttention]:
    """A Transformer's attention modules by name (``TransformerConfig.attention_modules``)."""
    modules = {f"encoder.{i}.self": layer.self_attn for i, layer in enumerate(model.encoder.layers)}
    for i, layer in enumerate(model.decoder.layers):
        modules[f"decoder.{i}.self"] = layer.self_attn
        modules[f"decoder.{i}.cross"] = layer.cross_attn
    return modules


def is_transformer(model: torch.nn.Module) -> bool:
    return hasattr(model, "encoder") and hasattr(model.encoder, "layers")


def heads_of(model: torch.nn.Module, kept: dict[str, list[int]] | None = None) -> list[Head]:
    """Every head of the model, in module order; ``kept``: the original numbers of a
    pruned model's heads (``metadata.json``'s ``pruned_heads``)."""
    if not is_transformer(model):
        return [Head("cross", 0, 0, 0)]
    heads = []
    for module, attention in attention_modules(model).items():
        part, layer, kind = module.split(".")
        kind = "cross" if kind == "cross" else f"{part}_self"
        numbers = (kept or {}).get(module, list(range(attention.heads)))
        heads += [Head(kind, int(layer), number, i) for i, number in enumerate(numbers)]
    return heads


# ---- gates: a head's output scaled (0: removed) on its way into W_O --------------------------
@contextmanager
def gated(model: torch.nn.Module, gates: dict[str, torch.Tensor]) -> Iterator[None]:
    """While inside, each named module's heads are scaled by its gate (heads,): the
    columns of W_O that read a head are multiplied by its gate (0: the head is
    removed), in place, and restored on the way out. Every path (training form,
    cached steps, every search) multiplies by W_O, so they all see it."""
    modules = attention_modules(model)
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, gate in gates.items():
                attention = modules[name]
                weight = attention.out_proj.weight
                saved[name] = weight.detach().clone()
                weight.mul_(gate.to(weight).repeat_interleave(attention.head_dim))
                _refresh(attention.out_proj)
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                modules[name].out_proj.weight.copy_(weight)
                _refresh(modules[name].out_proj)


def _refresh(linear: torch.nn.Module) -> None:
    """Remakes a ``Linear``'s inference layout (a copy of the weight) after a change."""
    inference = getattr(linear, "inference", None)
    if inference is not None:
        linear.prepare_for_inference(inference.min_onednn_rows is not None)


def without(heads: Sequence[Head], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gates removing ``heads`` (by ``index``)."""
    modules = attention_modules(model)
    gates: dict[str, torch.Tensor] = {}
    for head in heads:
        gate = gates.setdefault(head.module, torch.ones(modules[head.module].heads))
        gate[head.index] = 0.0
    return gates


# ---- the set, in batches ---------------------------------------------------------------------
@dataclass
class Batch:
    src: torch.Tensor  # (batch, src_len)
    tgt_in: torch.Tensor  # <bos> + reference
    tgt_out: torch.Tensor  # reference + <eos>


@dataclass
class Analysed:
    """The sources and references as ids, in batches of similar length."""

    sources: list[list[int]]
    targets: list[list[int]]
    batches: list[Batch] = field(default_factory=list)

    @classmethod
    def of(cls, translator: TorchTranslator, sources: list[str], references: list[str]) -> Analysed:
        if len(sources) != len(references):
            raise ValueError(f"{len(sources)} sources but {len(references)} references")
        limit = translator.max_source_len
        src_ids = [s.ids for s in translator.encode(sources)]
        tgt_ids = translator.tokenizer.encode_target(references)
        pairs = [(s, t) for s, t in zip(src_ids, tgt_ids) if s and 0 < len(t) < limit]
        if not pairs:
            raise ValueError("no sentence pair to analyse (all empty or too long)")
        pairs = [(s[:limit], t) for s, t in pairs]
        analysed = cls([s for s, _ in pairs], [t for _, t in pairs])
        order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), len(pairs[i][1])))
        device = translator.device
        for start in range(0, len(order), BATCH_SENTENCES):
            chosen = order[start : start + BATCH_SENTENCES]
            src = pad_batch([pairs[i][0] for i in chosen], device)
            tgt_in = pad_batch([[BOS_ID, *pairs[i][1]] for i in chosen], device)
            tgt_out = pad_batch([[*pairs[i][1], EOS_ID] for i in chosen], device)
            analysed.batches.append(Batch(src, tgt_in, tgt_out))
        return analysed

    def tokens(self) -> int:
        return sum(int(b.tgt_out.ne(PAD_ID).sum()) for b in self.batches)


def nll(model: torch.nn.Module, analysed: Analysed) -> float:
    """The references' negative log-likelihood per token (nats), teacher-forced."""
    total = 0.0
    with torch.inference_mode():
        for batch in analysed.batches:
            logits = model(batch.src, batch.tgt_in)
            total += float(
                F.cross_entropy(
                    logits.flatten(0, 1).float(), batch.tgt_out.flatten(), ignore_index=PAD_ID,
                    reduction="sum",
                )
            )  # fmt: skip
    return total / analysed.tokens()


# ---- what each head does ------------------------------------------------------------------------
class _Sums:
    """Running sums of one kind's per-head figures over query positions."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.queries = 0.0

    def add(self, name: str, per_head: torch.Tensor) -> None:
        self.values[name] = self.values.get(name, 0) + per_head.double()

    def mean(self, name: str) -> list[float]:
        return (self.values[name] / self.queries).tolist()


def _rarest(ids: torch.Tensor, counts: Counter[int]) -> torch.Tensor:
    """One-hot (batch, len) of each row's rarest piece (specials and padding excluded)."""
    frequency = torch.tensor(
        [[counts.get(i, 0) if i > EOS_ID else math.inf for i in row] for row in ids.tolist()],
        dtype=torch.double,
    )
    return F.one_hot(frequency.argmin(dim=1), ids.size(1)).to(torch.bool)


def head_statistics(model: torch.nn.Module, analysed: Analysed) -> dict[str, dict[str, list]]:
    """Per kind, each figure of the module doc as a list over that kind's heads (layer
    by layer, heads in order); ``cross`` also has ``agreement``."""
    counts: Counter[int] = Counter()
    for ids in (*analysed.sources, *analysed.targets):
        counts.update(ids)
    sums = {kind: _Sums() for kind in KINDS}
    with torch.inference_mode():
        for batch in analysed.batches:
            maps = model.attention_maps(batch.src, batch.tgt_in)
            src_keep, tgt_keep = batch.src.ne(PAD_ID), batch.tgt_in.ne(PAD_ID)
            src_len = src_keep.sum(1).double()
            tgt_len = tgt_keep.sum(1).double()
            rare_src, rare_tgt = _rarest(batch.src, counts), _rarest(batch.tgt_in, counts)
            cross_mean = torch.stack([w.mean(1) for w in maps["cross"]]).mean(0)  # (b, t, s)
            best = cross_mean.argmax(-1)
            for kind, layers in maps.items():
                if not layers:
                    continue
                queries, keys = (tgt_keep, src_keep) if kind == "cross" else (
                    (src_keep, src_keep) if kind == "encoder_self" else (tgt_keep, tgt_keep)
                )  # fmt: skip
                rare = rare_src if kind != "decoder_self" else rare_tgt
                _accumulate(
                    sums[kind], kind, layers, queries, keys, rare,
                    (src_len / tgt_len) if kind == "cross" else None, best,
                )  # fmt: skip
    out: dict[str, dict[str, list]] = {}
    for kind, total in sums.items():
        if not total.values:
            continue
        out[kind] = {name: total.mean(name) for name in total.values}
    return out


def _accumulate(
    sums: _Sums,
    kind: str,
    layers: list[torch.Tensor],
    queries: torch.Tensor,
    keys: torch.Tensor,
    rare: torch.Tensor,
    ratio: torch.Tensor | None,
    best: torch.Tensor,
) -> None:
    """Adds one batch's figures of one kind: every layer's heads, concatenated."""
    weights = torch.cat([w.double() for w in layers], dim=1)  # (batch, all heads, q, k)
    w = weights.masked_fill(~keys[:, None, None, :], 0.0)
    valid = queries[:, None, :].double()  # (batch, 1, q)
    sums.queries += float(queries.sum())

    def add(name: str, per_query: torch.Tensor) -> None:  # (batch, heads, q)
        sums.add(name, (per_query * valid).sum((0, 2)))

    add("confidence", w.amax(-1))
    entropy = -(w * w.clamp_min(1e-12).log()).sum(-1)
    add("entropy", entropy)
    uniform = keys.sum(1).double().clamp_min(2).log()[:, None, None]
    add("entropy_share", entropy / uniform)
    add("rare", (w * rare[:, None, None, :]).sum(-1))
    add("rare_uniform", (1.0 / keys.sum(1).double())[:, None, None].expand_as(entropy))
    q_pos = torch.arange(w.size(2), dtype=torch.double)[:, None]
    k_pos = torch.arange(w.size(3), dtype=torch.double)[None, :]
    if ratio is None:
        add("distance", (w * (k_pos - q_pos).abs()).sum(-1))
        near = 0.0
        for offset, name in ((-1, "offset_-1"), (0, "offset_0"), (1, "offset_+1")):
            on = (k_pos - q_pos).eq(offset)
            share = (w * on).sum(-1)
            near = near + share
            add(name, share)
        add("offset_other", 1.0 - near)
    else:
        diagonal = q_pos * ratio[:, None, None, None]  # (batch, 1, q, 1)
        add("distance", (w * (k_pos - diagonal).abs()).sum(-1))
        agree = w.argmax(-1).eq(best[:, None, :]).double()
        add("agreement", agree)


def role(kind: str, figures: dict[str, float]) -> tuple[str, str]:
    """(role, detail) of one head from its figures (module doc, ``ROLE_THRESHOLDS``)."""
    t = ROLE_THRESHOLDS
    if kind != "cross":
        offsets = {"previous token": figures["offset_-1"], "same token": figures["offset_0"],
                   "next token": figures["offset_+1"]}  # fmt: skip
        where, share = max(offsets.items(), key=lambda item: item[1])
        if share >= t["positional"]:
            return "positional", where
    if figures["rare"] >= t["rare_word"] and figures["rare"] >= (
        t["rare_word_over_uniform"] * figures["rare_uniform"]
    ):
        return "rare-word", ""
    if kind == "cross" and figures["agreement"] >= t["alignment"]:
        return "alignment", ""
    if figures["entropy_share"] >= t["diffuse"]:
        return "diffuse", ""
    if figures["distance"] <= t["local"]:
        return "local", ""
    return "mixed", ""


# ---- how much each head matters ------------------------------------------------------------------
def translate_bleu(translator: TorchTranslator, sources: list[str], references: list[str]) -> float:
    hypotheses = [t.text for t in translator.translate(sources)]
    return bleu(hypotheses, references).score


def gradient_importance(
    model: torch.nn.Module, heads: list[Head], analysed: Analysed
) -> tuple[list[float], list[float]]:
    """Per head: Michel et al.'s proxy, E_batch |dL/dg_h| at g = 1 (L: a batch's summed
    NLL over the set's tokens), normalised per attention module (L2 over its heads)
    as they do; and the first-order estimate of what removing the head alone does to
    the NLL, -dL/dg_h summed over the set (g from 1 to 0), to compare with masking.

    With the gate scaling the head's columns of W_O (``gated``), dL/dg_h is the sum,
    over those columns, of W_O times dL/dW_O: the ordinary weight gradient gives it."""
    modules = attention_modules(model)
    weights = [m.out_proj.weight for m in modules.values()]
    absolute = {name: torch.zeros(m.heads, dtype=torch.double) for name, m in modules.items()}
    signed = {name: torch.zeros(m.heads, dtype=torch.double) for name, m in modules.items()}
    tokens = analysed.tokens()
    with torch.enable_grad():
        for batch in analysed.batches:
            logits = model(batch.src, batch.tgt_in)
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), batch.tgt_out.flatten(), ignore_index=PAD_ID,
                reduction="sum",
            ) / tokens  # fmt: skip
            grads = torch.autograd.grad(loss, weights)
            for (name, attention), weight, grad in zip(modules.items(), weights, grads):
                per_column = (weight.detach() * grad).sum(0)  # (inner,)
                per_head = per_column.view(attention.heads, attention.head_dim).sum(1).double()
                absolute[name] += per_head.abs()
                signed[name] -= per_head
    normalised = {name: t / t.norm().clamp_min(1e-20) for name, t in absolute.items()}
    michel = [float(normalised[h.module][h.index]) for h in heads]
    return michel, [float(signed[h.module][h.index]) for h in heads]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values: Sequence[float]) -> torch.Tensor:
        x = torch.tensor(values, dtype=torch.double)
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.double)
        for value in set(values):  # ties: their mean rank
            same = x.eq(value)
            r[same] = r[same].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else 0.0


# ---- pruning -------------------------------------------------------------------------------------
def iterative_order(
    heads: list[Head], points: Sequence[int], scores_without: Callable[[list[Head]], list[float]]
) -> list[Head]:
    """Heads in the order they are removed, least important first, in chunks that end
    at ``points``: before each chunk the importance is measured again with the heads
    removed so far left out (``scores_without(removed)``: a score per head of
    ``heads``), as Michel et al. prune. Every attention module keeps one head."""
    order: list[Head] = []
    left = Counter(head.module for head in heads)
    for point in points:
        if point <= len(order):
            continue
        scores = scores_without(order)
        ranked = sorted((i for i, h in enumerate(heads) if h not in order), key=lambda i: scores[i])
        for i in ranked:
            if len(order) == point:
                break
            if left[heads[i].module] > 1:
                order.append(heads[i])
                left[heads[i].module] -= 1
    return order


def removable(heads: list[Head]) -> int:
    """How many heads can go: all but one per attention module."""
    return len(heads) - len({head.module for head in heads})


def pruning_curve(
    translator: TorchTranslator,
    order: list[Head],
    points: Sequence[int],
    sources: list[str],
    references: list[str],
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """BLEU with the first k heads of ``order`` removed, for each k of ``points``."""
    curve = []
    for k in points:
        with gated(translator.model, without(order[:k], translator.model)):
            score = translate_bleu(translator, sources, references)
        curve.append({"removed": k, "bleu": round(score, 2)})
        if progress:
            progress(f"{k} heads removed: BLEU {score:.2f}")
    return curve


def area_between(curve: list[dict[str, float]], control: list[dict[str, float]]) -> float:
    """Trapezoid area between two curves over heads removed (BLEU x heads)."""
    area = 0.0
    for a0, a1, c0, c1 in zip(curve, curve[1:], control, control[1:]):
        width = a1["removed"] - a0["removed"]
        area += width * ((a0["bleu"] - c0["bleu"]) + (a1["bleu"] - c1["bleu"])) / 2
    return round(area, 2)


def pruned_state(model: torch.nn.Module, removed: Sequence[Head]) -> dict[str, torch.Tensor]:
    """The state dict with ``removed`` heads cut out of the weights: their rows of
    each input projection (W_Q, W_K, W_V, fused or not) and columns of W_O."""
    modules = attention_modules(model)
    prefix = {id(m): name for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    by_module: dict[str, set[int]] = {}
    for head in removed:
        by_module.setdefault(head.module, set()).add(head.index)
    for name, drop in by_module.items():
        attention = modules[name]
        keep = [i for i in range(attention.heads) if i not in drop]
        width, inner = attention.head_dim, attention.inner
        columns = torch.cat([torch.arange(i * width, (i + 1) * width) for i in keep])
        base = prefix[id(attention)]
        for proj, parts in (("qkv_proj", 3), ("q_proj", 1), ("kv_proj", 2)):
            key = f"{base}.{proj}.weight"
            if key not in state:
                continue
            rows = torch.cat([columns + part * inner for part in range(parts)])
            state[key] = state[key].index_select(0, rows)
            if f"{base}.{proj}.bias" in state:
                state[f"{base}.{proj}.bias"] = state[f"{base}.{proj}.bias"].index_select(0, rows)
        state[f"{base}.out_proj.weight"] = state[f"{base}.out_proj.weight"].index_select(1, columns)
    return state


def check_pruned_output(out_dir: str | Path, model_dir: str | Path) -> Path:
    """Refuses to write a pruned model over its own model or over a folder that is not
    a model directory (replacing a model directory is atomic; anything else is the
    user's)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and out_dir.resolve() == Path(model_dir).resolve():
        raise ValueError(f"{out_dir} is the model being pruned: write the pruned one elsewhere")
    if out_dir.exists() and (not out_dir.is_dir() or (
        any(out_dir.iterdir()) and not (out_dir / "model.safetensors").exists()
    )):  # fmt: skip
        raise ValueError(f"{out_dir} exists and is not a model directory; choose another")
    return out_dir


def prune(
    translator: TorchTranslator,
    model_dir: str | Path,
    removed: Sequence[Head],
    out_dir: str | Path,
    note: dict[str, Any] | None = None,
) -> Path:
    """Writes a model directory without ``removed`` heads (physically: smaller
    projections); every module keeps at least one head."""
    from rosetta.config import load_config
    from rosetta.model import model_for

    model_dir, out_dir = Path(model_dir), check_pruned_output(out_dir, model_dir)
    model = translator.model
    if not is_transformer(model):
        raise ValueError("only a Transformer's heads can be pruned (the RNN has one attention)")
    config = load_config(model_dir / "config.yaml")
    metadata = read_metadata(model_dir)
    heads = heads_of(model, metadata.get("pruned_heads"))
    counts, kept = {}, {}
    gone = {(h.module, h.index) for h in removed}
    for name in attention_modules(model):
        numbers = [h.head for h in heads if h.module == name and (name, h.index) not in gone]
        if not numbers:
            raise ValueError(f"pruning would remove every head of {name}; keep at least one")
        kept[name] = numbers
        if len(numbers) != config.model.heads:
            counts[name] = len(numbers)
    section = config.model.model_copy(update={"head_counts": counts})
    config = config.model_copy(
        update={"model": type(config.model).model_validate(section.model_dump())}
    )
    pruned = model_for(config.model, translator.tokenizer)
    pruned.load_state_dict(pruned_state(model, removed))
    info = {k: v for k, v in metadata.items() if k not in ("sha256", "parameters", "validation")}
    info |= {"pruned_heads": kept, "pruned_from": str(model_dir), **(note or {})}
    return save_model_dir(out_dir, config, model_dir, pruned.eval(), info)


def kept_heads(model_dir: str | Path) -> dict[str, list[int]] | None:
    """A pruned model's original head numbers per module (None: not pruned)."""
    return read_metadata(model_dir).get("pruned_heads")


# ---- the whole analysis --------------------------------------------------------------------------
def analyse(
    translator: TorchTranslator,
    model_dir: str | Path,
    sources: list[str],
    references: list[str],
    valid: tuple[list[str], list[str]] | None = None,
    steps: int = 8,
    seed: int = 1,
    masking_bleu: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every figure of the module doc as one JSON-ready report (``heads.json``):
    ``heads`` (one entry per head), ``agreement``, ``curve`` and the settings.

    What heads do, and the pruning curve's BLEU, are measured on ``sources`` and
    ``references``; importance (which orders the pruning) on ``valid`` (sources,
    references), by default the same set: give a validation set, or the curve is
    measured on the set the heads were chosen on."""
    say = progress or (lambda _text: None)
    model = translator.model
    if not isinstance(model, IncrementalDecoder):
        raise ValueError(
            f"rosetta heads reads a left-to-right model teacher-forced on the references; "
            f"{type(model).__name__} (model.arch {getattr(model.cfg, 'arch', '?')}) is not one"
        )
    heads = heads_of(model, kept_heads(model_dir))
    analysed = Analysed.of(translator, sources, references)
    valid_src, valid_ref = valid or (sources, references)
    scored = Analysed.of(translator, valid_src, valid_ref) if valid else analysed
    say(f"statistics of {len(heads)} heads over {len(analysed.sources)} sentences")
    stats = head_statistics(model, analysed)
    entries: list[dict[str, Any]] = []
    position = Counter[str]()
    for head in heads:
        n = position[head.kind]
        position[head.kind] += 1
        figures = {name: values[n] for name, values in stats[head.kind].items()}
        name, detail = role(head.kind, figures)
        entries.append({
            "kind": head.kind, "layer": head.layer, "head": head.head, "index": head.index,
            "module": head.module, "role": name, "detail": detail,
            **{k: round(figures.pop(k), 4) for k in ("confidence", "entropy", "distance")},
            "figures": {k: round(v, 4) for k, v in figures.items()},
            "importance": {"masking_bleu": None, "masking_nll": None, "gradient": None},
            "pruned": False,
        })  # fmt: skip
    report: dict[str, Any] = {
        "version": 1,
        "model": Path(model_dir).name,
        "arch": "transformer" if is_transformer(model) else "rnn",
        "sentences": len(analysed.sources),
        "search": translator.settings(),
        "thresholds": ROLE_THRESHOLDS,
        "roles": ROLES,
        "heads": entries,
    }
    if not is_transformer(model):
        report["importance_note"] = "one attention: removing it would remove the context"
        return report
    base_nll = nll(model, scored)
    base_valid_bleu = translate_bleu(translator, valid_src, valid_ref)
    say(f"importance set: NLL {base_nll:.4f}, BLEU {base_valid_bleu:.2f}")
    for head, entry in zip(heads, entries):
        with gated(model, without([head], model)):
            increase = nll(model, scored) - base_nll
            entry["importance"]["masking_nll"] = round(increase, 5)
            if masking_bleu:
                drop = base_valid_bleu - translate_bleu(translator, valid_src, valid_ref)
                entry["importance"]["masking_bleu"] = round(drop, 2)
        say(f"{head.name}: NLL {increase:+.4f}" + (f", BLEU {-drop:+.2f}" if masking_bleu else ""))
    gradient, first_order = gradient_importance(model, heads, scored)
    for entry, score, estimate in zip(entries, gradient, first_order):
        entry["importance"]["gradient"] = round(score, 5)
        entry["figures"]["first_order_nll"] = round(estimate, 5)
    by_nll = [e["importance"]["masking_nll"] for e in entries]
    agreement = {
        "masking_nll_vs_gradient": round(spearman(by_nll, gradient), 3),
        "abs_masking_nll_vs_gradient": round(spearman([abs(x) for x in by_nll], gradient), 3),
        "masking_nll_vs_first_order": round(spearman(by_nll, first_order), 3),
    }
    if masking_bleu:
        by_bleu = [e["importance"]["masking_bleu"] for e in entries]
        agreement["masking_bleu_vs_gradient"] = round(spearman(by_bleu, gradient), 3)
        agreement["masking_bleu_vs_masking_nll"] = round(spearman(by_bleu, by_nll), 3)

    def masking_without(removed: list[Head]) -> list[float]:
        with gated(model, without(removed, model)):
            before = nll(model, scored)
            scores = []
            for head in heads:
                if head in removed:
                    scores.append(math.inf)
                    continue
                with gated(model, without([*removed, head], model)):
                    scores.append(nll(model, scored) - before)
        say(f"masking importance measured again without {len(removed)} heads")
        return scores

    def gradient_without(removed: list[Head]) -> list[float]:
        with gated(model, without(removed, model)):
            return gradient_importance(model, heads, scored)[0]

    rng = random.Random(seed)
    shuffled = [rng.random() for _ in heads]
    points = sorted({round(i * removable(heads) / steps) for i in range(steps + 1)})
    orders = {
        "masking": iterative_order(heads, points, masking_without),
        "gradient": iterative_order(heads, points, gradient_without),
        "random": iterative_order(heads, points, lambda _removed: shuffled),
    }
    base_bleu = translate_bleu(translator, sources, references)
    curves = {}
    for name, order in orders.items():
        say(f"pruning curve, {name} order")
        first = {"removed": 0, "bleu": round(base_bleu, 2)}
        curves[name] = [
            first,
            *pruning_curve(translator, order, points[1:], sources, references, say),
        ]
    report.update({
        "base": {"bleu": round(base_bleu, 2), "importance_set": {
            "sentences": len(scored.sources), "nll": round(base_nll, 5),
            "bleu": round(base_valid_bleu, 2),
        }},
        "agreement": agreement,
        "curve": {
            "total_heads": len(heads),
            "orders": {name: [h.name for h in order] for name, order in orders.items()},
            "points": curves,
            "area_vs_random": {
                name: area_between(curves[name], curves["random"])
                for name in ("masking", "gradient")
            },
        },
    })  # fmt: skip
    return report


def chosen_removal(
    report: dict[str, Any],
    heads: list[Head],
    order: str = "masking",
    count: int | None = None,
    bleu_drop: float | None = None,
) -> list[Head]:
    """The heads to prune: the first ``count`` of the report's ``order``, or the most
    heads whose removal costs at most ``bleu_drop`` BLEU on the report's curve."""
    names = report["curve"]["orders"][order]
    if count is None:
        if bleu_drop is None:
            raise ValueError("say how many heads to prune, or the BLEU drop allowed")
        base = report["base"]["bleu"]
        good = [
            p["removed"] for p in report["curve"]["points"][order] if base - p["bleu"] <= bleu_drop
        ]
        count = max(good)
    if count > len(names):
        raise ValueError(
            f"{count} heads to prune; at most {len(names)} can go (each attention module keeps one)"
        )
    by_name = {head.name: head for head in heads}
    return [by_name[name] for name in names[:count]]


def after_pruning(report: dict[str, Any], removed: Sequence[Head]) -> dict[str, Any]:
    """The report as the pruned model's own ``heads.json``: removed heads marked
    ``pruned`` (no index), the others' indices counted among the heads left."""
    gone = {head.name for head in removed}
    entries, position = [], Counter[str]()
    for entry in report["heads"]:
        name = f"{entry['module']}.{entry['head']}"
        if name in gone:
            entries.append({**entry, "pruned": True, "index": None})
        else:
            entries.append({**entry, "index": position[entry["module"]]})
            position[entry["module"]] += 1
    return {**report, "heads": entries}
