"""vilbert_train/pickles.py: numpy's own pickles of plain data load unchanged in every protocol; everything else a
pickle can spell with the admitted names is refused with a message that says what, and nothing from it runs."""

from __future__ import annotations

import codecs
import datetime
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vilbert_train import pickles
from vilbert_train.pickles import UnsafePickleError, load_file, loads

RECONSTRUCT = np._core.multiarray._reconstruct
SCALAR = np._core.multiarray.scalar
FROMBUFFER = np._core.numeric._frombuffer


class Call:
    """Pickles as func(*args), followed by BUILD(state) when a state is given: any call a pickle can spell."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def dtype_call(spec, state):
    return Call(np.dtype, (spec, False, True), state)


def array_call(state, shape=(0,), code=b"b"):
    return Call(RECONSTRUCT, (np.ndarray, shape, code), state)


def record():
    """Every kind of value the released records and caches hold, and the dtypes numpy pickles differently."""
    return {
        "image_id": b"42", "image_w": 640, "image_h": np.int64(480), "num_boxes": np.int32(2),
        "boxes": np.arange(8, dtype=np.float32).reshape(2, 4),
        "features": np.linspace(0, 1, 6, dtype=np.float64).reshape(2, 3, order="F"),
        "big_endian": np.arange(3, dtype=">i4"),  # numpy's unpickling swaps it to native order
        "mask": np.array([True, False]), "complex": np.array([1 + 2j], np.complex64),
        "ids": np.array([b"abc", b"d"]), "names": np.array(["ab", "c"]), "zero_d": np.array(7, np.uint16),
        "empty": np.zeros((0, 4), np.float32), "score": np.float32(0.25), "flag": np.bool_(True),
        "pool": [(1, 2.5), {"nested": [np.int8(-3)]}],
    }


def assert_same(loaded, expected):
    assert type(loaded) is type(expected)
    if isinstance(expected, np.ndarray):
        assert loaded.dtype == expected.dtype and loaded.dtype.str == expected.dtype.str
        assert loaded.flags.f_contiguous == expected.flags.f_contiguous
        np.testing.assert_array_equal(loaded, expected)
    elif isinstance(expected, dict):
        assert loaded.keys() == expected.keys()
        for key in expected:
            assert_same(loaded[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(loaded) == len(expected)
        for item, want in zip(loaded, expected):
            assert_same(item, want)
    else:
        assert loaded == expected and getattr(loaded, "dtype", None) == getattr(expected, "dtype", None)


# ---------------------------------------------------------------------------------------------------- what loads


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_pickles_of_every_protocol_load_as_pickle_loads_them(protocol):
    data = pickle.dumps(record(), protocol=protocol)
    assert_same(loads(data), pickle.loads(data))
    assert_same(loads(data)["boxes"], record()["boxes"])


def test_python2_pickles_spell_bytes_as_text():
    """numpy under Python 2 wrote the type code and the raw bytes as str opcodes, which encoding="latin1" reads
    as text: _reconstruct(ndarray, (0,), 'b') and scalar(dtype, '<bytes>')."""
    raw = np.array([1.5, -2.0], "<f8").tobytes()
    array = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
             b"(K\x01K\x02\x85cnumpy\ndtype\nU\x02f8\x89\x88\x87R"
             b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             b"\x89U\x10" + raw + b"tb.")
    np.testing.assert_array_equal(loads(array), [1.5, -2.0])
    scalar = (b"\x80\x02cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nU\x02f4\x89\x88\x87R"
              b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tbU\x04" + struct.pack("<f", 1.5) + b"\x86R.")
    value = loads(scalar)
    assert value == 1.5 and value.dtype == np.float32


def test_an_array_without_its_state_is_numpys_empty_placeholder():
    empty = loads(pickle.dumps(Call(RECONSTRUCT, (np.ndarray, (0,), b"b")), protocol=2))
    assert empty.shape == (0,) and empty.dtype == np.int8


def test_a_dtype_state_may_set_the_byte_order():
    big = loads(pickle.dumps(dtype_call("f8", (3, ">", None, None, None, -1, -1, 0)), protocol=2))
    assert big.str == ">f8"
    assert np.dtype("f8").str == "<f8"  # numpy's shared dtype is never the one changed


# ------------------------------------------------------------------------------------------ what is refused


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_call_to_anything_else_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafePickleError, match=r"^<bytes>: refusing pickle that references the global "
                                                r"(posix|os)\.system$"):
        loads(pickle.dumps({"features": Exploit(marker)}))
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match=r"^<bytes>: refusing pickle that references the global "
                                                r"datetime\.date$"):
        loads(pickle.dumps([datetime.date(2020, 1, 1)]))


STATE = (3, "<", None, None, None, -1, -1, 0)


@pytest.mark.parametrize("payload, message", [
    # arrays of Python objects, records, datetimes: numpy would rebuild objects or trust field offsets
    (np.array([1, "x"], dtype=object), "refusing numpy dtype dtype('O') (only plain numbers, bytes and text)"),
    (np.zeros(2, [("a", "<f8")]), "refusing numpy dtype dtype('V8') (only plain numbers, bytes and text)"),
    (np.zeros(2, "datetime64[s]"), "refusing numpy dtype dtype('<M8') (only plain numbers, bytes and text)"),
    (dtype_call([("a", "<f8")], None), "refusing numpy dtype from a list (numpy pickles a type code)"),
    # a dtype's state that claims Python objects inside, or a larger item than the data holds
    (dtype_call("f8", (3, "<", None, None, None, -1, -1, 1)),
     "refusing numpy dtype state (3, '<', None, None, None, -1, -1, 1) for float64 (only its byte order may change)"),
    (dtype_call("S1", (3, "|", None, None, None, 4096, 1, 0)),
     "refusing numpy dtype state (3, '|', None, None, None, 4096, 1, 0) for |S1 (only its byte order may change)"),
    (dtype_call("V8", (3, "|", None, ("a",), {"a": (np.dtype("<f8"), 1 << 30)}, 8, 1, 16)),
     "refusing numpy dtype dtype('V8') (only plain numbers, bytes and text)"),
    (dtype_call("f8", (3, "x", None, None, None, -1, -1, 0)),
     "refusing numpy dtype state (3, 'x', None, None, None, -1, -1, 0) for float64 (only its byte order may change)"),
    (dtype_call("f8", (2, "<", None, None, None, -1, -1, 0)),
     "refusing numpy dtype state (2, '<', None, None, None, -1, -1, 0) for float64 (only its byte order may change)"),
    # _reconstruct other than numpy's placeholder: another type, a huge uninitialised array, an object array
    (Call(RECONSTRUCT, (np.dtype, (0,), b"b")), "refusing _reconstruct(<function _dtype at "),
    (Call(RECONSTRUCT, (np.ndarray, (1 << 40,), b"b")), "refusing _reconstruct(numpy.ndarray, (1099511627776,), b'b')"
                                                         " (numpy writes _reconstruct(numpy.ndarray, (0,), b'b'))"),
    (Call(RECONSTRUCT, (np.ndarray, (0,), b"O")), "refusing _reconstruct(numpy.ndarray, (0,), b'O')"),
    # an array state that is not bytes, and one with a dtype not built by the pickle
    (array_call((1, (1,), dtype_call("f8", STATE), False, [1.0])), "refusing a numpy array whose data is a list"),
    (array_call((1, (1,), "f8", False, b"\0" * 8)), "refusing numpy dtype 'f8' (only plain numbers, bytes and text)"),
    # numpy.ndarray may only be _reconstruct's argument: called, it would wrap any buffer with any strides
    (Call(np.ndarray, ((2,), dtype_call("f8", STATE))),
     "not a valid pickle (TypeError: '_NdarrayToken' object is not callable)"),
    # scalars and protocol-5 buffers
    (Call(SCALAR, (dtype_call("f8", STATE), b"\0" * 4)), "refusing a numpy float64 scalar that is not 8 bytes"),
    (Call(SCALAR, (dtype_call("f8", STATE), 1.0)), "refusing a numpy float64 scalar that is not 8 bytes"),
    (Call(SCALAR, ("f8", b"\0" * 8)), "refusing numpy dtype 'f8'"),
    (Call(FROMBUFFER, (b"\0" * 8, dtype_call("f8", STATE), (1,), "A")),
     "refusing _frombuffer in order 'A' (numpy writes 'C' or 'F')"),
    (Call(FROMBUFFER, (b"\0" * 8, "f8", (1,), "C")), "refusing numpy dtype 'f8'"),
    # bytes are encode(str, 'latin1'); any other codec is a call into the codec registry
    (Call(codecs.encode, ("abc", "rot13")),
     "refusing _codecs.encode(str, 'rot13') (pickle spells bytes as encode(str, 'latin1'))"),
    (Call(codecs.encode, (b"abc", "latin1")), "refusing _codecs.encode(bytes, 'latin1')"),
    # bytes() is empty bytes; bytes(n) would allocate n
    (Call(bytes, (1 << 40,)), "refusing bytes(1099511627776,) (pickle writes bytes() for empty bytes only)"),
])
def test_what_numpy_would_build_unchecked_is_refused(payload, message):
    with pytest.raises(UnsafePickleError) as refused:
        loads(pickle.dumps(payload, protocol=2), "record 7")
    assert str(refused.value).startswith(f"record 7: {message}")


def test_a_dtype_changed_after_an_array_was_built_is_refused():
    """The pickle builds an |S1 array from 2 bytes, then sets the same dtype object's item size to 4096: numpy
    would then read 8 KB from the 2-byte buffer (what an earlier version of this reader returned)."""
    dtype = b"cnumpy\ndtype\n(X\x02\x00\x00\x00S1\x89\x88tRq\x00(K\x03X\x01\x00\x00\x00|NNNK\x01K\x01K\x00tb0"
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
             b"(K\x01K\x02\x85h\x00\x89C\x02hitb")
    grow = b"h\x00(K\x03X\x01\x00\x00\x00|NNNM\x00\x10K\x01K\x00tb0."
    with pytest.raises(UnsafePickleError, match=r"state \(3, '\|', None, None, None, 4096, 1, 0\) for \|S1"):
        loads(b"\x80\x02" + dtype + array + grow)
    assert loads(b"\x80\x02" + dtype + array + b".").tolist() == [b"h", b"i"]


def test_an_array_keeps_its_own_copy_of_the_dtype():
    """Even a dtype change numpy allows (the byte order) made after the array was built leaves the array as it was."""
    dtype = (b"cnumpy\ndtype\n(X\x02\x00\x00\x00i2\x89\x88tRq\x00"
             b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb0")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
             b"(K\x01K\x01\x85h\x00\x89C\x02\x01\x00tb")
    swap = b"h\x00(K\x03X\x01\x00\x00\x00>NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb0."
    loaded = loads(b"\x80\x02" + dtype + array + swap)
    assert loaded.dtype.str == "<i2" and loaded.tolist() == [1]


@pytest.mark.parametrize("target, kind", [
    (b"cnumpy._core.multiarray\nscalar\n", "function"),  # would set the checked constructor's defaults
    (b"cnumpy\nndarray\n", "_NdarrayToken"),
    (b"]", "list"),
    (b"C\x01x", "bytes"),
])
def test_state_is_set_only_on_arrays_and_dtypes(target, kind):
    defaults = pickles._scalar.__defaults__
    state = b"N}X\x0c\x00\x00\x00__defaults__C\x04AAAA\x85s\x86"  # (None, {"__defaults__": (b"AAAA",)})
    with pytest.raises(UnsafePickleError, match=rf"^<bytes>: refusing to set the state of a {kind}$"):
        loads(b"\x80\x02" + target + state + b"b.")
    assert pickles._scalar.__defaults__ == defaults


def test_persistent_ids_and_broken_streams_are_refused():
    with pytest.raises(UnsafePickleError, match=r"^<bytes>: refusing pickle that uses persistent ids$"):
        loads(b"(lp0\nPfoo\na.")
    with pytest.raises(UnsafePickleError, match=r"^label: not a valid pickle \(ValueError: invalid literal for int\(\) "
                                                r"with base 10: b'arbag'\)$"):
        loads(b"\x80\x04garbage", "label")
    with pytest.raises(UnsafePickleError, match=r"^<bytes>: not a valid pickle \(EOFError"):
        loads(pickle.dumps(record())[:-40])


def test_refusals_quote_what_the_pickle_gave_briefly():
    """A crafted file could pass gigabytes where a type code or a codec name goes; the message stays one line."""
    huge = "x" * 1_000_000
    for payload, start in [(Call(codecs.encode, ("abc", huge)), "<bytes>: refusing _codecs.encode(str, 'xxxxxxxxxxx"),
                           (dtype_call("f8", (3, huge)), "<bytes>: refusing numpy dtype state (3, 'xxxxxxxxx"),
                           (Call(RECONSTRUCT, (np.ndarray, (huge,), b"b")), "<bytes>: refusing _reconstruct(numpy."),
                           (Call(bytes, (huge,)), "<bytes>: refusing bytes('xxxxx")]:
        with pytest.raises(UnsafePickleError) as refused:
            loads(pickle.dumps(payload, protocol=2))
        assert str(refused.value).startswith(start) and len(str(refused.value)) < 300
    with pytest.raises(UnsafePickleError) as broken:
        loads(pickle.dumps(Call(FROMBUFFER, (b"\0" * 8, dtype_call("f8", STATE), (1234567,) * 40, "C")), protocol=2))
    assert str(broken.value).startswith("<bytes>: not a valid pickle (ValueError: ")
    assert len(str(broken.value)) == len("<bytes>: not a valid pickle ()") + pickles.MAX_REASON


# ------------------------------------------------------------------------------------------------------ files


def test_files_load_and_name_themselves_in_errors(tmp_path, monkeypatch):
    path = tmp_path / "train_target.pkl"
    path.write_bytes(pickle.dumps([{"labels": np.array([3, 9]), "scores": [0.3, 1.0]}], protocol=2))
    loaded = load_file(str(path))
    np.testing.assert_array_equal(loaded[0]["labels"], [3, 9])
    with pytest.raises(FileNotFoundError, match=rf"^required file not found: {tmp_path / 'missing.pkl'}$"):
        load_file(tmp_path / "missing.pkl")
    with pytest.raises(FileNotFoundError, match="required file not found"):
        load_file(tmp_path)
    path.write_bytes(pickle.dumps(Exploit("x")))
    with pytest.raises(UnsafePickleError, match=rf"^{path}: refusing pickle that references the global"):
        load_file(path)
    monkeypatch.setattr(pickles, "MAX_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(UnsafePickleError, match=rf"^{path}: larger than {path.stat().st_size - 1} bytes$"):
        load_file(path)
    monkeypatch.setattr(pickles, "MAX_FILE_BYTES", path.stat().st_size)
    with pytest.raises(UnsafePickleError, match="references the global"):
        load_file(path)


# --------------------------------------------------------------------------------------------------- fuzzing


SEEDS = [pickle.dumps(record(), protocol=protocol) for protocol in (0, 2, 5)]


def check_loaded(value, size, seen):
    """Nothing but plain values comes out, and no array is larger than the pickle that made it."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            check_loaded(key, size, seen)
            check_loaded(item, size, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            check_loaded(item, size, seen)
    elif isinstance(value, (np.ndarray, np.generic)):
        assert value.dtype.kind in pickles.PLAIN_KINDS and value.nbytes <= size
    elif isinstance(value, np.dtype):
        assert value.kind in pickles.PLAIN_KINDS
    else:
        plain = (str, bytes, bytearray, int, float, complex, bool, type(None), pickles._NdarrayToken)
        assert isinstance(value, plain) or callable(value), type(value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4),
       st.integers(0, 1 << 20))
def test_damaged_pickles_load_plain_data_or_are_refused(seed, flips, cut):
    data = bytearray(seed[: max(1, cut % (len(seed) + 1))])
    for position, value in flips:
        data[position % len(data)] = value
    try:
        value = loads(bytes(data))
    except UnsafePickleError:
        return
    check_loaded(value, len(data), set())
