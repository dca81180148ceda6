"""JSON from an untrusted source, parsed within a budget: length, nesting depth, integer digits and finite
numbers are checked so that no input can exhaust memory or the stack, or produce values (inf, NaN, integers too
big for a float) that would fail later far from the parser.

Used for the `boxes` form field (service.web.inputs) and the header of a feature record (detector.records), both
of which clients send.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_INT_DIGITS = 18  # fits an int64 and converts to float without overflow


class JsonBudgetError(ValueError):
    """Text that is not JSON, or JSON over the budget (the message says which limit)."""


class JsonSyntaxError(JsonBudgetError):
    """Text that is not JSON at all."""


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of `text`, ignoring brackets inside strings. Linear, no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonBudgetError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(digits)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonBudgetError(f"the number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise JsonBudgetError(f"{name} is not a JSON number")


def loads_bounded(text: str | bytes, max_chars: int, max_depth: int) -> Any:
    """json.loads with limits: at most max_chars characters, max_depth levels of nesting, integers of at most
    MAX_INT_DIGITS digits, finite numbers only (NaN and Infinity refused). Raises JsonBudgetError."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) > max_chars * 4:  # a UTF-8 character is at most four bytes: refuse before decoding
            raise JsonBudgetError(f"the JSON is longer than {max_chars} characters")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise JsonSyntaxError("the JSON is not UTF-8 text") from None
    if len(text) > max_chars:
        raise JsonBudgetError(f"the JSON is longer than {max_chars} characters")
    if nesting_depth(text) > max_depth:
        raise JsonBudgetError(f"the JSON is nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_int=_integer, parse_float=_finite_float, parse_constant=_no_constant)
    except JsonBudgetError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise JsonSyntaxError(f"not valid JSON ({exc})") from None
