"""Answer lists of the VQA-style heads: the bundle layout, and every way a list file can be wrong.

Each error is checked by its type and its whole message, since the message (with the file's path) is what an
operator reads when a weights bundle is broken.
"""

from __future__ import annotations

import json
import re

import pytest

from vilbert.answers import ANSWER_LISTS, AnswerListError, load_answer_list, load_bundle_answers
from vilbert.configuration import GQA_NUM_ANSWERS, VQA_NUM_ANSWERS


def test_bundle_files_and_sizes():
    assert ANSWER_LISTS == {"vqa": ("vqa_answers.json", VQA_NUM_ANSWERS), "gqa": ("gqa_answers.json", GQA_NUM_ANSWERS)}
    assert (VQA_NUM_ANSWERS, GQA_NUM_ANSWERS) == (3129, 1533)


def test_bundle_answers_are_read_in_order(tmp_path):
    vqa = [f"vqa answer {i}" for i in range(VQA_NUM_ANSWERS)]
    gqa = [f"gqa ünïcode {i}" for i in range(GQA_NUM_ANSWERS)]
    (tmp_path / "vqa_answers.json").write_text(json.dumps(vqa), encoding="utf-8")
    # Raw UTF-8, not \u escapes: the file must be read as UTF-8 whatever the locale.
    (tmp_path / "gqa_answers.json").write_text(json.dumps(gqa, ensure_ascii=False), encoding="utf-8")
    assert load_bundle_answers(str(tmp_path)) == {"vqa": vqa, "gqa": gqa}


def test_bundle_with_a_missing_list_names_it(tmp_path):
    (tmp_path / "vqa_answers.json").write_text(json.dumps(["a"] * VQA_NUM_ANSWERS))
    with pytest.raises(FileNotFoundError) as err:
        load_bundle_answers(tmp_path)
    assert str(err.value) == f"answer list not found: {tmp_path / 'gqa_answers.json'}"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_answer_list(tmp_path / "none.json", 3)
    assert str(err.value) == f"answer list not found: {tmp_path / 'none.json'}"
    (tmp_path / "dir.json").mkdir()  # a directory is not an answer list either
    with pytest.raises(FileNotFoundError, match="answer list not found"):
        load_answer_list(tmp_path / "dir.json", 3)


def test_invalid_json(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text('["yes", "no",', encoding="utf-8")
    with pytest.raises(AnswerListError) as err:
        load_answer_list(path, 2)
    assert isinstance(err.value, ValueError)
    assert isinstance(err.value.__cause__, json.JSONDecodeError)
    assert re.fullmatch(re.escape(f"{path}: not valid JSON (") + r"Expecting value: line 1 column \d+ \(char \d+\)\)",
                        str(err.value))


@pytest.mark.parametrize("content", [{"yes": "no"}, "yes", ["yes", 2], [None, "no"]], ids=["object", "string", "int", "null"])
def test_not_a_list_of_strings(tmp_path, content):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(content))
    size = len(content)  # the size matches, so only the type check can refuse it
    with pytest.raises(AnswerListError) as err:
        load_answer_list(path, size)
    assert str(err.value) == f"{path}: expected a JSON list of answer strings"


def test_wrong_size(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(["yes", "no"]))
    for size in (1, 3):
        with pytest.raises(AnswerListError) as err:
            load_answer_list(path, size)
        assert str(err.value) == f"{path}: has 2 answers, the model's head has {size}"
    assert load_answer_list(path, 2) == ["yes", "no"]
