"""Build Stable Diffusion pipelines from the shipped architecture configs, offline, without weights.

`configs/architectures/<name>/` is a diffusers pipeline folder without weights (model_index.json,
unet/, text_encoder/, vae/, scheduler/, tokenizer/ configs); the CLIP vocabulary comes from
memscan's shipped tokenizer. From such a folder this module builds

- models with their parameters on the `meta` device (free: for parameter counts, FLOPs, or as
  the skeleton that `memscan.models.single_file` loads a checkpoint into), and
- full pipelines with seeded random weights (`build_random_pipeline`, the throughput benchmark's
  model; `build_tiny_pipeline`, a 2.4 M-parameter SD-shaped model for tests).

Random weights skip the libraries' per-module init: parameters are created on `meta`, then
allocated directly on the target device and dtype and filled from one seeded pool of noise. On a
CPU the first touch of the memory dominates (SD v1, float32: ~8-10 s on two cores, against
~10 s for `from_config`); float16 halves that, and on a GPU nothing passes through the CPU.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from memscan.errors import ConfigError
from memscan.paths import config_dir

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

ModelT = TypeVar("ModelT", bound=torch.nn.Module)

ARCHITECTURES_SUBDIR = "architectures"

# The config files of each component; overrides for a component merge into every one of them.
COMPONENT_FILES: dict[str, tuple[str, ...]] = {
    "unet": ("unet/config.json",),
    "text_encoder": ("text_encoder/config.json",),
    "vae": ("vae/config.json",),
    "scheduler": ("scheduler/scheduler_config.json",),
    "tokenizer": ("tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"),
}

# A really small SD-shaped model (like diffusers' own pipeline tests) that keeps the real
# vocabulary so the shipped tokenizer works, and 4 VAE levels so the VAE scale factor stays 8.
TINY_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "sample_size": 8,
}
TINY_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
TINY_VAE: dict[str, Any] = {
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}

Overrides = Mapping[str, Mapping[str, Any]]


def available_architectures() -> list[str]:
    """Names of the architecture folders shipped under the config folder."""
    root = config_dir() / ARCHITECTURES_SUBDIR
    return sorted(p.parent.name for p in root.glob("*/model_index.json"))


def architecture_dir(name: str) -> Path:
    """The shipped config folder of architecture `name` (e.g. `sd-v1`)."""
    folder = config_dir() / ARCHITECTURES_SUBDIR / name
    if not name or "/" in name or "\\" in name or not (folder / "model_index.json").is_file():
        available = ", ".join(available_architectures()) or "none"
        raise ConfigError(f"unknown architecture {name!r}; available: {available}")
    return folder


def resolve_architecture(arch: str | Path) -> Path:
    """A config folder: a shipped architecture by name (str) or any such folder (Path)."""
    if isinstance(arch, str):
        return architecture_dir(arch)
    folder = Path(arch)
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"{folder} is not an architecture config folder (no model_index.json)")
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read architecture config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"architecture config {path} is not a JSON object")
    return data


def _check_overrides(overrides: Overrides | None) -> Overrides:
    unknown = sorted(set(overrides or {}) - set(COMPONENT_FILES))
    if unknown:
        known = ", ".join(COMPONENT_FILES)
        raise ConfigError(f"unknown components in overrides: {', '.join(unknown)}; known: {known}")
    return overrides or {}


def component_config(arch: str | Path, component: str, overrides: Overrides | None = None) -> dict[str, Any]:
    """One component's config (its main json file) with `overrides[component]` merged in."""
    overrides = _check_overrides(overrides)
    if component not in COMPONENT_FILES:
        raise ConfigError(f"unknown component {component!r}; known: {', '.join(COMPONENT_FILES)}")
    config = _read_json(resolve_architecture(arch) / COMPONENT_FILES[component][0])
    return {**config, **overrides.get(component, {})}


