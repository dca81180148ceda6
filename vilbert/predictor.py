"""From region features and a text to decoded, JSON-ready answers for any set of tasks, in batched forwards.

Inputs are built exactly as the reference's feature reader and demo do: the mean of the region features is
prepended as a "global" region 0 with location [0, 0, 1, 1, 1]; every box gets the 5-d location
[x1/W, y1/H, x2/W, y2/H, area/(W*H)] in the original image size; [CLS] text [SEP] with segment ids 0; the
task's token id per row.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from modelkit.precision import check_precision, precision_autocast
from modelkit.regions import VISUAL_ROWS_PER_IMAGE

from .answers import load_bundle_answers
from .checkpoint import load_model
from .configuration import ViLBertConfig
from .cpu_inference import native_bf16_linear_available, onednn_linear_available, pack_linear_weights
from .modeling import ViLBertForVLTasks, ViLBertOutput
from .resources import config_file
from .tasks import Task, TaskRegistry, UnknownTaskError
from .tokenization import PACKAGED_VOCAB, EncodedText, Tokenizer

PACKAGED_CONFIG = config_file("bert_base_6layer_6conect.json")
CHECKPOINT_FILE = "multi_task_model.bin"
CONFIG_FILE = "vilbert_config.json"
VOCAB_FILE = "vocab.txt"
# Regions the detector contributes to every row (its boxes + the global region), as in training.
DETECTED_REGIONS = VISUAL_ROWS_PER_IMAGE
# The measured cost of a reduced precision on a CPU without native instructions for it, quoted from
# docs/PERFORMANCE.md (ViLBERT section) in the warning that the predictor logs.
SLOW_CPU_PRECISION = {
    "bf16": "measured 5-8x slower than fp32 (docs/PERFORMANCE.md: 0.20x the fp32 speed at batch 1 and 0.13x at "
            "batch 8 on an AVX2 EPYC; emulated bf16 on AVX-512 without BF16 ran at a third of fp32)",
    "fp16": "measured 3x slower than fp32 (docs/PERFORMANCE.md: 677 ms against 224 ms at batch 1 on a Zen 4 "
            "without AVX512-FP16)",
}

log = logging.getLogger(__name__)


class RegionsLike(Protocol):
    boxes: np.ndarray  # [N, 4] float x1 y1 x2 y2, original-image pixels
    features: np.ndarray  # [N, D] float
    image_width: int
    image_height: int


@dataclass
class ImageRegions:
    """Region features of one image (the detector's RegionFeatures has the same attributes)."""

    boxes: np.ndarray
    features: np.ndarray
    image_width: int
    image_height: int


@dataclass
class PredictRequest:
    """One request of `Predictor.predict_many`: the arguments of `predict`."""

    images: Sequence[RegionsLike]
    text: str
    tasks: Sequence[str]
    top_k: int = 3
    candidates: Sequence[RegionsLike | None] | None = None


class PredictionInputError(ValueError):
    """The request cannot be answered as given (wrong image count, missing candidate boxes, …)."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


def box_locations(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """[N, 4] pixel boxes -> [N, 5] normalised locations (x1/W, y1/H, x2/W, y2/H, relative area)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / float(width * height)
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.concatenate([boxes / scale, area[:, None]], axis=1).astype(np.float32)


@dataclass
class RegionRows:
    """The visual input of one batch row. Row 0 is the global region."""

    features: np.ndarray  # [R, D]
    spatials: np.ndarray  # [R, 5]
    boxes: np.ndarray  # [R, 4] pixel boxes; the global region is the whole image
    num_candidates: int = 0  # candidate boxes at the end (pointing tasks)


def region_rows(image: RegionsLike, max_regions: int = DETECTED_REGIONS, candidates: RegionsLike | None = None) -> RegionRows:
    """Global region + detected boxes (+ candidate boxes for pointing tasks), as the reference datasets build them.

    For pointing tasks the reference merges the detected and the candidate ("ground-truth") feature files: the
    global feature is the count-weighted mean of both files' global rows, detected boxes come first and the
    candidates occupy the last rows."""
    features = np.asarray(image.features, dtype=np.float32)
    boxes = np.asarray(image.boxes, dtype=np.float32).reshape(-1, 4)
    if features.ndim != 2 or len(features) != len(boxes) or len(boxes) == 0:
        raise PredictionInputError("invalid_regions", "region features and boxes must be non-empty and of equal count")
    width, height = int(image.image_width), int(image.image_height)
    global_feature = features.mean(axis=0, keepdims=True)
    count = len(boxes) + 1  # the reference's num_boxes includes the global row
    num_candidates = 0
    if candidates is not None:
        cand_features = np.asarray(candidates.features, dtype=np.float32)
        cand_boxes = np.asarray(candidates.boxes, dtype=np.float32).reshape(-1, 4)
        num_candidates = len(cand_boxes)
        cand_count = num_candidates + 1
        global_feature = (global_feature * count + cand_features.mean(axis=0, keepdims=True) * cand_count) / (
            count + cand_count
        )
    keep = min(len(boxes), max_regions - 1 - num_candidates)
    rows_features = [global_feature, features[:keep]]
    rows_boxes = [np.array([[0, 0, width, height]], dtype=np.float32), boxes[:keep]]
    if num_candidates:
        rows_features.append(cand_features)
        rows_boxes.append(cand_boxes)
    all_boxes = np.concatenate(rows_boxes)
    spatials = box_locations(all_boxes, width, height)
    spatials[0] = [0.0, 0.0, 1.0, 1.0, 1.0]
    return RegionRows(np.concatenate(rows_features), spatials, all_boxes, num_candidates)


@dataclass
class _Row:
    task: Task
    text: EncodedText
    regions: RegionRows


def softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.float(), dim=-1)


