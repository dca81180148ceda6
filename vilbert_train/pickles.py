"""Reading the released pickles (feature-LMDB records, answer targets, hard negatives) without trusting them.

The official data ships as pickles: every record of the region-feature LMDBs is a pickled dict of numpy arrays,
and the caches (`cache/*_target.pkl`, `hard_negative.pkl`, `refs(unc).p`) are pickled containers. A pickle is a
program, so the reader below admits only what plain numpy arrays, numpy scalars and byte strings need, in exactly
the form numpy and pickle write them:

* Globals (`find_class`): `numpy.core.multiarray._reconstruct` / `numpy._core.multiarray._reconstruct` (only as
  `_reconstruct(numpy.ndarray, (0,), b'b')`), `numpy.core.numeric._frombuffer` / `numpy._core.numeric._frombuffer`
  (protocol 5), `numpy.core.multiarray.scalar` / `numpy._core.multiarray.scalar`, `numpy.dtype`, `numpy.ndarray`
  (only as `_reconstruct`'s first argument, never called) and `_codecs.encode` (only `encode(str, 'latin1')`, how
  protocol 2 spells `bytes`) and `bytes` (only `bytes()`, how protocols 0 to 2 spell empty bytes). Each is a
  checked constructor, not the function itself.
* dtypes: plain numbers, booleans, bytes and text only (no objects, records, sub-arrays or datetimes).
* State (the BUILD opcode, which calls `__setstate__`): only on numpy arrays and dtypes, and only in numpy's own
  form. A dtype's state may set its byte order and nothing else; numpy's `dtype.__setstate__` would otherwise set
  item size, flags and field offsets unchecked: an earlier version of this reader let a crafted record grow an
  array's item size after the array was built, and reading that array returned heap memory far past its buffer.
  Arrays and scalars are built with a new dtype equal to the one the pickle gave, so a dtype the pickle changes
  later cannot reach them.

The C unpickler cannot be told to check BUILD, so this one extends pickle's pure-Python unpickler
(`pickle._Unpickler`; `bench/bench_pickles.py` measures the cost against the C one, docs/PERFORMANCE.md).

`vilbert_train/safe_pickle.py` (answer lists) admits no globals at all, which cannot read numpy records, so this is the
numpy-admitting sibling; answer lists still go through `safe_pickle.load_label2ans`.
"""

from __future__ import annotations

import io
import os
import pickle
import reprlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "loads", "load_file"]

MAX_FILE_BYTES = 4 << 30

# numpy's kinds of booleans, signed and unsigned integers, floats, complex numbers, bytes and text
PLAIN_KINDS = "biufcSU"
BYTE_ORDERS = ("<", ">", "|", "=")


# Refusals quote what the pickle gave, shortened: a crafted file could pass a string of gigabytes.
_brief = reprlib.Repr()
_brief.maxstring = _brief.maxother = 60
_brief.maxtuple = 8
brief = _brief.repr
MAX_REASON = 200  # characters of a parser's own error message quoted


class UnsafePickleError(ValueError):
    """The pickle names something other than the numpy data types it may contain, or is malformed."""


class _NdarrayToken:
    """numpy.ndarray as the pickle may name it: _reconstruct's first argument, never called (called, numpy.ndarray
    would wrap any buffer with any dtype and strides) and never changed."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


NDARRAY = _NdarrayToken()


def plain_dtype(dtype: Any) -> np.dtype:
    """A new dtype equal to `dtype`, which must hold plain numbers, booleans, bytes or text.

    Arrays and scalars are built with this copy rather than the pickle's own dtype object, which a later BUILD
    in the same pickle could change."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in PLAIN_KINDS:
        raise UnsafePickleError(f"refusing numpy dtype {brief(dtype)} (only plain numbers, bytes and text)")
    return np.dtype(dtype.str)


def _dtype(spec: Any, *_align_copy: Any) -> np.dtype:
    """numpy.dtype(spec, align, copy) as numpy pickles it; always a new copy (never numpy's shared one), which the
    BUILD that follows may give a byte order. Alignment means nothing for plain dtypes."""
    if not isinstance(spec, str):
        raise UnsafePickleError(f"refusing numpy dtype from a {type(spec).__name__} (numpy pickles a type code)")
    dtype = np.dtype(spec, copy=True)
    plain_dtype(dtype)
    return dtype


