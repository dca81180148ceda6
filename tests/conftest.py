"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from stack import Stack


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
