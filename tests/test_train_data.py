"""Training data: every official annotation format parses, feature LMDBs (released pickled records and our
FeatureStore) read back, and missing files are named exactly (the restricted unpickler: tests/test_pickles.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from detector.regions import RegionFeatures
from detector.store import FeatureStore
from vilbert.tokenization import Tokenizer
from vilbert_train import synthetic
from vilbert_train.annotations import MissingDataError, guesswhat_dialog
from vilbert_train.datasets import TaskDataset, iou
from vilbert_train.features import ReleasedFeatureReader, StoreFeatureReader, open_features
from vilbert_train.specs import SPECS, resolve_tasks

DIM = 16


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    synthetic.write_snli_ve(root, DIM)
    synthetic.write_vqa(root, DIM)
    synthetic.write_gqa(root, DIM)
    synthetic.write_genome(root, DIM)
    synthetic.write_nlvr2(root, DIM)
    synthetic.write_retrieval(root, DIM, 7)
    synthetic.write_retrieval(root, DIM, 8)
    for dataset in ("refcoco", "refcoco+", "refcocog"):
        synthetic.write_refcoco(root, DIM, dataset)
    synthetic.write_visual7w(root, DIM)
    synthetic.write_guesswhat(root, DIM)
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def dataset(root, tokenizer, task_id, split, **kw):
    return TaskDataset(SPECS[task_id], split, root, tokenizer, **kw)


# -------------------------------------------------------------------------------------------- feature readers


def test_released_lmdb_reader_matches_written_record(root):
    reader = open_features(root / SPECS[13].features)
    assert isinstance(reader, ReleasedFeatureReader)
    image = reader["1000"]
    assert image.features.shape == (10, DIM) and image.boxes.shape == (10, 4)
    assert (image.image_width, image.image_height) == (synthetic.WIDTH, synthetic.HEIGHT)
    assert "1000" in reader and "nope" not in reader
    with pytest.raises(KeyError, match="nope"):
        reader["nope"]


def write_store(path, image_id: str, count: int, width: int, height: int, seed: int = 0) -> RegionFeatures:
    """Our FeatureStore at `path` holding one image of `count` random regions; returns them."""
    rng = np.random.default_rng(seed)
    regions = RegionFeatures(boxes=rng.uniform(0, 50, (count, 4)).astype(np.float32),
                             features=rng.random((count, DIM), dtype=np.float32), scores=np.ones(count, np.float32),
                             class_ids=np.arange(count), image_width=width, image_height=height, num_boxes=count)
    with FeatureStore(path, readonly=False) as store:
        store.put(image_id, regions)
    return regions


def test_our_feature_store_is_read_too(tmp_path):
    regions = write_store(tmp_path / "store", "img1", 5, 100, 80)
    reader = open_features(tmp_path / "store")
    assert isinstance(reader, StoreFeatureReader)
    image = reader["img1"]
    np.testing.assert_array_equal(image.features, regions.features)
    assert image.image_width == 100


def test_training_items_from_our_store_equal_the_released_lmdb(root, tokenizer, tmp_path):
    released = open_features(root / SPECS[13].features)
    with FeatureStore(tmp_path / "store", readonly=False) as store:
        for image_id in ("1000", "1001", "1002"):
            image = released[image_id]
            store.put(image_id, RegionFeatures(boxes=image.boxes, features=image.features,
                                               scores=np.ones(len(image.boxes), np.float32),
                                               class_ids=np.zeros(len(image.boxes), np.int64),
                                               image_width=image.image_width, image_height=image.image_height,
                                               num_boxes=len(image.boxes)))
    ours = dataset(root, tokenizer, 13, "train", features=tmp_path / "store")
    theirs = dataset(root, tokenizer, 13, "train")
    for index in range(3):
        a, b = ours[index], theirs[index]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(MissingDataError, match="'1003' is not in"):
        ours[3]


def test_missing_lmdb_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "x.lmdb" / "data.mdb")):
        open_features(tmp_path / "x.lmdb")


def write_records(path, records: dict) -> None:
    """Released-format LMDB of arbitrary pickled values (the synthetic writer only writes well-formed ones)."""
    import pickle

    import lmdb

    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in records.items():
            txn.put(key.encode("utf-8"), value if isinstance(value, bytes) else pickle.dumps(value, protocol=2))
    env.close()
    (path / "lock.mdb").unlink()  # left by the writer; readers must not need or make one


def record(boxes, features, **extra):
    return {"image_id": 1, "image_w": 64, "image_h": 48, "num_boxes": 99, "boxes": boxes, "features": features,
            **extra}


def test_released_records_come_out_as_float32_rows_cut_to_the_feature_count(tmp_path):
    """float64 arrays (as some conversion scripts wrote them), flat box lists, more boxes than features: the rows
    follow `features`, as the reference reader does (the stored num_boxes is ignored)."""
    features = np.arange(3 * DIM, dtype=np.float64).reshape(3, DIM) / 7
    boxes = np.arange(16, dtype=np.float64) + 0.5  # four boxes, flat
    write_records(tmp_path / "f.lmdb", {"7": record(boxes, features), "list": record(boxes.tolist(), features.tolist())})
    reader = ReleasedFeatureReader(tmp_path / "f.lmdb")
    for key in ("7", "list"):
        image = reader[key]
        assert image.features.dtype == np.float32 and image.boxes.dtype == np.float32
        np.testing.assert_array_equal(image.features, features.astype(np.float32))
        np.testing.assert_array_equal(image.boxes, boxes.reshape(4, 4)[:3].astype(np.float32))
        assert (image.image_width, image.image_height) == (64, 48)


@pytest.mark.parametrize("image_id", ["1000", b"1000", 1000])
def test_released_ids_may_be_text_bytes_or_numbers(root, image_id):
    """Annotation files give image ids as numbers (COCO), text (NLVR2) or bytes (Python-2 pickles)."""
    reader = open_features(root / SPECS[13].features)
    assert image_id in reader
    np.testing.assert_array_equal(reader[image_id].features, reader["1000"].features)


def test_a_non_ascii_id_is_looked_up_by_its_utf8_bytes(tmp_path):
    write_records(tmp_path / "f.lmdb", {"caf\u00e9": record(np.zeros((1, 4)), np.ones((1, DIM)))})
    reader = ReleasedFeatureReader(tmp_path / "f.lmdb")
    assert "caf\u00e9" in reader and "caf\u00e9".encode("utf-8") in reader
    assert reader["caf\u00e9".encode("utf-8")].features.shape == (1, DIM)


@pytest.mark.parametrize("value", [
    {"boxes": np.zeros((1, 4)), "features": np.zeros((1, DIM)), "image_w": 5},  # no image_h
    {"boxes": np.zeros((1, 4)), "image_w": 5, "image_h": 5},  # no features
    [np.zeros((1, 4)), np.zeros((1, DIM)), 5, 5],  # not a dict
])
def test_a_record_that_is_not_a_region_record_is_refused_with_its_key(tmp_path, value):
    from vilbert_train.features import FeatureFileError

    write_records(tmp_path / "f.lmdb", {"9": value})
    with pytest.raises(FeatureFileError) as error:
        ReleasedFeatureReader(tmp_path / "f.lmdb")["9"]
    assert str(error.value) == (f"{tmp_path / 'f.lmdb'}[9]: not a region-feature record (expected boxes, features, "
                                "image_w, image_h)")


def test_a_damaged_record_is_named_by_its_file_and_key(tmp_path):
    from vilbert_train.pickles import UnsafePickleError

    write_records(tmp_path / "f.lmdb", {"9": b"\x80\x02}q\x00(X"})  # cut short
    with pytest.raises(UnsafePickleError, match=r"^" + re.escape(f"{tmp_path / 'f.lmdb'}[9]: not a valid pickle")):
        ReleasedFeatureReader(tmp_path / "f.lmdb")["9"]


def test_released_lmdb_is_opened_read_only_without_a_lock_file(tmp_path):
    """The released LMDBs (tens of GB) often sit on read-only mounts shared by every DataLoader worker: no lock file
    (it could not be made), no write access, no readahead or zeroing of pages (random reads), room for many
    readers."""
    write_records(tmp_path / "f.lmdb", {"1": record(np.zeros((1, 4)), np.ones((1, DIM)))})
    reader = ReleasedFeatureReader(tmp_path / "f.lmdb")
    assert reader["1"].features.shape == (1, DIM)
    assert sorted(p.name for p in (tmp_path / "f.lmdb").iterdir()) == ["data.mdb"]
    env = reader._env()
    flags = env.flags()
    assert (flags["readonly"], flags["lock"], flags["readahead"], flags["meminit"]) == (True, False, False, False)
    assert env.max_readers() == 256


def test_an_empty_lmdb_opens_as_released_and_holds_nothing(tmp_path):
    write_records(tmp_path / "f.lmdb", {})
    reader = open_features(tmp_path / "f.lmdb")
    assert isinstance(reader, ReleasedFeatureReader) and "1" not in reader


def test_each_reader_names_the_missing_file(tmp_path):
    for reader, message in ((ReleasedFeatureReader, "region-feature LMDB not found"),
                            (StoreFeatureReader, "feature store not found")):
        with pytest.raises(FileNotFoundError) as error:
            reader(tmp_path / "x.lmdb")
        assert str(error.value) == f"{message}: {tmp_path / 'x.lmdb' / 'data.mdb'}"


def test_our_store_is_read_only_and_answers_membership(tmp_path):
    write_store(tmp_path / "store", "42", 2, 60, 40, seed=1)
    reader = StoreFeatureReader(tmp_path / "store")
    assert "42" in reader and b"42" in reader and 42 in reader and "43" not in reader
    with pytest.raises(KeyError, match="'43' is not in"):
        reader[43]
    assert reader._get_store().env.flags()["readonly"] is True


# ------------------------------------------------------------------------------------------------ task ids


def test_task_ids_and_names_resolve():
    assert [s.task_id for s in resolve_tasks("1-2-4-7-8-9-10-11-12-13-15-17")] == [1, 2, 4, 7, 8, 9, 10, 11, 12, 13, 15, 17]
    assert [s.task_id for s in resolve_tasks("vqa-refcoco_plus,snli_ve")] == [1, 10, 13]
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks("3")
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks("vqa-foo")


# ---------------------------------------------------------------------------------------------- readers


def test_snli_ve(root, tokenizer):
    ds = dataset(root, tokenizer, 13, "train")
    assert len(ds) == 24 and ds.examples[0].labels == [0] and ds.examples[2].labels == [2]
    item = ds[2]
    assert item["input_ids"].shape == (1, 56) and item["features"].shape == (1, 101, DIM)
    assert item["image_mask"][0].sum() == 11  # global region + 10 boxes
    np.testing.assert_array_equal(item["spatials"][0, 0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(item["target"], [0, 0, 1])
    assert item["input_ids"][0, 0] == 101 and 102 in item["input_ids"][0]


def test_vqa_splits_and_soft_targets(root, tokenizer):
    train = dataset(root, tokenizer, 1, "train")
    minval = dataset(root, tokenizer, 1, "minval")
    trainval = dataset(root, tokenizer, 1, "trainval")
    assert len(train) == 12 and len(minval) == 12 and len(trainval) == 12  # val has < 3000 questions
    item = train[1]
    assert item["target"].shape == (3129,) and item["target"][1] == 1.0 and item["target"][3] == pytest.approx(0.3)
    assert item["target"].sum() == pytest.approx(1.3)
    test = dataset(root, tokenizer, 1, "test")
    assert len(test) == 3 and test.examples[0].qid == 9000


def test_vqa_missing_answer_targets_is_named(root, tokenizer, tmp_path):
    (tmp_path / "VQA").mkdir()
    for name in ("train", "val"):
        (tmp_path / "VQA" / f"v2_OpenEnded_mscoco_{name}2014_questions.json").write_bytes(
            (root / "VQA" / f"v2_OpenEnded_mscoco_{name}2014_questions.json").read_bytes())
    with pytest.raises(MissingDataError, match=r"answer targets.*VQA/cache/train_target.pkl"):
        dataset(tmp_path, tokenizer, 1, "train")


def test_gqa_and_genome(root, tokenizer):
    gqa = dataset(root, tokenizer, 15, "train")
    assert gqa[0]["target"].shape == (1533,) and gqa.examples[0].image_ids == ["n100"]
    assert len(dataset(root, tokenizer, 15, "minval")) == 24  # trainval_target.pkl[-3000:]
    test = dataset(root, tokenizer, 15, "test")
    assert [e.qid for e in test.examples] == ["t0", "t1", "t2"]
    genome = dataset(root, tokenizer, 2, "val")
    assert len(genome) == 9 and genome[0]["input_ids"].shape == (1, 26)


def test_nlvr2_pairs(root, tokenizer):
    ds = dataset(root, tokenizer, 12, "dev")
    example = ds.examples[1]
    assert example.image_ids == ["dev-1-0-img0", "dev-1-0-img1"] and example.labels == [0]
    assert ds.examples[0].labels == [1]
    item = ds[0]
    assert item["input_ids"].shape == (2, 40) and item["features"].shape == (2, 101, DIM)
    np.testing.assert_array_equal(item["input_ids"][0], item["input_ids"][1])  # the statement for both images


def test_retrieval_four_options_with_hard_negatives(root, tokenizer):
    for task_id in (7, 8):
        ds = dataset(root, tokenizer, task_id, "train")
        assert len(ds) == 12 and set(ds.retrieval.hard_pool) == set(ds.retrieval.image_ids)
        item = ds[0]
        assert item["input_ids"].shape == (4, 30) and item["label"] == 0
        f = item["features"]
        assert np.array_equal(f[0], f[1]) and np.array_equal(f[0], f[3]) and not np.array_equal(f[0], f[2])
        assert np.array_equal(item["input_ids"][0], item["input_ids"][2])
        ds.set_epoch(0)
        again = ds[0]
        np.testing.assert_array_equal(item["input_ids"], again["input_ids"])  # negatives fixed by (seed, epoch)
    val = dataset(root, tokenizer, 7, "val")
    assert val[0]["input_ids"].shape == (1, 30)


def test_retrieval_training_needs_hard_negatives(root, tokenizer, tmp_path):
    folder = tmp_path / "cocoRetreival"
    folder.mkdir()
    name = "all_data_final_train_2014.jsonline"
    (folder / name).write_bytes((root / "cocoRetreival" / name).read_bytes())
    with pytest.raises(MissingDataError, match=r"hard negatives.*cocoRetreival/hard_negative.pkl"):
        dataset(tmp_path, tokenizer, 7, "train")


@pytest.mark.parametrize("task_id", [9, 10, 11])
def test_refer_grounding_targets(root, tokenizer, task_id):
    train = dataset(root, tokenizer, task_id, "train")
    val = dataset(root, tokenizer, task_id, "val")
    assert len(train) == 4 and len(val) == 2
    item = val[0]
    example = val.examples[0]
    k = 4  # image 704's referred object is its detected box 4 (row 5 after the global row)
    assert example.image_ids == ["704"]
    assert item["target"].shape == (101,)
    assert item["target"][k + 1] == pytest.approx(1.0)
    np.testing.assert_allclose(item["target"], iou(item["boxes"], example.box) * item["image_mask"][0], rtol=1e-6)
    train_item = train[0]
    assert (train_item["target"][(train_item["target"] > 0)] >= 0.5).all()  # training targets drop IoU < 0.5
    assert train_item["image_mask"][0].sum() == 12  # ground-truth box appended after the 11 detected rows


def test_visual7w_pointing(root, tokenizer):
    ds = dataset(root, tokenizer, 4, "train")
    assert len(ds) == 4
    item = ds[1]
    example = ds.examples[1]
    assert len(example.candidates) == 4 and example.answer_index == 1
    assert item["features"].shape == (1, 200, DIM) and item["input_ids"].shape == (1, 20)
    np.testing.assert_array_equal(item["mc_ids"][:4], [101, 102, 103, 104])
    assert item["mc_mask"].sum() == 4 and item["target"][1] == pytest.approx(1.0)
    assert item["image_mask"][0, 101:105].all() and not item["image_mask"][0, 11:101].any()
    # the candidate rows carry the ground-truth file's boxes, in the annotation's order
    np.testing.assert_allclose(item["spatials"][0, 101, 0] * synthetic.WIDTH, example.candidates[0][0], rtol=1e-5)


def test_guesswhat_pointing(root, tokenizer):
    ds = dataset(root, tokenizer, 17, "train")
    assert len(ds) == 5  # the failed game is skipped
    example = ds.examples[0]
    assert example.text == "start is it red? answer No stop start is it on the left? answer Yes stop "
    assert guesswhat_dialog([{"question": "a", "answer": "b"}]) == "start a answer b stop "
    item = ds[0]
    assert item["input_ids"].shape == (1, 256) and item["features"].shape == (1, 306, DIM)
    assert item["mc_mask"].sum() == 3 and item["label"] == example.answer_index == 1


# ------------------------------------------------------------------------------------------ one task table


def test_training_specs_agree_with_the_task_registry():
    """config/tasks.json owns every task fact training shares with serving; the training table adds only its own."""
    from vilbert.tasks import TaskRegistry
    from vilbert_train.specs import TRAINING

    registry = TaskRegistry.from_file()
    assert set(TRAINING) == set(registry.names)
    assert sorted(SPECS) == sorted(task.task_id for task in registry)
    for task in registry:
        spec = SPECS[task.task_id]
        assert (spec.name, spec.kind, spec.head, spec.answers, spec.max_seq_length, spec.max_region_num) == (
            task.name, task.kind, task.head, task.answers, task.max_seq_length, task.max_region_num), task.name
    # the reference's vilbert_tasks.yml values the released model was trained with
    assert [(s.task_id, s.max_seq_length, s.max_region_num, s.batch_size) for s in SPECS.values()] == [
        (1, 23, 101, 128), (2, 26, 101, 128), (4, 20, 200, 256), (7, 30, 101, 128), (8, 30, 101, 128),
        (9, 20, 101, 256), (10, 20, 101, 256), (11, 20, 101, 256), (12, 40, 101, 64), (13, 56, 101, 256),
        (15, 26, 101, 128), (17, 256, 306, 64)]


def test_every_per_kind_table_covers_the_one_vocabulary_of_kinds():
    from vilbert.predictor import Predictor
    from vilbert.tasks import KINDS, KIND_ANSWERS
    from vilbert_train.datasets import READERS
    from vilbert_train.estimate import FAKE_TARGETS
    from vilbert_train.evaluation import EVALUATORS, PREDICTION_LABELS, SPLIT_LOGITS
    from vilbert_train.losses import LOSSES

    for table in (KIND_ANSWERS, Predictor._DECODERS, TaskDataset._ITEMS, LOSSES, FAKE_TARGETS):
        assert set(table) == set(KINDS)
    # "score" is evaluated by ranking every image against every caption, not per example
    assert set(SPLIT_LOGITS) == set(EVALUATORS) == set(KINDS) - {"score"}
    assert set(PREDICTION_LABELS) <= set(KINDS)
    assert {spec.family for spec in SPECS.values()} == set(READERS)


# ------------------------------------------------------------------------------------------- visual input rows


def locations(boxes, width, height):
    """x1/W, y1/H, x2/W, y2/H and the box's share of the image, computed here."""
    return [[x1 / width, y1 / height, x2 / width, y2 / height, (x2 - x1) * (y2 - y1) / (width * height)]
            for x1, y1, x2, y2 in boxes]


