"""The task registry: `config/tasks.json`, the twelve tasks of the released model under stable API names.

Importing this module does not import torch: the web tier uses it to validate requests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .resources import config_file

DEFAULT_REGISTRY = config_file("tasks.json")

KINDS = ("answer", "score", "grounding", "pointing", "binary", "entailment")
HEADS = ("vil_prediction", "vil_prediction_gqa", "vil_logit", "vil_binary_prediction", "vil_tri_prediction", "vision_logit")
# Kinds whose head has fixed classes, which the task's `labels` name in the head's order: the class count.
LABELLED_KINDS = {"binary": 2, "entailment": 3}
# The head that reads two rows (2i, 2i+1) at once: the model computes it only when asked (forward's `pairs`).
PAIR_HEAD = "vil_binary_prediction"

# What each kind of task returns, for the API's task listing.
KIND_ANSWERS = {
    "answer": "top-k answers with probabilities",
    "score": "a match score per image, and a ranking when several images are given",
    "grounding": "top-k detected regions as pixel boxes with scores and the detector's name for each (label)",
    "pointing": "a score (and the detector's name, label) for each caller-given candidate box, and the best one",
    "binary": "true or false, with its probability",
    "entailment": "entailment, neutral or contradiction, with the three probabilities",
}


class UnknownTaskError(ValueError):
    def __init__(self, name: str, known: Iterable[str]):
        self.name = name
        super().__init__(f"unknown task {name!r}; known tasks: {', '.join(known)}")


@dataclass(frozen=True)
class Task:
    name: str
    task_id: int
    title: str
    kind: str
    head: str
    max_seq_length: int
    max_region_num: int
    answers: str | None
    images: int | str  # an exact count, or "1+" for one or more
    description: str
    labels: tuple[str, ...] | None = None

    @property
    def min_images(self) -> int:
        return 1 if self.images == "1+" else int(self.images)

    @property
    def max_images(self) -> int | None:
        return None if self.images == "1+" else int(self.images)

    def accepts_image_count(self, count: int) -> bool:
        return count >= self.min_images and (self.max_images is None or count <= self.max_images)

    @property
    def needs_candidates(self) -> bool:
        return self.kind == "pointing"

    def describe(self) -> dict:
        """JSON-ready description for API clients."""
        return {
            "name": self.name,
            "task_id": self.task_id,
            "title": self.title,
            "kind": self.kind,
            "answers": KIND_ANSWERS[self.kind],
            "images": self.images,
            "needs_candidate_boxes": self.needs_candidates,
            "max_text_tokens": self.max_seq_length,
            "description": self.description,
        }


class TaskRegistry:
    def __init__(self, tasks: Sequence[Task]):
        self._tasks = {task.name: task for task in tasks}
        if len(self._tasks) != len(tasks):
            raise ValueError("task names must be unique")

    @classmethod
    def from_file(cls, path: str | os.PathLike = DEFAULT_REGISTRY) -> "TaskRegistry":
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        tasks = []
        for entry in raw["tasks"]:
            entry = dict(entry)
            if entry.get("labels") is not None:
                entry["labels"] = tuple(entry["labels"])
            task = Task(**entry)
            if task.kind not in KINDS:
                raise ValueError(f"{path}: task {task.name} has unknown kind {task.kind!r}")
            if task.head not in HEADS:
                raise ValueError(f"{path}: task {task.name} reads unknown head {task.head!r}")
            if task.kind in LABELLED_KINDS and len(task.labels or ()) != LABELLED_KINDS[task.kind]:
                raise ValueError(f"{path}: task {task.name} ({task.kind}) needs {LABELLED_KINDS[task.kind]} labels, "
                                 "one per class of its head, in the head's order")
            if task.images != "1+" and not (isinstance(task.images, int) and task.images >= 1):
                raise ValueError(f"{path}: task {task.name}: images must be a positive count or '1+'")
            tasks.append(task)
        return cls(tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    def get(self, name: str) -> Task:
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTaskError(name, self._tasks) from None

    def resolve(self, names: Iterable[str]) -> list[Task]:
        """Tasks for the given names, in the order given, without duplicates."""
        seen: dict[str, Task] = {}
        for name in names:
            name = name.strip()
            if name and name not in seen:
                seen[name] = self.get(name)
        return list(seen.values())

    def by_task_id(self, task_id: int) -> Task:
        for task in self._tasks.values():
            if task.task_id == task_id:
                return task
        raise UnknownTaskError(str(task_id), (f"{t.task_id} ({t.name})" for t in self._tasks.values()))
