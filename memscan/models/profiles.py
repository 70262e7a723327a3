"""Model profiles: what memscan must know about a model family to score it.

A profile (a TOML file under `configs/`) names the model source, its prediction type and
resolution, the timestep rule and term weights of the metric, and the calibrated threshold
(absent = not calibrated, so nothing is flagged).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from memscan.errors import ConfigError
from memscan.paths import config_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PredictionType = Literal["epsilon", "v_prediction"]
VConvention = Literal["epsilon", "raw"]
# How the norm term is scaled. "none": ||pred_c - pred_u|| as it is (memscan's convention).
# "reference-v": the reference code's branch for every model but SD 1.x (sd_ver != 1): it takes
# the norm of its score difference (sqrt(abar_t) * out - x_t) / (1 - abar_t), i.e.
# sqrt(abar_t) / (1 - abar_t) * ||out_c - out_u|| at t_hi (0.076438 on SD's schedule at t = 981),
# on the raw model output. Its published SD 2 and Realistic Vision weights apply to that term.
NormScale = Literal["none", "reference-v"]
NORM_SCALES = ("none", "reference-v")

_PREDICTION_TYPES = ("epsilon", "v_prediction")
CUSTOM_PROFILE = "custom"
_V_CONVENTIONS = ("epsilon", "raw")
TEXT_SIMILARITIES = ("pooled", "tokens")  # sentence vectors of memscan.mitigation.similarity (or a CLIP text model)


@dataclass(frozen=True)
class ModelProfile:
    """Everything model-specific that detection needs, besides the weights themselves."""

    name: str
    source: str
    description: str = ""
    revision: str | None = None
    architecture: str | None = None
    prediction_type: PredictionType = "epsilon"
    resolution: int = 512
    pad_token: str = "<|endoftext|>"
    num_inference_steps: int = 50
    t_hi_index: int = 0
    t_lo_index: int = -3
    w_norm: float = 1.0
    w_align: float = 1.0
    threshold: float | None = None
    v_convention: VConvention = "epsilon"
    norm_scale: NormScale = "none"
    text_similarity: str = "pooled"  # mitigate's sentence vector or CLIP text model (memscan.mitigation.similarity)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ConfigError(
                f"profile {self.name!r}: prediction_type must be one of {_PREDICTION_TYPES}, "
                f"got {self.prediction_type!r}"
            )
        if not self.text_similarity.strip():
            raise ConfigError(
                f"profile {self.name!r}: text_similarity must be one of {TEXT_SIMILARITIES} or a CLIP text model"
            )
        if self.v_convention not in _V_CONVENTIONS:
            raise ConfigError(
                f"profile {self.name!r}: v_convention must be one of {_V_CONVENTIONS}, "
                f"got {self.v_convention!r}"
            )
        if self.norm_scale not in NORM_SCALES:
            raise ConfigError(
                f"profile {self.name!r}: norm_scale must be one of {NORM_SCALES}, got {self.norm_scale!r}"
            )
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(f"profile {self.name!r}: resolution must be a positive multiple of 8")

    def with_overrides(self, **changes: Any) -> ModelProfile:
        """A copy with the non-None `changes` applied (flags override the profile)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile_path(name: str) -> Path:
    return config_dir() / f"{name}.toml"


def available_profiles() -> list[str]:
    """Names of the profiles shipped in the config folder."""
    return sorted(p.stem for p in config_dir().glob("*.toml"))


def load_profile_file(path: Path) -> ModelProfile:
    """Read one profile TOML; relative local sources resolve against the file's folder."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read profile {path}: {exc}") from exc
    data: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in ("scoring", "model", "mitigation"):
            data.update(value)
        else:
            data[key] = value
    data.setdefault("name", path.stem)
    source = data.get("source")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"profile {path} has no 'source'")
    for key in ("source", "text_similarity"):  # local folders given relative to the profile
        value = data.get(key)
        if isinstance(value, str) and value.startswith(("./", "../")):
            data[key] = str((path.parent / value).resolve())
    known = set(ModelProfile.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"profile {path}: unknown keys {', '.join(unknown)}")
    return ModelProfile(**data)


def load_profile(name: str) -> ModelProfile:
    """Load a shipped profile by name (e.g. `sd-v1-4`, `demo`)."""
    path = profile_path(name)
    if not path.is_file():
        raise ConfigError(
            f"unknown profile {name!r}; available: {', '.join(available_profiles()) or 'none'}"
        )
    return load_profile_file(path)


def default_profile_for(source: str, prediction_type: PredictionType = "epsilon") -> ModelProfile:
    """A profile for a model given by path or hub id with no shipped profile: the `sd-v1-4`
    profile's score (reference SD v1.x weights on epsilon) for epsilon models, the `sd-v2` profile's
    (the reference code's v-branch terms, which its 1 / 0.1 weights were fitted on) for v-prediction."""
    if prediction_type == "v_prediction":
        return ModelProfile(
            name=CUSTOM_PROFILE, source=source, prediction_type="v_prediction", resolution=768,
            pad_token="!", w_norm=1.0, w_align=0.1, v_convention="raw", norm_scale="reference-v",
        )
    return ModelProfile(name=CUSTOM_PROFILE, source=source, w_norm=1.0, w_align=2.0)
