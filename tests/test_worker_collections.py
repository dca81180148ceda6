"""The worker side of collections in-process (service/worker/collections.py): the bulk path's command line
(`python -m service.worker.collections`), indexing a feature store, the file listing, thumbnails and the grounding
of hits. tests/test_collections.py runs the same commands as real processes and checks search against normal jobs;
here every branch and message is checked where the mutation check (bench/mutation.py) can see it."""

from __future__ import annotations

import argparse
import io
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from redis import Redis

from detector.records import encode_record
from detector.images import ImageDecodeError
from detector.regions import RegionFeatures
from detector.store import FeatureStore
from service.collections import CollectionStore, image_id_of
from service.errors import BadRequest
from service.worker.collections import (PROG, THUMBNAIL_SIDE, add_features, add_files, build_parser, bundle_names, ground_regions, image_files,
                                        index_feature_store, index_images, main, search, store_image_files,
                                        thumbnail)
from service.worker.pipeline import Pipeline
from vilbert.predictor import PredictRequest
from test_collections import ROOT, photo


@pytest.fixture(scope="module")
def pipeline(tiny_bundle) -> Pipeline:
    return Pipeline.from_dir(tiny_bundle, device="cpu", min_size=96, max_size=160)


@pytest.fixture
def store(redis_url) -> CollectionStore:
    return CollectionStore(Redis.from_url(redis_url), f"t-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def environment(monkeypatch, redis_url, tiny_bundle):
    """What `python -m service.worker.collections` reads: the private Redis, the tiny bundle at small sizes."""
    for name, value in {"REDIS_URL": redis_url, "MODEL_DIR": str(tiny_bundle), "DETECTOR_MIN_SIZE": "96",
                        "DETECTOR_MAX_SIZE": "160"}.items():
        monkeypatch.setenv(name, value)


def region_features(count: int, width: int = 8, size: tuple[int, int] = (320, 240), seed: int = 0) -> RegionFeatures:
    rng = np.random.default_rng(seed)
    return RegionFeatures(boxes=np.array([[0, 0, 40, 30]] * count, np.float32).reshape(count, 4),
                          features=rng.random((count, width), dtype=np.float32), scores=np.ones(count, np.float32),
                          class_ids=np.arange(1, count + 1, dtype=np.int64), num_boxes=count,
                          image_width=size[0], image_height=size[1])


def feature_store(path: Path, entries: dict[str, RegionFeatures]) -> FeatureStore:
    with FeatureStore(path, readonly=False) as writer:
        for key, regions in entries.items():
            writer.put(key, regions)
    return FeatureStore(path)


def meta(store: CollectionStore, image_id: str) -> dict:
    return json.loads(store.connection.hget(store.meta_key, image_id))


# ------------------------------------------------------------------------------------------------ thumbnails


def rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("size,expected", [((600, 300), (256, 128)), ((300, 600), (128, 256)),
                                           ((100, 50), (100, 50)), ((256, 256), (256, 256))])
def test_a_thumbnail_fits_the_side_keeps_the_aspect_and_never_grows(size, expected):
    image = Image.open(io.BytesIO(thumbnail(rgb(*size))))
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == expected
    assert max(expected) <= THUMBNAIL_SIDE


def test_a_thumbnail_is_a_quality_85_jpeg():
    """Quality 85: a grid of hits loads fast and still looks like the photo (the quantisation tables say which)."""
    pixels = rgb(200, 100)
    reference = io.BytesIO()
    Image.fromarray(pixels).save(reference, "JPEG", quality=85)
    assert Image.open(io.BytesIO(thumbnail(pixels))).quantization == Image.open(reference).quantization


# ------------------------------------------------------------------------------------------------ file lists


def test_image_files_lists_the_images_of_a_folder_sorted_and_takes_named_files_as_given(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    images = ["a.png", "b.JPG", "c.webp", "d.TIFF", "e.mpo", "f.jpeg", "g.gif", "h.BMP", "i.tif", "j.ppm"]
    for name in images + ["notes.txt", "noext", "k.heic"]:
        (folder / name).write_bytes(b"x")
    (folder / "sub.jpg").mkdir()  # a folder named like an image: not a file
    (folder / "sub.jpg" / "inner.jpg").write_bytes(b"x")  # not recursed into
    named = tmp_path / "scan.dat"  # a file named on the command line is taken whatever its name
    named.write_bytes(b"x")
    assert image_files([str(named), str(folder)]) == [named] + [folder / name for name in images]


def test_image_files_names_a_path_that_is_not_there(tmp_path):
    with pytest.raises(SystemExit) as stopped:
        image_files([str(tmp_path / "missing")])
    assert str(stopped.value) == f"collections: no such file or folder: {tmp_path / 'missing'}"


def test_store_image_files_maps_the_extract_ids_to_files(tmp_path):
    (tmp_path / "img1.jpg").write_bytes(photo(1))
    (tmp_path / "img2.v2.png").write_bytes(b"x")  # the id is the name up to the first dot
    assert store_image_files(tmp_path) == {"img1": tmp_path / "img1.jpg", "img2": tmp_path / "img2.v2.png"}


# ------------------------------------------------------------------------------------------ feature stores


def test_a_store_indexed_without_images_gets_ids_from_its_regions(tmp_path, store):
    entries = {"b": region_features(2, seed=2), "a": region_features(3, seed=1)}
    lines: list[str] = []
    with feature_store(tmp_path / "f.lmdb", entries) as features:
        result = index_feature_store(store, features, None, 10 ** 8, lines.append)
        assert result == {"added": 2, "images": 2, "skipped": 0}
        ids = {key: image_id_of(encode_record("", regions)) for key, regions in entries.items()}
        assert lines == [f"[1/2] a: {ids['a']} added", f"[2/2] b: {ids['b']} added"]  # in the store's key order
        assert store.registered()
        assert sorted(store.ids()) == sorted(ids.values())
        assert meta(store, ids["a"]) == {"width": 320, "height": 240, "bytes": 0, "source": "a",
                                         "stored": len(encode_record(ids["a"], entries["a"]))}
        np.testing.assert_array_equal(store.regions([ids["b"]])[0].features, entries["b"].features)
        lines.clear()
        again = index_feature_store(store, features, None, 10 ** 8, lines.append)
        assert again == {"added": 0, "images": 2, "skipped": 0}
        assert lines == [f"[1/2] a: {ids['a']} already there", f"[2/2] b: {ids['b']} already there"]


def test_nothing_added_leaves_the_collection_unregistered(tmp_path, store):
    with feature_store(tmp_path / "f.lmdb", {"a": region_features(1, width=8)}) as features:
        store.add("f" * 32, region_features(1, width=16), None, 1)  # the collection's features are 16 wide
        result = index_feature_store(store, features, None, 10 ** 8)
    assert result == {"added": 0, "images": 1, "skipped": 1}
    assert not store.registered()


def test_a_store_indexed_with_its_images_gets_the_files_ids_thumbnails_and_sizes(tmp_path, store):
    folder = tmp_path / "photos"
    folder.mkdir()
    data = photo(5)
    (folder / "a.jpg").write_bytes(data)
    (folder / "small.jpg").write_bytes(photo(6, size=(160, 120)))  # another size than the regions were taken at
    (folder / "broken.jpg").write_bytes(b"not an image")
    entries = {"a": region_features(2), "small": region_features(2), "broken": region_features(2),
               "gone": region_features(2)}
    lines: list[str] = []
    with feature_store(tmp_path / "f.lmdb", entries) as features:
        result = index_feature_store(store, features, store_image_files(folder), 10 ** 8, lines.append)
    assert result == {"added": 1, "images": 1, "skipped": 3}
    image_id = image_id_of(data)
    assert store.ids() == [image_id]
    assert store.thumbnail(image_id) == thumbnail(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert meta(store, image_id)["bytes"] == len(data) and meta(store, image_id)["source"] == "a"
    assert lines[0] == f"[1/4] a: {image_id} added"
    assert lines[1] == ("[2/4] broken: skipped, broken.jpg: cannot decode the image: not an image in an accepted "
                        "format (JPEG, PNG, GIF, BMP, TIFF, WEBP, PPM, MPO)")
    assert lines[2] == "[3/4] gone: skipped, no image file with this id in the --images folder"
    assert lines[3] == ("[4/4] small: skipped, small.jpg is 160x120, the regions were extracted from a 320x240 image")


def test_an_image_file_that_vanished_is_skipped_with_the_systems_reason(tmp_path, store):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo(5))
    files = store_image_files(folder)
    (folder / "a.jpg").unlink()  # between listing the folder and reading the file
    lines: list[str] = []
    with feature_store(tmp_path / "f.lmdb", {"a": region_features(2)}) as features:
        result = index_feature_store(store, features, files, 10 ** 8, lines.append)
    assert result == {"added": 0, "images": 0, "skipped": 1}
    assert lines == ["[1/1] a: skipped, a.jpg: cannot read it (No such file or directory)"]


def test_an_image_over_the_pixel_limit_is_skipped_with_the_limits_message(tmp_path, store):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo(5))
    lines: list[str] = []
    with feature_store(tmp_path / "f.lmdb", {"a": region_features(2)}) as features:
        result = index_feature_store(store, features, store_image_files(folder), 1000, lines.append)
    assert result == {"added": 0, "images": 0, "skipped": 1}
    assert lines == ["[1/1] a: skipped, a.jpg: image has 320x240 pixels, more than the limit of 1000"]


def test_feature_widths_must_match_the_collection(tmp_path, store):
    entries = {"a": region_features(2, width=8), "b": region_features(2, width=16), "c": region_features(1, width=8)}
    lines: list[str] = []
    with feature_store(tmp_path / "f.lmdb", entries) as features:
        result = index_feature_store(store, features, None, 10 ** 8, lines.append)
    assert result == {"added": 2, "images": 2, "skipped": 1}  # the first image sets the width
    assert lines[1] == "[2/3] b: skipped, features of width 16, the collection's are 8"


def test_region_names_go_into_the_lexical_index_when_given(tmp_path, store, tiny_bundle):
    names = bundle_names(tiny_bundle)
    assert names is not None
    entry = region_features(2)
    with feature_store(tmp_path / "f.lmdb", {"a": entry}) as features:
        index_feature_store(store, features, None, 10 ** 8, names=names)
    image_id = store.ids()[0]
    words = [label for label in names.labels(entry.class_ids) if label]
    assert [i for i, _ in store.lexical_ranking(words[0])] == [image_id]
    plain = CollectionStore(store.connection, f"p-{uuid.uuid4().hex[:8]}")
    with feature_store(tmp_path / "g.lmdb", {"a": entry}) as features:
        index_feature_store(plain, features, None, 10 ** 8)
    assert plain.lexical_ranking(words[0]) == []


def test_bundle_names_needs_a_detector_config(tmp_path, tiny_bundle):
    assert bundle_names(tmp_path) is None
    names = bundle_names(tiny_bundle)
    assert names is not None and len(names.labels(np.array([1, 2]))) == 2


# ------------------------------------------------------------------------------------------- add-features


def test_add_features_refuses_a_missing_folder_or_store(tmp_path, store, capsys, tiny_bundle):
    assert add_features(store, str(tmp_path / "f.lmdb"), str(tmp_path / "nope"), 10 ** 8, tiny_bundle) == 2
    assert capsys.readouterr().err == f"collections: no such folder: {tmp_path / 'nope'}\n"
    assert add_features(store, str(tmp_path / "f.lmdb"), None, 10 ** 8, tiny_bundle) == 2
    assert capsys.readouterr().err == f"collections: no feature store at {tmp_path / 'f.lmdb'}\n"


def test_add_features_reports_progress_and_exits_1_when_an_image_was_skipped(tmp_path, store, capsys, tiny_bundle):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo(5))
    feature_store(tmp_path / "f.lmdb", {"a": region_features(2), "b": region_features(2)}).close()
    assert add_features(store, str(tmp_path / "f.lmdb"), str(folder), 10 ** 8, tiny_bundle) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"added": 1, "images": 1, "skipped": 1}
    assert err.splitlines()[0] == f"collections: region names from {tiny_bundle / 'visual_genome_categories.json'}"
    assert err.splitlines()[1:] == [f"[1/2] a: {image_id_of(photo(5))} added",
                                    "[2/2] b: skipped, no image file with this id in the --images folder"]
    assert add_features(store, str(tmp_path / "f.lmdb"), str(folder), 10 ** 8, tmp_path / "no-model") == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (f"collections: no region names (MODEL_DIR {tmp_path / 'no-model'} has no usable "
                                   "category file): the images are left out of the lexical first stage's index")


