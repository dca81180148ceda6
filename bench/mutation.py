"""Mutation check: mutmut on the core pure modules, each against its own fast tests.

For every module, a scratch copy of the project goes to var/mutation/<module>/ (the checkout is never touched),
mutmut mutates only that module and runs only its tests there, and the survivors are compared with
bench/mutation_equivalents.txt. The check fails when a survivor is neither killed nor listed there with a reason,
and when a listed mutant is killed after all (the listing is then wrong). Too slow for every CI run (minutes);
tests/test_mutation_check.py keeps the equivalents file in step with the sources on every run instead.

Usage: bench/mutation.sh [--max-children N] [MODULE[=TEST[,TEST...]] ...]
With no MODULE, all of MODULES below; a MODULE without tests takes its tests from MODULES.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "var" / "mutation"
EQUIVALENTS = ROOT / "bench" / "mutation_equivalents.txt"

# module -> the fast tests that own it (test files, then any pytest options). Add a module here (or pass
# MODULE=TESTS) to bring it under the check.
MODULES: dict[str, tuple[str, ...]] = {
    "detector/selection.py": ("tests/test_selection.py",),
    "vilbert/tokenization.py": ("tests/test_tokenizer.py",),
    "vilbert/answers.py": ("tests/test_answers.py",),
    "service/web/inputs.py": ("tests/test_inputs.py",),
    "service/features.py": ("tests/test_features.py",),
    "vilbert/tasks.py": ("tests/test_tasks.py",),
    "modelkit/boundedjson.py": ("tests/test_boundedjson.py",),
    "detector/categories.py": ("tests/test_categories.py",),
    "service/lexical.py": ("tests/test_lexical.py",),
    "service/settings.py": ("tests/test_settings.py",),
    "service/web/jobs.py": ("tests/test_jobs.py",),
    "service/queue.py": ("tests/test_jobs.py",),
    "service/contract.py": ("tests/test_contract.py", "tests/test_jobs.py"),
    "service/errors.py": ("tests/test_contract.py",),
    "service/collections.py": ("tests/test_collection_store.py",),
    "service/worker/cache.py": ("tests/test_feature_cache.py",),
    "service/web/collections.py": ("tests/test_collections_web.py",),
    "service/web/routes.py": ("tests/test_web_api.py", "tests/test_web_routes.py", "tests/test_collections_web.py"),
    "service/web/app.py": ("tests/test_web_api.py", "tests/test_web_routes.py", "tests/test_collections_web.py"),
    "service/web/metrics.py": ("tests/test_web_api.py",),
    "service/localstack.py": ("tests/test_localstack.py",),
    "service/boxes.py": ("tests/test_inputs.py",),
    "service/bundle.py": ("tests/test_bundle.py",),
    # The full-size forward (seconds each) is held to the reference in CI; the mutants are killed by the tiny ones.
    "vilbert/checkpoint.py": ("tests/test_vilbert_checkpoint.py", "tests/test_vilbert_model.py", "-k", "not full_size"),
    "vilbert/predictor.py": ("tests/test_predictor.py", "tests/test_predict_many.py", "tests/test_score_images.py"),
    "service/worker/pipeline.py": ("tests/test_pipeline.py", "tests/test_region_labels.py", "tests/test_strict_json.py"),
    # The worker's stop (request_stop, the idle pop) is held in-process by test_worker_main.
    "service/worker/rq_batch.py": ("tests/test_rq_batch.py", "tests/test_worker_main.py"),
    "vilbert_train/pickles.py": ("tests/test_pickles.py",),
    "vilbert_train/safe_pickle.py": ("tests/test_fetch_safe_pickle.py",),
    # The extraction CLI's test runs a subprocess (9 s) that mutmut cannot see into.
    "detector/records.py": ("tests/test_detector_store.py", "tests/test_fuzz_parsers.py", "tests/test_features.py",
                            "-k", "not extraction_cli"),
    "detector/images.py": ("tests/test_images.py",),
    "vilbert_train/annotations.py": ("tests/test_annotations.py",),
    "service/worker/heartbeat.py": ("tests/test_jobs.py",),
    "modelkit/checkpoint.py": ("tests/test_modelkit.py",),
    "vilbert_train/features.py": ("tests/test_train_data.py",),
    "service/worker/metrics.py": ("tests/test_worker_metrics.py",),
    "service/worker/collections.py": ("tests/test_collections.py", "tests/test_worker_collections.py", "-k",
                                      "not bulk"),
}
# Copied whole into each scratch copy, so that every import resolves there rather than in the checkout
# (the packages of pyproject.toml; tests/test_mutation_check.py keeps the two in step).
PACKAGES = ("modelkit", "vilbert", "detector", "service", "vilbert_train")
# Script folders outside the installed packages whose modules are checked too: models (fetch.py; also make_tiny.py,
# which the tiny_bundle fixture runs), copied without the weights folders under it, which can hold gigabytes.
SCRIPT_DIRS = ("models",)
# docs and deploy: tests that hold a table or the proxy's headers to the code
ALSO_COPIED = ("config", "tests", "docs", "deploy", "pyproject.toml")

# mutmut's statuses that mean a test noticed the mutant.
DETECTED = {"killed", "timeout", "segfault"}
# " || " separates the fields: Python has no such operator, so it cannot occur in the mutated code.
EQUIVALENT_LINE = re.compile(r"^(?P<name>\S+__mutmut_\d+) \|\| (?P<change>.+?) \|\| (?P<reason>.+)$")


@dataclass(frozen=True)
class Equivalent:
    """One listed mutant: its mutmut name, the text of the mutated line(s), and why no test can notice it."""

    name: str
    change: str
    reason: str

    @property
    def module(self) -> str:
        """The module's path, from the dotted part of the name (`detector.selection.x_f__mutmut_3`)."""
        return self.name.rsplit(".", 1)[0].replace(".", "/") + ".py"


