"""The `sharpness` method computes the reference code's detection score, transcribed here independently.

The reference (Dongjae0324/sharpness_memorization_diffusion: `detect_mem.py`, and the detection
branch of `LocalStableDiffusionPipeline.__call__` in `local_model/pipe.py`) scores one prompt at a
time, its `gen_num` noises (`num_images_per_prompt`) in one batch, at DDIM's first timestep t of 50
steps (`hvp_sampling_num = 1`, its default and its README's setting), on x = x_T:

- with a = sqrt(abar_t), b = sqrt(1 - abar_t), its "score" of a UNet output is
  `-out / b` when `sd_ver == 1` (SD 1, epsilon), and `(a * out - x) / b**2` otherwise (SD 2, v),
  where that x is a constant of the differentiated function (the batch's input, not its argument);
- `diff = score_c - score_u`, and `jvp` of `x -> score(unet(cat[x, x], t, [∅ .. ∅, c .. c]))` at x
  along `diff` gives `(h_u, h_c)`;
- `|| h_c - h_u ||_2` per noise, averaged over the noises (and over its `hvp_sampling_num` steps).

Below, those lines are written out again on a float64 copy of the tiny UNet and compared with
memscan's scorer, which runs its JVP in float32: h_c - h_u is a small difference of two larger
Hessian-vector products, so fp32 rounding there is amplified relative to it (about 6e-7 measured
on these pipelines); rtol 1e-5 leaves room for that, not for a wrong scale or timestep.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from memscan.methods import method_for
from memscan.models.loading import ScoringModel, scoring_model_from_pipeline
from memscan.models.profiles import available_profiles, load_profile
from memscan.scorer import Scorer

PROMPTS = ["a photo of a cat", "The No Limits Business Woman Podcast", "an astronaut riding a horse on mars"]

# The reference branch (its `sd_ver`) each shipped profile's sharpness reproduces. The paper ran SD 1.4
# (1) and SD 2 (2). `realistic-vision` takes the v-branch as in its anisotropy reference (every
# sd_ver but 1), `demo` and `sd-v2-base` memscan's own convention, which on epsilon is branch 1.
REFERENCE_BRANCH = {"sd-v1-4": 1, "sd-v1-5": 1, "demo": 1, "sd-v2-base": 1, "sd-v2": 2, "realistic-vision": 2}
# memscan's own convention on a v-model (v converted to epsilon, s = -eps / sigma_t): the true score's
# Hessian, sigma_t² times the reference's SD 2 number at the same t (so the same ranking).
OWN_CONVENTION = {"valid-v"}


def reference_sharpness(model: ScoringModel, unet64: torch.nn.Module, prompt: str, noise: torch.Tensor,
                        sd_ver: int) -> float:
    """One prompt as the reference scores it, in float64 (n noises = its gen_num)."""
    tokenizer, encoder, scheduler = model.tokenizer, model.text_encoder, model.scheduler

    def embed(text: str) -> torch.Tensor:
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return encoder(ids)[0].double()

    ipp = noise.shape[0]
    with torch.no_grad():
        prompt_embeds = torch.cat([embed("").repeat(ipp, 1, 1), embed(prompt).repeat(ipp, 1, 1)])
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[0]
    abar = scheduler.alphas_cumprod.double()[t]
    beta, beta_prod = abar.sqrt(), (1 - abar).sqrt()
    latent_model_input = torch.cat([noise.double()] * 2)  # DDIM's scale_model_input is the identity

    def unet(x: torch.Tensor) -> torch.Tensor:
        return unet64(x, t, encoder_hidden_states=prompt_embeds).sample

    def score_of(out: torch.Tensor) -> torch.Tensor:
        return -out / beta_prod if sd_ver == 1 else (beta * out - latent_model_input) / beta_prod**2

    with torch.no_grad():
        score_u, score_c = score_of(unet(latent_model_input)).chunk(2)
    with sdpa_kernel([SDPBackend.MATH]):
        _, tangent = jvp(lambda x: score_of(unet(torch.cat([x, x]))), (latent_model_input[:ipp],),
                         (score_c - score_u,))
    h_u, h_c = tangent.chunk(2)
    return float(torch.norm((h_c - h_u).view(ipp, -1), dim=1).mean())


@pytest.fixture(scope="module")
def unets64(tiny_model: ScoringModel, tiny_v_model: ScoringModel) -> dict[str, torch.nn.Module]:
    """float64 copies of the two tiny UNets, by prediction type."""
    return {m.profile.prediction_type: copy.deepcopy(m.unet).double() for m in (tiny_model, tiny_v_model)}


def _profile_model(name: str, tiny_model: ScoringModel, tiny_v_model: ScoringModel, kind: str) -> ScoringModel:
    """The shipped profile `name`'s scoring settings on the tiny pipeline of prediction type `kind`."""
    base = tiny_v_model if kind == "v_prediction" else tiny_model
    profile = load_profile(name).with_overrides(source="tiny", resolution=base.profile.resolution)
    return scoring_model_from_pipeline(base.pipeline, profile)


