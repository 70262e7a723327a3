"""Each anisotropy term alone (the paper's ablation): `norm` at t_hi, `alignment` at t_lo.

Same definitions, timesteps, v-convention and norm scale as `anisotropy`, but only the one timestep the term
needs is evaluated, so each costs n conditional UNet evaluations per prompt (n shared).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from memscan.methods.anisotropy import channel_cosine, norm_scale_factor, timestep_pair, unet_prediction
from memscan.models.loading import ScoringModel
from memscan.models.profiles import ModelProfile, NormScale, VConvention


@dataclass(frozen=True)
class TermState:
    """The one timestep of the term, and the unconditional prediction on the noise bank there."""

    t: int
    uncond: torch.Tensor  # (n, C, H, W) float32
    factor: float = 1.0  # the norm's scale at t (see anisotropy.norm_scale_factor); 1 for alignment


@dataclass
class _TermMethod:
    """Base of the single-term methods: one shared unconditional pass, n evaluations a prompt."""

    num_inference_steps: int = 50
    t_hi_index: int = 0
    t_lo_index: int = -3
    v_convention: VConvention = "epsilon"
    norm_scale: NormScale = "none"

    name: ClassVar[str]
    at_t_hi: ClassVar[bool]  # the term's timestep: t_hi (norm) or t_lo (alignment)
    version = "1"
    columns = ("score",)

    @classmethod
    def from_profile(cls, profile: ModelProfile) -> _TermMethod:
        return cls(
            num_inference_steps=profile.num_inference_steps, t_hi_index=profile.t_hi_index,
            t_lo_index=profile.t_lo_index, v_convention=profile.v_convention, norm_scale=profile.norm_scale,
        )

    def unet_evals_per_prompt(self, n_noise: int) -> int:
        return n_noise

    def shared_unet_evals(self, n_noise: int) -> int:
        return n_noise

    def run_facts(self) -> dict[str, Any]:
        return {
            "method": self.name, "method_version": self.version, "num_inference_steps": self.num_inference_steps,
            "t_hi_index": self.t_hi_index, "t_lo_index": self.t_lo_index, "v_convention": self.v_convention,
            "norm_scale": self.norm_scale,
        }

    def timestep(self, model: ScoringModel) -> int:
        t_hi, t_lo = timestep_pair(model, self.num_inference_steps, self.t_hi_index, self.t_lo_index)
        return t_hi if self.at_t_hi else t_lo

    def prepare(self, model: ScoringModel, noise: torch.Tensor) -> TermState:
        from memscan.models.text import encode_prompts

        t = self.timestep(model)
        empty = encode_prompts(model, [""]).expand(noise.shape[0], -1, -1)
        steps = torch.full((noise.shape[0],), t, device=model.device, dtype=torch.long)
        factor = norm_scale_factor(model, t, self.norm_scale) if self.at_t_hi else 1.0
        return TermState(t=t, uncond=unet_prediction(model, noise, steps, empty, self.v_convention), factor=factor)

    def score(
        self, model: ScoringModel, state: TermState, noise: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch, n = prompt_embeds.shape[0], noise.shape[0]
        steps = torch.full((batch * n,), state.t, device=model.device, dtype=torch.long)
        cond = unet_prediction(
            model, noise.repeat(batch, 1, 1, 1), steps, prompt_embeds.repeat_interleave(n, dim=0), self.v_convention
        )
        uncond = state.uncond.repeat(batch, 1, 1, 1)
        return {"score": (state.factor * self.term(uncond, cond - uncond)).view(batch, n).mean(dim=1)}

    def term(self, uncond: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """The term per (prompt, noise) row."""
        raise NotImplementedError


class NormMethod(_TermMethod):
    """|| pred(x_T, t_hi, c) - pred(x_T, t_hi, ∅) ||_2 alone (Wen et al.'s first-step metric)."""

    name = "norm"
    at_t_hi = True

    def term(self, uncond: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return guidance.flatten(1).norm(dim=1)


class AlignmentMethod(_TermMethod):
    """The per-pixel channel cosine of (pred(∅), pred(c) - pred(∅)) at t_lo alone."""

    name = "alignment"
    at_t_hi = False

    def term(self, uncond: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return channel_cosine(uncond, guidance)
