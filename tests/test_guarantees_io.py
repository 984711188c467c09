"""What rosetta guarantees, part 2: the classes a second round of hostile use found
(issue 30). Outputs that are not regular files, one writer per experiment, saves
that fail, distillation bound to its corpus, options nobody honours, damaged
model directories. One test (or a few) per class."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import quiet, toy_config
from rosetta.cli import main
from rosetta.config import ConfigError, DecodeConfig, config_from_dict
from rosetta.data.prepare import prepare
from rosetta.data.text import write_lines_atomic
from rosetta.safeio import (
    DirectoryBusy,
    atomic_write_text,
    current_umask,
    one_writer,
    replace_directory,
    write_chunks_atomic,
)

# --- outputs: replaced when a file, written through otherwise -------------------------


def test_a_named_pipe_is_written_through_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    assert write_lines_atomic(fifo, ["eins", "zwei"]) == 2
    reader.join(timeout=10)
    assert received == [b"eins\nzwei\n"]
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still the pipe
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temporary left beside it


def test_devices_stay_devices_and_a_full_device_is_an_error(tmp_path, capsys):
    write_chunks_atomic("/dev/null", [b"nothing\n"])
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(OSError) as error:
        write_chunks_atomic("/dev/full", [b"x" * 65536])
    assert error.value.errno == errno.ENOSPC
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_translate_to_devices_and_dash(untrained_model_dir, tmp_path, capfd):
    source = tmp_path / "in.en"
    source.write_text("one two\nthree\n", encoding="utf-8")
    assert main(["translate", str(untrained_model_dir), "-i", str(source), "-o", "/dev/null"]) == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    capfd.readouterr()
    assert main(["translate", str(untrained_model_dir), "-i", str(source), "-o", "-"]) == 0
    out = capfd.readouterr().out
    assert len(out.splitlines()) == 2 and not (Path.cwd() / "-").exists()
    code = main(["translate", str(untrained_model_dir), "-i", str(source), "-o", "/dev/full"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["rosetta translate: error: /dev/full: No space left on device"]


def test_a_symlink_is_followed_and_kept(tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("old\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    write_lines_atomic(link, ["new"])
    assert link.is_symlink() and link.resolve() == target
    assert target.read_text() == "new\n"
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "made.txt")
    atomic_write_text(dangling, "made\n")
    assert dangling.is_symlink() and (tmp_path / "made.txt").read_text() == "made\n"


def test_permissions_follow_the_file_replaced_or_the_umask(tmp_path):
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o640)
    atomic_write_text(kept, "new")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        atomic_write_text(tmp_path / "new.txt", "x")
        with replace_directory(tmp_path / "folder") as staging:
            (staging / "inside").write_text("x")
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o750
        os.umask(0o022)
        atomic_write_text(tmp_path / "shared.txt", "x")
        assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o644
    finally:
        os.umask(previous)


# --- one writer per experiment --------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import sys, time
    from rosetta.safeio import one_writer
    with one_writer(sys.argv[1], "rosetta train"):
        print("holding", flush=True)
        time.sleep(60)
    """
)


@pytest.fixture
def held(tmp_path):
    """An experiment folder whose lock another process holds."""
    exp = tmp_path / "exp"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(exp)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "holding"
    yield exp, holder
    holder.kill()
    holder.wait()


def test_a_second_writer_is_refused_naming_the_first(held):
    exp, holder = held
    busy = rf"in use by another process \(pid {holder.pid}, "
    with pytest.raises(DirectoryBusy, match=busy), one_writer(exp, "rosetta prepare"):
        pass
    holder.kill()
    holder.wait()
    with one_writer(exp, "rosetta prepare"), one_writer(exp, "nested in one process"):
        pass  # the lock went with the process; the same process may nest it


