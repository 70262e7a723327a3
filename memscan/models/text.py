"""Prompt -> text-encoder hidden states, exactly as the diffusers SD pipeline encodes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memscan.models.loading import ScoringModel


@dataclass(frozen=True)
class TokenizedPrompts:
    """Token ids padded/truncated to the encoder's length, and which prompts were cut."""

    input_ids: torch.Tensor  # (batch, max_length) long
    attention_mask: torch.Tensor
    truncated: list[bool]


def tokenize(model: ScoringModel, prompts: Sequence[str], *, tokenizer: Any = None) -> TokenizedPrompts:
    """Tokenize as the pipeline does (pad to max_length, truncate), noting truncation.

    `tokenizer`: a copy of the model's for another thread (a fast tokenizer sets its padding
    state on every call, so two threads must not share one)."""
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    max_length = tokenizer.model_max_length
    batch = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True,
        return_tensors="pt",
    )
    full_lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False)["input_ids"]]
    return TokenizedPrompts(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        truncated=[n > max_length for n in full_lengths],
    )


def run_text_encoder(model: ScoringModel, tokens: TokenizedPrompts) -> Any:
    """The text encoder's full output (last hidden state, pooled EOS state), masked as the pipeline masks."""
    encoder = model.text_encoder
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(model.device)
    return encoder(tokens.input_ids.to(model.device), attention_mask=mask)


def encode_ids(model: ScoringModel, tokens: TokenizedPrompts) -> torch.Tensor:
    """Last hidden state of the text encoder (the conditioning SD's UNet sees)."""
    return run_text_encoder(model, tokens)[0].to(model.dtype)


def encode_prompts(model: ScoringModel, prompts: Sequence[str]) -> torch.Tensor:
    """Embeddings of `prompts` (batch, 77, hidden) on the model's device and dtype."""
    return encode_ids(model, tokenize(model, prompts))
