"""Training curves: what ``EXP/metrics.jsonl`` says, drawn for people who would rather look.

The trainer appends one JSON object per line to ``metrics.jsonl``: a ``"train"``
record every ``log_every`` steps (loss, NLL, learning rate, target tokens/s) and a
``"valid"`` record at every validation (NLL, perplexity, BLEU when it is on).
``read_metrics`` reads them back, forgiving what a crash or a resume leaves in
the file; ``plot_curves`` draws four panels with matplotlib: training loss and
NLL with validation NLL on the same axes, validation BLEU, the learning rate and
the training speed, over steps or over minutes of training.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from rosetta.plotting import png_path
from rosetta.safeio import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
X_AXES = ("step", "time")
DPI = 100
FIGURE_INCHES = (11.0, 7.5)


def metrics_file(experiment: str | Path) -> Path:
    """The metrics log of ``experiment``: an experiment directory (its ``metrics.jsonl``)
    or the path of a metrics file itself."""
    path = Path(experiment)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file (has the experiment trained?)")
    return path


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Train records, validation records (each sorted by step) and the number of bad
    lines skipped.

    A resumed run appends to the file and logs again the steps after its
    checkpoint, so one step can appear twice: the later record wins. Lines that are
    not JSON, not an object, or lack an integer ``step`` (a line cut short by a
    crash, say) are skipped and counted; blank lines and records of other types are
    ignored without being counted. Raises ``ValueError`` when nothing usable is left.
    """
    path = Path(path)
    by_step: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "valid": {}}
    skipped = 0
    for raw in path.read_bytes().splitlines():
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)  # bytes: a character cut in half is a ValueError too
        except ValueError:
            skipped += 1
            continue
        if not isinstance(record, dict):
            skipped += 1
            continue
        kind = record.get("type")
        if kind not in by_step:
            continue
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            skipped += 1
            continue
        by_step[kind][step] = record  # later wins
    if not by_step["train"] and not by_step["valid"]:
        bad = f" ({skipped} bad line{'s' if skipped != 1 else ''} skipped)" if skipped else ""
        raise ValueError(f"{path}: no training or validation records to plot{bad}")
    train, valid = by_step["train"], by_step["valid"]
    return [train[s] for s in sorted(train)], [valid[s] for s in sorted(valid)], skipped


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def series(
    records: list[dict[str, Any]], key: str, x: str = "step"
) -> tuple[list[float], list[float]]:
    """(xs, ys) of ``key`` over ``records``: x is the step, or for ``x="time"`` the
    elapsed minutes. Records without a finite number under ``key`` (or elapsed time)
    are left out: the curve joins its neighbours across a NaN loss rather than break
    into dots no one can see."""
    xs: list[float] = []
    ys: list[float] = []
    for record in records:
        y = _number(record.get(key))
        if x == "time":
            elapsed = _number(record.get("elapsed"))
            position = None if elapsed is None else elapsed / 60
        else:
            position = float(record["step"])
        if y is None or position is None:
            continue
        xs.append(position)
        ys.append(y)
    return xs, ys


def _draw(ax, points: tuple[list[float], list[float]], label: str, **style) -> bool:
    """Draws one curve (a marker when there is a single point); False when empty."""
    xs, ys = points
    if not xs:
        return False
    if len(xs) == 1:
        style.setdefault("marker", "o")
    ax.plot(xs, ys, label=label, **style)
    return True


def _note(ax, text: str) -> None:
    """Says in an empty panel why it is empty (and drops its meaningless ticks)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_curves(metrics_path: str | Path, out: str | Path, x: str = "step") -> Path:
    """Writes the training curves of one ``metrics.jsonl`` as a PNG and returns the path
    written (``png_path(out)``: ``.png`` is added to a name without a suffix). ``x`` is
    ``"step"`` or ``"time"`` (minutes of training). What the log lacks (BLEU with
    validation BLEU off, validation before the first one) leaves its panel empty with
    a note. The file is replaced atomically."""
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}; choose one of {', '.join(X_AXES)}")
    out = png_path(out)
    metrics_path = Path(metrics_path)
    train, valid, skipped = read_metrics(metrics_path)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=FIGURE_INCHES, dpi=DPI)
    loss_ax, bleu_ax, lr_ax, speed_ax = axes.flat
    x_label = "training time (minutes)" if x == "time" else "step"
    valid_style = {"marker": "o", "markersize": 3}
    no_train = "no training records" if not train else ""

    drawn = [  # fixed colours: a curve keeps its colour when another is missing
        _draw(loss_ax, series(train, "loss", x), "train loss (label-smoothed)", color="C0"),
        _draw(loss_ax, series(train, "nll", x), "train NLL", color="C1"),
        _draw(loss_ax, series(valid, "valid_nll", x), "validation NLL", color="C2", **valid_style),
    ]
    loss_ax.set_title("loss per target token")
    if any(drawn):
        loss_ax.set_ylabel("nats")
        loss_ax.legend()
    else:
        _note(loss_ax, "no loss in the log")

    bleu_ax.set_title("validation BLEU")
    if _draw(bleu_ax, series(valid, "valid_bleu", x), "BLEU", **valid_style):
        bleu_ax.set_ylabel("BLEU")
    elif valid:
        _note(bleu_ax, "no BLEU in the log\n(training.valid_bleu was off)")
    else:
        _note(bleu_ax, "no validation yet")

    lr_ax.set_title("learning rate")
    if _draw(lr_ax, series(train, "lr", x), "learning rate"):
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        _note(lr_ax, no_train or "no learning rate in the log")

    speed_ax.set_title("training speed")
    if _draw(speed_ax, series(train, "tgt_tokens_per_s", x), "target tokens/s"):
        speed_ax.set_ylabel("target tokens / s")
        speed_ax.set_ylim(bottom=0)
    else:
        _note(speed_ax, no_train or "no speed in the log")

    for ax in axes.flat:
        if ax.lines:  # not a panel with a note
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
    name = metrics_path.resolve().parent.name
    if metrics_path.name != METRICS_FILE:
        name = metrics_path.name
    figure.suptitle(f"{name}: training curves")
    footer = []
    signatures = [r["valid_bleu_signature"] for r in valid if "valid_bleu_signature" in r]
    if signatures:
        footer.append(f"BLEU: sacreBLEU {signatures[-1]}")
    if skipped:
        footer.append(
            f"{skipped} bad line{'s' if skipped != 1 else ''} of {metrics_path.name} skipped"
        )
    if footer:
        figure.text(0.5, 0.01, "   ".join(footer), ha="center", fontsize=8, color="0.3")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    image_bytes = io.BytesIO()
    figure.savefig(image_bytes, format="png", dpi=DPI)
    plt.close(figure)
    atomic_write_bytes(out, image_bytes.getvalue())
    return out
