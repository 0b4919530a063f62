"""Fixtures for the data tests."""

from __future__ import annotations

import pytest


class WordTokenizer:
    """One id per word (ids from 10), start token 1: token ids a test can predict by hand."""

    sot_token_id = 1

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]


@pytest.fixture
def word_tokenizer() -> WordTokenizer:
    return WordTokenizer()
