"""Checks of numbers that callers pass in code (config flags have their own rules in config.py): one wording for
every module, "NAME must be an integer >= 1, got 0".

    epochs = check_int("epochs", epochs, minimum=1)
    lr = check_number("lr", lr, above=0.0)
"""

from __future__ import annotations

import math

from services.common.errors import InvalidArgumentError


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` if it is an int (not a bool: True as a count is a bug upstream) within the bounds given."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and minimum is not None and maximum is not None:
        bound = f" in [{minimum}, {maximum}]"
    else:
        bound = f" >= {minimum}" if minimum is not None else f" <= {maximum}" if maximum is not None else ""
    if ok:
        ok = (minimum is None or value >= minimum) and (maximum is None or value <= maximum)  # type: ignore[operator]
    if not ok:
        raise InvalidArgumentError(f"{name} must be an integer{bound}, got {value!r}")
    return value  # type: ignore[return-value]


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """`value` if it is a finite int or float (not a bool) with value >= minimum, > above and < below."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (
            (minimum is None or value >= minimum)  # type: ignore[operator]
            and (above is None or value > above)  # type: ignore[operator]
            and (below is None or value < below)  # type: ignore[operator]
        )
    if not ok:
        bounds = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else ""]
        bounds.append(f"< {below}" if below is not None else "")
        shown = " and ".join(b for b in bounds if b)
        raise InvalidArgumentError(f"{name} must be a finite number{' ' + shown if shown else ''}, got {value!r}")
    return value  # type: ignore[return-value]
