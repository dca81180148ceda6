"""Every error code a client can meet is in docs/API.md, and the contract's public names (stages, timings, codes)
are the documented ones.

The codes are read from the source (every literal code given to an error class or to `error_body`, and the codes
of gunicorn's JSON refusals), so a new code without a line in the docs fails here rather than surprising a client.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from service import contract
from service.web.gunicorn_worker import CLIENT_ERRORS

ROOT = Path(__file__).resolve().parent.parent
API_DOC = (ROOT / "docs" / "API.md").read_text()
# The error classes whose first argument is a client-visible code, and the function that builds the error object.
CODE_TAKERS = {"ServiceError", "BadRequest", "NotFound", "Unavailable", "Conflict", "PipelineError",
               "ImageDecodeError", "PredictionInputError", "error_body"}
SOURCES = ("service", "detector", "vilbert", "modelkit")
# Codes that only the Python API can raise, never a request: code -> why.
PYTHON_API_ONLY = {"image_not_found": "detector.images.load_image given a file path (the service passes bytes)"}


def section(title: str) -> str:
    """The text of docs/API.md from the heading `title` to the next heading of the same level."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", API_DOC, flags=re.S | re.M)
    assert match, f"docs/API.md has no section {title!r}"
    return match.group(1)


def documented_names(text: str) -> set[str]:
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", text))


def codes_in_source() -> dict[str, set[str]]:
    """code -> the files that raise it. A code given as a name must be one of service.contract's constants."""
    found: dict[str, set[str]] = {}
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.Call) and node.args):
                    continue
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name not in CODE_TAKERS:
                    continue
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    code = first.value
                elif isinstance(first, ast.Name) and first.id.isupper():
                    code = getattr(contract, first.id)
                else:
                    continue  # passed on from an error caught (exc.code, self.code): its origin is a literal too
                found.setdefault(code, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_scan_finds_the_codes_of_every_layer():
    # If the scan broke (a renamed class, a moved package), the check below would pass on nothing.
    found = codes_in_source()
    for code, where in (("missing_text", "service/web/inputs.py"), ("invalid_image", "detector/images.py"),
                        ("missing_candidates", "vilbert/predictor.py"), ("worker_lost", "service/queue.py"),
                        ("upload_expired", "service/worker/rq_batch.py"), ("unknown_job", "service/web/jobs.py")):
        assert where in found.get(code, set()), (code, where)
    assert len(found) >= 40


def test_every_error_code_in_the_source_is_documented():
    documented = documented_names(section("Errors"))
    missing = {code: sorted(where) for code, where in codes_in_source().items()
               if code not in documented and code not in PYTHON_API_ONLY}
    assert not missing, f"error codes with no line in docs/API.md's Errors section: {missing}"


def test_gunicorns_refusals_are_documented():
    documented = documented_names(section("Errors"))
    assert {code for *_, code, _ in CLIENT_ERRORS} <= documented


@pytest.mark.parametrize("code", [contract.UPLOAD_EXPIRED, contract.TIMEOUT, contract.WORKER_LOST, contract.CANCELED,
                                  contract.INTERNAL_ERROR, contract.NON_FINITE_OUTPUT])
def test_every_code_a_failed_job_can_carry_is_in_the_failed_jobs_table(code):
    failed_jobs = section("Errors").split("Failed jobs (`status: failed`)", 1)[1]
    assert f"`{code}`" in failed_jobs


def test_the_stage_and_timing_names_are_the_documented_ones():
    stage_row = next(line for line in API_DOC.splitlines() if line.startswith("| `stage`, `stage_detail`"))
    stages = [contract.STAGE_STARTING, *contract.STAGES, *contract.COLLECTION_STAGES]
    assert re.findall(r"`([a-z]+)`", stage_row.split("|")[3]) == stages
    timings_text = API_DOC[API_DOC.index("`timings` (seconds)"):]
    timings_text = timings_text[:timings_text.index("`model.tiny`")]
    assert set(re.findall(r"`([a-z_]+_s)`", timings_text)) == {contract.timing_key(n) for n in contract.TIMINGS}
    # The error object's `stage` of a pipeline failure is one of the pipeline's stages or the two extra places.
    assert {contract.ERROR_AT_LOAD, contract.ERROR_AT_BATCH}.isdisjoint(stages)
