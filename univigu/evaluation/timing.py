"""Timing for the speed figures (`univigu model bench`, `bench-v2t`, `benchmarks/wan_scale.py`)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def synchronizer(device: str) -> Callable[[], None]:
    """What waits for queued device work before a clock is read (CUDA runs asynchronously)."""
    import torch

    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def interleaved_medians(fns: dict[str, Callable[[], object]], steps: int, warmup: int,
                        sync: Callable[[], None] = lambda: None) -> dict[str, float]:  # fmt: skip
    """Median seconds per function over `steps` rounds after `warmup` untimed ones. Rounds alternate between the
    functions, so a burst of load from other processes on a shared CPU hits all of them alike instead of skewing
    one. `sync` waits for queued device work."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
