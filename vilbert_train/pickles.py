"""Reading the released pickles (feature-LMDB records, answer targets, hard negatives) without trusting them.

The official data ships as pickles: every record of the region-feature LMDBs is a pickled dict of numpy arrays,
and the caches (`cache/*_target.pkl`, `hard_negative.pkl`, `refs(unc).p`) are pickled containers. A pickle can
call any importable function, so this unpickler admits exactly the globals that plain numpy arrays, numpy
scalars and Python-2 byte strings need, each wrapped so it can only build data:

* `numpy.core.multiarray._reconstruct` / `numpy._core.multiarray._reconstruct` (only for `numpy.ndarray`),
* `numpy.core.numeric._frombuffer` / `numpy._core.numeric._frombuffer` (protocol 5, numeric dtypes only),
* `numpy.ndarray`, `numpy.dtype` (object dtypes refused: they would unpickle arbitrary objects),
* `numpy.core.multiarray.scalar` / `numpy._core.multiarray.scalar` (numeric dtypes only),
* `_codecs.encode` (only to latin-1, which is how protocol-2 pickles spell `bytes`).

`vilbert_train/safe_pickle.py` (answer lists) admits no globals at all, which cannot read numpy records, so this is the
numpy-admitting sibling; answer lists still go through `safe_pickle.load_label2ans`.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "loads", "load_file"]

MAX_FILE_BYTES = 4 << 30


class UnsafePickleError(ValueError):
    """The pickle names something other than the numpy data types it may contain, or is malformed."""


def _checked_dtype(spec: Any, *args: Any) -> np.dtype:
    dtype = np.dtype(spec, *args)
    if dtype.hasobject:
        raise UnsafePickleError("refusing a numpy array of Python objects")
    return dtype


def _checked_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refusing to reconstruct {subtype!r} (only numpy.ndarray)")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _checked_scalar(dtype: Any, data: bytes | None = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("refusing a numpy scalar of object dtype")
    return dtype.type() if data is None else np.frombuffer(data, dtype=dtype, count=1)[0]


def _checked_frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """Protocol-5 pickles spell arrays as numpy._core.numeric._frombuffer(buffer, dtype, shape, order)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("refusing a numpy array of Python objects")
    array = np.frombuffer(buffer, dtype=dtype)
    return array.reshape(shape, order=order).copy(order="K") if order in ("C", "F") else array.reshape(shape).copy()


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1"):
        raise UnsafePickleError(f"refusing _codecs.encode to {encoding!r}")
    return text.encode("latin-1", errors)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy.core.multiarray", "scalar"): _checked_scalar,
    ("numpy._core.multiarray", "scalar"): _checked_scalar,
    ("numpy.core.numeric", "_frombuffer"): _checked_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _checked_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _checked_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class NumpyDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing pickle that references the global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing pickle that uses persistent ids")


def loads(data: bytes, label: str = "<bytes>") -> Any:
    """Unpickle `data` admitting only plain containers, scalars and numeric numpy arrays.

    encoding="latin1" lets Python-2 pickles (the REFER `refs(unc).p`, old caches) load their byte strings and
    array buffers, as numpy recommends; Python-3 pickles are unaffected."""
    try:
        return NumpyDataUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{label}: {exc}") from None
    except RecursionError:
        raise UnsafePickleError(f"{label}: pickle nests too deeply") from None
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, TypeError from a malformed stream
        raise UnsafePickleError(f"{label}: not a valid pickle ({type(exc).__name__}: {exc})") from None


def load_file(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"required file not found: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise UnsafePickleError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    return loads(path.read_bytes(), str(path))
