"""Indexing images into a collection and searching it by caption, with the worker's models: what the collection
jobs run (service.worker.rq_batch), and the bulk path, which indexes a folder of images or a feature store written
by `python -m detector.extract` without going through HTTP.

    python -m service.worker.collections add NAME IMAGE_OR_DIR...     # detector once per image, regions stored
    python -m service.worker.collections add-features NAME STORE [--images DIR]   # a detector.extract store
    python -m service.worker.collections search NAME "a dog catching a frisbee" [--top-k 10] [--first-stage on]
    python -m service.worker.collections info NAME

Searching scores every image of the collection with the retrieval head (Predictor.score_images: the text side
computed once, images in forwards of `batch_size`, read from Redis in chunks of that size so a large collection
never sits in memory whole). Each score equals the retrieval_coco score a normal job gives for that image.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image

from detector.images import ImageDecodeError, load_image
from detector.records import encode_record

from vilbert.predictor import PredictionInputError, PredictRequest

from ..collections import CollectionStore, image_id_of
from ..lexical import rerank_candidates
from ..errors import BadRequest
from .pipeline import Pipeline

if TYPE_CHECKING:
    from detector.categories import CategoryNames
    from detector.store import FeatureStore

THUMBNAIL_SIDE = 256
SEARCH_TASKS = ("retrieval_coco", "retrieval_flickr30k")
GROUNDING_TASK = "refcoco"


def thumbnail(rgb: np.ndarray) -> bytes:
    """A JPEG of at most THUMBNAIL_SIDE pixels on its long side, for showing search hits."""
    image = Image.fromarray(rgb)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def file_problem(exc: OSError | ImageDecodeError) -> str:
    """Why a file of a bulk add was skipped: the decoder's message, or the system's reason it could not be read."""
    if isinstance(exc, ImageDecodeError):
        return exc.message
    return f"cannot read it ({exc.strerror or exc})"


def index_images(pipeline: Pipeline, store: CollectionStore, images: Sequence[bytes]) -> list[tuple[str, bool]]:
    """Run the detector on each image not yet in the collection and store its regions and thumbnail.
    Returns (image id, newly added) per image, in order; the same bytes twice are indexed once."""
    out = []
    for data in images:
        image_id = image_id_of(data)
        if store.has(image_id):
            out.append((image_id, False))
            continue
        rgb = load_image(data, pipeline.max_image_pixels)
        regions = pipeline.extractor.extract([rgb])[0]
        labels = pipeline.names.labels(regions.class_ids) if pipeline.names is not None else None
        out.append((image_id, store.add(image_id, regions, thumbnail(rgb), len(data), labels)))
    return out


def search(pipeline: Pipeline, store: CollectionStore, text: str, top_k: int = 10, task: str = "retrieval_coco",
           batch_size: int = 64, ground: bool = True, first_stage_above: int | None = None,
           rerank_top: int = 200) -> dict:
    """The collection's images ranked by the retrieval logit for `text`: {"hits": [{image_id, rank, score, width,
    height, box, box_score, label}], "images", "scored", "task", "grounded", "first_stage", "timings"}.

    With more than `first_stage_above` images (None: never), a lexical first stage (BM25 of the text's words over
    the images' region names, CollectionStore.lexical_ranking) picks the `rerank_top` images that ViLBERT scores;
    when fewer match, other images (in id order) fill the rest, so a text whose words name no region still gets
    hits. Otherwise every image is scored. Images are read and scored `batch_size` at a time. With `ground`, each
    hit's `box` is the top GROUNDING_TASK region for the same text (original-image pixels), `box_score` its
    probability and `label` the detector's name for it; else all three are None."""
    if task not in SEARCH_TASKS:  # the web tier checks it too (service.web.collections.parse_search)
        raise BadRequest("unknown_task", f"task must be one of {', '.join(SEARCH_TASKS)}, got {task[:40]!r}")
    started = time.perf_counter()
    ids = store.ids()
    first_stage: dict = {"used": False}
    if first_stage_above is not None and len(ids) > first_stage_above:
        ranked = store.lexical_ranking(text)
        chosen = rerank_candidates(ranked, ids, rerank_top)
        first_stage = {"used": True, "matched": len(ranked), "reranked": len(chosen)}
        images, ids = len(ids), chosen
    else:
        images = len(ids)
    lexical = time.perf_counter()
    scores = []
    read_s = 0.0
    for start in range(0, len(ids), batch_size):
        read_started = time.perf_counter()
        regions = store.regions(ids[start:start + batch_size])
        read_s += time.perf_counter() - read_started
        scores.append(pipeline.predictor.score_images(text, regions, task, batch_size=batch_size))
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    order = np.argsort(-all_scores, kind="stable")[:top_k]
    scored = time.perf_counter()
    top_ids = [ids[i] for i in order]
    top_regions = store.regions(top_ids)
    grounded = ground_regions(pipeline, text, top_regions) if ground else [(None, None, None)] * len(top_ids)
    hits = [{"image_id": image_id, "rank": rank + 1, "score": round(float(all_scores[i]), 6),
             "width": int(regions.image_width), "height": int(regions.image_height), "box": box, "box_score": box_score,
             "label": label}
            for rank, (i, image_id, regions, (box, box_score, label))
            in enumerate(zip(order, top_ids, top_regions, grounded))]
    total = time.perf_counter() - started
    return {"hits": hits, "images": images, "scored": len(ids), "task": task, "grounded": ground,
            "first_stage": first_stage,
            "timings": {"first_stage_s": seconds(lexical - started), "read_s": seconds(read_s),
                        "score_s": seconds(scored - lexical - read_s), "ground_s": seconds(total - (scored - started)),
                        "total_s": seconds(total)}}


def seconds(value: float) -> float:
    """A search's stage time as reported: to 0.1 ms (finer is noise)."""
    return round(value, 4)


def ground_regions(pipeline: Pipeline, text: str, images: Sequence) -> list[tuple[list[float] | None, float | None,
                                                                                  str | None]]:
    """(box, probability, label) of the top GROUNDING_TASK region for `text` in each image, in one forward over
    all of them; (None, None, None) for an image the task cannot answer (no region)."""
    if not images:
        return []
    requests = [PredictRequest(images=[regions], text=text, tasks=[GROUNDING_TASK], top_k=1) for regions in images]
    out = []
    for regions, outcome in zip(images, pipeline.predictor.predict_many(requests)):
        if isinstance(outcome, PredictionInputError) or not outcome[GROUNDING_TASK]["regions"]:
            out.append((None, None, None))
            continue
        best = outcome[GROUNDING_TASK]["regions"][0]
        index = best["region"] - 1  # row 0 is the whole image
        label = pipeline.region_label(regions.class_ids[index]) if 0 <= index < len(regions.class_ids) else None
        out.append((best["box"], best["score"], label))
    return out


def image_files(paths: Sequence[str]) -> list[Path]:
    """The files given, and the image files (by extension) directly inside the folders given, sorted."""
    suffixes = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".mpo"}
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"collections: no such file or folder: {path}")
    return files


