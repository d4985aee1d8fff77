"""The CUDA caching allocator's setting for long training runs."""

from __future__ import annotations

import os

ALLOCATOR_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # torch's older name, and its newer


def prefer_growable_segments() -> None:
    """Turn on the CUDA allocator's growable segments unless the user configured the allocator (either variable).
    Read when CUDA first allocates, so call it before: without them a long run fragments the allocator's cache (at
    Wan scale, the compiled step without recomputation, 123 GiB at its peak, ran out of an H200's 139 GiB on its
    second step: benchmarks/README.md)."""
    if not any(os.environ.get(name) for name in ALLOCATOR_VARIABLES):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
