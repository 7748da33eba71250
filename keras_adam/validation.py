"""Checks of constructor arguments.

Each check fails with a `ValueError` whose message names the argument and the
value it received.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

from keras import optimizers


def invalid(name: str, value: Any, requirement: str) -> ValueError:
    """The error for a bad argument: "Argument `name` must be ... Received: name=value".

    Args:
        name: The argument's name.
        value: What the caller passed.
        requirement: What a valid value is ("a positive integer").

    Returns:
        The `ValueError` to raise.
    """
    return ValueError(f"Argument `{name}` must be {requirement}. Received: {name}={value!r}")


def real_number(name: str, value: Any, requirement: str) -> float:
    """Return `value` as a Python float, or raise if it is not a finite real.

    Booleans, strings, arrays and NaN/inf are refused.

    Args:
        name: The argument's name, for the error message.
        value: What the caller passed.
        requirement: Text describing the valid range, for the error message.

    Returns:
        The value as a Python float.

    Raises:
        ValueError: if `value` is not a finite real number.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise invalid(name, value, requirement)
    value = float(value)
    if not math.isfinite(value):
        raise invalid(name, value, requirement)
    return value


def learning_rate(value: Any) -> Any:
    """Validate `learning_rate`: a number > 0, a schedule, or a callable.

    Returns:
        A Python float for numbers; schedules and callables unchanged.

    Raises:
        ValueError: for anything else, or a number that is not > 0.
    """
    if isinstance(value, optimizers.schedules.LearningRateSchedule) or callable(value):
        return value
    requirement = "a finite float > 0, a LearningRateSchedule, or a callable"
    value = real_number("learning_rate", value, requirement)
    if not value > 0:
        raise invalid("learning_rate", value, requirement)
    return value


def decay_rate(name: str, value: Any) -> float:
    """Validate a β: a real number with 0 <= value < 1."""
    requirement = "a float in the interval [0, 1)"
    value = real_number(name, value, requirement)
    if not 0 <= value < 1:
        raise invalid(name, value, requirement)
    return value


def non_negative(name: str, value: Any, *, optional: bool = False) -> float | None:
    """Validate a finite number >= 0 (or None when `optional`)."""
    if optional and value is None:
        return None
    requirement = "a finite float >= 0" + (" or None" if optional else "")
    value = real_number(name, value, requirement)
    if value < 0:
        raise invalid(name, value, requirement)
    return value


def positive(name: str, value: Any, *, optional: bool = False) -> float | None:
    """Validate a finite number > 0 (or None when `optional`)."""
    if optional and value is None:
        return None
    requirement = "a finite float > 0" + (" or None" if optional else "")
    value = real_number(name, value, requirement)
    if not value > 0:
        raise invalid(name, value, requirement)
    return value


def boolean(name: str, value: Any) -> bool:
    """Validate a flag: exactly True or False (NumPy bools accepted)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise invalid(name, value, "True or False")


def integer(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    """Validate an integer >= `minimum` (booleans refused), or None if `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise invalid(name, value, kind + (" or None" if optional else ""))
    return int(value)


def name(value: Any) -> str | None:
    """Validate the optimizer's `name`: None or a non-empty string."""
    if value is None or (isinstance(value, str) and value):
        return value
    raise invalid("name", value, "a non-empty string or None")


def choice(name: str, value: Any, options: tuple) -> Any:
    """Validate that `value` is one of `options`."""
    if isinstance(value, (str, type(None))) and value in options:
        return value
    listed = ", ".join(repr(option) for option in options)
    raise invalid(name, value, f"one of {listed}")


def patterns(name: str, value: Any) -> tuple[str, ...]:
    """Validate regular expressions: None, one string, or a list of strings."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else value
    requirement = "None, a regular expression, or a list of them"
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise invalid(name, value, requirement)
    for pattern in items:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"Argument `{name}` holds an invalid regular expression {pattern!r} "
                f"({error}). Received: {name}={value!r}"
            ) from error
    return tuple(items)