def add_files(pipeline: Pipeline, store: CollectionStore, files: Sequence[Path],
              report: Callable[[str], None] = lambda line: None) -> dict:
    """The add command: index each file (the detector once per image not yet in the collection), one progress line
    each to `report`. A file that cannot be read or is not an image we accept is skipped and reported, and the
    others go on (a folder with one damaged photo still gets indexed). Returns {"added", "images" (the collection's
    count after), "skipped"}."""
    added = skipped = 0
    for number, path in enumerate(files, 1):
        try:
            (image_id, new), = index_images(pipeline, store, [path.read_bytes()])
        except (OSError, ImageDecodeError) as exc:
            skipped += 1
            report(f"[{number}/{len(files)}] {path.name}: skipped, {file_problem(exc)}")
            continue
        added += new
        report(f"[{number}/{len(files)}] {path.name}: {image_id} {'added' if new else 'already there'}")
    if added:
        store.register()  # counted among the collections (MAX_COLLECTIONS), as an add job does
    return {"added": added, "images": store.info().images, "skipped": skipped}


def store_image_files(folder: str | Path) -> dict[str, Path]:
    """The image files under `folder` by the id detector.extract gives them (file name up to the first dot)."""
    from detector.extract import collect_images, image_id

    return {image_id(path): path for path in collect_images([str(folder)], None)}


