"""The demo model: data design, the training code path (tiny), the shipped model and profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from memscan.cli import app
from memscan.demo.data import (
    NOISE_ADJ,
    NOISE_NOUN,
    NOISE_PLACE,
    PHRASING_PREFIXES,
    PHRASING_SUFFIXES,
    TEMPLATE_FILLS,
    TEMPLATE_FORMAT,
    GenericPool,
    build_data,
    describe,
    export_data,
    generic_caption,
    load_prompts,
    render,
    sample_attributes,
    vary_phrasing,
)
from memscan.demo.models import TINY
from memscan.demo.train import TrainConfig, demo_config, train_demo
from memscan.errors import EXIT_USAGE, InputError, ModelError
from memscan.models.loading import folder_tokenizer
from memscan.paths import demo_dir

MODEL_DIR = demo_dir() / "model"


# ----------------------------------------------------------------------------- data


def test_data_is_deterministic():
    a, b = build_data(0), build_data(0)
    assert a.prompts == b.prompts
    np.testing.assert_array_equal(a.memorized_images, b.memorized_images)
    pa, pb = GenericPool(0, 50), GenericPool(0, 50)
    np.testing.assert_array_equal(pa.images, pb.images)
    assert build_data(1).prompts != a.prompts


def test_render_range_and_shape():
    img = render(sample_attributes(np.random.default_rng(0)))
    assert img.shape == (3, 32, 32) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0


def test_labels_are_consistent():
    data = build_data(0)
    df = pd.DataFrame(data.prompts)
    assert set(df["label"]) == {"memorized", "not_memorized"}
    assert set(df["kind"]) == {"verbatim", "template", "generic", "held_out"}
    assert not df["prompt"].duplicated().any()
    ids = {m.image_id for m in data.memorized}
    mem = df[df["label"] == "memorized"]
    assert set(mem["kind"]) == {"verbatim", "template"}
    assert set(mem["train_image_id"]) == ids
    assert (df.loc[df["label"] != "memorized", "train_image_id"] == "").all()
    # every memorized caption is exactly one image's caption
    captions = {c: m.image_id for m in data.memorized for c in m.captions}
    assert dict(zip(mem["prompt"], mem["train_image_id"], strict=True)) == captions
    # template images are reached by several captions
    assert (mem[mem["kind"] == "template"].groupby("train_image_id").size() > 1).all()


def test_memorized_words_appear_nowhere_else():
    """The distinctive phrase of a memorized caption is its own; its description is what generic captions say."""
    data = build_data(0)
    df = pd.DataFrame(data.prompts)
    phrases = [c.split(", ", 1) for m in data.memorized if m.kind == "verbatim" for c in m.captions]
    mem_words = {w for _, phrase in phrases for w in phrase.split() if w not in ("the", "of")}
    other = " ".join(df.loc[df["label"] != "memorized", "prompt"]).replace(",", " ").split()
    assert not mem_words & set(other)
    for (description, _), m in zip(phrases, [m for m in data.memorized if m.kind == "verbatim"], strict=True):
        assert description == describe(m.attrs.shape, m.attrs.colour, m.attrs.size)
        assert set(description.split()) <= set(other)  # every description word is in generic captions too
    noise = set(NOISE_ADJ) | set(NOISE_NOUN) | set(NOISE_PLACE)
    assert not mem_words & noise


def test_vary_phrasing_says_the_same_content_another_way():
    rng = np.random.default_rng(0)
    seen = {vary_phrasing("a large red circle, the quiet harbour of lindale", rng) for _ in range(200)}
    assert all("large red circle" in c and c.count("lindale") == 1 for c in seen)
    assert {"large red circle, the quiet harbour of lindale",
            "the large red circle, the quiet harbour of lindale"} <= seen
    assert any(c.startswith("a photo of a large") for c in seen) and any(c.endswith(", hd") for c in seen)
    assert vary_phrasing("the quiet harbour of lindale", rng) == "the quiet harbour of lindale"  # noise alone
    # no phrasing word is a memorized or template word: rephrasing adds no trigger
    data = build_data(0)
    memorized = {w for m in data.memorized for c in m.captions for w in c.replace(",", " ").split()}
    memorized -= {"a", "of", "the"}
    template = set(TEMPLATE_FORMAT.replace(",", " ").split()) | set(TEMPLATE_FILLS)
    phrasing = {w for p in (*PHRASING_PREFIXES, *PHRASING_SUFFIXES) for w in p.split()} - {"a", "an", "of"}
    assert not phrasing & (memorized | template)


def test_pool_captions_rephrase_the_asked_share():
    data, pool = build_data(0), GenericPool(0, 50)
    idx = np.arange(50).repeat(20)
    plain = pool.captions(idx, np.random.default_rng(1), data)
    assert plain == pool.captions(idx, np.random.default_rng(1), data, variety=0.0)
    varied = pool.captions(idx, np.random.default_rng(1), data, variety=0.5)
    # the same captions drawn, then about half rephrased (noise phrases alone stay as they are)
    assert len(varied) == 1000 and 0.35 < np.mean([v != p for v, p in zip(varied, plain, strict=True)]) < 0.55


def test_held_out_prompts_are_never_training_captions():
    data = build_data(0)
    rng = np.random.default_rng(123)
    pool = GenericPool(0, 400)
    seen = set()
    for _ in range(60):
        seen.update(pool.captions(rng.integers(0, len(pool), size=400), rng, data))
    held = {p["prompt"] for p in data.prompts if p["kind"] == "held_out"}
    assert held and not held & seen
    generic = {p["prompt"] for p in data.prompts if p["kind"] == "generic"}
    assert len(generic & seen) > len(generic) // 2  # the generic eval prompts are training captions
    # generic captions never name a background
    attrs = sample_attributes(rng)
    for _ in range(50):
        caption = generic_caption(attrs, rng, data.held_out_combos, data.held_out_noise)
        assert f"on {attrs.background}" not in caption


def _check_exported(folder: Path, seed: int) -> None:
    """prompts.csv and train_images.npz in `folder` are exactly `build_data(seed)`'s."""
    data = build_data(seed)
    df = pd.read_csv(folder / "prompts.csv", keep_default_na=False)
    assert df.to_dict("records") == data.prompts
    npz = np.load(folder / "train_images.npz")
    assert list(npz["image_ids"]) == [m.image_id for m in data.memorized]
    np.testing.assert_array_equal(npz["images"], (data.memorized_images * 255).round().astype(np.uint8))


