"""Image similarity for `confirm`: an embedder turns images into vectors, a metric into distances.

The protocol is small on purpose (`embed(images) -> vectors`, `metric`, `default_threshold`), so a
user's own model plugs in. Three kinds ship:

- `pixel`: the image itself, area-averaged down to at most 64x64, compared by root-mean-square
  difference of [0, 1] pixels (Carlini et al. 2023 compare generations by pixel L2). No model.
- `vae`: the latents of the scored model's own VAE (posterior mean times its scaling factor),
  root-mean-square difference. What the diffusion model itself sees; free with the pipeline.
- a vision model the user names, a local folder or a hub id in the local cache: a transformers
  CLIP (`openai/clip-vit-base-patch32`: the projected image embedding) or DINO/ViT-style model
  (`facebook/dinov2-small`: the pooled output, else the CLS state), compared by cosine distance.

Distances are scale-free per kind (RMS per value, or 1 - cosine), so one threshold holds across
resolutions. The defaults (`DEFAULT_THRESHOLDS`) and how they were chosen: README "Labels from
generations"; `--threshold` sets another.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from memscan.errors import ModelError, ModelNotCachedError, UsageError, one_line

Metric = Literal["rms", "cosine"]
BUILTIN = ("pixel", "vae")
PIXEL_SIDE = 64  # pixel embedder: images are area-averaged down to at most this side
# Distance under which two images count as near-duplicates, per embedder kind. pixel and vae: the
# geometric middle of the gap between memorized and clean prompts on a seeded half of the demo's
# labelled prompts (k 4; pixel gap 0.0083-0.041, vae 0.024-0.123; README "Labels from generations").
# A named model (cosine): cosine similarity 0.95, a starting point not measured in this project.
DEFAULT_THRESHOLDS: dict[str, float] = {"pixel": 0.018, "vae": 0.054, "model": 0.05}


class Embedder(Protocol):
    """Images (N, 3, H, W) float32 in [0, 1] -> vectors (N, D); `metric` says how they compare."""

    name: str
    metric: Metric
    default_threshold: float

    def embed(self, images: np.ndarray) -> np.ndarray: ...


def distances(a: np.ndarray, b: np.ndarray, metric: Metric) -> np.ndarray:
    """(len(a), len(b)) distances: RMS difference per value, or 1 - cosine similarity."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if metric == "cosine":
        a64 = a64 / np.maximum(np.linalg.norm(a64, axis=1, keepdims=True), 1e-12)
        b64 = b64 / np.maximum(np.linalg.norm(b64, axis=1, keepdims=True), 1e-12)
        return np.clip(1.0 - a64 @ b64.T, 0.0, 2.0)
    squared = (a64**2).sum(1)[:, None] + (b64**2).sum(1)[None, :] - 2.0 * a64 @ b64.T
    return np.sqrt(np.maximum(squared, 0.0) / max(a64.shape[1], 1))


def _batches(images: np.ndarray, size: int) -> Sequence[np.ndarray]:
    return [images[i : i + size] for i in range(0, len(images), size)]


