"""Substitutes for a trigger word drawn from real words, ranked by a model that knows what words mean.

A rewrite is text a user publishes, so a substitute must be a word people write. The nearest
neighbours of a token in a text encoder's embedding table are not: on an SD-format model trained
on other captions they read "Snsd Voyage" and "an die sailboat". The candidates here are a word
list (`english`: the 17,096 most frequent English words of wordfreq 3.1.1 that CLIP's BPE
vocabulary holds as whole words, data/words/; or the user's own list, e.g. their caption set's
vocabulary, one word per line), and they are ranked by the similarity model mitigation already
holds a rewrite to (the profile's `text_similarity`: CLIP's pooled text embedding, or a judge),
so "raven" is replaced by a word that model puts near "raven". The word itself, any piece of it
and any word containing it are excluded: they would carry the trigger straight back in.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path

import torch

from memscan.errors import InputError
from memscan.models.loading import ScoringModel
from memscan.paths import data_dir

ENGLISH = "english"
# word-list embeddings by text encoder (weakly: they go with the model), then (similarity, words)
_TABLES: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, tuple[str, ...]], torch.Tensor]] = (
    weakref.WeakKeyDictionary())
POOL_SIZE = 5000  # words of a list used (the list's first ones: the English list is by frequency)


def english_list() -> Path:
    """The shipped list of frequent English words that are whole CLIP tokens, most frequent first."""
    return data_dir() / "words" / "english.txt"


@lru_cache(maxsize=8)
def read_words(source: str, limit: int = POOL_SIZE) -> tuple[str, ...]:
    """The first `limit` distinct alphabetic words of `source` (`english` or a text file, one word
    per line; blank lines and `#` comments skipped), lower-cased."""
    path = english_list() if source == ENGLISH else Path(source).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--substitute-words {source}: cannot read the word list ({exc.__class__.__name__})") from None
    words = [w.strip().lower() for w in lines if w.strip() and not w.lstrip().startswith("#")]
    kept = tuple(dict.fromkeys(w for w in words if w.isalpha() and len(w) >= 2))[:limit]
    if not kept:
        raise InputError(f"--substitute-words {source}: no words in the list (one alphabetic word per line)")
    return kept


class WordSubstitutes:
    """Nearest words of a list to a trigger word, by the cosine of the similarity model's embeddings."""

    def __init__(self, model: ScoringModel, words: Sequence[str], similarity: str) -> None:
        self.model = model
        self.words = list(words)
        self.similarity = similarity

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        from memscan.mitigation.similarity import sentence_embeddings

        return sentence_embeddings(self.model, texts, self.similarity)

    @cached_property
    def _table(self) -> torch.Tensor:
        """The list's embeddings, made once per text encoder, similarity and list: the guard's rewrite
        policy builds a WordSubstitutes per flagged prompt, and the list does not change between them."""
        tables = _TABLES.setdefault(self.model.text_encoder, {})
        key = (self.similarity, tuple(self.words))
        if key not in tables:
            tables[key] = self._embed(self.words)
        return tables[key]

    def substitutes(self, word: str, k: int) -> list[str]:
        """Up to `k` words of the list nearest to `word`, nearest first."""
        lowered = word.lower()
        if k < 1 or not lowered:
            return []
        order = torch.argsort(self._table @ self._embed([lowered])[0], descending=True, stable=True)
        out: list[str] = []
        for index in order.tolist():
            text = self.words[index]
            if text in lowered or lowered in text:  # the word, a piece of it, a word containing it
                continue
            out.append(text)
            if len(out) == k:
                break
        return out
