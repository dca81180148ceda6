"""service/settings.py: every environment variable parsed and validated, the errors it gives, the table in
docs/SERVICE.md held to the code, and `python -m service.settings`. Pure and fast (the mutation check runs them,
bench/mutation.py)."""

from __future__ import annotations

import re

import pytest

from service.settings import Settings, SettingsError, load_settings


def test_settings_defaults_and_overrides():
    assert load_settings({}) == Settings()
    settings = load_settings({"REDIS_URL": "redis://h:1/2", "DEVICE": "cuda:1", "JOB_TIMEOUT": "60", "PRECISION": "BF16",
                              "MODEL_DIR": "/m", "LOG_LEVEL": "debug", "MAX_IMAGES": ""})
    assert (settings.redis_url, settings.device, settings.job_timeout, settings.precision) == ("redis://h:1/2", "cuda:1", 60, "bf16")
    assert str(settings.model_dir) == "/m" and settings.log_level == "DEBUG" and settings.max_images == Settings().max_images


def test_settings_report_every_bad_variable():
    with pytest.raises(SettingsError) as caught:
        load_settings({"REDIS_URL": "localhost:6379", "DEVICE": "gpu", "JOB_TIMEOUT": "soon", "MAX_IMAGES": "0",
                       "PRECISION": "int8", "QUEUE_NAME": "a b", "REDIS_TIMEOUT": "-1"})
    problems = "\n".join(caught.value.problems)
    for name in ("REDIS_URL", "DEVICE", "JOB_TIMEOUT", "MAX_IMAGES", "PRECISION", "QUEUE_NAME", "REDIS_TIMEOUT"):
        assert name in problems
    assert len(caught.value.problems) == 7
    assert "JOB_TIMEOUT='soon': must be an integer" in problems


def test_settings_cross_checks():
    with pytest.raises(SettingsError, match="DETECTOR_MAX_SIZE"):
        load_settings({"DETECTOR_MIN_SIZE": "800", "DETECTOR_MAX_SIZE": "600"})


