"""Substitutes from real words: the shipped English list, a user's list, ranked by the similarity model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memscan.errors import InputError
from memscan.mitigation.similarity import sentence_embeddings
from memscan.mitigation.words import POOL_SIZE, WordSubstitutes, english_list, read_words
from memscan.models.loading import ScoringModel


def test_the_english_list_is_frequent_whole_clip_words() -> None:
    import json

    from memscan.paths import tokenizer_dir

    words = english_list().read_text(encoding="utf-8").split()
    assert 15_000 < len(words) < 20_000 and words[:3] == ["the", "and", "for"]
    vocab = json.loads((tokenizer_dir() / "vocab.json").read_text(encoding="utf-8"))
    assert all(f"{w}</w>" in vocab and w.isalpha() and w.isascii() for w in words)
    assert len(set(words)) == len(words) and "snsd" not in words
    assert read_words("english") == tuple(words[:POOL_SIZE])


def test_a_user_list_skips_comments_blanks_and_non_words(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("# my captions\nSunset\n\nharbour\nsunset\nx\nr2d2\nboat\n", encoding="utf-8")
    assert read_words(str(path)) == ("sunset", "harbour", "boat")
    assert read_words(str(path), 2) == ("sunset", "harbour")
    (tmp_path / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="no words"):
        read_words(str(tmp_path / "empty.txt"))
    with pytest.raises(InputError, match="cannot read"):
        read_words(str(tmp_path / "missing.txt"))


def test_substitutes_are_list_words_nearest_first_never_the_word_or_its_pieces(tiny_model: ScoringModel) -> None:
    words = ["tower", "towers", "clock", "clocktower", "harbour", "boat", "meadow", "lantern", "river", "stone"]
    subs = WordSubstitutes(tiny_model, words, "pooled")
    found = subs.substitutes("Clocktower", 5)
    assert len(found) == 5 and not {"tower", "clock", "clocktower"} & set(found) and set(found) <= set(words)
    query = sentence_embeddings(tiny_model, ["clocktower"], "pooled")[0]
    cosines = (sentence_embeddings(tiny_model, found, "pooled") @ query).numpy()
    assert np.all(np.diff(cosines) <= 1e-6)  # nearest first
    assert subs.substitutes("tower", 20) == [w for w in subs.substitutes("tower", 20) if "tower" not in w]
    assert "towers" not in subs.substitutes("tower", 20) and subs.substitutes("", 3) == []


def test_mitigate_substitutes_come_from_the_list(tiny_model: ScoringModel, tmp_path: Path) -> None:
    """Every substitute the search can try is a word of the list; `embedding` keeps the old source."""
    from memscan.config import DetectSettings
    from memscan.detect import build_scorer
    from memscan.mitigation import MitigateSettings, substitutes_for
    from memscan.mitigation.edits import Candidate, EditSpace

    allowed = {"meadow", "lantern", "river", "stone", "garden"}
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(sorted(allowed)), encoding="utf-8")
    settings = MitigateSettings(substitute_words=str(vocab))
    assert Path(settings.substitute_words).is_absolute()
    scorer = build_scorer(DetectSettings(), tiny_model)
    words = "the golden harbour of lindale at dawn".split()
    space = EditSpace(substitutes_for(scorer, settings.substitute_words, "pooled"), n_substitutes=3)
    edits = [e for c in space.expand(Candidate.original(words), range(len(words))) for e in c.edits]
    substituted = [e.split('-> "')[1].rstrip('"') for e in edits if e.startswith("substitute")]
    assert len(substituted) == 3 * len(words) and set(substituted) <= allowed
    table = EditSpace(substitutes_for(scorer, "embedding", "pooled"), n_substitutes=3)
    assert table.substitutes("harbour") and not set(table.substitutes("harbour")) <= allowed


def test_a_bad_word_list_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    from memscan.mitigation import MitigateSettings

    with pytest.raises(InputError, match="cannot read"):
        MitigateSettings(substitute_words=str(tmp_path / "nope.txt"))


def test_the_list_is_embedded_once_per_model_similarity_and_list(tiny_model: ScoringModel, monkeypatch) -> None:
    """The guard builds a WordSubstitutes per flagged prompt: the word list's embeddings are reused."""
    words = ["meadow", "lantern", "river", "stone", "garden", "harbour"]
    first = WordSubstitutes(tiny_model, words, "pooled")
    expected = first.substitutes("tower", 3)
    calls: list[int] = []
    embed = WordSubstitutes._embed
    monkeypatch.setattr(WordSubstitutes, "_embed", lambda self, texts: calls.append(len(texts)) or embed(self, texts))
    again = WordSubstitutes(tiny_model, words, "pooled")
    assert again.substitutes("tower", 3) == expected and calls == [1]  # only the query word was embedded
    WordSubstitutes(tiny_model, words, "tokens").substitutes("tower", 3)
    assert calls == [1, len(words), 1]  # another similarity: its own table
