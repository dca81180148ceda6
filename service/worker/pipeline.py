"""Models loaded once, requests in, JSON-ready results out: decode -> regions (detector) -> predict (ViLBERT).

Usable in-process without HTTP or Redis:

    pipeline = Pipeline.from_dir("models/weights")
    result = pipeline.run(InferenceRequest(images=[open("cat.jpg", "rb").read()], text="what is this?",
                                           tasks=["vqa"]))

`run_many` takes several requests and runs each stage over all of them together (one detector call over every
image, then the ViLBERT forwards), so a batching worker can hand it whatever it has dequeued; `run` is the
one-request case. The stages are separate methods with their own timings, so a feature cache can later sit
between decode and the detector.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from detector.categories import CATEGORIES_FILE, CategoriesError, CategoryNames
from detector.extractor import RegionFeatureExtractor
from detector.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from detector.regions import RegionFeatures
from detector.tiny import CHECKPOINT_FILE as DETECTOR_CHECKPOINT, CONFIG_FILE as DETECTOR_CONFIG
from modelkit.regions import REGIONS_PER_IMAGE
from vilbert.predictor import PredictionInputError, Predictor, PredictRequest

from ..boxes import check_boxes
from ..bundle import TINY_NOTICE, is_tiny, missing_files
from ..contract import DECODE, DETECTOR, NON_FINITE_OUTPUT, VILBERT, timing_key
from ..errors import BadRequest, PipelineError
from ..settings import Settings
from .cache import FeatureCache, extract_cached

log = logging.getLogger(__name__)

# on_stage(stage, detail): called as a request batch enters each stage, for progress reporting.
StageCallback = Callable[[str, str], None]


def _no_progress(stage: str, detail: str) -> None:
    """The StageCallback of a caller that wants no progress reports."""


@dataclass
class InferenceRequest:
    images: Sequence[bytes | np.ndarray]  # encoded image bytes (or RGB arrays, in-process)
    text: str
    tasks: Sequence[str]
    top_k: int = 3
    boxes: Sequence[Sequence[float]] | None = None  # candidate boxes on the first image, for pointing tasks
    # Precomputed region features per image (service.features), instead of `images`: no decode, no detector.
    features: Sequence[RegionFeatures] | None = None


@dataclass
class _Work:
    """One request on its way through the stages."""

    request: InferenceRequest
    rgb: list[np.ndarray] = field(default_factory=list)
    regions: list[RegionFeatures] = field(default_factory=list)
    candidates: RegionFeatures | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: PipelineError | None = None
    cache: str = "off"  # hit, miss, partial (some images), features (client sent them), off (no cache)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def detector_precision(precision: str, device: str) -> str:
    """The detector's precision for a worker's PRECISION: fp32 on CPU, where reduced-precision convolutions have
    no fast kernels (docs/PERFORMANCE.md), the worker's precision on an accelerator."""
    return "fp32" if device == "cpu" else precision


