"""Scorer.score_frame: one output row per input row, statuses, truncation, flags."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from memscan.methods.anisotropy import AnisotropyMethod
from memscan.models.loading import ScoringModel
from memscan.scorer import Scorer


def _frame(prompts: list[str | None]) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt": prompts})


def test_every_input_row_gets_a_row_with_status(tiny_model: ScoringModel) -> None:
    long_prompt = " ".join(["memorized"] * 120)
    frame = _frame(["a cat", None, "", "   ", "a cat", long_prompt])
    out = Scorer(tiny_model, AnisotropyMethod()).score_frame(frame)
    assert out["prompt_id"].tolist() == frame["prompt_id"].tolist()
    assert out["status"].tolist() == ["ok", "skipped_empty", "skipped_empty", "skipped_empty", "ok", "ok"]
    assert out["error"].tolist()[:2] == [None, "empty prompt"]
    assert out["truncated"].tolist() == [False, False, False, False, False, True]
    assert np.isnan(out.loc[1:3, "score"]).all()
    assert out.loc[0, "score"] == out.loc[4, "score"]
    assert out["flagged"].isna().all()  # no threshold: unknown, not False


def test_threshold_sets_flagged(tiny_model: ScoringModel) -> None:
    frame = _frame(["a cat", "a red square", "the mona lisa", None])
    scores = Scorer(tiny_model, AnisotropyMethod()).score_frame(frame)["score"]
    cut = float(np.nanmedian(scores))
    out = Scorer(tiny_model, AnisotropyMethod(), threshold=cut).score_frame(frame)
    assert out["flagged"].tolist()[:3] == [s > cut for s in scores[:3]]
    assert pd.isna(out["flagged"].iloc[3])


def test_truncation_matches_the_pipeline(tiny_model: ScoringModel) -> None:
    """A prompt cut at 77 tokens scores like its first 75 tokens (BOS + 75 + EOS)."""
    words = [f"w{i}" for i in range(200)]
    scorer = Scorer(tiny_model, AnisotropyMethod())
    long_score = scorer.score_texts([" ".join(words)])
    ids = tiny_model.tokenizer(" ".join(words), truncation=True, max_length=77).input_ids
    head = tiny_model.tokenizer.decode(ids[1:-1])
    head_score = scorer.score_texts([head])
    assert long_score.truncated.tolist() == [True]
    assert head_score.truncated.tolist() == [False]
    assert long_score.columns["score"][0] == pytest.approx(head_score.columns["score"][0], abs=1e-6)


class _NanMethod(AnisotropyMethod):
    def score(self, model, state, noise, prompt_embeds):  # type: ignore[no-untyped-def]
        values = super().score(model, state, noise, prompt_embeds)
        values["score"] = torch.full_like(values["score"], float("nan"))
        return values


def test_non_finite_scores_get_their_own_status(tiny_model: ScoringModel) -> None:
    out = Scorer(tiny_model, _NanMethod()).score_frame(_frame(["a cat", None]))
    assert out["status"].tolist() == ["nonfinite", "skipped_empty"]
    assert out["error"].iloc[0] == "score is not finite"


def test_noise_bank_is_the_documented_convention(tiny_model: ScoringModel) -> None:
    scorer = Scorer(tiny_model, AnisotropyMethod(), n_noise=3, seed=51)
    expected = torch.randn((3, *tiny_model.latent_shape), generator=torch.Generator("cpu").manual_seed(51))
    torch.testing.assert_close(scorer.noise, expected, rtol=0, atol=0)
    assert tiny_model.latent_shape[0] == 4


class _FaultyMethod(AnisotropyMethod):
    """Injects faults: out-of-memory above `max_batch` prompts, and an error on one embedding."""

    def __init__(self, max_batch: int, poison_value: float | None = None) -> None:
        super().__init__()
        self.max_batch = max_batch
        self.poison_value = poison_value
        self.batches: list[int] = []

    def score(self, model, state, noise, prompt_embeds):  # type: ignore[no-untyped-def]
        self.batches.append(prompt_embeds.shape[0])
        if prompt_embeds.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.poison_value is not None and bool((prompt_embeds[:, 2, 0] == self.poison_value).any()):
            raise RuntimeError("boom\nwith a second line")
        return super().score(model, state, noise, prompt_embeds)


PROMPTS = ["a cat", "a dog", "a red square", "the mona lisa", "a tree", "a boat", "a car"]


def test_out_of_memory_halves_the_batch_and_completes(tiny_model: ScoringModel) -> None:
    clean = Scorer(tiny_model, AnisotropyMethod(), batch_size=8).score_frame(_frame(PROMPTS))
    faulty = _FaultyMethod(max_batch=2)
    scorer = Scorer(tiny_model, faulty, batch_size=8)
    out = scorer.score_frame(_frame(PROMPTS))
    assert out["status"].tolist() == ["ok"] * len(PROMPTS)
    np.testing.assert_allclose(out["score"], clean["score"], atol=1e-5)
    assert faulty.batches[:3] == [7, 4, 2] and scorer.batch_size == 2  # remembered


def test_out_of_memory_at_batch_one_marks_rows_oom(tiny_model: ScoringModel) -> None:
    out = Scorer(tiny_model, _FaultyMethod(max_batch=0), batch_size=4).score_frame(_frame(["a cat", None]))
    assert out["status"].tolist() == ["oom", "skipped_empty"]
    assert "out of memory" in out["error"].iloc[0] and np.isnan(out["score"].iloc[0])


def test_an_error_is_isolated_to_its_prompt(tiny_model: ScoringModel) -> None:
    from memscan.models.text import encode_prompts

    with torch.inference_mode():  # the hidden state of "boat" (position 2) identifies the prompt
        faulty = _FaultyMethod(max_batch=100, poison_value=encode_prompts(tiny_model, ["a boat"])[0, 2, 0].item())
    out = Scorer(tiny_model, faulty, batch_size=4).score_frame(_frame(PROMPTS))
    clean = Scorer(tiny_model, AnisotropyMethod()).score_frame(_frame(PROMPTS))
    bad = PROMPTS.index("a boat")
    assert out["status"].tolist() == ["ok" if i != bad else "error" for i in range(len(PROMPTS))]
    assert out["error"].iloc[bad] == "RuntimeError: boom with a second line"
    good = out["status"] == "ok"
    np.testing.assert_allclose(out["score"][good], clean["score"][good], atol=1e-5)
