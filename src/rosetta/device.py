"""Which device a command runs on: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

One rule for training, translation, evaluation and the service: ``auto`` takes
the first CUDA device when there is one, else the CPU. Under ``torchrun`` each
process takes the GPU of its local rank (``auto`` or ``cuda``); naming one GPU
for every process is refused, since they would all share it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def check_device_name(text: str) -> str:
    """``text`` if it is a device setting, else a ``ValueError`` listing the forms."""
    if not re.fullmatch(DEVICE_PATTERN, text):
        raise ValueError(f"device {text!r}: expected auto, cpu, cuda or cuda:N")
    return text


def resolve_device(setting: str, local_rank: int | None = None) -> torch.device:
    """The device ``setting`` names on this machine, checked against it.

    ``local_rank`` is this process's index on its machine when several run
    (torchrun's ``LOCAL_RANK``); it picks the GPU for ``auto`` and ``cuda``.
    """
    import torch  # lazily: reading a configuration does not need it

    check_device_name(setting)
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {setting}: CUDA is not available on this machine (use cpu)")
    count = torch.cuda.device_count()
    if ":" in setting:
        if local_rank is not None:
            raise ValueError(
                f"device {setting}: with several processes each takes the GPU of its local "
                "rank; use cuda or auto"
            )
        index = int(setting.split(":")[1])
    else:
        index = local_rank or 0
    if index >= count:
        raise ValueError(f"device {setting}: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)
