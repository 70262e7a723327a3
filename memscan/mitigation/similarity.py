"""Meaning kept by a rewrite: cosine of sentence vectors from the model's own text encoder.

Two sentence vectors, both free with SD's text encoder (no extra model):

- `pooled`: the EOS state, CLIP's contrastively trained sentence vector (SD v1.x / 2.x);
- `tokens`: the mean of the output states over the prompt's tokens (BOS excluded, EOS kept),
  i.e. the conditioning the UNet attends to, every word weighted alike. For a text encoder
  trained only through the diffusion loss (the demo's), the EOS state is no sentence vector:
  there, replacing "yellow" by "blue" keeps a pooled cosine of 0.93 while dropping the
  memorized phrase gives 0.63; the token mean reads 0.50 and 0.87-0.94.

A third way brings its own judge: any other value names a CLIP text model (a folder or a hub id,
e.g. `openai/clip-vit-base-patch32`) whose projected text embedding is used instead, loaded once
per process. The demo ships one (`data/demo/judge`, `memscan.demo.judge`): its own text encoder
rates "framed canvas umu" at 0.83 of "framed canvas print of the dancing wizard, a large pink
square", so it cannot tell a rewrite that keeps the picture from one that drops it.

A profile names the one that suits its text encoder (`text_similarity`); `pooled` by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memscan.errors import ModelError, ModelNotCachedError, UsageError, one_line
from memscan.models.loading import ScoringModel
from memscan.models.profiles import TEXT_SIMILARITIES as SIMILARITIES
from memscan.models.text import run_text_encoder, tokenize


@torch.inference_mode()
def sentence_embeddings(
    model: ScoringModel, texts: Sequence[str], kind: str = "pooled", *, batch_size: int = 256
) -> torch.Tensor:
    """(len(texts), hidden) float32 sentence vectors of `kind` (see the module), L2-normalised."""
    check_similarity(kind)
    if kind not in SIMILARITIES:
        return text_judge(kind).embed(texts, batch_size=batch_size)
    parts = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(model, texts[start : start + batch_size])
        out = run_text_encoder(model, tokens)
        if kind == "pooled":
            vectors = out.pooler_output.float()
        else:
            keep = tokens.attention_mask.to(model.device).float()
            keep[:, 0] = 0.0  # BOS: the same state for every prompt
            states = out.last_hidden_state.float()
            vectors = (states * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1.0)
        parts.append(F.normalize(vectors, dim=-1).cpu())
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def check_similarity(kind: str) -> None:
    """A one-line UsageError unless `kind` names a sentence vector this module makes or a model."""
    if not kind or not kind.strip():
        raise UsageError(f"--similarity must be one of {', '.join(SIMILARITIES)} or a CLIP text model, got {kind!r}")


def resolve_similarity(kind: str) -> str:
    """`kind` as every worker must see it: a local judge folder as an absolute path."""
    return kind if kind in SIMILARITIES or not Path(kind).exists() else str(Path(kind).resolve())


class TextJudge:
    """A CLIP text model with its projection, apart from the scored model: the cosine of its
    normalised text embeddings says how close two prompts are, as CLIP's does for SD."""

    def __init__(self, source: str) -> None:
        from huggingface_hub.errors import LocalEntryNotFoundError
        from transformers import CLIPTextModelWithProjection

        from memscan.models.loading import is_offline_miss, quiet_libraries
        from memscan.models.tokenizer import clip_tokenizer_for

        quiet_libraries()
        try:
            self.tokenizer = clip_tokenizer_for(source)  # the demo judge's folder holds no vocabulary of its own
            self.model = CLIPTextModelWithProjection.from_pretrained(source).float().eval()  # judge in float32
        except (OSError, ValueError) as exc:
            if is_offline_miss(exc, LocalEntryNotFoundError):
                raise ModelNotCachedError(
                    f"similarity model {source!r} is not in the local Hugging Face cache and the hub cannot be "
                    "reached; pass a local folder (--similarity /path/to/clip-text-model) or run once online"
                ) from exc
            raise ModelError(f"cannot load the similarity model {source!r}: {one_line(exc)}") from exc

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """(len(texts), projection_dim) float32 text embeddings, L2-normalised."""
        parts = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                                    max_length=self.tokenizer.model_max_length, return_tensors="pt")
            parts.append(F.normalize(self.model(**tokens).text_embeds.float(), dim=-1))
        return torch.cat(parts) if parts else torch.zeros(0, 0)


@lru_cache(maxsize=4)
def text_judge(source: str) -> TextJudge:
    """The judge at `source`, loaded once per process (every shard and prompt shares it)."""
    return TextJudge(source)


def pooled_embeddings(model: ScoringModel, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """(len(texts), hidden) float32 pooled text-encoder outputs, L2-normalised."""
    return sentence_embeddings(model, texts, "pooled", batch_size=batch_size)


def cosine_to(reference: torch.Tensor, others: torch.Tensor) -> np.ndarray:
    """Cosine of each row of `others` with the normalised vector `reference`."""
    return (others @ reference).numpy().astype(np.float64)
