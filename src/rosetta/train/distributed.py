"""Training on several processes: PyTorch DDP, launched by ``torchrun``.

``torchrun`` starts the processes and puts ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in each one's environment;
``Context.from_environment`` joins the process group (gloo on CPUs, NCCL on
GPUs). Started any other way it is one process, every collective below is a
no-op, and the trainer runs the same code.

How the work is shared (``rosetta.train.trainer`` uses this context):

- **data**: every process builds the same global batch order (a pure function of
  seed and epoch); each update takes the next ``accumulate x world_size`` batches
  of it and process ``r`` trains on its ``accumulate`` of them, so one update
  means the same data whatever the world size (``BatchIterator.updates``);
- **gradients**: DDP averages them over processes; the trainer scales each
  process's loss by ``world_size / the update's tokens`` so the result is the
  single-process gradient of the same batches. Micro-batches before the last
  one of an update run under ``no_sync``;
- **agreement**: one small all-reduce per update carries the loss sum (so every
  process skips a non-finite batch alike), any stop request (a signal on one
  process stops all at the same update) and rank 0's clock (a time budget ends
  at the same update everywhere);
- **rank 0 alone** validates, writes checkpoints, metrics and the model
  directory, logs and shows the progress bar; the others wait in a broadcast of
  the training progress, which is also the barrier after each checkpoint write.

A process that dies (or is killed) breaks the next collective on the others,
and ``torchrun`` stops them: each raises ``DistributedError`` with one line.

``launch`` (``rosetta train --nproc-per-node``) starts ``torchrun`` and stays
until the whole job has ended: a signal it receives reaches every process, and
should it die, the job gets SIGTERM from Linux rather than training on unseen.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rosetta.device import resolve_device

# how long a collective may wait for the others (rank 0 validating, say) before
# failing; a dead process is noticed long before, when its connections close
TIMEOUT = datetime.timedelta(minutes=30)


class DistributedError(RuntimeError):
    """The processes of a distributed run lost each other; the message says what to do."""


class LossModule(torch.nn.Module):
    """The training objective's ``loss`` of the model as ``forward``: DDP synchronises
    gradients through the module it wraps, so the loss must be computed by calling
    it. ``objective`` is a ``rosetta.train.objectives.Objective``; it holds no
    parameters (DDP sees the model's alone)."""

    def __init__(self, model: torch.nn.Module, objective: Any) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        return self.objective.loss(self.model, batch, step)


@dataclass
class Context:
    """This process's place in the run: rank, world size and device."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    @contextlib.contextmanager
    def from_environment(cls, device: str = "auto") -> Iterator[Context]:
        """This process's context, joining torchrun's process group for the duration
        when ``WORLD_SIZE`` > 1; ``device`` is auto, cpu, cuda or cuda:N."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            yield cls(resolve_device(device))
            return
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        if not _die_with_parent():
            raise DistributedError(f"process {rank}: the torchrun that started it has ended")
        place = resolve_device(device, local_rank)
        if place.type == "cuda":
            torch.cuda.set_device(place)
        backend = "nccl" if place.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as error:
            raise DistributedError(
                f"process {rank} could not join the others at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: "
                f"{_first_line(error)}"
            ) from None
        try:
            yield cls(place, rank, world_size, local_rank)
        finally:
            dist.destroy_process_group()

    # ---- the model -------------------------------------------------------

    def wrap(self, model: torch.nn.Module, objective: Any) -> torch.nn.Module:
        """The module whose ``forward(batch, step)`` is ``objective``'s training loss of
        ``model``: DDP around it when several processes train (it copies rank 0's
        weights to every process)."""
        module = LossModule(model, objective)
        if not self.distributed:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        with self.guard():
            return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def accumulating(
        self, module: torch.nn.Module, last: bool
    ) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: gradients are averaged over
        processes (in the backward) only on the ``last`` micro-batch of an update."""
        if self.distributed and not last:
            return module.no_sync()
        return self.guard()

    def seed_for_rank(self, seed: int, step: int = 0) -> None:
        """Gives processes other than rank 0 their own random stream (dropout), a
        function of (seed, rank, step); rank 0 keeps the single-process one."""
        if self.rank:
            state = np.random.SeedSequence([seed, self.rank, step]).generate_state(1)
            torch.manual_seed(int(state[0]))

    # ---- agreement -------------------------------------------------------

    def agree(self, loss: torch.Tensor, stop: bool, clock: float) -> tuple[bool, bool, float]:
        """(the update's loss is finite on every process, some process was asked to
        stop, rank 0's clock): one all-reduce."""
        if not self.distributed:
            return bool(torch.isfinite(loss)), stop, clock
        flags = torch.tensor([float(stop), clock if self.is_main else 0.0], dtype=torch.float64)
        values = torch.cat([loss.detach().double().reshape(1).cpu(), flags]).to(self.device)
        with self.guard():
            dist.all_reduce(values)
        finite, stops, main_clock = values.tolist()
        return bool(np.isfinite(finite)), stops > 0, main_clock

    def sum(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss terms summed over processes (for logging)."""
        if not self.distributed or not terms:
            return terms
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in terms.values()])
        values = values.to(self.device)
        with self.guard():
            dist.all_reduce(values)
        return dict(zip(terms, values.cpu(), strict=True))

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` in rank order (on every process)."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        with self.guard():
            dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process; returns only once rank 0 has sent it,
        so it is also a barrier after whatever rank 0 did before."""
        if not self.distributed:
            return value
        box = [value]
        with self.guard():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            with self.guard():
                dist.barrier()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around collectives: one that fails (typically because another process died
        or was stopped: gloo and NCCL raise a plain ``RuntimeError``) becomes a
        one-line ``DistributedError``."""
        if not self.distributed:
            yield
            return
        try:
            yield
        except RuntimeError as error:
            raise DistributedError(
                f"process {self.rank} of {self.world_size} stopped: {_first_line(error)} "
                "(when another process died or was stopped, torchrun's summary below names "
                "it); every process stops. Checkpoints on disk are complete: continue with "
                "--resume"
            ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---- launching ---------------------------------------------------------

# in the environment of every process of a launched job (torchrun and the
# training processes): its tag, and the pid of the process that started it
JOB_VARIABLE = "ROSETTA_JOB"
PARENT_VARIABLE = "ROSETTA_JOB_PARENT"
# how long torchrun gives the processes to finish their step and save after a
# signal before it kills them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, when set, wins)
SHUTDOWN_SECONDS = 300
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def launch(
    train_args: list[str],
    processes: int,
    nodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
) -> int:
    """Runs ``rosetta train TRAIN_ARGS`` as ``processes`` processes on this machine
    (one of ``nodes`` machines) through ``torchrun``, and waits for the job to end.

    The machine of ``node_rank`` 0 hosts the rendezvous at ``master_addr:
    master_port``: a port in use there is a ``DistributedError`` before anything
    starts; a node rank or port out of range is a ``ValueError``.

    Signals reach the whole job: torchrun runs in a session of its own (so a
    terminal's Ctrl-C reaches it once, through this process), and SIGINT, SIGTERM
    or SIGHUP here is handed to torchrun (SIGHUP as SIGTERM), which hands it to
    every process; they stop at the same update, rank 0 saves ``last.pt``, and
    this function returns once all have ended. A second signal kills the job at
    once. Should this process die, torchrun and the training processes get
    SIGTERM from Linux (``PR_SET_PDEATHSIG``) and stop the same way.

    Returns 0 when training ended, 128 + the signal the job was sent (SIGINT 130,
    SIGTERM 143) when a signal stopped it, else torchrun's status.
    """
    if processes < 1 or nodes < 1:
        raise ValueError(f"need at least one process and one machine, not {processes} and {nodes}")
    if not 0 <= node_rank < nodes:
        raise ValueError(
            f"node rank {node_rank} is out of range: with {nodes} machine(s) "
            f"--node-rank runs from 0 to {nodes - 1}"
        )
    if not 1 <= master_port <= 65535:
        raise ValueError(f"master port {master_port} is out of range: expected 1 to 65535")
    if node_rank == 0:
        with socket.socket() as probe:
            try:
                probe.bind((master_addr, master_port))
            except OSError as error:
                raise DistributedError(
                    f"cannot host the rendezvous at {master_addr}:{master_port} "
                    f"({error.strerror}): pick a free port with --master-port"
                ) from None
    command = [
        sys.executable, "-c", "from rosetta.train.distributed import torchrun; torchrun()",
        f"--nproc-per-node={processes}", f"--nnodes={nodes}", f"--node-rank={node_rank}",
        f"--master-addr={master_addr}", f"--master-port={master_port}",
        "-m", "rosetta", "train", *train_args,
    ]  # fmt: skip
    environment = dict(os.environ)
    if master_addr in ("127.0.0.1", "localhost"):
        environment.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: loopback only
    environment.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_SECONDS))
    environment[JOB_VARIABLE] = uuid.uuid4().hex
    environment[PARENT_VARIABLE] = str(os.getpid())
    return _Job(environment[JOB_VARIABLE]).run(command, environment)


class _Job:
    """torchrun as a child in a session of its own, the launcher's signals handed on
    to it, and the launcher waiting until no process of the job is left."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.signals: list[int] = []  # received here, in order
        self.process: subprocess.Popen | None = None
        self.sent = False  # the first signal has been handed on
        self.killed = False
        self.deadline = float("inf")  # for the processes torchrun left behind

    def run(self, command: list[str], environment: dict[str, str]) -> int:
        # the handlers only record; the loop below acts, so nothing happens twice
        main_thread = threading.current_thread() is threading.main_thread()
        handled = HANDLED_SIGNALS if main_thread else ()
        previous = {sig: signal.signal(sig, self._record) for sig in handled}
        try:
            self.process = subprocess.Popen(command, env=environment, start_new_session=True)
            status = self._wait(self.process.wait)
            # a training process torchrun left behind (torchrun was killed) stops on its
            # own (SIGTERM from Linux): wait for it too, killing it after a while
            self.deadline = time.monotonic() + SHUTDOWN_SECONDS
            self._wait(self._no_process_left)
        finally:
            if self.process is not None and self.process.poll() is None:
                self._kill()  # this function is leaving early: the job must not outlive it
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if status < 0:  # torchrun itself ended by a signal
            status = 128 - status
        if self.signals and status:
            status = 128 + self._forwarded()
        return status

    def _record(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)

    def _forwarded(self) -> int:
        """The signal the job gets for the first one received (SIGHUP: SIGTERM, which
        the training processes turn into a clean stop)."""
        return signal.SIGINT if self.signals[0] == signal.SIGINT else signal.SIGTERM

    def _wait(self, done: Any) -> Any:
        """``done(timeout)`` until it returns, acting on the signals meanwhile."""
        while True:
            if len(self.signals) > 1 and not self.killed:
                self._kill()
            elif self.signals and not self.sent:
                self.sent = True
                self.process.send_signal(self._forwarded())  # nothing once it has ended
            try:
                return done(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass

    def _no_process_left(self, timeout: float) -> bool:
        if not job_processes(self.tag):
            return True
        if time.monotonic() > self.deadline and not self.killed:
            self._kill()
        time.sleep(timeout)
        raise subprocess.TimeoutExpired("the training processes", timeout)

    def _kill(self) -> None:
        """SIGKILL to torchrun and every process of the job, found before any dies."""
        self.killed = True
        found = job_processes(self.tag)
        self.process.kill()  # nothing once it has ended
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def job_processes(tag: str) -> list[int]:
    """The live processes whose environment carries the job tag ``tag`` (Linux;
    elsewhere none are found)."""
    marker = f"{JOB_VARIABLE}={tag}".encode()
    found = []
    with contextlib.suppress(OSError):
        entries = os.listdir("/proc")
        for entry in entries:
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    if marker in environ.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:  # gone, or another user's
                continue
    return found


def _die_with_parent() -> bool:
    """In a process of a launched job: asks Linux to send it SIGTERM when the process
    that started it dies (the launcher for torchrun, torchrun for a training
    process); False when that process has died already. Elsewhere, or started some
    other way, it does nothing (True)."""
    parent = os.environ.get(PARENT_VARIABLE)
    if parent is None:
        return True
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the launcher's signals remain
            pass
    return os.getppid() == int(parent)


def torchrun() -> None:
    """The launcher's child: torchrun's ``main`` on ``sys.argv[1:]``, ending with the
    launcher, and exiting 128 + the signal (not a traceback) when one stops it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    if not _die_with_parent():
        sys.exit(128 + signal.SIGTERM)  # the launcher is gone already
    os.environ[PARENT_VARIABLE] = str(os.getpid())  # the training processes die with this one
    try:
        main(sys.argv[1:])
    except SignalException as stop:
        sys.exit(128 + int(stop.sigval))
    except ChildFailedError as failure:
        print(failure, file=sys.stderr)  # torchrun's summary, which names the first failure
        sys.exit(1)
