"""Learning-rate schedules (SPEC §1 step 10).

``noam`` is the paper's lr = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5):
linear warm-up to a peak of (d_model · warmup)^-0.5, then decay with the
inverse square root of the step. ``inverse_sqrt`` (fairseq's name) is the same
curve; with ``train.lr`` set, either one peaks at that value instead.
``constant`` warms up linearly to ``train.lr`` and stays there; ``plateau``
(the usual choice for RNNs) does the same, and the trainer multiplies the rate
by ``train.plateau_factor`` whenever validation stops improving for
``train.plateau_patience`` validations.
"""

from __future__ import annotations

import math


def learning_rate(
    step: int, schedule: str, d_model: int, warmup: int, peak: float | None = None
) -> float:
    """The learning rate for optimizer step ``step`` (counted from 1)."""
    step = max(step, 1)
    if schedule in ("constant", "plateau"):
        return (peak or 1e-3) * min(1.0, step / warmup)
    if schedule not in ("noam", "inverse_sqrt"):
        raise ValueError(f"unknown schedule {schedule!r}")
    paper = d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    if peak is None:
        return paper
    return paper * peak * math.sqrt(d_model * warmup)