def index_feature_store(store: CollectionStore, features: "FeatureStore", images: dict[str, Path] | None,
                        max_image_pixels: int, report: Callable[[str], None] = lambda line: None,
                        names: "CategoryNames | None" = None) -> dict:
    """Index every image of a feature store (`python -m detector.extract`) into the collection, without running
    the detector: its stored regions become the collection's. `report` gets one progress line per image.

    images: the original files by the store's image ids (store_image_files). With them, an image's collection id
    is that of its file's bytes, the same id an add of the file over HTTP or by folder gives (so the collection
    never holds it twice), and its thumbnail is made from the file (whose size must be the one the regions were
    extracted at, else it is not the same image). Without them (None) an image has no thumbnail (the thumbnail
    route answers 404 no_thumbnail) and its id is derived from its regions (re-running is still a no-op); the
    store's id is kept in the image's metadata as `source`. An image that cannot be indexed (no file, another
    size, another feature width than the collection's) is skipped and reported. names: the detector's class names
    (the bundle's category file), for the lexical first stage's index as an add indexes them; None: not indexed.
    Returns {"added", "images" (the collection's count after), "skipped"}."""
    keys = sorted(features.keys())
    existing = store.ids()[:1]
    width = store.regions(existing)[0].features.shape[1] if existing else None
    added = skipped = 0
    for number, key in enumerate(keys, 1):
        regions = features.get(key)
        problem, thumb, size = None, None, 0
        if width is None:
            width = regions.features.shape[1]
        if regions.features.shape[1] != width:
            problem = f"features of width {regions.features.shape[1]}, the collection's are {width}"
        elif images is not None:
            path = images.get(key)
            if path is None:
                problem = "no image file with this id in the --images folder"
            else:
                try:
                    data = path.read_bytes()
                    rgb = load_image(data, max_image_pixels)
                except (OSError, ImageDecodeError) as exc:  # reported, the others go on
                    problem = f"{path.name}: {file_problem(exc)}"
                else:  # the size the regions were extracted at tells a wrong file (another image, resized)
                    if (rgb.shape[1], rgb.shape[0]) != (regions.image_width, regions.image_height):
                        problem = (f"{path.name} is {rgb.shape[1]}x{rgb.shape[0]}, the regions were extracted from "
                                   f"a {regions.image_width}x{regions.image_height} image")
                    else:
                        thumb, size, image_id = thumbnail(rgb), len(data), image_id_of(data)
        if problem is not None:
            skipped += 1
            report(f"[{number}/{len(keys)}] {key}: skipped, {problem}")
            continue
        if images is None:
            image_id = image_id_of(encode_record("", regions))  # from the regions alone, not the store's name
        labels = names.labels(regions.class_ids) if names is not None else None
        new = store.add(image_id, regions, thumb, size, labels, source=key)
        added += new
        report(f"[{number}/{len(keys)}] {key}: {image_id} {'added' if new else 'already there'}")
    if added:
        store.register()  # counted among the collections (MAX_COLLECTIONS), as an add job does
    return {"added": added, "images": store.info().images, "skipped": skipped}


PROG = "python -m service.worker.collections"
NAME_HELP = "the collection: 1 to 63 lower-case letters, digits, - and _"


