"""Run settings for `detect`: one frozen object that the library, the CLI and run directories share.

The settings that change the numbers (model, method, weights, timesteps, seed, n_noise,
dtype, ...) are the ones a run's fingerprint is made of; batch size and device are not.
`method`, `n_noise` and `seed` left as None take the model profile's `[calibration]` values (the
ones its threshold was calibrated with), else anisotropy / 1 / 51: they are resolved when the
settings are made, so the fingerprint, a run's manifest and every worker see the values used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memscan.errors import MemscanError, UsageError
from memscan.models.batching import AUTO, BatchSize, parse_batch_size
from memscan.models.profiles import NORM_SCALES

if TYPE_CHECKING:
    from memscan.models.profiles import ModelProfile

# what `method`, `n_noise` and `seed` are when neither a flag nor the profile's calibration sets them
DEFAULTS: dict[str, Any] = {"method": "anisotropy", "n_noise": 1, "seed": 51}


def profile_calibration(model: str) -> dict[str, Any]:
    """The `[calibration]` table of the profile `model` names (a shipped name or a .toml file), read
    without loading the model; {} for folders, hub ids, or a profile that cannot be read (loading the
    model reports that)."""
    from memscan.models.profiles import load_profile, load_profile_file, profile_path

    try:
        if model.endswith(".toml"):
            return dict(load_profile_file(Path(model).expanduser()).calibration)
        if profile_path(model).is_file():
            return dict(load_profile(model).calibration)
    except (MemscanError, OSError, TypeError, ValueError):
        pass
    return {}


def calibrated_defaults(calibration: dict[str, Any]) -> dict[str, Any]:
    """`DEFAULTS` with the values a profile's calibration record sets."""
    return {key: calibration[key] if calibration.get(key) is not None else value for key, value in DEFAULTS.items()}


@dataclass(frozen=True)
class DetectSettings:
    """What `memscan detect` was asked to do (flags win over the profile where given).

    `method`, `n_noise`, `seed`: None takes the profile's calibration values (see DEFAULTS);
    `from_profile` names the ones resolved that way."""

    model: str = "demo"
    method: str | None = None  # None: the profile's calibration method, else anisotropy
    n_noise: int | None = None  # None: the profile's calibration n_noise, else 1
    seed: int | None = None  # None: the profile's calibration seed, else 51
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
    cache: str | None = None  # score cache path or URL (memscan.cache): reuses numbers, never changes them
    from_profile: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unset = tuple(key for key in DEFAULTS if getattr(self, key) is None)
        if unset:
            values = calibrated_defaults(profile_calibration(self.model))
            for key in unset:
                object.__setattr__(self, key, values[key])
            object.__setattr__(self, "from_profile", unset)
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

    def for_profile(self, profile: ModelProfile) -> DetectSettings:
        """These settings with the values taken from a profile re-read from `profile` (a loaded model's,
        which may not be the one `model` names); explicit values stay."""
        if not self.from_profile:
            return self
        values = calibrated_defaults(profile.calibration)
        resolved = replace(self, **{key: values[key] for key in self.from_profile})
        object.__setattr__(resolved, "from_profile", self.from_profile)
        return resolved

    def to_dict(self) -> dict[str, Any]:
        """The settings as given or resolved (not where the values came from)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


# settings that do not change any number in the output (beyond float rounding)
NOT_FINGERPRINTED = ("batch_size", "device", "compile", "prefetch", "channels_last", "cache")
_NOT_FINGERPRINTED = set(NOT_FINGERPRINTED)


def fingerprint(settings: DetectSettings, facts: dict[str, Any] | None = None) -> str:
    """A short stable hash of everything that determines the output numbers."""
    payload = {k: v for k, v in settings.to_dict().items() if k not in _NOT_FINGERPRINTED}
    payload["facts"] = facts or {}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