def test_add_features_exits_0_when_everything_was_indexed(tmp_path, store, capsys, tiny_bundle):
    feature_store(tmp_path / "f.lmdb", {"a": region_features(2)}).close()
    assert add_features(store, str(tmp_path / "f.lmdb"), None, 10 ** 8, tiny_bundle) == 0
    assert json.loads(capsys.readouterr().out) == {"added": 1, "images": 1, "skipped": 0}


# ------------------------------------------------------------------------------------------- the command line


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_main_adds_files_and_folders_then_reports_info(environment, tmp_path, capsys, redis_url):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "p0.jpg").write_bytes(photo(30))
    (folder / "p1.jpg").write_bytes(photo(31))
    name = f"cli-{uuid.uuid4().hex[:6]}"
    code, out, err = run_main(capsys, "add", name, str(folder / "p1.jpg"), str(folder))
    assert code == 0 and json.loads(out) == {"added": 2, "images": 2, "skipped": 0}
    ids = [image_id_of(photo(31)), image_id_of(photo(30)), image_id_of(photo(31))]
    assert err.splitlines() == [f"[1/3] p1.jpg: {ids[0]} added", f"[2/3] p0.jpg: {ids[1]} added",
                                f"[3/3] p1.jpg: {ids[2]} already there"]
    store = CollectionStore(Redis.from_url(redis_url), name)
    assert store.registered()
    code, out, _ = run_main(capsys, "info", name)
    assert code == 0 and json.loads(out) == store.info().__dict__ and json.loads(out)["images"] == 2
    code, out, err = run_main(capsys, "add", name, str(folder / "p0.jpg"))
    assert code == 0 and json.loads(out) == {"added": 0, "images": 2, "skipped": 0}
    assert err.endswith("already there\n")