def build_parser() -> argparse.ArgumentParser:
    """The command line; docs/SCALE.md's command table lists every argument (tests/test_worker_collections.py)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="index images (files or folders) into a collection")
    add.add_argument("name", help=NAME_HELP)
    add.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR",
                     help="image files, and folders whose image files (by extension) are added")
    find = commands.add_parser("search", help="rank a collection's images for a caption")
    find.add_argument("name", help=NAME_HELP)
    find.add_argument("text", help="the caption to rank the images by")
    find.add_argument("--top-k", type=int, default=10, metavar="N", help="how many hits to give")
    find.add_argument("--task", choices=SEARCH_TASKS, default="retrieval_coco", help="the retrieval head to score with")
    find.add_argument("--first-stage", choices=("auto", "on", "off"), default="auto",
                      help="rank by region names first, re-rank the best with ViLBERT (auto: above "
                           "COLLECTION_FIRST_STAGE_ABOVE images)")
    find.add_argument("--no-ground", action="store_true", help="leave out each hit's grounded box")
    from_store = commands.add_parser(
        "add-features", help="index a feature store written by `python -m detector.extract` (no detector run)")
    from_store.add_argument("name", help=NAME_HELP)
    from_store.add_argument("store", help="the feature store directory (detector.extract --out)")
    from_store.add_argument("--images", metavar="DIR", help="the original images (file name up to the first dot = "
                            "the store's image id): thumbnails from them, and the image ids an add of those files "
                            "gives; without it the images have no thumbnail")
    info = commands.add_parser("info", help="image count and stored bytes of a collection")
    info.add_argument("name", help=NAME_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..queue import connect
    from ..settings import SettingsError, load_settings

    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"collections: {exc}", file=sys.stderr)
        return 2
    try:
        store = CollectionStore(connect(settings), args.name)
    except BadRequest as exc:
        print(f"collections: {exc.message}", file=sys.stderr)
        return 2
    if args.command == "info":
        print(json.dumps(store.info().__dict__))
        return 0
    if args.command == "add-features":
        return add_features(store, args.store, args.images, settings.max_image_pixels, settings.model_dir)
    pipeline = Pipeline.from_settings(settings)
    if args.command == "add":
        result = add_files(pipeline, store, image_files(args.paths), lambda line: print(line, file=sys.stderr,
                                                                                        flush=True))
        print(json.dumps(result))
        return 1 if result["skipped"] else 0
    above = {"auto": settings.collection_first_stage_above, "on": 0, "off": None}[args.first_stage]
    print(json.dumps(search(pipeline, store, args.text, args.top_k, args.task, ground=not args.no_ground,
                            first_stage_above=above, rerank_top=settings.collection_rerank_top), indent=2))
    return 0


def bundle_names(model_dir: str | Path) -> "CategoryNames | None":
    """The region names of the workers' bundle (its category file, checked against its detector's classes), read
    without loading a model; None when MODEL_DIR has no detector config or no usable category file."""
    from detector.config import load_config
    from detector.tiny import CONFIG_FILE

    from .pipeline import load_category_names

    config = Path(model_dir) / CONFIG_FILE
    return load_category_names(Path(model_dir), load_config(config).num_classes) if config.is_file() else None


def add_features(store: CollectionStore, store_path: str, images_dir: str | None, max_image_pixels: int,
                 model_dir: str | Path) -> int:
    """The add-features command: progress on stderr, {"added", "images", "skipped"} on stdout; exit status 1 when
    an image was skipped (as detector.extract's), 2 when the store or the folder is not there. Region names come
    from the bundle in `model_dir` (MODEL_DIR), if it has them: no model is loaded."""
    from detector.categories import CATEGORIES_FILE
    from detector.store import FeatureStore

    if images_dir is not None and not Path(images_dir).is_dir():
        print(f"collections: no such folder: {images_dir}", file=sys.stderr)
        return 2
    try:
        features = FeatureStore(store_path)
    except FileNotFoundError as exc:
        print(f"collections: {exc}", file=sys.stderr)
        return 2
    names = bundle_names(model_dir)
    print(f"collections: region names from {Path(model_dir) / CATEGORIES_FILE}" if names is not None
          else f"collections: no region names (MODEL_DIR {model_dir} has no usable category file): the images are "
               "left out of the lexical first stage's index", file=sys.stderr, flush=True)
    with features:
        images = store_image_files(images_dir) if images_dir is not None else None
        result = index_feature_store(store, features, images, max_image_pixels,
                                     lambda line: print(line, file=sys.stderr, flush=True), names)
    print(json.dumps(result))
    return 1 if result["skipped"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
