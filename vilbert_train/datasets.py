"""Model-ready examples for one task and split: annotation reader + region features + tokenizer.

Every item is a dict of numpy arrays whose text/visual fields carry a leading "rows" axis: 1 row per example,
2 for NLVR2 (the statement with each image; the pair head reads rows 2i, 2i+1) and 4 for retrieval training
(true pair, random caption, random image, hard-negative caption; the right answer is option 0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from vilbert.configuration import GQA_NUM_ANSWERS, VQA_NUM_ANSWERS
from vilbert.predictor import ImageRegions
from vilbert.tokenization import Tokenizer

from . import annotations as ann
from .features import open_features, visual_input
from .specs import DETECTED_SLOTS, TaskSpec

NUM_LABELS = {"vil_prediction": VQA_NUM_ANSWERS, "vil_prediction_gqa": GQA_NUM_ANSWERS}
# Boxes of the ground-truth feature files are matched to annotation boxes within this many pixels.
BOX_MATCH_TOLERANCE = 1.0


def iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each of boxes [N, 4] with box [4], in the reference's "+1 pixel" convention."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    box = np.asarray(box, dtype=np.float64)
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    box_area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    iw = np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + 1
    ih = np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    return (inter / (area + box_area - inter)).astype(np.float32)


# The annotation reader of each task family (TaskSpec.family): (dataset root, split) -> examples.
READERS: dict[str, Callable[[Path, str], Any]] = {
    "vqa": ann.read_vqa, "genome": ann.read_genome, "gqa": ann.read_gqa, "nlvr2": ann.read_nlvr2,
    "snli_ve": ann.read_snli_ve, "visual7w": ann.read_visual7w, "guesswhat": ann.read_guesswhat,
    "retrieval_coco": lambda root, split: ann.read_retrieval(root, split, coco=True),
    "retrieval_flickr": lambda root, split: ann.read_retrieval(root, split, coco=False),
    **{name: (lambda root, split, name=name: ann.read_refer(root, name, split)) for name in ann.REFER_DATASETS},
}


def load_examples(spec: TaskSpec, split: str, data_root: Path) -> Any:
    if spec.family not in READERS:
        raise ValueError(f"no reader for {spec.family}")
    return READERS[spec.family](Path(data_root) / spec.dataroot, split)


class TaskDataset(Dataset):
    """One task's split. `features` overrides the detected-feature LMDB (released or our FeatureStore)."""

    def __init__(self, spec: TaskSpec, split: str, data_root: str | os.PathLike, tokenizer: Tokenizer,
                 seed: int = 0, features: str | os.PathLike | None = None, four_way: bool | None = None):
        """four_way: retrieval items as four options (default: on the train split; training-time validation
        turns it on too, while eval_tasks ranks every image against every caption instead)."""
        self.spec, self.split, self.seed = spec, split, seed
        self.data_root = Path(data_root)
        self.tokenizer = tokenizer
        self.epoch = 0
        loaded = load_examples(spec, split, self.data_root)
        self.retrieval = loaded if isinstance(loaded, ann.RetrievalData) else None
        self.examples: list[ann.Example] = loaded.examples if self.retrieval else loaded
        if not self.examples:
            raise ann.AnnotationError(f"{spec.name}: split {split!r} has no examples")
        feature_path = features or self.data_root / (spec.test_features if split == "test" and spec.test_features
                                                      else spec.features)
        self.features = open_features(ann.require(Path(feature_path), f"{spec.name} region features"))
        self.gt_features = None
        if spec.kind == "pointing" or (spec.kind == "grounding" and split == "train" and spec.gt_features):
            path = ann.require(self.data_root / spec.gt_features / "data.mdb", f"{spec.name} ground-truth-box features")
            self.gt_features = open_features(path.parent)
        if self.retrieval:
            self._captions_by_image: dict[str, list[int]] = {}
            for index, example in enumerate(self.examples):
                self._captions_by_image.setdefault(example.image_ids[0], []).append(index)
        self.num_labels = NUM_LABELS.get(spec.head, 0)
        self.four_way = self.retrieval is not None and (split == "train" if four_way is None else four_way)

    def __len__(self) -> int:
        return len(self.examples)

    def set_epoch(self, epoch: int) -> None:
        """Random negatives (retrieval) are drawn from (seed, epoch, index): identical after a resume."""
        self.epoch = epoch

    # ------------------------------------------------------------------------------------------------------

    def _text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.tokenizer.encode(text, self.spec.max_seq_length)
        return np.asarray(encoded.input_ids, np.int64), np.asarray(encoded.attention_mask, np.int64)

    def visual(self, image_id: str):
        """The padded visual input of one image (no candidate boxes)."""
        return visual_input(self._image(image_id), self.spec.max_region_num)

    def _image(self, image_id: str) -> ImageRegions:
        try:
            return self.features[image_id]
        except KeyError as exc:
            raise ann.MissingDataError(f"{self.spec.name}: {exc.args[0]}") from None

    def _candidates(self, image_id: str, boxes: list[list[float]]) -> ImageRegions:
        """The ground-truth feature rows of the candidate boxes, matched by coordinates."""
        try:
            gt = self.gt_features[image_id]
        except KeyError as exc:
            raise ann.MissingDataError(f"{self.spec.name}: {exc.args[0]}") from None
        rows = []
        for box in boxes:
            distance = np.abs(gt.boxes - np.asarray(box, np.float32)).max(axis=1)
            best = int(np.argmin(distance)) if len(distance) else -1
            if best < 0 or distance[best] > BOX_MATCH_TOLERANCE:
                raise ann.AnnotationError(f"{self.spec.name}: box {box} of image {image_id} is not in the "
                                          f"ground-truth feature file {self.gt_features.path}")
            rows.append(best)
        return ImageRegions(gt.boxes[rows], gt.features[rows], gt.image_width, gt.image_height)

    def rows(self, texts: list[str], visuals: list) -> dict[str, np.ndarray]:
        ids, masks = zip(*(self._text(t) for t in texts))
        return {
            "input_ids": np.stack(ids), "input_mask": np.stack(masks), "segment_ids": np.zeros_like(np.stack(ids)),
            "features": np.stack([v.features for v in visuals]), "spatials": np.stack([v.spatials for v in visuals]),
            "image_mask": np.stack([v.mask for v in visuals]),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._ITEMS[self.spec.kind](self, self.examples[index], index)
        item["index"] = np.int64(index)
        return item

    def _answer_item(self, example: ann.Example, index: int) -> dict[str, Any]:
        item = self._single_image_rows(example)
        target = np.zeros(self.num_labels, np.float32)
        for label, score in zip(example.labels, example.scores):
            if not 0 <= label < self.num_labels:
                raise ann.AnnotationError(f"{self.spec.name}: answer label {label} outside the "
                                          f"{self.num_labels}-answer head")
            target[label] = score
        item["target"] = target
        return item

    def _entailment_item(self, example: ann.Example, index: int) -> dict[str, Any]:
        return self._labelled(self._single_image_rows(example), example.labels[0], 3)

    def _binary_item(self, example: ann.Example, index: int) -> dict[str, Any]:
        visuals = [visual_input(self._image(i), self.spec.max_region_num) for i in example.image_ids]
        return self._labelled(self.rows([example.text] * 2, visuals), example.labels[0], 2)

    @staticmethod
    def _labelled(item: dict[str, Any], label: int, classes: int) -> dict[str, Any]:
        """A one-hot target over `classes` (all zero for an unlabelled example, label -1)."""
        item["label"] = np.int64(label)
        item["target"] = np.eye(classes, dtype=np.float32)[label] if label >= 0 else np.zeros(classes, np.float32)
        return item

    def _score_item(self, example: ann.Example, index: int) -> dict[str, Any]:
        if self.four_way:
            return self._retrieval_item(index)
        item = self._single_image_rows(example)  # evaluation: one caption with its own image
        item["label"] = np.int64(0)
        return item

    def _pointing_item(self, example: ann.Example, index: int) -> dict[str, Any]:
        regions = self.spec.max_region_num
        image = self._image(example.image_ids[0])
        candidates = self._candidates(example.image_ids[0], example.candidates)
        visual = visual_input(image, regions, DETECTED_SLOTS, candidates)
        item = self.rows([example.text], [visual])
        slots = regions - DETECTED_SLOTS
        count = min(len(example.candidates), slots)
        mc_ids, mc_mask, target = np.zeros(slots, np.int64), np.zeros(slots, np.int64), np.zeros(slots, np.float32)
        mc_ids[:count] = DETECTED_SLOTS + np.arange(count)
        mc_mask[:count] = 1
        target[:count] = iou(np.asarray(example.candidates[:count]), example.candidates[example.answer_index])
        item.update(mc_ids=mc_ids, mc_mask=mc_mask, target=target, label=np.int64(example.answer_index))
        return item

    def _grounding_item(self, example: ann.Example, index: int) -> dict[str, Any]:
        image = self._image(example.image_ids[0])
        candidates = None
        if self.gt_features is not None:  # training: the ground-truth boxes are appended (and cut at R)
            try:
                candidates = self.gt_features[example.image_ids[0]]
            except KeyError as exc:
                raise ann.MissingDataError(f"{self.spec.name}: {exc.args[0]}") from None
        visual = visual_input(image, self.spec.max_region_num, None, candidates)
        item = self.rows([example.text], [visual])
        target = iou(visual.boxes, example.box) * visual.mask
        if self.split == "train":  # the reference trains on IoU >= 0.5 only, and evaluates on raw IoU
            target[target < 0.5] = 0
        item.update(target=target.astype(np.float32), boxes=visual.boxes, gt_box=np.asarray(example.box, np.float32))
        return item

    def _single_image_rows(self, example: ann.Example) -> dict[str, Any]:
        return self.rows([example.text], [visual_input(self._image(example.image_ids[0]), self.spec.max_region_num)])

    # How an item of each task kind (vilbert.tasks.KINDS) is built.
    _ITEMS: dict[str, Callable[["TaskDataset", ann.Example, int], dict[str, Any]]] = {
        "answer": _answer_item, "entailment": _entailment_item, "binary": _binary_item, "score": _score_item,
        "pointing": _pointing_item, "grounding": _grounding_item,
    }

    def _retrieval_item(self, index: int) -> dict[str, Any]:
        """Four options for one caption: (own image, caption), (own image, random caption of another image),
        (random other image, caption), (own image, caption of a hard-negative image)."""
        example = self.examples[index]
        image = example.image_ids[0]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        images = self.retrieval.image_ids
        if len(images) < 2:
            raise ann.AnnotationError(f"{self.spec.name}: retrieval training needs at least two images")

        def other_image() -> str:
            while True:
                candidate = images[int(rng.integers(len(images)))]
                if candidate != image:
                    return candidate

        def caption_of(image_id: str) -> str:
            captions = self._captions_by_image[image_id]
            return self.examples[captions[int(rng.integers(len(captions)))]].text

        random_caption = caption_of(other_image())
        random_image = other_image()
        pool = [i for i in (self.retrieval.hard_pool or {}).get(image, []) if i != image and i in self._captions_by_image]
        hard_caption = caption_of(pool[int(rng.integers(len(pool)))] if pool else other_image())
        own = visual_input(self._image(image), self.spec.max_region_num)
        other = visual_input(self._image(random_image), self.spec.max_region_num)
        item = self.rows([example.text, random_caption, example.text, hard_caption], [own, own, other, own])
        item["label"] = np.int64(0)
        return item
