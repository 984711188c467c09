"""`rosetta plot`: training curves read back from a metrics.jsonl that a crash and a
resume have left untidy, and drawn as a PNG."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from rosetta.curves import metrics_file, plot_curves, read_metrics, series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIGNATURE = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"


def train(step: int, loss: float, elapsed: float) -> dict:
    return {
        "type": "train",
        "step": step,
        "epoch": 1,
        "loss": loss,
        "nll": loss - 0.5,
        "lr": 1e-3 * step / 200,
        "tgt_tokens_per_s": 1000.0 + step,
        "elapsed": elapsed,
    }


def valid(step: int, nll: float, elapsed: float, bleu: float | None = None) -> dict:
    record = {"type": "valid", "elapsed": elapsed, "step": step, "valid_nll": nll}
    record["valid_ppl"] = 2.718281828**nll
    if bleu is not None:
        record["valid_bleu"] = bleu
        record["valid_bleu_signature"] = SIGNATURE
    return record


def write_lines(path, lines: list) -> None:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def untidy_log(tmp_path):
    """A run that logged to step 150 and crashed, resumed from its step-100 checkpoint,
    logged steps 150 and 200 again and was killed in the middle of a line."""
    path = tmp_path / "exp" / "metrics.jsonl"
    path.parent.mkdir()
    write_lines(
        path,
        [
            train(50, 5.0, 30.0),
            train(100, 4.0, 60.0),
            valid(100, 3.5, 60.0, bleu=10.0),
            "not json at all",
            [1, 2, 3],
            train(150, 3.2, 90.0),  # the first run's, superseded below
            "",
            {"type": "note", "text": "resumed"},  # another type: ignored, not counted
            train(150, 3.0, 91.0),
            train(200, 2.0, 120.0) | {"aux": 0.1},  # an unknown key: ignored
            valid(200, 2.5, 120.0, bleu=20.0),
        ],
    )
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"type": "train", "step": 250, "lo')  # the crash
    return path


def test_read_metrics_later_record_wins_and_bad_lines_are_counted(untidy_log):
    train_records, valid_records, skipped = read_metrics(untidy_log)
    assert [r["step"] for r in train_records] == [50, 100, 150, 200]
    assert [r["loss"] for r in train_records] == [5.0, 4.0, 3.0, 2.0]  # 3.0, not 3.2
    assert [r["step"] for r in valid_records] == [100, 200]
    assert skipped == 3  # not JSON, not an object, cut short


def test_records_are_sorted_by_step_even_when_logged_out_of_order(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [train(300, 1.0, 9.0), train(100, 3.0, 3.0), train(200, 2.0, 6.0)])
    train_records, valid_records, skipped = read_metrics(path)
    assert [r["step"] for r in train_records] == [100, 200, 300]
    assert valid_records == [] and skipped == 0


def test_a_record_without_an_integer_step_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(
        path, [train(50, 5.0, 1.0), {"type": "train", "loss": 1.0}, train(1, 1, 1) | {"step": "x"}]
    )
    train_records, _, skipped = read_metrics(path)
    assert [r["step"] for r in train_records] == [50] and skipped == 2


def test_series_over_steps_and_minutes(untidy_log):
    train_records, valid_records, _ = read_metrics(untidy_log)
    assert series(train_records, "loss") == ([50.0, 100.0, 150.0, 200.0], [5.0, 4.0, 3.0, 2.0])
    assert series(valid_records, "valid_nll", x="time") == ([1.0, 2.0], [3.5, 2.5])
    assert series(valid_records, "missing") == ([], [])


@pytest.mark.parametrize("lines", [[], [""], ["garbage", "[1]", '{"type": "tr']])
def test_a_file_with_nothing_to_plot_is_a_one_line_error(tmp_path, lines):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, lines)
    with pytest.raises(ValueError, match="no training or validation records") as error:
        read_metrics(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        plot_curves(path, tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def assert_png(path, min_size=(600, 400)) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000  # four panels of lines and text, not a blank image
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        colours = image.convert("RGB").getcolors(maxcolors=image.width * image.height)
        assert len(colours) > 20  # drawn on: more than a background and a few shades


@pytest.mark.parametrize("x", ["step", "time"])
def test_plot_curves_writes_a_png(untidy_log, tmp_path, x):
    out = tmp_path / "plots" / f"curves_{x}.png"
    assert plot_curves(untidy_log, out, x=x) == out
    assert_png(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_step_and_time_axes_draw_different_pictures(untidy_log, tmp_path):
    by_step = plot_curves(untidy_log, tmp_path / "a.png")
    by_time = plot_curves(untidy_log, tmp_path / "b.png", x="time")
    assert by_step.read_bytes() != by_time.read_bytes()


def test_output_name_gets_png_and_a_wrong_suffix_or_axis_is_refused(untidy_log, tmp_path):
    assert plot_curves(untidy_log, tmp_path / "curves") == tmp_path / "curves.png"
    assert_png(tmp_path / "curves.png")
    with pytest.raises(ValueError, match=r"\*\.png"):
        plot_curves(untidy_log, tmp_path / "curves.jpg")
    with pytest.raises(ValueError, match="step, time"):
        plot_curves(untidy_log, tmp_path / "c.png", x="epoch")


def test_a_run_without_bleu_or_without_validation_still_plots(tmp_path):
    """An RNN run with validation BLEU off; a run stopped before its first validation;
    a log with validation records only."""
    no_bleu = tmp_path / "no_bleu.jsonl"
    write_lines(no_bleu, [train(50, 5.0, 30.0), valid(50, 4.0, 30.0), train(100, 4.0, 60.0)])
    no_valid = tmp_path / "no_valid.jsonl"
    write_lines(no_valid, [train(50, 5.0, 30.0)])  # one point: drawn as a marker
    valid_only = tmp_path / "valid_only.jsonl"
    write_lines(valid_only, [valid(50, 4.0, 30.0, bleu=3.0)])
    for path in (no_bleu, no_valid, valid_only):
        for x in ("step", "time"):
            assert_png(plot_curves(path, tmp_path / f"{path.stem}_{x}.png", x=x))


def test_records_missing_keys_or_holding_odd_values_do_not_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(
        path,
        [
            {"type": "train", "step": 10, "loss": 6.0},  # no lr, speed or elapsed
            train(20, float("nan"), 20.0),  # a diverged step: NaN is valid JSON here
            train(30, 4.0, 30.0) | {"lr": "0.001", "nll": None, "tgt_tokens_per_s": True},
        ],
    )
    train_records, _, _ = read_metrics(path)
    assert series(train_records, "lr") == ([20.0], [0.1e-3])
    assert series(train_records, "loss") == ([10.0, 30.0], [6.0, 4.0])  # NaN left out
    assert series(train_records, "loss", x="time") == ([0.5], [4.0])  # step 10: no time
    assert_png(plot_curves(path, tmp_path / "odd.png"))


def test_metrics_file_takes_an_experiment_directory_or_the_file(untidy_log, tmp_path):
    assert metrics_file(untidy_log.parent) == untidy_log
    assert metrics_file(untidy_log) == untidy_log
    with pytest.raises(FileNotFoundError, match="no such metrics file"):
        metrics_file(tmp_path / "nowhere")
    (tmp_path / "empty_exp").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_exp/metrics\.jsonl"):
        metrics_file(tmp_path / "empty_exp")
