"""Training on several processes (DDP with gloo through torchrun, on this CPU).

Each launch goes through ``rosetta train --nproc-per-node N`` (which runs
torchrun) with a tiny model, so the file costs about a minute. The weights are
compared under a setting where they are a sensitive, noise-free function of the
gradients: no dropout, and Adam with ``eps = 1`` (close to plain gradient
descent: a wrong loss scale or a missed gradient shows, a last-bit rounding
difference does not flip an update's sign).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import copy_prepared, toy_config
from rosetta.data.prepare import prepare
from rosetta.decode.translator import Translator
from rosetta.device import check_device_name, resolve_device
from rosetta.train import checkpoint
from rosetta.train.distributed import job_processes
from rosetta.train.trainer import train

STEPS = 6


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sensitive_config(experiment_dir: Path, **train_options):
    return toy_config(
        experiment_dir,
        model={"dropout": 0.0},
        train={
            "lr": 0.5,
            "eps": 1.0,
            "schedule": "constant",
            "max_steps": STEPS,
            "valid_every": 3,
            "valid_bleu": False,
            "threads": 1,
            **train_options,
        },
    )


def write_config(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    return path


def rosetta_train(*arguments: str, port: int | None = None, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "rosetta", "train", *arguments]
    if port is not None:
        command += ["--master-port", str(port)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process taking two batches per update (accumulation), uninterrupted."""
    experiment = tmp_path_factory.mktemp("ddp") / "single"
    config = sensitive_config(experiment, accumulate=2)
    prepare(config)
    train(config, log=lambda *_: None)
    return experiment


def test_two_processes_train_what_one_trains_with_accumulation(single, tmp_path):
    experiment = tmp_path / "two"
    copy_prepared(single, experiment)
    config = write_config(sensitive_config(experiment), tmp_path / "two.yaml")
    status, output = finish(rosetta_train(config, "--nproc-per-node", "2", port=free_port()))
    assert status == 0, output
    assert "2 processes" in output

    two, one = weights(experiment / "checkpoints/last.pt"), weights(single / "checkpoints/last.pt")
    moved = max_difference(one, weights(single / "checkpoints/step_3.pt"))
    assert moved > 1e-2  # the comparison below can fail
    assert max_difference(two, one) < 1e-5
    # only rank 0 wrote: one metrics record per logged step, one line per message
    records = [line for line in (experiment / "metrics.jsonl").read_text().splitlines()]
    assert sum('"type": "train"' in r for r in records) == STEPS // 2
    assert output.count("model directory:") == 1
    # the model directory of a 2-process run loads and translates in this process
    translator = Translator.load(experiment / "model", beam=1)
    assert len(translator.translate(["a b", "c"])) == 2


def test_a_two_machine_checkpoint_resumes_in_one_process(single, tmp_path):
    """Two "machines" (node ranks 0 and 1 on this host, one process each) train half
    the steps; one process with accumulation finishes them and ends where the
    uninterrupted run ended (the data position is kept in global batches)."""
    experiment = tmp_path / "nodes"
    copy_prepared(single, experiment)
    config = write_config(sensitive_config(experiment, max_steps=3), tmp_path / "nodes.yaml")
    port = free_port()
    nodes = [
        rosetta_train(config, "--nproc-per-node=1", "--nnodes=2", f"--node-rank={rank}", port=port)
        for rank in (0, 1)
    ]
    results = [finish(node) for node in nodes]
    assert [status for status, _ in results] == [0, 0], results
    assert checkpoint.load(experiment / "checkpoints/last.pt")["progress"]["step"] == 3

    resumed = sensitive_config(experiment, accumulate=2)
    train(resumed, resume=True, log=lambda *_: None)
    final = weights(experiment / "checkpoints/last.pt")
    assert max_difference(final, weights(single / "checkpoints/last.pt")) < 1e-5


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def trained_steps(experiment: Path) -> int:
    metrics = experiment / "metrics.jsonl"
    return metrics.read_text().count('"type": "train"') if metrics.exists() else 0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def rank_processes(launcher: subprocess.Popen) -> dict[int, int]:
    """pid of each training process that ``launcher`` started through torchrun."""
    found = {}
    for torchrun in children(launcher.pid):
        for pid in children(torchrun):
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next(item for item in environment if item.startswith(b"RANK="))
            found[int(rank.split(b"=")[1])] = pid
    return found


