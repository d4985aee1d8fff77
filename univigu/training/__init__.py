"""Training: a task-agnostic trainer (see `univigu.training.trainer` for the task contract)."""

from univigu.training.trainer import Trainer, TrainerConfig

__all__ = ["Trainer", "TrainerConfig"]