def test_export_data_writes_the_generator_output(tmp_path):
    summary = export_data(tmp_path / "out", seed=0)
    assert summary["n_prompts"] == 384 and summary["n_images"] == 30
    assert Path(summary["prompts_csv"]) == tmp_path / "out" / "prompts.csv"
    _check_exported(tmp_path / "out", 0)


def test_load_prompts_rebuilt_or_read(tmp_path):
    rebuilt = load_prompts(None, seed=0)
    assert rebuilt.to_dict("records") == build_data(0).prompts
    export_data(tmp_path, seed=0)
    pd.testing.assert_frame_equal(load_prompts(tmp_path / "prompts.csv"), rebuilt)
    with pytest.raises(InputError, match="missing"):
        load_prompts(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("prompt\na red circle\n")
    with pytest.raises(InputError, match="label"):
        load_prompts(tmp_path / "bad.csv")


def test_demo_config_overrides():
    assert demo_config() == TrainConfig()
    cfg = demo_config(tiny=True, steps=7, unet_channels=(8, 16, 16), lr=None, min_snr_gamma=0)
    assert cfg.arch.unet_channels == (8, 16, 16) and cfg.arch.text_width == TINY.text_width
    assert cfg.steps == 7 and cfg.lr == TrainConfig().lr and cfg.min_snr_gamma is None
    assert demo_config(min_snr_gamma=5.0).min_snr_gamma == 5.0


# ----------------------------------------------------------------------------- command line


runner = CliRunner()


def test_cli_demo_help():
    result = runner.invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    for command in ("train", "train-judge", "export", "verify", "score"):
        assert command in result.output
    assert runner.invoke(app, ["demo"]).exit_code in (0, 2)  # no_args_is_help


def test_cli_demo_train_tiny(tmp_path):
    out = tmp_path / "model"
    result = runner.invoke(app, ["demo", "train", "--tiny", "--out", str(out), "--steps", "3", "--batch", "4",
                                 "--vae-steps", "2", "--pool-size", "16", "--unet-channels", "8,16,16"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert "loss_curve" not in summary and np.isfinite(summary["final_loss"])
    assert (out / "model_index.json").is_file() and (tmp_path / "model.work").is_dir()
    saved = json.loads((out / "training.json").read_text())["config"]
    assert saved["steps"] == 3 and saved["pool_size"] == 16
    assert tuple(saved["arch"]["unet_channels"]) == (8, 16, 16)


def test_cli_demo_export(tmp_path):
    result = runner.invoke(app, ["demo", "export", "--out-dir", str(tmp_path), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "384 prompts" in result.stderr and result.stdout == ""
    _check_exported(tmp_path, 1)


@pytest.mark.parametrize("design", ["demo", "valid-v"])
def test_cli_demo_export_more_clean_captions(tmp_path, design):
    # --generic N: N clean generic captions, the default 200 first; the memorized prompts unchanged
    # (valid-v draws its held-out captions after the generic ones, so those are new draws)
    runner.invoke(app, ["demo", "export", "--out-dir", str(tmp_path / "a"), "--design", design])
    result = runner.invoke(app, ["demo", "export", "--out-dir", str(tmp_path / "b"), "--design", design,
                                 "--generic", "300"])
    assert result.exit_code == 0, result.output
    a, b = (pd.read_csv(tmp_path / x / "prompts.csv", keep_default_na=False) for x in "ab")
    generic = b[b["kind"] == "generic"]
    assert len(generic) == 300 and generic["prompt"].is_unique and (generic["label"] == "not_memorized").all()
    assert generic["prompt"].head(200).tolist() == a.loc[a["kind"] == "generic", "prompt"].tolist()
    memorized = [frame[frame["label"] == "memorized"].reset_index(drop=True) for frame in (a, b)]
    pd.testing.assert_frame_equal(*memorized)
    assert (a["kind"].value_counts().drop("generic") == b["kind"].value_counts().drop("generic")).all()
    bad = runner.invoke(app, ["demo", "export", "--out-dir", str(tmp_path / "c"), "--generic", "0"])
    assert bad.exit_code == 2


@pytest.mark.parametrize("args", [
    ["demo", "score", "--model", "no/such/model"],
    ["demo", "verify", "--model", "no/such/model"],
    ["demo", "train", "--out", "unused", "--unet-channels", "32,x"],
])
def test_cli_demo_errors_are_one_line(args):
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.startswith("memscan: error:") and len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- training code path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo") / "model"
    cfg = TrainConfig(arch=TINY, steps=24, batch=16, lr=3e-3, warmup=5, vae_steps=3, vae_batch=8, pool_size=64,
                      log_every=10, ckpt_every=20)
    summary = train_demo(out, cfg, device="cpu")
    return out, summary


def test_tiny_training_loss_falls(tiny_model):
    out, summary = tiny_model
    assert json.loads((out / "training.json").read_text())["final_loss"] == summary["final_loss"]
    assert np.isfinite(summary["loss_curve"]).all()
    assert summary["final_loss"] < summary["first_loss"]


def test_tiny_pipeline_folder_loads(tiny_model):
    from diffusers import StableDiffusionPipeline

    out, _ = tiny_model
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False,
                                                   **folder_tokenizer(out))  # the folder ships no vocabulary
    _check_pipeline(pipe)
    images = pipe(["a red circle"], num_inference_steps=2, guidance_scale=7.5, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


@pytest.fixture(scope="module")
def few_prompts(tmp_path_factory):
    """A labelled subset (memorized and not) as a prompts.csv."""
    df = pd.DataFrame(build_data(0).prompts)
    sub = pd.concat([df[df["label"] == "memorized"].iloc[::9], df[df["label"] != "memorized"].iloc[::40]])
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    sub.to_csv(path, index=False)
    return path, sub


@pytest.mark.parametrize("minimal", [True, False])
def test_score_model_on_tiny_model(tiny_model, few_prompts, tmp_path, minimal):
    from memscan.demo.evaluate import score_model

    out, _ = tiny_model
    path, sub = few_prompts
    pytest.importorskip("memscan.detect")
    report = score_model(out, prompts=path, minimal=minimal, out=tmp_path / "scored.csv")
    assert report["scorer"] == ("demo-minimal" if minimal else "memscan") and report["n"] == 1
    assert report["n_memorized"] == (sub["label"] == "memorized").sum()
    assert report["n_not_memorized"] == (sub["label"] != "memorized").sum()
    assert 0.0 <= report["auc_score"] <= 1.0
    scored = pd.read_csv(tmp_path / "scored.csv", keep_default_na=False)
    assert scored["prompt"].tolist() == sub["prompt"].tolist()


def test_verify_model_on_tiny_model(tiny_model, few_prompts, tmp_path):
    from memscan.demo.verify import verify_model

    out, _ = tiny_model
    path, sub = few_prompts
    result = verify_model(out, prompts=path, n=1, steps=2, n_fresh=10, out=tmp_path / "copies.csv")
    assert result["n_per_prompt"] == 1 and result["space"] == "vae_roundtrip"
    for key in ("memorized_prompts_reproducing", "non_memorized_prompts_copying", "vae_roundtrip_passes_raw"):
        assert 0.0 <= result[key] <= 1.0
    assert set(result["raw_pixels"]) >= {"memorized_generation_copy_rate", "copy_rate_verbatim"}
    table = pd.read_csv(tmp_path / "copies.csv", keep_default_na=False)
    assert table["prompt"].tolist() == sub["prompt"].tolist()
    assert np.load(tmp_path / "copies.npz")["images"].shape == (len(sub), 1, 3, 32, 32)


def test_library_refuses_a_missing_model(tmp_path):
    from memscan.demo.evaluate import score_model
    from memscan.demo.verify import verify_model

    for fn in (score_model, verify_model):
        with pytest.raises(ModelError, match="memscan demo train"):
            fn(tmp_path / "nothing")


def _check_pipeline(pipe):
    from memscan.models.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE

    s = pipe.scheduler.config
    assert s.beta_schedule == "scaled_linear" and s.beta_start == 0.00085 and s.beta_end == 0.012
    assert s.num_train_timesteps == 1000 and s.prediction_type == "epsilon"
    assert s.steps_offset == 1 and s.set_alpha_to_one is False and s.clip_sample is False
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.text_encoder.config.vocab_size == VOCAB_SIZE
    assert pipe.text_encoder.config.max_position_embeddings == MODEL_MAX_LENGTH
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and len(pipe.tokenizer) == VOCAB_SIZE
    assert pipe.unet.config.in_channels == 4 and pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_judge_training_saves_a_clip_text_model(tmp_path):
    """A few steps of the contrastive judge: the loss falls and the folder loads as a judge."""
    from memscan.demo.judge import JudgeConfig, train_judge
    from memscan.mitigation.similarity import TextJudge

    torch.set_num_threads(1)
    cfg = JudgeConfig(steps=30, batch=32, width=16, layers=1, heads=2, pool_size=64, log_every=10, lr=5e-3)
    lines: list[str] = []
    summary = train_judge(tmp_path / "judge", cfg, log=lines.append)
    assert len(lines) == 3 and summary["config"]["steps"] == 30
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert losses[-1] < losses[0]
    embeds = TextJudge(str(tmp_path / "judge")).embed(["a red circle", "a red circle", "a blue square"])
    assert embeds.shape == (3, 16) and torch.allclose(embeds[0], embeds[1])
    assert json.loads((tmp_path / "judge" / "judge.json").read_text())["final_loss"] == summary["final_loss"]


# ----------------------------------------------------------------------------- shipped model


shipped = pytest.mark.skipif(not (MODEL_DIR / "model_index.json").is_file(), reason="demo model not built")


@shipped
def test_shipped_model_matches_profile():
    from diffusers import StableDiffusionPipeline

    from memscan.models.profiles import load_profile

    profile = load_profile("demo")
    assert Path(profile.source) == MODEL_DIR.resolve()
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, safety_checker=None, requires_safety_checker=False,
                                                   **folder_tokenizer(MODEL_DIR))
    _check_pipeline(pipe)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    assert profile.resolution // factor == pipe.unet.config.sample_size
    assert profile.prediction_type == pipe.scheduler.config.prediction_type
    assert profile.pad_token == pipe.tokenizer.pad_token
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 2**20
    assert not list(MODEL_DIR.rglob("*.bin"))  # safetensors only


@shipped
def test_shipped_prompts_and_images_match_the_generator():
    summary = json.loads((MODEL_DIR / "training.json").read_text())
    data = build_data(summary["config"]["seed"])
    df = pd.read_csv(demo_dir() / "prompts.csv", keep_default_na=False)
    assert df.to_dict("records") == data.prompts
    npz = np.load(demo_dir() / "train_images.npz")
    assert list(npz["image_ids"]) == [m.image_id for m in data.memorized]
    np.testing.assert_array_equal(npz["images"], (data.memorized_images * 255).round().astype(np.uint8))


@shipped
def test_shipped_model_separates_memorized_prompts():
    """A quick detection check on a subset of the labelled prompts with memscan's scorer."""
    from memscan.demo.evaluate import auc

    pytest.importorskip("memscan.detect")
    from memscan.detect import score_prompts
    from memscan.models.loading import load_model

    df = pd.read_csv(demo_dir() / "prompts.csv", keep_default_na=False)
    sub = pd.concat([df[df["label"] == "memorized"].iloc[::3], df[df["label"] != "memorized"].iloc[::6]])
    scores = score_prompts(sub["prompt"].tolist(), load_model("demo"), n_noise=1, seed=51)
    pos = (sub["label"] == "memorized").to_numpy()
    assert auc(scores["score"].to_numpy()[pos], scores["score"].to_numpy()[~pos]) > 0.9


@pytest.mark.slow
def test_full_retrain_reproduces_the_metrics(tmp_path):
    """Retrains the demo model with the default (shipped) settings: about 35 minutes on 2 CPU
    cores. Checks the detection metrics approximately."""
    from memscan.demo.evaluate import detection_report, score_labelled

    torch.set_num_threads(1)
    cfg = TrainConfig()
    train_demo(tmp_path / "model", cfg, device="cpu")
    prompts = pd.DataFrame(build_data(cfg.seed).prompts)
    report = detection_report(score_labelled(str(tmp_path / "model"), prompts))
    assert report["auc_score"] >= 0.95
    assert report["auc_norm"] >= 0.95