def test_main_leaves_a_collection_unregistered_when_nothing_was_added(environment, tmp_path, capsys, redis_url):
    """An add of images already there (here: none at all in an empty folder) does not count a new collection."""
    (tmp_path / "empty").mkdir()
    name = f"cli-{uuid.uuid4().hex[:6]}"
    code, out, _ = run_main(capsys, "add", name, str(tmp_path / "empty"))
    assert code == 0 and json.loads(out) == {"added": 0, "images": 0, "skipped": 0}
    assert not CollectionStore(Redis.from_url(redis_url), name).registered()


def test_a_damaged_or_vanished_file_is_skipped_and_the_rest_indexed(environment, tmp_path, capsys, redis_url):
    """One bad photo in a folder of thousands must not stop the import: it is reported, the exit status says so
    (1, as add-features), and rerunning adds nothing twice."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo(60))
    (folder / "b.jpg").write_bytes(photo(61)[:200])  # cut short, as a failed copy leaves it
    (folder / "c.png").write_bytes(b"")
    (folder / "d.jpg").write_bytes(photo(62))
    name = f"cli-{uuid.uuid4().hex[:6]}"
    code, out, err = run_main(capsys, "add", name, str(folder), str(folder))  # the second time: nothing new
    assert code == 1 and json.loads(out) == {"added": 2, "images": 2, "skipped": 4}
    lines = err.splitlines()
    assert lines[0] == f"[1/8] a.jpg: {image_id_of(photo(60))} added"
    assert lines[1].startswith("[2/8] b.jpg: skipped, cannot decode the image")
    assert lines[2] == "[3/8] c.png: skipped, the image is empty (0 bytes)"
    assert lines[3] == f"[4/8] d.jpg: {image_id_of(photo(62))} added"
    assert lines[4] == f"[5/8] a.jpg: {image_id_of(photo(60))} already there"


def test_a_file_that_cannot_be_read_is_skipped_with_the_systems_reason(pipeline, store, tmp_path):
    (tmp_path / "a.jpg").write_bytes(photo(63))
    lines: list[str] = []
    result = add_files(pipeline, store, [tmp_path / "gone.jpg", tmp_path / "a.jpg"], lines.append)
    assert result == {"added": 1, "images": 1, "skipped": 1}
    assert lines == ["[1/2] gone.jpg: skipped, cannot read it (No such file or directory)",
                     f"[2/2] a.jpg: {image_id_of(photo(63))} added"]
    assert store.registered()
    nothing = CollectionStore(store.connection, f"n-{uuid.uuid4().hex[:8]}")
    assert add_files(pipeline, nothing, [tmp_path / "gone.jpg"]) == {"added": 0, "images": 0, "skipped": 1}
    assert not nothing.registered()


def test_main_refuses_a_bad_collection_name(environment, capsys):
    code, out, err = run_main(capsys, "info", "Bad/Name")
    assert (code, out) == (2, "") and err.startswith("collections: a collection name is")


def test_main_searches_with_each_option(environment, capsys, redis_url, pipeline, monkeypatch):
    name = f"cli-{uuid.uuid4().hex[:6]}"
    store = CollectionStore(Redis.from_url(redis_url), name)
    index_images(pipeline, store, [photo(seed) for seed in range(40, 43)])
    text = "a dog on the grass"
    code, out, _ = run_main(capsys, "search", name, text, "--top-k", "2")
    result = json.loads(out)
    expected = search(pipeline, store, text, top_k=2)
    assert code == 0 and [h["image_id"] for h in result["hits"]] == [h["image_id"] for h in expected["hits"]]
    assert result["task"] == "retrieval_coco" and result["grounded"] and result["first_stage"] == {"used": False}
    assert out.startswith("{\n  \"hits\"")  # indented for a reader at a terminal
    code, out, _ = run_main(capsys, "search", name, text, "--task", "retrieval_flickr30k", "--no-ground")
    result = json.loads(out)
    assert result["task"] == "retrieval_flickr30k" and not result["grounded"] and len(result["hits"]) == 3
    assert all(hit["box"] is None for hit in result["hits"])
    code, out, _ = run_main(capsys, "search", name, text, "--first-stage", "on")
    assert json.loads(out)["first_stage"]["used"] is True
    assert json.loads(out)["first_stage"]["reranked"] == 3  # every image, at the default COLLECTION_RERANK_TOP
    monkeypatch.setenv("COLLECTION_RERANK_TOP", "2")
    code, out, _ = run_main(capsys, "search", name, text, "--first-stage", "on")
    assert json.loads(out)["first_stage"]["reranked"] == 2
    monkeypatch.setenv("COLLECTION_FIRST_STAGE_ABOVE", "2")  # auto: used above that many images
    code, out, _ = run_main(capsys, "search", name, text)
    assert json.loads(out)["first_stage"]["used"] is True
    code, out, _ = run_main(capsys, "search", name, text, "--first-stage", "off")
    assert json.loads(out)["first_stage"] == {"used": False}


def test_main_indexes_a_feature_store(environment, tmp_path, capsys, redis_url):
    feature_store(tmp_path / "f.lmdb", {"a": region_features(2)}).close()
    name = f"cli-{uuid.uuid4().hex[:6]}"
    code, out, err = run_main(capsys, "add-features", name, str(tmp_path / "f.lmdb"))
    assert code == 0 and json.loads(out) == {"added": 1, "images": 1, "skipped": 0}
    assert "[1/1] a: " in err
    code, out, err = run_main(capsys, "add-features", name, str(tmp_path / "f.lmdb"), "--images",
                              str(tmp_path / "nope"))
    assert code == 2 and err == f"collections: no such folder: {tmp_path / 'nope'}\n"


def argument(action: argparse.Action) -> str:
    """An argument as the docs table shows it: a positional's name; an option with its value's name or choices."""
    if not action.option_strings:
        return action.metavar or action.dest
    shown = action.option_strings[0]
    if action.nargs == 0:
        return shown
    if action.choices:
        return f"{shown} {{{','.join(action.choices)}}}"
    return f"{shown} {action.metavar or action.dest.upper()}"


def parser_rows() -> list[str]:
    """docs/SCALE.md's command table, built from the parser itself."""
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    rows = []
    for name, command in commands.choices.items():
        rows.append(f"| `{name}` | | | {helps[name]} |")
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                default = "" if action.default in (None, False) else f"`{action.default}`"
                rows.append(f"| | `{argument(action)}` | {default} | {action.help} |".replace("|  |", "| |"))
    return rows


