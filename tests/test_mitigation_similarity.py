"""Sentence vectors of the text encoder: the pooled EOS state and the mean of the token states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memscan.errors import UsageError
from memscan.mitigation import MitigateSettings
from memscan.mitigation.similarity import cosine_to, pooled_embeddings, sentence_embeddings
from memscan.models.loading import ScoringModel
from memscan.models.text import tokenize

TEXTS = ["a red circle", "a large yellow square, the sapphire raven of harrowgate", "x"]


def test_pooled_is_the_encoders_pooler_output(tiny_model: ScoringModel) -> None:
    with torch.no_grad():
        pooled = tiny_model.text_encoder(tokenize(tiny_model, TEXTS).input_ids).pooler_output
    torch.testing.assert_close(pooled_embeddings(tiny_model, TEXTS), F.normalize(pooled, dim=-1))


def test_tokens_is_the_mean_state_of_the_prompts_tokens_after_bos(tiny_model: ScoringModel) -> None:
    tokens = tokenize(tiny_model, TEXTS)
    with torch.no_grad():
        states = tiny_model.text_encoder(tokens.input_ids).last_hidden_state
    expected = []
    for row, mask in zip(states, tokens.attention_mask, strict=True):
        length = int(mask.sum())  # BOS, the prompt's tokens, the first EOS
        expected.append(F.normalize(row[1:length].mean(0), dim=0))
    got = sentence_embeddings(tiny_model, TEXTS, "tokens", batch_size=2)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, sentence_embeddings(tiny_model, TEXTS, "pooled"))
    assert cosine_to(got[0], got)[0] == pytest.approx(1.0)


def test_unknown_similarity_is_a_usage_error(tiny_model: ScoringModel) -> None:
    with pytest.raises(UsageError, match="pooled, tokens"):
        sentence_embeddings(tiny_model, TEXTS, "bleu")
    with pytest.raises(UsageError, match="--similarity"):
        MitigateSettings(similarity="bleu")
