"""Training engine: loop, schedules, optimizers, checkpoints and distributed helpers."""