@dataclass
class PixelEmbedder:
    """Downsampled pixels: area average to at most `side` x `side`, flattened."""

    side: int = PIXEL_SIDE
    name: str = "pixel"
    metric: Metric = "rms"
    default_threshold: float = DEFAULT_THRESHOLDS["pixel"]

    def embed(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if x.shape[-1] > self.side or x.shape[-2] > self.side:
            x = F.adaptive_avg_pool2d(x, (min(self.side, x.shape[-2]), min(self.side, x.shape[-1])))
        return x.reshape(len(x), -1).numpy()


@dataclass
class VaeEmbedder:
    """The model's own VAE: posterior mean latents times `scaling_factor`, flattened."""

    vae: Any
    resolution: int
    batch_size: int = 16
    name: str = "vae"
    metric: Metric = "rms"
    default_threshold: float = DEFAULT_THRESHOLDS["vae"]

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> np.ndarray:
        param = next(self.vae.parameters())
        scale = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        out = []
        for batch in _batches(images, self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
                x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                                  align_corners=False, antialias=True)
            x = (x * 2 - 1).to(param.device, param.dtype)
            latents = self.vae.encode(x).latent_dist.mean * scale
            out.append(latents.float().reshape(len(x), -1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class VisionModelEmbedder:
    """A transformers vision model: CLIP's projected image embedding, else the pooled (or CLS) state."""

    source: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 32
    name: str = ""
    metric: Metric = "cosine"
    default_threshold: float = DEFAULT_THRESHOLDS["model"]

    def __post_init__(self) -> None:
        self.name = self.name or self.source
        self.model, self.size, self.mean, self.std, self.is_clip = _load_vision_model(self.source)
        self.model.to(self.device)

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> np.ndarray:
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        out = []
        for batch in _batches(images, self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
            result = self.model(pixel_values=(x.clamp(0, 1) - mean) / std)
            if self.is_clip:
                vectors = result.image_embeds
            elif getattr(result, "pooler_output", None) is not None:
                vectors = result.pooler_output
            else:
                vectors = result.last_hidden_state[:, 0]
            out.append(vectors.float().reshape(len(x), -1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@contextmanager
def _embedder_errors(source: str) -> Iterator[None]:
    """Loading failures of a named embedder as one-line errors (exit 2)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from memscan.models.loading import is_offline_miss

    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        if is_offline_miss(exc, LocalEntryNotFoundError):
            raise ModelNotCachedError(
                f"embedder {source!r} is not in the local Hugging Face cache and the hub cannot be reached; "
                "pass a local folder (--embedder /path/to/clip-or-dino), run once online, or use pixel or vae"
            ) from exc
        raise ModelError(f"cannot load the embedder {source!r}: {one_line(exc)}") from exc


def _load_vision_model(source: str) -> tuple[Any, int, tuple[float, ...], tuple[float, ...], bool]:
    """(model, input side, mean, std, is_clip) for a folder or cached hub id; one-line errors, exit 2."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection

    from memscan.models.loading import quiet_libraries

    quiet_libraries()
    with _embedder_errors(source):
        config = AutoConfig.from_pretrained(source)
        is_clip = config.model_type in ("clip", "clip_vision_model")
        model = (CLIPVisionModelWithProjection if is_clip else AutoModel).from_pretrained(source)
    vision = getattr(config, "vision_config", config)
    size = int(getattr(vision, "image_size", 224) or 224)
    mean, std = (_CLIP_MEAN, _CLIP_STD) if is_clip else (_IMAGENET_MEAN, _IMAGENET_STD)
    processor = Path(source) / "preprocessor_config.json"
    if processor.is_file():  # the model's own normalisation where it ships one
        conf = json.loads(processor.read_text())
        mean = tuple(conf.get("image_mean", mean))
        std = tuple(conf.get("image_std", std))
    return model.float().eval().requires_grad_(False), size, mean, std, is_clip


def _probe(source: str) -> None:
    """Read the named embedder's config (cheap), so a missing model fails before the diffusion model loads."""
    from transformers import AutoConfig

    from memscan.models.loading import quiet_libraries

    quiet_libraries()
    with _embedder_errors(source):
        AutoConfig.from_pretrained(source)


def check_embedder(spec: str) -> str:
    """`spec` as every worker must see it (a local folder as an absolute path); one-line error if unusable."""
    if not spec or not spec.strip():
        raise UsageError(f"--embedder must be pixel, vae, or a CLIP/DINO model folder or hub id, got {spec!r}")
    if spec in BUILTIN:
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"--embedder {spec}: not a transformers model folder (no config.json); "
                             "use pixel, vae, or a CLIP/DINO folder")
        spec = str(path.resolve())
    else:
        parts = spec.split("/")
        if len(parts) != 2 or not all(parts) or spec.startswith((".", "/", "~")):
            raise ModelError(f"--embedder {spec!r}: not pixel or vae, no such folder, and not a hub id like "
                             "org/name")
    _probe(spec)
    return spec


def make_embedder(spec: str, model: Any | None = None) -> Embedder:
    """The embedder `spec` names; `vae` takes the loaded ScoringModel's VAE (it must have one)."""
    spec = check_embedder(spec)
    if spec == "pixel":
        return PixelEmbedder()
    if spec == "vae":
        vae = getattr(getattr(model, "pipeline", None), "vae", None)
        if vae is None:
            raise ModelError("--embedder vae needs the model's VAE, and this model has none loaded")
        return VaeEmbedder(vae, resolution=int(model.profile.resolution))
    device = getattr(model, "device", torch.device("cpu"))
    return VisionModelEmbedder(spec, device=torch.device(device))
