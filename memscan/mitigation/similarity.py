"""Meaning kept by a rewrite: cosine of the text encoder's pooled embeddings (the EOS state).

The pooled embedding is CLIP's sentence vector; SD's own text encoder gives it for free, so no
extra model is needed to judge how close a rewrite stays to the original prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from memscan.models.loading import ScoringModel
from memscan.models.text import tokenize


@torch.inference_mode()
def pooled_embeddings(model: ScoringModel, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """(len(texts), hidden) float32 pooled text-encoder outputs, L2-normalised."""
    encoder = model.text_encoder
    parts = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(model, texts[start : start + batch_size])
        mask = tokens.attention_mask.to(model.device) if getattr(encoder.config, "use_attention_mask", False) else None
        pooled = encoder(tokens.input_ids.to(model.device), attention_mask=mask).pooler_output
        parts.append(F.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def cosine_to(reference: torch.Tensor, others: torch.Tensor) -> np.ndarray:
    """Cosine of each row of `others` with the normalised vector `reference`."""
    return (others @ reference).numpy().astype(np.float64)
