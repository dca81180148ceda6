"""Answer vocabularies of the VQA-style heads, stored as JSON lists of strings in the weights bundle.

The official files are pickles (`trainval_label2ans.pkl`); `models/fetch.py` converts them to JSON with a
restricted reader, so this package never unpickles anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .configuration import GQA_NUM_ANSWERS, VQA_NUM_ANSWERS

# answers name in config/tasks.json -> (file in the bundle, size fixed by the released head)
ANSWER_LISTS = {"vqa": ("vqa_answers.json", VQA_NUM_ANSWERS), "gqa": ("gqa_answers.json", GQA_NUM_ANSWERS)}


class AnswerListError(ValueError):
    pass


def load_answer_list(path: str | os.PathLike, expected_size: int) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"answer list not found: {path}")
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnswerListError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise AnswerListError(f"{path}: expected a JSON list of answer strings")
    if len(answers) != expected_size:
        raise AnswerListError(f"{path}: has {len(answers)} answers, the model's head has {expected_size}")
    return answers


def load_bundle_answers(model_dir: str | os.PathLike) -> dict[str, list[str]]:
    return {name: load_answer_list(Path(model_dir) / filename, size) for name, (filename, size) in ANSWER_LISTS.items()}
