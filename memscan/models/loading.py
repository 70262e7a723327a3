"""Resolve `--model` (profile name, local diffusers folder, single-file checkpoint or hub id)
to the pieces detection needs: UNet, text encoder, tokenizer and a DDIM scheduler.

Everything goes through one diffusers `StableDiffusionPipeline`, loaded without VAE and
safety checker (detection never decodes an image); `with_vae=True` keeps the VAE for
commands that generate images.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memscan.errors import ModelError, ModelNotCachedError
from memscan.models.device import resolve_device, resolve_dtype
from memscan.models.profiles import (
    CUSTOM_PROFILE,
    ModelProfile,
    available_profiles,
    default_profile_for,
    load_profile,
    load_profile_file,
    profile_path,
)

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and advisory warnings (cron mails)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # before diffusers imports its pipelines
    transformers.utils.logging.disable_progress_bar()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    import huggingface_hub

    huggingface_hub.utils.logging.set_verbosity_error()  # no "thrown while requesting HEAD" retries
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class ScoringModel:
    """A loaded model plus its profile; the one object methods and workers share."""

    pipeline: StableDiffusionPipeline
    scheduler: DDIMScheduler
    profile: ModelProfile
    device: torch.device
    dtype: torch.dtype
    source: str
    revision: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.pipeline.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer

    @property
    def vae_scale_factor(self) -> int:
        return int(self.facts.get("vae_scale_factor", 8))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent at the profile's resolution."""
        side = self.profile.resolution // self.vae_scale_factor
        return (int(self.unet.config.in_channels), side, side)

    def describe(self) -> dict[str, Any]:
        """Run facts for output metadata."""
        return {
            "model": self.profile.name,
            "source": self.source,
            "revision": self.revision,
            "prediction_type": self.profile.prediction_type,
            "resolution": self.profile.resolution,
            **{k: v for k, v in self.facts.items() if k != "vae_scale_factor"},
        }


def _vae_scale_factor(pipeline: StableDiffusionPipeline, config_folder: Path | None) -> int:
    """2**(levels-1) of the VAE, read from the loaded VAE or its config file; SD's 8 otherwise."""
    if getattr(pipeline, "vae", None) is not None:
        return 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    if config_folder is not None and (config_folder / "vae" / "config.json").is_file():
        vae_config = json.loads((config_folder / "vae" / "config.json").read_text())
        return 2 ** (len(vae_config["block_out_channels"]) - 1)
    return 8


def _load_pretrained(
    source: str, *, revision: str | None, dtype: torch.dtype, with_vae: bool
) -> StableDiffusionPipeline:
    """Load a diffusers folder or hub repo, mapping hub failures to one-line errors."""
    from diffusers import StableDiffusionPipeline
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    skip: dict[str, Any] = {"safety_checker": None, "feature_extractor": None, "image_encoder": None}
    if not with_vae:
        skip["vae"] = None
    skip.update(folder_tokenizer(source))
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.36 renames torch_dtype to dtype; older releases only know torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return StableDiffusionPipeline.from_pretrained(
                source, revision=revision, torch_dtype=dtype, requires_safety_checker=False, **skip
            )
    except GatedRepoError as exc:
        raise ModelError(f"model {source!r} is gated on the hub: accept its licence and log in") from exc
    except RevisionNotFoundError as exc:
        raise ModelError(f"model {source!r} has no revision {revision!r}") from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(f"model {source!r} was not found on the hub (nor as a local path)") from exc
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        if is_offline_miss(exc, LocalEntryNotFoundError):
            raise ModelNotCachedError(
                f"model {source!r} is not in the local Hugging Face cache and the hub cannot be reached; "
                "pass a local copy (--model /path/to/diffusers-folder or model.safetensors) "
                "or run once with network access to cache it"
            ) from exc
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot load model {source!r}: {message}") from exc


def folder_tokenizer(folder: str | Path) -> dict[str, Any]:
    """`{"tokenizer": ...}` for a local pipeline folder whose `tokenizer/` holds only its config
    (the demo model: memscan ships the CLIP vocabulary once), else nothing: diffusers loads it."""
    from memscan.models.tokenizer import clip_tokenizer_for, has_vocabulary

    tokenizer = Path(folder) / "tokenizer"
    if not tokenizer.is_dir() or has_vocabulary(tokenizer):
        return {}
    return {"tokenizer": clip_tokenizer_for(tokenizer)}


_OFFLINE_HINTS = ("not fully cached", "cached snapshot", "offline", "connect", "resolve host", "network")


