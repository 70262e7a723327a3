"""Token attribution: which words make a prompt memorized.

The attribution of a token is the L2 norm of the gradient of the detection score with respect
to that token's input embedding (Wen et al. 2024, "explaining"): tokens the score is most
sensitive to are the triggers. Scores are read per BPE token and pooled per whitespace word
(the unit the text edits work on) by taking the word's strongest token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memscan.mitigation.differentiable import DifferentiableScore
from memscan.models.loading import ScoringModel
from memscan.models.text import tokenize


@dataclass(frozen=True)
class TokenAttribution:
    """Per-token gradient norms of one prompt and the word each token belongs to."""

    words: tuple[str, ...]
    tokens: tuple[str, ...]  # decoded BPE tokens the encoder sees (no BOS/EOS), in order
    token_word: tuple[int, ...]  # index into `words` of each token
    token_scores: np.ndarray  # (len(tokens),) float

    def word_scores(self) -> np.ndarray:
        """Each word's strongest token score (0 for words cut off by truncation)."""
        scores = np.zeros(len(self.words))
        for word, value in zip(self.token_word, self.token_scores, strict=True):
            scores[word] = max(scores[word], float(value))
        return scores

    def top_tokens(self, k: int) -> list[str]:
        """The `k` most attributed tokens, strongest first (the report's trigger tokens)."""
        order = np.argsort(-self.token_scores, kind="stable")[:k]
        return [self.tokens[i] for i in order]

    def top_words(self, k: int) -> list[int]:
        """Indices of the `k` most attributed words, strongest first."""
        scores = self.word_scores()
        return [int(i) for i in np.argsort(-scores, kind="stable")[:k] if scores[i] > 0]


def token_text(model: ScoringModel, token_id: int) -> str:
    """A BPE token as text: CLIP's end-of-word marker dropped."""
    return str(model.tokenizer.convert_ids_to_tokens(int(token_id))).removesuffix("</w>")


def word_token_ids(model: ScoringModel, words: Sequence[str]) -> list[list[int]]:
    """The token ids of each word on its own; their concatenation is the prompt's tokenization
    because CLIP's pre-tokenizer never joins characters across whitespace."""
    return [list(model.tokenizer(w, add_special_tokens=False).input_ids) for w in words]


def attribute(scoring: DifferentiableScore, prompts: Sequence[str], *, batch_size: int = 8) -> list[TokenAttribution]:
    """Token attributions of non-empty `prompts`, `batch_size` prompts per backward pass."""
    out: list[TokenAttribution] = []
    for start in range(0, len(prompts), batch_size):
        out += _attribute_batch(scoring, prompts[start : start + batch_size])
    return out


def _attribute_batch(scoring: DifferentiableScore, prompts: Sequence[str]) -> list[TokenAttribution]:
    model = scoring.model
    tokens = tokenize(model, prompts)
    embeds = scoring.token_embeddings(tokens).requires_grad_(True)
    score = scoring.of_token_embeds(tokens, embeds)["score"]
    (grad,) = torch.autograd.grad(score.sum(), embeds)
    norms = grad.float().norm(dim=-1).cpu().numpy()  # (batch, 77)
    room = model.tokenizer.model_max_length - 2
    results = []
    for row, prompt in enumerate(prompts):
        words = tuple(prompt.split())
        ids = tokens.input_ids[row].tolist()
        pieces = word_token_ids(model, words)
        flat = [t for piece in pieces for t in piece]
        if flat[:room] != ids[1 : 1 + min(len(flat), room)]:
            # tokenizer that joins across words: attribute every token to its own "word"
            pieces = [[t] for t in flat]
            words = tuple(token_text(model, t) for t in flat)
        token_word = tuple(w for w, piece in enumerate(pieces) for _ in piece)[:room]
        seen = flat[:room]
        results.append(TokenAttribution(
            words=words, tokens=tuple(token_text(model, t) for t in seen), token_word=token_word,
            token_scores=norms[row, 1 : 1 + len(seen)].astype(np.float64),
        ))
    return results
