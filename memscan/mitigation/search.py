"""Beam search over text edits, guided by the detection score and held near the original meaning.

Round after round, every candidate in the beam is expanded with single edits at the trigger
words; all new candidates are scored in batches by the same shared-noise `Scorer` that `detect`
uses (so a rewrite's score is exactly what `memscan detect` would give it) and compared to the
original by the cosine of text-encoder sentence vectors (`similarity`). The search stops at the
first round that yields a candidate under the target with similarity at or above
`min_similarity`; else the beam keeps the best candidates by score and the best by similarity,
half each. Of a round's winners the lowest-scored one is kept (`prefer="score"`): a rewrite just
under the threshold still looks like the most memorized clean prompt, and on the demo the
lowest winner stops the copying in 94% of prompts against 90% for the most similar one, at a
mean similarity of 0.85 against 0.89.

A score on one noise bank is a noisy estimate, and a search that sees only that bank learns its
noise: many rewrites just under the target are not under it for other noise. With a `verifier`
(the same scorer on an independent noise bank, usually with more samples) a winner counts only
when the verifier also scores it under the target; winners are verified in order of preference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memscan.mitigation.attribution import TokenAttribution
from memscan.mitigation.edits import Candidate, EditSpace
from memscan.mitigation.similarity import cosine_to, sentence_embeddings
from memscan.scorer import Scorer


@dataclass(frozen=True)
class SearchSettings:
    """How far and how wide to search, and what counts as success."""

    target: float
    min_similarity: float = 0.8
    beam_width: int = 4
    max_edits: int = 4
    n_triggers: int = 7
    similarity: str = "pooled"  # sentence vector of memscan.mitigation.similarity
    prefer: str = "score"  # among a round's winners: the lowest score, or the most similar
    verify_top: int = 8  # winners of a round checked by the verifier, in order of preference


@dataclass(frozen=True)
class Rewrite:
    """The chosen rewrite (or the best attempt) of one prompt."""

    text: str
    score: float
    similarity: float
    edits: tuple[str, ...]
    resolved: bool
    scored: int  # candidates scored for this prompt
    verified: float | None = None  # the verifier's score of `text` (None without a verifier)


class RewriteSearch:
    """Finds, for one prompt at a time, a close rewrite whose score is under the target."""

    def __init__(
        self, scorer: Scorer, edits: EditSpace, settings: SearchSettings, verifier: Scorer | None = None
    ) -> None:
        self.scorer = scorer
        self.edits = edits
        self.settings = settings
        self.verifier = verifier

    def run(self, prompt: str, score: float, attribution: TokenAttribution) -> Rewrite:
        """Search rewrites of `prompt` (scored `score`) around its most attributed words."""
        s = self.settings
        model = self.scorer.model
        reference = sentence_embeddings(model, [prompt], s.similarity)[0]
        triggers = attribution.top_words(s.n_triggers)
        beam = [Candidate.original(attribution.words)]
        seen = {beam[0].text}
        best = Rewrite(prompt, score, 1.0, (), resolved=False, scored=0)
        scored = 0
        for _ in range(s.max_edits):
            fresh = [c for parent in beam for c in self.edits.expand(parent, triggers) if _first(c.text, seen)]
            if not fresh:
                break
            texts = [c.text for c in fresh]
            scores = self.scorer.score_texts(texts).columns["score"].astype(np.float64)
            sims = cosine_to(reference, sentence_embeddings(model, texts, s.similarity))
            scored += len(fresh)
            close = np.isfinite(scores) & (sims >= s.min_similarity)
            winners = np.flatnonzero(close & (scores < s.target)).tolist()
            winners.sort(key=lambda i: _preference(s.prefer, scores, sims, i))
            if winners:
                win, verified = self._verified_winner(fresh, winners)
                if win is not None:
                    return _rewrite(fresh[win], scores[win], sims[win], resolved=True, scored=scored, verified=verified)
            kept = np.flatnonzero(close)
            if kept.size and scores[kept].min() < best.score:
                i = kept[np.argmin(scores[kept])]
                best = _rewrite(fresh[i], scores[i], sims[i], resolved=False, scored=scored)
            beam = [fresh[i] for i in _select(kept, scores, sims, s.beam_width)]
            if not beam:
                break
        verified = float(self._verify([best.text])[0]) if self.verifier is not None else None
        return Rewrite(best.text, best.score, best.similarity, best.edits, False, scored, verified)

    def _verify(self, texts: list[str]) -> np.ndarray:
        assert self.verifier is not None
        return self.verifier.score_texts(texts).columns["score"].astype(np.float64)

    def _verified_winner(self, fresh: list[Candidate], winners: list[int]) -> tuple[int | None, float | None]:
        """The first of `winners` the verifier also puts under the target (all pass without one)."""
        if self.verifier is None:
            return winners[0], None
        checked = winners[: self.settings.verify_top]
        for i, value in zip(checked, self._verify([fresh[i].text for i in checked]), strict=True):
            if value < self.settings.target:
                return i, float(value)
        return None, None


def _preference(prefer: str, scores: np.ndarray, sims: np.ndarray, i: int) -> tuple[float, float, int]:
    """Sort key of a round's winners: most similar first, or lowest score (farthest from memorized) first."""
    return (scores[i], -sims[i], i) if prefer == "score" else (-sims[i], scores[i], i)


def _first(text: str, seen: set[str]) -> bool:
    """True the first time `text` is met (candidates reached by two edit paths are scored once)."""
    if text in seen:
        return False
    seen.add(text)
    return True


def _rewrite(
    candidate: Candidate, score: float, similarity: float, *, resolved: bool, scored: int, verified: float | None = None
) -> Rewrite:
    return Rewrite(candidate.text, float(score), float(similarity), candidate.edits, resolved, scored, verified)


def _select(indices: Sequence[int] | np.ndarray, scores: np.ndarray, sims: np.ndarray, width: int) -> list[int]:
    """Up to `width` indices: the lowest scores and the highest similarities, half each, no repeats."""
    by_score = sorted(indices, key=lambda i: (scores[i], -sims[i], i))
    by_similarity = sorted(indices, key=lambda i: (-sims[i], scores[i], i))
    chosen: list[int] = []
    for i in [*by_score[: (width + 1) // 2], *by_similarity]:
        if i not in chosen:
            chosen.append(int(i))
        if len(chosen) == width:
            break
    return chosen