def pad_token_of(arch: str | Path, overrides: Overrides | None = None) -> str:
    """The pad token the architecture's tokenizer config names (`<|endoftext|>` or `!`)."""
    pad = component_config(arch, "tokenizer", overrides).get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    if not isinstance(pad, str) or not pad:
        raise ConfigError(f"architecture {arch}: tokenizer config names no pad_token")
    return pad


def export_architecture(arch: str | Path, dest: Path, overrides: Overrides | None = None) -> Path:
    """Copy an architecture folder to `dest` with `overrides` written into its config files."""
    overrides = _check_overrides(overrides)
    dest = Path(dest)
    shutil.copytree(resolve_architecture(arch), dest, dirs_exist_ok=True)
    for component, changes in overrides.items():
        for name in COMPONENT_FILES[component]:
            path = dest / name
            path.write_text(json.dumps({**_read_json(path), **changes}, indent=2) + "\n", encoding="utf-8")
    return dest


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every new parameter on `meta` (no memory, init is a no-op); buffers stay real.

    Like accelerate's `init_empty_weights(include_buffers=False)`, which memscan does not depend
    on: it patches `nn.Module.register_parameter` process-wide while the block runs.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def _on_meta(factory: Callable[[], ModelT]) -> ModelT:
    with _parameters_on_meta():
        model = factory()
    return model.eval()


def empty_unet(arch: str | Path, overrides: Overrides | None = None) -> UNet2DConditionModel:
    """The architecture's UNet with parameters on `meta` (count them, or load weights into them)."""
    from diffusers import UNet2DConditionModel

    config = component_config(arch, "unet", overrides)
    return _on_meta(lambda: UNet2DConditionModel.from_config(config))


def empty_text_encoder(arch: str | Path, overrides: Overrides | None = None) -> CLIPTextModel:
    """The architecture's CLIP text tower with parameters on `meta`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_dict(component_config(arch, "text_encoder", overrides))
    return _on_meta(lambda: CLIPTextModel(config))


def empty_vae(arch: str | Path, overrides: Overrides | None = None) -> AutoencoderKL:
    """The architecture's VAE with parameters on `meta`."""
    from diffusers import AutoencoderKL

    config = component_config(arch, "vae", overrides)
    return _on_meta(lambda: AutoencoderKL.from_config(config))


# Random weights are tiles of one seeded pool of uniform noise, so filling 1 B parameters costs a
# memory write, not 1 B RNG draws, and the same seed gives the same weights on CPU and GPU (the
# pool is drawn on the CPU). Its prime length keeps the rows of any weight matrix distinct.
_POOL_SIZE = 4_194_301


def _init_scale(name: str, param: torch.Tensor, siblings: Mapping[str, torch.Tensor]) -> float | None:
    """PyTorch's default init bound 1/sqrt(fan_in) for weights and their biases; None for norms."""
    if param.dim() >= 2:
        return float(param[0].numel()) ** -0.5
    weight = siblings.get("weight")
    if name == "bias" and weight is not None and weight.dim() >= 2:
        return float(weight[0].numel()) ** -0.5
    return None


def _fill_from_pool(out: torch.Tensor, pool: torch.Tensor, scale: float) -> None:
    """Write `scale * pool`, tiled from a random offset, into `out`."""
    flat, start, done = out.view(-1), int(torch.randint(len(pool), ())), 0
    while done < flat.numel():
        size = min(flat.numel() - done, len(pool) - start)
        torch.mul(pool[start : start + size], scale, out=flat[done : done + size])
        done, start = done + size, 0


