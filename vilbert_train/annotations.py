"""Annotation readers, one per official format. Each returns a list of `Example`s; files are named exactly as
in the reference release, and a missing one raises `MissingDataError` naming the path.

Soft answer targets (`cache/*_target.pkl`), hard negatives (`hard_negative.pkl`) and the REFER pickles are not
derivable from the public annotations alone: they come from the reference's `datasets.tar.gz`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .pickles import load_file

# The reference holds out the last 3000 questions (by id) of VQA val / GQA trainval as "minval".
MINVAL_SIZE = 3000
SNLI_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}


class MissingDataError(FileNotFoundError):
    """A file the task's official layout requires is absent."""


class AnnotationError(ValueError):
    pass


@dataclass
class Example:
    qid: Any  # question / pair / sentence id, kept for prediction files
    image_ids: list[str]  # one image, or two for NLVR2
    text: str
    labels: list[int] = field(default_factory=list)  # answer ids ("answer" kind) or the class (binary / entailment)
    scores: list[float] = field(default_factory=list)  # soft scores of `labels` ("answer" kind)
    box: list[float] | None = None  # grounding target, [x1, y1, x2, y2] pixels
    candidates: list[list[float]] | None = None  # pointing: candidate boxes, pixels xyxy
    answer_index: int = -1  # pointing: which candidate is right


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingDataError(f"missing {what}: {path}")
    return path


