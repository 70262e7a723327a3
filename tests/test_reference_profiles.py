"""Every shipped profile computes the reference code's score, transcribed here independently.

The reference (rohanasthana/memorization-anisotropy, MIT: `local_model/pipe.py`, the detection
branch of `LocalStableDiffusionPipeline.__call__`, and `detect_eval.py`) scores one prompt at a
time, its `num_images_per_prompt` noises in one batch, with two branches chosen by `sd_ver`:

- `sd_ver == 1` (SD v1.x): norm of `out_c - out_u` at t_hi, channel cosine of `(out_u, out_c - out_u)`
  at t_lo, on the raw model output (epsilon);
- every other `sd_ver` (2 = SD 2, 99 = Realistic Vision, an epsilon model): the norm of its
  "score" difference, `(sqrt(abar) * out - x) / sqrt(1 - abar) ** 2` for c minus the same for ∅, at
  t_hi; the cosine again on the raw model output;

then `score = g1 * mean(norm) + g2 * mean(cosine)` with its hard-coded weights. Below, those lines
are written out again from the reference (in float64 on the fp32 UNet outputs), not through
memscan's scorer, and each shipped profile must match them to 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memscan.methods import method_for
from memscan.models.loading import ScoringModel, scoring_model_from_pipeline
from memscan.models.profiles import available_profiles, load_profile
from memscan.scorer import Scorer

PROMPTS = [
    "a photo of a cat",
    "The No Limits Business Woman Podcast",
    "masterpiece, [blurry], a cat",
    "Living in the light with Ann Graham Lotz",
    "an astronaut riding a horse on mars",
]

# Which reference branch (its `sd_ver`) each shipped profile claims. `demo` and `sd-v2-base` are
# not in the paper: they follow memscan's own convention, which on an epsilon model is the
# reference's SD 1 definition.
REFERENCE_BRANCH = {
    "sd-v1-4": 1, "sd-v1-5": 1, "sd-v2": 2, "realistic-vision": 99, "demo": 1, "sd-v2-base": 1,
}
# Not reference profiles: memscan's own convention on a v-prediction model (v converted to epsilon,
# unscaled norm), which equals no branch of the reference code. Checked against memscan's own
# yardstick, `memscan.methods.anisotropy.reference_score`, instead.
OWN_CONVENTION = {"valid-v": "v_prediction"}
# The weights hard-coded in the reference's detect_eval.py, per sd_ver.
REFERENCE_WEIGHTS = {1: (1.0, 2.0), 2: (1.0, 0.1), 99: (2.0, 1.0)}


def reference_score(model: ScoringModel, prompt: str, noise: torch.Tensor, sd_ver: int, g1: float, g2: float) -> float:
    """One prompt, as the reference scores it (n noises = its num_images_per_prompt)."""
    unet, scheduler, tokenizer, encoder = model.unet, model.scheduler, model.tokenizer, model.text_encoder

    def embed(text: str) -> torch.Tensor:
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return encoder(ids)[0]

    ipp = noise.shape[0]
    prompt_embeds = torch.cat([embed("").repeat(ipp, 1, 1), embed(prompt).repeat(ipp, 1, 1)])
    scheduler.set_timesteps(50)
    t, t_cosine = scheduler.timesteps[0], scheduler.timesteps[-3]
    latent_model_input = torch.cat([noise] * 2)  # DDIM's scale_model_input is the identity
    with torch.no_grad():
        out = unet(latent_model_input, t, encoder_hidden_states=prompt_embeds).sample.double()
        out_cosine = unet(latent_model_input, t_cosine, encoder_hidden_states=prompt_embeds).sample.double()
    x = latent_model_input.double()
    abar = scheduler.alphas_cumprod.double()
    beta, beta_prod = torch.sqrt(abar[t]), torch.sqrt(1 - abar[t])
    if sd_ver == 1:
        uc_eps, c_eps = out.chunk(2)
        comb = c_eps - uc_eps
    else:
        score_uc, score_c = ((beta * out - x) / (beta_prod**2)).chunk(2)
        comb = score_c - score_uc
    uc_cos, c_cos = out_cosine.chunk(2)
    cosine = F.cosine_similarity(uc_cos, c_cos - uc_cos, dim=1)  # (ipp, H, W)
    norm = torch.norm(comb.view(ipp, -1), dim=1).mean()
    cos = torch.stack([c.mean() for c in cosine]).mean()
    return float(g1 * norm + g2 * cos)


def _profile_model(name: str, base: ScoringModel) -> ScoringModel:
    """The shipped profile `name`'s scoring settings on a tiny pipeline."""
    profile = load_profile(name).with_overrides(source="tiny", resolution=base.profile.resolution)
    return scoring_model_from_pipeline(base.pipeline, profile)


