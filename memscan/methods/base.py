"""The protocol every detection method follows.

A method maps (text embeddings of a batch of prompts, the shared noise bank, the model) to
per-prompt columns. It never reads files or parses flags. Work that does not depend on the
prompt (e.g. unconditional predictions) is done once in `prepare` and reused for every batch.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from memscan.models.loading import ScoringModel


@runtime_checkable
class DetectionMethod(Protocol):
    """A memorization score computed from UNet predictions; higher = more likely memorized."""

    name: str
    version: str
    columns: tuple[str, ...]

    def unet_evals_per_prompt(self, n_noise: int) -> int:
        """Conditional UNet evaluations one prompt costs (its price, for planning)."""
        ...

    def shared_unet_evals(self, n_noise: int) -> int:
        """UNet evaluations paid once per run, whatever the number of prompts."""
        ...

    def prepare(self, model: ScoringModel, noise: torch.Tensor) -> Any:
        """Prompt-independent state, computed once per (model, noise bank)."""
        ...

    def score(
        self, model: ScoringModel, state: Any, noise: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-prompt float32 columns (each of shape (batch,)) for a batch of embeddings."""
        ...

    def run_facts(self) -> dict[str, Any]:
        """Settings that define the numbers (for output metadata and fingerprints)."""
        ...
