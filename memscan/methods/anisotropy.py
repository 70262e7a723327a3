"""The anisotropy memorization score (Asthana & Belagiannis, ICLR 2026).

On ONE pure-noise latent x_T per noise sample, with guidance vector g = pred(c) - pred(∅):
  norm      = s * || g(x_T, t_hi) ||_2                  (isotropic, high-noise regime)
  alignment = mean over latent pixels of cos(u, g) across channels at t_lo, u = pred(∅)
  score     = w_norm * norm + w_align * alignment       (averaged over the n noise samples)
s = 1, or sqrt(abar_t_hi) / (1 - abar_t_hi) with `norm_scale = "reference-v"` (the reference
code's branch for SD 2 and Realistic Vision; see memscan.models.profiles.NormScale).
Timesteps are read off the DDIM schedule for `num_inference_steps` steps (SD: 981 and 41).
The unconditional predictions do not depend on the prompt, so they are computed once per
noise bank (`prepare`) and every prompt costs 2n conditional UNet evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from memscan.models.loading import ScoringModel
from memscan.models.profiles import ModelProfile, NormScale, VConvention


def channel_cosine(u: torch.Tensor, g: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over pixels of the cosine between u[:, h, w] and g[:, h, w] across channels.

    Inputs (batch, C, H, W); output (batch,). Not the global cosine of flattened tensors."""
    return F.cosine_similarity(u, g, dim=1, eps=eps).flatten(1).mean(dim=1)


def timestep_pair(model: ScoringModel, steps: int, hi_index: int, lo_index: int) -> tuple[int, int]:
    """(t_hi, t_lo) from the model's DDIM schedule for `steps` inference steps."""
    scheduler = model.scheduler
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    return int(timesteps[hi_index]), int(timesteps[lo_index])


def norm_scale_factor(model: ScoringModel, t: int, norm_scale: NormScale) -> float:
    """The factor on ||pred_c - pred_u|| at timestep t: 1, or the reference code's v-branch
    sqrt(abar_t) / (1 - abar_t) (its score difference (sqrt(abar_t) * out - x_t) / (1 - abar_t))."""
    if norm_scale == "none":
        return 1.0
    abar = model.scheduler.alphas_cumprod[t].double()
    return float(abar.sqrt() / (1.0 - abar))


def unet_prediction(
    model: ScoringModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: torch.Tensor,
    v_convention: VConvention = "epsilon",
) -> torch.Tensor:
    """The UNet output in float32, as epsilon unless it is v-prediction scored raw.

    v-prediction: eps = sqrt(abar_t) * v + sqrt(1 - abar_t) * x_t (per sample's own t)."""
    out = model.unet(latents, timesteps, encoder_hidden_states=embeds).sample.float()
    if model.profile.prediction_type != "v_prediction" or v_convention == "raw":
        return out
    abar = model.scheduler.alphas_cumprod.to(out.device)[timesteps.long()].float().view(-1, 1, 1, 1)
    return abar.sqrt() * out + (1.0 - abar).sqrt() * latents.float()


@dataclass(frozen=True)
class UnconditionalState:
    """Unconditional predictions on the noise bank at t_hi and t_lo, shared by all prompts."""

    t_hi: int
    t_lo: int
    uncond_hi: torch.Tensor  # (n, C, H, W) float32
    uncond_lo: torch.Tensor
    norm_factor: float = 1.0  # norm_scale_factor at t_hi


