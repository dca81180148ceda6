"""The task table of the reference's `vilbert_tasks.yml`, for the twelve tasks of the released model.

Paths are relative to the data root (the reference's `datasets/` folder). `kind` is the reference's task type:
classifier (VL-classifier / -GQA), retrieval (VL-logit), grounding (V-logit), pointing (V-logit-mc),
binary (VL-binary-classifier), tri (VL-tri-classifier).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vilbert.tasks import TaskRegistry, UnknownTaskError

COCO_FEATURES = "coco/features_100/COCO_trainval_resnext152_faster_rcnn_genome.lmdb"
COCO_TEST_FEATURES = "coco/features_100/COCO_test_resnext152_faster_rcnn_genome.lmdb"
FLICKR_FEATURES = "flickr30k/flickr30k_resnext152_faster_rcnn_genome.lmdb"
# Rows of the detected block (100 boxes + the global region); pointing candidates follow it.
DETECTED_SLOTS = 101


@dataclass(frozen=True)
class TaskSpec:
    task_id: int
    yml_name: str  # the reference's name (used in the save folder name, like the reference)
    name: str  # our registry name (config/tasks.json)
    kind: str
    head: str
    family: str  # which annotation reader
    dataroot: str
    features: str
    gt_features: str | None
    max_seq_length: int
    max_region_num: int
    batch_size: int
    lr: float
    num_epoch: int
    train_split: str
    val_split: str
    test_features: str | None = None


SPECS: dict[int, TaskSpec] = {s.task_id: s for s in [
    TaskSpec(1, "VQA", "vqa", "classifier", "vil_prediction", "vqa", "VQA", COCO_FEATURES, None,
             23, 101, 128, 4e-5, 20, "trainval", "minval", COCO_TEST_FEATURES),
    TaskSpec(2, "GenomeQA", "genome_qa", "classifier", "vil_prediction", "genome", "visual_genome",
             "visual_genome/vg_resnext152_faster_rcnn_genome.lmdb", None, 26, 101, 128, 4e-5, 20, "train", "val"),
    TaskSpec(4, "Visual7w", "visual7w", "pointing", "vision_logit", "visual7w", "visual7w",
             "visual7w/visual7w_resnext152_faster_rcnn_genome.lmdb",
             "visual7w/visual7w_gt_resnext152_faster_rcnn_genome.lmdb", 20, 200, 256, 2e-5, 20, "train", "val"),
    TaskSpec(7, "RetrievalCOCO", "retrieval_coco", "retrieval", "vil_logit", "retrieval_coco", "cocoRetreival",
             COCO_FEATURES, None, 30, 101, 128, 2e-5, 20, "train", "val"),
    TaskSpec(8, "RetrievalFlickr30k", "retrieval_flickr30k", "retrieval", "vil_logit", "retrieval_flickr",
             "flickr30k", FLICKR_FEATURES, None, 30, 101, 128, 2e-5, 20, "train", "val"),
    TaskSpec(9, "refcoco", "refcoco", "grounding", "vision_logit", "refcoco", "refcoco",
             "refcoco/refcoco_unc/refcoco_resnext152_faster_rcnn_genome.lmdb",
             "refcoco/refcoco_unc/refcoco_gt_resnext152_faster_rcnn_genome.lmdb", 20, 101, 256, 2e-5, 20, "train", "val"),
    TaskSpec(10, "refcoco+", "refcoco_plus", "grounding", "vision_logit", "refcoco+", "refcoco",
             "refcoco/refcoco+_unc/refcoco+_resnext152_faster_rcnn_genome.lmdb",
             "refcoco/refcoco+_unc/refcoco+_gt_resnext152_faster_rcnn_genome.lmdb", 20, 101, 256, 2e-5, 20, "train", "val"),
    TaskSpec(11, "refcocog", "refcocog", "grounding", "vision_logit", "refcocog", "refcoco",
             "refcoco/refcocog_umd/refcocog_resnext152_faster_rcnn_genome.lmdb",
             "refcoco/refcocog_umd/refcocog_gt_resnext152_faster_rcnn_genome.lmdb", 20, 101, 256, 2e-5, 20, "train", "val"),
    TaskSpec(12, "NLVR2", "nlvr2", "binary", "vil_binary_prediction", "nlvr2", "nlvr2",
             "nlvr2/nlvr2_resnext152_faster_rcnn_genome.lmdb", None, 40, 101, 64, 2e-5, 20, "train", "dev"),
    TaskSpec(13, "VisualEntailment", "snli_ve", "tri", "vil_tri_prediction", "snli_ve", "visual_entailment",
             FLICKR_FEATURES, None, 56, 101, 256, 2e-5, 20, "train", "dev"),
    TaskSpec(15, "GQA", "gqa", "classifier", "vil_prediction_gqa", "gqa", "gqa",
             "gqa/gqa_resnext152_faster_rcnn_genome.lmdb", None, 26, 101, 128, 4e-5, 20, "trainval", "minval"),
    TaskSpec(17, "GuessWhatPointing", "guesswhat", "pointing", "vision_logit", "guesswhat", "guesswhat",
             COCO_FEATURES, "guesswhat/guesswhat_gt_resnext152_faster_rcnn_genome.lmdb", 256, 306, 64, 2e-5, 20,
             "train", "valid"),
]}


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
