"""The training specs of the twelve tasks: what config/tasks.json says about each task (id, kind, head, text and
region sizes, answer list), joined with the training-only setup of the reference's `vilbert_tasks.yml`.

config/tasks.json is the one owner of every task fact the served model shares with training; the table here
holds only what training alone reads (data paths, batch size, learning rate, epochs, splits). Paths are relative
to the data root (the reference's `datasets/` folder).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from modelkit.regions import VISUAL_ROWS_PER_IMAGE
from vilbert.tasks import Task, TaskRegistry, UnknownTaskError

COCO_FEATURES = "coco/features_100/COCO_trainval_resnext152_faster_rcnn_genome.lmdb"
COCO_TEST_FEATURES = "coco/features_100/COCO_test_resnext152_faster_rcnn_genome.lmdb"
FLICKR_FEATURES = "flickr30k/flickr30k_resnext152_faster_rcnn_genome.lmdb"
# Rows of the detected block (the detected boxes + the global region); pointing candidates follow it.
DETECTED_SLOTS = VISUAL_ROWS_PER_IMAGE


@dataclass(frozen=True)
class TrainingSetup:
    """What only training reads about a task: the reference's `vilbert_tasks.yml` entry."""

    yml_name: str  # the reference's name (used in the save folder name, like the reference)
    family: str  # which annotation reader
    dataroot: str
    features: str
    gt_features: str | None
    batch_size: int
    lr: float
    num_epoch: int
    train_split: str
    val_split: str
    test_features: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A registry task (config/tasks.json) with its training setup."""

    task_id: int
    name: str  # our registry name
    kind: str  # one of vilbert.tasks.KINDS
    head: str
    answers: str | None  # the answer list of an "answer" task
    max_seq_length: int
    max_region_num: int
    yml_name: str
    family: str
    dataroot: str
    features: str
    gt_features: str | None
    batch_size: int
    lr: float
    num_epoch: int
    train_split: str
    val_split: str
    test_features: str | None = None

    @classmethod
    def join(cls, task: Task, setup: TrainingSetup) -> "TaskSpec":
        return cls(task.task_id, task.name, task.kind, task.head, task.answers, task.max_seq_length,
                   task.max_region_num, **vars(setup))


def _refer(folder: str, name: str) -> TrainingSetup:
    prefix = f"refcoco/{folder}/{name}"
    return TrainingSetup(name, name, "refcoco", f"{prefix}_resnext152_faster_rcnn_genome.lmdb",
                         f"{prefix}_gt_resnext152_faster_rcnn_genome.lmdb", 256, 2e-5, 20, "train", "val")


# Keyed by registry name; test_train_data checks that these are exactly the registry's tasks.
TRAINING: dict[str, TrainingSetup] = {
    "vqa": TrainingSetup("VQA", "vqa", "VQA", COCO_FEATURES, None, 128, 4e-5, 20, "trainval", "minval",
                         COCO_TEST_FEATURES),
    "genome_qa": TrainingSetup("GenomeQA", "genome", "visual_genome",
                               "visual_genome/vg_resnext152_faster_rcnn_genome.lmdb", None, 128, 4e-5, 20,
                               "train", "val"),
    "visual7w": TrainingSetup("Visual7w", "visual7w", "visual7w",
                              "visual7w/visual7w_resnext152_faster_rcnn_genome.lmdb",
                              "visual7w/visual7w_gt_resnext152_faster_rcnn_genome.lmdb", 256, 2e-5, 20,
                              "train", "val"),
    "retrieval_coco": TrainingSetup("RetrievalCOCO", "retrieval_coco", "cocoRetreival", COCO_FEATURES, None,
                                    128, 2e-5, 20, "train", "val"),
    "retrieval_flickr30k": TrainingSetup("RetrievalFlickr30k", "retrieval_flickr", "flickr30k", FLICKR_FEATURES, None,
                                         128, 2e-5, 20, "train", "val"),
    "refcoco": _refer("refcoco_unc", "refcoco"),
    "refcoco_plus": _refer("refcoco+_unc", "refcoco+"),
    "refcocog": _refer("refcocog_umd", "refcocog"),
    "nlvr2": TrainingSetup("NLVR2", "nlvr2", "nlvr2", "nlvr2/nlvr2_resnext152_faster_rcnn_genome.lmdb", None,
                           64, 2e-5, 20, "train", "dev"),
    "snli_ve": TrainingSetup("VisualEntailment", "snli_ve", "visual_entailment", FLICKR_FEATURES, None,
                             256, 2e-5, 20, "train", "dev"),
    "gqa": TrainingSetup("GQA", "gqa", "gqa", "gqa/gqa_resnext152_faster_rcnn_genome.lmdb", None,
                         128, 4e-5, 20, "trainval", "minval"),
    "guesswhat": TrainingSetup("GuessWhatPointing", "guesswhat", "guesswhat", COCO_FEATURES,
                               "guesswhat/guesswhat_gt_resnext152_faster_rcnn_genome.lmdb", 64, 2e-5, 20,
                               "train", "valid"),
}


def training_specs(registry: TaskRegistry | None = None) -> dict[int, TaskSpec]:
    """Every registry task with a training setup, keyed by the reference's task id."""
    registry = registry or TaskRegistry.from_file()
    return {task.task_id: TaskSpec.join(task, TRAINING[task.name]) for task in registry if task.name in TRAINING}


SPECS: dict[int, TaskSpec] = training_specs()


def resolve_tasks(tasks: str, registry: TaskRegistry | None = None) -> list[TaskSpec]:
    """`1-2-4` (the reference's ids) or registry names (`vqa-refcoco`, also comma-separated), in order."""
    registry = registry or TaskRegistry.from_file()
    specs: list[TaskSpec] = []
    for token in tasks.replace(",", "-").split("-") if tasks.strip() else []:
        token = token.strip()
        if not token:
            continue
        if token.isdigit():
            task_id = int(token)
            if task_id not in SPECS:
                raise UnknownTaskError(token, (f"{i} ({s.name})" for i, s in SPECS.items()))
            spec = SPECS[task_id]
        else:
            registry.get(token)  # UnknownTaskError lists the registry's names
            spec = next((s for s in SPECS.values() if s.name == token), None)
            if spec is None:
                raise UnknownTaskError(token, (s.name for s in SPECS.values()))
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise ValueError("no task selected: pass --tasks, e.g. --tasks 13 or --tasks vqa-gqa")
    return specs


def with_overrides(spec: TaskSpec, **values) -> TaskSpec:
    return replace(spec, **{k: v for k, v in values.items() if v is not None})
