"""System tests: a tiny model learns the toy task; the CLI runs end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import toy_config
from rosetta.cli import main
from rosetta.decode.translator import Translator
from rosetta.evaluate.metrics import bleu

pytestmark = pytest.mark.slow


def test_tiny_transformer_learns_the_toy_task(toy_model_dir):
    corpus = toy_model_dir.parent / "corpus"
    sources = (corpus / "test.en").read_text(encoding="utf-8").splitlines()
    references = (corpus / "test.zeta").read_text(encoding="utf-8").splitlines()
    for beam in (1, 4):
        translator = Translator.load(toy_model_dir, beam=beam)
        outputs = [t.text for t in translator.translate(sources)]
        assert bleu(outputs, references).score > 90, beam


def write_config(tmp_path) -> str:
    config = toy_config(tmp_path / "exp", train={"max_steps": 8, "valid_every": 4})
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    return str(path)


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rosetta.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_prepare_train_translate_evaluate_average(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["prepare", config]) == 0
    assert "batches of <=" in capsys.readouterr().out
    assert main(["train", config]) == 0
    model_dir = tmp_path / "exp" / "model"
    assert (model_dir / "model.safetensors").exists()

    corpus = tmp_path / "exp" / "corpus"
    sources = (corpus / "test.en").read_text(encoding="utf-8").splitlines()[:12]
    (tmp_path / "in.en").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (tmp_path / "ref").write_text(
        "\n".join((corpus / "test.zeta").read_text(encoding="utf-8").splitlines()[:12]) + "\n"
    )
    # a fresh process loads the model directory and translates like this one
    process = run_cli("translate", str(model_dir), "--beam", "3", stdin="\n".join(sources))
    assert process.returncode == 0, process.stderr
    expected = [t.text for t in Translator.load(model_dir, beam=3).translate(sources)]
    assert process.stdout.splitlines() == expected

    out = tmp_path / "out.zeta"
    args = ["translate", str(model_dir), "-i", str(tmp_path / "in.en"), "-o", str(out)]
    assert main([*args, "--batch-size", "5"]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == [
        t.text for t in Translator.load(model_dir).translate(sources)
    ]
    capsys.readouterr()
    assert main(["translate", str(model_dir), "-i", str(tmp_path / "in.en"), "--nbest", "2"]) == 0
    nbest = [line.split(" ||| ") for line in capsys.readouterr().out.splitlines()]
    assert [int(sentence_id) for sentence_id, _, _ in nbest] == [i // 2 for i in range(24)]
    assert all(float(score) < 0 for _, _, score in nbest)

    scores = tmp_path / "scores.json"
    args = ["evaluate", str(model_dir), "--src", str(tmp_path / "in.en")]
    assert main([*args, "--ref", str(tmp_path / "ref"), "--json", str(scores)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("BLEU = ") and "signature: nrefs:1|case:mixed" in printed
    assert "chrF2 = " in printed
    assert yaml.safe_load(scores.read_text())["bleu_signature"].startswith("nrefs:1")

    assert main(["average", config, "--last", "2"]) == 0
    assert "averaged 2 checkpoints (step_4.pt, step_8.pt)" in capsys.readouterr().out

    assert main(["train", config, "--resume", "--set", "train.max_steps=12"]) == 0
    assert "resumed from step 8" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment_dir: x\ndata:\n  root: y\nmodel:\n  layers: 3\n")
    assert main(["prepare", str(bad)]) == 2
    assert "model.layers: unknown key" in capsys.readouterr().err
    assert main(["translate", str(tmp_path)]) == 2
    assert "not a rosetta model directory" in capsys.readouterr().err
    config = write_config(tmp_path)
    assert main(["prepare", config, "--set", "data.toy=null"]) == 2
    assert "set data.root" in capsys.readouterr().err


def test_cli_data_verbs(tmp_path, capsys):
    assert main(["data", "toy", str(tmp_path / "toy"), "--seed", "3"]) == 0
    assert (tmp_path / "toy" / "train.zeta").exists()
    local = tmp_path / "local"
    local.mkdir()
    for name in ("train", "val", "test2016"):
        (local / f"{name}.en").write_text("A dog.\n")
        (local / f"{name}.de").write_text("Ein Hund.\n")
    assert main(["data", "multi30k", str(tmp_path / "m30k"), "--from", str(local)]) == 0
    assert "test2016:" in capsys.readouterr().out
    assert (tmp_path / "m30k" / "val.de").read_text() == "Ein Hund.\n"
