"""The lexical first stage's scoring on plain data (service/lexical.py; the Redis side is in tests/test_collections.py):
BM25 held to a version written out from its definition, and the choice of the images ViLBERT re-ranks."""

from __future__ import annotations

import math

import pytest

from service.lexical import bm25_ranking, rerank_candidates


def bm25(query: list[str], docs: dict[str, list[str]]) -> dict[str, float]:
    """BM25 from its definition (k1 1.2, b 0.75, IDF log(1 + (N - df + 0.5) / (df + 0.5))), to hold the service's
    ranking to; docs: image id -> its words."""
    n, average = len(docs), sum(len(d) for d in docs.values()) / len(docs)
    out: dict[str, float] = {}
    for term in set(query):
        df = sum(term in d for d in docs.values())
        if not df:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for image_id, doc in docs.items():
            tf = doc.count(term)
            if tf:
                out[image_id] = out.get(image_id, 0.0) + idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(doc) / average))
    return out


def index(docs: dict[str, list[str]], query: list[str]) -> tuple[list[dict[str, int]], dict[str, int], int, int]:
    """The arguments bm25_ranking gets from the store for `query` over `docs`."""
    postings = [{i: d.count(t) for i, d in docs.items() if t in d} for t in sorted(set(query))]
    lengths = {i: len(d) for i, d in docs.items()}
    return postings, lengths, len(docs), sum(lengths.values())


DOCS = {"a": ["dog", "frisbee", "grass", "grass"], "b": ["dog", "dog", "man", "tenni", "racket"],
        "c": ["man", "shirt"], "d": ["sky", "tree", "tree", "tree", "building", "window", "man"], "e": []}


@pytest.mark.parametrize("query", [["dog"], ["man"], ["dog", "frisbee", "man", "racket"], ["tree", "grass", "sky"],
                                   ["cloud"], ["man", "man", "dog"]])
def test_scores_equal_the_definition_and_rank_best_first(query):
    expected = bm25(query, DOCS)
    ranking = bm25_ranking(*index(DOCS, query))
    assert [i for i, _ in ranking] == sorted(expected, key=lambda i: (-expected[i], i))
    for image_id, score in ranking:
        assert score == pytest.approx(expected[image_id], rel=1e-12)


def test_ties_go_by_id_and_a_word_in_every_image_still_counts():
    docs = {"z": ["man"], "y": ["man"], "x": ["man"]}
    ranking = bm25_ranking(*index(docs, ["man"]))
    assert [i for i, _ in ranking] == ["x", "y", "z"]
    assert ranking[0][1] == pytest.approx(math.log(1 + 0.5 / 3.5), rel=1e-12)  # df = N: small, never negative


def test_lengths_zero_or_missing_use_an_average_of_one():
    # every image of length 0 (no total): the average is taken as 1, so the norm is k1 * (1 - b)
    ranking = bm25_ranking([{"a": 1}], {"a": 0}, images=2, total_length=0)
    idf = math.log(1 + 1.5 / 1.5)
    assert ranking == [("a", pytest.approx(idf * 2.2 / (1 + 1.2 * 0.25), rel=1e-12))]
    # an image the lengths do not name counts as length 0 against the real average (here 4)
    ranking = bm25_ranking([{"a": 2, "b": 2}], {"b": 4}, images=2, total_length=8)
    idf = math.log(1 + 0.5 / 2.5)
    assert dict(ranking) == pytest.approx({"a": idf * 2 * 2.2 / (2 + 1.2 * 0.25),
                                           "b": idf * 2 * 2.2 / (2 + 1.2 * (0.25 + 0.75 * 4 / 4))}, rel=1e-12)


def test_nothing_to_rank():
    assert bm25_ranking([], {}, images=3, total_length=5) == []
    assert bm25_ranking([{}, {}], {}, images=3, total_length=5) == []
    # a word that names no image is passed over, not the end of the query
    assert bm25_ranking([{}, {"a": 1}], {"a": 1}, 3, 5) == bm25_ranking([{"a": 1}], {"a": 1}, 3, 5) != []
    assert bm25_ranking([{"a": 1}], {"a": 1}, images=0, total_length=0) == []


def test_the_lexical_best_go_on_and_others_fill_the_rest_in_id_order():
    ranking = [("c", 3.0), ("a", 2.0), ("e", 1.0)]
    ids = ["a", "b", "c", "d", "e", "f"]
    assert rerank_candidates(ranking, ids, 2) == ["c", "a"]
    assert rerank_candidates(ranking, ids, 3) == ["c", "a", "e"]
    assert rerank_candidates(ranking, ids, 5) == ["c", "a", "e", "b", "d"]  # no image twice
    assert rerank_candidates(ranking, ids, 10) == ["c", "a", "e", "b", "d", "f"]
    assert rerank_candidates([], ids, 2) == ["a", "b"]
    assert rerank_candidates(ranking, ids, 0) == []
