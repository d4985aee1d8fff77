"""Argument checks shared by the API: a TypeError / ValueError naming the argument, raised before any work (a bad
value would otherwise fail deep inside torch or numpy, or run silently wrong)."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int when it is an integer (not a bool, not a float) >= `minimum`; else TypeError / ValueError
    naming `name`."""
    try:
        number = operator.index(value)  # any integer type (numpy, a 0-d torch tensor), never a float
    except TypeError:
        number = None
    if number is None or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r:.80}")
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return number


def check_finite(name: str, value: Any) -> float:
    """`value` as a float when it is a finite number (not a bool); else TypeError / ValueError naming `name`."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a finite number, got {type(value).__name__} {value!r:.80}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """`value` as a float when it is a finite number > 0 (not a bool); else TypeError / ValueError naming `name`."""
    if check_finite(name, value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)
