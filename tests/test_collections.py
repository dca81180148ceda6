"""Collections (issue 14, first pieces): storage in a real Redis, indexing with the real (tiny) models, search by
caption with each hit's score equal to the retrieval_coco score of a normal job on that image, the bulk path
(`python -m service.worker.collections`) as a real process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from redis import Redis

from detector.regions import RegionFeatures
from detector.categories import name_terms
from service.collections import CollectionStore, check_name, image_id_of
from service.contract import COLLECTION_PREFIX
from test_lexical import bm25
from service.errors import BadRequest, NotFound
from service.worker.collections import THUMBNAIL_SIDE, index_images, search
from service.worker.pipeline import InferenceRequest, Pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return tiny_bundle


@pytest.fixture(scope="module")
def pipeline(bundle) -> Pipeline:
    return Pipeline.from_dir(bundle, device="cpu", min_size=96, max_size=160)


def photo(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize(size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def store_for(redis_url: str) -> CollectionStore:
    return CollectionStore(Redis.from_url(redis_url), f"test-{uuid.uuid4().hex[:8]}")


def regions(count: int = 2) -> RegionFeatures:
    return RegionFeatures(boxes=np.array([[0, 0, 4, 4]] * count, np.float32), features=np.ones((count, 8), np.float32),
                          scores=np.ones(count, np.float32), class_ids=np.zeros(count, np.int64), num_boxes=count,
                          image_width=10, image_height=10)


def test_names_are_checked_and_ids_come_from_the_bytes():
    for good in ("a", "holiday-2026", "x_1", "0" * 63):
        assert check_name(good) == good
    for bad in ("", "Holiday", "-a", "a/b", "../etc", "a b", "a" * 64, "é", "a\n"):
        with pytest.raises(BadRequest) as caught:
            check_name(bad)
        assert caught.value.code == "invalid_collection"
    assert image_id_of(b"abc") == image_id_of(b"abc") != image_id_of(b"abd")
    assert len(image_id_of(b"abc")) == 32


def test_the_store_adds_once_reads_back_removes_and_drops(redis_url):
    store = store_for(redis_url)
    assert store.add("a" * 32, regions(2), b"jpeg-a", 1000)
    assert not store.add("a" * 32, regions(3), b"other", 5)  # the same id again: nothing changes
    assert store.add("b" * 32, regions(3), b"jpeg-b", 2000)
    assert store.ids() == ["a" * 32, "b" * 32]
    back = store.regions(["b" * 32, "a" * 32])
    assert [r.num_boxes for r in back] == [3, 2] and back[0].features.dtype == np.float32
    info = store.info()
    assert (info.images, info.name) == (2, store.name) and info.bytes > 0
    assert store.thumbnail("a" * 32) == b"jpeg-a"
    with pytest.raises(NotFound):
        store.thumbnail("../../etc/passwd")
    assert store.remove("a" * 32) and not store.remove("a" * 32)
    with pytest.raises(NotFound) as caught:
        store.regions(["a" * 32])
    assert caught.value.code == "unknown_image"
    assert store.drop() == 1 and store.info().images == 0


def test_index_and_search_rank_by_the_retrieval_score_of_a_normal_job(redis_url, pipeline):
    store = store_for(redis_url)
    photos = [photo(seed) for seed in range(5)]
    added = index_images(pipeline, store, photos + [photos[0]])
    assert [new for _, new in added] == [True] * 5 + [False]  # re-adding the same bytes is a no-op
    assert [image_id for image_id, _ in added][:5] == [image_id_of(p) for p in photos]
    thumb = Image.open(io.BytesIO(store.thumbnail(image_id_of(photos[0]))))
    assert thumb.format == "JPEG" and max(thumb.size) == THUMBNAIL_SIDE and thumb.size == (256, 192)

    text = "a dog catching a frisbee"
    result = search(pipeline, store, text, top_k=3, batch_size=2)
    assert result["scored"] == 5 and [hit["rank"] for hit in result["hits"]] == [1, 2, 3]
    jobs = {image_id_of(p): pipeline.run(InferenceRequest([p], text, ["retrieval_coco"]))["tasks"]["retrieval_coco"]
            ["scores"][0] for p in photos}
    expected = sorted(jobs.items(), key=lambda item: -item[1])[:3]
    assert [hit["image_id"] for hit in result["hits"]] == [image_id for image_id, _ in expected]
    for hit in result["hits"]:
        assert abs(hit["score"] - jobs[hit["image_id"]]) <= 2e-6  # equal results: the job's own score
    assert set(result["timings"]) == {"first_stage_s", "read_s", "score_s", "ground_s", "total_s"}
    assert result["grounded"] and result["first_stage"] == {"used": False} and result["images"] == 5
    # the grounded box: the top refcoco region of a normal job on that image with the same text
    by_id = {image_id_of(p): p for p in photos}
    for hit in result["hits"]:
        refcoco = pipeline.run(InferenceRequest([by_id[hit["image_id"]]], text, ["refcoco"], top_k=1))
        best = refcoco["tasks"]["refcoco"]["regions"][0]
        assert hit["box"] == best["box"] and abs(hit["box_score"] - best["score"]) <= 1e-5
        assert hit["label"] == best["label"]  # the detector's name for that region
        assert (hit["width"], hit["height"]) == (320, 240)
    plain = search(pipeline, store, text, top_k=3, ground=False, batch_size=2)  # the same forwards, so equal
    assert not plain["grounded"] and all(h["box"] is None and h["box_score"] is None and h["label"] is None
                                         for h in plain["hits"])
    assert [h["score"] for h in plain["hits"]] == [h["score"] for h in result["hits"]]

    store.remove(result["hits"][0]["image_id"])
    again = search(pipeline, store, text, top_k=10)
    assert again["scored"] == 4 and result["hits"][0]["image_id"] not in {h["image_id"] for h in again["hits"]}
    with pytest.raises(BadRequest) as refused:
        search(pipeline, store, text, task="vqa")
    assert (refused.value.code, refused.value.message) == (
        "unknown_task", "task must be one of retrieval_coco, retrieval_flickr30k, got 'vqa'")
    assert search(pipeline, store_for(redis_url), text)["hits"] == []  # an empty collection


def test_the_lexical_index_ranks_by_bm25_and_follows_removals_and_drops(redis_url):
    store = store_for(redis_url)
    labels = {"a" * 32: ["dog", "frisbee", "grass", "grass"], "b" * 32: ["dog", "dog", "man", "tennis racket"],
              "c" * 32: ["man", "shirt", None], "d" * 32: ["sky", "tree", "tree", "tree", "building", "window"],
              "e" * 32: None}  # None: indexed without a category file
    for image_id, names in labels.items():
        store.add(image_id, regions(len(names or [1])), b"t", 1, names)
    docs = {i: [t for n in (names or []) if n for t in name_terms(n)] for i, names in labels.items()}
    query = "Two dogs catching a frisbee near a man with a tennis racket"
    ranking = store.lexical_ranking(query)
    expected = bm25(name_terms(query), docs)
    assert [i for i, _ in ranking] == sorted(expected, key=lambda i: (-expected[i], i))
    assert [i for i, _ in ranking][:2] == ["b" * 32, "a" * 32]
    for image_id, score in ranking:
        assert abs(score - expected[image_id]) < 1e-9
    assert store.lexical_ranking("a cloud") == [] and store.lexical_ranking("!!") == []

    store.remove("b" * 32)  # its postings go with it
    after = store.lexical_ranking(query)
    del docs["b" * 32]
    expected = bm25(name_terms(query), docs)
    assert [i for i, _ in after] == sorted(expected, key=lambda i: (-expected[i], i)) and "b" * 32 not in dict(after)
    store.drop()
    assert not list(store.connection.scan_iter(COLLECTION_PREFIX + store.name + ":*"))  # nothing left behind


def test_above_the_threshold_only_the_lexical_best_are_scored_with_the_same_scores(redis_url, pipeline):
    store = store_for(redis_url)
    photos = [photo(seed) for seed in range(20, 26)]
    index_images(pipeline, store, photos)
    text = "a man and a dog on the grass"
    exact = search(pipeline, store, text, top_k=6, ground=False)
    exact_scores = {h["image_id"]: h["score"] for h in exact["hits"]}
    lexical = [i for i, _ in store.lexical_ranking(text)]
    assert lexical, "the tiny bundle's synthetic names should match some words of the text"
    staged = search(pipeline, store, text, top_k=6, ground=False, first_stage_above=5, rerank_top=3)
    assert staged["first_stage"] == {"used": True, "matched": len(lexical), "reranked": 3}
    assert staged["images"] == 6 and staged["scored"] == 3 and len(staged["hits"]) == 3
    fill = [i for i in store.ids() if i not in lexical]
    chosen = (lexical + fill)[:3]  # the lexical best, other images in id order when fewer match
    assert {h["image_id"] for h in staged["hits"]} == set(chosen)
    for hit in staged["hits"]:
        assert abs(hit["score"] - exact_scores[hit["image_id"]]) <= 2e-6  # ViLBERT's score, unchanged
    assert search(pipeline, store, text, first_stage_above=6)["first_stage"] == {"used": False}  # not above it
    nothing = search(pipeline, store, "qwxz", top_k=6, first_stage_above=0, rerank_top=2)
    assert nothing["first_stage"] == {"used": True, "matched": 0, "reranked": 2} and len(nothing["hits"]) == 2


def test_the_bulk_path_indexes_a_folder_and_searches_it(redis_url, bundle, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        (folder / f"p{seed}.jpg").write_bytes(photo(seed + 10))
    (folder / "notes.txt").write_text("not an image")
    name = f"bulk-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, REDIS_URL=redis_url, MODEL_DIR=str(bundle), DETECTOR_MIN_SIZE="96",
               DETECTOR_MAX_SIZE="160", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "service.worker.collections"]
    added = subprocess.run(command + ["add", name, str(folder)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) == {"added": 3, "images": 3, "skipped": 0}
    assert "[3/3] p2.jpg:" in added.stderr  # progress on the way
    again = subprocess.run(command + ["add", name, str(folder / "p0.jpg")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert json.loads(again.stdout) == {"added": 0, "images": 3, "skipped": 0} and "already there" in again.stderr
    found = subprocess.run(command + ["search", name, "a red bus", "--top-k", "2"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr
    result = json.loads(found.stdout)
    assert result["scored"] == 3 and len(result["hits"]) == 2
    info = subprocess.run(command + ["info", name], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(info.stdout)["images"] == 3
    bad = subprocess.run(command + ["info", "Bad/Name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("collections: a collection name is") and "Traceback" not in \
        bad.stderr


def test_the_bulk_path_indexes_a_feature_store_with_the_folder_paths_scores(redis_url, bundle, pipeline, tmp_path):
    """A store written by `python -m detector.extract` (a real process, the tiny bundle's detector at the pipeline's
    sizes) indexed by `add-features`, with and without the original images: no detector run, and a search gives the
    scores that the folder path (the detector run by the worker's pipeline on the same files) gives."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = {f"img{seed}": photo(seed + 20) for seed in range(4)}
    for key, data in photos.items():
        (folder / f"{key}.jpg").write_bytes(data)
    features = tmp_path / "features.lmdb"
    extracted = subprocess.run(
        [sys.executable, "-m", "detector.extract", "--config", str(bundle / "detectron_config.yaml"), "--checkpoint",
         str(bundle / "detectron_model.pth"), "--out", str(features), "--min-size", "96", "--max-size", "160",
         str(folder)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300)
    assert extracted.returncode == 0, extracted.stderr
    (folder / "stray.jpg").write_bytes(photo(99))  # a file the store does not know: never indexed

    # No model is loaded: from the bundle only its region names are read (for the lexical index), and without a
    # bundle at all (MODEL_DIR names nothing) the store is still indexed.
    env = dict(os.environ, REDIS_URL=redis_url, MODEL_DIR=str(tmp_path / "no-model-here"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "service.worker.collections", "add-features"]
    with_images, without = f"feat-{uuid.uuid4().hex[:6]}", f"bare-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(command + [with_images, str(features), "--images", str(folder)], cwd=ROOT,
                          env=dict(env, MODEL_DIR=str(bundle)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"added": 4, "images": 4, "skipped": 0}
    assert f"[4/4] img3: {image_id_of(photos['img3'])} added" in done.stderr  # progress, with the file's own id
    assert "region names from" in done.stderr
    done = subprocess.run(command + [without, str(features)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and json.loads(done.stdout) == {"added": 4, "images": 4, "skipped": 0}, done.stderr
    assert "no region names" in done.stderr
    again = subprocess.run(command + [without, str(features)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert json.loads(again.stdout)["added"] == 0 and again.stderr.count("already there") == 4

    connection = Redis.from_url(redis_url)
    folder_path = CollectionStore(connection, f"dir-{uuid.uuid4().hex[:6]}")
    index_images(pipeline, folder_path, list(photos.values()))  # what `add NAME DIR` runs
    stores = {name: CollectionStore(connection, name) for name in (with_images, without)}
    assert all(store.registered() for store in stores.values())
    assert stores[with_images].ids() == folder_path.ids()  # the same ids as adding the files
    for image_id in folder_path.ids():  # the same thumbnails: made from the same files
        assert stores[with_images].thumbnail(image_id) == folder_path.thumbnail(image_id)
    bare_id = stores[without].ids()[0]
    with pytest.raises(NotFound) as caught:
        stores[without].thumbnail(bare_id)
    assert caught.value.code == "no_thumbnail" and caught.value.status == 404
    sources = {json.loads(m)["source"] for m in connection.hvals(stores[without].meta_key)}
    assert sources == set(photos)  # each image's store id is kept
    # the lexical first stage's index: the same region names as the folder path's, none without a category file
    assert connection.hgetall(stores[with_images].terms_key) == connection.hgetall(folder_path.terms_key)
    assert any(json.loads(t) for t in connection.hvals(folder_path.terms_key))
    assert all(json.loads(t) == {} for t in connection.hvals(stores[without].terms_key))

    text = "a dog catching a frisbee"
    expected = search(pipeline, folder_path, text, top_k=10, ground=False)["hits"]
    assert len(expected) == 4
    found = search(pipeline, stores[with_images], text, top_k=10, ground=False)["hits"]
    assert [h["image_id"] for h in found] == [h["image_id"] for h in expected]
    for hit, want in zip(found, expected):
        assert abs(hit["score"] - want["score"]) <= 2e-6, (hit, want)
    bare = search(pipeline, stores[without], text, top_k=10, ground=False)["hits"]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(bare, expected)) <= 2e-6

    # a folder that lacks a store's image, or holds another image under its name: skipped and reported, exit 1
    other = tmp_path / "other"
    other.mkdir()
    for key in ("img0", "img1", "img2"):
        (other / f"{key}.png").write_bytes(photos[key])
    Image.open(io.BytesIO(photos["img0"])).resize((100, 80)).save(other / "img0.png")
    partial = subprocess.run(command + [f"part-{uuid.uuid4().hex[:6]}", str(features), "--images", str(other)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert partial.returncode == 1 and json.loads(partial.stdout) == {"added": 2, "images": 2, "skipped": 2}
    assert "img3: skipped, no image file with this id" in partial.stderr
    assert "img0: skipped, img0.png is 100x80, the regions were extracted from a 320x240 image" in partial.stderr
    missing = subprocess.run(command + [without, str(tmp_path / "nothing")], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "no feature store at" in missing.stderr and "Traceback" not in missing.stderr
