"""Load an original (CompVis/LDM-format) single-file SD checkpoint offline, UNet and text encoder only.

The architecture comes from a shipped config folder (`configs/architectures/<name>`), never the
hub. Keys are renamed with diffusers' own LDM converters, then loaded strictly into a skeleton
whose parameters are on `meta` (no random init of 1 B parameters that are overwritten anyway):
diffusers' `from_single_file` would load the same tensors, but without accelerate it
random-initializes every model first and silently keeps random weights for keys the file lacks.
"""

from __future__ import annotations

import pickle
import re
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memscan.errors import ModelError, PickleRefusedError, one_line
from memscan.models.builders import (
    assemble_pipeline,
    component_config,
    empty_text_encoder,
    empty_unet,
    resolve_architecture,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: Hugging Face CLIP names
LDM_OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP names

StateDict = dict[str, torch.Tensor]


class _StubObject:
    """Stands in for a pickled object whose class cannot be imported (e.g. Lightning callbacks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _LenientUnpickler(pickle.Unpickler):
    """Full unpickling that turns classes of modules not installed into `_StubObject`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _StubObject


# torch.load's `pickle_module`: it subclasses `.Unpickler` and calls `.load` for old formats.
_LENIENT_PICKLE = types.SimpleNamespace(
    __name__="memscan_lenient_pickle",
    Unpickler=_LenientUnpickler,
    load=lambda file, **kwargs: _LenientUnpickler(file, **kwargs).load(),
)


def _load_pickle(path: Path) -> Any:
    """torch.load, restricted to tensors first; full unpickling only if that fails (user consented).

    Original SD 1.x `.ckpt` files also pickle PyTorch Lightning callback objects, which
    `weights_only=True` (torch >= 2.6 default, and what diffusers uses) refuses.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LENIENT_PICKLE)


def _load_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def read_checkpoint(path: Path, *, allow_pickle: bool = False) -> StateDict:
    """The flat tensor state dict of a single-file checkpoint; refuses pickles unless allowed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise PickleRefusedError(
            f"{path}: pickle checkpoints can run arbitrary code when loaded; "
            "convert it to .safetensors or pass --allow-pickle if you trust it"
        )
    if not path.is_file():
        raise ModelError(f"checkpoint file {path} does not exist")
    kind = "pickle" if suffix in PICKLE_SUFFIXES else "safetensors"
    try:
        raw = _load_pickle(path) if suffix in PICKLE_SUFFIXES else _load_safetensors(path)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means "not a checkpoint"
        reason = one_line(exc, with_type=True, limit=200)
        raise ModelError(f"{path}: not a valid {kind} checkpoint ({reason})") from None
    while isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(raw, Mapping):
        raise ModelError(f"{path}: not a checkpoint (holds a {type(raw).__name__}, not a state dict)")
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"{path}: checkpoint holds no tensors")
    return tensors


def _load_strict(
    model: torch.nn.Module,
    weights: StateDict,
    *,
    what: str,
    where: str,
    ignore: Callable[[str], bool] = lambda key: False,
) -> None:
    """Load `weights` into a meta-parameter `model`, or fail with one line saying what differs."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected and not ignore(k)]
    reshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if reshaped:
            key = reshaped[0]
            shapes = f"{tuple(weights[key].shape)} vs {tuple(expected[key].shape)}"
            problems.append(f"{len(reshaped)} with other shapes (e.g. {key}: {shapes})")
        raise ModelError(f"{where}: {what} weights do not fit the architecture: {'; '.join(problems)}")
    model.load_state_dict({k: weights[k] for k in expected}, strict=True, assign=True)


def _text_encoder_weights(checkpoint: StateDict, model: torch.nn.Module, where: str) -> StateDict:
    """The text tower's weights under CLIPTextModel names, from either SD 1.x or SD 2.x layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if any(k.startswith(LDM_CLIP_PREFIX) for k in checkpoint):
        weights = convert_ldm_clip_checkpoint(checkpoint)
    elif any(k.startswith(LDM_OPEN_CLIP_PREFIX) for k in checkpoint):
        weights = convert_open_clip_checkpoint(model, checkpoint, prefix=LDM_OPEN_CLIP_PREFIX)
    else:
        raise ModelError(
            f"{where}: no text encoder weights ({LDM_CLIP_PREFIX}* for SD 1.x, "
            f"{LDM_OPEN_CLIP_PREFIX}* for SD 2.x)"
        )
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    return weights


def _unused_text_key(n_layers: int) -> Callable[[str], bool]:
    """Keys a checkpoint may hold that the text encoder does not use.

    position_ids (a buffer in old transformers), OpenCLIP's projection and logit scale, and the
    transformer blocks past `n_layers` (SD 2 uses the penultimate of its 24 blocks; diffusers'
    converter drops block 23 by name only).
    """
    layer = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")

    def unused(key: str) -> bool:
        if key.endswith("position_ids") or key in ("text_projection.weight", "logit_scale"):
            return True
        match = layer.search(key)
        return match is not None and int(match[1]) >= n_layers

    return unused


def pipeline_from_ldm(
    checkpoint: Mapping[str, torch.Tensor],
    *,
    architecture: str | Path,
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
) -> StableDiffusionPipeline:
    """The pipeline of an LDM-format state dict in memory (see `load_single_file`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    folder = resolve_architecture(architecture)
    where = f"{source} (architecture {architecture})"
    if not any(k.startswith(LDM_UNET_PREFIX) for k in checkpoint):
        raise ModelError(f"{source}: no UNet weights ({LDM_UNET_PREFIX}*); is it an LDM-format SD checkpoint?")
    unet, text_encoder = empty_unet(folder), empty_text_encoder(folder)
    try:
        unet_weights = convert_ldm_unet_checkpoint(checkpoint, component_config(folder, "unet"))
        text_weights = _text_encoder_weights(checkpoint, text_encoder, where)
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        reason = one_line(exc, with_type=True, limit=200)
        raise ModelError(f"{where}: cannot convert the checkpoint's keys ({reason})") from None
    _load_strict(unet, unet_weights, what="UNet", where=where)
    ignore = _unused_text_key(text_encoder.config.num_hidden_layers)
    _load_strict(text_encoder, text_weights, what="text encoder", where=where, ignore=ignore)

    # nn.Module.to, not ModelMixin.to: diffusers 0.42 warns about fp32 modules on every dtype cast.
    torch.nn.Module.to(unet, dtype=dtype)
    text_encoder.to(dtype=dtype)
    return assemble_pipeline(folder, unet, text_encoder)


def load_single_file(
    path: Path | str,
    *,
    architecture: str | Path,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline (no VAE, no safety checker) from an LDM-format single file.

    `architecture` names a shipped config folder (`sd-v1`, `sd-v2`, `sd-v2-base`) or is a Path to
    one; the tokenizer is memscan's shipped CLIP tokenizer with the folder's pad token, and the
    scheduler a DDIMScheduler from the folder's config. Raises PickleRefusedError for pickle
    files without `allow_pickle`, ModelError for a missing, unreadable or non-fitting file.
    """
    resolve_architecture(architecture)  # an unknown name fails before a 4 GB file is read
    checkpoint = read_checkpoint(Path(path), allow_pickle=allow_pickle)
    return pipeline_from_ldm(checkpoint, architecture=architecture, dtype=dtype, source=str(path))
