"""Sharpness (Jeon, Kim & No, ICML 2025, arXiv 2412.04140): at the first step, on x_T,

    score = || H_c Δs - H_u Δs ||_2,   Δs = s(x_T, t, c) - s(x_T, t, ∅),   H = ∂s/∂x,

H applied to Δs by forward-mode autodiff (`torch.func.jvp`). The score s is ±k * pred (+ a term in
x_T alone, which cancels in Δs and in H_c - H_u), so score = k² || (J_c - J_u) Δpred ||_2 with
J = ∂pred/∂x, pred the UNet output as `v_convention` gives it, and k set by `norm_scale`:

- "none" (memscan's convention): s = -pred / sigma_t, k = 1 / sigma_t. On epsilon this is the
  reference code's SD 1 branch (its `sd_ver == 1`); on v converted to epsilon, the true score.
- "reference-v": the reference code's SD 2 branch (`sd_ver != 1`, `local_model/pipe.py`), which
  takes s = (sqrt(abar_t) * out - x_t) / (1 - abar_t) on the raw output, k = sqrt(abar_t) / (1 - abar_t)
  (`norm_scale_factor`), i.e. 1 / sigma_t² times memscan's number on v converted to epsilon.

At a fixed t every convention is a constant multiple of every other (the x term of the v->ε
conversion cancels in J_c - J_u), so they rank prompts alike.

Cost per prompt: n conditional forward passes (the unconditional one is shared) plus one JVP
through the UNet for 2n samples (conditional and unconditional), each about two forward
passes' work: declared as 5n UNet evaluations.

The Scorer runs methods under `torch.inference_mode`, where autodiff is off and its tensors
cannot enter an autodiff graph; `score` therefore re-enables it locally and works on clones.
Attention runs on SDPA's math kernel, the one with forward-mode derivatives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from memscan.methods.anisotropy import norm_scale_factor, timestep_pair, unet_prediction
from memscan.models.loading import ScoringModel
from memscan.models.profiles import ModelProfile, NormScale, VConvention


@dataclass(frozen=True)
class SharpnessState:
    """The first timestep, sigma_t and k² there, the empty-prompt embedding and the shared uncond pass."""

    t: int
    sigma: float
    factor: float  # k² of the module docstring: 1 / sigma_t², or the reference v-branch's abar_t / (1 - abar_t)²
    empty: torch.Tensor
    uncond: torch.Tensor  # (n, C, H, W) float32


@contextmanager
def autodiff_enabled() -> Iterator[None]:
    """Autodiff back on inside the Scorer's inference mode, attention on the math kernel."""
    with torch.inference_mode(False), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        yield


@dataclass
class SharpnessMethod:
    """Norm of the difference of conditional and unconditional Hessian-vector products along Δs."""

    num_inference_steps: int = 50
    t_index: int = 0
    v_convention: VConvention = "epsilon"
    norm_scale: NormScale = "none"

    name = "sharpness"
    version = "2"
    columns = ("score",)

    @classmethod
    def from_profile(cls, profile: ModelProfile) -> SharpnessMethod:
        return cls(
            num_inference_steps=profile.num_inference_steps, t_index=profile.t_hi_index,
            v_convention=profile.v_convention, norm_scale=profile.norm_scale,
        )

    def unet_evals_per_prompt(self, n_noise: int) -> int:
        return 5 * n_noise

    def shared_unet_evals(self, n_noise: int) -> int:
        return n_noise

    def run_facts(self) -> dict[str, Any]:
        return {
            "method": self.name, "method_version": self.version, "num_inference_steps": self.num_inference_steps,
            "t_index": self.t_index, "v_convention": self.v_convention, "norm_scale": self.norm_scale,
        }

    def prepare(self, model: ScoringModel, noise: torch.Tensor) -> SharpnessState:
        from memscan.models.text import encode_prompts

        t, _ = timestep_pair(model, self.num_inference_steps, self.t_index, self.t_index)
        sigma = float(1.0 - model.scheduler.alphas_cumprod[t].double()) ** 0.5
        k = 1.0 / sigma if self.norm_scale == "none" else norm_scale_factor(model, t, self.norm_scale)
        empty = encode_prompts(model, [""])
        uncond = self._predict(model, noise, t, empty.expand(noise.shape[0], -1, -1))
        return SharpnessState(t=t, sigma=sigma, factor=k**2, empty=empty, uncond=uncond)

    def score(
        self, model: ScoringModel, state: SharpnessState, noise: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch, n = prompt_embeds.shape[0], noise.shape[0]
        rows = batch * n
        with autodiff_enabled():
            latents = noise.repeat(batch, 1, 1, 1).clone()
            embeds = torch.cat([state.empty.expand(rows, -1, -1), prompt_embeds.repeat_interleave(n, dim=0)]).clone()
            with torch.no_grad():
                cond = self._predict(model, latents, state.t, embeds[rows:])
            direction = (cond - state.uncond.clone().repeat(batch, 1, 1, 1)).to(latents.dtype)

            def both(x: torch.Tensor) -> torch.Tensor:
                return self._predict(model, torch.cat([x, x]), state.t, embeds)

            _, tangent = jvp(both, (latents,), (direction,))
            hvp = state.factor * (tangent[rows:] - tangent[:rows]).flatten(1).norm(dim=1)
            return {"score": hvp.view(batch, n).mean(dim=1).detach()}

    def _predict(self, model: ScoringModel, x: torch.Tensor, t: int, embeds: torch.Tensor) -> torch.Tensor:
        steps = torch.full((x.shape[0],), t, device=model.device, dtype=torch.long)
        return unet_prediction(model, x, steps, embeds, self.v_convention)
