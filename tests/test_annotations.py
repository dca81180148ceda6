"""vilbert_train/annotations.py against tiny annotation files written by hand in each official format (not by
vilbert_train/synthetic.py, which shares the readers' author): every field of every example, the splits, the
missing files named with what they are, and each malformed input's message."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from vilbert_train import annotations
from vilbert_train.annotations import (AnnotationError, Example, MissingDataError, read_genome, read_gqa,
                                       read_guesswhat, read_json, read_jsonl, read_nlvr2, read_refer,
                                       read_retrieval, read_snli_ve, read_visual7w, read_vqa)


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_pickle(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(value, protocol=2))


@pytest.fixture
def small_minval(monkeypatch):
    monkeypatch.setattr(annotations, "MINVAL_SIZE", 2)


# ------------------------------------------------------------------------------------------------ VQA family


def vqa_root(tmp_path: Path) -> Path:
    def questions(ids):  # written out of order: the reader sorts by question id
        return {"questions": [{"question_id": q, "image_id": q // 10, "question": f"q{q}?"} for q in reversed(ids)]}

    def targets(ids):
        return [{"question_id": q, "image_id": q // 10, "labels": [q % 7, 3], "scores": [1.0, 0.3]} for q in ids]

    write_json(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json", questions([10, 11]))
    write_pickle(tmp_path / "cache" / "train_target.pkl", targets([11, 10]))
    write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", questions([20, 21, 30, 31, 40]))
    write_pickle(tmp_path / "cache" / "val_target.pkl", targets([40, 31, 30, 21, 20]))
    write_json(tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json",
               {"questions": [{"question_id": 99, "image_id": 9, "question": "test?"}]})
    return tmp_path


def vqa(q: int) -> Example:
    return Example(q, [str(q // 10)], f"q{q}?", [q % 7, 3], [1.0, 0.3])


def test_vqa_splits(tmp_path, small_minval):
    root = vqa_root(tmp_path)
    assert read_vqa(root, "train") == [vqa(10), vqa(11)]
    assert read_vqa(root, "val") == [vqa(q) for q in (20, 21, 30, 31, 40)]
    assert read_vqa(root, "minval") == [vqa(31), vqa(40)]
    assert read_vqa(root, "trainval") == [vqa(q) for q in (10, 11, 20, 21, 30)]
    assert read_vqa(root, "test") == [Example(99, ["9"], "test?")]


def test_vqa_targets_must_match_their_questions(tmp_path):
    root = vqa_root(tmp_path)
    target_path = root / "cache" / "train_target.pkl"
    questions_path = root / "v2_OpenEnded_mscoco_train2014_questions.json"
    write_pickle(target_path, [{"question_id": 10, "image_id": 1, "labels": [1], "scores": [1.0]}])
    with pytest.raises(AnnotationError, match=rf"^{questions_path} has 2 questions, {target_path} 1 targets$"):
        read_vqa(root, "train")
    for wrong in ({"question_id": 12, "image_id": 1}, {"question_id": 11, "image_id": 2}):
        write_pickle(target_path, [{"question_id": 10, "image_id": 1, "labels": [1], "scores": [1.0]},
                                   {**wrong, "labels": [1], "scores": [1.0]}])
        with pytest.raises(AnnotationError, match=rf"^{target_path}: question 11 has no matching target$"):
            read_vqa(root, "train")
    write_pickle(target_path, [{"question_id": 10, "image_id": 1, "labels": [1]},
                               {"question_id": 11, "image_id": 1, "labels": [1], "scores": [1.0]}])
    with pytest.raises(AnnotationError, match=rf"^{target_path}: target entries need 'labels' and 'scores' "
                                              r"\('scores'\)$"):
        read_vqa(root, "train")


def target_items(ids, text=lambda value: value):
    """Genome QA and GQA targets as the released caches hold them (Python 2 wrote byte strings)."""
    return [{"question_id": q, "image_id": text(f"img{q}"), "question": text(f"caf\u00e9 {q}?"),
             "labels": np.array([q, 1]), "scores": [np.float32(0.5), 1]} for q in reversed(ids)]


def item(q: int) -> Example:
    return Example(q, [f"img{q}"], f"caf\u00e9 {q}?", [q, 1], [0.5, 1.0])


def test_genome_qa_reads_text_and_byte_strings(tmp_path):
    write_pickle(tmp_path / "cache" / "train_target.pkl", target_items([1, 2], lambda s: s.encode("utf-8")))
    write_pickle(tmp_path / "cache" / "val_target.pkl", target_items([5]))
    assert read_genome(tmp_path, "train") == [item(1), item(2)]
    assert read_genome(tmp_path, "val") == [item(5)]
    examples = read_genome(tmp_path, "train")
    assert all(type(label) is int for label in examples[0].labels)
    assert all(type(score) is float for score in examples[0].scores)


def test_a_target_without_scores_names_its_file(tmp_path):
    path = tmp_path / "cache" / "val_target.pkl"
    write_pickle(path, [{"question_id": 1, "image_id": "i", "question": "q", "labels": [1]}])
    with pytest.raises(AnnotationError) as refused:
        read_genome(tmp_path, "val")
    assert str(refused.value) == f"{path}: target entries need 'labels' and 'scores' ('scores')"


def test_gqa_splits(tmp_path, small_minval):
    write_pickle(tmp_path / "cache" / "train_target.pkl", target_items([1]))
    write_pickle(tmp_path / "cache" / "val_target.pkl", target_items([2]))
    write_pickle(tmp_path / "cache" / "trainval_target.pkl", target_items([3, 4, 5, 6, 7]))
    write_json(tmp_path / "testdev_balanced_questions.json", {"t1": {"imageId": "n1", "question": "what?"}})
    assert read_gqa(tmp_path, "train") == [item(1)]
    assert read_gqa(tmp_path, "val") == [item(2)]
    assert read_gqa(tmp_path, "trainval") == [item(3), item(4), item(5)]
    assert read_gqa(tmp_path, "minval") == [item(6), item(7)]
    assert read_gqa(tmp_path, "test") == [Example("t1", ["n1"], "what?")]


# ---------------------------------------------------------------------------------------------- NLVR2, SNLI-VE


def test_nlvr2_pairs_and_labels(tmp_path):
    write_jsonl(tmp_path / "dev.json", [
        {"identifier": "dev-850-0-0", "sentence": "Two dogs.", "label": "True"},
        {"identifier": "dev-850-0-1", "sentence": "No dogs.", "label": "False"},
        {"identifier": "dev-851-2-3", "sentence": "Unlabelled."},
    ])
    assert read_nlvr2(tmp_path, "dev") == [
        Example("dev-850-0-0", ["dev-850-0-img0", "dev-850-0-img1"], "Two dogs.", [1]),
        Example("dev-850-0-1", ["dev-850-0-img0", "dev-850-0-img1"], "No dogs.", [0]),
        Example("dev-851-2-3", ["dev-851-2-img0", "dev-851-2-img1"], "Unlabelled.", [-1]),
    ]


def test_snli_ve_labels_and_ids(tmp_path):
    write_jsonl(tmp_path / "snli_ve_test.jsonl", [
        {"Flikr30kID": "1000092795.jpg", "sentence2": "A man.", "gold_label": "entailment", "pairID": "p1"},
        {"Flikr30kID": "1000092795.jpg", "sentence2": "A cat.", "gold_label": "contradiction"},
        {"Flikr30kID": 20, "sentence2": "Maybe.", "gold_label": "neutral", "pairID": "p3"},
        {"Flikr30kID": "30.jpg", "sentence2": "Unsure.", "gold_label": "-", "pairID": "p4"},
    ])
    assert read_snli_ve(tmp_path, "test") == [
        Example("p1", ["1000092795"], "A man.", [2]), Example(1, ["1000092795"], "A cat.", [0]),
        Example("p3", ["20"], "Maybe.", [1]), Example("p4", ["30"], "Unsure.", [-1]),
    ]


# ------------------------------------------------------------------------------------------------- retrieval


def test_retrieval_captions_images_and_hard_negatives(tmp_path):
    write_jsonl(tmp_path / "all_data_final_train_2014.jsonline", [
        {"img_path": "111.jpg", "sentences": ["a", "b"]}, {"img_path": "222.jpg", "sentences": ["c"]},
        {"img_path": "333.jpg", "sentences": []}])
    write_pickle(tmp_path / "hard_negative.pkl", {"train_image_list": [b"111.jpg", "222.jpg", "333"],
                                                  "train_hard_pool": np.array([[1, 2], [2, 0], [0, 1]])})
    data = read_retrieval(tmp_path, "train", coco=False)
    assert data.examples == [Example("111_0", ["111"], "a"), Example("111_1", ["111"], "b"),
                             Example("222_0", ["222"], "c")]
    assert data.image_ids == ["111", "222", "333"]
    assert data.hard_pool == {"111": ["222", "333"], "222": ["333", "111"], "333": ["111", "222"]}
    write_jsonl(tmp_path / "all_data_final_test_set0_2014.jsonline", [{"id": 42, "sentences": ["x"]}])
    for split in ("val", "test"):
        coco = read_retrieval(tmp_path, split, coco=True)
        assert (coco.examples, coco.image_ids, coco.hard_pool) == ([Example("42_0", ["42"], "x")], ["42"], None)


def test_a_hard_negative_pool_of_one_image_each_is_read(tmp_path):
    write_jsonl(tmp_path / "all_data_final_train_2014.jsonline", [{"id": 1, "sentences": ["a"]}])
    write_pickle(tmp_path / "hard_negative.pkl", {"train_image_list": ["1", "2"], "train_hard_pool": [1, 0]})
    assert read_retrieval(tmp_path, "train", coco=True).hard_pool == {"1": ["2"], "2": ["1"]}


def test_retrieval_hard_negatives_of_another_shape_are_named(tmp_path):
    write_jsonl(tmp_path / "all_data_final_train_2014.jsonline", [{"id": 1, "sentences": ["a"]}])
    path = tmp_path / "hard_negative.pkl"
    for value, reason in [({"train_image_list": ["1"]}, "'train_hard_pool'"),
                          ({"train_image_list": ["1"], "train_hard_pool": [[5]]}, "list index out of range"),
                          ({"train_image_list": 7, "train_hard_pool": []}, "'int' object is not iterable")]:
        write_pickle(path, value)
        with pytest.raises(AnnotationError) as refused:
            read_retrieval(tmp_path, "train", coco=True)
        assert str(refused.value) == f"{path}: expected train_image_list and train_hard_pool ({reason})"


# -------------------------------------------------------------------------------------------------- grounding


def test_refer_one_example_per_sentence_with_the_annotations_box(tmp_path):
    folder = tmp_path / "refcocog"
    write_pickle(folder / "refs(umd).p", [
        {"image_id": 8, "ann_id": 80, "ref_id": 2, "split": "train", "sentences": [{"sent_id": 21, "sent": "dog"}]},
        {"image_id": 7, "ann_id": 70, "ref_id": 1, "split": b"val",
         "sentences": [{"sent_id": 11, "sent": b"the red cup"}, {"sent": "left cup"}]},
    ])
    write_json(folder / "instances.json", {"annotations": [{"id": 70, "bbox": [10, 20, 30, 40]},
                                                           {"id": 80, "bbox": [0, 0, 1, 1]}]})
    assert read_refer(tmp_path, "refcocog", "val") == [
        Example(11, ["7"], "the red cup", box=[10.0, 20.0, 40.0, 60.0]),
        Example(1, ["7"], "left cup", box=[10.0, 20.0, 40.0, 60.0]),
    ]
    with pytest.raises(AnnotationError, match=rf"^{folder}: no referring expressions in split 'test'$"):
        read_refer(tmp_path, "refcocog", "test")
    write_pickle(tmp_path / "refcoco+" / "refs(unc).p", [])
    write_json(tmp_path / "refcoco+" / "instances.json", {"annotations": []})
    with pytest.raises(AnnotationError, match="no referring expressions"):
        read_refer(tmp_path, "refcoco+", "train")


# --------------------------------------------------------------------------------------------------- pointing


def test_visual7w_candidates_in_box_id_order(tmp_path):
    write_json(tmp_path / "dataset_v7w_pointing.json", {
        "boxes": [{"box_id": b, "x": b, "y": 2 * b, "width": 10, "height": 5} for b in (3, 1, 4, 2)],
        "images": [{"image_id": 6, "split": "train", "qa_pairs": [
            {"qa_id": 60, "question": "Other?", "answer": 1, "multiple_choices": [2, 3, 4]}]},
                   {"image_id": 5, "split": "val", "qa_pairs": [
            {"qa_id": 50, "question": "Which?", "answer": 4, "multiple_choices": [1, 3, 2]}]}]})
    box = {b: [float(b), 2.0 * b, b + 10.0, 2.0 * b + 5] for b in (1, 2, 3, 4)}
    assert read_visual7w(tmp_path, "val") == [
        Example(50, ["5"], "Which?", candidates=[box[1], box[2], box[3], box[4]], answer_index=3)]


def test_guesswhat_successful_games_with_their_dialogue(tmp_path):
    game = {"id": 1, "image": {"id": 77}, "object_id": 9, "qas": [{"question": "is it red?", "answer": "no"},
                                                                   {"question": "a cup?", "answer": "yes"}],
            "objects": [{"id": 8, "bbox": [0, 0, 10, 10]}, {"id": 9, "bbox": [5, 6, 2, 3]}]}
    write_jsonl(tmp_path / "guesswhat.valid.jsonl", [
        {**game, "status": "success"}, {**game, "id": 2, "status": "failure"}, {**game, "id": 3}])
    expected = dict(candidates=[[0.0, 0.0, 10.0, 10.0], [5.0, 6.0, 7.0, 9.0]], answer_index=1)
    dialogue = "start is it red? answer no stop start a cup? answer yes stop "
    assert read_guesswhat(tmp_path, "valid") == [Example(1, ["77"], dialogue, **expected),
                                                 Example(3, ["77"], dialogue, **expected)]


# ---------------------------------------------------------------------------------------- files and messages


@pytest.mark.parametrize("read, path, what", [
    (lambda root: read_vqa(root, "train"), "v2_OpenEnded_mscoco_train2014_questions.json", "VQA questions"),
    (lambda root: read_vqa(root, "test"), "v2_OpenEnded_mscoco_test2015_questions.json", "VQA test questions"),
    (lambda root: read_genome(root, "val"), "cache/val_target.pkl", "Genome QA questions with answer targets"),
    (lambda root: read_gqa(root, "val"), "cache/val_target.pkl", "GQA answer targets (from datasets.tar.gz)"),
    (lambda root: read_gqa(root, "minval"), "cache/trainval_target.pkl", "GQA answer targets (from datasets.tar.gz)"),
    (lambda root: read_gqa(root, "test"), "testdev_balanced_questions.json", "GQA test-dev questions"),
    (lambda root: read_nlvr2(root, "test"), "test.json", "NLVR2 annotations"),
    (lambda root: read_snli_ve(root, "dev"), "snli_ve_dev.jsonl", "SNLI-VE annotations"),
    (lambda root: read_retrieval(root, "val", True), "all_data_final_test_set0_2014.jsonline", "retrieval captions"),
    (lambda root: read_refer(root, "refcoco", "val"), "refcoco/refs(unc).p", "refcoco REFER refs"),
    (lambda root: read_visual7w(root, "val"), "dataset_v7w_pointing.json", "Visual7W pointing annotations"),
    (lambda root: read_guesswhat(root, "test"), "guesswhat.test.jsonl", "GuessWhat games"),
])
def test_a_missing_file_is_named_with_what_it_is(tmp_path, read, path, what):
    with pytest.raises(MissingDataError) as missing:
        read(tmp_path)
    assert str(missing.value) == f"missing {what}: {tmp_path / path}"


def test_the_second_file_of_a_pair_is_named_too(tmp_path):
    vqa_root(tmp_path)
    (tmp_path / "cache" / "val_target.pkl").unlink()
    with pytest.raises(MissingDataError, match=r"^missing VQA answer targets \(from datasets\.tar\.gz\): "):
        read_vqa(tmp_path, "val")
    write_jsonl(tmp_path / "all_data_final_train_2014.jsonline", [])
    with pytest.raises(MissingDataError, match=r"^missing retrieval hard negatives \(from datasets\.tar\.gz\): "):
        read_retrieval(tmp_path, "train", coco=True)
    write_pickle(tmp_path / "refcoco" / "refs(unc).p", [])
    with pytest.raises(MissingDataError, match=r"^missing refcoco REFER instances: "):
        read_refer(tmp_path, "refcoco", "val")


@pytest.mark.parametrize("read, task, known", [
    (read_vqa, "VQA", "train, val, trainval, minval, test"), (read_gqa, "GQA", "train, val, trainval, minval, test"),
    (read_genome, "GenomeQA", "train, val"), (read_nlvr2, "NLVR2", "train, dev, test"),
    (read_snli_ve, "SNLI-VE", "train, dev, test"), (read_guesswhat, "GuessWhat", "train, valid, test"),
    (lambda root, split: read_retrieval(root, split, True), "retrieval", "train, val, test"),
])
def test_an_unknown_split_is_refused_with_the_known_ones(tmp_path, read, task, known):
    with pytest.raises(AnnotationError) as refused:
        read(tmp_path, "holdout")
    assert str(refused.value) == f"{task}: unknown split 'holdout' (known: {known})"


def test_json_and_json_lines_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"questions": [', encoding="utf-8")
    with pytest.raises(AnnotationError) as refused:
        read_json(path, "VQA questions")
    assert str(refused.value).startswith(f"{path}: not valid JSON (Expecting value: line 1 column 16")
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"a": 1}\n\n   \n{"b": "caf\u00e9"}\n{oops}\n', encoding="utf-8")
    with pytest.raises(AnnotationError) as refused:
        read_jsonl(lines, "rows")
    assert str(refused.value).startswith(f"{lines}:5: not valid JSON (Expecting property name")
    lines.write_text('{"a": 1}\n\n{"b": "caf\u00e9"}\n', encoding="utf-8")
    assert read_jsonl(lines, "rows") == [{"a": 1}, {"b": "caf\u00e9"}]
    path.write_text('{"b": "caf\u00e9"}', encoding="utf-8")
    assert read_json(path, "x") == {"b": "caf\u00e9"}