@dataclass
class AnisotropyMethod:
    """norm at t_hi + per-pixel channel alignment at t_lo, weighted as the profile says."""

    w_norm: float = 1.0
    w_align: float = 1.0
    num_inference_steps: int = 50
    t_hi_index: int = 0
    t_lo_index: int = -3
    v_convention: VConvention = "epsilon"
    norm_scale: NormScale = "none"

    name = "anisotropy"
    version = "1"
    columns = ("norm", "alignment", "score")

    @classmethod
    def from_profile(cls, profile: ModelProfile) -> AnisotropyMethod:
        return cls(
            w_norm=profile.w_norm, w_align=profile.w_align,
            num_inference_steps=profile.num_inference_steps, t_hi_index=profile.t_hi_index,
            t_lo_index=profile.t_lo_index, v_convention=profile.v_convention, norm_scale=profile.norm_scale,
        )

    def unet_evals_per_prompt(self, n_noise: int) -> int:
        return 2 * n_noise

    def shared_unet_evals(self, n_noise: int) -> int:
        return 2 * n_noise

    def run_facts(self) -> dict[str, Any]:
        return {
            "method": self.name, "method_version": self.version, "w_norm": self.w_norm,
            "w_align": self.w_align, "num_inference_steps": self.num_inference_steps,
            "t_hi_index": self.t_hi_index, "t_lo_index": self.t_lo_index,
            "v_convention": self.v_convention, "norm_scale": self.norm_scale,
        }

    def timesteps(self, model: ScoringModel) -> tuple[int, int]:
        return timestep_pair(model, self.num_inference_steps, self.t_hi_index, self.t_lo_index)

    def prepare(self, model: ScoringModel, noise: torch.Tensor) -> UnconditionalState:
        from memscan.models.text import encode_prompts

        t_hi, t_lo = self.timesteps(model)
        n = noise.shape[0]
        empty = encode_prompts(model, [""]).expand(2 * n, -1, -1)
        t = _timestep_column(t_hi, t_lo, n, model.device)
        pred = unet_prediction(model, torch.cat([noise, noise]), t, empty, self.v_convention)
        return UnconditionalState(
            t_hi=t_hi, t_lo=t_lo, uncond_hi=pred[:n], uncond_lo=pred[n:],
            norm_factor=norm_scale_factor(model, t_hi, self.norm_scale),
        )

    def score(
        self, model: ScoringModel, state: UnconditionalState, noise: torch.Tensor,
        prompt_embeds: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        batch, n = prompt_embeds.shape[0], noise.shape[0]
        latents = noise.repeat(batch, 1, 1, 1)  # row b*n + k is prompt b, noise k
        embeds = prompt_embeds.repeat_interleave(n, dim=0)
        t = _timestep_column(state.t_hi, state.t_lo, batch * n, model.device)
        pred = unet_prediction(
            model, torch.cat([latents, latents]), t, torch.cat([embeds, embeds]), self.v_convention
        )
        cond_hi, cond_lo = pred[: batch * n], pred[batch * n :]
        guidance_hi = cond_hi - state.uncond_hi.repeat(batch, 1, 1, 1)
        uncond_lo = state.uncond_lo.repeat(batch, 1, 1, 1)
        norm = (state.norm_factor * guidance_hi.flatten(1).norm(dim=1)).view(batch, n).mean(dim=1)
        alignment = channel_cosine(uncond_lo, cond_lo - uncond_lo).view(batch, n).mean(dim=1)
        return self.combine(norm, alignment)

    def combine(self, norm: torch.Tensor, alignment: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"norm": norm, "alignment": alignment, "score": self.w_norm * norm + self.w_align * alignment}


def _timestep_column(t_hi: int, t_lo: int, rows: int, device: torch.device) -> torch.Tensor:
    """[t_hi] * rows + [t_lo] * rows: both timesteps in one UNet call."""
    return torch.tensor([t_hi] * rows + [t_lo] * rows, device=device, dtype=torch.long)


def reference_score(
    method: AnisotropyMethod, model: ScoringModel, noise: torch.Tensor, prompt_embeds: torch.Tensor
) -> dict[str, float]:
    """One prompt, scored as the reference code does: 4n separate batch-1 UNet calls and no
    shared unconditional pass. Slow on purpose: the yardstick for tests and benchmarks."""
    t_hi, t_lo = method.timesteps(model)
    from memscan.models.text import encode_prompts

    empty = encode_prompts(model, [""])
    factor = norm_scale_factor(model, t_hi, method.norm_scale)
    norms, aligns = [], []
    for k in range(noise.shape[0]):
        x = noise[k : k + 1]

        def pred(t: int, emb: torch.Tensor, x: torch.Tensor = x) -> torch.Tensor:
            step = torch.tensor([t], device=model.device, dtype=torch.long)
            return unet_prediction(model, x, step, emb, method.v_convention)

        g_hi = pred(t_hi, prompt_embeds) - pred(t_hi, empty)
        u_lo = pred(t_lo, empty)
        g_lo = pred(t_lo, prompt_embeds) - u_lo
        norms.append(factor * float(g_hi.flatten().norm()))
        aligns.append(float(channel_cosine(u_lo, g_lo)[0]))
    norm = sum(norms) / len(norms)
    alignment = sum(aligns) / len(aligns)
    return {"norm": norm, "alignment": alignment, "score": method.w_norm * norm + method.w_align * alignment}
