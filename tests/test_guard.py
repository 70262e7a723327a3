"""memscan.guard on tiny SD pipelines with a VAE (epsilon SD 1, v-prediction SD 2): bit-identical
unflagged images, scores equal to the Scorer's on the same noise, and the policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memscan.errors import ConfigError, ModelError
from memscan.guard import Guard
from memscan.methods.anisotropy import AnisotropyMethod
from memscan.models.builders import build_tiny_pipeline
from memscan.models.loading import scoring_model_from_pipeline
from memscan.models.profiles import ModelProfile
from memscan.scorer import Scorer
from tests.conftest import strengthen_text_conditioning

PROMPTS = ["a photo of a cat", "a red square on a blue background", "the mona lisa"]
STEPS = 2


def _pipe(prediction_type: str = "epsilon", base: str = "sd-v1", seed: int = 0):
    pipe = build_tiny_pipeline(seed=seed, prediction_type=prediction_type, base=base, with_vae=True)
    strengthen_text_conditioning(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _profile(prediction_type: str = "epsilon", **fields: object) -> ModelProfile:
    base = ModelProfile(name="tiny", source="tiny", prediction_type=prediction_type, resolution=64)
    return base.with_overrides(**{"w_norm": 1.0, "w_align": 2.0, **fields})


@pytest.fixture(scope="module")
def pipe():
    return _pipe()


@pytest.fixture(scope="module")
def v_pipe():
    return _pipe("v_prediction", base="sd-v2", seed=1)


def _generate(pipe, prompts, seed=0, steps=STEPS, **kwargs):
    return pipe(prompts, num_images_per_prompt=2, generator=torch.Generator().manual_seed(seed),
                num_inference_steps=steps, output_type="np", **kwargs).images


def _guarded(guard, prompts=PROMPTS, seed=0, steps=STEPS, **kwargs):
    return guard(prompts, num_images_per_prompt=2, generator=torch.Generator().manual_seed(seed),
                 num_inference_steps=steps, output_type="np", **kwargs)


@pytest.mark.parametrize("steps", [STEPS, 50])
@pytest.mark.parametrize("kind", ["epsilon", "v"])
def test_unflagged_prompts_are_bit_identical_to_the_unguarded_pipeline(pipe, v_pipe, kind, steps):
    p, profile = (pipe, _profile()) if kind == "epsilon" else (v_pipe, _profile("v_prediction"))
    result = _guarded(Guard(p, profile, threshold=1e9), steps=steps)
    reference = _generate(p, PROMPTS, steps=steps)
    assert not any(d.flagged for d in result.prompts)
    assert len(result.images) == len(reference) == 6
    for got, want in zip(result.images, reference, strict=True):
        assert np.array_equal(got, want)
    # 50 DDIM steps: the first step IS the t_hi evaluation, and is reused
    assert result.reused_first_step == (steps == 50)


def test_first_step_reuse_saves_the_unet_call(pipe):
    calls = []
    handle = pipe.unet.conv_in.register_forward_hook(lambda *_: calls.append(1))
    try:
        _generate(pipe, PROMPTS, steps=50)
        unguarded = len(calls)
        calls.clear()
        _guarded(Guard(pipe, _profile(), threshold=1e9), steps=50)
    finally:
        handle.remove()
    assert unguarded == 50
    assert len(calls) == 51  # the guard's t_hi call replaces step 1; one extra call at t_lo


@pytest.mark.parametrize("kind", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [STEPS, 50])
def test_guard_score_equals_the_scorer_on_the_same_noise(pipe, v_pipe, kind, steps):
    p, profile = (pipe, _profile()) if kind == "epsilon" else (
        v_pipe, _profile("v_prediction", v_convention="raw", norm_scale="reference-v", w_align=0.1))
    guard = Guard(p, profile, threshold=1e9)
    result = _guarded(guard, steps=steps)
    latents = torch.randn((6, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # what the call drew
    model = scoring_model_from_pipeline(p, profile)
    method = AnisotropyMethod.from_profile(model.profile)
    for i, text in enumerate(PROMPTS):
        scorer = Scorer(model, method, n_noise=2)
        scorer.noise = latents[2 * i : 2 * i + 2].clone()
        want = float(scorer.score_texts([text]).columns["score"][0])
        assert result.prompts[i].score_before == pytest.approx(want, abs=1e-5)


def test_block_returns_no_image_for_the_flagged_prompt_only(pipe):
    guard = Guard(pipe, _profile(), threshold=1e9)
    scores = [d.score_before for d in _guarded(guard).prompts]
    threshold = (max(scores) + sorted(scores)[-2]) / 2  # flags exactly the top prompt
    top = int(np.argmax(scores))
    result = _guarded(Guard(pipe, _profile(), threshold=threshold, policy="block"))
    reference = _generate(pipe, PROMPTS)
    assert [d.flagged for d in result.prompts] == [i == top for i in range(3)]
    assert result.prompts[top].action == "block" and not result.prompts[top].generated
    for j, got in enumerate(result.images):
        if j // 2 == top:
            assert got is None
        else:
            assert np.array_equal(got, reference[j])
    records = result.records()
    assert records["generated"].tolist() == [j // 2 != top for j in range(6)]


def test_reseed_finds_a_seed_under_the_target(pipe):
    guard = Guard(pipe, _profile(), threshold=1e9, policy="reseed", reseed_tries=8)
    prompt = [PROMPTS[0]]
    shape = (2, 4, 8, 8)
    reseeded = [guard.score_latents(prompt, guard._reseed_latents(s, shape, torch.zeros(1)))[0] for s in range(8)]
    call = guard.score_latents(prompt, torch.randn(shape, generator=torch.Generator().manual_seed(0)))[0]
    assert min(reseeded) < call
    threshold = (min(reseeded) + min(call, min(s for s in reseeded if s > min(reseeded)))) / 2
    expected = next(s for s, v in enumerate(reseeded) if v < threshold)
    guard = Guard(pipe, _profile(), threshold=threshold, policy="reseed", reseed_tries=8)
    d = _guarded(guard, prompts=prompt).prompts[0]
    assert d.flagged and d.action == "reseed" and d.resolved and d.generated
    assert d.seed == expected and d.steps == expected + 1
    assert d.score_after == pytest.approx(reseeded[expected], abs=1e-5) and d.score_after < threshold


def test_reseed_that_finds_nothing_blocks_the_prompt_and_keeps_the_others(pipe):
    result = _guarded(Guard(pipe, _profile(), threshold=0.6, target=-100.0, policy="reseed", reseed_tries=2))
    flagged = [d for d in result.prompts if d.flagged]
    assert flagged and all(not d.resolved and not d.generated for d in flagged)
    assert all(d.generated for d in result.prompts if not d.flagged)
    assert sum(image is not None for image in result.images) == 2 * (3 - len(flagged))


@pytest.mark.parametrize("kind", ["epsilon", "v"])
def test_optimize_lowers_the_score_under_the_target(pipe, v_pipe, kind):
    p, profile = (pipe, _profile()) if kind == "epsilon" else (v_pipe, _profile("v_prediction"))
    scores = [d.score_before for d in _guarded(Guard(p, profile, threshold=1e9)).prompts]
    top = int(np.argmax(scores))
    target = scores[top] - 0.2
    # the tiny v model's score is mostly alignment: its norm term needs ~250 steps, not the default 50, to fall
    guard = Guard(p, profile, threshold=max(s for i, s in enumerate(scores) if i != top) + 1e-3, target=target,
                  policy="optimize", verify_noise=2, optimize_steps=400)
    result = _guarded(guard)
    d = result.prompts[top]
    assert d.flagged and d.action == "optimize" and d.resolved and d.generated
    assert d.score_after < target and d.score_verified is not None and d.score_verified < target
    assert d.embedding is not None and d.embedding.shape[0] == 1
    # the score of the embedding generated from, re-read on the call's noise, is the one reported
    noise = torch.randn((6, 4, 8, 8), generator=torch.Generator().manual_seed(0))[2 * top : 2 * top + 2]
    norm, align = guard._terms(noise, d.embedding.repeat(2, 1, 1))
    assert float(guard.method.combine(norm.mean(), align.mean())["score"]) == pytest.approx(d.score_after, abs=1e-4)
    assert all(image is not None for image in result.images)


def test_a_failing_mitigation_blocks_only_its_prompt(pipe, monkeypatch):
    guard = Guard(pipe, _profile(), threshold=0.6, policy="optimize")

    def boom(*_a, **_k):
        raise RuntimeError("exploded")

    monkeypatch.setattr(guard, "_optimize", boom)
    result = _guarded(guard)
    reference = _generate(pipe, PROMPTS)
    flagged = [d.index for d in result.prompts if d.flagged]
    assert flagged
    for d in result.prompts:
        if d.flagged:
            assert not d.generated and d.error == "RuntimeError: exploded"
    for j, got in enumerate(result.images):
        assert (got is None) == (j // 2 in flagged)
        if got is not None:
            assert np.array_equal(got, reference[j])


def test_rewrite_generates_from_a_rewritten_prompt(pipe):
    scores = [d.score_before for d in _guarded(Guard(pipe, _profile(), threshold=1e9)).prompts]
    top = int(np.argmax(scores))
    guard = Guard(pipe, _profile(), threshold=scores[top] - 1e-3, target=scores[top] - 0.1, policy="rewrite",
                  verify_noise=2, min_similarity=0.0)
    d = _guarded(guard).prompts[top]
    assert d.flagged and d.action == "rewrite"
    assert d.prompt_used != PROMPTS[top]
    assert d.resolved and d.score_after < guard.target and d.generated


class NotAPipeline:
    unet = None


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda p: Guard(NotAPipeline(), threshold=1.0), ModelError, "is not a Stable Diffusion pipeline"),
        (lambda p: Guard(p, _profile("v_prediction"), threshold=1.0), ConfigError, "scores v_prediction"),
        (lambda p: Guard(p, _profile(num_inference_steps=2), threshold=1.0), ConfigError, "has no timesteps"),
        (lambda p: Guard(p, _profile()), ConfigError, "no calibrated threshold"),
        (lambda p: Guard(p, _profile(), threshold=1.0, policy="nuke"), Exception, "policy must be one of"),
    ],
)
def test_refusals_are_one_line(pipe, make, error, words):
    with pytest.raises(error) as info:
        make(pipe)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_scheduler_without_a_noise_schedule_is_refused(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    other = _pipe()
    other.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ConfigError, match="has no DDPM noise schedule") as info:
        Guard(other, threshold=1.0)
    assert "\n" not in str(info.value)


def test_optimize_leaves_the_users_weights_untouched(pipe):
    before = [p.requires_grad for p in pipe.unet.parameters()]
    guard = Guard(pipe, _profile(), threshold=0.0, policy="optimize", optimize_steps=2, verify_noise=0)
    _guarded(guard, prompts=PROMPTS[:1])
    assert [p.requires_grad for p in pipe.unet.parameters()] == before
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_optimize_late_refines_the_flagged_prompts_embedding_on_the_calls_own_latents(pipe):
    steps = 10
    scores = [d.score_before for d in _guarded(Guard(pipe, _profile(), threshold=1e9), steps=steps).prompts]
    top = int(np.argmax(scores))
    threshold = max(s for i, s in enumerate(scores) if i != top) + 1e-3
    settings = {"threshold": threshold, "policy": "optimize", "verify_noise": 0, "on_unresolved": "generate"}
    plain = _guarded(Guard(pipe, _profile(), **settings), steps=steps)
    seen: list[int] = []

    def user_callback(_pipe, step, _t, tensors):  # the caller's own callback still runs, on the swapped tensors
        seen.append(step)
        return {}

    late = _guarded(Guard(pipe, _profile(), optimize_late=0.6, **settings), steps=steps,
                    callback_on_step_end=user_callback)
    d = late.prompts[top]
    assert d.flagged and d.generated and d.embedding is not None and d.late_step == 6
    assert d.late_embedding is not None and d.late_embedding.shape == d.embedding.shape
    assert d.norm_fall is not None and 0 < d.norm_fall < 1
    assert d.late_norm_ratio is not None and d.late_norm_ratio <= d.norm_fall + 1e-6
    assert seen == list(range(steps))
    records = late.records()
    assert records.loc[records["prompt_index"] == top, "late_step"].tolist() == [6, 6]
    rows = slice(2 * top, 2 * top + 2)
    assert not np.array_equal(np.stack(late.images[rows]), np.stack(plain.images[rows]))
    reference = _generate(pipe, PROMPTS, steps=steps)
    for j, image in enumerate(late.images):  # the prompts that were not flagged: the unguarded images
        if j // 2 != top:
            assert np.array_equal(image, reference[j])


def test_optimize_late_refusals_are_one_line(pipe):
    from diffusers import EulerDiscreteScheduler

    from memscan.errors import UsageError

    with pytest.raises(UsageError, match="share of the steps"):
        Guard(pipe, _profile(), threshold=1.0, policy="optimize", optimize_late=1.5)
    euler = _pipe()
    euler.scheduler = EulerDiscreteScheduler.from_config(euler.scheduler.config)
    with pytest.raises(UsageError, match="EulerDiscreteScheduler scales"):
        Guard(euler, _profile(), threshold=1.0, policy="optimize", optimize_late=0.6)


def test_a_failing_late_refinement_keeps_the_batch(pipe, monkeypatch):
    steps = 4
    scores = [d.score_before for d in _guarded(Guard(pipe, _profile(), threshold=1e9), steps=steps).prompts]
    top = int(np.argmax(scores))
    guard = Guard(pipe, _profile(), threshold=max(s for i, s in enumerate(scores) if i != top) + 1e-3,
                  policy="optimize", verify_noise=0, on_unresolved="generate", optimize_late=0.5)
    monkeypatch.setattr(guard, "_refine_late", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    result = _guarded(guard, steps=steps)
    d = result.prompts[top]
    assert d.generated and d.late_step is None and "optimize_late failed" in d.error and "boom" in d.error
    assert all(image is not None for image in result.images)
