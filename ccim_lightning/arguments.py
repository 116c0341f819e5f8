"""Checks of numeric constructor arguments, shared by every public class of the package.

A NaN compares false with everything, so a check written ``if x < 0: raise`` lets it through and the run trains
as something else (``smoothing=nan`` gives NaN weights, ``eta=inf`` a one-hot ``q``). Every public constructor
passes its numbers through :func:`check_float` or :func:`check_int`, which refuse NaN, infinities, booleans and
non-numbers first, then values outside the documented range, naming the class, the argument and the value.
This module is part of the bottom layer: it imports nothing of the package.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """The allowed range as text, e.g. ``>= 0``, ``in [0, 1)`` or ``> 0``."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "any finite value"


def _outside(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return True
    return high is not None and (value >= high if high_open else value > high)


def check_float(
    where: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Returns ``value`` as a float after checking that it is a finite real number in the allowed range.

    Args:
        where: The class (or function) the argument belongs to, for the message (e.g. ``"GroupDRO"``).
        name: The argument's name.
        value: The value given.
        low: Lower bound, or None for none.
        high: Upper bound, or None for none.
        low_open: The lower bound itself is not allowed (``> low``).
        high_open: The upper bound itself is not allowed (``< high``).

    Returns:
        ``float(value)``.

    Raises:
        ValueError: ``value`` is not a real number, is NaN or infinite, or lies outside the range.
    """
    allowed = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{where}: {name} must be a real number ({allowed}), got {type(value).__name__} {value!r}; pass a number."
        )
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(
            f"{where}: {name} = {number} is not a finite number; pass a finite value ({allowed}) "
            "(NaN or inf would silently train something else)."
        )
    if _outside(number, low, high, low_open, high_open):
        raise ValueError(f"{where}: {name} must be {allowed}, got {value!r}; pass a value in that range.")
    return number


def check_optional_float(where: str, name: str, value: Any, *bounds: float | None, **open_ends: bool) -> float | None:
    """:func:`check_float` for an argument that may be None (None is returned unchanged)."""
    return None if value is None else check_float(where, name, value, *bounds, **open_ends)


def check_floats(
    where: str, name: str, values: Sequence[Any], low: float | None = None, *, low_open: bool = False
) -> tuple[float, ...]:
    """Checks every entry of a sequence of numbers with :func:`check_float` (named ``name[i]``); returns a tuple."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ValueError(f"{where}: {name} must be a sequence of numbers, got {type(values).__name__} {values!r}.")
    return tuple(check_float(where, f"{name}[{i}]", v, low, low_open=low_open) for i, v in enumerate(values))


def check_int(where: str, name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """Returns ``value`` as an int after checking that it is an integer (not a bool, not a float) in range.

    Args:
        where: The class (or function) the argument belongs to, for the message.
        name: The argument's name.
        value: The value given (a Python or numpy integer).
        low: Smallest allowed value, or None.
        high: Largest allowed value, or None.

    Returns:
        ``int(value)``.

    Raises:
        ValueError: ``value`` is not an integer (NaN, inf and 3.0 included) or lies outside the range.
    """
    allowed = _interval(low, high, False, False)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{where}: {name} must be an integer ({allowed}), got {type(value).__name__} {value!r}; "
            "pass a whole number."
        )
    if _outside(int(value), low, high, False, False):
        raise ValueError(f"{where}: {name} must be an integer {allowed}, got {value!r}; pass a value in that range.")
    return int(value)


def check_optional_int(
    where: str, name: str, value: Any, low: int | None = None, high: int | None = None
) -> int | None:
    """:func:`check_int` for an argument that may be None (None is returned unchanged)."""
    return None if value is None else check_int(where, name, value, low, high)


def check_finite_settings(where: str, name: str, settings: Any) -> None:
    """Refuses any NaN or infinite number inside ``settings`` (nested dicts, lists and tuples of numbers).

    Used for settings that reach us inside another library's object, e.g. an optimizer's ``param_groups``
    (``lr``, ``betas``, ``weight_decay``): torch accepts ``lr=inf``.

    Args:
        where: The class the settings belong to, for the message.
        name: What ``settings`` is (e.g. ``"optimizer AdamW param_groups[0]"``); entries are named under it.
        settings: The settings to walk; tensors, strings and other objects are not looked into.

    Raises:
        ValueError: Naming the first entry that is NaN or infinite, with its value.
    """
    if isinstance(settings, dict):
        for key, value in settings.items():
            check_finite_settings(where, f"{name}[{key!r}]", value)
    elif isinstance(settings, list | tuple):
        for i, value in enumerate(settings):
            check_finite_settings(where, f"{name}[{i}]", value)
    elif isinstance(settings, numbers.Real) and not isinstance(settings, bool) and not math.isfinite(settings):
        raise ValueError(
            f"{where}: {name} = {settings} is not a finite number; pass a finite value "
            "(NaN or inf would silently train something else)."
        )
