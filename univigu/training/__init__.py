"""Training: a task-agnostic trainer (`trainer`, with the task contract), the losses of each stage (`tasks`),
the stages' configs (`config`) and runner (`stages`), checkpoints (`checkpoint`) and EMA (`ema`)."""

from univigu.training.trainer import ResumeError, Trainer, TrainerConfig

__all__ = ["ResumeError", "Trainer", "TrainerConfig"]
