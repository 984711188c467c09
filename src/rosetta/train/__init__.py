"""Training: loss, learning-rate schedule, checkpoints, averaging and the loop."""
