"""torch's intra-op thread count for a block: runs in the test's process compared with launched processes
(OMP_NUM_THREADS=1) must compute as they do, and tests must leave the count as they found it."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """`torch.set_num_threads(n)` inside the block, the count before it after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