def test_the_docs_list_every_command_and_argument_as_the_parser_has_them():
    lines = (ROOT / "docs" / "SCALE.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| command | argument | default | what it is |") + 2
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    assert lines[start:end] == parser_rows()


def test_help_names_the_program_and_what_it_does(capsys):
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert stopped.value.code == 0
    assert out.startswith(f"usage: {PROG} ") and PROG == "python -m service.worker.collections"
    assert " ".join(out.split()).count("Indexing images into a collection and searching it by caption") == 1
    assert "Searching scores every image" not in out  # the first paragraph of the module's docstring only


@pytest.mark.parametrize("argv,complaint", [
    (["search", "x", "a dog", "--task", "vqa"], "invalid choice: 'vqa'"),
    (["search", "x", "a dog", "--first-stage", "sometimes"], "invalid choice: 'sometimes'"),
    (["search", "x", "a dog", "--top-k", "many"], "invalid int value: 'many'"),
    (["add", "x"], "the following arguments are required: IMAGE_OR_DIR"),
])
def test_bad_arguments_are_refused_before_anything_runs(capsys, argv, complaint):
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(argv)
    assert stopped.value.code == 2 and complaint in capsys.readouterr().err


def test_each_first_stage_choice_is_accepted():
    for choice in ("auto", "on", "off"):
        assert build_parser().parse_args(["search", "x", "t", "--first-stage", choice]).first_stage == choice
    parsed = build_parser().parse_args(["search", "x", "t"])
    assert (parsed.top_k, parsed.task, parsed.first_stage, parsed.no_ground) == (10, "retrieval_coco", "auto", False)


