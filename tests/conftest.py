"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from stack import Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("stack"))
    yield stack
    stack.close()
