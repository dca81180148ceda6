"""vilbert_train/safe_pickle.py: plain answer lists load; anything naming a global is refused unexecuted."""
from __future__ import annotations

import datetime
import os
import pickle

import pytest

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
    ({"yes": 0}, "integer label ids"),          # ans2label instead of label2ans
    (["yes", 3], "entry 1 is int"),
    ("yes", "expected a list"),
    ([], "empty"),
])
def test_wrong_shapes_are_refused(obj, message):
    with pytest.raises(Label2AnsError, match=message):
        load_label2ans(pickle.dumps(obj))


def test_classes_and_garbage_are_refused(tmp_path):
    with pytest.raises(Label2AnsError, match="global"):
        load_label2ans(pickle.dumps([datetime.date(2020, 1, 1)]))  # even harmless classes are globals
    with pytest.raises(Label2AnsError, match="not a valid pickle"):
        load_label2ans(b"\x80\x04garbage")
    with pytest.raises(Label2AnsError, match="persistent"):
        load_label2ans(b"(lp0\nPfoo\na.")
    with pytest.raises(Label2AnsError, match="cannot read"):
        load_label2ans(tmp_path / "missing.pkl")
