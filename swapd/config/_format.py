"""Render scalar values the way Go's ``fmt.Sprintf("%v", v)`` does.

llama-swap interpolates macro values into strings with ``%v``; to produce
identical commands we format numbers and booleans the same way.
"""

from __future__ import annotations

import decimal
import math
from typing import Any


def go_float(value: float) -> str:
    """Format a float like Go's %v.

    Go's %v for float64 is strconv.FormatFloat(v, 'g', -1, 64): the shortest
    decimal that round-trips, written in exponent form when the decimal
    exponent is < -4 or >= 6 (the 'g' threshold used for shortest output).
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign, digits_t, raw_exponent = decimal.Decimal(repr(value)).as_tuple()
    exponent = int(raw_exponent)  # finite here: NaN and infinities were handled above
    digits = list(digits_t)
    while len(digits) > 1 and digits[-1] == 0:
        digits.pop()
        exponent += 1
    text = "".join(str(d) for d in digits)
    sci_exp = len(digits) - 1 + exponent
    if sci_exp < -4 or sci_exp >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        out = f"{mantissa}e{'-' if sci_exp < 0 else '+'}{abs(sci_exp):02d}"
    elif exponent >= 0:
        out = text + "0" * exponent
    else:
        point = len(text) + exponent
        if point > 0:
            out = text[:point] + "." + text[point:]
        else:
            out = "0." + "0" * (-point) + text
    return ("-" if sign else "") + out


def go_str(value: Any) -> str:
    """String form of a scalar as Go's %v would print it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_float(value)
    if value is None:
        return "<nil>"
    return str(value)
