"""The anisotropy score: batched shared-unconditional scorer vs the per-prompt reference."""

from __future__ import annotations

import pytest
import torch

from memscan.methods.anisotropy import AnisotropyMethod, channel_cosine, reference_score, unet_prediction
from memscan.models.loading import ScoringModel
from memscan.models.text import encode_prompts
from memscan.scorer import Scorer

PROMPTS = [
    "a photo of a cat",
    "a red square on a blue background",
    "the mona lisa by leonardo da vinci",
    "an astronaut riding a horse",
    "a photo of a cat",
    "Living in the light with Ann Graham Lotz",
    "abstract painting, oil on canvas",
    "x",
]


def _reference(method: AnisotropyMethod, model: ScoringModel, noise: torch.Tensor) -> list[dict[str, float]]:
    with torch.inference_mode():
        return [reference_score(method, model, noise, encode_prompts(model, [p])) for p in PROMPTS]


@pytest.mark.parametrize("n_noise", [1, 4])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("kind", ["epsilon", "v_epsilon", "v_raw"])
def test_batched_scorer_equals_per_prompt_reference(
    tiny_model: ScoringModel, tiny_v_model: ScoringModel, kind: str, batch_size: int, n_noise: int
) -> None:
    model = tiny_model if kind == "epsilon" else tiny_v_model
    method = AnisotropyMethod(w_norm=1.0, w_align=2.0, v_convention="raw" if kind == "v_raw" else "epsilon")
    scorer = Scorer(model, method, n_noise=n_noise, batch_size=batch_size)
    got = scorer.score_texts(PROMPTS)
    want = _reference(method, model, scorer.noise)
    for name in ("norm", "alignment", "score"):
        expected = torch.tensor([w[name] for w in want])
        torch.testing.assert_close(torch.from_numpy(got.columns[name]), expected, rtol=0, atol=1e-5)
    assert got.columns["norm"].min() > 0


def test_score_does_not_depend_on_batch_or_neighbours(tiny_model: ScoringModel) -> None:
    method = AnisotropyMethod.from_profile(tiny_model.profile)
    alone = Scorer(tiny_model, method, batch_size=1).score_texts(["a photo of a cat"]).columns["score"][0]
    for batch_size in (2, 5, 8):
        crowd = Scorer(tiny_model, method, batch_size=batch_size).score_texts(PROMPTS[1:4] + ["a photo of a cat"])
        assert crowd.columns["score"][-1] == pytest.approx(alone, abs=1e-5)


def test_prompts_differ_and_weights_combine(tiny_model: ScoringModel) -> None:
    method = AnisotropyMethod(w_norm=1.5, w_align=-3.0)
    got = Scorer(tiny_model, method).score_texts(PROMPTS).columns
    assert len(set(got["score"].round(6).tolist())) == len(set(PROMPTS))
    torch.testing.assert_close(
        torch.from_numpy(got["score"]), torch.from_numpy(1.5 * got["norm"] - 3.0 * got["alignment"]),
    )
    assert ((got["alignment"] >= -1) & (got["alignment"] <= 1)).all()


def test_sd_timesteps_are_981_and_41(tiny_model: ScoringModel) -> None:
    assert AnisotropyMethod().timesteps(tiny_model) == (981, 41)
    assert AnisotropyMethod(t_lo_index=-1).timesteps(tiny_model) == (981, 1)


def test_channel_cosine_is_per_pixel_not_global() -> None:
    # pixel 0: u and g parallel (cos 1); pixel 1: orthogonal (cos 0) and much larger
    u = torch.tensor([[[[1.0, 0.0]], [[0.0, 10.0]]]])  # (1, C=2, H=1, W=2)
    g = torch.tensor([[[[1.0, 10.0]], [[0.0, 0.0]]]])
    assert channel_cosine(u, g).item() == pytest.approx(0.5)
    global_cos = torch.nn.functional.cosine_similarity(u.flatten(1), g.flatten(1)).item()
    assert global_cos == pytest.approx(1 / 101)


def test_v_prediction_converts_to_epsilon(tiny_v_model: ScoringModel) -> None:
    x = torch.randn(2, *tiny_v_model.latent_shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([981, 41])
    emb = encode_prompts(tiny_v_model, ["a cat", "a dog"])
    with torch.inference_mode():
        v = unet_prediction(tiny_v_model, x, t, emb, "raw")
        eps = unet_prediction(tiny_v_model, x, t, emb, "epsilon")
    abar = tiny_v_model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, abar.sqrt() * v + (1 - abar).sqrt() * x)


def test_unconditional_pass_runs_once_and_duplicates_are_scored_once(tiny_model: ScoringModel) -> None:
    samples: list[int] = []
    hook = tiny_model.unet.register_forward_hook(lambda _m, args, _o: samples.append(args[0].shape[0]))
    try:
        n_noise = 2
        scorer = Scorer(tiny_model, AnisotropyMethod(), n_noise=n_noise, batch_size=3)
        scored = scorer.score_texts(PROMPTS)
        scorer.score_texts(PROMPTS[:2])
    finally:
        hook.remove()
    unique = len(set(PROMPTS))
    assert scored.unique == unique
    # one shared unconditional call (2n samples), then 2n conditional samples per unique prompt
    assert samples[0] == 2 * n_noise
    assert sum(samples) == 2 * n_noise + 2 * n_noise * (unique + 2)
    assert scorer.method.unet_evals_per_prompt(n_noise) == 2 * n_noise
