"""Attention heat maps (SPEC §3): what each generated word looked at.

``compute_attention`` translates one sentence and collects every layer's and
head's weights (the Transformer) or the alignment matrix α (the RNN) with
``rosetta.decode.explain.attention_weights``. ``plot_attention`` draws
them with matplotlib: source subwords on the x axis, generated subwords on the
y axis, a colour bar, and one panel per head in a grid when asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rosetta.data.text import clean_line
from rosetta.decode.explain import KINDS, Pieces, attention_weights
from rosetta.decode.translator import TorchTranslator
from rosetta.safeio import atomic_write_bytes

DPI = 100
CELL_INCHES = 0.42  # one attention cell
MARGIN_INCHES = (2.2, 1.8)  # room for labels and the colour bar (width, height)


@dataclass
class Attention:
    """Weights of one kind for one sentence.

    weights: per layer, (heads, rows, columns); rows are the ``queries`` tokens,
    columns the ``keys`` tokens (for ``cross``: generated x source subwords). The
    layers of a pruned model may have different numbers of heads.
    """

    kind: str
    queries: list[str]
    keys: list[str]
    weights: list[np.ndarray]
    translation: str

    def select(self, layer: int = -1, head: int | None = None) -> np.ndarray:
        """(heads, rows, cols) of one layer; one head, or all heads with ``head=None``."""
        layers = len(self.weights)
        if not -layers <= layer < layers:
            raise ValueError(f"layer {layer} out of range: the model has {layers} layer(s)")
        chosen = self.weights[layer]
        heads = len(chosen)
        if head is None:
            return chosen
        if not 0 <= head < heads:
            raise ValueError(f"head {head} out of range: the layer has {heads} head(s)")
        return chosen[head : head + 1]

    def to_json(self, layer: int = -1, head: int | None = None) -> dict[str, Any]:
        """A JSON-ready dict; ``weights`` is (rows, cols) for one head, else (heads, rows, cols)."""
        matrices = self.select(layer, head)
        weights = matrices[0] if head is not None else matrices
        return {
            "kind": self.kind,
            "layer": layer % len(self.weights),
            "head": head,
            "translation": self.translation,
            "rows": self.queries,
            "columns": self.keys,
            "weights": np.round(weights, 6).tolist(),
        }


def compute_attention(translator: TorchTranslator, sentence: str, kind: str = "cross") -> Attention:
    """Translates ``sentence`` with the translator's search and returns its attention."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; choose one of {', '.join(KINDS)}")
    sentence = clean_line(sentence)
    if not sentence:
        raise ValueError("the source sentence is empty")
    source = translator.encode([sentence])[0]
    if len(source.ids) > translator.max_source_len:
        raise ValueError(
            f"the sentence has {len(source.ids)} subwords; the model takes at most "
            f"{translator.max_source_len} in one piece, so its attention cannot be drawn"
        )
    result = translator.translate_encoded([source], trace=True)[0]
    weights = attention_weights(translator, source.ids, result.trace, (kind,))
    if kind not in weights:
        raise ValueError(f"this model has no {kind.replace('_', ' ')} attention")
    queries, keys = Pieces.of(translator, source.ids, result.trace).axes(kind)
    return Attention(kind, queries, keys, weights[kind], result.text)


def figure_size(rows: int, cols: int, panels: int) -> tuple[float, float, int, int]:
    """Figure (width, height) in inches and the panel grid (grid_rows, grid_cols)."""
    grid_cols = min(panels, 4)
    grid_rows = math.ceil(panels / grid_cols)
    width = grid_cols * (cols * CELL_INCHES + MARGIN_INCHES[0])
    height = grid_rows * (rows * CELL_INCHES + MARGIN_INCHES[1])
    return width, height, grid_rows, grid_cols


def png_path(path: str | Path) -> Path:
    """``path`` with ``.png`` added when it has no suffix; another suffix is an error
    (the file would not be what its name says)."""
    path = Path(path)
    if path.suffix == "":
        return path.with_name(path.name + ".png")
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: a heat map is written as PNG; name the file *.png")
    return path