def is_offline_miss(exc: BaseException, local_miss: type[BaseException]) -> bool:
    """Whether a load failed because the hub was unreachable and the files are not cached."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, local_miss) or any(h in str(seen).lower() for h in _OFFLINE_HINTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_profile(spec: str) -> ModelProfile:
    """The profile a `--model` value stands for (shipped profile, a profile .toml file such as
    `memscan calibrate` writes, or defaults for a path/hub id)."""
    if spec.endswith(".toml"):
        return load_profile_file(Path(spec).expanduser())
    if profile_path(spec).is_file():
        return load_profile(spec)
    return default_profile_for(spec)


def load_model(
    spec: str | ModelProfile = "demo",
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    architecture: str | None = None,
    with_vae: bool = False,
    profile_overrides: dict[str, Any] | None = None,
) -> ScoringModel:
    """Load the model `spec` names, once, ready for scoring on `device` in `dtype`."""
    quiet_libraries()
    profile = spec if isinstance(spec, ModelProfile) else resolve_profile(spec)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = profile.source
    path = Path(source).expanduser()
    config_folder: Path | None = None

    if path.is_file() or path.suffix.lower() in CHECKPOINT_SUFFIXES:
        # refuses pickles without allow_pickle, and missing files, with one line each
        from memscan.models.builders import architecture_dir
        from memscan.models.single_file import load_single_file

        arch = architecture or profile.architecture or "sd-v1"
        pipeline = load_single_file(path, architecture=arch, allow_pickle=allow_pickle, dtype=torch_dtype)
        config_folder = architecture_dir(arch)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{source} is a folder but not a diffusers pipeline (no model_index.json)")
        pipeline = _load_pretrained(str(path), revision=None, dtype=torch_dtype, with_vae=with_vae)
        config_folder = path
    elif _looks_like_hub_id(source):
        pipeline = _load_pretrained(source, revision=profile.revision, dtype=torch_dtype, with_vae=with_vae)
        config_folder = _cached_folder(source, profile.revision)
    else:
        raise ModelError(
            f"unknown model {source!r}: not a profile ({', '.join(available_profiles())}), "
            "an existing path, or a hub id like org/name"
        )
    model = scoring_model_from_pipeline(
        pipeline, profile, device=torch_device, dtype=torch_dtype, source=source,
        config_folder=config_folder,
    )
    if profile_overrides:
        model.profile = model.profile.with_overrides(**profile_overrides)
    return model


def _cached_folder(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a cached hub repo (to read the VAE config), if any."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      allow_patterns=["vae/config.json", "model_index.json"]))
    except Exception:  # noqa: BLE001 - only an optimisation: fall back to SD's factor 8
        return None


def scoring_model_from_pipeline(
    pipeline: StableDiffusionPipeline,
    profile: ModelProfile,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str | None = None,
    config_folder: Path | None = None,
) -> ScoringModel:
    """Wrap an already built pipeline (tests, benchmarks, demo training) for scoring.

    The scheduler becomes DDIM with the pipeline's own noise schedule, and the model's own
    prediction type wins over the profile's (a fine-tune knows what it predicts)."""
    from diffusers import DDIMScheduler

    quiet_libraries()
    device = torch.device(device)
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ModelError(f"model predicts {prediction_type!r}; memscan scores epsilon or v_prediction models")
    vae_scale_factor = _vae_scale_factor(pipeline, config_folder)
    if profile.name == CUSTOM_PROFILE:
        # no shipped profile: take the family defaults and the model's native resolution
        profile = default_profile_for(profile.source, prediction_type).with_overrides(
            resolution=int(pipeline.unet.config.sample_size) * vae_scale_factor
        )
    elif prediction_type != profile.prediction_type:
        profile = profile.with_overrides(prediction_type=prediction_type)
    for module in (pipeline.unet, pipeline.text_encoder, getattr(pipeline, "vae", None)):
        if module is not None:
            _place(module, device, dtype)
    pipeline.set_progress_bar_config(disable=True)
    facts = {"vae_scale_factor": vae_scale_factor}
    return ScoringModel(
        pipeline=pipeline, scheduler=scheduler, profile=profile, device=device, dtype=dtype,
        source=source or profile.source, revision=profile.revision, facts=facts,
    )


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to device/dtype (only if needed: diffusers warns on every dtype cast) and freeze."""
    param = next(module.parameters())
    if param.device != device:
        module.to(device)
    if param.dtype != dtype:
        module.to(dtype)
    module.eval().requires_grad_(False)