def materialize_random(
    model: ModelT, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ModelT:
    """Give every `meta` parameter storage on `device` and cheap random values (global RNG).

    Weights (and the biases next to them) are uniform in +-1/sqrt(fan_in), the variance of
    PyTorch's default init (embeddings get ~N(0, 0.02^2) like CLIP's); 1-D weights (norms) are 1
    and other 1-D parameters 0. Values are drawn in float32 on the CPU, so a seed gives the same
    weights on every device, and every dtype gets them rounded.
    """
    pool = (torch.rand(_POOL_SIZE) * 2 - 1).to(device)
    for module in model.modules():
        params = dict(module.named_parameters(recurse=False))
        for name, param in params.items():
            if not param.is_meta:
                continue
            value = torch.empty(param.shape, dtype=dtype, device=device)
            scale = _init_scale(name, param, params)
            if scale is None:
                value.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                _fill_from_pool(value, pool, scale)
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
    # nn.Module.to, not ModelMixin.to: diffusers 0.42 warns about fp32 modules on every dtype cast.
    return torch.nn.Module.to(model, device=device, dtype=dtype)


def ddim_scheduler(arch: str | Path, overrides: Overrides | None = None) -> DDIMScheduler:
    """A DDIMScheduler from the architecture's scheduler config (memscan always samples with DDIM)."""
    from diffusers import DDIMScheduler

    config = {k: v for k, v in component_config(arch, "scheduler", overrides).items() if k != "_class_name"}
    return DDIMScheduler.from_config(config)


def assemble_pipeline(
    arch: str | Path,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    *,
    vae: AutoencoderKL | None = None,
    overrides: Overrides | None = None,
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of the given models, the shipped tokenizer and a DDIM scheduler."""
    from diffusers import StableDiffusionPipeline

    from memscan.models.tokenizer import load_clip_tokenizer

    return StableDiffusionPipeline(
        vae=vae,  # type: ignore[arg-type]
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(pad_token=pad_token_of(arch, overrides)),
        unet=unet,
        scheduler=ddim_scheduler(arch, overrides),
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )


def _cuda_devices(device: torch.device | str) -> list[int]:
    device = torch.device(device)
    return [device.index or 0] if device.type == "cuda" else []


def build_random_pipeline(
    arch: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    overrides: Overrides | None = None,
    with_vae: bool = False,
) -> StableDiffusionPipeline:
    """The full architecture with seeded random weights (benchmarks, tests); no hub, no weights.

    `overrides` maps a component (unet, text_encoder, vae, scheduler, tokenizer) to config keys
    that replace the folder's. The same seed, device and overrides give the same weights; the
    caller's global RNG state is left as it was.
    """
    folder = resolve_architecture(arch)
    overrides = _check_overrides(overrides)
    with torch.random.fork_rng(devices=_cuda_devices(device)):
        torch.manual_seed(seed)
        unet = materialize_random(empty_unet(folder, overrides), device=device, dtype=dtype)
        text_encoder = materialize_random(empty_text_encoder(folder, overrides), device=device, dtype=dtype)
        vae = None
        if with_vae:
            vae = materialize_random(empty_vae(folder, overrides), device=device, dtype=dtype)
    return assemble_pipeline(folder, unet, text_encoder, vae=vae, overrides=overrides)


def tiny_overrides(
    prediction_type: str | None = None, pad_token: str | None = None
) -> dict[str, dict[str, Any]]:
    """Overrides that shrink any SD architecture to the tiny test model (None keeps the base's)."""
    overrides: dict[str, dict[str, Any]] = {
        "unet": dict(TINY_UNET),
        "text_encoder": dict(TINY_TEXT_ENCODER),
        "vae": dict(TINY_VAE),
    }
    if prediction_type is not None:
        overrides["scheduler"] = {"prediction_type": prediction_type}
    if pad_token is not None:
        overrides["tokenizer"] = {"pad_token": pad_token}
    return overrides


def build_tiny_pipeline(
    seed: int = 0,
    prediction_type: str | None = None,
    pad_token: str | None = None,
    *,
    base: str | Path = "sd-v1",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    with_vae: bool = False,
) -> StableDiffusionPipeline:
    """A tiny random SD-shaped pipeline for unit tests (2.4 M parameters, 8x8 latents).

    It keeps `base`'s block types, activations, projection style and scheduler; prediction_type
    and pad_token default to the base's (sd-v1: epsilon, `<|endoftext|>`).
    """
    return build_random_pipeline(
        base, seed=seed, dtype=dtype, device=device, with_vae=with_vae,
        overrides=tiny_overrides(prediction_type, pad_token),
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (works on `meta` models)."""
    return sum(p.numel() for p in model.parameters())