def _reconstruct(subtype: Any, shape: Any, code: Any) -> np.ndarray:
    """The empty array that numpy's pickles create first and fill with BUILD."""
    if subtype is not NDARRAY or shape != (0,) or code not in (b"b", "b"):
        raise UnsafePickleError(f"refusing _reconstruct{brief((subtype, shape, code))} (numpy writes "
                                "_reconstruct(numpy.ndarray, (0,), b'b'))")
    return np.empty(0, np.int8)


def _scalar(dtype: Any, data: Any) -> Any:
    dtype = plain_dtype(dtype)
    if isinstance(data, str):  # Python 2 pickles spell the scalar's bytes as text
        data = data.encode("latin-1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"refusing a numpy {dtype} scalar that is not {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype)[0]


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Protocol 5 spells arrays as numpy._core.numeric._frombuffer(buffer, dtype, shape, order)."""
    if order not in ("C", "F"):
        raise UnsafePickleError(f"refusing _frombuffer in order {brief(order)} (numpy writes 'C' or 'F')")
    return np.frombuffer(buffer, plain_dtype(dtype)).reshape(shape, order=order).copy(order="K")


def _latin1_encode(text: Any, encoding: Any) -> bytes:
    if encoding != "latin1" or not isinstance(text, str):
        raise UnsafePickleError(f"refusing _codecs.encode({type(text).__name__}, {brief(encoding)}) (pickle spells "
                                "bytes as encode(str, 'latin1'))")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """Protocols 0 to 2 spell empty bytes (an empty array's data) as bytes(); with an argument it would allocate."""
    if args:
        raise UnsafePickleError(f"refusing bytes{brief(args)} (pickle writes bytes() for empty bytes only)")
    return b""


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


def _array_state(state: Any) -> tuple:
    """An array's state as numpy writes it, (1, shape, dtype, fortran, bytes), with a new copy of its dtype."""
    version, shape, dtype, fortran, data = state
    if not isinstance(data, (bytes, str)):  # numpy pickles an array of objects as a list
        raise UnsafePickleError(f"refusing a numpy array whose data is a {type(data).__name__}")
    return version, shape, plain_dtype(dtype), fortran, data


def _dtype_state(dtype: np.dtype, state: Any) -> Any:
    """A dtype's state may differ from the one it has only in its byte order."""
    own = dtype.__reduce__()[2]  # (3, byte order, subarray, names, fields, item size, alignment, flags)
    if state[:1] + state[2:] != own[:1] + own[2:] or state[1] not in BYTE_ORDERS:
        raise UnsafePickleError(f"refusing numpy dtype state {brief(state)} for {dtype} (only its byte order may "
                                "change)")
    return state


class NumpyDataUnpickler(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing pickle that references the global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing pickle that uses persistent ids")

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, np.ndarray):
            target.__setstate__(_array_state(state))
        elif isinstance(target, np.dtype):
            target.__setstate__(_dtype_state(target, state))
        else:
            raise UnsafePickleError(f"refusing to set the state of a {type(target).__name__}")

    dispatch[pickle.BUILD[0]] = load_build


def loads(data: bytes, label: str = "<bytes>") -> Any:
    """Unpickle `data` admitting only plain containers, scalars and numeric numpy arrays.

    encoding="latin1" lets Python-2 pickles (the REFER `refs(unc).p`, old caches) load their byte strings and
    array buffers, as numpy recommends; Python-3 pickles are unaffected."""
    try:
        return NumpyDataUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{label}: {exc}") from None
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, TypeError from a malformed stream
        reason = f"{type(exc).__name__}: {exc}"
        raise UnsafePickleError(f"{label}: not a valid pickle ({reason[:MAX_REASON]})") from None


def load_file(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"required file not found: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise UnsafePickleError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    return loads(path.read_bytes(), str(path))
