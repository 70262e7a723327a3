"""Guarded generation: score each prompt on the call's own initial noise before it is denoised,
and act on the flagged ones (warn, block, reseed, optimize the embedding, rewrite the text).

`Guard(pipe, ...)` wraps the user's own diffusers `StableDiffusionPipeline` (its VAE, scheduler,
device and dtype; nothing is moved or re-configured). A call

    result = guard(prompt=[...], num_images_per_prompt=k, generator=g, **pipe_kwargs)

1. draws the initial latents exactly as the pipeline would (`randn_tensor` with the same shape,
   generator, device and dtype as `pipe.prepare_latents`; or takes the caller's `latents=`),
2. scores every prompt on its own k samples with memscan's anisotropy math (the profile's weights,
   norm scale, v convention, t_hi / t_lo of the DDIM schedule for the profile's
   `num_inference_steps`); the unconditional predictions of the whole batch are one UNet call,
3. flags a prompt when its score, the MEAN over its k samples (the Scorer's definition over a noise
   bank, which is what a profile's threshold was calibrated on), exceeds the threshold,
4. applies the policy to the flagged prompts, each on its own (a mitigation that raises or does not
   reach the target blocks that prompt only, with the reason in its record),
5. generates the whole batch in ONE pipeline call with `prompt_embeds=` / `latents=` and the caller's
   generator, so unflagged prompts get the bit-identical images of an unguarded call: the batch keeps
   its shape (a blocked prompt's rows are denoised from the empty prompt and dropped, never returned).

Reuse of the first step: when the call's first denoising step IS the score's t_hi evaluation (DDIM
with the profile's step count, guidance on, no negative prompt: e.g. DDIM 50 at t = 981), the guard
makes that UNet call itself (same inputs as the pipeline's), reads the t_hi terms off it, and hands
the output to the pipeline's first step through a one-shot forward substitution that checks the
inputs are equal (else the UNet runs as usual). The guard then costs one extra UNet call of 2Bk rows
at t_lo, i.e. one denoising step.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch

from memscan.errors import ConfigError, ModelError, UsageError, one_line
from memscan.methods.anisotropy import AnisotropyMethod, channel_cosine, norm_scale_factor, unet_prediction
from memscan.models.loading import ScoringModel, quiet_libraries
from memscan.models.noise import noise_bank
from memscan.models.profiles import CUSTOM_PROFILE, ModelProfile, default_profile_for

POLICIES = ("warn", "block", "reseed", "optimize", "rewrite")
VERIFY_SEED = 51 + 7919  # the independent bank that confirms an optimised embedding or a rewrite
_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "encode_prompt")
_PASSED_THROUGH_REFUSED = ("prompt_embeds", "negative_prompt_embeds", "ip_adapter_image", "ip_adapter_image_embeds")


@dataclass
class PromptDecision:
    """What the guard saw and did for one prompt of a call."""

    index: int
    prompt: str
    score_before: float  # mean over the prompt's samples
    sample_scores: list[float]  # per sample (image), on its own initial latents
    norm: float
    alignment: float
    flagged: bool
    action: str  # none (not flagged) | warn | block | reseed | optimize | rewrite
    generated: bool  # images were returned for this prompt
    resolved: bool | None = None  # the mitigation got under the target (None: nothing to resolve)
    score_after: float | None = None  # score of what was generated (same latents, or the new seed's)
    score_verified: float | None = None  # the same on an independent noise bank (optimize, rewrite)
    prompt_used: str | None = None  # the text generated from (None: an optimised embedding)
    embedding: torch.Tensor | None = None  # (1, 77, hidden) optimised embedding, CPU
    seed: int | None = None  # reseed: the seed of the latents generated from
    steps: int | None = None  # optimize: AdamW steps; reseed: tries
    error: str | None = None  # the mitigation failed (the prompt is blocked)
    norm_fall: float | None = None  # optimize: the t_hi guidance norm of the embedding over the prompt's own
    late_step: int | None = None  # optimize_late: the step index from which `late_embedding` was generated
    late_norm_ratio: float | None = None  # its guidance norm on the call's latents there, over the embedding's
    late_embedding: torch.Tensor | None = None  # (1, 77, hidden) re-optimised on the partly denoised latents


@dataclass
class GuardResult:
    """Images of a guarded call (None where blocked), one decision per prompt, one record per image."""

    images: list[Any]
    prompts: list[PromptDecision]
    threshold: float
    target: float
    images_per_prompt: int
    reused_first_step: bool
    seconds_guard: float  # scoring and mitigation, not the generation
    nsfw_content_detected: list[bool] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def records(self) -> pd.DataFrame:
        """One row per image: prompt, sample, score before (the sample's own), prompt score, action..."""
        rows = []
        for d in self.prompts:
            for k in range(self.images_per_prompt):
                rows.append({
                    "prompt_index": d.index, "sample": k, "prompt": d.prompt,
                    "score_before": d.sample_scores[k], "prompt_score": d.score_before, "flagged": d.flagged,
                    "action": d.action, "generated": d.generated, "resolved": d.resolved,
                    "score_after": d.score_after, "score_verified": d.score_verified,
                    "prompt_used": d.prompt_used, "embedding": d.embedding is not None, "seed": d.seed,
                    "steps": d.steps, "late_step": d.late_step, "late_norm_ratio": d.late_norm_ratio,
                    "error": d.error,
                })
        return pd.DataFrame(rows)


class Guard:
    """Scores a StableDiffusionPipeline's prompts on their own initial noise and acts on the flagged."""

    def __init__(
        self,
        pipe: Any,
        profile_or_model_spec: str | ModelProfile | None = None,
        threshold: float | None = None,
        policy: str = "warn",
        *,
        target: float | None = None,
        reseed_tries: int = 8,
        reseed_seed: int = 0,
        optimize_steps: int = 50,
        optimize_lr: float = 0.05,
        optimize_depth: float = 0.0,
        optimize_late: float | None = None,
        verify_noise: int = 4,
        min_similarity: float = 0.8,
        on_unresolved: str = "block",
    ) -> None:
        """`profile_or_model_spec`: a profile name / .toml / ModelProfile (None: memscan's default score
        for the pipeline's prediction type); `threshold` (None: the profile's calibrated one) flags;
        `target` (None: the threshold) is what a mitigation must get under; `on_unresolved`: block or
        generate a prompt whose mitigation did not reach the target. `optimize_late` (a share of the
        denoising steps, e.g. 0.6): at that step, re-optimise each optimised embedding on the call's own
        partly denoised latents (see `_refine_late`) and generate the remaining steps from it."""
        quiet_libraries()
        if policy not in POLICIES:
            raise UsageError(f"guard: policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if on_unresolved not in ("block", "generate"):
            raise UsageError(f"guard: on_unresolved must be block or generate, got {on_unresolved!r}")
        if reseed_tries < 1 or optimize_steps < 0 or verify_noise < 0 or optimize_depth < 0:
            raise UsageError("guard: reseed_tries must be >= 1, optimize_steps, optimize_depth and verify_noise >= 0")
        if optimize_late is not None and not 0 < optimize_late < 1:
            raise UsageError(f"guard: optimize_late must be a share of the steps in (0, 1), got {optimize_late}")
        if optimize_late is not None and getattr(getattr(pipe, "scheduler", None), "init_noise_sigma", 1) != 1:
            raise UsageError(f"guard: optimize_late reads the latents as the UNet sees them, which "
                             f"{type(pipe.scheduler).__name__} scales; use a DDIM, DDPM, PNDM or DPM-Solver scheduler")
        self.pipe = pipe
        self.policy = policy
        self.model = _scoring_model(pipe, profile_or_model_spec)
        profile = self.model.profile
        self.method = AnisotropyMethod.from_profile(profile)
        self.t_hi, self.t_lo = _timesteps(self.model, self.method)
        self.norm_factor = norm_scale_factor(self.model, self.t_hi, self.method.norm_scale)
        if threshold is None:
            method = profile.calibration.get("method", "anisotropy")
            threshold = profile.threshold if method == "anisotropy" else None
        if threshold is None:
            raise ConfigError(f"guard: model profile {profile.name!r} has no calibrated threshold; pass threshold=")
        self.threshold = float(threshold)
        self.target = float(target) if target is not None else self.threshold
        self.reseed_tries, self.reseed_seed = reseed_tries, reseed_seed
        self.optimize_steps, self.optimize_lr, self.optimize_depth = optimize_steps, optimize_lr, optimize_depth
        self.optimize_late = optimize_late
        self.verify_noise, self.min_similarity = verify_noise, min_similarity
        self.on_unresolved = on_unresolved
        self._empty: torch.Tensor | None = None

    # ------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        **pipe_kwargs: Any,
    ) -> GuardResult:
        """Score, act per prompt, then generate the batch in one pipeline call (`pipe_kwargs` go to it)."""
        started = time.perf_counter()
        pipe = self.pipe
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for name in _PASSED_THROUGH_REFUSED:
            if pipe_kwargs.get(name) is not None:
                raise UsageError(f"guard: {name}= is not supported; pass the prompt text")
        if not prompts:
            raise UsageError("guard: no prompts")
        k = int(num_images_per_prompt)
        device = pipe._execution_device
        height = pipe_kwargs.pop("height", None) or pipe.unet.config.sample_size * pipe.vae_scale_factor
        width = pipe_kwargs.pop("width", None) or pipe.unet.config.sample_size * pipe.vae_scale_factor
        negative = pipe_kwargs.pop("negative_prompt", None)
        cross = pipe_kwargs.get("cross_attention_kwargs")
        pe, ne = pipe.encode_prompt(
            prompts, device, 1, True, negative,
            lora_scale=cross.get("scale") if cross else None, clip_skip=pipe_kwargs.get("clip_skip"),
        )
        rows = len(prompts) * k
        shape = (rows, pipe.unet.config.in_channels, int(height) // pipe.vae_scale_factor,
                 int(width) // pipe.vae_scale_factor)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=device, dtype=pe.dtype)  # = prepare_latents
        elif tuple(latents.shape) != shape:
            raise UsageError(f"guard: latents have shape {tuple(latents.shape)}, the call needs {shape}")
        latents = latents.to(device)
        noise = latents.to(self.model.dtype)  # the unit-variance x_T the score reads

        reuse = self._first_step_reusable(pipe_kwargs, negative, latents)
        cached = None
        if reuse is not None:
            pe_k, ne_k = pipe.encode_prompt(None, device, k, True, None, prompt_embeds=pe, negative_prompt_embeds=ne)
            step_input = torch.cat([latents * pipe.scheduler.init_noise_sigma] * 2)
            hidden = torch.cat([ne_k, pe_k])
            out = pipe.unet(step_input, reuse, encoder_hidden_states=hidden, return_dict=False)[0]
            cached = (step_input, reuse, hidden, out)
            hi = _as_scored(self.model, out.float(), torch.cat([noise, noise]), self.t_hi, self.method.v_convention)
            terms = self._terms(noise, pe_k, hi=(hi[rows:], hi[:rows]))
        else:
            terms = self._terms(noise, pe.repeat_interleave(k, dim=0))
        decisions = self._decide(prompts, terms, k)

        embeds, lat = pe.clone(), latents.clone()
        for d in decisions:
            if d.flagged and self.policy not in ("warn", "block"):
                self._mitigate(d, prompts[d.index], noise[d.index * k : (d.index + 1) * k], shape)
            if not d.generated:
                embeds[d.index] = ne[d.index]  # keeps the batch's shape; these rows are dropped
            elif d.embedding is not None:
                embeds[d.index] = d.embedding.to(embeds.device, embeds.dtype)[0]
            elif d.prompt_used is not None and d.prompt_used != prompts[d.index]:
                embeds[d.index] = pipe.encode_prompt([d.prompt_used], device, 1, False)[0][0]
            if d.generated and d.seed is not None:
                lat[d.index * k : (d.index + 1) * k] = self._reseed_latents(d.seed, (k, *shape[1:]), lat)
        seconds = time.perf_counter() - started

        images: list[Any] = [None] * rows
        nsfw = None
        late = [d for d in decisions if d.generated and d.embedding is not None and d.norm_fall is not None]
        if late and self.optimize_late is not None:
            pipe_kwargs = self._with_late_callback(late, k, len(prompts), pipe_kwargs)
        if any(d.generated for d in decisions):
            with _first_call_reused(pipe.unet, cached if torch.equal(lat, latents) else None):
                output = pipe(
                    prompt_embeds=embeds, negative_prompt_embeds=ne, num_images_per_prompt=k, latents=lat,
                    generator=generator, height=height, width=width, **pipe_kwargs,
                )
            generated = list(output.images)
            flags = getattr(output, "nsfw_content_detected", None)
            nsfw = list(flags) if flags is not None else None
            for d in decisions:
                if d.generated:
                    for j in range(d.index * k, (d.index + 1) * k):
                        images[j] = generated[j]
        return GuardResult(
            images=images, prompts=decisions, threshold=self.threshold, target=self.target,
            images_per_prompt=k, reused_first_step=cached is not None, seconds_guard=seconds,
            nsfw_content_detected=nsfw,
        )

    # ------------------------------------------------------------------ scoring

    def score_latents(self, prompts: Sequence[str], noise: torch.Tensor) -> list[float]:
        """Prompt scores on `noise` (len(prompts) * k rows, prompt-major), as a call would score them."""
        k = noise.shape[0] // len(prompts)
        embeds = self.pipe.encode_prompt(list(prompts), self.model.device, k, False)[0]
        terms = self._terms(noise.to(self.model.device, self.model.dtype), embeds)
        return [d.score_before for d in self._decide(list(prompts), terms, k)]

    def _empty_embeds(self) -> torch.Tensor:
        """The empty prompt's embedding (1, 77, hidden), encoded once."""
        if self._empty is None:
            from memscan.models.text import encode_prompts

            self._empty = encode_prompts(self.model, [""])
        return self._empty

    def _terms(
        self, noise: torch.Tensor, cond: torch.Tensor, hi: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (norm, alignment) of `cond` (rows, 77, h) on `noise` (rows, C, h, w); `hi` =
        (cond_hi, uncond_hi) when the t_hi predictions are already known. One UNet call."""
        model, method, rows = self.model, self.method, noise.shape[0]
        empty = self._empty_embeds().expand(rows, -1, -1)
        if hi is None:
            t = torch.tensor([self.t_hi] * 2 * rows + [self.t_lo] * 2 * rows, device=model.device)
            pred = unet_prediction(model, noise.repeat(4, 1, 1, 1), t, torch.cat([cond, empty, cond, empty]),
                                   method.v_convention)
            cond_hi, uncond_hi, cond_lo, uncond_lo = pred.split(rows)
        else:
            cond_hi, uncond_hi = hi
            t = torch.tensor([self.t_lo] * 2 * rows, device=model.device)
            cond_lo, uncond_lo = unet_prediction(
                model, noise.repeat(2, 1, 1, 1), t, torch.cat([cond, empty]), method.v_convention
            ).split(rows)
        norm = self.norm_factor * (cond_hi - uncond_hi).flatten(1).norm(dim=1)
        alignment = channel_cosine(uncond_lo, cond_lo - uncond_lo)
        return norm, alignment

    def _decide(self, prompts: list[str], terms: tuple[torch.Tensor, torch.Tensor], k: int) -> list[PromptDecision]:
        """One decision per prompt from its samples' terms: flagged when the mean score > threshold."""
        norm, alignment = (x.view(len(prompts), k) for x in terms)
        mean = self.method.combine(norm.mean(dim=1), alignment.mean(dim=1))["score"]
        each = self.method.combine(norm, alignment)["score"]
        out = []
        for i, text in enumerate(prompts):
            score = float(mean[i])
            flagged = bool(score > self.threshold)
            action = "none" if not flagged else self.policy
            out.append(PromptDecision(
                index=i, prompt=text, score_before=score, sample_scores=[float(v) for v in each[i]],
                norm=float(norm[i].mean()), alignment=float(alignment[i].mean()), flagged=flagged, action=action,
                generated=action != "block", score_after=score if action in ("none", "warn") else None,
                prompt_used=text if action != "block" else None,
            ))
        return out

    def _first_step_reusable(self, kwargs: dict[str, Any], negative: Any, latents: torch.Tensor) -> torch.Tensor | None:
        """The pipeline's first timestep (a 0-d tensor as its loop yields it) when its first UNet call is
        the score's t_hi evaluation on these latents; None when it is not."""
        pipe = self.pipe
        if (negative is not None or kwargs.get("guidance_scale", 7.5) <= 1 or kwargs.get("timesteps") is not None
                or kwargs.get("sigmas") is not None or kwargs.get("cross_attention_kwargs") is not None
                or pipe.unet.config.time_cond_proj_dim is not None or pipe.scheduler.init_noise_sigma != 1):
            return None
        scheduler = copy.deepcopy(pipe.scheduler)
        try:
            scheduler.set_timesteps(kwargs.get("num_inference_steps", 50), device=latents.device)
            first = scheduler.timesteps[0]
            same = torch.equal(scheduler.scale_model_input(latents, first), latents)
        except Exception:  # noqa: BLE001 - any scheduler we cannot replicate: no reuse, same result
            return None
        return first if same and int(first) == self.t_hi else None

    # ------------------------------------------------------------------ mitigation

    def _mitigate(self, d: PromptDecision, prompt: str, noise: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Apply the policy to one flagged prompt in place; a failure blocks that prompt only."""
        try:
            if self.policy == "reseed":
                self._reseed(d, prompt, noise.shape[0], shape)
            elif self.policy == "optimize":
                self._optimize(d, prompt, noise, shape)
            else:
                self._rewrite(d, prompt, noise, shape)
        except Exception as exc:  # noqa: BLE001 - one prompt's failure must not lose the batch
            d.error, d.resolved = one_line(exc, with_type=True, limit=300), False
            d.embedding, d.prompt_used, d.seed = None, None, None
            d.generated = False
            return
        if not d.resolved and self.on_unresolved == "block":
            d.generated = False

    def _reseed_latents(self, seed: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Fresh initial noise from `seed` (a CPU generator: the same on every device)."""
        generator = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)

    def _reseed(self, d: PromptDecision, prompt: str, k: int, shape: tuple[int, ...]) -> None:
        """New noise, seed after seed, until the prompt's score on it is under the target."""
        embeds = self.pipe.encode_prompt([prompt], self.model.device, k, False)[0]
        best: tuple[float, int] | None = None
        for attempt in range(self.reseed_tries):
            seed = self.reseed_seed + attempt
            noise = self._reseed_latents(seed, (k, *shape[1:]), embeds).to(self.model.dtype)
            norm, alignment = self._terms(noise, embeds)
            score = float(self.method.combine(norm.mean(), alignment.mean())["score"])
            if best is None or score < best[0]:
                best = (score, seed)
            if score < self.target:
                break
        assert best is not None
        d.score_after, d.seed, d.steps = best[0], best[1], attempt + 1
        d.resolved = best[0] < self.target
        d.score_verified = best[0]  # scored on the very noise that is denoised

    def _verify_bank(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        if self.verify_noise < 1:
            return None
        return noise_bank(self.verify_noise, tuple(shape[1:]), VERIFY_SEED, device=self.model.device,
                          dtype=self.model.dtype)

    def _optimize(self, d: PromptDecision, prompt: str, noise: torch.Tensor, shape: tuple[int, ...]) -> None:
        """The paper's inference-time mitigation: AdamW on the prompt embedding, the score on this
        call's noise as the loss, early stop under the target once an independent bank agrees."""
        from memscan.mitigation.differentiable import DifferentiableScore
        from memscan.mitigation.embeddings import optimise_embedding

        bank = self._verify_bank(shape)
        with _frozen(self.pipe.unet, self.pipe.text_encoder), torch.inference_mode(False):
            scoring = DifferentiableScore(SimpleNamespace(model=self.model, method=self.method, noise=noise.clone()))
            verifier = None if bank is None else DifferentiableScore(
                SimpleNamespace(model=self.model, method=self.method, noise=bank))
            result = optimise_embedding(scoring, prompt, self.target, steps=self.optimize_steps,
                                        lr=self.optimize_lr, verifier=verifier, depth=self.optimize_depth)
        d.embedding, d.prompt_used = result.embeds, None
        d.score_after, d.score_verified = result.score, result.verified
        d.steps, d.resolved = result.steps, result.resolved
        if self.optimize_late is not None and result.norm is not None and d.norm > 0:
            d.norm_fall = result.norm / d.norm  # both the score's t_hi norm, mean over this call's samples

    def _refine_late(self, d: PromptDecision, latents: torch.Tensor, t: int) -> torch.Tensor:
        """The prompt's optimised embedding, optimised again on the call's own latents at step t until its
        guidance norm there falls by `d.norm_fall`, the factor its optimisation took off the t_hi norm
        (`memscan.mitigation.late.refine_late`)."""
        from memscan.mitigation.late import refine_late

        assert d.embedding is not None and d.norm_fall is not None
        with _frozen(self.pipe.unet, self.pipe.text_encoder):
            refined, d.late_norm_ratio = refine_late(
                self.model, d.embedding, latents, t, d.norm_fall, self._empty_embeds(), steps=self.optimize_steps,
                lr=self.optimize_lr, v_convention=self.method.v_convention)
        return refined

    def _with_late_callback(self, late: list[PromptDecision], k: int, n_prompts: int,
                            pipe_kwargs: dict[str, Any]) -> dict[str, Any]:
        """`pipe_kwargs` with a step-end callback that, at step `late_index(optimize_late, steps)`, swaps each
        optimised prompt's rows of the conditional embeddings for `_refine_late`'s (the caller's own
        callback, if any, runs after it on what it returns)."""
        from memscan.mitigation.late import late_index

        kwargs = dict(pipe_kwargs)
        index = late_index(self.optimize_late, int(kwargs.get("num_inference_steps", 50)))
        user, user_inputs = kwargs.pop("callback_on_step_end", None), kwargs.pop("callback_on_step_end_tensor_inputs",
                                                                                  ["latents"])
        if user is not None and not callable(user):
            raise UsageError("guard: callback_on_step_end must be callable")
        user_inputs = list(getattr(user, "tensor_inputs", None) or user_inputs)  # diffusers' PipelineCallback objects

        def late_step(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            if step == index - 1:
                embeds = tensors["prompt_embeds"].clone()
                positive = embeds.shape[0] - n_prompts * k  # [negative, positive] under guidance, else positive only
                t = int(pipeline.scheduler.timesteps[index])
                for d in late:
                    rows = slice(d.index * k, (d.index + 1) * k)
                    try:
                        refined = self._refine_late(d, tensors["latents"][rows], t)
                    except Exception as exc:  # noqa: BLE001 - one prompt's failure must not lose the batch
                        reason = one_line(exc, with_type=True, limit=300)
                        d.error = f"optimize_late failed, generated from the first embedding: {reason}"
                        continue
                    d.late_step, d.late_embedding = index, refined.cpu()
                    embeds[positive + rows.start : positive + rows.stop] = refined.to(embeds)
                out["prompt_embeds"] = embeds
            if user is not None:
                out.update(user(pipeline, step, timestep, {**tensors, **out}) or {})
            return out

        kwargs["callback_on_step_end"] = late_step
        kwargs["callback_on_step_end_tensor_inputs"] = sorted({*user_inputs, "latents", "prompt_embeds"})
        return kwargs

    def _rewrite(self, d: PromptDecision, prompt: str, noise: torch.Tensor, shape: tuple[int, ...]) -> None:
        """memscan's text search (attribution, beam search, similarity floor) on this call's noise,
        winners confirmed on an independent bank."""
        from memscan.mitigation import rewrite_prompts
        from memscan.mitigation.settings import MitigateSettings
        from memscan.models.device import uses_channels_last
        from memscan.scorer import Scorer

        scorer = Scorer(self.model, self.method, n_noise=1, seed=VERIFY_SEED - 7919, prefetch=False,
                        channels_last=uses_channels_last(self.pipe.unet))
        scorer.noise = noise.clone()
        frame = pd.DataFrame({"prompt_id": ["0"], "prompt": [prompt]})
        settings = MitigateSettings(min_similarity=self.min_similarity, verify_noise=self.verify_noise)
        with torch.inference_mode(False):
            rows, _ = rewrite_prompts(scorer, frame, self.target, settings)
        row = rows.iloc[0]
        verified = row["score_verified"]
        d.prompt_used = str(row["rewritten"])
        d.score_after = float(row["score_after"])
        d.score_verified = None if pd.isna(verified) else float(verified)
        d.resolved = row["status"] in ("ok", "not_flagged")


# ---------------------------------------------------------------------- helpers


def _scoring_model(pipe: Any, spec: str | ModelProfile | None) -> ScoringModel:
    """The user's pipeline as a ScoringModel (nothing moved or re-configured), or a one-line refusal."""
    missing = [name for name in _REQUIRED if getattr(pipe, name, None) is None]
    if missing:
        raise ModelError(f"guard: {type(pipe).__name__} is not a Stable Diffusion pipeline: no {', '.join(missing)}")
    if not hasattr(pipe.unet, "config") or getattr(pipe.unet.config, "cross_attention_dim", None) is None:
        raise ModelError(f"guard: {type(pipe).__name__}'s unet is not a text-conditioned SD UNet")
    from diffusers import DDIMScheduler

    config = pipe.scheduler.config
    if "num_train_timesteps" not in config or "beta_schedule" not in config:
        raise ConfigError(f"guard: scheduler {type(pipe.scheduler).__name__} has no DDPM noise schedule "
                          "(num_train_timesteps, beta_schedule): the score's timesteps cannot be read")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ModelError(f"guard: the pipeline predicts {prediction!r}; the guard scores epsilon or v_prediction")
    try:
        scheduler = DDIMScheduler.from_config(config)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"guard: no DDIM schedule from scheduler {type(pipe.scheduler).__name__}: "
                          f"{one_line(exc)}") from exc
    native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    if spec is None:
        profile = default_profile_for(CUSTOM_PROFILE, prediction).with_overrides(resolution=native)
    elif isinstance(spec, ModelProfile):
        profile = spec
    else:
        from memscan.models.loading import resolve_profile

        profile = resolve_profile(spec)
    if profile.prediction_type != prediction:
        raise ConfigError(f"guard: profile {profile.name!r} scores {profile.prediction_type} but the pipeline's "
                          f"scheduler predicts {prediction}")
    unet = pipe.unet
    param = next(unet.parameters())
    return ScoringModel(
        pipeline=pipe, scheduler=scheduler, profile=profile, device=pipe._execution_device, dtype=param.dtype,
        source=profile.source, revision=profile.revision, facts={"vae_scale_factor": int(pipe.vae_scale_factor)},
    )


def _timesteps(model: ScoringModel, method: AnisotropyMethod) -> tuple[int, int]:
    """(t_hi, t_lo) of the profile's DDIM schedule, or a one-line refusal when it has no such steps."""
    try:
        return method.timesteps(model)
    except (IndexError, ValueError) as exc:
        raise ConfigError(f"guard: the DDIM schedule of {method.num_inference_steps} steps has no timesteps "
                          f"at indices {method.t_hi_index} and {method.t_lo_index}") from exc


def _as_scored(
    model: ScoringModel, out: torch.Tensor, latents: torch.Tensor, t: int, v_convention: str
) -> torch.Tensor:
    """A raw UNet output at timestep `t` as `unet_prediction` returns it (v -> epsilon unless raw)."""
    if model.profile.prediction_type != "v_prediction" or v_convention == "raw":
        return out
    abar = model.scheduler.alphas_cumprod.to(out.device)[t].float()
    return abar.sqrt() * out + (1.0 - abar).sqrt() * latents.float()


@contextmanager
def _first_call_reused(unet: torch.nn.Module, cached: tuple[torch.Tensor, ...] | None) -> Iterator[None]:
    """The UNet's next call returns `cached`'s output when its inputs are `cached`'s (sample, timestep,
    encoder states, nothing else); any other call, and every later one, runs the UNet."""
    if cached is None:
        yield
        return
    sample0, t0, hidden0, out0 = cached
    had = "forward" in vars(unet)
    original = unet.forward
    pending = [True]

    def forward(sample: Any, timestep: Any, encoder_hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
        if pending[0]:
            pending[0] = False
            extra = {k: v for k, v in kwargs.items() if k != "return_dict" and v is not None}
            if (not args and not extra and torch.is_tensor(timestep) and torch.equal(timestep, t0)
                    and torch.equal(sample, sample0) and encoder_hidden_states is not None
                    and torch.equal(encoder_hidden_states, hidden0)):
                if kwargs.get("return_dict", True):
                    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

                    return UNet2DConditionOutput(sample=out0)
                return (out0,)
        return original(sample, timestep, encoder_hidden_states, *args, **kwargs)

    unet.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had:
            unet.forward = original  # type: ignore[method-assign]
        else:
            del unet.forward


@contextmanager
def _frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """No gradients into the user's weights while an embedding is optimised; flags restored after."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