def test_every_shipped_profile_names_its_reference_branch() -> None:
    assert not set(REFERENCE_BRANCH) & set(OWN_CONVENTION)
    assert set(REFERENCE_BRANCH) | set(OWN_CONVENTION) == set(available_profiles())


@pytest.mark.parametrize("name", sorted(OWN_CONVENTION))
@pytest.mark.parametrize(("n_noise", "batch_size"), [(1, 1), (4, 3)])
def test_own_convention_profile_equals_memscans_reference_score(
    tiny_model: ScoringModel, tiny_v_model: ScoringModel, name: str, n_noise: int, batch_size: int,
) -> None:
    """A profile in memscan's own convention scores as memscan's slow yardstick does, and not as
    any branch of the reference code."""
    from memscan.methods.anisotropy import reference_score as memscan_reference_score
    from memscan.models.text import encode_prompts

    model = _profile_model(name, tiny_v_model if OWN_CONVENTION[name] == "v_prediction" else tiny_model)
    assert model.profile.prediction_type == OWN_CONVENTION[name]
    assert (model.profile.v_convention, model.profile.norm_scale) == ("epsilon", "none")
    method = method_for("anisotropy", model.profile)
    scorer = Scorer(model, method, n_noise=n_noise, batch_size=batch_size)
    got = torch.from_numpy(scorer.score_texts(PROMPTS).columns["score"]).double()
    want = torch.tensor([memscan_reference_score(method, model, scorer.noise, encode_prompts(model, [p]))["score"]
                         for p in PROMPTS], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g1, g2 = model.profile.w_norm, model.profile.w_align
    for branch in (1, 2):
        other = reference_score(model, PROMPTS[0], scorer.noise, branch, g1, g2)
        assert abs(float(got[0]) - other) > 1e-3


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sd-v1-4", "epsilon"), ("sd-v1-5", "epsilon"), ("demo", "epsilon"), ("sd-v2-base", "epsilon"),
        ("sd-v2", "v_prediction"), ("sd-v2", "epsilon"),
        ("realistic-vision", "epsilon"), ("realistic-vision", "v_prediction"),
    ],
)
@pytest.mark.parametrize(("n_noise", "batch_size"), [(1, 1), (1, 4), (4, 3)])
def test_shipped_profile_equals_reference_branch(
    tiny_model: ScoringModel, tiny_v_model: ScoringModel, name: str, kind: str, n_noise: int, batch_size: int,
) -> None:
    model = _profile_model(name, tiny_model if kind == "epsilon" else tiny_v_model)
    branch = REFERENCE_BRANCH[name]
    g1, g2 = (model.profile.w_norm, model.profile.w_align)
    if name in ("sd-v1-4", "sd-v1-5", "sd-v2", "realistic-vision"):  # the paper's models: its weights too
        assert (g1, g2) == REFERENCE_WEIGHTS[branch]
    scorer = Scorer(model, method_for("anisotropy", model.profile), n_noise=n_noise, batch_size=batch_size)
    got = torch.from_numpy(scorer.score_texts(PROMPTS).columns["score"]).double()
    want = torch.tensor([reference_score(model, p, scorer.noise, branch, g1, g2) for p in PROMPTS], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reference_v_norm_scale_is_0_076438_on_sd_schedule(tiny_v_model: ScoringModel) -> None:
    """The constant the issue measured: sqrt(abar)/(1 - abar) at t = 981 of SD's scaled-linear schedule."""
    from memscan.methods.anisotropy import norm_scale_factor

    assert norm_scale_factor(tiny_v_model, 981, "reference-v") == pytest.approx(0.076438, abs=5e-7)
    assert norm_scale_factor(tiny_v_model, 981, "none") == 1.0


def test_v_convention_epsilon_stays_available_for_other_models(tiny_v_model: ScoringModel) -> None:
    """memscan's own convention (v converted to epsilon, unscaled norm) is not the reference's."""
    profile = load_profile("sd-v2").with_overrides(
        source="tiny", resolution=tiny_v_model.profile.resolution, v_convention="epsilon", norm_scale="none",
    )
    model = scoring_model_from_pipeline(tiny_v_model.pipeline, profile)
    scorer = Scorer(model, method_for("anisotropy", model.profile))
    got = scorer.score_texts(PROMPTS[:2]).columns["score"]
    want = [reference_score(model, p, scorer.noise, 2, 1.0, 0.1) for p in PROMPTS[:2]]
    assert abs(float(got[0]) - want[0]) > 1e-3  # a different number, on purpose
