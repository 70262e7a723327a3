"""Baseline methods: registry and specs, agreement with anisotropy's terms, Wen's trajectory against
diffusers' own sampler, sharpness against finite differences, declared costs."""

from __future__ import annotations

import pytest
import torch
from conftest import strengthen_text_conditioning

from memscan.errors import UsageError
from memscan.methods import (
    AnisotropyMethod,
    DetectionMethod,
    SharpnessMethod,
    WenMethod,
    available_methods,
    method_for,
    parse_method_spec,
)
from memscan.models.builders import build_tiny_pipeline
from memscan.models.loading import ScoringModel, scoring_model_from_pipeline
from memscan.models.noise import noise_bank
from memscan.models.profiles import ModelProfile
from memscan.models.text import encode_prompts
from memscan.scorer import Scorer

PROMPTS = ["a photo of a cat", "the mona lisa by leonardo da vinci", "an astronaut riding a horse", "x"]


def _scores(model: ScoringModel, spec: str, n_noise: int = 2, batch_size: int = 3) -> dict[str, torch.Tensor]:
    scored = Scorer(model, method_for(spec, model.profile), n_noise=n_noise, batch_size=batch_size).score_texts(PROMPTS)
    assert (scored.status == "ok").all(), scored.error
    return {k: torch.from_numpy(v) for k, v in scored.columns.items()}


def test_registry_methods_follow_the_protocol(tiny_model: ScoringModel) -> None:
    assert set(available_methods()) >= {"anisotropy", "wen", "norm", "alignment", "sharpness"}
    for name in available_methods():
        method = method_for(name, tiny_model.profile)
        assert isinstance(method, DetectionMethod)
        assert "score" in method.columns and method.name == name
        assert method.unet_evals_per_prompt(4) >= 4 and method.shared_unet_evals(4) >= 4
        assert method.run_facts()["method"] == name


def test_method_specs_carry_options(tiny_model: ScoringModel) -> None:
    assert parse_method_spec("wen:steps=10, guidance_scale=5.5") == ("wen", {"steps": 10, "guidance_scale": 5.5})
    wen = method_for("wen:steps=3", tiny_model.profile)
    assert isinstance(wen, WenMethod) and wen.steps == 3 and wen.unet_evals_per_prompt(2) == 2 * 5
    with pytest.raises(UsageError, match="does not take options"):
        method_for("anisotropy:steps=3", tiny_model.profile)
    with pytest.raises(UsageError, match="key=value"):
        method_for("wen:steps", tiny_model.profile)
    with pytest.raises(UsageError, match="steps must be between"):
        method_for("wen:steps=0", tiny_model.profile)
    with pytest.raises(UsageError, match="unknown method"):
        method_for("nope", tiny_model.profile)


@pytest.mark.parametrize("kind", ["epsilon", "v_epsilon", "v_raw"])
def test_single_terms_and_wen_equal_the_anisotropy_terms(
    tiny_model: ScoringModel, tiny_v_model: ScoringModel, kind: str
) -> None:
    model = tiny_model if kind == "epsilon" else tiny_v_model
    model.profile = model.profile.with_overrides(v_convention="raw" if kind == "v_raw" else "epsilon")
    try:
        both = _scores(model, "anisotropy")
        for spec, column in (("norm", "norm"), ("wen", "norm"), ("alignment", "alignment")):
            torch.testing.assert_close(_scores(model, spec)["score"], both[column], rtol=1e-5, atol=1e-6)
    finally:
        model.profile = model.profile.with_overrides(v_convention="epsilon")


def test_wen_multistep_follows_the_diffusers_sampler(tiny_model: ScoringModel) -> None:
    """Averaged guidance norm over the first 3 steps of the guided DDIM trajectory that
    StableDiffusionPipeline itself samples (its latents captured by a step callback)."""
    steps, prompt = 3, PROMPTS[1]
    method = WenMethod(steps=steps)
    noise = noise_bank(1, tiny_model.latent_shape, 51)
    pipe = tiny_model.pipeline
    cond, uncond = encode_prompts(tiny_model, [prompt]), encode_prompts(tiny_model, [""])
    latents: list[torch.Tensor] = [noise]
    saved = pipe.scheduler
    pipe.scheduler = type(tiny_model.scheduler).from_config(tiny_model.scheduler.config)
    try:
        with torch.inference_mode():
            pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise.clone(), num_inference_steps=50,
                 guidance_scale=7.5, output_type="latent",
                 callback_on_step_end=lambda _p, i, _t, kw: latents.append(kw["latents"].clone()) or kw)
    finally:
        pipe.scheduler = saved
    tiny_model.scheduler.set_timesteps(50)
    norms = []
    with torch.inference_mode():
        for x, t in zip(latents[:steps], tiny_model.scheduler.timesteps[:steps], strict=True):
            e_c = tiny_model.unet(x, t, encoder_hidden_states=cond).sample
            e_u = tiny_model.unet(x, t, encoder_hidden_states=uncond).sample
            norms.append((e_c - e_u).flatten().norm())
        got = method.score(tiny_model, method.prepare(tiny_model, noise), noise, cond)["score"]
    torch.testing.assert_close(got, torch.stack(norms).mean().reshape(1), rtol=1e-4, atol=1e-6)


