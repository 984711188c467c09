"""The command line: one clear line and exit code 2 for bad input, output never half-written,
N lines in and N lines out, option values checked as they are parsed."""

from __future__ import annotations

import argparse
import io
import sys

import pytest
import torch

from rosetta.cli import build_parser, main, version
from rosetta.config import packaged_config

ROOT_CONFIG = packaged_config("toy.yaml").parents[3] / "configs" / "toy.yaml"


def stdin_bytes(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def error_line(capsys) -> str:
    """The last line of stderr, after checking nothing went to a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def files(tmp_path):
    source = tmp_path / "in.en"
    source.write_text("the dog sees a cat.\n\na cat.\n", encoding="utf-8")
    previous = tmp_path / "prev.txt"
    previous.write_text("earlier output\n", encoding="utf-8")
    return source, previous


def test_missing_input_fails_before_the_output_is_touched(untrained_model_dir, files, capsys):
    _, previous = files
    args = ["translate", str(untrained_model_dir), "-i", "missing.en", "-o", str(previous)]
    assert main(args) == 2
    assert error_line(capsys) == "rosetta translate: error: input file missing.en does not exist"
    assert previous.read_text() == "earlier output\n"


def test_output_equal_to_input_is_refused(untrained_model_dir, files, tmp_path, capsys):
    source, _ = files
    before = source.read_text()
    same = tmp_path / "." / "in.en"
    assert main(["translate", str(untrained_model_dir), "-i", str(source), "-o", str(same)]) == 2
    assert "is the input file" in error_line(capsys)
    assert source.read_text() == before


@pytest.mark.parametrize("option", ["-i", "-o"])
def test_a_directory_as_input_or_output_is_refused(
    untrained_model_dir, tmp_path, option, monkeypatch, capsys
):
    stdin_bytes(monkeypatch, b"a dog.\n")
    assert main(["translate", str(untrained_model_dir), option, str(tmp_path)]) == 2
    assert "is a directory" in error_line(capsys)


def test_invalid_utf8_in_the_input_file_names_file_and_line(
    untrained_model_dir, tmp_path, files, capsys
):
    _, previous = files
    bad = tmp_path / "bad.en"
    bad.write_bytes(b"a dog.\na cat.\nthe \xff dog.\n")
    args = ["translate", str(untrained_model_dir), "-i", str(bad), "-o", str(previous)]
    assert main(args) == 2
    assert error_line(capsys).endswith("bad.en, line 3: invalid UTF-8 (byte 5 of the line)")
    assert previous.read_text() == "earlier output\n"


def test_invalid_utf8_on_stdin_names_the_line_and_keeps_the_output(
    untrained_model_dir, files, monkeypatch, capsys
):
    _, previous = files
    stdin_bytes(monkeypatch, b"a dog.\n\xc3(\n")
    assert main(["translate", str(untrained_model_dir), "-o", str(previous)]) == 2
    assert error_line(capsys) == (
        "rosetta translate: error: <stdin>, line 2: invalid UTF-8 (byte 1 of the line)"
    )
    assert previous.read_text() == "earlier output\n"
    assert [p.name for p in previous.parent.iterdir() if p.name.startswith(".")] == []


def test_n_lines_in_n_lines_out_whatever_the_line_holds(
    untrained_model_dir, tmp_path, monkeypatch, capsys
):
    text = "\ufeffthe dog.\r\n\na cat\rsees\u2028the dog.\x0c\nthe big dog.\n   \n"
    stdin_bytes(monkeypatch, text.encode("utf-8"))
    assert main(["translate", str(untrained_model_dir), "--beam", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 5 and out.endswith("\n")
    lines = out.split("\n")[:-1]
    assert lines[1] == "" and lines[4] == ""
    # the BOM does not change the translation of line 1
    stdin_bytes(monkeypatch, b"the dog.\n")
    assert main(["translate", str(untrained_model_dir), "--beam", "1"]) == 0
    assert capsys.readouterr().out == lines[0] + "\n"


def test_nbest_lines_carry_sentence_ids(untrained_model_dir, files, capsys):
    source, _ = files
    args = ["translate", str(untrained_model_dir), "-i", str(source), "--nbest", "2", "--beam", "2"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ||| ")[0] for line in lines] == ["0", "0", "1", "2", "2"]
    assert lines[2] == "1 |||  ||| 0.0000"
    scores = [float(line.split(" ||| ")[2]) for line in lines]  # total log-probabilities
    assert all(score < 0 for i, score in enumerate(scores) if i != 2)


def test_output_is_written_whole_and_named(untrained_model_dir, files, capsys):
    source, previous = files
    args = ["translate", str(untrained_model_dir), "-i", str(source), "-o", str(previous)]
    assert main([*args, "--beam", "1"]) == 0
    assert previous.read_text().count("\n") == 3
    assert f"wrote 3 lines to {previous}" in capsys.readouterr().err


def test_evaluate_reads_lines_like_everything_else_and_writes_atomically(
    untrained_model_dir, tmp_path, capsys
):
    src, ref = tmp_path / "src.en", tmp_path / "ref.zeta"
    src.write_text("the dog\u2028sees.\na cat\x0c.\n", encoding="utf-8")  # 2 lines, not 4
    ref.write_text("la hundo.\nkato.\n", encoding="utf-8")
    out, scores = tmp_path / "hyp.txt", tmp_path / "scores.json"
    args = ["evaluate", str(untrained_model_dir), "--src", str(src), "--ref", str(ref)]
    assert main([*args, "--beam", "1", "-o", str(out), "--json", str(scores)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote the translations to {out}" in printed and str(scores) in printed
    assert out.read_text().count("\n") == 2 and scores.read_text().startswith("{")
    assert main([*args, "-o", str(src)]) == 2
    assert "is the input file" in error_line(capsys)
    assert main([*args, "--json", str(tmp_path)]) == 2
    assert "is a directory" in error_line(capsys)


def test_attention_says_what_it_wrote(untrained_model_dir, tmp_path, capsys):
    args = ["attention", str(untrained_model_dir), "--src", "the dog.", "--beam", "1"]
    assert main([*args, "-o", str(tmp_path / "noext")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'noext.png'}"
    assert (tmp_path / "noext.png").read_bytes().startswith(b"\x89PNG")
    assert main([*args, "-o", str(tmp_path / "map.jpg")]) == 2
    assert "name the file *.png" in error_line(capsys)
    assert main([*args, "--format", "json", "-o", str(tmp_path / "a.json")]) == 0
    assert (tmp_path / "a.json").read_text().startswith('{"kind": "cross"')


BAD_OPTIONS = [
    (["--max-tokens", "0"], "--max-tokens"),
    (["--batch-size", "0"], "--batch-size"),
    (["--length-penalty", "-1"], "--length-penalty"),
    (["--sample", "--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--sample", "--temperature", "0"], "--temperature"),
    (["--beam", "-1"], "--beam"),
    (["--beam", "0", "--engine", "ctranslate2"], "--beam"),
    (["--nbest", "0"], "--nbest"),
    (["--beam", "two"], "--beam"),
    (["--device", "foo"], "--device"),
    (["--device", "cuda:x"], "--device"),
]


@pytest.mark.parametrize(("extra", "option"), BAD_OPTIONS)
def test_out_of_range_options_are_usage_errors(extra, option, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["translate", "model", *extra])
    assert stop.value.code == 2
    assert f"argument {option}" in error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["translate", "model", "--device", "cuda"])
    assert stop.value.code == 2
    assert "CUDA is not available on this machine" in error_line(capsys)


@pytest.mark.parametrize("last", ["0", "-1"])
def test_average_last_must_be_positive(last, capsys):
    with pytest.raises(SystemExit):
        main(["average", "config.yaml", "--last", last])
    assert "argument --last" in error_line(capsys)


def test_nbest_above_the_beam_is_an_error(untrained_model_dir, capsys):
    assert main(["translate", str(untrained_model_dir), "--beam", "2", "--nbest", "3"]) == 2
    assert "nbest (3) cannot exceed the beam size (2)" in error_line(capsys)


def test_a_yaml_error_in_an_override_names_it(capsys):
    assert main(["prepare", str(ROOT_CONFIG), "--set", "train.betas=[0.9,"]) == 2
    line = error_line(capsys)
    assert line.startswith("rosetta prepare: error: bad override 'train.betas=[0.9,'")


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"rosetta {version()}"
    assert version()[0].isdigit()


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_verb_has_a_description_and_every_option_a_help():
    for name, sub in subparsers(build_parser()).items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}"


def test_attention_lists_only_the_options_it_uses():
    options = {
        o for a in subparsers(build_parser())["attention"]._actions for o in a.option_strings
    }
    # the search drawn is any search (its trace is what is drawn), one hypothesis, torch
    assert {"--search", "--beam", "--length-penalty", "--sample", "--device"} <= options
    assert not {"--engine", "--quantize", "--nbest"} & options


def test_demo_config_ships_with_the_package(tmp_path, monkeypatch):
    from rosetta.cli import _config

    assert packaged_config("toy.yaml").is_file()
    assert ROOT_CONFIG.read_text() == packaged_config("toy.yaml").read_text()
    monkeypatch.chdir(tmp_path)  # anywhere but the repository
    args = build_parser().parse_args(["demo", "--set", "train.max_steps=3"])
    config = _config(args)
    assert config.data.toy is not None and config.train.max_steps == 3


def test_sampling_draws_nbest_samples_and_the_seed_repeats_them(untrained_model_dir, files, capsys):
    source, _ = files
    args = ["translate", str(untrained_model_dir), "-i", str(source), "--sample", "--nbest", "3"]

    def run(seed: str) -> list[str]:
        assert main([*args, "--top-k", "5", "--seed", seed]) == 0
        return capsys.readouterr().out.splitlines()

    first = run("5")
    assert [line.split(" ||| ")[0] for line in first] == ["0"] * 3 + ["1"] + ["2"] * 3
    assert run("5") == first
    assert run("6") != first


@pytest.mark.parametrize("port", ["0", "65536", "70000", "-1"])
def test_a_master_port_out_of_range_is_a_usage_error(port, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "config.yaml", "--nproc-per-node", "2", "--master-port", port])
    assert stop.value.code == 2
    assert error_line(capsys).endswith(
        f"argument --master-port: {port} is out of range: expected an integer in (0, 65535]"
    )


@pytest.mark.parametrize(("rank", "nodes"), [("1", "1"), ("2", "2"), ("5", "3")])
def test_a_node_rank_outside_the_machines_is_one_line(rank, nodes, capsys):
    """Before the launch: torchrun would wait forever for a machine that cannot come."""
    arguments = ["train", "missing.yaml", "--nproc-per-node", "1"]
    assert main([*arguments, "--nnodes", nodes, "--node-rank", rank]) == 2
    last = int(nodes) - 1
    assert error_line(capsys) == (
        f"rosetta train: error: node rank {rank} is out of range: with {nodes} machine(s) "
        f"--node-rank runs from 0 to {last}"
    )
