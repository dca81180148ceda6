"""vilbert_train/safe_pickle.py: plain answer lists load; anything naming a global is refused unexecuted."""
from __future__ import annotations

import datetime
import os
import pickle

import pytest

from vilbert_train import safe_pickle
from vilbert_train.safe_pickle import Label2AnsError, load_label2ans


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_plain_list_loads(tmp_path, protocol):
    answers = ["yes", "no", "2", "café"]
    path = tmp_path / "label2ans.pkl"
    path.write_bytes(pickle.dumps(answers, protocol=protocol))
    assert load_label2ans(path) == answers
    assert load_label2ans(path.read_bytes()) == answers


def test_python2_pickles_read_their_text_as_utf8():
    """Python 2 wrote answers as byte strings (STRING opcodes); they are UTF-8."""
    assert load_label2ans(b"(lp0\nS'caf\\xc3\\xa9'\np1\naS'yes'\np2\na.") == ["caf\u00e9", "yes"]


def test_index_dict_becomes_list():
    assert load_label2ans(pickle.dumps({1: "b", 0: "a"})) == ["a", "b"]
    with pytest.raises(Label2AnsError, match="0..1"):
        load_label2ans(pickle.dumps({0: "a", 2: "c"}))


def test_reduce_to_os_system_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps([_Exploit(str(marker))])
    with pytest.raises(Label2AnsError, match=r"global (posix|os|nt)\.system"):
        load_label2ans(payload)
    assert not marker.exists()
    # Protocol-0 GLOBAL opcode, hand-written.
    with pytest.raises(Label2AnsError, match="global"):
        load_label2ans(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    assert not marker.exists()


@pytest.mark.parametrize("obj, message", [
    ({"yes": 0}, "dict keys must be integer label ids"),          # ans2label instead of label2ans
    ({True: "yes"}, "dict keys must be integer label ids"),
    (["yes", 3], "entry 1 is int, not str"),
    ("yes", "expected a list of answers, got str"),
    ([], "the answer list is empty"),
])
def test_wrong_shapes_are_refused(obj, message):
    with pytest.raises(Label2AnsError) as refused:
        load_label2ans(pickle.dumps(obj))
    assert str(refused.value) == f"<bytes>: {message}"


def test_classes_and_garbage_are_refused(tmp_path):
    with pytest.raises(Label2AnsError, match=r"^<bytes>: refusing pickle that references the global datetime\.date$"):
        load_label2ans(pickle.dumps([datetime.date(2020, 1, 1)]))  # even harmless classes are globals
    with pytest.raises(Label2AnsError, match=r"^<bytes>: not a valid pickle \(UnpicklingError: "):
        load_label2ans(b"\x80\x04]\x94garbage")
    with pytest.raises(Label2AnsError, match=r"^<bytes>: refusing pickle that uses persistent ids$"):
        load_label2ans(b"(lp0\nPfoo\na.")
    missing = tmp_path / "missing.pkl"
    with pytest.raises(Label2AnsError, match=rf"^cannot read {missing}: No such file or directory$"):
        load_label2ans(missing)
    with pytest.raises(Label2AnsError, match=rf"^cannot read {tmp_path}: Is a directory$"):
        load_label2ans(tmp_path)


def test_files_are_bounded_and_name_themselves(tmp_path, monkeypatch):
    path = tmp_path / "trainval_label2ans.pkl"
    path.write_bytes(pickle.dumps(["yes", 7]))
    with pytest.raises(Label2AnsError, match=rf"^{path}: entry 1 is int, not str$"):
        load_label2ans(str(path))
    size = path.stat().st_size
    monkeypatch.setattr(safe_pickle, "MAX_PICKLE_BYTES", size)
    with pytest.raises(Label2AnsError, match="entry 1"):  # at the limit: read
        load_label2ans(path)
    with pytest.raises(Label2AnsError, match="entry 1"):
        load_label2ans(path.read_bytes())
    monkeypatch.setattr(safe_pickle, "MAX_PICKLE_BYTES", size - 1)
    with pytest.raises(Label2AnsError, match=rf"^{path} is {size} bytes; an answer list is at most {size - 1}$"):
        load_label2ans(path)
    with pytest.raises(Label2AnsError, match=rf"^<bytes> is {size} bytes; an answer list is at most {size - 1}$"):
        load_label2ans(bytearray(path.read_bytes()))
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(Label2AnsError, match=rf"^{empty} is empty$"):
        load_label2ans(empty)
    with pytest.raises(Label2AnsError, match=r"^<bytes> is empty$"):
        load_label2ans(memoryview(b""))
