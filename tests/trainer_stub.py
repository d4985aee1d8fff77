"""A tiny stand-in task for the trainer tests, also runnable as a script (subprocess, DDP).

    python tests/trainer_stub.py OUT [--max-steps N] [--resume] ...  (or via accelerate launch)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from univigu.training import Trainer, TrainerConfig  # noqa: E402


class Regression(Dataset):
    """y = a fixed random linear map of x plus a nonlinearity; deterministic in the index."""

    def __init__(self, n: int = 512, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = self.x @ w + 0.5 * torch.sin(3 * self.x[:, :1])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class MLPTask(nn.Module):
    """MSE on inputs perturbed with noise from the trainer's generator; optional dropout, NaNs
    at chosen forward calls, and a sleep per call (to have time to kill a subprocess)."""

    def __init__(self, dim: int = 8, noise: float = 0.1, dropout: float = 0.1,
                 nan_calls: frozenset[int] = frozenset(), sleep: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(dim, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 1)
        )
        self.noise, self.nan_calls, self.sleep, self.calls = noise, nan_calls, sleep, 0

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        x = batch["x"]
        x = x + self.noise * torch.randn(x.shape, generator=generator, device=x.device)
        err = self.net(x) - batch["y"]
        loss = F.mse_loss(err, torch.zeros_like(err))
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        return {"loss": loss, "mae": err.abs().mean()}


def config(out: str | Path, **kw) -> TrainerConfig:
    base = dict(output_dir=str(out), max_steps=30, batch_size=8, lr=3e-3, weight_decay=0.01,
                warmup_steps=5, save_every=10, keep_last=2, log_every=1, seed=0)  # fmt: skip
    return TrainerConfig(**{**base, **kw})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=None)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = config(a.out, max_steps=a.max_steps, save_every=a.save_every, batch_size=a.batch_size,
                 grad_accum=a.grad_accum, ema_decay=a.ema)  # fmt: skip
    task = MLPTask(noise=a.noise, dropout=a.dropout, sleep=a.sleep)
    Trainer(task, Regression(), cfg).train(resume=a.resume)


if __name__ == "__main__":
    main()