def long_run(single: Path, tmp_path: Path, name: str) -> tuple[Path, subprocess.Popen]:
    """A 2-process run that goes on until stopped, in a session of its own."""
    experiment = tmp_path / name
    copy_prepared(single, experiment)
    config = write_config(
        sensitive_config(experiment, max_steps=1_000_000, valid_every=50, log_every=1),
        tmp_path / f"{name}.yaml",
    )
    launcher = rosetta_train(
        config, "--nproc-per-node", "2", port=free_port(), start_new_session=True
    )
    return experiment, launcher


def test_a_killed_process_stops_the_others_with_a_message(single, tmp_path):
    experiment, launcher = long_run(single, tmp_path, "killed")
    try:
        wait_for(lambda: trained_steps(experiment) >= 3, timeout=120)
        ranks = rank_processes(launcher)
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        status, output = finish(launcher, timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert time.monotonic() - killed_at < 60
    assert status == 2
    assert "process 0 of 2 stopped" in output
    assert "continue with --resume" in output
    assert output.strip().splitlines()[-1].startswith("rosetta train: error: the 2 training")


def test_ctrl_c_stops_every_process_at_one_step_and_saves(single, tmp_path):
    experiment, launcher = long_run(single, tmp_path, "stopped")
    try:
        wait_for(lambda: trained_steps(experiment) >= 3, timeout=120)
        os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        status, output = finish(launcher, timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert status == 130, output
    assert output.count("stopped by SIGINT") == 1, output
    state = checkpoint.load(experiment / "checkpoints/last.pt")
    step = state["progress"]["step"]
    assert step >= 3 and len(state["rank_rngs"]) == 1
    resumed = sensitive_config(experiment, max_steps=step + 2, log_every=1)
    train(resumed, resume=True, log=lambda *_: None)
    assert checkpoint.load(experiment / "checkpoints/last.pt")["progress"]["step"] == step + 2


def job_of(launcher: subprocess.Popen) -> tuple[str, list[int]]:
    """The job tag of ``launcher``'s run ("" if none) and the pids of torchrun and the
    training processes, read from /proc while they run."""
    ranks = rank_processes(launcher)
    assert sorted(ranks) == [0, 1]
    environment = Path(f"/proc/{ranks[0]}/environ").read_bytes().split(b"\0")
    tag = next((item for item in environment if item.startswith(b"ROSETTA_JOB=")), b"=")
    return tag.split(b"=", 1)[1].decode(), [*children(launcher.pid), *ranks.values()]


def left_over(tag: str) -> list[int]:
    """The processes of the job tagged ``tag`` still running."""
    return alive(job_processes(tag)) if tag else []


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie has ended)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.append(pid)
    return running


def stop_job(launcher: subprocess.Popen, pids: list[int]) -> None:
    """Cleanup, whatever the test found: nothing of the run outlives it."""
    for pid in [launcher.pid, *alive(pids)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        launcher.communicate(timeout=30)


def test_sigterm_to_the_launcher_stops_the_whole_job_which_resumes(single, tmp_path):
    """Only the launcher is signalled (as a scheduler or ``kill PID`` would): it hands
    the signal on, returns once torchrun and every process have ended, 143."""
    experiment, launcher = long_run(single, tmp_path, "terminated")
    pids: list[int] = []
    try:
        wait_for(lambda: trained_steps(experiment) >= 3, timeout=120)
        tag, pids = job_of(launcher)
        os.kill(launcher.pid, signal.SIGTERM)
        status, output = finish(launcher, timeout=120)
        left = alive(pids)  # the launcher has ended: nothing of its job may remain
    finally:
        stop_job(launcher, pids)
    assert status == 143, output
    assert left == [] and left_over(tag) == []
    assert output.count("stopped by SIGTERM") == 1, output  # rank 0 saved at one step
    assert output.strip().splitlines()[-1] == (
        "rosetta train: every training process has ended (SIGTERM); continue with --resume"
    )
    assert "Traceback" not in output
    step = checkpoint.load(experiment / "checkpoints/last.pt")["progress"]["step"]
    assert step >= 3
    resumed = sensitive_config(experiment, max_steps=step + 2, log_every=1)
    train(resumed, resume=True, log=lambda *_: None)
    assert checkpoint.load(experiment / "checkpoints/last.pt")["progress"]["step"] == step + 2


def test_a_killed_launcher_takes_its_job_with_it(single, tmp_path):
    """SIGKILL cannot be handed on: torchrun and the processes get SIGTERM from Linux
    when the process that started them dies, save and end instead of training on."""
    experiment, launcher = long_run(single, tmp_path, "orphaned")
    pids: list[int] = []
    try:
        wait_for(lambda: trained_steps(experiment) >= 3, timeout=120)
        tag, pids = job_of(launcher)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        wait_for(lambda: not alive(pids), timeout=90)  # nobody trains on
        assert left_over(tag) == []
    finally:
        stop_job(launcher, pids)
    assert checkpoint.load(experiment / "checkpoints/last.pt")["progress"]["step"] >= 3


def test_a_second_signal_ends_the_job_at_once(single, tmp_path):
    experiment, launcher = long_run(single, tmp_path, "twice")
    pids: list[int] = []
    try:
        wait_for(lambda: trained_steps(experiment) >= 3, timeout=120)
        tag, pids = job_of(launcher)
        os.kill(launcher.pid, signal.SIGINT)  # Ctrl-C ...
        os.kill(launcher.pid, signal.SIGTERM)  # ... and before the step ends, another
        signalled = time.monotonic()
        status, output = finish(launcher, timeout=60)
        left = alive(pids)
    finally:
        stop_job(launcher, pids)
    assert time.monotonic() - signalled < 20
    assert status == 130, output
    assert left == [] and left_over(tag) == []
    assert "stopped by SIGINT" not in output  # killed, not stopped at a step


def test_a_port_in_use_is_one_line(tmp_path):
    config = write_config(sensitive_config(tmp_path / "exp"), tmp_path / "port.yaml")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, output = finish(rosetta_train(config, "--nproc-per-node", "2", port=port))
    assert status == 2
    assert output.strip() == (
        f"rosetta train: error: cannot host the rendezvous at 127.0.0.1:{port} (Address "
        "already in use): pick a free port with --master-port"
    )
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("setting", ["gpu", "cuda:", "CPU", "cuda:x"])
def test_device_names_are_checked(setting):
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        check_device_name(setting)


def test_a_missing_gpu_is_a_clear_error(tmp_path, untrained_model_dir, monkeypatch):
    """Any machine: CUDA is hidden from this process and from the commands it runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")
    # the configuration key, checked when the run starts
    config = sensitive_config(tmp_path / "e")
    config.train.device = "cuda"
    with pytest.raises(ValueError, match="device cuda: CUDA is not available"):
        train(config)
    # the command-line option, checked before anything loads
    config = write_config(sensitive_config(tmp_path / "e"), tmp_path / "c.yaml")
    hidden = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for command in (["train", str(config)], ["translate", str(untrained_model_dir)]):
        result = subprocess.run(
            [sys.executable, "-m", "rosetta", *command, "--device", "cuda"],
            capture_output=True, text=True, input="a b\n", env=hidden,
        )  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.strip().endswith(
            "argument --device: device cuda: CUDA is not available on this machine (use cpu)"
        ), result.stderr
