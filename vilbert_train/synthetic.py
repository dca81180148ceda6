"""Small synthetic datasets written in the official file formats, for tests and offline smoke runs.

Every image belongs to one of three classes, visible in its region features, and each task's answer is a
function of that class, so a model can learn every task. Files and record layouts are the reference's:
features LMDBs with pickled {image_id, image_h, image_w, num_boxes, boxes, features} records and a pickled
"keys" list, answer-target pickles, JSON / JSON-lines annotations, REFER pickles, hard-negative pools.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import lmdb
import numpy as np

from .specs import COCO_FEATURES, FLICKR_FEATURES, SPECS

WIDTH, HEIGHT = 640, 480
CLASS_WORDS = ("red", "green", "blue")
SNLI_NAMES = ("contradiction", "neutral", "entailment")


def write_released_lmdb(path: str | os.PathLike, records: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """records: image id -> (boxes [N,4] pixels, features [N,D]); written as the reference's convert_to_lmdb."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        keys = []
        for image_id, (boxes, features) in records.items():
            record = {"image_id": image_id, "image_h": HEIGHT, "image_w": WIDTH, "num_boxes": len(boxes),
                      "boxes": np.asarray(boxes, np.float32), "features": np.asarray(features, np.float32)}
            txn.put(image_id.encode(), pickle.dumps(record))
            keys.append(image_id.encode())
        txn.put(b"keys", pickle.dumps(keys))
    env.close()


