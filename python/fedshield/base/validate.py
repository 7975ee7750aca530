"""The value checks every settings class and message parser needs: one definition of "an int,
not a bool" (bool is an int subclass in Python, and True must not pass for a count of 1) and of
a finite real number, and checks that raise a named error."""

from __future__ import annotations

import math

from .errors import ParameterError


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    """An int or float that is not a bool (NaN and infinities included: see is_finite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """A real number (is_real) that is neither NaN nor infinite."""
    return is_real(value) and math.isfinite(value)


def check_int(value, name: str, *, low: int | None = None, high: int | None = None,
              error: type[Exception] = ParameterError) -> int:
    """``value`` if it is an int (not a bool) in [low, high]; else ``error`` naming it."""
    if not is_int(value) or (low is not None and value < low) or (
            high is not None and value > high):
        bounds = "" if low is None and high is None else \
            f" >= {low}" if high is None else f" <= {high}" if low is None else \
            f" in [{low}, {high}]"
        raise error(f"{name}={value!r} must be an int{bounds}")
    return value


def check_bool(value, name: str, *, error: type[Exception] = ParameterError) -> bool:
    """``value`` if it is True or False (not 0/1, not a string); else ``error`` naming it."""
    if not isinstance(value, bool):
        raise error(f"{name}={value!r} must be true or false")
    return value


def check_finite(value, name: str, *, low: float = -math.inf, high: float = math.inf,
                 error: type[Exception] = ParameterError) -> float:
    """``value`` as a float if it is a finite real number in [low, high]; else ``error``."""
    if not is_finite(value) or not low <= value <= high:
        raise error(f"{name}={value!r} must be a finite number in [{low}, {high}]")
    return float(value)


__all__ = ["check_bool", "check_finite", "check_int", "is_finite", "is_int", "is_real"]
