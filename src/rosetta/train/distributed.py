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
"""

from __future__ import annotations

import contextlib
import datetime
import os
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
    """A model's ``training_loss`` as ``forward``: DDP synchronises gradients through
    the module it wraps, so the loss must be computed by calling it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any, label_smoothing: float, **options: Any) -> dict:
        return self.model.training_loss(batch, label_smoothing, **options)


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

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose ``forward`` is the training loss: DDP around it when
        several processes train (it copies rank 0's weights to every process)."""
        module = LossModule(model)
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


def launch(
    train_args: list[str],
    processes: int,
    nodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
) -> int:
    """Runs ``rosetta train TRAIN_ARGS`` as ``processes`` processes on this machine
    (one of ``nodes`` machines) through ``torchrun``; returns its exit status.

    The machine of ``node_rank`` 0 hosts the rendezvous at ``master_addr:
    master_port``: a port in use there is a ``DistributedError`` before anything
    starts. Ctrl-C reaches torchrun, which passes it to every process; they stop
    at the same update and rank 0 saves ``last.pt`` (then ``KeyboardInterrupt``).
    """
    import signal
    import socket
    import subprocess
    import sys

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
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={processes}", f"--nnodes={nodes}", f"--node-rank={node_rank}",
        f"--master-addr={master_addr}", f"--master-port={master_port}",
        "-m", "rosetta", "train", *train_args,
    ]  # fmt: skip
    environment = dict(os.environ)
    if master_addr in ("127.0.0.1", "localhost"):
        environment.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: loopback only
    interrupted: list[int] = []
    # Ctrl-C reaches torchrun too (same process group), which hands it on
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: interrupted.append(signum))
    try:
        status = subprocess.run(command, env=environment).returncode
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt  # the processes have said where they stopped
    return status