def read_equivalents(path: Path = EQUIVALENTS) -> list[Equivalent]:
    """The listed equivalent mutants; a line that does not parse is an error (blank lines and # comments aside)."""
    listed = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = EQUIVALENT_LINE.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'NAME || MUTATED CODE || REASON', got {line!r}")
        listed.append(Equivalent(**match.groupdict()))
    names = [e.name for e in listed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: listed twice: {', '.join(duplicates)}")
    return listed


def mutant_prefix(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".") + "."


def mutant_changes(module: str) -> dict[str, str]:
    """Every mutant mutmut makes of `module` (full name -> its added lines, stripped and joined by newlines),
    generated from the source alone: seconds, no test runs."""
    from mutmut.configuration import reset_config
    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    source = (ROOT / module).read_text(encoding="utf-8")
    before = Path.cwd()
    with tempfile.TemporaryDirectory() as empty:
        # mutmut reads its configuration from the working directory; an empty one with a minimal setup.cfg
        # keeps the project's own settings (and any mutants/ folder) out of it.
        Path(empty, "setup.cfg").write_text(f"[mutmut]\nsource_paths = {module}\n", encoding="utf-8")
        os.chdir(empty)
        reset_config()
        try:
            mutated = mutate_file_contents(module, source)
        finally:
            os.chdir(before)
            reset_config()
    # As `mutmut show` diffs them (each function under its own name), but with every function's text sliced out of
    # the generated file by the line spans mutmut records: no parse and no printing of the mutated module, which
    # took most of a minute for the largest modules on a slow CPU.
    lines = mutated.code.splitlines()

    def function_text(generated: str, name: str) -> list[str]:
        span = mutated.line_span_by_function_name[generated]
        text = "\n".join(lines[span.start - 1:span.end]).strip()
        return re.sub(rf"^(\s*(?:async\s+)?def\s+){re.escape(generated)}\(", rf"\g<1>{name}(", text, count=1,
                      flags=re.M).splitlines()

    changes = {}
    originals: dict[str, list[str]] = {}
    for short in mutated.mutant_names:
        function = short.partition("__mutmut_")[0]
        name = orig_function_and_class_names_from_key(short)[0]
        if function not in originals:
            originals[function] = function_text(function + "__mutmut_orig", name)
        mutant = function_text(short, name)
        added = [line[1:].strip() for line in difflib.unified_diff(originals[function], mutant, lineterm="", n=0)
                 if line.startswith("+") and not line.startswith("+++")]
        changes[mutant_prefix(module) + short] = "\n".join(added)
    return changes


def all_mutant_changes(modules: list[str]) -> dict[str, dict[str, str]]:
    """mutant_changes of each module, the modules spread over the CPUs (each takes seconds: tens of modules would
    take over a minute on one core). Forked workers: mutant_changes changes the working directory."""
    workers = min(len(modules), os.cpu_count() or 1)
    if workers <= 1:
        return {module: mutant_changes(module) for module in modules}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return dict(zip(modules, pool.map(mutant_changes, modules)))


def stale_equivalents(listed: list[Equivalent], modules: Iterable[str] = MODULES) -> list[str]:
    """Problems with the listing against the current sources: a module not under the check, a mutant mutmut no
    longer makes, or a name that now stands for a different change (the sources moved, renumbering mutants)."""
    problems = []
    changes_by_module = all_mutant_changes(sorted({e.module for e in listed if e.module in modules}))
    for equivalent in listed:
        if equivalent.module not in modules:
            problems.append(f"{equivalent.name}: {equivalent.module} is not a module under the check")
            continue
        change = changes_by_module[equivalent.module].get(equivalent.name)
        if change is None:
            problems.append(f"{equivalent.name}: mutmut makes no such mutant of {equivalent.module}")
        elif equivalent.change not in change.splitlines():
            problems.append(f"{equivalent.name}: now changes {change!r}, listed as {equivalent.change!r}")
    return problems


@dataclass
class ModuleResult:
    module: str
    statuses: dict[str, str]  # mutant name -> mutmut status
    listed: set[str]
    unexplained: list[str] = field(init=False)
    listed_but_killed: list[str] = field(init=False)

    def __post_init__(self) -> None:
        survivors = {name for name, status in self.statuses.items() if status not in DETECTED}
        self.unexplained = sorted(survivors - self.listed)
        self.listed_but_killed = sorted(self.listed & (set(self.statuses) - survivors))

    @property
    def killed(self) -> int:
        return sum(status in DETECTED for status in self.statuses.values())

    @property
    def equivalent(self) -> int:
        return len(self.listed & set(self.statuses))

    @property
    def score(self) -> float:
        """Killed among the mutants not listed as equivalent."""
        candidates = len(self.statuses) - self.equivalent
        return 100.0 * self.killed / candidates if candidates else 100.0

    def row(self) -> str:
        return (f"| `{self.module}` | {len(self.statuses)} | {self.killed} | {self.equivalent} | "
                f"{len(self.unexplained)} | {self.score:.1f}% |")


def prepare_scratch(module: str, tests: tuple[str, ...]) -> Path:
    """A fresh copy of the project's packages, tests and config, with a mutmut configuration for `module`."""
    scratch = SCRATCH / module.removesuffix(".py").replace("/", "_")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "weights", "tiny", "tiny-bundle")
    for name in PACKAGES + SCRIPT_DIRS + ALSO_COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, scratch / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, scratch / name)
    present = [p for p in PACKAGES + SCRIPT_DIRS if (scratch / p).is_dir()]
    (scratch / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths =\n" + "".join(f"    {p}\n" for p in present)
        + f"only_mutate = {module}\n"
        + "also_copy =\n" + "".join(f"    {name}\n" for name in ALSO_COPIED if name not in ("tests", "pyproject.toml"))
        + "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in tests),
        encoding="utf-8",
    )
    return scratch


