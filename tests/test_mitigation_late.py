"""Late embeddings: trajectories as the pipeline denoises them, the guidance norm falls at the late
step, the swap callback, and `mitigate --embedding-late` saving them beside the first embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from memscan.cli import app
from memscan.mitigation.embeddings import embedding_facts, load_embeddings, load_late_embeddings
from memscan.mitigation.late import LATE_PREFIX, denoise_to, late_callback, late_index, refine_late
from memscan.models.builders import build_tiny_pipeline
from memscan.models.loading import ScoringModel, scoring_model_from_pipeline
from memscan.models.profiles import ModelProfile
from memscan.models.text import encode_prompts
from tests.conftest import strengthen_text_conditioning

PROMPT = "the mona lisa by leonardo da vinci"
runner = CliRunner()


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def model(request: pytest.FixtureRequest) -> ScoringModel:
    base = "sd-v1" if request.param == "epsilon" else "sd-v2"
    pipe = build_tiny_pipeline(seed=0, prediction_type=request.param, base=base, with_vae=True)
    strengthen_text_conditioning(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    profile = ModelProfile(name="tiny", source="tiny", prediction_type=request.param, resolution=64)
    return scoring_model_from_pipeline(pipe, profile)


def _noise(model: ScoringModel, rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((rows, *model.latent_shape), generator=torch.Generator().manual_seed(seed))


def test_late_index_stays_inside_the_schedule() -> None:
    assert late_index(0.6, 50) == 30 and late_index(0.01, 50) == 1 and late_index(0.99, 50) == 49
    assert late_index(0.5, 2) == 1


def test_denoise_to_gives_the_pipelines_own_latents(model: ScoringModel) -> None:
    """The offline trajectory is what a DDIM pipeline call holds entering the late step."""
    from diffusers import DDIMScheduler

    pipe = model.pipeline
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    embeds, empty = encode_prompts(model, [PROMPT]), encode_prompts(model, [""])
    noise, seen = _noise(model, 2), {}

    def capture(_p, step, t, tensors):
        seen.setdefault(step, (tensors["latents"].clone(), int(t)))
        return {}

    pipe(prompt_embeds=embeds.expand(2, -1, -1), negative_prompt_embeds=empty.expand(2, -1, -1), latents=noise,
         num_inference_steps=6, guidance_scale=5.0, output_type="latent", callback_on_step_end=capture)
    latents, t = denoise_to(model, embeds, empty, noise, n_steps=6, index=4, guidance=5.0)
    assert t == int(pipe.scheduler.timesteps[4])
    torch.testing.assert_close(latents, seen[3][0], rtol=1e-4, atol=1e-5)


def test_refine_late_lowers_the_guidance_norm_at_the_late_step(model: ScoringModel) -> None:
    embeds, empty = encode_prompts(model, [PROMPT]), encode_prompts(model, [""])
    latents, t = denoise_to(model, embeds, empty, _noise(model, 2), n_steps=6, index=4, guidance=5.0)
    refined, ratio = refine_late(model, embeds, latents, t, 0.8, empty, steps=200, lr=0.05,
                                 v_convention=model.profile.v_convention)
    assert ratio is not None and ratio <= 0.8
    assert torch.equal(refined[:, 0], embeds[:, 0].float())  # BOS untouched
    unchanged, one = refine_late(model, embeds, latents, t, 1.0, empty, steps=5)
    assert one == 1.0 and torch.equal(unchanged, embeds.float())  # already there: no step taken
    capped, _ = refine_late(model, embeds, latents, t, 0.0, empty, steps=2)
    assert not torch.equal(capped, embeds.float())  # the budget ends it


def test_late_callback_swaps_the_conditional_half_from_the_late_step(model: ScoringModel) -> None:
    pipe = model.pipeline
    first, empty = encode_prompts(model, [PROMPT]), encode_prompts(model, [""])
    other = encode_prompts(model, ["a red square on a blue background"])
    kwargs = {"negative_prompt_embeds": empty.expand(2, -1, -1), "num_inference_steps": 4, "guidance_scale": 5.0,
              "output_type": "latent", "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}

    def run(late: torch.Tensor, seen: list | None = None) -> torch.Tensor:
        def record(_p, step, _t, tensors):
            if seen is not None:
                seen.append((step, tensors["prompt_embeds"].clone()))
            return {}

        return pipe(prompt_embeds=first.expand(2, -1, -1), latents=_noise(model, 2),
                    callback_on_step_end=late_callback(late.expand(2, -1, -1), 2, then=record), **kwargs).images

    plain = pipe(prompt_embeds=first.expand(2, -1, -1), latents=_noise(model, 2), **kwargs).images
    torch.testing.assert_close(run(first), plain, rtol=0, atol=0)  # the same embedding: the same latents
    seen: list = []
    assert not torch.equal(run(other, seen), plain)
    before, after = dict(seen)[0], dict(seen)[1]  # after step 1 (index 2 - 1) the swap is in place
    assert torch.equal(before[2:], first.expand(2, -1, -1)) and torch.equal(after[2:], other.expand(2, -1, -1))
    assert torch.equal(after[:2], empty.expand(2, -1, -1))  # the negative half is kept


def test_mitigate_saves_late_embeddings_beside_the_first(tiny_model_dir: Path, prompts_csv: Path,
                                                         tmp_path: Path) -> None:
    out, emb = tmp_path / "m.parquet", tmp_path / "e.safetensors"
    args = ["mitigate", str(prompts_csv), "--model", str(tiny_model_dir), "--target", "0", "-o", str(out),
            "--id-column", "id", "--max-edits", "1", "--beam-width", "2", "--emit-embeddings", str(emb),
            "--embedding-steps", "2", "--embedding-late", "0.5", "--generation-steps", "4", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pandas()
    attempted = rows["status"] != "skipped_empty"
    first = load_embeddings(emb)
    late, made_for = load_late_embeddings(emb)
    assert set(first) == set(late) == set(rows.loc[attempted, "prompt_id"]) and len(first) == 4
    assert not any(key.startswith(LATE_PREFIX) for key in first)
    assert made_for == {"share": 0.5, "late_index": 2, "num_inference_steps": 4, "guidance_scale": 7.5,
                        "scheduler": "DDIM", "late_noise": 4}
    assert embedding_facts(emb)["late"] == made_for and "model" in embedding_facts(emb)
    for key in first:
        assert late[key].shape == first[key].shape and torch.equal(late[key][:, 0], first[key][:, 0])
    ratios = rows["embedding_late_norm_ratio"].to_numpy(dtype=float)
    assert np.isfinite(ratios[attempted]).all() and np.isnan(ratios[~attempted]).all()
    assert json.loads(result.stdout)["attempted"] == 4


def test_late_embedding_refusals_are_one_line(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    base = ["mitigate", str(prompts_csv), "--model", str(tiny_model_dir), "--target", "0",
            "-o", str(tmp_path / "m.parquet"), "--id-column", "id"]
    for extra, needle in ((["--embedding-late", "0.6"], "--emit-embeddings"),
                          (["--embedding-late", "1.2", "--emit-embeddings", str(tmp_path / "e.safetensors")], "(0, 1)"),
                          (["--embedding-late", "0.6", "--emit-embeddings", str(tmp_path / "e.safetensors"),
                            "--generation-steps", "1"], "--generation-steps")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.parquet").exists()


def test_a_file_without_late_embeddings_reads_as_none(tmp_path: Path) -> None:
    from memscan.mitigation.embeddings import save_embeddings

    save_embeddings(tmp_path / "e.safetensors", {"a": torch.zeros(1, 77, 8)}, {"target": 0.5})
    assert load_late_embeddings(tmp_path / "e.safetensors") == ({}, {})
    assert set(load_embeddings(tmp_path / "e.safetensors")) == {"a"}