def read_json(path: Path, what: str) -> Any:
    require(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from exc


def read_jsonl(path: Path, what: str) -> list[dict]:
    require(path, what)
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise AnnotationError(f"{path}:{number}: not valid JSON ({exc})") from exc
    return rows


def read_pickle(path: Path, what: str) -> Any:
    require(path, what)
    return load_file(path)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _answer_target(item: dict, path: Path) -> tuple[list[int], list[float]]:
    try:
        return [int(x) for x in item["labels"]], [float(x) for x in item["scores"]]
    except (KeyError, TypeError) as exc:
        raise AnnotationError(f"{path}: target entries need 'labels' and 'scores' ({exc})") from exc


def _check_split(split: str, known: tuple[str, ...], task: str) -> None:
    if split not in known:
        raise AnnotationError(f"{task}: unknown split {split!r} (known: {', '.join(known)})")


# ------------------------------------------------------------------------------------------------ VQA family


def _vqa_split(root: Path, name: str) -> list[Example]:
    questions_path = root / f"v2_OpenEnded_mscoco_{name}2014_questions.json"
    questions = sorted(read_json(questions_path, "VQA questions")["questions"], key=lambda q: q["question_id"])
    target_path = root / "cache" / f"{name}_target.pkl"
    targets = sorted(read_pickle(target_path, "VQA answer targets (from datasets.tar.gz)"),
                     key=lambda t: t["question_id"])
    if len(questions) != len(targets):
        raise AnnotationError(f"{questions_path} has {len(questions)} questions, {target_path} {len(targets)} targets")
    examples = []
    for question, target in zip(questions, targets):
        if question["question_id"] != target["question_id"] or question["image_id"] != target["image_id"]:
            raise AnnotationError(f"{target_path}: question {question['question_id']} has no matching target")
        labels, scores = _answer_target(target, target_path)
        examples.append(Example(question["question_id"], [str(question["image_id"])], question["question"], labels, scores))
    return examples


def read_vqa(root: Path, split: str) -> list[Example]:
    """`v2_OpenEnded_mscoco_{train,val}2014_questions.json` + `cache/{train,val}_target.pkl`; trainval = train +
    val without its last 3000 questions, minval = those 3000; test = the test2015 questions (no targets)."""
    _check_split(split, ("train", "val", "trainval", "minval", "test"), "VQA")
    if split == "test":
        path = root / "v2_OpenEnded_mscoco_test2015_questions.json"
        return [Example(q["question_id"], [str(q["image_id"])], q["question"])
                for q in read_json(path, "VQA test questions")["questions"]]
    if split in ("train", "val"):
        return _vqa_split(root, split)
    val = _vqa_split(root, "val")
    if split == "minval":
        return val[-MINVAL_SIZE:]
    return _vqa_split(root, "train") + val[:-MINVAL_SIZE]


def _target_items(path: Path, what: str) -> list[Example]:
    items = sorted(read_pickle(path, what), key=lambda t: t["question_id"])
    examples = []
    for item in items:
        labels, scores = _answer_target(item, path)
        examples.append(Example(item["question_id"], [_text(item["image_id"])], _text(item["question"]), labels, scores))
    return examples


def read_genome(root: Path, split: str) -> list[Example]:
    """`cache/{train,val}_target.pkl`: {question_id, image_id, question, labels, scores}."""
    _check_split(split, ("train", "val"), "GenomeQA")
    return _target_items(root / "cache" / f"{split}_target.pkl", "Genome QA questions with answer targets")


def read_gqa(root: Path, split: str) -> list[Example]:
    """`cache/{train,val,trainval}_target.pkl` (question_id, image_id, question, labels, scores); trainval/minval
    split `trainval_target.pkl` at its last 3000; test = `testdev_balanced_questions.json` (id -> {imageId,
    question})."""
    _check_split(split, ("train", "val", "trainval", "minval", "test"), "GQA")
    if split == "test":
        questions = read_json(root / "testdev_balanced_questions.json", "GQA test-dev questions")
        return [Example(qid, [str(q["imageId"])], q["question"]) for qid, q in questions.items()]
    if split in ("train", "val"):
        return _target_items(root / "cache" / f"{split}_target.pkl", "GQA answer targets (from datasets.tar.gz)")
    items = _target_items(root / "cache" / "trainval_target.pkl", "GQA answer targets (from datasets.tar.gz)")
    return items[-MINVAL_SIZE:] if split == "minval" else items[:-MINVAL_SIZE]


# ---------------------------------------------------------------------------------------------- NLVR2, SNLI-VE


def read_nlvr2(root: Path, split: str) -> list[Example]:
    """`{train,dev,test}.json`, JSON lines {identifier, sentence, label "True"/"False"}; images are the
    identifier without its last part + `-img0` / `-img1`; True -> class 1."""
    _check_split(split, ("train", "dev", "test"), "NLVR2")
    examples = []
    for row in read_jsonl(root / f"{split}.json", "NLVR2 annotations"):
        stem = "-".join(row["identifier"].split("-")[:-1])
        label = {"True": 1, "False": 0}.get(str(row.get("label")), -1)
        examples.append(Example(row["identifier"], [f"{stem}-img0", f"{stem}-img1"], row["sentence"], [label]))
    return examples


def read_snli_ve(root: Path, split: str) -> list[Example]:
    """`snli_ve_{train,dev,test}.jsonl` {Flikr30kID, sentence2, gold_label}; contradiction 0, neutral 1,
    entailment 2; other labels ("-") are kept with no target, as the reference keeps them."""
    _check_split(split, ("train", "dev", "test"), "SNLI-VE")
    examples = []
    for number, row in enumerate(read_jsonl(root / f"snli_ve_{split}.jsonl", "SNLI-VE annotations")):
        image = str(row["Flikr30kID"]).split(".")[0]
        label = SNLI_LABELS.get(row.get("gold_label"), -1)
        examples.append(Example(row.get("pairID", number), [image], row["sentence2"], [label]))
    return examples


# ------------------------------------------------------------------------------------------------- retrieval

RETRIEVAL_FILES = {"train": "all_data_final_train_2014.jsonline", "val": "all_data_final_test_set0_2014.jsonline",
                   "test": "all_data_final_test_set0_2014.jsonline"}


@dataclass
class RetrievalData:
    examples: list[Example]  # one per (image, caption)
    image_ids: list[str]  # distinct images, in file order
    hard_pool: dict[str, list[str]] | None  # image -> hard-negative images (train only)


def read_retrieval(root: Path, split: str, coco: bool) -> RetrievalData:
    """`all_data_final_train_2014.jsonline` / `all_data_final_test_set0_2014.jsonline`: {"id": COCO image id} or
    {"img_path": "<flickr id>.jpg"} with "sentences". Training also needs `hard_negative.pkl`
    {train_image_list, train_hard_pool}: row i of the pool lists indices (into the image list) of images
    hard to tell from image i."""
    _check_split(split, tuple(RETRIEVAL_FILES), "retrieval")
    rows = read_jsonl(root / RETRIEVAL_FILES[split], "retrieval captions")
    examples, images = [], []
    for row in rows:
        image = str(row["id"]) if coco else str(row["img_path"]).split(".")[0]
        images.append(image)
        for number, sentence in enumerate(row["sentences"]):
            examples.append(Example(f"{image}_{number}", [image], sentence))
    hard_pool = None
    if split == "train":
        path = root / "hard_negative.pkl"
        data = read_pickle(path, "retrieval hard negatives (from datasets.tar.gz)")
        try:
            image_list = [str(_text(x)).split(".")[0] for x in data["train_image_list"]]
            pool = data["train_hard_pool"]
            hard_pool = {image: [image_list[int(j)] for j in np.asarray(pool[i]).reshape(-1)]
                         for i, image in enumerate(image_list)}
        except (KeyError, TypeError, IndexError) as exc:
            raise AnnotationError(f"{path}: expected train_image_list and train_hard_pool ({exc})") from exc
    return RetrievalData(examples, images, hard_pool)


# -------------------------------------------------------------------------------------------------- grounding

REFER_DATASETS = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


def read_refer(root: Path, dataset: str, split: str) -> list[Example]:
    """REFER layout (lichengunc/refer): `<root>/<dataset>/refs(<splitBy>).p` (pickled list of refs with image_id,
    ann_id, split, sentences) and `<root>/<dataset>/instances.json` (COCO annotations, bbox x, y, w, h).
    One example per referring sentence; the target box is the annotation's, as [x, y, x + w, y + h]."""
    split_by = REFER_DATASETS[dataset]
    folder = root / dataset
    refs = read_pickle(folder / f"refs({split_by}).p", f"{dataset} REFER refs")
    instances = read_json(folder / "instances.json", f"{dataset} REFER instances")
    boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
    examples = []
    for ref in refs:
        if _text(ref["split"]) != split:
            continue
        x, y, w, h = (float(v) for v in boxes[ref["ann_id"]])
        for sentence in ref["sentences"]:
            examples.append(Example(sentence.get("sent_id", ref["ref_id"]), [str(ref["image_id"])],
                                    _text(sentence["sent"]), box=[x, y, x + w, y + h]))
    if not examples:
        raise AnnotationError(f"{folder}: no referring expressions in split {split!r}")
    return examples


# --------------------------------------------------------------------------------------------------- pointing


def read_visual7w(root: Path, split: str) -> list[Example]:
    """`dataset_v7w_pointing.json`: images[] {image_id, split, qa_pairs[] {qa_id, question, answer (box id),
    multiple_choices (box ids)}} and boxes[] {box_id, x, y, width, height}. The four candidates are ordered by
    box id (so the answer's position carries no signal)."""
    data = read_json(root / "dataset_v7w_pointing.json", "Visual7W pointing annotations")
    boxes = {b["box_id"]: [float(b["x"]), float(b["y"]), float(b["x"] + b["width"]), float(b["y"] + b["height"])]
             for b in data["boxes"]}
    examples = []
    for image in data["images"]:
        if image["split"] != split:
            continue
        for qa in image["qa_pairs"]:
            ids = sorted({qa["answer"], *qa["multiple_choices"]})
            examples.append(Example(qa["qa_id"], [str(image["image_id"])], qa["question"],
                                    candidates=[boxes[i] for i in ids], answer_index=ids.index(qa["answer"])))
    return examples


def guesswhat_dialog(qas: list[dict]) -> str:
    """The reference's dialogue string: "start <q> answer <a> stop " per turn."""
    return "".join(f"start {qa['question']} answer {qa['answer']} stop " for qa in qas)


def read_guesswhat(root: Path, split: str) -> list[Example]:
    """`guesswhat.{train,valid,test}.jsonl` games {id, image {id}, objects[] {id, bbox [x, y, w, h]}, object_id,
    qas[] {question, answer}, status}; successful games only. Candidates are the game's objects."""
    _check_split(split, ("train", "valid", "test"), "GuessWhat")
    examples = []
    for game in read_jsonl(root / f"guesswhat.{split}.jsonl", "GuessWhat games"):
        if game.get("status", "success") != "success":
            continue
        objects = game["objects"]
        ids = [o["id"] for o in objects]
        boxes = [[float(x), float(y), float(x + w), float(y + h)] for x, y, w, h in (o["bbox"] for o in objects)]
        examples.append(Example(game["id"], [str(game["image"]["id"])], guesswhat_dialog(game["qas"]),
                                candidates=boxes, answer_index=ids.index(game["object_id"])))
    return examples
