"""Exponential moving average of the trainable weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """fp32 shadow copies of the given parameters, as this process holds them.

    Under DDP these are whole tensors; under FSDP they are this process's local shards, so the
    state is per process and a full EMA model is gathered by swapping the shadows in
    (`swapped()`) and taking the wrapped model's full state dict.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]]) -> None:
        self.params = dict(named_params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for n, p in self.params.items():
            if decay == 0.0:  # before ema_start: track the weights exactly
                self.shadow[n].copy_(p.detach())
            else:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)

    @contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the parameters (e.g. to export or evaluate)."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        for n, p in self.params.items():
            p.copy_(self.shadow[n])
        try:
            yield
        finally:
            for n, p in self.params.items():
                p.copy_(backup[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.cpu() for n, s in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
            raise KeyError(f"EMA state mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for n, s in state.items():
            self.shadow[n].copy_(s)