class Predictor:
    """Runs the multi-task model for a text and the region features of one or more images."""

    def __init__(
        self,
        model: ViLBertForVLTasks,
        tokenizer: Tokenizer,
        answers: dict[str, list[str]],
        registry: TaskRegistry | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        pack_cpu_weights: bool = True,
    ):
        """pack_cpu_weights: on CPU, reorder the Linear weights for oneDNN (see cpu_inference) in fp32, and in
        bf16 where the CPU has native bf16 instructions; the model is then inference-only."""
        check_precision(precision)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.packed_weights = False
        on_cpu = self.device.type == "cpu"
        native_bf16 = on_cpu and precision == "bf16" and native_bf16_linear_available()
        if pack_cpu_weights and on_cpu:
            if precision == "fp32" and onednn_linear_available():
                self.packed_weights = pack_linear_weights(self.model) > 0
            elif native_bf16:
                self.packed_weights = pack_linear_weights(self.model, dtype=torch.bfloat16) > 0
        if on_cpu and precision != "fp32" and not native_bf16:
            # A worker started with PRECISION=bf16/fp16 says this in its start-up log instead of silently running
            # several times slower.
            log.warning("precision %s on this CPU runs slower than fp32 (it lacks native %s instructions): %s. "
                        "On CPU use PRECISION=fp32, or bf16 where the CPU has AVX512-BF16 or AMX",
                        precision, precision, SLOW_CPU_PRECISION[precision])
        self.tokenizer = tokenizer
        self.answers = answers
        self.tasks = registry or TaskRegistry.from_file()
        self.precision = precision
        self.feature_dim = model.config.v_feature_size

    @classmethod
    def from_dir(
        cls, model_dir: str | os.PathLike, device: str = "cpu", precision: str = "fp32", pack_cpu_weights: bool = True
    ) -> "Predictor":
        """Load a weights bundle: multi_task_model.bin, answer lists, optional vilbert_config.json and vocab.txt."""
        model_dir = Path(model_dir)
        checkpoint = model_dir / CHECKPOINT_FILE
        if not checkpoint.is_file():
            raise FileNotFoundError(
                f"no ViLBERT checkpoint at {checkpoint}: run `python models/fetch.py --dest {model_dir}` for the "
                f"released weights, or `python models/make_tiny.py --out {model_dir}` for a tiny test bundle"
            )
        config_path = model_dir / CONFIG_FILE
        config = ViLBertConfig.from_json_file(config_path if config_path.is_file() else PACKAGED_CONFIG)
        vocab = model_dir / VOCAB_FILE
        tokenizer = Tokenizer(vocab if vocab.is_file() else PACKAGED_VOCAB)
        model = load_model(checkpoint, config, device=device)
        return cls(model, tokenizer, load_bundle_answers(model_dir), device=device, precision=precision,
                   pack_cpu_weights=pack_cpu_weights)

    # ----------------------------------------------------------------------------------------------------------

    def predict(
        self,
        images: Sequence[RegionsLike],
        text: str,
        tasks: Sequence[str],
        top_k: int = 3,
        candidates: Sequence[RegionsLike | None] | None = None,
    ) -> dict[str, dict]:
        """Answers for every task in `tasks`, keyed by task name.

        images: region features per image (nlvr2 needs exactly two; retrieval scores each one; the other tasks
        read the first). candidates: per image, the caller-given boxes with their features (pointing tasks)."""
        selected, rows, row_ids = self._plan(images, text, tasks, candidates)
        return self._answers(selected, self._run(rows), rows, row_ids, top_k)

    def predict_many(self, requests: Sequence[PredictRequest]) -> list[dict[str, dict] | PredictionInputError]:
        """`predict` for several requests with ONE forward over all their rows (per distinct region count), for
        a batching worker. One outcome per request, in order: its answers, or the PredictionInputError that a
        bad request raised (it does not fail the others). Answers equal `predict`'s per request: rows are
        padded and masked, never mixed."""
        outcomes: list[dict[str, dict] | PredictionInputError | None] = [None] * len(requests)
        plans = []
        rows: list[_Row] = []
        for index, request in enumerate(requests):
            try:
                selected, own_rows, own_ids = self._plan(request.images, request.text, request.tasks,
                                                         request.candidates)
            except PredictionInputError as exc:
                outcomes[index] = exc
                continue
            except UnknownTaskError as exc:
                outcomes[index] = PredictionInputError("unknown_task", str(exc))
                continue
            offset = len(rows)
            rows.extend(own_rows)
            plans.append((index, selected, {name: [offset + i for i in ids] for name, ids in own_ids.items()}))
        outputs = self._run(rows)
        for index, selected, row_ids in plans:
            outcomes[index] = self._answers(selected, outputs, rows, row_ids, requests[index].top_k)
        return outcomes  # type: ignore[return-value]

    def score_images(self, text: str, images: Sequence[RegionsLike], task: str = "retrieval_coco",
                     batch_size: int = 64) -> np.ndarray:
        """The retrieval logit of `text` against each image, for ranking many images (a collection search).

        The text side (embeddings and the text-only layers before the first co-attention) is computed once and
        broadcast to every image; images go through in forwards of `batch_size`. Each score equals the `scores`
        entry that `predict(images, text, [task])` gives for that image (to float rounding). -> [N] float32."""
        chosen = self.tasks.get(task)
        if chosen.kind != "score":
            raise PredictionInputError("unknown_task", f"task {chosen.name} does not score images; use a "
                                                       "retrieval task")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not images:
            return np.zeros(0, np.float32)
        for image in images:
            if np.asarray(image.features).shape[-1] != self.feature_dim:
                raise PredictionInputError("feature_size", f"region features have "
                                           f"{np.asarray(image.features).shape[-1]} dimensions, the model expects "
                                           f"{self.feature_dim}")
        encoded = self.tokenizer.encode(text, chosen.max_seq_length, pad=False)
        input_ids = torch.tensor([encoded.input_ids], dtype=torch.long, device=self.device)
        scores = []
        with torch.inference_mode(), precision_autocast(self.device.type, self.precision):
            prefix = self.model.bert.encode_text(input_ids, torch.zeros_like(input_ids), torch.ones_like(input_ids),
                                                 torch.tensor([[chosen.task_id]], device=self.device))
            for start in range(0, len(images), batch_size):
                rows = [region_rows(image) for image in images[start:start + batch_size]]
                features, spatials, mask = self._visual_batch(rows)
                scores.append(self.model.retrieval_logits(prefix, features, spatials, mask).float().cpu())
        return torch.cat(scores).numpy()

    def _visual_batch(self, rows: Sequence[RegionRows]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The visual tensors of a batch of region rows, padded to the longest: features [B, R, D],
        spatials [B, R, 5], image mask [B, R] (1 = a real region), on the predictor's device."""
        regions = max(len(r.features) for r in rows)
        features = torch.zeros(len(rows), regions, self.feature_dim)
        spatials = torch.zeros(len(rows), regions, 5)
        mask = torch.zeros(len(rows), regions, dtype=torch.long)
        for i, row in enumerate(rows):
            count = len(row.features)
            features[i, :count] = torch.from_numpy(row.features)
            spatials[i, :count] = torch.from_numpy(row.spatials)
            mask[i, :count] = 1
        return features.to(self.device), spatials.to(self.device), mask.to(self.device)

    def _answers(self, selected: list[Task], outputs: list[dict[str, torch.Tensor]], rows: list[_Row],
                 row_ids: dict[str, list[int]], top_k: int) -> dict[str, dict]:
        """Decoded answers per task name, from the per-row outputs of a forward over `rows`."""
        return {task.name: self._decode(task, [outputs[i] for i in row_ids[task.name]], rows, row_ids[task.name], top_k)
                for task in selected}

    def _plan(self, images: Sequence[RegionsLike], text: str, tasks: Sequence[str],
              candidates: Sequence[RegionsLike | None] | None) -> tuple[list[Task], list[_Row], dict[str, list[int]]]:
        """Validate one request and lay out its model rows: (tasks, rows, row indices per task name)."""
        selected = self.tasks.resolve(tasks)
        if not selected:
            raise PredictionInputError("no_tasks", "no task requested")
        if not images:
            raise PredictionInputError("no_images", "at least one image is required")
        for image in images:
            if np.asarray(image.features).shape[-1] != self.feature_dim:
                raise PredictionInputError(
                    "feature_size", f"region features have {np.asarray(image.features).shape[-1]} dimensions, "
                    f"the model expects {self.feature_dim}"
                )
        rows: list[_Row] = []
        row_ids: dict[str, list[int]] = {}
        for task in selected:
            # Single-image tasks read the first image of a multi-image request; the others need their count.
            if task.max_images != 1 and not task.accepts_image_count(len(images)):
                raise PredictionInputError(
                    "image_count", f"task {task.name} needs {task.images} images, got {len(images)}"
                )
            encoded = self.tokenizer.encode(text, task.max_seq_length, pad=False)
            row_ids[task.name] = []
            for image_index in self._images_for(task, len(images)):
                cand = None
                if task.needs_candidates:
                    cand = candidates[image_index] if candidates and image_index < len(candidates) else None
                    if cand is None or len(np.asarray(cand.boxes).reshape(-1, 4)) == 0:
                        raise PredictionInputError("missing_candidates", f"task {task.name} needs candidate boxes")
                    if len(np.asarray(cand.boxes).reshape(-1, 4)) > task.max_region_num - DETECTED_REGIONS:
                        raise PredictionInputError(
                            "too_many_candidates",
                            f"task {task.name} takes at most {task.max_region_num - DETECTED_REGIONS} candidate boxes",
                        )
                regions = region_rows(images[image_index], DETECTED_REGIONS, cand)
                row_ids[task.name].append(len(rows))
                rows.append(_Row(task, encoded, regions))
        return selected, rows, row_ids

    @staticmethod
    def _images_for(task: Task, count: int) -> range:
        # Retrieval scores every image against the text and NLVR2 reads its two images as a pair of rows;
        # every other task reads the first image.
        return range(count) if task.max_images != 1 else range(1)

    def _run(self, rows: list[_Row]) -> list[dict[str, torch.Tensor]]:
        """One forward per distinct region count (normally one), rows padded within it. Returns per-row heads."""
        per_row: list[dict[str, torch.Tensor] | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(len(row.regions.features), []).append(index)
        for indices in groups.values():
            output = self.forward([rows[i] for i in indices])
            for position, index in enumerate(indices):
                per_row[index] = {
                    "vil_prediction": output.vil_prediction[position],
                    "vil_prediction_gqa": output.vil_prediction_gqa[position],
                    "vil_logit": output.vil_logit[position, 0],
                    "vil_tri_prediction": output.vil_tri_prediction[position],
                    "vision_logit": output.vision_logit[position, :, 0],
                    "pooled_output": output.pooled_output[position],
                }
        return per_row  # type: ignore[return-value]

    def forward(self, rows: list[_Row]) -> ViLBertOutput:
        """Pad rows to a common text length and region count and run the model once."""
        batch = len(rows)
        length = max(len(r.text.input_ids) for r in rows)
        input_ids = torch.zeros(batch, length, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.text.input_ids)
            input_ids[i, :n] = torch.tensor(row.text.input_ids)
            attention_mask[i, :n] = 1
        features, spatials, image_mask = self._visual_batch([row.regions for row in rows])
        task_ids = torch.tensor([[row.task.task_id] for row in rows], dtype=torch.long)
        device = self.device
        with torch.inference_mode(), precision_autocast(self.device.type, self.precision):
            # segment ids: all 0 (the model's default), as the reference demo sends them
            return self.model(
                input_ids=input_ids.to(device),
                features=features,
                spatials=spatials,
                attention_mask=attention_mask.to(device),
                image_attention_mask=image_mask,
                task_ids=task_ids.to(device),
            )

    # ----------------------------------------------------------------------------------------------------------

    def _decode(self, task: Task, outs: list[dict[str, torch.Tensor]], rows: list[_Row], ids: list[int],
                top_k: int) -> dict:
        """The JSON answer of one task from its rows' outputs (`outs`, the rows at `ids`)."""
        return {"task_id": task.task_id, **self._DECODERS[task.kind](self, task, outs, [rows[i] for i in ids], top_k)}

    def _decode_answer(self, task: Task, outs: list[dict[str, torch.Tensor]], rows: list[_Row], top_k: int) -> dict:
        probs = softmax(outs[0][task.head])
        values, indices = probs.topk(min(top_k, probs.numel()))
        vocab = self.answers[task.answers]
        return {"answers": [{"answer": vocab[i], "probability": round(float(p), 6)}
                            for p, i in zip(values.tolist(), indices.tolist())]}

    def _decode_entailment(self, task: Task, outs: list[dict[str, torch.Tensor]], rows: list[_Row], top_k: int) -> dict:
        probs = softmax(outs[0]["vil_tri_prediction"]).tolist()
        labels = task.labels  # the registry holds them, three for an entailment task
        best = int(np.argmax(probs))
        return dict(label=labels[best], probabilities={l: round(p, 6) for l, p in zip(labels, probs)})

    def _decode_binary(self, task: Task, outs: list[dict[str, torch.Tensor]], rows: list[_Row], top_k: int) -> dict:
        # The forward ran without `pairs` (a served batch mixes requests): the pair head reads this request's
        # two rows here, once.
        with torch.inference_mode(), precision_autocast(self.device.type, self.precision):
            logits = self.model.pair_prediction(torch.stack([o["pooled_output"] for o in outs]))[0]
        probs = softmax(logits).tolist()
        labels = task.labels  # the registry holds them, two for a binary task
        best = int(np.argmax(probs))
        return dict(label=labels[best], probability=round(probs[best], 6),
                    probabilities={l: round(p, 6) for l, p in zip(labels, probs)})

    def _decode_score(self, task: Task, outs: list[dict[str, torch.Tensor]], rows: list[_Row], top_k: int) -> dict:
        scores = torch.stack([o["vil_logit"] for o in outs]).float()
        return dict(
            scores=[round(float(s), 6) for s in scores],
            probabilities=[round(float(p), 6) for p in softmax(scores)],
            ranking=[int(i) for i in torch.argsort(scores, descending=True, stable=True)],
        )

    def _decode_grounding(self, task: Task, outs: list[dict[str, torch.Tensor]], rows: list[_Row], top_k: int) -> dict:
        regions = rows[0].regions
        probs = softmax(outs[0]["vision_logit"][: len(regions.features)])
        values, indices = probs.topk(min(top_k, probs.numel()))
        return {"regions": [
            {"box": [round(float(c), 2) for c in regions.boxes[i]], "score": round(float(p), 6), "region": int(i)}
            for p, i in zip(values.tolist(), indices.tolist())
        ]}

    def _decode_pointing(self, task: Task, outs: list[dict[str, torch.Tensor]], rows: list[_Row], top_k: int) -> dict:
        regions = rows[0].regions
        start = len(regions.features) - regions.num_candidates
        probs = softmax(outs[0]["vision_logit"][start: len(regions.features)])
        candidates = [{"box": [round(float(c), 2) for c in regions.boxes[start + i]], "score": round(float(p), 6)}
                      for i, p in enumerate(probs.tolist())]
        return {"candidates": candidates, "best": int(torch.argmax(probs))}

    # The decoder of each task kind (vilbert.tasks.KINDS): (self, task, its rows' outputs, its rows, top_k).
    _DECODERS = {"answer": _decode_answer, "entailment": _decode_entailment, "binary": _decode_binary,
                 "score": _decode_score, "grounding": _decode_grounding, "pointing": _decode_pointing}
