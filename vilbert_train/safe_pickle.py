"""Read the released ``trainval_label2ans.pkl`` answer lists without trusting pickle.

The official VQA and GQA answer vocabularies exist only as pickles inside ``datasets.tar.gz``.
A pickle is a program: ``pickle.load`` on a downloaded file runs whatever callables it names.
These files hold nothing but a list of strings, so the reader below refuses every global
(``find_class`` always raises) and persistent ids, which leaves only the opcodes that build
plain containers and scalars. The loaded object is then checked to be a list of ``str``
(or a dict ``{int: str}`` with contiguous keys 0..n-1, accepted for robustness).

Pure standard library, in the packaged trainer (vilbert_train imports no torch at package level), so that
models/fetch.py and an installed trainer read the same way.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Union

__all__ = ["Label2AnsError", "load_label2ans", "MAX_PICKLE_BYTES"]

# The real files are ~60 KB (VQA) and ~25 KB (GQA); anything far larger is not an answer list.
MAX_PICKLE_BYTES = 16 * 1024 * 1024


class Label2AnsError(ValueError):
    """The input is not a plain answer list (unsafe, malformed, or of the wrong shape)."""


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickler that admits no globals at all: no classes, functions or reducers can be named."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        raise Label2AnsError(f"refusing pickle that references the global {module}.{name}")

    def persistent_load(self, pid):  # noqa: D401 - pickle hook
        raise Label2AnsError("refusing pickle that uses persistent ids")


def _read_bytes(source: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = "<bytes>"
    else:
        path = Path(source)
        label = str(path)
        try:
            size = path.stat().st_size
            if size > MAX_PICKLE_BYTES:
                raise Label2AnsError(f"{label} is {size} bytes; an answer list is at most {MAX_PICKLE_BYTES}")
            data = path.read_bytes()
        except OSError as exc:
            raise Label2AnsError(f"cannot read {label}: {exc.strerror or exc}") from None
    if len(data) > MAX_PICKLE_BYTES:
        raise Label2AnsError(f"{label} is {len(data)} bytes; an answer list is at most {MAX_PICKLE_BYTES}")
    if not data:
        raise Label2AnsError(f"{label} is empty")
    return data, label


def load_label2ans(source: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> list[str]:
    """Load a ``label2ans`` pickle (path or raw bytes) as a list of answer strings.

    Index ``i`` of the result is the answer for classifier output ``i``. Raises
    :class:`Label2AnsError` with a one-line reason for anything that is not a plain list of
    strings; no code from the pickle is ever executed.
    """
    data, label = _read_bytes(source)
    try:
        obj = _NoGlobalsUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except Label2AnsError as exc:
        raise Label2AnsError(f"{label}: {exc}") from None
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... from a malformed stream
        raise Label2AnsError(f"{label}: not a valid pickle ({type(exc).__name__}: {exc})") from None

    if isinstance(obj, dict):
        # Normalise {index: answer} into the list form the model code indexes.
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            raise Label2AnsError(f"{label}: dict keys must be integer label ids")
        if sorted(obj) != list(range(len(obj))):
            raise Label2AnsError(f"{label}: label ids must be exactly 0..{len(obj) - 1}")
        obj = [obj[i] for i in range(len(obj))]
    if not isinstance(obj, list):
        raise Label2AnsError(f"{label}: expected a list of answers, got {type(obj).__name__}")
    for i, answer in enumerate(obj):
        if not isinstance(answer, str):
            raise Label2AnsError(f"{label}: entry {i} is {type(answer).__name__}, not str")
    if not obj:
        raise Label2AnsError(f"{label}: the answer list is empty")
    return list(obj)
