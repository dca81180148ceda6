"""modelkit/boundedjson.py, the budgeted JSON reader of client input: every limit at, under and one past it, with
the whole message. `bench/mutation.sh` runs these against mutants of the module (tests/test_fuzz_parsers.py adds
the property-based side)."""

from __future__ import annotations

import pytest

from modelkit.boundedjson import MAX_INT_DIGITS, JsonBudgetError, JsonSyntaxError, loads_bounded, nesting_depth


def refused(text, max_chars: int = 100, max_depth: int = 3) -> JsonBudgetError:
    with pytest.raises(JsonBudgetError) as caught:
        loads_bounded(text, max_chars, max_depth)
    return caught.value


def test_depth_counts_brackets_outside_strings_only():
    assert nesting_depth("") == 0 and nesting_depth("1") == 0
    assert nesting_depth("[]") == 1 and nesting_depth("{}") == 1 and nesting_depth("[{}]") == 2
    assert nesting_depth("[[1], [[2]]]") == 3  # the deepest branch, not the sum
    assert nesting_depth('["[[[", "{{"]') == 1  # brackets inside strings do not count
    assert nesting_depth('["\\"[[", []]') == 2  # an escaped quote does not end the string
    assert nesting_depth('["\\\\", [[]]]') == 3  # an escaped backslash does: the string ends after it
    assert nesting_depth("]]][[") == 0  # unbalanced: json refuses it at its first character anyway
    assert nesting_depth("XX") == 0 and nesting_depth("[X[X[") == 3  # only brackets count


def test_length_is_checked_before_anything_else():
    assert loads_bounded("[1]" + " " * 7, 10, 1) == [1]  # exactly at the limit
    assert str(refused("[1]" + " " * 8, max_chars=10, max_depth=1)) == "the JSON is longer than 10 characters"
    four_byte = '["' + "\U0001F600" * 6 + '"]'  # 10 characters in 28 bytes of UTF-8
    assert loads_bounded(four_byte.encode(), 10, 1) == ["\U0001F600" * 6]
    at_four = refused("\U0001F600".encode() * 10, max_chars=10, max_depth=1)  # 40 bytes, 10 characters
    assert isinstance(at_four, JsonSyntaxError)  # within the length budget: refused as not JSON, not as too long
    error = refused(b"[1]" + b" " * 38, max_chars=10, max_depth=1)  # 41 bytes: refused before decoding
    assert str(error) == "the JSON is longer than 10 characters" and not isinstance(error, JsonSyntaxError)
    assert str(refused(b"[1]" + b" " * 8, max_chars=10, max_depth=1)) == "the JSON is longer than 10 characters"
    assert loads_bounded("[\u00e9]".replace("\u00e9", '"\u00e9"'), 5, 1) == ["\u00e9"]


def test_depth_at_and_past_the_limit():
    assert loads_bounded("[[[1]]]", 100, 3) == [[[1]]]
    error = refused("[[[[1]]]]")
    assert str(error) == "the JSON is nested deeper than 3 levels" and not isinstance(error, JsonSyntaxError)


def test_integers_up_to_the_digit_limit():
    assert MAX_INT_DIGITS == 18
    assert loads_bounded("9" * 18, 100, 0) == 10**18 - 1
    assert loads_bounded("-" + "9" * 18, 100, 0) == -(10**18 - 1)  # the sign is not a digit
    assert str(refused("1" + "0" * 18)) == "an integer has more than 18 digits"
    assert str(refused("-1" + "0" * 18)) == "an integer has more than 18 digits"


def test_numbers_must_be_finite():
    assert loads_bounded("1.5e308", 100, 0) == 1.5e308
    assert str(refused("[1e309]")) == "the number 1e309 is out of range"
    assert str(refused("-1e309")) == "the number -1e309 is out of range"
    assert str(refused("1" * 30 + "e999")) == f"the number {'1' * 30 + 'e999'} is out of range"
    long = "1" * 50 + "e999"
    assert str(refused(long)) == f"the number {long[:40]} is out of range"  # quoted, but not at any length
    for constant in ("NaN", "Infinity", "-Infinity"):
        assert str(refused(f"[{constant}]")) == f"{constant} is not a JSON number"


def test_syntax_errors_are_their_own_kind():
    for text in ("nope", "[1,", '{"a" 1}', "[1]]"):
        error = refused(text)
        assert isinstance(error, JsonSyntaxError) and str(error).startswith("not valid JSON (")
    error = refused(b"\xff\xfe[]")
    assert isinstance(error, JsonSyntaxError) and str(error) == "the JSON is not UTF-8 text"
    assert loads_bounded(bytearray(b'{"a": [1, 2.5, "x", null, true]}'), 100, 2) == {"a": [1, 2.5, "x", None, True]}
