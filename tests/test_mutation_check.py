"""The mutation check's bookkeeping, without running mutmut's tests (that takes minutes: bench/mutation.sh).

bench/mutation_equivalents.txt must parse, and every mutant it lists must still be the mutant mutmut generates
under that name from the current source: an edit of a module renumbers its mutants, and an old reason must not
silently cover a different change.
"""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "bench" / "mutation.py")
mutation = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mutation  # dataclasses look their module up there
_spec.loader.exec_module(mutation)


def test_modules_and_their_tests_exist():
    for module, tests in mutation.MODULES.items():
        assert (ROOT / module).is_file(), module
        files = [t for t in tests if t.endswith(".py")]  # the rest are pytest options ("-k", an expression)
        assert files and all((ROOT / t).is_file() for t in files), tests


def test_scratch_copies_hold_every_package():
    # The scratch copy must hold every package, or an import falls through to the checkout's unmutated code.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(mutation.PACKAGES) == sorted(p.removesuffix("*") for p in include)


def test_equivalents_file_parses_with_a_reason_each():
    listed = mutation.read_equivalents()
    for equivalent in listed:
        assert equivalent.module in mutation.MODULES, equivalent.name
        assert len(equivalent.reason.split()) >= 4, f"{equivalent.name}: give a reason, not a word"


def test_listed_mutants_are_the_ones_mutmut_makes_now():
    assert mutation.stale_equivalents(mutation.read_equivalents()) == []


def test_stale_listings_are_named(tmp_path):
    changes = mutation.mutant_changes("vilbert/answers.py")
    assert len(changes) == 23 and all(name.startswith("vilbert.answers.x_") for name in changes)
    name, change = next(iter(changes.items()))
    listed = [
        mutation.Equivalent(name, change.splitlines()[0], "the change listed as it is"),
        mutation.Equivalent(name.replace("__mutmut_1", "__mutmut_999"), "x", "a mutant that is not made"),
        mutation.Equivalent(name.replace("__mutmut_1", "__mutmut_2"), change.splitlines()[0], "another change"),
        mutation.Equivalent("detector.elsewhere.x_f__mutmut_1", "x", "a module outside the check"),
    ]
    problems = mutation.stale_equivalents(listed)
    assert [p.split(":")[0] for p in problems] == [e.name for e in listed[1:]]
    assert "no such mutant" in problems[0] and "now changes" in problems[1] and "not a module" in problems[2]


def test_bad_lines_and_duplicates_are_refused(tmp_path):
    path = tmp_path / "equivalents.txt"
    path.write_text("# comment\n\nvilbert.answers.x_f__mutmut_1 || a = b | c || only the name changes here\n")
    assert mutation.read_equivalents(path) == [
        mutation.Equivalent("vilbert.answers.x_f__mutmut_1", "a = b | c", "only the name changes here")]
    path.write_text("vilbert.answers.x_f__mutmut_1 a reason without the change\n")
    with pytest.raises(ValueError, match=r"equivalents.txt:1: expected 'NAME \|\| MUTATED CODE \|\| REASON'"):
        mutation.read_equivalents(path)
    path.write_text("vilbert.answers.x_f__mutmut_1 || a || reason one\nvilbert.answers.x_f__mutmut_1 || a || reason two\n")
    with pytest.raises(ValueError, match="listed twice: vilbert.answers.x_f__mutmut_1"):
        mutation.read_equivalents(path)


def test_score_counts_only_the_mutants_not_listed():
    statuses = {"m.x_f__mutmut_1": "killed", "m.x_f__mutmut_2": "timeout", "m.x_f__mutmut_3": "survived",
                "m.x_f__mutmut_4": "survived", "m.x_f__mutmut_5": "no tests", "m.x_f__mutmut_6": "killed"}
    result = mutation.ModuleResult("m.py", statuses, {"m.x_f__mutmut_3", "m.x_f__mutmut_6"})
    assert result.killed == 3 and result.equivalent == 2
    assert result.unexplained == ["m.x_f__mutmut_4", "m.x_f__mutmut_5"]
    assert result.listed_but_killed == ["m.x_f__mutmut_6"]
    assert result.score == pytest.approx(100 * 3 / 4)
    assert result.row() == "| `m.py` | 6 | 3 | 2 | 2 | 75.0% |"