def test_pointing_rows_put_candidates_after_the_padded_detected_block():
    from vilbert.predictor import ImageRegions
    from vilbert_train.features import visual_input

    detected = [[0, 0, 10, 10], [10, 5, 30, 25], [50, 0, 100, 50]]
    candidates = [[20, 10, 40, 30], [0, 25, 50, 50]]
    image = ImageRegions(np.array(detected, np.float32), np.array([[1, 0], [2, 0], [3, 0]], np.float32), 100, 50)
    given = ImageRegions(np.array(candidates, np.float32), np.array([[0, 10], [0, 20]], np.float32), 100, 50)
    rows = visual_input(image, max_regions=8, detected_slots=5, candidates=given)
    # the global row is the count-weighted mean of both files' global rows: (4 * [2, 0] + 3 * [0, 15]) / 7
    np.testing.assert_allclose(rows.features, [[8 / 7, 45 / 7], [1, 0], [2, 0], [3, 0], [0, 0], [0, 10], [0, 20],
                                               [0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(rows.boxes, [[0, 0, 100, 50], *detected, [0] * 4, *candidates, [0] * 4])
    np.testing.assert_allclose(rows.spatials, [[0, 0, 1, 1, 1], *locations(detected, 100, 50), [0] * 5,
                                               *locations(candidates, 100, 50), [0] * 5], rtol=1e-6)
    np.testing.assert_array_equal(rows.mask, [1, 1, 1, 1, 0, 1, 1, 0])
    assert rows.num_detected == 4
    assert [array.dtype for array in (rows.features, rows.spatials, rows.boxes, rows.mask)] == [
        np.float32, np.float32, np.float32, np.int64]
    # what does not fit is cut: one candidate row left after 5 detected slots of 6
    cut = visual_input(image, max_regions=6, detected_slots=5, candidates=given)
    np.testing.assert_array_equal(cut.mask, [1, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(cut.boxes[5], candidates[0])
    # grounding (no detected slots): the candidates follow the detected rows directly
    grounding = visual_input(image, max_regions=8, candidates=given)
    np.testing.assert_array_equal(grounding.boxes[4:6], candidates)
    np.testing.assert_array_equal(grounding.mask, [1, 1, 1, 1, 1, 1, 0, 0])
    full = visual_input(image, max_regions=5, detected_slots=5, candidates=given)  # no room left for candidates
    assert full.mask.tolist() == [1, 1, 1, 1, 0] and full.num_detected == 4
    plain = visual_input(image, max_regions=3)  # more detected boxes than rows: cut too
    np.testing.assert_array_equal(plain.boxes, [[0, 0, 100, 50], *detected[:2]])
    assert plain.num_detected == 3 and plain.mask.tolist() == [1, 1, 1]
    padded = visual_input(image, max_regions=6)
    np.testing.assert_array_equal(padded.boxes, [[0, 0, 100, 50], *detected, [0] * 4, [0] * 4])
    assert padded.num_detected == 4 and padded.mask.tolist() == [1, 1, 1, 1, 0, 0]
