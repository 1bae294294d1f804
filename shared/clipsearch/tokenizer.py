"""CLIP tokenizer identical to the reference: its text cleaning, then byte-level BPE, within a 77-token context."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from clipsearch.errors import ModelFilesInvalid

CONTEXT_LENGTH = 77
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizedText:
    """Token ids from <|startoftext|> to <|endoftext|>, not padded; `truncated` if the text did not fit."""

    ids: np.ndarray
    truncated: bool


def clean_text(text: str) -> str:
    """The reference tokenizer's cleaning ('lower'): ftfy, HTML unescaped twice, whitespace collapsed, lowercased.

    ftfy and the unescaping change nothing in printable ASCII without '&' (what most queries are), so such
    text skips them, and a search function's cold start skips importing ftfy (0.06-0.1 s of CPU)."""
    if not (text.isascii() and text.isprintable() and "&" not in text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    def __init__(self, tokenizer: Tokenizer, context_length: int = CONTEXT_LENGTH) -> None:
        start, end = tokenizer.token_to_id(START_OF_TEXT), tokenizer.token_to_id(END_OF_TEXT)
        if start is None or end is None:
            raise ModelFilesInvalid(f"tokenizer has no {START_OF_TEXT} or {END_OF_TEXT} token")
        if context_length < 3:
            raise ValueError(f"context_length must leave room for text, got {context_length}")
        self._tokenizer = tokenizer
        self._start_id = start
        self.end_of_text_id = end
        self.context_length = context_length

    @classmethod
    def from_file(cls, path: Path | str, context_length: int = CONTEXT_LENGTH) -> ClipTokenizer:
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for unreadable files
            raise ModelFilesInvalid(f"{path}: not a tokenizers file ({error})") from error
        return cls(tokenizer, context_length)

    def encode(self, text: str) -> TokenizedText:
        """As the reference: truncation keeps <|endoftext|> as the last of `context_length` ids."""
        body = self._tokenizer.encode(clean_text(text), add_special_tokens=False).ids
        room = self.context_length - 2
        ids = np.empty(min(len(body), room) + 2, dtype=np.int64)
        ids[0] = self._start_id
        ids[1:-1] = body[:room]
        ids[-1] = self.end_of_text_id
        return TokenizedText(ids=ids, truncated=len(body) > room)
