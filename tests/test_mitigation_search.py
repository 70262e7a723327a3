"""Rewrite search: scores of rewrites are detect's scores, statuses, determinism, the similarity bar."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from memscan.config import DetectSettings
from memscan.detect import build_scorer, detect
from memscan.errors import UsageError
from memscan.mitigation import VERIFY_SEED_OFFSET, MitigateSettings, rewrite_prompts
from memscan.mitigation.attribution import attribute
from memscan.mitigation.differentiable import DifferentiableScore
from memscan.mitigation.edits import EditSpace
from memscan.mitigation.search import RewriteSearch, SearchSettings
from memscan.mitigation.similarity import cosine_to, pooled_embeddings, sentence_embeddings
from memscan.models.loading import ScoringModel

PROMPTS = [
    "the mona lisa by leonardo da vinci",
    "a photo of a cat",
    "a red square on a blue background",
    "   ",
    "The No Limits Business Woman Podcast",
]
SMALL = {"beam_width": 2, "max_edits": 2, "n_substitutes": 3, "insert_words": ("photo",)}


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS})


@pytest.fixture(scope="module")
def target(tiny_model: ScoringModel) -> float:
    """Between the 2nd and 3rd highest score: two prompts flagged."""
    scores = sorted(build_scorer(DetectSettings(), tiny_model).score_texts([p for p in PROMPTS if p.strip()])
                    .columns["score"])
    return float((scores[-2] + scores[-3]) / 2)


@pytest.fixture(scope="module")
def rewritten(tiny_model: ScoringModel, target: float) -> pd.DataFrame:
    scorer = build_scorer(DetectSettings(), tiny_model)
    rows, _ = rewrite_prompts(scorer, _frame(), target, MitigateSettings(min_similarity=0.0, **SMALL))
    return rows


def test_statuses_and_unchanged_rows(rewritten: pd.DataFrame, target: float) -> None:
    status = rewritten["status"].tolist()
    assert status[3] == "skipped_empty" and pd.isna(rewritten.at[3, "rewritten"])
    flagged = rewritten["score_before"] > target
    assert set(rewritten.loc[flagged, "status"]) <= {"ok", "unresolved"} and flagged.sum() == 2
    calm = rewritten[(rewritten["status"] == "not_flagged")]
    assert len(calm) == 2
    assert (calm["rewritten"] == calm["prompt"]).all() and (calm["score_after"] == calm["score_before"]).all()
    assert (calm["similarity"] == 1.0).all() and calm["edits"].map(len).eq(0).all()
    ok = rewritten[rewritten["status"] == "ok"]
    assert len(ok) >= 1
    assert (ok["score_after"] < target).all() and (ok["rewritten"] != ok["prompt"]).all()
    assert ok["edits"].map(len).between(1, SMALL["max_edits"]).all()
    assert ok["trigger_tokens"].map(len).eq(3).all()


def test_score_after_is_what_detect_gives_the_rewrite(
    rewritten: pd.DataFrame, tiny_model: ScoringModel, tmp_path: Path
) -> None:
    done = rewritten[rewritten["status"].isin(["ok", "unresolved", "not_flagged"])]
    path = tmp_path / "rewrites.csv"
    done[["prompt_id", "rewritten"]].rename(columns={"rewritten": "prompt"}).to_csv(path, index=False)
    scores = detect(path, None, DetectSettings(id_column="prompt_id"), model=tiny_model).scores
    np.testing.assert_allclose(done["score_after"].to_numpy(), scores["score"].to_numpy(), rtol=1e-6, atol=1e-6)


def test_similarity_is_pooled_cosine(rewritten: pd.DataFrame, tiny_model: ScoringModel) -> None:
    row = rewritten[rewritten["status"] == "ok"].iloc[0]
    pooled = pooled_embeddings(tiny_model, [row["prompt"], row["rewritten"]])
    assert row["similarity"] == pytest.approx(cosine_to(pooled[0], pooled[1:])[0], abs=1e-6)


def test_deterministic(tiny_model: ScoringModel, target: float, rewritten: pd.DataFrame) -> None:
    scorer = build_scorer(DetectSettings(), tiny_model)
    again, _ = rewrite_prompts(scorer, _frame(), target, MitigateSettings(min_similarity=0.0, **SMALL))
    pd.testing.assert_frame_equal(again, rewritten)


def test_similarity_bar_leaves_prompts_unresolved(tiny_model: ScoringModel, target: float) -> None:
    """No rewrite can be as similar as the original itself: with the bar at 1.0 nothing resolves."""
    scorer = build_scorer(DetectSettings(), tiny_model)
    rows, timing = rewrite_prompts(scorer, _frame(), target, MitigateSettings(min_similarity=0.99999, **SMALL))
    flagged = rows[rows["score_before"] > target]
    assert (flagged["status"] == "unresolved").all()
    assert (flagged["similarity"] >= 0.99999).all()  # the best attempt also respects the bar
    assert timing["seconds_per_prompt"] > 0


def test_rewrites_are_confirmed_on_an_independent_noise_bank(
    rewritten: pd.DataFrame, tiny_model: ScoringModel, target: float
) -> None:
    """`score_verified` is the detect score on the verifier's bank, and every ok rewrite is under it."""
    ok = rewritten[rewritten["status"] == "ok"]
    settings = MitigateSettings()
    verifier = build_scorer(DetectSettings(n_noise=settings.verify_noise, seed=51 + VERIFY_SEED_OFFSET), tiny_model)
    expected = verifier.score_texts(ok["rewritten"].tolist()).columns["score"]
    np.testing.assert_allclose(ok["score_verified"].to_numpy(), expected, rtol=1e-6, atol=1e-6)
    assert (ok["score_verified"] < target).all()
    assert rewritten.loc[rewritten["status"] == "not_flagged", "score_verified"].isna().all()


