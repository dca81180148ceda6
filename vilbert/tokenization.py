"""bert-base-uncased WordPiece tokenisation with the reference's input layout, on the maintained `tokenizers`.

The reference (pytorch-transformers 1.x `BertTokenizer`, do_lower_case=True) cleans control characters,
splits CJK characters, lower-cases, strips accents, splits punctuation, then applies greedy longest-match
WordPiece (words over 100 characters become [UNK]). Model input: [CLS] ids [SEP], truncated so the whole
fits the task's maximum length, segment ids 0, zero padding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import BertWordPieceTokenizer

PACKAGED_VOCAB = Path(__file__).resolve().parent / "data" / "bert-base-uncased-vocab.txt"
PAD_ID = 0
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class EncodedText:
    """One text as model input rows, each of the same length."""

    input_ids: list[int]
    attention_mask: list[int]
    token_type_ids: list[int]


class Tokenizer:
    def __init__(self, vocab_path: str | os.PathLike = PACKAGED_VOCAB):
        vocab_path = Path(vocab_path)
        if not vocab_path.is_file():
            raise FileNotFoundError(f"WordPiece vocabulary not found: {vocab_path}")
        self.vocab_path = vocab_path
        vocab = {line.rstrip("\r\n"): i for i, line in enumerate(vocab_path.read_text(encoding="utf-8").splitlines())}
        for token in SPECIAL_TOKENS:
            if token not in vocab:
                raise ValueError(f"{vocab_path}: vocabulary has no {token} token")
        self._tokenizer = BertWordPieceTokenizer(
            vocab, lowercase=True, strip_accents=True, clean_text=True, handle_chinese_chars=True
        )
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of `text`, without special tokens."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def token_ids(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, max_length: int, pad: bool = True) -> EncodedText:
        """[CLS] + word pieces (cut to max_length - 2) + [SEP], zero-padded to max_length when `pad`."""
        if max_length < 2:
            raise ValueError("max_length must leave room for [CLS] and [SEP]")
        ids = [self.cls_id] + self.token_ids(text)[: max_length - 2] + [self.sep_id]
        mask = [1] * len(ids)
        if pad:
            padding = max_length - len(ids)
            ids += [PAD_ID] * padding
            mask += [0] * padding
        return EncodedText(input_ids=ids, attention_mask=mask, token_type_ids=[0] * len(ids))
