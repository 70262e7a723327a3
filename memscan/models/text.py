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
    texts = list(prompts)
    # One BPE pass: the untruncated ids tell which prompts are cut, and the short ones are padded
    # here exactly as `padding="max_length"` pads them (right, with the pad id, mask 1 then 0).
    # The rare long prompts go through the tokenizer's own truncation, so the ids stay the pipeline's.
    full = tokenizer(texts, truncation=False)["input_ids"]
    truncated = [len(ids) > max_length for ids in full]
    pad_id = tokenizer.pad_token_id
    if pad_id is None or tokenizer.padding_side != "right":
        batch = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return TokenizedPrompts(input_ids=batch.input_ids, attention_mask=batch.attention_mask, truncated=truncated)
    input_ids = torch.full((len(texts), max_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
    for row, ids in enumerate(full):
        if not truncated[row]:
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
    long_rows = [row for row, cut in enumerate(truncated) if cut]
    if long_rows:
        cut = tokenizer([texts[row] for row in long_rows], padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="pt")
        input_ids[long_rows] = cut.input_ids
        attention_mask[long_rows] = cut.attention_mask
    return TokenizedPrompts(input_ids=input_ids, attention_mask=attention_mask, truncated=truncated)


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
