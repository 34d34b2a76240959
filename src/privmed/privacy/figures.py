"""Privacy figures as text, never claiming less than the ledger backs.

An epsilon is an upper bound: shown rounded to nearest it could read lower than the bound the
accountant proved (0.99649 as "0.996"). Every epsilon (and every noise multiplier said to meet a
budget) is therefore shown rounded UP, so that the text, read back as a float, is never below it:

    format_epsilon(0.99649)    "0.997"
    format_epsilon(1.0)        "1"
    format_budget(8.0)         "8"       (a budget the user gave is shown as given)
"""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, Decimal


def format_epsilon(eps: float, digits: int = 3) -> str:
    """`eps` rounded UP to `digits` significant digits, trailing zeros dropped ("0.997", "1", "12.4",
    "1240", "1.01e-5", "1.24e+7"); "inf" for infinity. The text, read back as a float, is never
    below `eps`, and at most one unit of its last digit above it."""
    if digits < 1:
        raise ValueError(f"format_epsilon: digits {digits!r} is not allowed (an integer >= 1)")
    x = float(eps)
    if math.isnan(x) or x < 0:
        raise ValueError(f"format_epsilon: eps {eps!r} is not allowed (a number >= 0)")
    if x == math.inf:
        return "inf"
    if x == 0.0:
        return "0"
    # Start from the shortest text that reads back as this very float (repr), not from its binary
    # expansion: 0.0123 is stored a hair above 0.0123, and rounding that up would show 0.0124 for no
    # gain (float("0.0123") is the same float). Ceiling of that text still reads back >= x.
    exact = Decimal(repr(x))
    up = _ceil(exact, exact.adjusted() - digits + 1)
    if up.adjusted() > exact.adjusted():  # 9.996 -> 10.00: keep `digits` significant digits
        up = _ceil(up, up.adjusted() - digits + 1)
    up = up.normalize()
    if not -4 <= up.adjusted() < 6:  # as :g does, but a little later for large values
        return f"{up:e}"
    return f"{up:f}"


def format_budget(budget: float) -> str:
    """A budget epsilon as given ("8", "3.5"); one that `:g` would shorten (a budget computed from a
    fixed noise multiplier, or one given with more than 6 digits) is rounded up to 4 digits."""
    text = f"{float(budget):g}"
    return text if float(text) == float(budget) else format_epsilon(budget, 4)


UNIT_NOTES = {  # a unit that needs saying what it is not
    "record": (
        "one image/record, not one patient: the data names no patient ids, so a patient with k "
        "records has only the group guarantee (k x epsilon, k x e^((k-1) x epsilon) x delta)"
    ),
}


def unit_note(unit: str) -> str | None:
    """What the unit of privacy `unit` ('patient', 'record', 'site') does not cover, in words; None
    when its name says it all."""
    return UNIT_NOTES.get(unit)


def _ceil(value: Decimal, exponent: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_CEILING)
