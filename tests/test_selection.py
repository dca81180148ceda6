"""Region selection: the vectorised NMS against hand-computed cases and against the per-class loop oracle.

The data is built so that suppression decides the result: near-duplicate boxes with different scores in several
classes, chains where a suppressed box must not suppress further, IoU exactly at the threshold, ties, a single
box and empty input. The loop oracle (`max_confidence_loop`) gets the same hand-computed cases, so the legacy
"+1" arithmetic it stands for is pinned independently of the vectorised code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.selection import (
    NMS_THRESHOLD,
    _greedy_scan,
    _pack_bits,
    legacy_iou,
    max_confidence,
    max_confidence_loop,
    select_regions,
)

BOTH = pytest.mark.parametrize("confidence", [max_confidence, max_confidence_loop], ids=["vectorised", "loop"])


def _boxes(*rows: tuple[float, float, float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _probs(*rows: tuple[float, ...]) -> torch.Tensor:
    """Rows of [background, class 1, class 2, ...] scores (not normalised: selection never needs them to be)."""
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ legacy IoU


def test_legacy_iou_uses_plus_one_widths_and_heights():
    boxes = _boxes(
        (0, 0, 9, 9),  # 10 x 10 = 100 with the +1 convention
        (5, 0, 14, 9),  # shifted right by 5: intersection 5 x 10 = 50
        (0, 0, 19, 9),  # twice as wide: contains box 0, IoU exactly 100 / 200
        (20, 0, 29, 9),  # beside box 0: overlaps in y only (x extent negative)
        (20, 20, 29, 29),  # diagonal to box 0: negative in x and y, whose product would be positive unclamped
        (0, 0, 3, 3),  # 4 x 4 = 16
        (1, 0, 4, 3),  # intersection with the previous 3 x 4 = 12: IoU 12 / 20 (without +1 it would be 6 / 12)
    )
    iou = legacy_iou(boxes)
    assert iou.shape == (7, 7)
    assert iou[0, 1].item() == pytest.approx(50 / 150)
    assert iou[1, 0].item() == pytest.approx(50 / 150)
    assert iou[0, 2].item() == 0.5
    assert iou[2, 0].item() == 0.5
    assert iou[0, 3].item() == 0 and iou[3, 0].item() == 0
    assert iou[0, 4].item() == 0 and iou[4, 0].item() == 0
    assert iou[5, 6].item() == pytest.approx(12 / 20)
    # (5, 0, 14, 9) against (0, 0, 19, 9): intersection 100, union 100 + 200 - 100
    assert iou[1, 2].item() == pytest.approx(100 / 200)
    # a box with itself is 1, also for the 4 x 4 one where the +1 is most of the area
    assert torch.equal(iou.diagonal(), torch.ones(7))


def test_legacy_iou_of_unit_boxes():
    # Single-pixel boxes: width and height 0 in coordinates, 1 with the +1 convention.
    boxes = _boxes((3, 3, 3, 3), (3, 3, 3, 3), (4, 3, 4, 3))
    iou = legacy_iou(boxes)
    assert iou.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


# ------------------------------------------------------------------------------------------------ bit packing


def test_pack_bits_sets_bit_j_mod_64_of_word_j_div_64():
    rows, cols = 3, 130  # three words per row, the last one partly used
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    set_bits = {0: [0, 1, 63], 1: [64, 65, 127, 128], 2: [5, 129]}
    for row, columns in set_bits.items():
        mask[row, columns] = True
    packed = _pack_bits(mask)
    assert packed.dtype == torch.int64 and packed.shape == (rows, 3)
    words = packed.numpy().view(np.uint64)  # bit 63 makes the int64 negative; read the words unsigned
    for row, columns in set_bits.items():
        expected = [0, 0, 0]
        for column in columns:
            expected[column // 64] |= 1 << (column % 64)
        assert [int(w) for w in words[row]] == expected


@pytest.mark.parametrize("cols,words", [(1, 1), (63, 1), (64, 1), (65, 2), (128, 2), (129, 3)])
def test_pack_bits_uses_as_few_words_as_fit(cols, words):
    mask = torch.ones(2, cols, dtype=torch.bool)
    packed = _pack_bits(mask).numpy().view(np.uint64)
    assert packed.shape == (2, words)
    bits = sum(bin(int(w)).count("1") for w in packed[0])
    assert bits == cols


def test_pack_bits_stays_on_the_mask_device():
    # Selection runs on the GPU in service; the "meta" device stands in for it here (shapes and devices, no data),
    # so that a buffer made on the default device instead of the mask's fails on CPU too.
    packed = _pack_bits(torch.zeros(3, 70, dtype=torch.bool, device="meta"))
    assert packed.device.type == "meta" and packed.shape == (3, 2) and packed.dtype == torch.int64


# ------------------------------------------------------------------------------------------------ greedy scan


def test_greedy_scan_keeps_what_no_kept_box_suppresses():
    # Box 0 suppresses 1, box 1 suppresses 2, box 70 (second word) suppresses 3. Rows are symmetric like IoU.
    mask = torch.zeros(71, 71, dtype=torch.bool)
    for a, b in [(0, 1), (1, 2), (70, 3)]:
        mask[a, b] = mask[b, a] = True
    suppress = _pack_bits(mask).numpy().view(np.uint64)
    order = np.array([
        [0, 1, 2, 70, 3],  # 0 kept, 1 removed by 0, 2 kept (its suppressor 1 was removed), 70 kept, 3 removed
        [1, 0, 2, 3, 70],  # 1 kept, 0 and 2 removed by 1, 3 kept, 70 removed by 3
        [2, 70, 0, 1, 3],  # 2 kept, 70 kept, 0 kept, 1 removed (by 0 and 2), 3 removed by 70
    ])
    kept = _greedy_scan(order, suppress)
    assert kept.dtype == bool
    assert kept.tolist() == [
        [True, False, True, True, False],
        [True, False, False, True, False],
        [True, True, True, False, False],
    ]


# ------------------------------------------------------------------------------------------------ hand-computed cases


@BOTH
def test_each_box_gets_its_best_surviving_class(confidence):
    boxes = _boxes((0, 0, 9, 9), (1, 0, 10, 9), (50, 50, 59, 59))  # boxes 0 and 1: IoU 90 / 110
    probs = _probs(
        (0.1, 0.6, 0.3),
        (0.1, 0.2, 0.7),
        (0.5, 0.4, 0.1),  # the background column is never a class, however high
    )
    # class 1: box 0 (0.6) suppresses box 1; class 2: box 1 (0.7) suppresses box 0; box 2 survives in both.
    assert confidence(boxes, probs).tolist() == pytest.approx([0.6, 0.7, 0.4])


@BOTH
def test_a_suppressed_box_suppresses_nothing(confidence):
    # 0-1 and 1-2 overlap with IoU 70 / 130 > 0.5; 0-2 only 40 / 160.
    boxes = _boxes((0, 0, 9, 9), (3, 0, 12, 9), (6, 0, 15, 9))
    probs = _probs((0, 0.9), (0, 0.8), (0, 0.7))
    assert confidence(boxes, probs).tolist() == pytest.approx([0.9, 0, 0.7])


@BOTH
def test_iou_exactly_at_the_threshold_does_not_suppress(confidence):
    boxes = _boxes((0, 0, 9, 9), (0, 0, 19, 9))  # IoU exactly 0.5 with the +1 convention
    probs = _probs((0, 0.9), (0, 0.8))
    assert NMS_THRESHOLD == 0.5
    assert confidence(boxes, probs).tolist() == pytest.approx([0.9, 0.8])
    assert confidence(boxes, probs, threshold=0.49).tolist() == pytest.approx([0.9, 0])


@BOTH
def test_plus_one_convention_decides_suppression(confidence):
    # IoU 12 / 20 = 0.6 with the +1 convention (suppressed); it would be 6 / 12 = 0.5 without (kept).
    boxes = _boxes((0, 0, 3, 3), (1, 0, 4, 3))
    probs = _probs((0, 0.9), (0, 0.8))
    assert confidence(boxes, probs).tolist() == pytest.approx([0.9, 0])


@BOTH
def test_conf_thresh_drops_scores_at_or_below_it(confidence):
    boxes = _boxes((0, 0, 9, 9), (50, 0, 59, 9), (100, 0, 109, 9))
    probs = _probs((0, 0.75, 0.25), (0, 0.5, 0.5), (0, 0.25, 0.0))
    assert confidence(boxes, probs, conf_thresh=0.5).tolist() == pytest.approx([0.75, 0, 0])
    assert confidence(boxes, probs, conf_thresh=0.2).tolist() == pytest.approx([0.75, 0.5, 0.25])


@BOTH
def test_single_box_keeps_its_best_class(confidence):
    boxes = _boxes((5, 5, 20, 30))
    probs = _probs((0.9, 0.05, 0.03, 0.02))
    assert confidence(boxes, probs).tolist() == pytest.approx([0.05])


@BOTH
def test_empty_input(confidence):
    result = confidence(torch.zeros(0, 4), torch.zeros(0, 1601))
    assert result.shape == (0,)


def test_select_regions_of_empty_input():
    keep, scores = select_regions(torch.zeros(0, 4), torch.zeros(0, 1601), 100)
    assert keep.shape == (0,) and scores.shape == (0,)


@BOTH
def test_tied_duplicates_keep_exactly_one(confidence):
    # Identical boxes with identical scores: NMS keeps one of them, the first in index order.
    boxes = _boxes((0, 0, 9, 9), (0, 0, 9, 9), (40, 0, 49, 9), (40, 0, 49, 9))
    probs = _probs((0, 0.5, 0.1), (0, 0.5, 0.1), (0, 0.1, 0.3), (0, 0.1, 0.3))
    assert confidence(boxes, probs).tolist() == pytest.approx([0.5, 0, 0.3, 0])


def test_select_regions_orders_best_first_and_breaks_ties_by_index():
    # Four separate boxes, two of them tied.
    boxes = _boxes((0, 0, 9, 9), (20, 0, 29, 9), (40, 0, 49, 9), (60, 0, 69, 9))
    probs = _probs((0, 0.2), (0, 0.5), (0, 0.9), (0, 0.5))
    keep, scores = select_regions(boxes, probs, 3)
    assert keep.tolist() == [2, 1, 3]
    assert scores.tolist() == pytest.approx([0.9, 0.5, 0.5])
    keep, scores = select_regions(boxes, probs, 10)  # never more than there are
    assert keep.tolist() == [2, 1, 3, 0]


def test_select_regions_keeps_100_by_default():
    boxes, probs = _clusters(seed=3, clusters=40, copies=3, classes=20)
    keep, scores = select_regions(boxes, probs)
    assert keep.shape == (100,) and scores.shape == (100,)


def test_top_leaves_unselectable_boxes_at_zero():
    # Class 1's best is box 0 (0.9), class 2's best is box 1 (0.8): exactly top=2 guaranteed values, floor 0.8.
    # Boxes 2 and 3 cannot be among the two best; box 1 is exact at the floor.
    boxes = _boxes((0, 0, 9, 9), (20, 0, 29, 9), (40, 0, 49, 9), (60, 0, 69, 9))
    probs = _probs((0, 0.9, 0.05), (0, 0.1, 0.8), (0, 0.3, 0.6), (0, 0.7, 0.2))
    assert max_confidence(boxes, probs).tolist() == pytest.approx([0.9, 0.8, 0.6, 0.7])
    assert max_confidence(boxes, probs, top=2).tolist() == pytest.approx([0.9, 0.8, 0, 0])
    assert max_confidence(boxes, probs, top=1).tolist() == pytest.approx([0.9, 0, 0, 0])
    # Fewer guaranteed values than `top`: no floor, every value exact.
    assert max_confidence(boxes, probs, top=3).tolist() == pytest.approx([0.9, 0.8, 0.6, 0.7])
    keep, scores = select_regions(boxes, probs, 1)
    assert keep.tolist() == [0] and scores.tolist() == pytest.approx([0.9])


# ------------------------------------------------------------------------------------------------ against the oracle


def _clusters(seed: int, clusters: int, copies: int, classes: int, step: float | None = None):
    """`clusters` groups of `copies` near-duplicate boxes (IoU well above 0.5 within a group), each group leaning
    to a few classes, so that suppression changes the confidence of many boxes in several classes. With `step`,
    probabilities are rounded to multiples of it, which makes ties common."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(clusters, 2, generator=g) * 600
    size = torch.rand(clusters, 2, generator=g) * 100 + 40
    base = torch.cat([corner, corner + size], 1).repeat_interleave(copies, 0)
    boxes = base + (torch.rand(clusters * copies, 4, generator=g) - 0.5) * 8
    logits = torch.randn(clusters, classes + 1, generator=g).repeat_interleave(copies, 0) * 3
    logits += torch.randn(clusters * copies, classes + 1, generator=g)
    probs = torch.softmax(logits, 1)
    if step is not None:
        probs = (probs / step).round() * step
    order = torch.randperm(len(boxes), generator=g)  # interleave the groups, so neighbours in index differ
    return boxes[order], probs[order]