def _memscan_and_reference(model: ScoringModel, unet64: torch.nn.Module, sd_ver: int, n_noise: int,
                           batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """memscan's sharpness scores of PROMPTS and the reference's, on the same noise bank."""
    scorer = Scorer(model, method_for("sharpness", model.profile), n_noise=n_noise, batch_size=batch_size)
    result = scorer.score_texts(PROMPTS)
    assert (result.status == "ok").all(), result.error
    got = torch.from_numpy(result.columns["score"]).double()
    want = torch.tensor([reference_sharpness(model, unet64, p, scorer.noise, sd_ver) for p in PROMPTS],
                        dtype=torch.float64)
    return got, want


def test_every_shipped_profile_names_its_reference_branch() -> None:
    assert set(REFERENCE_BRANCH) | OWN_CONVENTION == set(available_profiles())


@pytest.mark.parametrize(
    ("name", "kind"),
    [("sd-v1-4", "epsilon"), ("sd-v1-5", "epsilon"), ("demo", "epsilon"), ("sd-v2-base", "epsilon"),
     ("sd-v2", "v_prediction"), ("realistic-vision", "epsilon")],
)
@pytest.mark.parametrize(("n_noise", "batch_size"), [(1, 1), (3, 2)])
def test_shipped_profile_sharpness_equals_reference_branch(
    tiny_model: ScoringModel, tiny_v_model: ScoringModel, unets64: dict[str, torch.nn.Module],
    name: str, kind: str, n_noise: int, batch_size: int,
) -> None:
    model = _profile_model(name, tiny_model, tiny_v_model, kind)
    got, want = _memscan_and_reference(model, unets64[kind], REFERENCE_BRANCH[name], n_noise, batch_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


# memscan's own convention on a v-model, v_convention -> memscan's number / the reference's SD 2 number:
# s = -pred / sigma_t on v converted to epsilon (the true score's Hessian), or on raw v (sharpness v1).
OWN_RATIO = {"epsilon": lambda abar: 1.0 - abar, "raw": lambda abar: (1.0 - abar) / abar}


@pytest.mark.parametrize(
    ("name", "v_convention"), [("valid-v", None), ("sd-v2", "epsilon"), ("sd-v2", "raw")],
)
def test_own_convention_on_v_is_a_constant_multiple_of_the_reference(
    tiny_model: ScoringModel, tiny_v_model: ScoringModel, unets64: dict[str, torch.nn.Module], name: str,
    v_convention: str | None,
) -> None:
    """norm_scale "none" on a v-model is not the reference's number but a constant multiple of it at
    the fixed t (981 here), so it ranks prompts exactly as the reference does."""
    model = _profile_model(name, tiny_model, tiny_v_model, "v_prediction")
    profile = model.profile.with_overrides(v_convention=v_convention, norm_scale="none")
    model = scoring_model_from_pipeline(model.pipeline, profile)
    got, want = _memscan_and_reference(model, unets64["v_prediction"], 2, 2, 2)
    ratio = OWN_RATIO[profile.v_convention](float(model.scheduler.alphas_cumprod[981].double()))
    torch.testing.assert_close(got, ratio * want, rtol=1e-5, atol=0)
    assert not torch.allclose(got, want, rtol=1e-3)
