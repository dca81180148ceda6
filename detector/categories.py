"""The names of the detector's object classes: region labels such as "man" or "frisbee".

The released X-152 detector predicts 1601 classes: column 0 is background, columns 1..1600 the Visual Genome object
classes. Their names are in `visual_genome_categories.json`, the file the MMF and vilbert-multi-task feature
scripts point to (on the release host under `pythia/data/`; `models/fetch.py` installs it into the bundle):

    {"categories": [{"id": 0, "name": "yolk"}, {"id": 1, "name": "..."}, ...]}

with ids 0..1599 for the 1600 object classes, so detector class c is category id c - 1 (the feature scripts take
the arg-max over the columns after background and index the file with it). A file with 1601 entries whose id 0 is
a background entry (ids 0..1600) is read with class c = id c. Anything else is refused: a name list that does not
fit the detector would label every region wrongly, which is worse than no label.

No torch here: the worker, the collections store and the tests read it alike.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

CATEGORIES_FILE = "visual_genome_categories.json"
MAX_FILE_BYTES = 1 << 20  # the real file is about 40 KB
MAX_NAME_CHARS = 64
BACKGROUND_NAMES = {"__background__", "background", "__background"}
# Synthetic names for the tiny random-weight bundle (its labels are as meaningless as its boxes): common Visual
# Genome objects, so that a test can type a caption that matches some regions.
SYNTHETIC_WORDS = ("man", "woman", "dog", "cat", "frisbee", "tree", "car", "street", "shirt", "table", "plate",
                   "pizza", "horse", "grass", "sky", "building", "window", "person", "bus", "train", "boat", "bird",
                   "ball", "bench", "umbrella", "kite", "surfboard", "wave", "snow", "elephant", "giraffe", "clock")


class CategoriesError(ValueError):
    """The category file cannot be used with this detector (the message says why)."""


class CategoryNames:
    """Detector class id -> name. Class 0 (background) and ids outside the detector's range have no name."""

    def __init__(self, names: Sequence[str | None]):
        self.names = list(names)  # index = detector class id; names[0] is None (background)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def label(self, class_id: int) -> str | None:
        """The name of one class id, or None (background, or an id the detector does not have: client-given
        feature files carry whatever class ids the client wrote)."""
        return self.names[class_id] if 0 < class_id < len(self.names) else None

    def labels(self, class_ids: Iterable[int]) -> list[str | None]:
        return [self.label(int(c)) for c in class_ids]

    @classmethod
    def from_json(cls, data: bytes, num_classes: int, source: str = CATEGORIES_FILE) -> "CategoryNames":
        """Parse a category file for a detector of `num_classes` classes (background included)."""
        if len(data) > MAX_FILE_BYTES:
            raise CategoriesError(f"{source}: {len(data)} bytes, more than a category file has ({MAX_FILE_BYTES})")
        try:
            entries = json.loads(data)["categories"]
            by_id = {}
            for entry in entries:
                cid, name = entry["id"], entry["name"]
                if not isinstance(cid, int) or isinstance(cid, bool) or not isinstance(name, str):
                    raise CategoriesError(f"{source}: every category needs an integer id and a string name")
                if cid in by_id:
                    raise CategoriesError(f"{source}: category id {cid} appears twice")
                by_id[cid] = name.strip()
        except CategoriesError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise CategoriesError(f"{source}: not a category file ({{\"categories\": [{{\"id\", \"name\"}}]}}): "
                                  f"{exc}") from None
        if sorted(by_id) == list(range(num_classes - 1)):  # the released file: object classes only
            names = [None] + [by_id[i] for i in range(num_classes - 1)]
        elif sorted(by_id) == list(range(num_classes)) and by_id[0].lower() in BACKGROUND_NAMES:
            names = [None] + [by_id[i] for i in range(1, num_classes)]
        else:
            raise CategoriesError(f"{source}: {len(by_id)} categories with ids {min(by_id, default=0)}.."
                                  f"{max(by_id, default=0)}; this detector has {num_classes - 1} object classes "
                                  f"(ids 0..{num_classes - 2}, or 0..{num_classes - 1} with a background entry)")
        bad = [name for name in names[1:] if not name or len(name) > MAX_NAME_CHARS or not name.isprintable()]
        if bad:
            raise CategoriesError(f"{source}: {len(bad)} empty, overlong or unprintable name(s), e.g. {bad[0][:20]!r}")
        return cls(names)

    @classmethod
    def from_file(cls, path: str | os.PathLike, num_classes: int) -> "CategoryNames":
        path = Path(path)
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        return cls.from_json(data, num_classes, str(path))


def synthetic_categories(num_classes: int) -> bytes:
    """A category file in the released layout (ids 0..num_classes-2) with made-up names, for the tiny bundle."""
    entries = [{"id": i, "name": SYNTHETIC_WORDS[i % len(SYNTHETIC_WORDS)]} for i in range(num_classes - 1)]
    return (json.dumps({"categories": entries}) + "\n").encode("utf-8")


WORD = re.compile(r"[a-z0-9]+")


def name_terms(text: str) -> list[str]:
    """The words of a region name or a caption, as the lexical first stage of a collection search compares them:
    lower-case letters and digits, a plural 's' dropped ("dogs" -> "dog", not "glass" -> "glas")."""
    terms = []
    for word in WORD.findall(text.lower()):
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        terms.append(word)
    return terms
