"""service/bundle.py: which files a weights bundle needs, when it counts as complete, and the tiny random-weight
bundle (written here in-process, as `python models/make_tiny.py` writes it): complete, marked as meaningless, its
two networks of matching width, seeded, and never left looking complete after a write that failed half-way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detector.categories import CATEGORIES_FILE
from detector.tiny import tiny_detector_config
from service.bundle import (REQUIRED_FILES, TINY_MARKER, TINY_NOTICE, is_tiny, missing_files, tiny_bundle_complete,
                            write_tiny_bundle)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


def test_every_required_file_is_missing_from_a_folder_that_does_not_exist(tmp_path):
    assert missing_files(tmp_path / "nowhere") == list(REQUIRED_FILES)
    assert REQUIRED_FILES == ("multi_task_model.bin", "detectron_model.pth", "detectron_config.yaml",
                              "vqa_answers.json", "gqa_answers.json")


def test_missing_files_are_listed_in_order_and_a_folder_of_that_name_is_no_file(tmp_path):
    (tmp_path / "detectron_config.yaml").write_text("x")
    (tmp_path / "multi_task_model.bin").mkdir()
    assert missing_files(tmp_path) == ["multi_task_model.bin", "detectron_model.pth", "vqa_answers.json",
                                       "gqa_answers.json"]
    assert not is_tiny(tmp_path) and not tiny_bundle_complete(tmp_path)


def test_the_tiny_bundle_is_complete_and_says_its_answers_are_meaningless(bundle):
    assert missing_files(bundle) == [] and is_tiny(bundle) and tiny_bundle_complete(bundle)
    for name in (TINY_MARKER, "README.txt"):
        assert (bundle / name).read_text(encoding="utf-8") == TINY_NOTICE + "\n"
    assert "meaningless" in TINY_NOTICE and "models/fetch.py" in TINY_NOTICE
    assert TINY_NOTICE.isascii()  # the same bytes whatever the locale's encoding
    assert json.loads((bundle / CATEGORIES_FILE).read_text())  # the region names file is there and is JSON


def test_its_vilbert_reads_the_detectors_features(bundle):
    config = json.loads((bundle / "vilbert_config.json").read_text())
    assert config["v_feature_size"] == tiny_detector_config().mlp_head_dim


def test_a_marker_without_its_files_is_not_a_complete_bundle(tmp_path):
    (tmp_path / TINY_MARKER).write_text(TINY_NOTICE)
    assert is_tiny(tmp_path) and not tiny_bundle_complete(tmp_path)


def test_the_same_seed_gives_the_same_weights_and_another_seed_others(bundle, tmp_path):
    again = write_tiny_bundle(tmp_path / "new" / "nested" / "again")  # folders made as needed
    other = write_tiny_bundle(tmp_path / "other", seed=1)

    for checkpoint, key in (("detectron_model.pth", "model"), ("multi_task_model.bin", None)):
        def weights(folder: Path) -> dict:
            state = torch.load(folder / checkpoint, weights_only=True)
            return state[key] if key else state

        first = weights(bundle)
        assert all(torch.equal(first[k], v) for k, v in weights(again).items()), checkpoint
        assert any(not torch.equal(first[k], v) for k, v in weights(other).items() if v.is_floating_point())


def test_a_write_that_fails_half_way_leaves_no_complete_looking_bundle(bundle, tmp_path):
    # An earlier complete bundle, then a rewrite that cannot write the detector's checkpoint (a folder is in the way).
    target = tmp_path / "bundle"
    target.mkdir()
    for path in bundle.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    (target / "detectron_model.pth").unlink()
    (target / "detectron_model.pth").mkdir()
    with pytest.raises(RuntimeError, match="Is a directory"):  # torch.save's own error for it
        write_tiny_bundle(target)
    assert not is_tiny(target) and not tiny_bundle_complete(target)
