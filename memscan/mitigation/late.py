"""Late re-optimisation: a prompt embedding optimised again on partly denoised latents, used from a
step of the generation on.

The anisotropy score is read at the start of a generation, but a model may settle its copy in the
last steps (the demo and valid-v do: `benchmarks/embedding_handoff.py`), where an embedding
optimised at the start controls it only in part. `refine_late` takes latents at step `index` of a
DDIM generation and lowers the guidance norm there by the factor the first optimisation took off
the start norm, pulled back to the first embedding. The guard does it on the call's own latents
(`Guard(optimize_late=)`); `mitigate --embedding-late` does it offline on `denoise_to`'s
trajectories of an independent noise bank, and `late_callback` swaps the result in at generation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from memscan.methods.anisotropy import unet_prediction
from memscan.models.loading import ScoringModel

if TYPE_CHECKING:
    from memscan.mitigation.settings import MitigateSettings
    from memscan.scorer import Scorer

LATE_PREFIX = "late:"  # safetensors key of a prompt's late embedding, beside its first one
LATE_SEED_OFFSET = 4243  # the offline trajectories' noise bank: independent of the scoring and verifier banks


def late_index(share: float, n_steps: int) -> int:
    """The step index from which the late embedding is used: round(share * n_steps), kept in [1, n_steps - 1]."""
    return min(max(round(share * n_steps), 1), n_steps - 1)


def refine_late(
    model: ScoringModel, embeds: torch.Tensor, latents: torch.Tensor, t: int, fall: float, empty: torch.Tensor,
    *, steps: int = 50, lr: float = 0.05, v_convention: str = "epsilon",
) -> tuple[torch.Tensor, float | None]:
    """(refined (1, 77, hidden) float32, its guidance norm over the start's): AdamW on `embeds` (BOS
    frozen, pulled back to itself) until the mean guidance norm on `latents` (rows, C, h, w) at
    timestep `t` falls to `fall` times its starting value, or `steps` steps. Call with the UNet and
    text encoder frozen (no gradients reach the user's weights)."""
    from memscan.mitigation.embeddings import embedding_cosine

    rows = latents.shape[0]
    lat = latents.to(model.device, model.dtype)
    times = torch.full((rows,), int(t), device=model.device)
    base = embeds.to(model.device).float()
    with torch.inference_mode(False), torch.enable_grad():
        uncond = unet_prediction(model, lat, times, empty.to(model.device, model.dtype).expand(rows, -1, -1),
                                 v_convention).detach()
        start = None
        rest = base[:, 1:].clone().requires_grad_(True)
        optimiser = torch.optim.AdamW([rest], lr=lr)
        for step in range(steps + 1):
            current = torch.cat([base[:, :1], rest], dim=1)
            cond = unet_prediction(model, lat, times, current.to(model.dtype).expand(rows, -1, -1), v_convention)
            norm = (cond - uncond).flatten(1).norm(dim=1).mean()
            value = float(norm.detach())
            start = value if start is None else start
            if value <= fall * start or step == steps:
                break
            loss = norm + start * (1.0 - embedding_cosine(current, base))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return current.detach(), (value / start if start else None)


@torch.no_grad()
def denoise_to(
    model: ScoringModel, embeds: torch.Tensor, empty: torch.Tensor, noise: torch.Tensor, *, n_steps: int,
    index: int, guidance: float,
) -> tuple[torch.Tensor, int]:
    """(latents entering step `index`, its timestep): `index` DDIM steps (eta 0, classifier-free
    guidance `guidance` against `empty`) from `noise` (rows, C, h, w) with `embeds` (1, 77, hidden),
    as a pipeline with the model's DDIM schedule denoises them."""
    import copy

    scheduler = copy.deepcopy(model.scheduler)
    scheduler.set_timesteps(n_steps, device=model.device)
    rows = noise.shape[0]
    hidden = torch.cat([empty.expand(rows, -1, -1), embeds.expand(rows, -1, -1)]).to(model.device, model.dtype)
    latents = noise.to(model.device, model.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:index]:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = model.unet(model_input, t, encoder_hidden_states=hidden).sample.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return latents, int(scheduler.timesteps[index])


def late_callback(
    late: torch.Tensor, index: int, *, images_per_prompt: int = 1,
    then: Callable[..., dict[str, Any]] | None = None,
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A diffusers `callback_on_step_end` that, after step `index - 1`, makes `late` (prompts, 77,
    hidden) the conditional embeddings for the remaining steps (the negative half under guidance is
    kept). Pass `callback_on_step_end_tensor_inputs=["prompt_embeds"]` (with "latents" if `then`
    needs them); `then`, a caller's own callback, runs after it on what it returns."""

    def swap(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if step == index - 1:
            embeds = tensors["prompt_embeds"]
            rows = late.repeat_interleave(images_per_prompt, dim=0).to(embeds)
            out["prompt_embeds"] = torch.cat([embeds[: embeds.shape[0] - rows.shape[0]], rows])
        if then is not None:
            out.update(then(pipeline, step, timestep, {**tensors, **out}) or {})
        return out

    return swap


def late_facts(settings: MitigateSettings) -> dict[str, Any]:
    """What a late embedding was made for; `load_late_embeddings` returns it and the check keeps to it."""
    assert settings.embedding_late is not None
    index = late_index(settings.embedding_late, settings.generation_steps)
    return {"share": settings.embedding_late, "late_index": index, "num_inference_steps": settings.generation_steps,
            "guidance_scale": settings.guidance_scale, "scheduler": "DDIM", "late_noise": settings.late_noise}


class LateRefiner:
    """Late embeddings offline: each optimised embedding's own DDIM trajectories from an independent
    noise bank (`late_noise` samples), then `refine_late` on their latents at the late step."""

    def __init__(self, scorer: Scorer, settings: MitigateSettings) -> None:
        from memscan.models.noise import noise_bank
        from memscan.models.text import encode_prompts

        assert settings.embedding_late is not None
        self.model, self.settings = scorer.model, settings
        self.v_convention = getattr(scorer.method, "v_convention", "epsilon")
        self.index = late_index(settings.embedding_late, settings.generation_steps)
        self.noise = noise_bank(settings.late_noise, tuple(scorer.noise.shape[1:]), scorer.seed + LATE_SEED_OFFSET,
                                device=self.model.device, dtype=self.model.dtype)
        with torch.no_grad():
            self.empty = encode_prompts(self.model, [""])

    def refine(self, embeds: torch.Tensor, fall: float) -> tuple[torch.Tensor, float | None]:
        """(the late embedding (1, 77, hidden) on the CPU, its guidance norm ratio at the late step)."""
        s = self.settings
        latents, t = denoise_to(self.model, embeds, self.empty, self.noise, n_steps=s.generation_steps,
                                index=self.index, guidance=s.guidance_scale)
        refined, ratio = refine_late(self.model, embeds, latents, t, fall, self.empty, steps=s.embedding_steps,
                                     lr=s.embedding_lr, v_convention=self.v_convention)
        return refined.to(self.model.dtype).cpu().contiguous(), ratio
