"""Wen et al. 2024 ("Detecting, explaining, and mitigating memorization in diffusion models").

score = mean over the first `steps` denoising steps of || pred(x_t, t, c) - pred(x_t, t, ∅) ||_2,
averaged over the n noise samples. `steps = 1` (the default, and the baselines' table) reads only
x_T at the first DDIM timestep, where the unconditional prediction is shared by all prompts: n
conditional evaluations per prompt. `steps = k > 1` follows the guided DDIM trajectory (guidance
scale 7.5, as generation does), which depends on the prompt: n (2k - 1) evaluations per prompt.
Select it as `--method wen:steps=10`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memscan.errors import UsageError
from memscan.models.loading import ScoringModel
from memscan.models.profiles import ModelProfile, VConvention


@dataclass(frozen=True)
class WenState:
    """The first `steps` timesteps, the empty-prompt embedding and the shared first-step pass."""

    timesteps: tuple[int, ...]
    empty: torch.Tensor  # (1, 77, hidden)
    uncond_first: torch.Tensor  # raw UNet output on the noise bank at timesteps[0], float32


@dataclass
class WenMethod:
    """Guidance-vector norm at the first step, optionally averaged over the first k steps."""

    steps: int = 1
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    v_convention: VConvention = "epsilon"

    name = "wen"
    version = "1"
    columns = ("score",)

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= self.num_inference_steps:
            raise UsageError(f"wen: steps must be between 1 and {self.num_inference_steps}, got {self.steps}")

    @classmethod
    def from_profile(cls, profile: ModelProfile, *, steps: int = 1, guidance_scale: float = 7.5) -> WenMethod:
        return cls(
            steps=int(steps), guidance_scale=float(guidance_scale),
            num_inference_steps=profile.num_inference_steps, v_convention=profile.v_convention,
        )

    def unet_evals_per_prompt(self, n_noise: int) -> int:
        return n_noise * (2 * self.steps - 1)

    def shared_unet_evals(self, n_noise: int) -> int:
        return n_noise

    def run_facts(self) -> dict[str, Any]:
        return {
            "method": self.name, "method_version": self.version, "steps": self.steps,
            "guidance_scale": self.guidance_scale, "num_inference_steps": self.num_inference_steps,
            "v_convention": self.v_convention,
        }

    def prepare(self, model: ScoringModel, noise: torch.Tensor) -> WenState:
        from memscan.models.text import encode_prompts

        model.scheduler.set_timesteps(self.num_inference_steps)
        timesteps = tuple(int(t) for t in model.scheduler.timesteps[: self.steps])
        empty = encode_prompts(model, [""])
        uncond = _unet(model, noise, timesteps[0], empty.expand(noise.shape[0], -1, -1))
        return WenState(timesteps=timesteps, empty=empty, uncond_first=uncond)

    def score(
        self, model: ScoringModel, state: WenState, noise: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch, n = prompt_embeds.shape[0], noise.shape[0]
        rows = batch * n
        embeds = prompt_embeds.repeat_interleave(n, dim=0)  # row b*n + k is prompt b, noise k
        latents = noise.repeat(batch, 1, 1, 1).float()
        scheduler = model.scheduler
        scheduler.set_timesteps(self.num_inference_steps)
        total = torch.zeros(rows, device=latents.device)
        for i, t in enumerate(state.timesteps):
            if i == 0:
                cond = _unet(model, latents, t, embeds)
                uncond = state.uncond_first.repeat(batch, 1, 1, 1)
            else:
                both = _unet(
                    model, torch.cat([latents, latents]), t,
                    torch.cat([state.empty.expand(rows, -1, -1), embeds]),
                )
                uncond, cond = both[:rows], both[rows:]
            guidance = cond - uncond
            total += guidance.flatten(1).norm(dim=1) * self._epsilon_scale(model, t)
            if i + 1 < len(state.timesteps):
                guided = uncond + self.guidance_scale * guidance
                latents = scheduler.step(guided, t, latents).prev_sample.float()
        return {"score": (total / len(state.timesteps)).view(batch, n).mean(dim=1)}

    def _epsilon_scale(self, model: ScoringModel, t: int) -> float:
        """||Δε|| / ||Δ(raw output)||: sqrt(abar_t) for v-prediction scored as epsilon, else 1.

        (eps = sqrt(abar) v + sqrt(1 - abar) x, and the x term cancels in the difference.)"""
        if model.profile.prediction_type != "v_prediction" or self.v_convention == "raw":
            return 1.0
        return float(model.scheduler.alphas_cumprod[t]) ** 0.5


def _unet(model: ScoringModel, latents: torch.Tensor, t: int, embeds: torch.Tensor) -> torch.Tensor:
    """Raw UNet output (what the scheduler steps with) in float32."""
    steps = torch.full((latents.shape[0],), t, device=model.device, dtype=torch.long)
    out = model.unet(latents.to(model.dtype), steps, encoder_hidden_states=embeds.to(model.dtype))
    return out.sample.float()
