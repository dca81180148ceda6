"""The lexical first stage of a collection search, as pure functions: BM25 of a caption's words against the images'
region names, and which images go on to ViLBERT. No Redis here (service.collections reads the index and calls
these), so the scoring is tested, and mutation-checked, on plain data.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

# BM25's usual constants: term-frequency saturation and document-length normalisation.
BM25_K1 = 1.2
BM25_B = 0.75


def bm25_ranking(postings: Sequence[Mapping[str, int]], lengths: Mapping[str, int], images: int,
                 total_length: int) -> list[tuple[str, float]]:
    """(image id, score) of every image in `postings`, best first, ties by id.

    postings: per query word, image id -> how often the word occurs among that image's region names (words that
    occur nowhere may be left out); lengths: image id -> its number of words; images: the collection's image count
    (the N of the IDF); total_length: the sum of all images' lengths (for the average length)."""
    if not images:
        return []
    average = total_length / images if total_length else 1.0
    scores: dict[str, float] = {}
    for posting in postings:
        if not posting:
            continue
        # IDF with +1 inside the log (Lucene's): never negative, however common the word
        idf = math.log(1 + (images - len(posting) + 0.5) / (len(posting) + 0.5))
        for image_id, count in posting.items():
            norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths.get(image_id, 0) / average)
            scores[image_id] = scores.get(image_id, 0.0) + idf * count * (BM25_K1 + 1) / (count + norm)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def rerank_candidates(ranking: Sequence[tuple[str, float]], image_ids: Sequence[str], top: int) -> list[str]:
    """The `top` images ViLBERT scores: the lexical best, then, when fewer matched, other images in the order of
    `image_ids`, so that a caption whose words name no region still gets hits."""
    chosen = [image_id for image_id, _ in ranking[:top]]
    taken = set(chosen)
    return chosen + [image_id for image_id in image_ids if image_id not in taken][:top - len(chosen)]
