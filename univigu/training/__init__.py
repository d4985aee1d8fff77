"""Training: a task-agnostic trainer (see `univigu.training.trainer` for the task contract)."""

from univigu.training.trainer import ResumeError, Trainer, TrainerConfig

__all__ = ["ResumeError", "Trainer", "TrainerConfig"]