class SyntheticImages:
    """Images of three classes: class c adds a strong pattern to every region's features."""

    def __init__(self, feature_dim: int, seed: int = 0, boxes: int = 10):
        self.rng = np.random.default_rng(seed)
        self.dim, self.num_boxes = feature_dim, boxes
        self.patterns = self.rng.normal(0, 1, (3, feature_dim)).astype(np.float32) * 2
        self.records: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def image(self, image_id: str, cls: int, boxes: np.ndarray | None = None) -> np.ndarray:
        """Add an image of class `cls` (random boxes unless given); returns its boxes."""
        if boxes is None:
            x1 = self.rng.uniform(0, WIDTH - 100, self.num_boxes)
            y1 = self.rng.uniform(0, HEIGHT - 100, self.num_boxes)
            boxes = np.stack([x1, y1, x1 + self.rng.uniform(20, 100, self.num_boxes),
                              y1 + self.rng.uniform(20, 100, self.num_boxes)], 1).astype(np.float32)
        features = self.rng.normal(0, 0.5, (len(boxes), self.dim)).astype(np.float32) + self.patterns[cls]
        self.records[image_id] = (boxes, features)
        return boxes

    def write(self, path: Path) -> None:
        write_released_lmdb(path, self.records)

    def write_merged(self, path: Path) -> None:
        """Write, keeping the records of an LMDB already at `path` (tasks that share the COCO features)."""
        if (path / "data.mdb").is_file():
            from .pickles import loads

            env = lmdb.open(str(path), readonly=True, lock=False)
            with env.begin() as txn:
                for key, value in txn.cursor():
                    if bytes(key) != b"keys":
                        record = loads(bytes(value))
                        self.records.setdefault(bytes(key).decode(), (record["boxes"], record["features"]))
            env.close()
        self.write(path)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_snli_ve(root: Path, feature_dim: int, n: int = 24, seed: int = 0) -> dict[str, list[int]]:
    """SNLI-VE: the label is the image's class. Returns the labels per split."""
    images = SyntheticImages(feature_dim, seed)
    labels = {}
    for split, count in (("train", n), ("dev", max(3, n // 4)), ("test", 3)):
        rows, labels[split] = [], []
        for i in range(count):
            image = f"{1000 + len(images.records)}"
            cls = i % 3
            images.image(image, cls)
            rows.append({"Flikr30kID": f"{image}.jpg", "sentence2": f"a photo number {i}", "gold_label": SNLI_NAMES[cls],
                         "pairID": f"{image}#{split}"})
            labels[split].append(cls)
        _jsonl(root / SPECS[13].dataroot / f"snli_ve_{split}.jsonl", rows)
    images.write_merged(root / FLICKR_FEATURES)
    return labels


def _answer_targets(root: Path, n: int, images: SyntheticImages, prefix: str, with_question: bool, split: str,
                    start: int) -> list[dict]:
    items = []
    for i in range(n):
        cls = i % 3
        image = f"{prefix}{start + i}"
        images.image(image, cls)
        item = {"question_id": start * 10 + i, "image_id": int(image) if image.isdigit() else image,
                "labels": [cls, 3], "scores": [1.0, 0.3]}
        if with_question:
            item["question"] = f"what colour is thing {i}?"
        items.append(item)
    return items


def write_vqa(root: Path, feature_dim: int, n: int = 12, seed: int = 1) -> None:
    """VQA: questions JSON + cache/{train,val}_target.pkl + answer vocabularies; the answer is the class."""
    images = SyntheticImages(feature_dim, seed)
    folder = root / SPECS[1].dataroot
    for split, start in (("train", 100), ("val", 500)):
        items = _answer_targets(root, n, images, "", False, split, start)
        questions = [{"question_id": t["question_id"], "image_id": t["image_id"],
                      "question": f"what colour is thing {k}?"} for k, t in enumerate(items)]
        (folder).mkdir(parents=True, exist_ok=True)
        (folder / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(json.dumps({"questions": questions}))
        _pickle(folder / "cache" / f"{split}_target.pkl", items)
    test = [{"question_id": 9000 + i, "image_id": 900 + i, "question": "what is it?"} for i in range(3)]
    for q in test:
        images.image(str(q["image_id"]), 0)
    (folder / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps({"questions": test}))
    answers = list(CLASS_WORDS) + ["yes"] + [f"answer{i}" for i in range(4, 3129)]
    _pickle(folder / "cache" / "trainval_label2ans.pkl", answers)
    _pickle(folder / "cache" / "trainval_ans2label.pkl", {a: i for i, a in enumerate(answers)})
    images.write_merged(root / COCO_FEATURES)
    test_images = SyntheticImages(feature_dim, seed)
    test_images.records = {str(q["image_id"]): images.records[str(q["image_id"])] for q in test}
    test_images.write(root / SPECS[1].test_features)


def write_gqa(root: Path, feature_dim: int, n: int = 12, seed: int = 2) -> None:
    images = SyntheticImages(feature_dim, seed)
    folder = root / SPECS[15].dataroot
    train = _answer_targets(root, n, images, "n", True, "train", 100)
    val = _answer_targets(root, n, images, "n", True, "val", 500)
    _pickle(folder / "cache" / "train_target.pkl", train)
    _pickle(folder / "cache" / "val_target.pkl", val)
    _pickle(folder / "cache" / "trainval_target.pkl", train + val)
    test = {f"t{i}": {"imageId": f"n{900 + i}", "question": "what is it?"} for i in range(3)}
    for q in test.values():
        images.image(q["imageId"], 1)
    (folder / "testdev_balanced_questions.json").write_text(json.dumps(test))
    answers = list(CLASS_WORDS) + ["no"] + [f"gqa{i}" for i in range(4, 1533)]
    _pickle(folder / "cache" / "trainval_label2ans.pkl", answers)
    images.write(root / SPECS[15].features)


def write_genome(root: Path, feature_dim: int, n: int = 9, seed: int = 3) -> None:
    images = SyntheticImages(feature_dim, seed)
    folder = root / SPECS[2].dataroot
    for split, start in (("train", 100), ("val", 500)):
        _pickle(folder / "cache" / f"{split}_target.pkl", _answer_targets(root, n, images, "", True, split, start))
    images.write(root / SPECS[2].features)


def write_nlvr2(root: Path, feature_dim: int, n: int = 12, seed: int = 4) -> None:
    """NLVR2: True when both images have the same class."""
    images = SyntheticImages(feature_dim, seed)
    for split in ("train", "dev"):
        rows = []
        for i in range(n):
            a, b = i % 3, (i % 3 if i % 2 == 0 else (i + 1) % 3)
            stem = f"{split}-{i}-0"
            images.image(f"{stem}-img0", a)
            images.image(f"{stem}-img1", b)
            rows.append({"identifier": f"{stem}-{i % 2}", "sentence": "both pictures look alike",
                         "label": "True" if a == b else "False"})
        _jsonl(root / SPECS[12].dataroot / f"{split}.json", rows)
    images.write(root / SPECS[12].features)


def write_retrieval(root: Path, feature_dim: int, task_id: int = 7, n: int = 6, seed: int = 5) -> None:
    """Retrieval: each image's captions name its class word (+ the image number)."""
    spec = SPECS[task_id]
    coco = task_id == 7
    images = SyntheticImages(feature_dim, seed)
    folder = root / spec.dataroot
    train_ids = []
    for split, start in (("train", 100), ("test_set0", 500)):
        rows = []
        for i in range(n):
            image = str(start + i)
            images.image(image, i % 3)
            sentences = [f"a {CLASS_WORDS[i % 3]} scene {k}" for k in range(2)]
            rows.append({"id": int(image), "sentences": sentences} if coco else
                        {"img_path": f"{image}.jpg", "sentences": sentences})
            if split == "train":
                train_ids.append(int(image) if coco else f"{image}.jpg")
        _jsonl(folder / f"all_data_final_{split}_2014.jsonline", rows)
    pool = np.array([[(i + k) % n for k in range(1, 4)] for i in range(n)], dtype=np.int64)
    _pickle(folder / "hard_negative.pkl", {"train_image_list": train_ids, "train_hard_pool": pool})
    images.write_merged(root / spec.features)  # COCO features may already hold other tasks' images


def write_refcoco(root: Path, feature_dim: int, dataset: str = "refcoco", n: int = 6, seed: int = 6) -> None:
    """REFER layout; the referred object is detected box k, whose features carry the class pattern."""
    task_id = {"refcoco": 9, "refcoco+": 10, "refcocog": 11}[dataset]
    spec = SPECS[task_id]
    split_by = "umd" if dataset == "refcocog" else "unc"
    images = SyntheticImages(feature_dim, seed)
    gt = SyntheticImages(feature_dim, seed + 100)
    refs, annotations = [], []
    for i in range(n):
        image = str(700 + i)
        boxes = images.image(image, i % 3)
        x1, y1, x2, y2 = (float(v) for v in boxes[i % len(boxes)])
        gt.image(image, i % 3, boxes[i % len(boxes)][None])
        annotations.append({"id": 50 + i, "image_id": int(image), "bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": 1})
        refs.append({"ref_id": i, "ann_id": 50 + i, "image_id": int(image), "split": "train" if i < n - 2 else "val",
                     "sentences": [{"sent": f"the {CLASS_WORDS[i % 3]} thing", "sent_id": 10 * i}], "category_id": 1})
    folder = root / spec.dataroot / dataset
    _pickle(folder / f"refs({split_by}).p", refs)
    (folder / "instances.json").write_text(json.dumps({"images": [], "annotations": annotations, "categories": []}))
    images.write(root / spec.features)
    gt.write(root / spec.gt_features)


def write_visual7w(root: Path, feature_dim: int, n: int = 6, seed: int = 7) -> None:
    spec = SPECS[4]
    images, gt = SyntheticImages(feature_dim, seed), SyntheticImages(feature_dim, seed + 100, boxes=4)
    records, boxes_table = [], []
    for i in range(n):
        image = 800 + i
        images.image(str(image), i % 3)
        boxes = gt.image(str(image), i % 3)
        ids = []
        for b in boxes:
            ids.append(len(boxes_table))
            boxes_table.append({"box_id": len(boxes_table), "x": float(b[0]), "y": float(b[1]),
                                "width": float(b[2] - b[0]), "height": float(b[3] - b[1]), "name": "thing"})
        qa = {"qa_id": 3000 + i, "question": "which one is it?", "answer": ids[i % 4],
              "multiple_choices": [x for x in ids if x != ids[i % 4]], "type": "which"}
        records.append({"image_id": image, "filename": f"v7w_{image}.jpg", "split": "train" if i < n - 2 else "val",
                        "qa_pairs": [qa]})
    folder = root / spec.dataroot
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_v7w_pointing.json").write_text(json.dumps({"images": records, "boxes": boxes_table}))
    images.write(root / spec.features)
    gt.write(root / spec.gt_features)


def write_guesswhat(root: Path, feature_dim: int, n: int = 6, seed: int = 8) -> None:
    spec = SPECS[17]
    images, gt = SyntheticImages(feature_dim, seed), SyntheticImages(feature_dim, seed + 100, boxes=3)
    for split in ("train", "valid"):
        rows = []
        for i in range(n):
            image = 600 + i + (0 if split == "train" else 50)
            images.image(str(image), i % 3)
            boxes = gt.image(str(image), i % 3)
            objects = [{"id": 40 + k, "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                        "category": "thing"} for k, b in enumerate(boxes)]
            rows.append({"id": i, "image": {"id": image, "file_name": f"{image}.jpg", "width": WIDTH, "height": HEIGHT},
                         "objects": objects, "object_id": 40 + i % 3, "status": "success" if i else "failure",
                         "qas": [{"question": "is it red?", "answer": "No", "id": 1},
                                 {"question": "is it on the left?", "answer": "Yes", "id": 2}]})
        _jsonl(root / spec.dataroot / f"guesswhat.{split}.jsonl", rows)
    images.write_merged(root / spec.features)
    gt.write(root / spec.gt_features)