class _Refuses:
    """A verifier that scores every text far above any target."""

    def score_texts(self, texts: list[str]) -> SimpleNamespace:
        return SimpleNamespace(columns={"score": np.full(len(texts), 1e9)})


def test_a_verifier_that_refuses_leaves_prompts_unresolved(tiny_model: ScoringModel, target: float) -> None:
    scorer = build_scorer(DetectSettings(), tiny_model)
    search = RewriteSearch(scorer, EditSpace(lambda word, k: [], insert_words=("photo",)),
                           SearchSettings(target=target, min_similarity=0.0, max_edits=2), verifier=_Refuses())
    prompt = PROMPTS[-1]
    score = float(scorer.score_texts([prompt]).columns["score"][0])
    assert score > target
    unguarded = RewriteSearch(scorer, search.edits, search.settings)
    attribution = attribute(DifferentiableScore(scorer), [prompt])[0]
    assert unguarded.run(prompt, score, attribution).resolved  # a rewrite exists on the search's bank
    found = search.run(prompt, score, attribution)
    assert not found.resolved and found.verified == 1e9


def test_no_verification_when_verify_noise_is_zero(tiny_model: ScoringModel, target: float) -> None:
    scorer = build_scorer(DetectSettings(), tiny_model)
    rows, _ = rewrite_prompts(scorer, _frame(), target, MitigateSettings(min_similarity=0.0, verify_noise=0, **SMALL))
    assert rows["score_verified"].isna().all() and (rows["status"] == "ok").any()


def test_similarity_follows_the_chosen_sentence_vector(tiny_model: ScoringModel, target: float) -> None:
    """--similarity tokens (or a profile's text_similarity) is the cosine the bar and the column use."""
    scorer = build_scorer(DetectSettings(), tiny_model)
    assert tiny_model.profile.text_similarity == "pooled"
    rows, _ = rewrite_prompts(scorer, _frame(), target,
                              MitigateSettings(min_similarity=0.0, similarity="tokens", verify_noise=0, **SMALL))
    row = rows[rows["status"] == "ok"].iloc[0]
    vectors = sentence_embeddings(tiny_model, [row["prompt"], row["rewritten"]], "tokens")
    assert row["similarity"] == pytest.approx(cosine_to(vectors[0], vectors[1:])[0], abs=1e-6)
    pooled = pooled_embeddings(tiny_model, [row["prompt"], row["rewritten"]])
    assert abs(cosine_to(pooled[0], pooled[1:])[0] - row["similarity"]) > 1e-4


def test_prefer_score_keeps_the_lowest_scored_winner_of_the_round(tiny_model: ScoringModel, target: float) -> None:
    scorer = build_scorer(DetectSettings(), tiny_model)
    common = {"min_similarity": 0.0, "verify_noise": 0, **SMALL}
    closest, _ = rewrite_prompts(scorer, _frame(), target, MitigateSettings(prefer="similarity", **common))
    lowest, _ = rewrite_prompts(scorer, _frame(), target, MitigateSettings(**common))  # the default
    ok = (closest["status"] == "ok") & (lowest["status"] == "ok")
    assert ok.sum() >= 1
    assert (closest.loc[ok, "edits"].map(len) == lowest.loc[ok, "edits"].map(len)).all()  # the same round
    assert (lowest.loc[ok, "score_after"] <= closest.loc[ok, "score_after"] + 1e-6).all()
    assert (lowest.loc[ok, "similarity"] <= closest.loc[ok, "similarity"] + 1e-6).all()
    assert (lowest.loc[ok, "rewritten"] != closest.loc[ok, "rewritten"]).any()
    with pytest.raises(UsageError, match="--prefer"):
        MitigateSettings(prefer="shortest")
