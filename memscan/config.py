"""Run settings for `detect`: one frozen object that the library, the CLI and run directories share.

The settings that change the numbers (model, method, weights, timesteps, seed, n_noise,
dtype, ...) are the ones a run's fingerprint is made of; batch size and device are not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from memscan.errors import UsageError
from memscan.models.batching import AUTO, BatchSize, parse_batch_size
from memscan.models.profiles import NORM_SCALES


@dataclass(frozen=True)
class DetectSettings:
    """What `memscan detect` was asked to do (flags win over the profile where given)."""

    model: str = "demo"
    method: str = "anisotropy"
    n_noise: int = 1
    seed: int = 51
    batch_size: BatchSize = AUTO  # prompts per UNet call; auto: 16 off CUDA, sized from free memory on CUDA
    device: str = "auto"
    dtype: str = "auto"
    threshold: float | None = None
    w_norm: float | None = None
    w_align: float | None = None
    v_convention: str | None = None
    norm_scale: str | None = None
    architecture: str | None = None
    allow_pickle: bool = False
    prompt_column: str | None = None
    id_column: str | None = None
    store_prompt: bool = True
    compile: bool = False  # torch.compile the UNet (static shapes, last batch padded)
    prefetch: bool | None = None  # encode the next batch's text during this batch's UNet; None: on CUDA only
    channels_last: bool | None = None  # UNet weights in channels_last; None: on CUDA only

    def __post_init__(self) -> None:
        if self.n_noise < 1:
            raise UsageError(f"--n-noise must be >= 1, got {self.n_noise}")
        object.__setattr__(self, "batch_size", parse_batch_size(self.batch_size))
        if self.v_convention not in (None, "epsilon", "raw"):
            raise UsageError(f"--v-convention {self.v_convention!r}: use epsilon or raw")
        if self.norm_scale not in (None, *NORM_SCALES):
            raise UsageError(f"--norm-scale {self.norm_scale!r}: use {' or '.join(NORM_SCALES)}")

    def profile_overrides(self) -> dict[str, Any]:
        """The flags that override fields of the model profile."""
        return {
            "w_norm": self.w_norm, "w_align": self.w_align,
            "threshold": self.threshold, "v_convention": self.v_convention, "norm_scale": self.norm_scale,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# settings that do not change any number in the output (beyond float rounding)
NOT_FINGERPRINTED = ("batch_size", "device", "compile", "prefetch", "channels_last")
_NOT_FINGERPRINTED = set(NOT_FINGERPRINTED)


def fingerprint(settings: DetectSettings, facts: dict[str, Any] | None = None) -> str:
    """A short stable hash of everything that determines the output numbers."""
    payload = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name not in _NOT_FINGERPRINTED}
    payload["facts"] = facts or {}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
