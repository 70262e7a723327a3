"""Scorer: one loaded model, one method and one noise bank turning prompts into score rows.

It is the unit a worker holds for its whole life: the model loads once, the unconditional
pass runs once, then any number of prompt frames (a whole file or one shard) are scored.
Identical prompts (same token ids after truncation) are scored once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from memscan.io.scores import STATUS_NONFINITE, STATUS_OK, STATUS_SKIPPED_EMPTY
from memscan.methods.base import DetectionMethod
from memscan.models.loading import ScoringModel
from memscan.models.noise import noise_bank
from memscan.models.text import TokenizedPrompts, encode_ids, tokenize


@dataclass
class ScoredTexts:
    """Per-prompt method columns (float32 arrays) and truncation flags, in input order."""

    columns: dict[str, np.ndarray]
    truncated: np.ndarray
    unique: int


class Scorer:
    """Scores prompts with `method` on `model`, every prompt on the same noise bank."""

    def __init__(
        self,
        model: ScoringModel,
        method: DetectionMethod,
        *,
        n_noise: int = 1,
        seed: int = 51,
        batch_size: int = 16,
        threshold: float | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.method = method
        self.n_noise = n_noise
        self.seed = seed
        self.batch_size = batch_size
        self.threshold = threshold
        self.noise = noise_bank(n_noise, model.latent_shape, seed, device=model.device, dtype=model.dtype)
        self._state: Any = None

    @property
    def state(self) -> Any:
        """The method's prompt-independent state (the shared unconditional pass), made once."""
        if self._state is None:
            with torch.inference_mode():
                self._state = self.method.prepare(self.model, self.noise)
        return self._state

    def run_facts(self) -> dict[str, Any]:
        return {
            **self.model.describe(), **self.method.run_facts(), "dtype": str(self.model.dtype).removeprefix("torch."),
            "seed": self.seed, "n_noise": self.n_noise, "threshold": self.threshold,
        }

    def score_texts(self, prompts: Sequence[str], *, chunk: int = 4096) -> ScoredTexts:
        """Score non-empty prompts; duplicates (same token ids) cost one evaluation.

        Prompts are tokenized `chunk` at a time so memory stays bounded on large inputs."""
        cache: dict[bytes, int] = {}
        unique_values: dict[str, list[np.ndarray]] = {c: [] for c in self.method.columns}
        gather: list[int] = []
        truncated: list[bool] = []
        for start in range(0, len(prompts), chunk):
            tokens = tokenize(self.model, prompts[start : start + chunk])
            ids = tokens.input_ids.numpy().astype(np.int32)
            new_rows: list[int] = []
            for i, row in enumerate(ids):
                key = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
                if key not in cache:
                    cache[key] = len(cache)
                    new_rows.append(i)
                gather.append(cache[key])
            truncated += tokens.truncated
            for name, values in self._score_rows(tokens, new_rows).items():
                unique_values[name].append(values)
        columns = {
            name: np.concatenate(parts)[np.asarray(gather, dtype=np.int64)] if parts else
            np.zeros(0, dtype=np.float32)
            for name, parts in unique_values.items()
        }
        return ScoredTexts(columns=columns, truncated=np.asarray(truncated, dtype=bool), unique=len(cache))

    def _score_rows(self, tokens: TokenizedPrompts, rows: list[int]) -> dict[str, np.ndarray]:
        """Method columns for `rows` of `tokens`, `batch_size` prompts per UNet call."""
        out: dict[str, list[np.ndarray]] = {c: [np.zeros(0, dtype=np.float32)] for c in self.method.columns}
        state = self.state
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                idx = torch.tensor(rows[start : start + self.batch_size], dtype=torch.long)
                batch = TokenizedPrompts(
                    input_ids=tokens.input_ids[idx], attention_mask=tokens.attention_mask[idx], truncated=[]
                )
                embeds = encode_ids(self.model, batch)
                values = self.method.score(self.model, state, self.noise, embeds)
                for name in self.method.columns:
                    out[name].append(values[name].float().cpu().numpy())
        return {name: np.concatenate(parts).astype(np.float32) for name, parts in out.items()}

    def score_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Output rows for a canonical prompt frame (`prompt_id`, `prompt`): one per input row."""
        prompts = frame["prompt"]
        is_empty = prompts.isna() | (prompts.fillna("").astype(str).str.strip() == "")
        texts = prompts[~is_empty].astype(str).tolist()
        scored = self.score_texts(texts)
        rows = len(frame)
        out = pd.DataFrame({
            "prompt_id": frame["prompt_id"].astype(str).to_numpy(),
            "prompt": pd.Series(prompts.to_numpy(), dtype=object),  # keeps None as None
        })
        ok = (~is_empty).to_numpy()
        for name in self.method.columns:
            column = np.full(rows, np.nan, dtype=np.float32)
            column[ok] = scored.columns[name]
            out[name] = column
        truncated = np.zeros(rows, dtype=bool)
        truncated[ok] = scored.truncated
        out["truncated"] = truncated
        score = out["score"].to_numpy()
        finite = np.isfinite(score)
        status = np.where(~ok, STATUS_SKIPPED_EMPTY, np.where(finite, STATUS_OK, STATUS_NONFINITE))
        out["status"] = status
        out["error"] = pd.Series(
            np.where(
                status == STATUS_SKIPPED_EMPTY, "empty prompt",
                np.where(status == STATUS_NONFINITE, "score is not finite", None),
            ),
            dtype=object,
        )
        if self.threshold is None:
            out["flagged"] = pd.array([None] * rows, dtype="boolean")
        else:
            flagged = pd.array(score > self.threshold, dtype="boolean")
            flagged[status != STATUS_OK] = pd.NA
            out["flagged"] = flagged
        return out