def plot_attention(
    attention: Attention, path: str | Path, layer: int = -1, head: int | None = None
) -> Path:
    """Writes a heat map PNG and returns the path written (``png_path(path)``): the
    head-average of ``layer`` unless ``head`` is given; ``head=-1`` draws every head
    of the layer in a grid. The file is replaced atomically."""
    plt = _pyplot()
    if head == -1:
        matrices = attention.select(layer, None)
        titles = [f"head {h}" for h in range(len(matrices))]
    elif head is None:
        matrices = attention.select(layer, None).mean(axis=0, keepdims=True)
        titles = ["mean over heads"] if len(attention.select(layer, None)) > 1 else [""]
    else:
        matrices = attention.select(layer, head)
        titles = [f"head {head}"]
    rows, cols = matrices.shape[1:]
    width, height, grid_rows, grid_cols = figure_size(rows, cols, len(matrices))
    figure, axes = plt.subplots(
        grid_rows, grid_cols, figsize=(width, height), dpi=DPI, squeeze=False
    )
    layer_name = layer % len(attention.weights)
    figure.suptitle(f"{attention.kind.replace('_', ' ')} attention, layer {layer_name}")
    for index, ax in enumerate(axes.flat):
        if index >= len(matrices):
            ax.axis("off")
            continue
        image = ax.imshow(matrices[index], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(cols), attention.keys, rotation=60, ha="right", fontsize=9)
        ax.set_yticks(range(rows), attention.queries, fontsize=9)
        ax.set_title(titles[index], fontsize=10)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(figure, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | Path, bottom: float = 0.0) -> Path:
    """Writes ``figure`` as PNG to ``png_path(path)`` atomically, closes it, returns the
    path; ``bottom``: the share of the height kept free below the panels (a legend)."""
    import io

    plt = _pyplot()
    figure.tight_layout(rect=(0, bottom, 1, 1))
    path = png_path(path)
    image_bytes = io.BytesIO()
    figure.savefig(image_bytes, format="png", dpi=DPI)
    plt.close(figure)
    atomic_write_bytes(path, image_bytes.getvalue())
    return path


# ---- heads (``rosetta heads``: rosetta.evaluate.heads) ------------------------------------------
ROLE_COLOURS = {
    "positional": "#4c72b0",
    "rare-word": "#dd8452",
    "alignment": "#55a868",
    "local": "#8172b3",
    "diffuse": "#cccccc",
    "mixed": "#937860",
}
KIND_TITLES = {"encoder_self": "encoder self", "decoder_self": "decoder self", "cross": "cross"}


def plot_head_grid(report: dict[str, Any], path: str | Path) -> Path:
    """One panel per kind of attention: layers down, heads across, each cell coloured by
    the head's role and annotated with its importance (masking BLEU drop, else the
    gradient score); pruned heads are hatched."""
    plt = _pyplot()
    from matplotlib.patches import Patch, Rectangle

    kinds = [k for k in KIND_TITLES if any(h["kind"] == k for h in report["heads"])]
    layers = 1 + max(h["layer"] for h in report["heads"])
    heads = 1 + max(h["head"] for h in report["heads"])
    figure, axes = plt.subplots(
        1, len(kinds), figsize=(1.2 + 1.1 * heads * len(kinds), 1.6 + 0.75 * layers), squeeze=False
    )
    for ax, kind in zip(axes.flat, kinds):
        for head in (h for h in report["heads"] if h["kind"] == kind):
            x, y = head["head"], head["layer"]
            ax.add_patch(Rectangle(
                (x, y), 0.95, 0.95, color=ROLE_COLOURS.get(head["role"], "#ffffff"),
                hatch="//" if head.get("pruned") else None, alpha=0.35 if head.get("pruned") else 1,
            ))  # fmt: skip
            importance = head["importance"]
            value = importance.get("masking_bleu")
            label = f"{value:.2f}" if value is not None else (
                f"{importance['gradient']:.2f}" if importance.get("gradient") is not None else ""
            )  # fmt: skip
            ax.text(x + 0.475, y + 0.475, label, ha="center", va="center", fontsize=8)
        ax.set_xlim(0, heads)
        ax.set_ylim(layers, 0)
        ax.set_xticks([i + 0.475 for i in range(heads)], [str(i) for i in range(heads)])
        ax.set_yticks([i + 0.475 for i in range(layers)], [str(i) for i in range(layers)])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{KIND_TITLES[kind]} attention")
    measure = "BLEU lost without the head" if any(
        h["importance"].get("masking_bleu") is not None for h in report["heads"]
    ) else "gradient importance"  # fmt: skip
    figure.suptitle(f"{report['model']}: role of each head; number: {measure}", fontsize=10)
    legend = [Patch(color=colour, label=name) for name, colour in ROLE_COLOURS.items()]
    figure.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8)
    return _save(figure, path, bottom=0.1)


def plot_pruning_curve(report: dict[str, Any], path: str | Path) -> Path:
    """BLEU against the number of heads kept, one line per removal order."""
    plt = _pyplot()
    curve = report["curve"]
    total = curve["total_heads"]
    figure, ax = plt.subplots(figsize=(6, 4))
    for name, points in curve["points"].items():
        area = curve["area_vs_random"].get(name)
        label = name + (f" (area vs random {area:+.1f})" if area is not None else " (control)")
        ax.plot([total - p["removed"] for p in points], [p["bleu"] for p in points], marker="o",
                label=label, linestyle="--" if name == "random" else "-")  # fmt: skip
    ax.invert_xaxis()
    ax.set_xlabel("heads kept")
    ax.set_ylabel("BLEU")
    ax.set_title(f"{report['model']}: heads removed, least important first")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)