def test_train_prepare_and_distill_take_the_lock(held, tmp_path, toy_model_dir, capsys):
    exp, holder = held
    config = tmp_path / "config.yaml"
    config.write_text(toy_config(exp).to_yaml())
    for argv in (
        ["train", str(config)],
        ["prepare", str(config)],
        ["train", str(config), "--resume"],
        ["distill", str(toy_model_dir), str(config), "-o", str(exp)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid}" in err[0], err
    from rosetta.train.trainer import train

    with pytest.raises(DirectoryBusy, match=f"pid {holder.pid}"):
        train(toy_config(exp), log=quiet)  # the Python API too
    assert sorted(p.name for p in exp.iterdir()) == [".lock"]  # nothing was written


# --- a save that fails, a place that cannot be written ------------------------------


def test_a_failed_checkpoint_save_stops_cleanly_and_keeps_the_last_one(tmp_path, monkeypatch):
    from rosetta.train import checkpoint
    from rosetta.train.trainer import train

    config = toy_config(tmp_path / "exp")
    prepare(config, log=quiet)
    real = checkpoint.write_chunks_atomic
    saves = []

    def full_disk(path, chunks):
        saves.append(Path(path).name)
        if len(saves) > 3:  # the second validation's saves: no space left
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, chunks)

    monkeypatch.setattr(checkpoint, "write_chunks_atomic", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not save .*No space left"):
        train(config, log=quiet)
    last = checkpoint.load(config.experiment_dir / "checkpoints" / "last.pt")
    assert last["progress"]["step"] == 4  # the first validation's state, intact
    assert not (config.experiment_dir / "model").exists()


def test_training_into_a_place_it_cannot_write_fails_before_a_step(tmp_path, monkeypatch, capsys):
    """As root a read-only folder is still writable, so the refusal of the file system
    (EROFS) is simulated where rosetta asks it."""
    import tempfile

    config = tmp_path / "config.yaml"
    config.write_text(toy_config(tmp_path / "exp").to_yaml())

    def read_only(*_args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"rosetta train: error: {tmp_path / 'exp'}: cannot write here (Read-only file system)"
    ]
    assert not (tmp_path / "exp" / "checkpoints").exists()


# --- distillation is bound to the corpus it translated ------------------------------


def test_distill_never_continues_over_a_changed_corpus(toy_model_dir, tmp_path):
    from rosetta.decode.distill import DistillError, distill
    from rosetta.decode.translator import Translator

    config = toy_config(
        tmp_path / "student",
        data={"toy": {"seed": 3, "train_size": 60, "valid_size": 5, "test_size": 5}},
    )
    prepare(config, log=quiet)
    teacher = Translator.load(toy_model_dir, beam=1)
    dest = tmp_path / "distilled"
    calls = []

    def stop_after_one_chunk(batch):
        if calls:
            raise KeyboardInterrupt
        calls.append(batch)
        return Translator.translate(teacher, batch)

    teacher.translate = stop_after_one_chunk
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, toy_model_dir, config, dest, chunk=20, log=quiet)
    assert (dest / "train.zeta.partial").read_text().count("\n") == 20
    for lang in ("en", "zeta"):  # 5 pairs deleted under the same path
        corpus = tmp_path / "student" / "corpus" / f"train.{lang}"
        lines = corpus.read_text(encoding="utf-8").splitlines()
        corpus.write_text("".join(line + "\n" for line in lines[5:]), encoding="utf-8")
    del teacher.translate
    with pytest.raises(DistillError, match="sources_sha256 changed"):
        distill(teacher, toy_model_dir, config, dest, chunk=20, log=quiet)
    assert (dest / "train.zeta.partial").read_text().count("\n") == 20  # untouched


# --- options nobody honours are errors ----------------------------------------------


@pytest.mark.parametrize(
    ("given", "left_to_right", "message"),
    [
        ({"sampling": True}, False, "sampling search needs an IncrementalDecoder"),
        ({"search": "beam"}, False, "beam search needs an IncrementalDecoder"),
        ({"temperature": 0.5}, False, "mask-predict search does not use temperature"),
        ({"seed": 3}, False, "does not use seed"),
        ({"beam": 4}, False, "does not use beam"),
        ({"nbest": 6}, False, r"nbest \(6\) cannot exceed length_beam \(5\)"),
        ({"iterations": 3}, True, "beam search does not use iterations"),
        ({"temperature": 0.5}, True, "beam search does not use temperature"),  # sample by name
        ({"search": "mask-predict"}, True, "mask-predict search needs an IterativeRefiner"),
        ({"sampling": True, "beam": 4}, True, "sampling search does not use beam"),
        ({"search": "greedy", "nbest": 2}, True, "greedy search does not use nbest"),
        ({"nbest": 6}, True, r"nbest \(6\) cannot exceed the beam size \(5\)"),
        ({"search": "no-such"}, True, "unknown search 'no-such'"),
    ],
)
def test_an_option_the_search_cannot_honour_is_an_error(given, left_to_right, message):
    from rosetta.decode.search import SEARCHES, MaskPredictSearch, configure

    available = [s for s in SEARCHES if (s is MaskPredictSearch) != left_to_right]
    with pytest.raises(ConfigError, match=message):
        configure({}, given, available)


def test_honoured_options_pass_and_pick_the_search_that_reads_them():
    from rosetta.decode.search import SEARCHES, MaskPredictSearch, configure

    autoregressive = [s for s in SEARCHES if s is not MaskPredictSearch]
    for given, left_to_right, kind in (
        ({"iterations": 3, "length_beam": 2, "nbest": 2}, False, "mask-predict"),
        ({"sampling": True, "temperature": 0.5, "seed": 2, "nbest": 3}, True, "sampling"),
        ({"nbest": 3}, True, "beam"),
        ({"beam": 1, "length_penalty": 1.0, "sampling": False}, True, "beam"),
        ({"search": "greedy"}, True, "greedy"),
        ({}, True, "beam"),  # the model's first search
        ({}, False, "mask-predict"),
    ):
        available = autoregressive if left_to_right else [MaskPredictSearch]
        search = configure({}, given, available)
        assert search.kind() == kind
        options = search.describe()
        assert all(options[k] == v for k, v in given.items() if k not in ("search", "sampling"))


