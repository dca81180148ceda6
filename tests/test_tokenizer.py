"""Tokenizer ids equal the reference BertTokenizer(do_lower_case=True) algorithm on tricky text.

`reference_ids` below is an independent, plain-Python rendering of that algorithm (clean text, CJK split,
lower-case, accent strip, punctuation split, greedy longest-match WordPiece with a 100-character limit, special
tokens kept whole), used as the oracle for the `tokenizers`-based implementation.
"""

from __future__ import annotations

import unicodedata

import pytest

from vilbert.tokenization import PACKAGED_VOCAB, Tokenizer

SPECIAL = ["[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"]


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                             (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)])


def _basic_tokens(text: str) -> list[str]:
    cleaned = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
            continue
        cleaned.append(" " if ch in " \t\n\r" or unicodedata.category(ch) == "Zs" else ch)
    text = "".join(f" {c} " if _is_cjk(ord(c)) else c for c in cleaned)
    out = []
    for word in text.split():
        if word in SPECIAL:
            out.append(word)
            continue
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        current = ""
        for ch in word:
            if _is_punctuation(ch):
                if current:
                    out.append(current)
                out.append(ch)
                current = ""
            else:
                current += ch
        if current:
            out.append(current)
    return out


def reference_ids(text: str, vocab: dict[str, int]) -> list[int]:
    ids = []
    for token in _basic_tokens(text):
        if token in SPECIAL:
            ids.append(vocab[token])
            continue
        if len(token) > 100:
            ids.append(vocab["[UNK]"])
            continue
        pieces, start = [], 0
        while start < len(token):
            end, piece = len(token), None
            while start < end:
                candidate = ("##" if start else "") + token[start:end]
                if candidate in vocab:
                    piece = candidate
                    break
                end -= 1
            if piece is None:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[piece])
            start = end
        ids.extend(pieces)
    return ids


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    return {line.rstrip("\n"): i for i, line in enumerate(PACKAGED_VOCAB.read_text(encoding="utf-8").splitlines())}


TRICKY = [
    "swimming elephant",
    "What color is the man's shirt?",
    "Café naïve résumé — Ångström, São Paulo, Zürich!",
    "Is there a 3-legged dog??? (yes/no)",
    "ÉCOLE NORMALE",
    "unaffable hyper-realistic antidisestablishmentarianism",
    "东京 and 北京 are cities",
    "tabs\tand\nnewlines\r\n  spaces",
    "emoji 🐘 and control \x00\x07 chars",
    "[SEP] inside the text and [cls] lower-case",
    "a" * 120,
    "x" * 100 + " y",
    "",
]


@pytest.mark.parametrize("text", TRICKY)
def test_ids_equal_reference_algorithm(tokenizer, vocab, text):
    assert tokenizer.token_ids(text) == reference_ids(text, vocab)


def test_known_ids(tokenizer):
    encoded = tokenizer.encode("Hello, World!", max_length=8)
    assert encoded.input_ids == [101, 7592, 1010, 2088, 999, 102, 0, 0]
    assert encoded.attention_mask == [1, 1, 1, 1, 1, 1, 0, 0]
    assert encoded.token_type_ids == [0] * 8
    assert tokenizer.vocab_size == 30522


def test_accents_are_stripped(tokenizer):
    assert tokenizer.token_ids("café") == tokenizer.token_ids("cafe")
    assert tokenizer.tokenize("RÉSUMÉ") == ["resume"]


def test_long_input_is_truncated_to_the_task_length(tokenizer):
    text = " ".join(["elephant"] * 60)
    encoded = tokenizer.encode(text, max_length=23)
    assert len(encoded.input_ids) == 23
    assert encoded.input_ids[0] == 101 and encoded.input_ids[-1] == 102
    assert encoded.attention_mask == [1] * 23
    unpadded = tokenizer.encode("a red car", max_length=23, pad=False)
    assert unpadded.input_ids == [101, 1037, 2417, 2482, 102]


def test_missing_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocabulary"):
        Tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "vocab.txt").write_text("[PAD]\nfoo\n")
    with pytest.raises(ValueError, match=r"has no \[UNK\] token"):
        Tokenizer(tmp_path / "vocab.txt")


def test_max_length_must_leave_room_for_cls_and_sep(tokenizer):
    for max_length in (1, 0, -5):
        with pytest.raises(ValueError) as err:
            tokenizer.encode("a red car", max_length=max_length)
        assert str(err.value) == "max_length must leave room for [CLS] and [SEP]"
    # Exactly room for the two special tokens: every word piece is cut.
    encoded = tokenizer.encode("a red car", max_length=2)
    assert encoded.input_ids == [101, 102]
    assert encoded.attention_mask == [1, 1] and encoded.token_type_ids == [0, 0]
    # One more: the first word piece fits.
    assert tokenizer.encode("a red car", max_length=3).input_ids == [101, 1037, 102]


def test_text_that_fits_exactly_is_not_cut(tokenizer):
    # "a red car" is 3 word pieces: with [CLS] and [SEP] exactly 5.
    encoded = tokenizer.encode("a red car", max_length=5)
    assert encoded.input_ids == [101, 1037, 2417, 2482, 102]
    assert encoded.attention_mask == [1] * 5 and encoded.token_type_ids == [0] * 5
    padded = tokenizer.encode("a red car", max_length=7)
    assert padded.input_ids == [101, 1037, 2417, 2482, 102, 0, 0]
    assert padded.attention_mask == [1, 1, 1, 1, 1, 0, 0] and padded.token_type_ids == [0] * 7


def test_unpadded_rows_all_have_the_text_length(tokenizer):
    encoded = tokenizer.encode("a red car", max_length=23, pad=False)
    assert encoded.attention_mask == [1] * 5 and encoded.token_type_ids == [0] * 5


def test_vocab_errors_name_the_file(tmp_path):
    path = tmp_path / "vocab.txt"
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer(path)
    assert str(err.value) == f"WordPiece vocabulary not found: {path}"
    # Every special token is required, each reported by name; a vocabulary that has them all loads.
    for missing in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        path.write_text("\n".join(t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red") if t != missing))
        with pytest.raises(ValueError) as err:
            Tokenizer(str(path))
        assert str(err.value) == f"{path}: vocabulary has no {missing} token"


def test_small_vocabulary_ids_follow_its_lines(tmp_path):
    # Windows line endings and a non-ASCII (CJK) token: ids are line numbers, tokens are the lines without "\r\n".
    # Lines that differ from "red" only by a trailing space or "X" are tokens of their own: they must not take
    # "red"'s id. (This test builds its own Tokenizer, so it also pins the normaliser settings: the module-scoped
    # fixture above is built once, inside whichever test runs first.)
    path = tmp_path / "vocab.txt"
    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "car", "##s", "uber", "东", "京", "red ", "redX"]
    path.write_bytes("\r\n".join(lines).encode("utf-8") + b"\r\n")
    tokenizer = Tokenizer(path)
    assert tokenizer.vocab_path == path
    assert tokenizer.vocab_size == len(lines)
    assert (tokenizer.cls_id, tokenizer.sep_id) == (2, 3)
    # Lower-casing, accent stripping, control-character cleaning and CJK splitting each decide one token here.
    assert tokenizer.tokenize("Red CARS\x07 Über东京blue") == ["red", "car", "##s", "uber", "东", "京", "[UNK]"]
    assert tokenizer.encode("red cars", max_length=6).input_ids == [2, 5, 6, 7, 3, 0]
