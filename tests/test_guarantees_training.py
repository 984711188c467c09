"""What rosetta guarantees around training: no lost work, no foreign code, no silent
damage. One test (or a few) per class of failure found by probing it as a user."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import toy_config
from rosetta.data.prepare import PrepareError, prepare
from rosetta.data.tokenizer import Tokenizer
from rosetta.modeldir import ModelDirError, load_model_dir, save_model_dir
from rosetta.train import checkpoint
from rosetta.train.trainer import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (12 steps, validations at 4, 8, 12) that tests copy."""
    exp = tmp_path_factory.mktemp("trained") / "exp"
    config = toy_config(exp)
    prepare(config, log=quiet)
    train(config, log=quiet)
    return exp


def copy_run(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    return dest


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


# --- work lost ------------------------------------------------------------------------


def test_changed_corpus_or_settings_are_refused_and_change_nothing(trained, tmp_path):
    exp = copy_run(trained, tmp_path / "exp")
    for name, line in (("train.en", "a brand new sentence .\n"), ("train.zeta", "nova frazo .\n")):
        with (exp / "corpus" / name).open("a", encoding="utf-8") as handle:
            handle.write(line)
    before = snapshot(exp)
    with pytest.raises(
        PrepareError, match=r"holds a trained model.*train\.en changed, train\.zeta changed"
    ):
        prepare(toy_config(exp), log=quiet)
    with pytest.raises(PrepareError, match=r"tokenizer\.vocab_size 300 -> 400.*new experiment"):
        prepare(toy_config(exp, tokenizer={"vocab_size": 400}), log=quiet)
    assert snapshot(exp) == before


def test_other_corpus_root_then_resume_is_refused(trained, tmp_path):
    """The probe: `rosetta train C --set data.root=OTHER --resume` on a trained run."""
    from rosetta.cli import main

    exp = copy_run(trained, tmp_path / "exp")
    shutil.copytree(exp / "corpus", tmp_path / "other")
    config = tmp_path / "config.yaml"
    config.write_text(toy_config(exp).to_yaml())
    before = snapshot(exp)
    override = ["--set", "data.toy=null", "--set", f"data.root={tmp_path / 'other'}"]
    assert main(["train", str(config), *override, "--resume"]) == 2
    assert snapshot(exp) == before
    assert main(["prepare", str(config), "--force"]) == 2  # would retrain the tokenizer
    assert snapshot(exp) == before


def test_a_checkpoint_from_other_data_is_refused(trained, tmp_path):
    """Even past prepare (a hand-replaced tokenizer): the checkpoint's binding is checked."""
    exp = copy_run(trained, tmp_path / "exp")
    state = checkpoint.load(exp / "checkpoints" / "last.pt")
    state["binding"] = {**state["binding"], "tokenizer": "0" * 64}
    checkpoint.save(state, exp / "checkpoints" / "last.pt")
    config = toy_config(exp, train={"max_steps": 16})
    with pytest.raises(checkpoint.CheckpointError, match="another tokenizer"):
        train(config, resume=True, log=quiet)


def test_failed_prepare_leaves_the_previous_tokenizer_and_data(tmp_path):
    exp = tmp_path / "exp"
    prepare(toy_config(exp), log=quiet)
    before = snapshot(exp / "tokenizer") | snapshot(exp / "data")
    # byte fallback alone needs 260 pieces: SentencePiece cannot train this
    impossible = toy_config(exp, tokenizer={"vocab_size": 100, "byte_fallback": True})
    with pytest.raises(ValueError, match="SentencePiece could not train"):
        prepare(impossible, log=quiet)
    assert snapshot(exp / "tokenizer") | snapshot(exp / "data") == before
    assert not [p for p in exp.iterdir() if p.name.startswith(".tmp-")]


def test_demo_never_deletes_an_earlier_run(trained, tmp_path):
    from rosetta.demo import run_demo

    exp = copy_run(trained, tmp_path / "exp")
    before = snapshot(exp)
    bleu = run_demo(toy_config(exp, train={"max_steps": 4, "valid_every": 4}))
    assert 0 <= bleu <= 100
    assert snapshot(exp) == before
    assert (tmp_path / "exp-2" / "model" / "model.safetensors").exists()


def test_resuming_a_finished_run_trains_nothing(trained, tmp_path):
    exp = copy_run(trained, tmp_path / "exp")
    before = snapshot(exp / "checkpoints")
    logged: list[str] = []
    train(toy_config(exp), resume=True, log=logged.append)
    assert any("already finished" in line for line in logged)
    assert snapshot(exp / "checkpoints") == before
    assert json.loads((exp / "model" / "metadata.json").read_text())["steps"] == 12


# --- foreign code ---------------------------------------------------------------------


class _Payload:
    """Pickles to a call of os.makedirs: what a crafted checkpoint would run."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_a_crafted_checkpoint_runs_no_code(trained, tmp_path):
    exp = copy_run(trained, tmp_path / "exp")
    marker = tmp_path / "pwned"
    path = exp / "checkpoints" / "last.pt"
    # a valid header and checksum around a malicious pickle: only the unpickler stands between
    checkpoint.save({"model": {}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refuses to run code"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="refuses to run code"):
        train(toy_config(exp, train={"max_steps": 16}), resume=True, log=quiet)
    # a plain torch.save file (no header), as older tools write it, is refused before reading
    buffer = io.BytesIO()
    torch.save({"payload": _Payload(str(marker))}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(checkpoint.CheckpointError, match="not a rosetta checkpoint"):
        checkpoint.load(path)
    assert not marker.exists()


# --- damaged files and non-finite numbers ---------------------------------------------


def damage(path: Path, offset_fraction: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    middle = int(len(data) * offset_fraction)
    data[middle : middle + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_a_damaged_last_checkpoint_is_refused_and_previous_offered(trained, tmp_path):
    exp = copy_run(trained, tmp_path / "exp")
    damage(exp / "checkpoints" / "last.pt")
    config = toy_config(exp, train={"max_steps": 16})
    with pytest.raises(checkpoint.CheckpointError) as error:
        train(config, resume=True, log=quiet)
    message = str(error.value)
    assert "damaged" in message and "resume from step 8 with --resume" in message
    assert "previous.pt" in message
    model_dir = train(config, resume=exp / "checkpoints" / "previous.pt", log=quiet)
    assert json.loads((model_dir / "metadata.json").read_text())["steps"] == 16


def test_nonfinite_batches_are_skipped_and_counted(trained, tmp_path, monkeypatch):
    from rosetta.train.objectives import TeacherForcing

    exp = tmp_path / "exp"
    for name in ("corpus", "tokenizer", "data"):
        shutil.copytree(trained / name, exp / name)
    real = TeacherForcing.loss
    calls = {"n": 0}

    def sometimes_nan(objective, model, batch, step):
        terms = real(objective, model, batch, step)
        calls["n"] += 1
        if calls["n"] in (3, 4):
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(TeacherForcing, "loss", sometimes_nan)
    logged: list[str] = []
    model_dir = train(toy_config(exp, train={"valid_bleu": False}), log=logged.append)
    assert sum("skipped a batch" in line for line in logged) == 2
    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert metadata["steps"] == 12 and metadata["nonfinite_batches_skipped"] == 2
    _, _, model = load_model_dir(model_dir)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_only_nonfinite_losses_stop_training_with_a_message(trained, tmp_path, monkeypatch):
    from rosetta.train.objectives import TeacherForcing

    exp = copy_run(trained, tmp_path / "exp")
    real = TeacherForcing.loss

    def always_nan(*args):
        terms = real(*args)
        return {**terms, "loss": terms["loss"] * float("nan")}

    monkeypatch.setattr(TeacherForcing, "loss", always_nan)
    before = snapshot(exp / "checkpoints")
    config = toy_config(exp, train={"max_steps": 30, "max_nonfinite": 3})
    with pytest.raises(TrainingError, match="3 batches in a row gave a NaN"):
        train(config, resume=True, log=quiet)
    assert snapshot(exp / "checkpoints") == before


def test_no_model_directory_from_nonfinite_weights(trained, tmp_path):
    config, _, model = load_model_dir(trained / "model")
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    target = tmp_path / "model"
    with pytest.raises(ModelDirError, match="NaN or infinity"):
        save_model_dir(target, config, trained / "model", model, {})
    assert not target.exists()


def test_a_damaged_checkpoint_cannot_be_averaged(trained, tmp_path):
    from rosetta.train.average import average_into_model_dir

    exp = copy_run(trained, tmp_path / "exp")
    before = snapshot(exp / "model")
    damage(checkpoint.step_checkpoints(exp / "checkpoints")[-1])
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        average_into_model_dir(toy_config(exp), 2, log=quiet)
    assert snapshot(exp / "model") == before


# --- model directories whose parts don't match ----------------------------------------


@pytest.fixture
def model_dir(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained / "model", tmp_path / "model"))


def test_config_that_does_not_describe_the_weights(model_dir):
    path = model_dir / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data["model"]["heads"] = 4  # 2-head weights: same shapes, other model
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ModelDirError, match=r"model\.heads: 4 in config\.yaml, 2 in model"):
        load_model_dir(model_dir)


def test_decode_settings_may_be_edited(model_dir):
    path = model_dir / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data["decode"]["beam"] = 7
    path.write_text(yaml.safe_dump(data))
    config, _, _ = load_model_dir(model_dir)
    assert config.decode.search["beam"] == 7


def test_another_sentencepiece_model_is_refused(model_dir, tmp_path):
    other = Tokenizer.train(
        [("one two three", "unu du tri")] * 50,
        tmp_path / "other",
        vocab_size=40,
        byte_fallback=False,
    )
    for name in other.files():
        shutil.copyfile(tmp_path / "other" / name, model_dir / name)
    with pytest.raises(ModelDirError, match=r"spm\.model"):
        load_model_dir(model_dir)
    # without checksums (an older model directory) the fingerprint still catches it
    metadata = json.loads((model_dir / "metadata.json").read_text())
    del metadata["sha256"]
    (model_dir / "metadata.json").write_text(json.dumps(metadata))
    with (
        pytest.warns(UserWarning, match="no checksums"),
        pytest.raises(ModelDirError, match=r"not the one model\.safetensors was trained with"),
    ):
        load_model_dir(model_dir)


@pytest.mark.parametrize(
    ("name", "contents", "message"),
    [
        ("model.safetensors", None, "model.safetensors is damaged"),
        ("model.safetensors", b"", "model.safetensors is damaged"),
        ("spm.model", b"garbage" * 20, "spm.model is damaged"),
        ("config.yaml", b"model: [unclosed\n", "not valid YAML"),
        ("metadata.json", b"{not json", "metadata.json is not valid JSON"),
    ],
)
def test_damaged_model_directory_files_are_named(model_dir, name, contents, message):
    if contents is None:
        damage(model_dir / name)
    else:
        (model_dir / name).write_bytes(contents)
    with pytest.raises(ModelDirError, match=message):
        load_model_dir(model_dir)


def test_without_checksums_damaged_parts_still_give_clear_errors(model_dir, trained):
    metadata = json.loads((model_dir / "metadata.json").read_text())
    del metadata["sha256"]
    (model_dir / "metadata.json").write_text(json.dumps(metadata))
    (model_dir / "spm.model").write_bytes(b"garbage" * 20)
    with pytest.warns(UserWarning), pytest.raises(ModelDirError, match="not a SentencePiece"):
        load_model_dir(model_dir)
    shutil.copyfile(trained / "model" / "spm.model", model_dir / "spm.model")
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ModelDirError, match="not readable"):
        load_model_dir(model_dir)


# --- interruptions: signals and kill -9 ------------------------------------------------


def write_config(tmp_path: Path, exp: Path, **train) -> Path:
    config = toy_config(
        exp,
        train={"max_steps": 40, "valid_every": 10, "threads": 1, "valid_bleu": False, **train},
    )
    path = tmp_path / f"{exp.name}.yaml"
    path.write_text(config.to_yaml())
    return path


# A training process whose checkpoint writes can be made slow, to be killed inside one.
RUNNER = textwrap.dedent(
    """
    import os, sys, time
    import rosetta.train.checkpoint as checkpoint
    from rosetta.cli import main

    step_seconds = float(os.environ.get("SLOW_STEP", "0"))
    if step_seconds:  # slower steps, same numbers: time to send a signal mid-run
        from rosetta.train.objectives import TeacherForcing

        loss = TeacherForcing.loss

        def slow_loss(*args):
            time.sleep(step_seconds)
            return loss(*args)

        TeacherForcing.loss = slow_loss

    slow = os.environ.get("SLOW_WRITE_MARKER")
    if slow:
        real = checkpoint.write_chunks_atomic

        def slow_write(path, chunks):
            def trickle():
                for chunk in chunks:
                    half = len(chunk) // 2
                    yield bytes(chunk[:half])
                    if path.name == "last.pt" and os.path.exists(path):
                        open(slow, "w").close()  # the second last.pt write is under way
                        time.sleep(60)
                    yield bytes(chunk[half:])
            real(path, trickle())

        checkpoint.write_chunks_atomic = slow_write
    sys.exit(main(sys.argv[1:]))
    """
)


def start_training(config: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, "train", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def train_steps_logged(exp: Path) -> int:
    path = exp / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"type": "train"' in line for line in path.read_text().splitlines())


def final_weights(exp: Path) -> dict[str, torch.Tensor]:
    state = checkpoint.load(exp / "checkpoints" / "last.pt")
    assert state["progress"]["step"] == 40
    return state["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, trained):
    """The 40-step run every interrupted run must end identical to (same process setup)."""
    tmp_path = tmp_path_factory.mktemp("straight")
    exp = tmp_path / "straight"
    for name in ("corpus", "tokenizer", "data"):
        shutil.copytree(trained / name, exp / name)
    process = start_training(write_config(tmp_path, exp))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return final_weights(exp), trained


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_last_and_resume_is_bit_identical(uninterrupted, tmp_path, signum):
    reference, trained = uninterrupted
    exp = tmp_path / "exp"
    for name in ("corpus", "tokenizer", "data"):
        shutil.copytree(trained / name, exp / name)
    config = write_config(tmp_path, exp)
    process = start_training(config, env={"SLOW_STEP": "0.1"})
    wait_for(lambda: train_steps_logged(exp) >= 7)  # step 14: past the step-10 validation
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert "saved" in err and "continue with --resume" in err
    stopped_at = checkpoint.load(exp / "checkpoints" / "last.pt")["progress"]["step"]
    assert 14 <= stopped_at < 40  # saved at the signal, not only at a validation
    process = start_training(config, "--resume")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert_same_weights(final_weights(exp), reference)


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_is_bit_identical(uninterrupted, tmp_path):
    reference, trained = uninterrupted
    exp = tmp_path / "exp"
    for name in ("corpus", "tokenizer", "data"):
        shutil.copytree(trained / name, exp / name)
    config = write_config(tmp_path, exp)

    # 1. killed half-way through writing last.pt (its second write, after step 20)
    marker = tmp_path / "writing"
    process = start_training(config, env={"SLOW_WRITE_MARKER": str(marker)})
    wait_for(marker.exists)
    process.kill()
    process.wait()
    leftovers = [p.name for p in (exp / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the kill should have left a half-written temporary file"
    assert checkpoint.load(exp / "checkpoints" / "last.pt")["progress"]["step"] == 10

    # 2. killed between validations, from that resumed state
    process = start_training(config, "--resume", env={"SLOW_STEP": "0.05"})
    wait_for(lambda: train_steps_logged(exp) >= 5 + 10)  # past step 20 again
    process.kill()
    process.wait()
    assert checkpoint.load(exp / "checkpoints" / "last.pt")["progress"]["step"] in (10, 20, 30)

    # 3. resumed to the end
    process = start_training(config, "--resume")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert not [p for p in (exp / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert_same_weights(final_weights(exp), reference)


def test_resume_with_a_changed_model_names_the_change(trained, tmp_path):
    exp = copy_run(trained, tmp_path / "exp")
    config = toy_config(exp, model={"d_ff": 96}, train={"max_steps": 16})
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.d_ff was 64.*says 96"):
        train(config, resume=True, log=quiet)