def test_old_flat_decode_sections_load_as_they_were_read():
    """A model directory written before the search section: every flat key present,
    read as then (sampling if set, else the model's search), the others ignored."""
    from rosetta.decode.search import SEARCHES, MaskPredictSearch, configure

    flat = dict(beam=4, nbest=2, length_penalty=1.0, sampling=False, temperature=1.0, top_k=0,
                top_p=1.0, seed=1, iterations=3, length_beam=2)  # fmt: skip
    section = DecodeConfig(**flat, max_len_b=7).search
    assert configure(section, None, SEARCHES).describe() == {
        "kind": "beam", "beam": 4, "nbest": 2, "length_penalty": 1.0, "eos_within_beam": False,
        "ordered_constraints": False,
    }  # fmt: skip
    assert configure(section, None, [MaskPredictSearch]).describe() == {
        "kind": "mask-predict", "iterations": 3, "length_beam": 2, "nbest": 2
    }  # fmt: skip
    sampled = configure(DecodeConfig(**{**flat, "sampling": True}).search, None, SEARCHES)
    assert sampled.kind() == "sampling" and sampled.options.nbest == 2
    with pytest.raises(ConfigError, match="beem is not a search option"):
        configure({"beem": 4}, None, SEARCHES)
    with pytest.raises(ConfigError, match="invalid beam search options:\n  beem: unknown key"):
        configure({"kind": "beam", "beem": 4}, None, SEARCHES)


def test_cli_refuses_ignored_options(untrained_model_dir, tmp_path, capsys):
    source = tmp_path / "in.en"
    source.write_text("one two\n", encoding="utf-8")
    code = main(["translate", str(untrained_model_dir), "-i", str(source), "--temperature", "2"])
    assert code == 2 and "does not use temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # evaluate scores the best hypothesis only
        main(["evaluate", str(untrained_model_dir), "--src", "a", "--ref", "b", "--nbest", "3"])
    assert "unrecognized arguments: --nbest" in capsys.readouterr().err


def test_evaluate_on_empty_files_is_one_line(untrained_model_dir, tmp_path, capsys):
    for name in ("src", "ref"):
        (tmp_path / name).write_bytes(b"")
    argv = ["evaluate", str(untrained_model_dir), "--src", str(tmp_path / "src")]
    assert main([*argv, "--ref", str(tmp_path / "ref")]) == 2
    assert capsys.readouterr().err.strip() == (
        "rosetta evaluate: error: no sentences to score: the test set is empty"
    )


# --- configurations: ranges at parse time -------------------------------------------


def _config(**sections):
    data = {"experiment_dir": "x", "data": {"toy": {}}, **sections}
    return config_from_dict(data)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"scheduled_sampling": {"speed": float("inf")}}}, "finite number"),
        ({"train": {"lr": float("nan")}}, "finite number"),
        (
            {
                "model": {
                    "max_positions": 256,
                    "encoder_attention": {"variant": "lowrank", "rank": 100000},
                }
            },
            r"rank \(100000\) cannot exceed max_positions \(256\)",
        ),
    ],
)
def test_impossible_settings_are_refused_when_read(sections, message):
    with pytest.raises(ConfigError, match=message):
        _config(**sections)


# --- model directories: damage and non-finite weights -------------------------------


def _copy_model(model_dir: Path, dest: Path) -> Path:
    return Path(shutil.copytree(model_dir, dest))


def test_a_model_with_nan_weights_is_refused(untrained_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from rosetta.modeldir import METADATA, WEIGHTS, ModelDirError, load_model_dir, write_metadata
    from rosetta.safeio import sha256_file

    model_dir = _copy_model(untrained_model_dir, tmp_path / "model")
    weights = model_dir / WEIGHTS
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        embedded = handle.metadata()
    tensors = load_file(weights)
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name][0] = float("nan")
    save_file(tensors, weights, metadata=embedded)
    info = json.loads((model_dir / METADATA).read_text())
    info.pop("sha256")
    write_metadata(model_dir, info)  # checksums that match: only the values are wrong
    assert json.loads((model_dir / METADATA).read_text())["sha256"][WEIGHTS] == sha256_file(weights)
    with pytest.raises(ModelDirError, match=rf"refusing to use .*NaN or infinity \({name}"):
        load_model_dir(model_dir)


def test_a_missing_metadata_file_is_an_error_not_a_warning(untrained_model_dir, tmp_path):
    from rosetta.modeldir import METADATA, ModelDirError, load_model_dir

    model_dir = _copy_model(untrained_model_dir, tmp_path / "model")
    (model_dir / METADATA).unlink()
    with pytest.raises(ModelDirError, match=r"metadata\.json is missing"):
        load_model_dir(model_dir)


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    exp = tmp_path / "exp"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(exp)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "holding"
    holder.kill()
    holder.wait()
    deadline = time.monotonic() + 5
    while True:
        try:
            with one_writer(exp, "after kill -9"):
                break
        except DirectoryBusy:
            assert time.monotonic() < deadline
            time.sleep(0.05)