def test_main_names_a_bad_setting_without_a_traceback(environment, capsys, monkeypatch):
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "10")
    code, out, err = run_main(capsys, "info", "x")
    assert (code, out) == (2, "")
    assert err == "collections: invalid settings:\n  MAX_IMAGE_PIXELS='10': must be >= 1024\n"


def test_main_needs_a_command(environment, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 2 and "required: command" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- search


def test_search_rounds_scores_and_times_each_stage(pipeline, store):
    index_images(pipeline, store, [photo(50), photo(51)])
    result = search(pipeline, store, "a cat", top_k=5, ground=False)
    assert [hit["rank"] for hit in result["hits"]] == [1, 2]
    for hit in result["hits"]:
        assert hit["score"] == round(hit["score"], 6)
        assert (hit["width"], hit["height"]) == (320, 240)
    timings = result["timings"]
    assert all(value >= 0 and value == round(value, 4) for value in timings.values())
    parts = timings["first_stage_s"] + timings["read_s"] + timings["score_s"] + timings["ground_s"]
    assert abs(parts - timings["total_s"]) <= 5e-4  # the parts add up to the total (each rounded to 0.1 ms)


def test_grounding_gives_each_images_best_region_with_its_detected_label(pipeline):
    """The grounding answer counts the whole-image row as region 0: region k is detected box k - 1, whose class
    names the hit's label. An image without regions has no box."""
    assert ground_regions(pipeline, "a dog", []) == []
    empty = region_features(0, width=pipeline.predictor.feature_dim)
    some = region_features(3, width=pipeline.predictor.feature_dim, seed=7)
    some.boxes[:] = [[0, 0, 10, 10], [50, 50, 200, 200], [100, 0, 300, 100]]
    grounded = ground_regions(pipeline, "a dog", [empty, some])
    assert grounded[0] == (None, None, None)
    (alone,) = pipeline.predictor.predict_many([PredictRequest(images=[some], text="a dog", tasks=["refcoco"],
                                                               top_k=1)])
    best = alone["refcoco"]["regions"][0]
    assert 1 <= best["region"] <= 3
    assert grounded[1] == (best["box"], best["score"], pipeline.region_label(some.class_ids[best["region"] - 1]))
    assert grounded[1][2] is not None


# ------------------------------------------------------------------------------- search over many stored images


def stored(store: CollectionStore, pipeline: Pipeline, count: int, patterns: int = 2) -> list[str]:
    """`count` images stored without the detector, their regions `patterns` kinds in turn (so scores tie within a
    kind); returns the ids, sorted."""
    kinds = [region_features(3, width=pipeline.predictor.feature_dim, seed=kind) for kind in range(patterns)]
    ids = [f"{number:032x}" for number in range(count)]
    for number, image_id in enumerate(ids):
        store.add(image_id, kinds[number % patterns], None, 0)
    return ids


def test_search_reads_and_scores_64_images_at_a_time_and_ranks_ties_by_id(pipeline, store, monkeypatch):
    """The default chunk keeps a large collection out of memory; equal scores keep the id order (a stable ranking
    from one search to the next)."""
    ids = stored(store, pipeline, 300)
    reads: list[int] = []
    real = store.regions

    def slow_regions(image_ids):  # a store 20 ms a read away, to see the read time add up over the chunks
        reads.append(len(image_ids))
        time.sleep(0.02)
        return real(image_ids)

    monkeypatch.setattr(store, "regions", slow_regions)
    started = time.perf_counter()
    result = search(pipeline, store, "a dog", top_k=300, ground=False)
    elapsed = time.perf_counter() - started
    assert reads == [64, 64, 64, 64, 44, 300]  # the chunks, then the hits' regions
    hits = result["hits"]
    assert [hit["image_id"] for hit in hits] == sorted(ids, key=lambda i: (-hits_score(hits, i), i))
    assert len({hit["score"] for hit in hits}) == 2
    timings = result["timings"]
    assert timings["read_s"] >= 5 * 0.02  # every chunk's read counted, not only the last
    assert all(isinstance(value, float) and value == round(value, 4) for value in timings.values())
    assert timings["total_s"] <= elapsed + 1e-4


def hits_score(hits: list[dict], image_id: str) -> float:
    return next(hit["score"] for hit in hits if hit["image_id"] == image_id)


def test_the_first_stage_reranks_200_images_by_default(pipeline, store):
    stored(store, pipeline, 201, patterns=1)
    result = search(pipeline, store, "a dog", top_k=1, ground=False, first_stage_above=0)
    assert result["first_stage"] == {"used": True, "matched": 0, "reranked": 200}
    assert (result["images"], result["scored"]) == (201, 200)


def test_search_scores_with_the_task_asked_for(pipeline, store):
    ids = stored(store, pipeline, 4, patterns=4)
    regions = store.regions(ids)
    for task in ("retrieval_coco", "retrieval_flickr30k"):
        expected = pipeline.predictor.score_images("a dog", regions, task)
        hits = search(pipeline, store, "a dog", top_k=4, task=task, ground=False)["hits"]
        assert {hit["image_id"]: hit["score"] for hit in hits} == {
            image_id: round(float(score), 6) for image_id, score in zip(ids, expected)}
    coco = pipeline.predictor.score_images("a dog", regions, "retrieval_coco")
    assert not np.allclose(coco, pipeline.predictor.score_images("a dog", regions, "retrieval_flickr30k"))


def test_an_unknown_task_is_quoted_briefly(pipeline, store):
    with pytest.raises(BadRequest) as refused:
        search(pipeline, store, "a dog", task="t" * 50)
    assert refused.value.message == ("task must be one of retrieval_coco, retrieval_flickr30k, got "
                                     f"{'t' * 40!r}")


# ------------------------------------------------------------------------------------------- indexing details


def test_an_image_already_there_does_not_stop_the_ones_after_it(pipeline, store):
    first, second = photo(70), photo(71)
    index_images(pipeline, store, [first])
    assert index_images(pipeline, store, [first, second]) == [(image_id_of(first), False), (image_id_of(second), True)]


def test_indexing_uses_the_pipelines_pixel_limit(pipeline, store, monkeypatch):
    monkeypatch.setattr(pipeline, "max_image_pixels", 1000)
    with pytest.raises(ImageDecodeError) as refused:
        index_images(pipeline, store, [photo(72)])
    assert refused.value.message == "image has 320x240 pixels, more than the limit of 1000"


def test_without_region_names_an_image_is_indexed_but_not_named(pipeline, store, monkeypatch):
    monkeypatch.setattr(pipeline, "names", None)
    ((image_id, new),) = index_images(pipeline, store, [photo(73)])
    assert new and store.ids() == [image_id]
    assert json.loads(store.connection.hget(store.terms_key, image_id)) == {}


def test_add_features_indexes_region_names_from_the_bundle(tmp_path, store, capsys, tiny_bundle):
    entry = region_features(2)
    feature_store(tmp_path / "f.lmdb", {"a": entry}).close()
    assert add_features(store, str(tmp_path / "f.lmdb"), None, 10 ** 8, tiny_bundle) == 0
    capsys.readouterr()
    word = next(label for label in bundle_names(tiny_bundle).labels(entry.class_ids) if label)
    assert [image_id for image_id, _ in store.lexical_ranking(word)] == store.ids()


def test_main_add_features_checks_images_against_max_image_pixels(environment, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo(5))
    feature_store(tmp_path / "f.lmdb", {"a": region_features(2)}).close()
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "1024")
    code, out, err = run_main(capsys, "add-features", f"cli-{uuid.uuid4().hex[:6]}", str(tmp_path / "f.lmdb"),
                              "--images", str(folder))
    assert code == 1 and json.loads(out) == {"added": 0, "images": 0, "skipped": 1}
    assert err.splitlines()[-1] == "[1/1] a: skipped, a.jpg: image has 320x240 pixels, more than the limit of 1024"