class Pipeline:
    def __init__(self, extractor: RegionFeatureExtractor, predictor: Predictor, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 tiny: bool = False, cache: FeatureCache | None = None, names: CategoryNames | None = None):
        if extractor.feature_dim != predictor.feature_dim:
            raise ValueError(
                f"the detector gives {extractor.feature_dim}-d region features but ViLBERT expects "
                f"{predictor.feature_dim}-d (v_feature_size): the bundle mixes files of different models"
            )
        self.extractor = extractor
        self.predictor = predictor
        self.max_image_pixels = max_image_pixels
        self.tiny = tiny
        self.cache = cache  # region features in Redis, shared by workers (FEATURE_CACHE_TTL > 0); None: off
        self.names = names  # the detector's class names (region labels); None: the bundle has no category file

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "auto", precision: str = "fp32", min_size: int = 800,
                 max_size: int = 1333, num_regions: int = REGIONS_PER_IMAGE,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS) -> "Pipeline":
        """Load the detector and ViLBERT from a weights bundle (see docs/WEIGHTS.md for the layout)."""
        model_dir = Path(model_dir)
        missing = missing_files(model_dir)
        if missing:
            raise FileNotFoundError(
                f"the weights bundle in {model_dir} lacks {', '.join(missing)}: run `python models/fetch.py --dest "
                f"{model_dir}` for the released weights, or `python models/make_tiny.py --out DIR` for a tiny test bundle"
            )
        device = resolve_device(device)
        started = time.perf_counter()
        extractor = RegionFeatureExtractor.from_files(
            model_dir / DETECTOR_CONFIG, model_dir / DETECTOR_CHECKPOINT, device=device, min_size=min_size,
            max_size=max_size, num_regions=num_regions, max_pixels=max_image_pixels,
            precision=detector_precision(precision, device),
        )
        predictor = Predictor.from_dir(model_dir, device=device, precision=precision)
        log.info("loaded detector %s (%s) and ViLBERT (%s%s) from %s on %s in %.1f s", extractor.identity,
                 extractor.precision, predictor.precision, ", oneDNN-packed weights" if predictor.packed_weights else "",
                 model_dir, device, time.perf_counter() - started)
        return cls(extractor, predictor, max_image_pixels=max_image_pixels, tiny=is_tiny(model_dir),
                   names=load_category_names(model_dir, extractor.config.num_classes))

    def with_cache(self, cache: FeatureCache | None) -> "Pipeline":
        """The same models with a feature cache. The cache is keyed by the loaded detector's identity, so it can
        only be made after loading; the worker passes the result on instead of changing this pipeline."""
        return Pipeline(self.extractor, self.predictor, self.max_image_pixels, self.tiny, cache, self.names)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Pipeline":
        return cls.from_dir(settings.model_dir, settings.device, settings.precision, settings.detector_min_size,
                            settings.detector_max_size, settings.detector_num_regions, settings.max_image_pixels)

    @property
    def info(self) -> dict:
        """What a result says about the models that produced it."""
        info = {"device": str(self.predictor.device), "detector": self.extractor.identity, "tiny": self.tiny,
                "feature_dim": self.predictor.feature_dim,
                # reduced precision changes the answers slightly: a result says what produced it
                "precision": {"vilbert": self.predictor.precision, "detector": self.extractor.precision}}
        if self.tiny:
            info["notice"] = TINY_NOTICE
        return info

    # ----------------------------------------------------------------------------------------------------------

    def run(self, request: InferenceRequest, on_stage: StageCallback | None = None) -> dict:
        """The result for one request; raises PipelineError for a request that cannot be answered."""
        outcome = self.run_many([request], on_stage)[0]
        if isinstance(outcome, PipelineError):
            raise outcome
        return outcome

    def run_many(self, requests: Sequence[InferenceRequest],
                 on_stage: StageCallback | None = None) -> list[dict | PipelineError]:
        """One outcome per request, in order: its result, or the PipelineError that stopped it. A failing request
        does not fail the others."""
        notify = on_stage or _no_progress
        work = [_Work(request) for request in requests]
        notify(DECODE, f"{sum(len(r.images) for r in requests)} image(s)")
        for item in work:
            self._decode(item)
        live = [item for item in work if item.error is None]
        notify(DETECTOR, f"{sum(len(item.rgb) for item in live)} image(s)")
        self._regions(live)
        live = [item for item in live if item.error is None]
        notify(VILBERT, f"{sum(len(item.request.tasks) for item in live)} task(s)")
        results = self._predict_all(live)
        return [item.error if item.error is not None else results[id(item)] for item in work]

    def _decode(self, item: _Work) -> None:
        started = time.perf_counter()
        if item.request.features is not None:
            item.regions, item.cache = list(item.request.features), "features"
            if item.request.boxes:
                item.error = PipelineError("boxes_need_image", "candidate boxes need the image itself, not "
                                                               "precomputed features", DECODE)
            item.timings[timing_key(DECODE)] = 0.0
            return
        try:
            if not item.request.images:
                raise PipelineError("missing_image", "at least one image is required", DECODE)
            for index, image in enumerate(item.request.images):
                try:
                    item.rgb.append(load_image(image, self.max_image_pixels))
                except ImageDecodeError as exc:
                    raise PipelineError(exc.code, f"image {index}: {exc.message}", DECODE) from None
            if item.request.boxes:
                height, width = item.rgb[0].shape[:2]
                try:
                    check_boxes(item.request.boxes, width, height)
                except BadRequest as exc:
                    raise PipelineError.at(DECODE, exc) from None
        except PipelineError as exc:
            item.error = exc
        item.timings[timing_key(DECODE)] = time.perf_counter() - started

    def _regions(self, items: list[_Work]) -> None:
        """One detector call over every image of every request; then the candidate boxes of pointing requests."""
        items = [item for item in items if item.request.features is None]
        if not items:
            return
        started = time.perf_counter()
        images = [rgb for item in items for rgb in item.rgb]
        raw = [image for item in items for image in item.request.images]
        found, hits = extract_cached(self.extractor, self.cache, raw, images)
        regions, hit = iter(found), iter(hits)
        for item in items:
            item.regions = [next(regions) for _ in item.rgb]
            if self.cache is not None:
                own = [next(hit) for _ in item.rgb]
                item.cache = "hit" if all(own) else "partial" if any(own) else "miss"
        shared = time.perf_counter() - started
        for item in items:
            extra = 0.0
            if item.request.boxes and any(self.predictor.tasks.get(n).needs_candidates for n in item.request.tasks
                                          if n in self.predictor.tasks):
                box_started = time.perf_counter()
                item.candidates = self.extractor.extract_boxes(item.rgb[0], item.request.boxes)
                extra = time.perf_counter() - box_started
            # In a batch each request waited for the whole detector call: report that, not a share of it.
            item.timings[timing_key(DETECTOR)] = shared + extra

    def _predict_all(self, items: list[_Work]) -> dict[int, dict]:
        """ONE ViLBERT batch over every live request (Predictor.predict_many); answers equal per-request calls.
        Returns the results by id(item); an item that fails here gets its `error` instead."""
        if not items:
            return {}
        started = time.perf_counter()
        # Candidate boxes lie on the first image, the one pointing tasks read.
        requests = [PredictRequest(item.regions, item.request.text, list(item.request.tasks), item.request.top_k,
                                   [item.candidates]) for item in items]
        outcomes = self.predictor.predict_many(requests)
        elapsed = time.perf_counter() - started  # each request waited for the whole batch
        results: dict[int, dict] = {}
        for item, outcome in zip(items, outcomes):
            if isinstance(outcome, PredictionInputError):
                item.error = PipelineError(outcome.code, outcome.message, VILBERT)
                continue
            item.timings[timing_key(VILBERT)] = elapsed
            self._label_regions(outcome, item)
            result = {
                "text": item.request.text,
                "tasks": outcome,
                "images": [{"width": r.image_width, "height": r.image_height, "regions": int(len(r.boxes))}
                           for r in item.regions],
                "timings": {name: round(value, 4) for name, value in item.timings.items()},
                "cache": item.cache,
                "model": self.info,
            }
            if not strict_json(result):  # stored and served as strict JSON: NaN has no spelling there
                item.error = PipelineError(NON_FINITE_OUTPUT, "the model produced a non-finite value (NaN or "
                                                              "infinity) for this input; no answer is given", VILBERT)
                continue
            results[id(item)] = result
        return results

    def _label_regions(self, outcome: dict[str, dict], item: _Work) -> None:
        """Give each region of a grounding or pointing answer its detector class name (`label`): a grounding
        region's `region` indexes the rows (0: the whole image, which has no label; 1..: the detected boxes in
        order), a pointing candidate's class is the detector's for that box (a pointing answer always has its
        candidates: without them the request failed). None without a category file."""
        for name, answer in outcome.items():
            kind = self.predictor.tasks.get(name).kind
            if kind == "grounding":
                class_ids = item.regions[0].class_ids
                for region in answer["regions"]:
                    row = region["region"]
                    region["label"] = self.region_label(class_ids[row - 1]) if row > 0 else None
            elif kind == "pointing":
                for candidate, class_id in zip(answer["candidates"], item.candidates.class_ids):
                    candidate["label"] = self.region_label(class_id)

    def region_label(self, class_id: int) -> str | None:
        return self.names.label(int(class_id)) if self.names is not None else None


def load_category_names(model_dir: Path, num_classes: int) -> CategoryNames | None:
    """The bundle's region names, or None (logged) when it has no category file or one that does not fit the
    detector: answers then carry `label: null` rather than wrong names."""
    path = Path(model_dir) / CATEGORIES_FILE
    if not path.is_file():
        log.warning("%s has no %s: region labels are left out (null); `python models/fetch.py` installs it",
                    model_dir, CATEGORIES_FILE)
        return None
    try:
        return CategoryNames.from_file(path, num_classes)
    except (OSError, CategoriesError) as exc:
        log.error("region labels are left out (null): %s", exc)
        return None


def strict_json(value: object) -> bool:
    """Whether `value` serialises as strict JSON (no NaN or infinity, which JSON.parse and most parsers refuse)."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True