def _expected_top(loop: torch.Tensor, probs: torch.Tensor, top: int) -> torch.Tensor:
    """The documented result of `max_confidence(..., top=top)`: exact where the loop's value reaches the floor
    (the `top`-th largest of the per-class best scores, each credited to its box), 0 below it."""
    by_class = probs[:, 1:].t()
    best_score, best_box = by_class.max(1)
    guaranteed = torch.zeros(len(probs))
    for score, box in zip(best_score.tolist(), best_box.tolist()):
        guaranteed[box] = max(float(guaranteed[box]), score)
    if top >= len(probs) or int((guaranteed > 0).sum()) < top:
        return loop
    floor = guaranteed.sort(descending=True).values[top - 1]
    return torch.where(loop >= floor, loop, torch.zeros_like(loop))


@pytest.mark.parametrize("seed,clusters,copies,classes", [(0, 60, 5, 30), (1, 25, 8, 200), (2, 90, 2, 1600)])
def test_vectorised_equals_loop_where_suppression_matters(seed, clusters, copies, classes):
    boxes, probs = _clusters(seed, clusters, copies, classes)
    loop = max_confidence_loop(boxes, probs)
    # The data must make NMS matter: many boxes lose their best class to a near-duplicate.
    best_class = probs[:, 1:].max(1).values
    assert int((loop < best_class).sum()) > len(boxes) // 8
    assert torch.equal(max_confidence(boxes, probs), loop)
    for top in (1, 10, 100, len(boxes)):
        assert torch.equal(max_confidence(boxes, probs, top=top), _expected_top(loop, probs, top)), top
    keep, scores = select_regions(boxes, probs, 100)
    expected = loop.sort(descending=True, stable=True).indices[:100]
    assert torch.equal(keep, expected) and torch.equal(scores, loop[expected])


@pytest.mark.parametrize("seed", [4, 5])
def test_vectorised_equals_loop_with_ties(seed):
    boxes, probs = _clusters(seed, clusters=40, copies=4, classes=12, step=0.05)
    loop = max_confidence_loop(boxes, probs)
    assert len(set(loop.tolist())) < len(boxes) // 4  # mostly ties
    assert torch.equal(max_confidence(boxes, probs), loop)
    keep, scores = select_regions(boxes, probs, 50)
    expected = loop.sort(descending=True, stable=True).indices[:50]
    assert torch.equal(keep, expected) and torch.equal(scores, loop[expected])
