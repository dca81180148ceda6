"""Fast tests of vilbert/tasks.py, the task registry (config/tasks.json): its validation of the file, image counts,
lookups and the API's description of a task. `bench/mutation.sh` runs these against mutants of vilbert/tasks.py."""

from __future__ import annotations

import json

import pytest

from vilbert.tasks import DEFAULT_REGISTRY, Task, TaskRegistry, UnknownTaskError

REGISTRY = TaskRegistry.from_file()


def entry(**changes) -> dict:
    base = {"name": "vqa", "task_id": 1, "title": "VQA", "kind": "answer", "head": "vil_prediction",
            "max_seq_length": 23, "max_region_num": 101, "answers": "vqa.json", "images": 1,
            "description": "Answers a question."}
    return {**base, **changes}


def load(tmp_path, *entries: dict) -> TaskRegistry:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"tasks": list(entries)}), encoding="utf-8")
    return TaskRegistry.from_file(path)


def test_the_packaged_registry_holds_the_twelve_released_tasks():
    assert [(t.name, t.task_id) for t in REGISTRY] == [
        ("vqa", 1), ("genome_qa", 2), ("visual7w", 4), ("retrieval_coco", 7), ("retrieval_flickr30k", 8),
        ("refcoco", 9), ("refcoco_plus", 10), ("refcocog", 11), ("nlvr2", 12), ("snli_ve", 13), ("gqa", 15),
        ("guesswhat", 17)]
    assert len(REGISTRY) == 12 and REGISTRY.names[:3] == ["vqa", "genome_qa", "visual7w"]
    assert "nlvr2" in REGISTRY and "teleport" not in REGISTRY and 12 not in REGISTRY
    assert REGISTRY.get("snli_ve").labels == ("contradiction", "neutral", "entailment")  # a tuple, from JSON
    assert TaskRegistry.from_file(DEFAULT_REGISTRY).names == REGISTRY.names


def test_image_counts_at_their_bounds():
    one, two, many = REGISTRY.get("vqa"), REGISTRY.get("nlvr2"), REGISTRY.get("retrieval_coco")
    assert (one.min_images, one.max_images, two.min_images, two.max_images) == (1, 1, 2, 2)
    assert (many.min_images, many.max_images) == (1, None)
    assert [one.accepts_image_count(n) for n in (0, 1, 2)] == [False, True, False]
    assert [two.accepts_image_count(n) for n in (1, 2, 3)] == [False, True, False]
    assert [many.accepts_image_count(n) for n in (0, 1, 64)] == [False, True, True]


def test_only_pointing_tasks_need_candidates():
    assert [t.name for t in REGISTRY if t.needs_candidates] == ["visual7w", "guesswhat"]


def test_describe_is_the_api_listing():
    assert REGISTRY.get("nlvr2").describe() == {
        "name": "nlvr2", "task_id": 12, "title": "NLVR2", "kind": "binary",
        "answers": "true or false, with its probability", "images": 2, "needs_candidate_boxes": False,
        "max_text_tokens": 40, "description": "Judges whether a statement is true of a pair of images."}
    assert REGISTRY.get("visual7w").describe()["needs_candidate_boxes"] is True


def test_lookups_and_their_errors():
    assert REGISTRY.get("gqa").task_id == 15 and REGISTRY.by_task_id(17).name == "guesswhat"
    with pytest.raises(UnknownTaskError) as caught:
        REGISTRY.get("teleport")
    assert caught.value.name == "teleport" and str(caught.value) == (
        "unknown task 'teleport'; known tasks: vqa, genome_qa, visual7w, retrieval_coco, retrieval_flickr30k, "
        "refcoco, refcoco_plus, refcocog, nlvr2, snli_ve, gqa, guesswhat")
    with pytest.raises(UnknownTaskError) as caught:
        REGISTRY.by_task_id(3)
    assert str(caught.value).startswith("unknown task '3'; known tasks: 1 (vqa), 2 (genome_qa), 4 (visual7w), ")


def test_resolve_keeps_the_given_order_once_each():
    assert [t.name for t in REGISTRY.resolve([" gqa", "vqa ", "gqa", "", "  "])] == ["gqa", "vqa"]
    assert REGISTRY.resolve([]) == []
    with pytest.raises(UnknownTaskError):
        REGISTRY.resolve(["vqa", "teleport"])


def test_the_file_is_checked(tmp_path):
    path = tmp_path / "tasks.json"
    cases = {
        "kind": (entry(kind="poem"), f"{path}: task vqa has unknown kind 'poem'"),
        "head": (entry(head="vil_poem"), f"{path}: task vqa reads unknown head 'vil_poem'"),
        "zero images": (entry(images=0), f"{path}: task vqa: images must be a positive count or '1+'"),
        "text images": (entry(images="2+"), f"{path}: task vqa: images must be a positive count or '1+'"),
        "float images": (entry(images=1.5), f"{path}: task vqa: images must be a positive count or '1+'"),
        "binary without labels": (entry(kind="binary", head="vil_binary_prediction"),
                                  f"{path}: task vqa (binary) needs 2 labels, one per class of its head, in the head's "
                                  "order"),
        "entailment with two labels": (entry(kind="entailment", head="vil_tri_prediction", labels=["no", "yes"]),
                                       f"{path}: task vqa (entailment) needs 3 labels, one per class of its head, in "
                                       "the head's order"),
        "binary with three labels": (entry(kind="binary", head="vil_binary_prediction", labels=["a", "b", "c"]),
                                     f"{path}: task vqa (binary) needs 2 labels, one per class of its head, in the "
                                     "head's order"),
    }
    for case, (bad, message) in cases.items():
        with pytest.raises(ValueError) as caught:
            load(tmp_path, bad)
        assert str(caught.value) == message, case
    with pytest.raises(ValueError) as caught:
        load(tmp_path, entry(), entry(task_id=2))
    assert str(caught.value) == "task names must be unique"
    loaded = load(tmp_path, entry(images="1+", labels=["a", "b"]), entry(name="two", images=2))
    assert loaded.get("vqa").labels == ("a", "b") and loaded.get("two").labels is None
    assert isinstance(loaded.get("vqa"), Task) and loaded.get("vqa").max_images is None
    labelled = load(tmp_path, entry(kind="binary", head="vil_binary_prediction", labels=["no", "yes"]),
                    entry(name="ve", kind="entailment", head="vil_tri_prediction", labels=["c", "n", "e"]))
    assert labelled.get("vqa").labels == ("no", "yes") and labelled.get("ve").labels == ("c", "n", "e")