def test_main_first_stage_on_applies_to_any_collection(environment, capsys, redis_url, pipeline):
    """on: the lexical first stage even for one image (above 0 images)."""
    name = f"cli-{uuid.uuid4().hex[:6]}"
    stored(CollectionStore(Redis.from_url(redis_url), name), pipeline, 1)
    code, out, _ = run_main(capsys, "search", name, "a dog", "--first-stage", "on")
    assert code == 0 and json.loads(out)["first_stage"] == {"used": True, "matched": 0, "reranked": 1}


def grounding_best(pipeline: Pipeline, text: str, regions: RegionFeatures) -> int:
    (outcome,) = pipeline.predictor.predict_many([PredictRequest(images=[regions], text=text, tasks=["refcoco"],
                                                                 top_k=1)])
    return outcome["refcoco"]["regions"][0]["region"]


def test_a_hit_grounded_on_the_whole_image_has_no_label_and_one_on_the_first_box_has_its_label(pipeline):
    """Region 0 is the whole-image row, which no detected box names; region 1 is the first box. Images of one
    region are tried until the tiny model picks each (its weights are fixed: the same images every run)."""
    dim = pipeline.predictor.feature_dim
    images = [region_features(1, width=dim, seed=seed) for seed in range(40)]
    for seed, regions in enumerate(images):  # boxes anywhere in the image: the row's place sways the choice
        x, y = np.random.default_rng(seed).uniform(0, 1, 2) * [240, 180]
        regions.boxes[0] = [x, y, x + 80, y + 60]
    best = [grounding_best(pipeline, "the dog", regions) for regions in images]
    whole, first = images[best.index(0)], images[best.index(1)]
    assert ground_regions(pipeline, "the dog", [whole])[0][2] is None
    assert ground_regions(pipeline, "the dog", [first])[0][2] == pipeline.region_label(first.class_ids[0])
    assert pipeline.region_label(first.class_ids[0]) is not None


def test_search_gives_ten_hits_by_default(pipeline, store):
    stored(store, pipeline, 11)
    assert len(search(pipeline, store, "a dog", ground=False)["hits"]) == 10
