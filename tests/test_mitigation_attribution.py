"""Token attribution: differentiable scores equal the scorer's, gradients are right, words map back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memscan.methods.anisotropy import AnisotropyMethod
from memscan.mitigation.attribution import attribute, word_token_ids
from memscan.mitigation.differentiable import DifferentiableScore
from memscan.models.loading import ScoringModel
from memscan.models.text import encode_prompts, tokenize
from memscan.scorer import Scorer

PROMPTS = ["the mona lisa by leonardo da vinci", "A clocktower, at night!"]


@pytest.fixture(scope="module")
def scoring(tiny_model: ScoringModel) -> DifferentiableScore:
    return DifferentiableScore(Scorer(tiny_model, AnisotropyMethod(w_norm=1.0, w_align=2.0), n_noise=2))


def test_differentiable_score_equals_the_scorer(scoring: DifferentiableScore) -> None:
    expected = scoring.scorer.score_texts(PROMPTS).columns["score"]
    tokens = tokenize(scoring.model, PROMPTS)
    via_tokens = scoring.of_token_embeds(tokens, scoring.token_embeddings(tokens))["score"]
    with torch.no_grad():
        via_embeds = scoring.of_prompt_embeds(encode_prompts(scoring.model, PROMPTS))["score"]
    np.testing.assert_allclose(via_tokens.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(via_embeds.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_attribution_is_the_gradient_norm(scoring: DifferentiableScore) -> None:
    """A central difference along the top token's gradient is |gradient|, the attribution."""
    (result,) = attribute(scoring, PROMPTS[:1])
    top = int(np.argmax(result.token_scores))
    tokens = tokenize(scoring.model, PROMPTS[:1])
    base = scoring.token_embeddings(tokens)
    embeds = base.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(scoring.of_token_embeds(tokens, embeds)["score"].sum(), embeds)
    direction = torch.zeros_like(base)
    direction[0, 1 + top] = grad[0, 1 + top] / grad[0, 1 + top].norm()
    h = 1e-3  # the UNet output is read in float32: a smaller step drowns in rounding
    with torch.no_grad():
        up = scoring.of_token_embeds(tokens, base + h * direction)["score"].item()
        down = scoring.of_token_embeds(tokens, base - h * direction)["score"].item()
    assert (up - down) / (2 * h) == pytest.approx(result.token_scores[top], rel=1e-3)


def test_tokens_map_to_their_words(scoring: DifferentiableScore) -> None:
    results = attribute(scoring, PROMPTS, batch_size=1)
    second = results[1]
    assert second.words == ("A", "clocktower,", "at", "night!")
    pieces = word_token_ids(scoring.model, second.words)
    assert len(second.tokens) == sum(len(p) for p in pieces)
    assert second.token_word == tuple(w for w, p in enumerate(pieces) for _ in p)
    assert "clock" in second.tokens and "tower" in second.tokens
    assert (second.token_scores > 0).all()
    scores = second.word_scores()
    assert second.top_words(2) == [int(i) for i in np.argsort(-scores)[:2]]
    assert second.top_tokens(1) == [second.tokens[int(np.argmax(second.token_scores))]]
    batched = attribute(scoring, PROMPTS, batch_size=2)
    np.testing.assert_allclose(batched[1].token_scores, second.token_scores, rtol=1e-4)


def test_truncated_prompt_attributes_only_what_the_encoder_sees(scoring: DifferentiableScore) -> None:
    (result,) = attribute(scoring, [" ".join(["memorized"] * 100)])
    assert len(result.tokens) == 75
    assert result.word_scores()[80] == 0.0