def _float64_model() -> ScoringModel:
    pipeline = build_tiny_pipeline(seed=0, dtype=torch.float64)
    strengthen_text_conditioning(pipeline.unet)
    profile = ModelProfile(name="tiny64", source="tiny", resolution=int(pipeline.unet.config.sample_size) * 8)
    return scoring_model_from_pipeline(pipeline, profile, dtype=torch.float64)


def test_sharpness_matches_finite_differences() -> None:
    """|| (J_c - J_u) Δε || / σ² with J Δε from central differences of the UNet along Δε (float64)."""
    model = _float64_model()
    method = SharpnessMethod()
    noise = noise_bank(2, model.latent_shape, 51, dtype=torch.float64)
    embeds = encode_prompts(model, PROMPTS[:3])
    with torch.inference_mode():  # as the Scorer calls it
        state = method.prepare(model, noise)
        got = method.score(model, state, noise, embeds)["score"]
    empty = encode_prompts(model, [""])

    def eps(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return model.unet(x, state.t, encoder_hidden_states=e).sample

    h, want = 1e-4, []
    with torch.no_grad():
        for b in range(len(embeds)):
            per_noise = []
            for k in range(noise.shape[0]):
                x, c = noise[k : k + 1], embeds[b : b + 1]
                d = eps(x, c) - eps(x, empty)
                hvp = (eps(x + h * d, c) - eps(x - h * d, c) - eps(x + h * d, empty) + eps(x - h * d, empty)) / (2 * h)
                per_noise.append(hvp.flatten().norm() / state.sigma**2)
            want.append(torch.stack(per_noise).mean())
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-4, atol=0)
    assert state.t == 981 and got.min() > 0


def test_sharpness_runs_in_the_scorer_and_v_conventions_differ_by_a_constant(tiny_v_model: ScoringModel) -> None:
    epsilon = Scorer(tiny_v_model, SharpnessMethod(v_convention="epsilon"), n_noise=2).score_texts(PROMPTS)
    raw = Scorer(tiny_v_model, SharpnessMethod(v_convention="raw"), n_noise=2).score_texts(PROMPTS)
    assert (epsilon.status == "ok").all() and (raw.status == "ok").all(), epsilon.error
    abar = float(tiny_v_model.scheduler.alphas_cumprod[981])
    torch.testing.assert_close(
        torch.from_numpy(epsilon.columns["score"]), abar * torch.from_numpy(raw.columns["score"]), rtol=1e-3, atol=0,
    )


@pytest.mark.parametrize(("spec", "per_prompt", "shared"), [
    ("norm", 1, 1), ("alignment", 1, 1), ("wen", 1, 1), ("wen:steps=3", 5, 1), ("anisotropy", 2, 2),
])
def test_declared_cost_is_what_runs(tiny_model: ScoringModel, spec: str, per_prompt: int, shared: int) -> None:
    samples: list[int] = []
    hook = tiny_model.unet.register_forward_hook(lambda _m, args, _o: samples.append(args[0].shape[0]))
    n_noise = 2
    try:
        scorer = Scorer(tiny_model, method_for(spec, tiny_model.profile), n_noise=n_noise, batch_size=2)
        scorer.score_texts(PROMPTS)
    finally:
        hook.remove()
    method = scorer.method
    assert samples[0] == method.shared_unet_evals(n_noise) == shared * n_noise
    assert sum(samples[1:]) == len(PROMPTS) * method.unet_evals_per_prompt(n_noise)
    assert method.unet_evals_per_prompt(n_noise) == per_prompt * n_noise


def test_sharpness_cost_counts_the_jvp_as_two_evaluations(tiny_model: ScoringModel) -> None:
    method = method_for("sharpness", tiny_model.profile)
    assert isinstance(method, SharpnessMethod)
    assert method.unet_evals_per_prompt(1) == 1 + 2 * 2 and method.shared_unet_evals(1) == 1
    assert AnisotropyMethod().unet_evals_per_prompt(1) < method.unet_evals_per_prompt(1)