def run_module(module: str, tests: tuple[str, ...], max_children: int, listed: set[str]) -> ModuleResult:
    scratch = prepare_scratch(module, tests)
    # One thread per test process: the children share two busy cores, where torch's thread pool only spins.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    mutmut = [sys.executable, "-m", "mutmut"]
    log = scratch / "mutmut-run.log"
    with log.open("w") as out:
        code = subprocess.run(mutmut + ["run", "--max-children", str(max_children)], cwd=scratch, env=env,
                              stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"mutmut run failed for {module} (exit {code}); see {log}")
    results = subprocess.run(mutmut + ["results", "--all", "true"], cwd=scratch, env=env, capture_output=True,
                             text=True, check=True).stdout
    prefix = mutant_prefix(module)
    statuses = {}
    for line in results.splitlines():
        name, _, status = line.strip().partition(": ")
        if name.startswith(prefix):
            statuses[name] = status
    if not statuses:
        sys.exit(f"mutmut reported no mutants for {module}; see {log}")
    not_checked = [n for n, s in statuses.items() if s == "not checked"]
    if not_checked:
        sys.exit(f"{module}: {len(not_checked)} mutants were not checked; see {log}")
    result = ModuleResult(module, statuses, {n for n in listed if n.startswith(prefix)})
    for name in result.unexplained:
        diff = subprocess.run(mutmut + ["show", name], cwd=scratch, env=env, capture_output=True, text=True).stdout
        print(f"\nUNEXPLAINED SURVIVOR ({statuses[name]}):\n{diff}", file=sys.stderr)
    for name in result.listed_but_killed:
        print(f"LISTED AS EQUIVALENT BUT KILLED: {name}", file=sys.stderr)
    return result


def parse_modules(arguments: list[str]) -> dict[str, tuple[str, ...]]:
    if not arguments:
        return dict(MODULES)
    chosen = {}
    for argument in arguments:
        module, _, tests = argument.partition("=")
        if tests:
            chosen[module] = tuple(tests.split(","))
        elif module in MODULES:
            chosen[module] = MODULES[module]
        else:
            sys.exit(f"{module}: not in MODULES; name its tests as {module}=tests/test_x.py")
        if not (ROOT / module).is_file():
            sys.exit(f"{module}: no such file")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--table", type=Path, default=SCRATCH / "mutation-table.md", help="where to write the table")
    parser.add_argument("modules", nargs="*", metavar="MODULE[=TESTS]")
    args = parser.parse_args()
    modules = parse_modules(args.modules)
    equivalents = read_equivalents()
    problems = stale_equivalents([e for e in equivalents if e.module in modules], modules)
    if problems:
        sys.exit("bench/mutation_equivalents.txt does not match the sources:\n  " + "\n  ".join(problems))
    listed = {e.name for e in equivalents}
    results = []
    for module, tests in modules.items():
        print(f"{module}: mutmut against {' '.join(tests)} ...", file=sys.stderr, flush=True)
        results.append(run_module(module, tests, args.max_children, listed))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    table = "\n".join([
        f"mutmut {importlib.metadata.version('mutmut')}, {when}, {machine}, --max-children {args.max_children}",
        "",
        "| module | mutants | killed | listed equivalent | unexplained survivors | score (non-equivalent killed) |",
        "|---|---|---|---|---|---|",
        *(r.row() for r in results),
    ])
    print(table)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(table + "\n", encoding="utf-8")
    failed = any(r.unexplained or r.listed_but_killed for r in results)
    if failed:
        print("FAILED: every survivor must be killed by a test or listed in bench/mutation_equivalents.txt "
              "with a reason, and no listed mutant may be killed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
