"""Embedding optimisation: the score drops under the target; saved tensors are diffusers-shaped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memscan.config import DetectSettings
from memscan.detect import build_scorer
from memscan.mitigation.differentiable import DifferentiableScore
from memscan.mitigation.embeddings import load_embeddings, optimise_embedding, save_embeddings
from memscan.models.loading import ScoringModel
from memscan.models.text import encode_prompts

PROMPT = "the mona lisa by leonardo da vinci"


@pytest.fixture(scope="module")
def scoring(tiny_model: ScoringModel) -> DifferentiableScore:
    return DifferentiableScore(build_scorer(DetectSettings(), tiny_model))


def test_optimisation_reaches_the_target_and_keeps_bos(scoring: DifferentiableScore) -> None:
    before = float(scoring.scorer.score_texts([PROMPT]).columns["score"][0])
    result = optimise_embedding(scoring, PROMPT, before - 0.05, steps=50, lr=0.05)
    assert result.resolved and result.score < before - 0.05 and 1 <= result.steps <= 50
    original = encode_prompts(scoring.model, [PROMPT])
    assert result.embeds.shape == original.shape == (1, 77, original.shape[-1])
    assert torch.equal(result.embeds[:, 0], original[:, 0])  # BOS untouched
    assert not torch.equal(result.embeds[:, 1:], original[:, 1:])
    with torch.inference_mode():  # the reported score is the saved embedding's score
        again = scoring.method.score(scoring.model, scoring.scorer.state, scoring.noise, result.embeds)["score"]
    assert float(again[0]) == pytest.approx(result.score, abs=1e-5)


def test_already_under_target_takes_no_step(scoring: DifferentiableScore) -> None:
    result = optimise_embedding(scoring, PROMPT, 1e9, steps=10)
    assert result.steps == 0 and result.resolved
    assert torch.equal(result.embeds, encode_prompts(scoring.model, [PROMPT]))


def test_budget_is_respected(scoring: DifferentiableScore) -> None:
    result = optimise_embedding(scoring, PROMPT, -1e9, steps=3)
    assert result.steps == 3 and not result.resolved


def test_an_embedding_counts_only_when_the_verifier_agrees(scoring: DifferentiableScore) -> None:
    """The verifier's noise bank is independent: optimisation goes on until it agrees too."""
    from memscan.mitigation import verifier_for

    before = float(scoring.scorer.score_texts([PROMPT]).columns["score"][0])
    target = before - 0.05
    plain = optimise_embedding(scoring, PROMPT, target, steps=50, require_norm=False)
    checked = optimise_embedding(scoring, PROMPT, target, steps=50, require_norm=False,
                                 verifier=DifferentiableScore(verifier_for(scoring.scorer, 2)))
    assert plain.verified is None and checked.resolved
    assert checked.verified is not None and checked.verified < target and checked.steps >= plain.steps

    class Disagrees:  # a verifier that never puts anything under the target
        def of_prompt_embeds(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"score": torch.tensor([1e9])}

    budget = plain.steps + 2
    stuck = optimise_embedding(scoring, PROMPT, target, steps=budget, verifier=Disagrees(),  # type: ignore[arg-type]
                               require_norm=False)
    assert stuck.steps == budget and not stuck.resolved and stuck.verified == 1e9


def test_save_and_load_by_prompt_id(tmp_path: Path) -> None:
    tensors = {"a:0": torch.randn(1, 77, 32), "b/1": torch.randn(1, 77, 32)}
    path = tmp_path / "embeds.safetensors"
    save_embeddings(path, tensors, {"model": "tiny", "target": 0.5})
    loaded = load_embeddings(path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert '"target": 0.5' in handle.metadata()["memscan"]


def test_the_norm_term_must_fall_as_well(scoring: DifferentiableScore) -> None:
    """A calibrated score can fall through the alignment alone; the norm term must reach the value
    that would put the original prompt under the target by itself."""
    columns = scoring.scorer.score_texts([PROMPT]).columns
    before, alignment = float(columns["score"][0]), float(columns["alignment"][0])
    target = before - 0.05
    method = scoring.method
    free = optimise_embedding(scoring, PROMPT, target, steps=60, require_norm=False, similarity_weight=0.0)
    bound = optimise_embedding(scoring, PROMPT, target, steps=60, similarity_weight=0.0)
    assert free.norm_limit is None and free.resolved
    assert bound.norm_limit == pytest.approx(target - method.w_align * alignment, abs=1e-5)
    assert bound.resolved and bound.norm_term < bound.norm_limit and bound.score < target
    assert bound.steps >= free.steps
    with torch.inference_mode():
        again = scoring.method.score(scoring.model, scoring.scorer.state, scoring.noise, bound.embeds)
    assert float(method.w_norm * again["norm"][0]) == pytest.approx(bound.norm_term, abs=1e-5)


def test_the_similarity_pull_keeps_the_embedding_closer(scoring: DifferentiableScore) -> None:
    target = float(scoring.scorer.score_texts([PROMPT]).columns["score"][0]) - 0.9  # a few steps away
    loose = optimise_embedding(scoring, PROMPT, target, steps=40, require_norm=False, similarity_weight=0.0)
    pulled = optimise_embedding(scoring, PROMPT, target, steps=40, require_norm=False, similarity_weight=20.0)
    assert loose.resolved and pulled.resolved and loose.steps > 1
    assert loose.similarity < 1.0 and pulled.similarity > loose.similarity
    assert optimise_embedding(scoring, PROMPT, 1e9, steps=5).similarity == pytest.approx(1.0)


def test_embedding_cosine_leaves_bos_out() -> None:
    from memscan.mitigation.embeddings import embedding_cosine

    a = torch.randn(1, 77, 8)
    b = a.clone()
    b[:, 0] += 100.0
    assert float(embedding_cosine(a, b)) == pytest.approx(1.0)
    b[:, 1:] = -a[:, 1:]
    assert float(embedding_cosine(a, b)) == pytest.approx(-1.0)


def test_depth_aims_further_under_the_target(scoring: DifferentiableScore) -> None:
    before = float(scoring.scorer.score_texts([PROMPT]).columns["score"][0])
    target = before - 0.3
    shallow = optimise_embedding(scoring, PROMPT, target, steps=100, lr=0.01, require_norm=False)
    deep = optimise_embedding(scoring, PROMPT, target, steps=100, lr=0.01, require_norm=False, depth=1.0)
    assert shallow.resolved and deep.resolved and shallow.score < target
    assert deep.score < target - 1.0 * (before - target) < shallow.score  # aimed at before - 0.6
    assert deep.steps > shallow.steps