def settings_table() -> list[tuple[list[str], list[str], list[str]]]:
    """docs/SERVICE.md's settings table: per row the variables, defaults and accepted values in backticks (a row
    may hold two settings, `A` / `B`)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "SERVICE.md").read_text()
    table = doc[doc.index("| variable | default | accepts | meaning |"):].split("\n\n")[0].splitlines()[2:]
    rows = []
    for line in table:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        rows.append(tuple(re.findall(r"`([^`]+)`", cell) for cell in cells[:3]))
    return rows


def test_service_doc_table_gives_every_setting_its_default_and_accepted_values():
    from service.settings import describe

    documented = {}
    for variables, defaults, accepts in settings_table():
        assert len(variables) == len(defaults) == len(accepts), variables
        for variable, default, allowed in zip(variables, defaults, accepts):
            assert variable not in documented, f"{variable} is in two rows"
            documented[variable] = (default, allowed)
    assert documented == {row.variable: (row.default, row.allowed) for row in describe()}


def test_every_integer_setting_takes_its_bounds_and_refuses_one_past_them():
    from service.settings import ENV_VARIABLES, IntRange, SettingsError, _ENV

    checked = 0
    for name, (variable, parser) in _ENV.items():
        if not isinstance(parser, IntRange):
            continue
        # the other size must not get in the way of DETECTOR_MAX_SIZE >= DETECTOR_MIN_SIZE
        base = {"DETECTOR_MIN_SIZE": "32"} if variable == "DETECTOR_MAX_SIZE" else {"DETECTOR_MAX_SIZE": "8000"}
        edges = [parser.low] + ([parser.high] if parser.high is not None else [parser.low * 1000 + 10 ** 9])
        for value in edges:
            assert getattr(load_settings({**base, variable: f" {value} "}), name) == value, variable
        past = [(parser.low - 1, f"must be between {parser.low} and {parser.high}" if parser.high is not None
                 else f"must be >= {parser.low}")]
        if parser.high is not None:
            past.append((parser.high + 1, f"must be between {parser.low} and {parser.high}"))
        for value, message in past:
            with pytest.raises(SettingsError) as caught:
                load_settings({**base, variable: str(value)})
            assert caught.value.problems == [f"{variable}={str(value)!r}: {message}"], variable
        with pytest.raises(SettingsError) as caught:
            load_settings({variable: "12.5"})
        assert caught.value.problems == [f"{variable}='12.5': must be an integer"]
        checked += 1
    assert checked >= 25  # the loop saw the integer settings (29 today)
    assert set(ENV_VARIABLES.values()) == {variable for variable, _ in _ENV.values()}


def test_python_m_service_settings_help_names_the_command(capsys):
    from service.settings import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m service.settings")
    said = " ".join(out.split())
    assert "every setting with its default, what it accepts and the value this environment gives it" in said
    assert "exit status 1 (with one line per problem) when the environment is invalid" in said


def test_python_m_service_settings_prints_the_table_or_every_problem(monkeypatch, capsys):
    from service.settings import describe, main

    for row in describe():
        monkeypatch.delenv(row.variable, raising=False)
    monkeypatch.setenv("MAX_IMAGES", "4")
    monkeypatch.setenv("DEVICE", " CPU ")
    assert main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["variable", "default", "allowed", "this", "environment"]
    # columns, left-aligned: each starts where the header's does
    starts = [lines[0].index(word) for word in ("default", "allowed", "this environment")]
    assert all(line[0] != " " and all(line[start - 2:start] == "  " and line[start] != " " for start in starts)
               for line in lines)
    by_variable = {line.split()[0]: line for line in lines[1:]}
    assert list(by_variable) == [row.variable for row in describe()]
    assert by_variable["MAX_IMAGES"].split()[1:] == ["8", "1", "…", "64", "4"]
    assert by_variable["DEVICE"].endswith("  cpu") and by_variable["QUEUE_NAME"].endswith("(default)")

    monkeypatch.setenv("DEVICE", "gpu")
    monkeypatch.setenv("MAX_TOP_K", "0")
    assert main([]) == 1
    err = capsys.readouterr().err
    assert "DEVICE='gpu': must be auto, cpu, cuda, cuda:N or mps" in err
    assert "MAX_TOP_K='0': must be between 1 and 1000" in err


@pytest.mark.parametrize("variable, raw, value", [
    ("REDIS_URL", " rediss://h:6380/1 ", "rediss://h:6380/1"),
    ("REDIS_URL", "unix:///run/redis.sock", "unix:///run/redis.sock"),
    ("QUEUE_NAME", " a.b-c_9 ", "a.b-c_9"),
    ("QUEUE_NAME", "q" * 64, "q" * 64),
    ("QUEUE_NAME", "Jobs-EU", "Jobs-EU"),  # not lower-cased: RQ's queue names are case-sensitive
    ("DEVICE", " CUDA:12 ", "cuda:12"),
    ("DEVICE", "mps", "mps"),
    ("PRECISION", " Fp16 ", "fp16"),
    ("LOG_LEVEL", "Warning", "WARNING"),
    ("REDIS_TIMEOUT", " 0.25 ", 0.25),
])
def test_each_kind_of_setting_accepts_its_values(variable, raw, value):
    from service.settings import ENV_VARIABLES

    name = next(name for name, env in ENV_VARIABLES.items() if env == variable)
    assert getattr(load_settings({variable: raw}), name) == value


@pytest.mark.parametrize("variable, raw, message", [
    ("REDIS_URL", "http://h:6379", "must start with redis://, rediss:// or unix://"),
    ("QUEUE_NAME", "q" * 65, "must be 1-64 letters, digits, '_', '.' or '-'"),
    ("QUEUE_NAME", "a/b", "must be 1-64 letters, digits, '_', '.' or '-'"),
    ("DEVICE", "cuda:", "must be auto, cpu, cuda, cuda:N or mps"),
    ("DEVICE", "cpu0", "must be auto, cpu, cuda, cuda:N or mps"),
    ("DEVICE", "xcpu", "must be auto, cpu, cuda, cuda:N or mps"),
    ("PRECISION", "fp64", "must be one of fp32, bf16, fp16"),
    ("LOG_LEVEL", "trace", "must be one of debug, info, warning, error"),
    ("REDIS_TIMEOUT", "0", "must be > 0"),
    ("REDIS_TIMEOUT", "nan", "must be > 0"),
    ("REDIS_TIMEOUT", "soon", "must be a number"),
])
def test_each_kind_of_setting_refuses_with_what_it_accepts(variable, raw, message):
    with pytest.raises(SettingsError) as caught:
        load_settings({variable: raw})
    assert caught.value.problems == [f"{variable}={raw!r}: {message}"]
    assert str(caught.value) == f"invalid settings:\n  {variable}={raw!r}: {message}"


def test_model_dir_expands_the_home_directory(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    assert str(load_settings({"MODEL_DIR": " ~/weights "}).model_dir) == "/home/someone/weights"


def test_equal_detector_sizes_pass_the_cross_check_and_the_heartbeat_is_a_third_of_its_ttl():
    settings = load_settings({"DETECTOR_MIN_SIZE": "600", "DETECTOR_MAX_SIZE": "600", "WORKER_HEARTBEAT_TTL": "7"})
    assert (settings.detector_min_size, settings.detector_max_size) == (600, 600)
    assert settings.heartbeat_interval == pytest.approx(7 / 3)
    with pytest.raises(SettingsError) as caught:
        load_settings({"DETECTOR_MIN_SIZE": "601", "DETECTOR_MAX_SIZE": "600", "MAX_IMAGES": "x"})
    assert caught.value.problems == ["MAX_IMAGES='x': must be an integer",
                                     "DETECTOR_MAX_SIZE must be >= DETECTOR_MIN_SIZE"]
    assert str(caught.value) == ("invalid settings:\n  MAX_IMAGES='x': must be an integer\n"
                                 "  DETECTOR_MAX_SIZE must be >= DETECTOR_MIN_SIZE")
