"""The detection score with autograd: what token attribution and embedding optimisation differentiate.

`Scorer` runs under `torch.inference_mode`, whose tensors cannot be saved for backward. This
module recomputes the prompt-independent state (the shared unconditional pass) under
`torch.no_grad()` on the scorer's own noise bank, then calls the same `method.score`, so a
differentiable score equals the scorer's score of the same embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from memscan.models.text import TokenizedPrompts, encode_ids
from memscan.scorer import Scorer


@contextmanager
def token_embeddings_replaced(encoder: torch.nn.Module, embeds: torch.Tensor) -> Iterator[None]:
    """Make the text encoder's token-embedding lookup return `embeds` (positions are added after).

    A forward hook works for every transformers version, whether or not the encoder's forward
    accepts `inputs_embeds`; masking and EOS pooling still read the real token ids."""
    handle = encoder.get_input_embeddings().register_forward_hook(lambda _m, _i, _o: embeds)
    try:
        yield
    finally:
        handle.remove()


class DifferentiableScore:
    """The scorer's method, noise bank and model, scored with gradients enabled."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.model = scorer.model
        self.method = scorer.method
        self.noise = scorer.noise
        with torch.no_grad():
            self.state: Any = self.method.prepare(self.model, self.noise)

    def of_prompt_embeds(self, prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Method columns for text-encoder outputs (batch, 77, hidden), differentiable."""
        with torch.enable_grad():
            return self.method.score(self.model, self.state, self.noise, prompt_embeds)

    def token_embeddings(self, tokens: TokenizedPrompts) -> torch.Tensor:
        """The encoder's token-embedding vectors for `tokens` (detached), (batch, 77, hidden)."""
        layer = self.model.text_encoder.get_input_embeddings()
        with torch.no_grad():
            return layer(tokens.input_ids.to(self.model.device)).detach()

    def of_token_embeds(self, tokens: TokenizedPrompts, token_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Method columns when `token_embeds` replace the token lookup of `tokens`, differentiable."""
        with torch.enable_grad(), token_embeddings_replaced(self.model.text_encoder, token_embeds):
            prompt_embeds = encode_ids(self.model, tokens)
            return self.method.score(self.model, self.state, self.noise, prompt_embeds)
