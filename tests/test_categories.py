"""Region names (issue 14, item 5): the Visual Genome category file, its two layouts, what is refused, and the
words the lexical first stage compares (pure: the mutation check runs these; tests/test_region_labels.py has the
labels in results)."""

from __future__ import annotations

import json

import pytest

from detector.categories import MAX_FILE_BYTES, CategoriesError, CategoryNames, name_terms, synthetic_categories


def released_layout(count: int = 5) -> dict:
    """The released file's layout: object classes only, ids 0..K-2, detector class c = id c - 1."""
    return {"categories": [{"id": i, "name": f"thing{i}", "supercategory": "x"} for i in range(count)]}


def test_the_released_layout_maps_class_c_to_id_c_minus_1():
    names = CategoryNames.from_json(json.dumps(released_layout(5)).encode(), num_classes=6)
    assert names.num_classes == 6
    assert names.labels([0, 1, 2, 5]) == [None, "thing0", "thing1", "thing4"]  # 0 is background
    assert names.label(6) is None and names.label(-1) is None  # outside the detector's range: no name
    shuffled = released_layout(5)
    shuffled["categories"].reverse()  # order in the file does not matter, ids do
    assert CategoryNames.from_json(json.dumps(shuffled).encode(), 6).names == names.names


def test_a_layout_with_a_background_entry_maps_class_c_to_id_c():
    data = {"categories": [{"id": 0, "name": "__background__"}] + [{"id": i, "name": f"n{i}"} for i in range(1, 6)]}
    assert CategoryNames.from_json(json.dumps(data).encode(), 6).labels([1, 5]) == ["n1", "n5"]


@pytest.mark.parametrize("data, message", [
    (b"not json", "not a category file"),
    (b'{"cats": []}', "not a category file"),
    (json.dumps(released_layout(4)).encode(), "this detector has 5 object classes"),  # one short
    (json.dumps(released_layout(6)).encode(), "this detector has 5 object classes"),  # a 0..5 file without background
    (json.dumps({"categories": [{"id": 0, "name": "a"}] * 5}).encode(), "appears twice"),
    (json.dumps({"categories": [{"id": "0", "name": "a"}]}).encode(), "integer id"),
    (json.dumps({"categories": [{"id": i, "name": "" if i == 2 else "a"} for i in range(5)]}).encode(), "unprintable"),
    (json.dumps({"categories": [{"id": i, "name": "a\nb"} for i in range(5)]}).encode(), "unprintable"),
    (b" " * (1 << 20) + b"{}", "more than a category file has"),
])
def test_files_that_do_not_fit_the_detector_are_refused(data, message):
    with pytest.raises(CategoriesError, match=message):
        CategoryNames.from_json(data, num_classes=6)


def test_terms_are_lower_case_words_without_a_plural_s():
    assert name_terms("Two DOGS catch a frisbee, near glass buses!") == [
        "two", "dog", "catch", "a", "frisbee", "near", "glass", "buse"]
    assert name_terms("tennis racket") == ["tenni", "racket"]  # the same rule on both sides, so it still matches
    assert name_terms("") == []


def test_the_synthetic_file_is_in_the_released_layout():
    names = CategoryNames.from_json(synthetic_categories(1601), 1601)
    assert names.num_classes == 1601 and names.label(1) == "man" and all(names.names[1:])


def test_the_refusal_says_what_the_file_has_and_what_the_detector_needs():
    with pytest.raises(CategoriesError) as caught:
        CategoryNames.from_json(json.dumps(released_layout(4)).encode(), num_classes=6, source="cats.json")
    assert str(caught.value) == ("cats.json: 4 categories with ids 0..3; this detector has 5 object classes "
                                 "(ids 0..4, or 0..5 with a background entry)")
    with pytest.raises(CategoriesError) as caught:
        CategoryNames.from_json(b'{"categories": []}', num_classes=6, source="empty.json")
    assert str(caught.value).startswith("empty.json: 0 categories with ids 0..0;")
    shifted = {"categories": [{"id": i, "name": "a"} for i in range(1, 6)]}  # 1-based: refused, not shifted
    with pytest.raises(CategoriesError, match=r": 5 categories with ids 1\.\.5;"):
        CategoryNames.from_json(json.dumps(shifted).encode(), num_classes=6)


def test_every_name_is_checked_and_the_first_bad_one_is_quoted():
    names = [f"n{i}" for i in range(5)]
    for bad in ("", "x" * 65, "tab\there"):
        entries = {"categories": [{"id": i, "name": bad if i == 0 else n} for i, n in enumerate(names)]}
        with pytest.raises(CategoriesError) as caught:  # the first class's name too
            CategoryNames.from_json(json.dumps(entries).encode(), num_classes=6, source="f")
        assert str(caught.value) == f"f: 1 empty, overlong or unprintable name(s), e.g. {bad[:20]!r}"
    longest = {"categories": [{"id": i, "name": "y" * 64} for i in range(5)]}
    assert CategoryNames.from_json(json.dumps(longest).encode(), 6).label(1) == "y" * 64
    with pytest.raises(CategoriesError, match="integer id and a string name"):
        CategoryNames.from_json(json.dumps({"categories": [{"id": 0, "name": 7}]}).encode(), 6)
    with pytest.raises(CategoriesError, match="integer id and a string name"):
        CategoryNames.from_json(json.dumps({"categories": [{"id": True, "name": "a"}]}).encode(), 6)


def test_the_size_limit_is_exact():
    body = json.dumps(released_layout(5)).encode()
    at_limit = b" " * (MAX_FILE_BYTES - len(body)) + body
    assert CategoryNames.from_json(at_limit, 6).label(5) == "thing4"
    with pytest.raises(CategoriesError, match="more than a category file has"):
        CategoryNames.from_json(b" " + at_limit, 6)


def test_a_file_is_read_whole_up_to_the_limit(tmp_path):
    path = tmp_path / "cats.json"
    body = json.dumps(released_layout(5)).encode()
    path.write_bytes(b" " * (MAX_FILE_BYTES - len(body)) + body)  # exactly at the limit: read to its last byte
    assert CategoryNames.from_file(path, 6).labels([1, 5]) == ["thing0", "thing4"]
    accented = json.dumps({"categories": [{"id": i, "name": "café"} for i in range(5)]}, ensure_ascii=False).encode()
    path.write_bytes(b" " * (MAX_FILE_BYTES + 1 - len(accented)) + accented)  # one byte over, fewer characters
    with pytest.raises(CategoriesError) as caught:
        CategoryNames.from_file(path, 6)
    assert str(caught.value).startswith(f"{path}: {MAX_FILE_BYTES + 1} bytes, more than")
    path.write_bytes(b" " * (3 * MAX_FILE_BYTES) + body)  # a huge file: no more than the limit + 1 is read
    with pytest.raises(CategoriesError) as caught:
        CategoryNames.from_file(path, 6)
    assert str(caught.value).startswith(f"{path}: {MAX_FILE_BYTES + 1} bytes, more than")
    path.write_bytes(json.dumps(released_layout(3)).encode())
    with pytest.raises(CategoriesError, match=f"^{path}: 3 categories"):  # the path names the file
        CategoryNames.from_file(str(path), 6)


def test_short_words_keep_their_s():
    assert name_terms("gas is cars bus") == ["gas", "is", "car", "bus"]
