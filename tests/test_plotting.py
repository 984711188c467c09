"""`rosetta attention`: PNG heat maps and JSON matrices, and what a trained model attends to."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from rosetta.cli import main
from rosetta.decode.translator import Translator
from rosetta.plotting import DPI, compute_attention, figure_size

pytestmark = pytest.mark.slow

SENTENCE = "the old dog sees a small cat."


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_json_matrix_has_target_by_source_shape(toy_model_dir, tmp_path, capsys):
    out = tmp_path / "a.json"
    args = ["attention", str(toy_model_dir), "--src", SENTENCE, "--format", "json", "--head", "1"]
    assert main([*args, "-o", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    rows, cols = len(data["rows"]), len(data["columns"])
    assert data["rows"][-1] == "<eos>" and "".join(data["columns"]).replace("▁", " ").strip() == (
        SENTENCE
    )
    assert len(data["weights"]) == rows and all(len(r) == cols for r in data["weights"])
    assert all(abs(sum(r) - 1) < 1e-4 for r in data["weights"])
    assert main(["attention", str(toy_model_dir), "--src", SENTENCE, "--format", "json"]) == 0
    every_head = json.loads(capsys.readouterr().out)["weights"]
    assert len(every_head) == 4 and len(every_head[0]) == rows  # (heads, rows, cols)


@pytest.mark.parametrize("all_heads", [False, True])
def test_png_has_the_expected_pixel_size(toy_model_dir, tmp_path, all_heads):
    out = tmp_path / "a.png"
    args = ["attention", str(toy_model_dir), "--src", SENTENCE, "-o", str(out)]
    assert main(args + (["--all-heads"] if all_heads else [])) == 0
    attention = compute_attention(Translator.load(toy_model_dir), SENTENCE)
    width, height, _, _ = figure_size(
        len(attention.queries), len(attention.keys), 4 if all_heads else 1
    )
    assert png_size(out) == (round(width * DPI), round(height * DPI))
    assert out.stat().st_size > 5000


def test_trained_model_attends_to_the_aligned_source_words(toy_model_dir):
    """The toy grammar fixes the alignment: la<-the, kano<-dog, maljuna<-old, ..."""
    translator = Translator.load(toy_model_dir, beam=1)
    attention = compute_attention(translator, SENTENCE)
    assert attention.translation == "la kano maljuna unu katon malgrandan vidas."
    source = ["▁the", "▁old", "▁dog", "▁sees", "▁a", "▁small", "▁cat"]
    # word-initial pieces of the output and the source word each one translates
    expected = {
        "▁la": "▁the",
        "▁kano": "▁dog",
        "▁maljun": "▁old",
        "▁unu": "▁a",
        "▁katon": "▁cat",
        "▁malgrand": "▁small",
        "▁vidas": "▁sees",
    }
    assert attention.keys[: len(source)] == source
    mean = np.stack(attention.weights).mean(axis=(0, 1))  # over layers and heads
    hits = [
        attention.keys[mean[row].argmax()] == expected[piece]
        for row, piece in enumerate(attention.queries)
        if piece in expected
    ]
    assert len(hits) == 7 and sum(hits) >= 6
