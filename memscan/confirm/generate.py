"""k images per prompt from independent seeds, on the pipeline memscan loads (with its VAE).

Generation j of every prompt starts from the latent `randn(latent_shape, Generator("cpu").manual_seed(seed + j))`
in float32, then moved to the device and dtype, as detect's noise bank is made: the images do not
depend on the batch they were made in (up to float rounding), on the device's RNG, or on the
other prompts, and the first k of a larger k are the same images. DDIM (eta 0, deterministic),
the model's own noise schedule, `steps` steps, classifier-free guidance `guidance`, at the
profile's resolution (the model's native one for a folder without a profile).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from memscan.errors import ModelError
from memscan.models.loading import ScoringModel

log = logging.getLogger("memscan")


def initial_latents(model: ScoringModel, generations: Sequence[int], seed: int) -> torch.Tensor:
    """(len(generations), C, h, w) starting latents: generation j from seed + j (CPU RNG, float32)."""
    shape = model.latent_shape
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + int(j)), dtype=torch.float32)
             for j in generations]
    return torch.stack(noise).to(model.device, model.dtype)


def ddim_pipeline(model: ScoringModel) -> Any:
    """The loaded pipeline's modules with a fresh DDIM scheduler of the model's own schedule; needs its VAE."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = model.pipeline
    if getattr(pipe, "vae", None) is None:
        raise ModelError(f"model {model.profile.name!r} has no VAE loaded; confirm decodes images "
                         "(a diffusers folder or hub id with a vae/ folder)")
    components = {**pipe.components, "scheduler": DDIMScheduler.from_config(model.scheduler.config)}
    for name in ("safety_checker", "feature_extractor", "image_encoder"):
        components[name] = None
    generator = StableDiffusionPipeline(**components, requires_safety_checker=False)
    generator.set_progress_bar_config(disable=True)
    return generator


@torch.inference_mode()
def generate_images(
    model: ScoringModel, prompts: Sequence[str], *, k: int = 4, seed: int = 0, steps: int = 50,
    guidance: float = 7.5, batch_size: int = 16, pipeline: Any | None = None,
) -> np.ndarray:
    """(len(prompts), k, 3, R, R) float32 images in [0, 1], `batch_size` images per pipeline call."""
    pipe = pipeline if pipeline is not None else ddim_pipeline(model)
    pairs = [(p, j) for p in range(len(prompts)) for j in range(k)]
    side = int(model.profile.resolution)
    out = np.zeros((len(prompts), k, 3, side, side), dtype=np.float32)
    for start in range(0, len(pairs), max(1, batch_size)):
        batch = pairs[start : start + max(1, batch_size)]
        latents = initial_latents(model, [j for _, j in batch], seed)
        images = pipe(
            prompt=[prompts[p] for p, _ in batch], latents=latents, num_inference_steps=steps,
            guidance_scale=guidance, height=side, width=side, output_type="pt",
        ).images
        for (p, j), image in zip(batch, images.float().cpu().numpy(), strict=True):
            out[p, j] = image
    return out
