"""Checks of the static numbers a user passes to the library's constructors (widths,
branch counts, step counts, fractions): one rule each, one-line ValueErrors naming the
field. A bool is never a number here (`True` as a width is a mistake, not 1), a float is
a whole number only when it is integral (12.0 yes, 12.5 no), and a string never is."""

from __future__ import annotations

import math
import numbers


def whole_number(name: str, v, lo: int | None = None) -> int:
    """`v` as an int: ints and numpy integers, or integral finite floats; `>= lo` if given."""
    ok = not isinstance(v, bool) and (
        isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real) and math.isfinite(v) and float(v).is_integer())
    )
    if not ok:
        raise ValueError(f"{name} must be a whole number, got {v!r}")
    n = int(v)
    if lo is not None and n < lo:
        raise ValueError(f"{name} must be >= {lo}, got {n}")
    return n


def whole_numbers(name: str, v) -> tuple[int, ...]:
    """A sequence (or one value) of whole numbers as a tuple of ints."""
    seq = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    try:
        return tuple(whole_number(name, a) for a in seq)
    except ValueError:
        raise ValueError(f"{name} must hold whole numbers, got {v!r}") from None


def real_number(name: str, v) -> float:
    """`v` as a float: a real number, not a bool or a string."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a number, got {v!r}")
    return float(v)


def numeric(name: str, v):
    """`v` unchanged unless it is text or a bool given for a number (a string, a Python or
    numpy bool, a bool array, or a sequence holding one): a one-line ValueError. Numbers,
    arrays and traced values pass (their values are checked where they are used)."""
    if isinstance(v, (list, tuple)):
        for a in v:
            numeric(name, a)
        return v
    dtype = getattr(v, "dtype", None)
    if isinstance(v, (str, bytes, bool)) or getattr(dtype, "kind", None) in ("b", "U", "S", "O"):
        got = f"a {dtype} array of shape {tuple(v.shape)}" if getattr(v, "ndim", 0) else repr(v)
        raise ValueError(f"{name} must be a number, got {got}")
    return v
