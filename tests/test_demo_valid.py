"""valid-v, the second test model (issue 12, item 3): its data, the design switch, the v-prediction
training path (tiny), and the shipped model, profile and labelled prompts."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from memscan.cli import app
from memscan.demo import valid
from memscan.demo.data import PROMPT_COLUMNS
from memscan.demo.train import TrainConfig, demo_config, design_module, train_demo, training_target
from memscan.errors import EXIT_USAGE, UsageError
from memscan.paths import data_dir

VALID_DIR = data_dir() / "valid-v"
runner = CliRunner()


# ----------------------------------------------------------------------------- data


def test_data_is_deterministic_for_a_seed():
    a, b, c = valid.build_data(0), valid.build_data(0), valid.build_data(1)
    assert a.prompts == b.prompts
    np.testing.assert_array_equal(a.memorized_images, b.memorized_images)
    assert a.prompts != c.prompts
    assert not np.array_equal(a.memorized_images, c.memorized_images)
    pool_a, pool_b = valid.GenericPool(0, 50), valid.GenericPool(0, 50)
    np.testing.assert_array_equal(pool_a.images, pool_b.images)


def test_labelled_prompt_counts():
    df = pd.DataFrame(valid.build_data(0).prompts)
    counts = Counter(zip(df["label"], df["kind"], strict=True))
    assert counts == {("memorized", "verbatim"): 20, ("memorized", "template"): 20,
                      ("not_memorized", "generic"): 200, ("not_memorized", "held_out"): 120}
    assert df["prompt"].is_unique
    mem = df[df["label"] == "memorized"]
    assert (mem["train_image_id"] != "").all() and mem["train_image_id"].nunique() == 25
    assert (df.loc[df["label"] != "memorized", "train_image_id"] == "").all()


def test_attributes_are_readable_from_renders():
    """The rule-based reader reads back every named attribute of the memorized images and of
    500 random scenes (every kind)."""
    data = valid.build_data(0)
    for m in data.memorized:
        assert valid.read_key(m.image) == m.attrs.key(), m.captions[0]
    rng = np.random.default_rng(7)
    scenes = [valid.sample_scene(rng) for _ in range(500)]
    assert {s.kind for s in scenes} == set(valid.KINDS)
    wrong = [s.key() for s in scenes if valid.read_key(valid.render(s)) != s.key()]
    assert wrong == []


def test_memorized_captions_describe_their_image():
    for m in valid.build_data(0).memorized:
        description = valid.describe(m.attrs.key())
        assert all(c.endswith(description) or c.startswith(description) for c in m.captions)
        assert m.image.shape == (3, 32, 32) and m.image.dtype == np.float32
        assert 0.0 <= m.image.min() and m.image.max() <= 1.0


def test_memorized_names_appear_in_no_other_caption():
    data = valid.build_data(0)
    pool = valid.GenericPool(0, 2000)
    rng = np.random.default_rng(3)
    training = pool.captions(np.arange(len(pool)), rng, data, variety=0.5)
    others = [p["prompt"] for p in data.prompts if p["label"] != "memorized"] + training
    other_words = {w for c in others for w in c.split()}
    for m in data.memorized:
        if m.kind == "verbatim":
            name = m.captions[0].rsplit(" by ", 1)[1].split()
        else:
            name = [m.captions[0].split()[1]]  # the template's subject
        assert not set(name) & other_words, name
    # the "by <name>" form is not a memorized pattern only
    assert any(" by " in c for c in training) and any(c.startswith("by ") for c in training)


def test_held_out_prompts_are_never_training_captions():
    data = valid.build_data(0)
    pool = valid.GenericPool(0, 3000)
    rng = np.random.default_rng(4)
    training = set(pool.captions(np.arange(len(pool)), rng, data, variety=0.5))
    held = [p["prompt"] for p in data.prompts if p["kind"] == "held_out"]
    assert len(held) == 120 and not set(held) & training
    names = {m.group(1) for c in training for m in [re.search(r"\bby (\w+ \w+)", c)] if m}
    assert len(names) > 20
    assert not names & set(data.held_out_noise)


def test_fresh_renders_share_the_named_attributes_only():
    scene = valid.build_data(0).memorized[0].attrs
    fresh = valid.fresh_renders(scene, 20, seed=1)
    assert {valid.read_key(img) for img in fresh} == {scene.key()}
    assert not any(np.array_equal(img, valid.render(scene)) for img in fresh)


def test_export_writes_the_generator_output(tmp_path):
    summary = valid.export_data(tmp_path, seed=0)
    assert summary["n_prompts"] == 360 and summary["n_images"] == 25
    df = pd.read_csv(tmp_path / "prompts.csv", keep_default_na=False)
    assert df.to_dict("records") == valid.build_data(0).prompts
    assert valid.load_prompts(tmp_path / "prompts.csv").equals(df)


# ----------------------------------------------------------------------------- design switch


def test_default_design_is_the_demo():
    assert demo_config() == TrainConfig()
    assert TrainConfig().design == "demo" and TrainConfig().prediction_type == "epsilon"
    cfg = demo_config(design="valid-v")
    assert cfg.design == "valid-v" and cfg.prediction_type == "v_prediction"
    assert demo_config(design="valid-v", tiny=True, steps=5).steps == 5
    assert design_module("valid-v") is valid
    with pytest.raises(UsageError, match="unknown design"):
        demo_config(design="nope")


def test_training_target_is_the_velocity_for_v_prediction():
    from memscan.demo.models import build_scheduler

    sched = build_scheduler("v_prediction")
    assert sched.config.prediction_type == "v_prediction"
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(training_target(sched, x0, noise, t, "v_prediction"), want)
    assert training_target(sched, x0, noise, t, "epsilon") is noise
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(sched, x0, noise, t, "sample")


def test_cli_rejects_an_unknown_design(tmp_path):
    result = runner.invoke(app, ["demo", "train", "--design", "nope", "--out", str(tmp_path / "m")])
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.startswith("memscan: error:") and len(result.stderr.strip().splitlines()) == 1


def test_cli_export_valid(tmp_path):
    result = runner.invoke(app, ["demo", "export", "--design", "valid-v", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "360 prompts" in result.stderr
    npz = np.load(tmp_path / "train_images.npz")
    assert npz["images"].shape == (25, 3, 32, 32) and npz["images"].dtype == np.uint8


# ----------------------------------------------------------------------------- tiny training


@pytest.fixture(scope="module")
def tiny_v_model(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("valid") / "model"
    cfg = demo_config(design="valid-v", tiny=True, steps=20, batch=16, lr=3e-3, warmup=5, vae_steps=3,
                      vae_batch=8, pool_size=64, log_every=10, ckpt_every=10)
    return out, train_demo(out, cfg, device="cpu")


def test_tiny_training_writes_a_loadable_v_prediction_folder(tiny_v_model):
    import memscan

    out, summary = tiny_v_model
    assert summary["config"]["design"] == "valid-v" and np.isfinite(summary["loss_curve"]).all()
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["_class_name"] == "DDIMScheduler"
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["special_tokens_map.json",
                                                                      "tokenizer_config.json"]
    model = memscan.load_model(str(out))
    assert model.profile.prediction_type == "v_prediction"
    ids = model.tokenizer(["a night sky over lime hills"]).input_ids[0]
    assert len(ids) > 5  # the shipped CLIP vocabulary, not a 2-token stand-in


def test_verify_runs_on_the_tiny_v_model(tiny_v_model, tmp_path):
    from memscan.demo.verify import verify_model

    out, _ = tiny_v_model
    df = pd.DataFrame(valid.build_data(0).prompts)
    sub = pd.concat([df[df["label"] == "memorized"].iloc[::10], df[df["label"] != "memorized"].iloc[::80]])
    sub.to_csv(tmp_path / "p.csv", index=False)
    result = verify_model(out, prompts=tmp_path / "p.csv", n=1, steps=2, n_fresh=10, design="valid-v")
    assert 0.0 <= result["memorized_prompts_reproducing"] <= 1.0
    assert set(result) >= {"copy_rate_verbatim", "copy_rate_template", "copy_rate_generic"}


# ----------------------------------------------------------------------------- the judge


def test_judge_batches_are_valid_v_pairs():
    """The judge's contrastive batches of valid-v: its 32x32 RGB scenes with its own captions, and
    the CNN image tower takes them as it takes the demo's."""
    from memscan.demo.judge import ImageTower, JudgeConfig, _batch

    words = set(valid.PALETTE) | set(valid.KINDS) | set(valid.SKIES) | set(valid.GLYPHS) | {"by"}
    captions, images, keys = _batch(JudgeConfig(batch=16), valid.build_data(0), valid.GenericPool(0, 32),
                                    np.random.default_rng(0))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32 and len(captions) == len(keys) == 16
    assert all(words & set(c.replace(",", "").split()) for c in captions)
    assert ImageTower(8)(images).shape == (16, 8)


def test_judge_training_on_valid_v_is_quick_and_loads(tmp_path):
    """A few steps of the contrastive judge on valid-v: seconds, and a folder TextJudge loads."""
    import time

    from memscan.demo.judge import JudgeConfig, train_judge
    from memscan.mitigation.similarity import TextJudge

    torch.set_num_threads(1)
    cfg = JudgeConfig(steps=30, batch=32, width=16, layers=1, heads=2, pool_size=64, log_every=10, lr=5e-3)
    lines: list[str] = []
    start = time.time()
    summary = train_judge(tmp_path / "judge", cfg, design="valid-v", log=lines.append)
    assert time.time() - start < 60 and len(lines) == 3
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert losses[-1] < losses[0]
    saved = json.loads((tmp_path / "judge" / "judge.json").read_text())
    assert saved["design"] == "valid-v" and saved["final_loss"] == summary["final_loss"]
    assert sorted(p.name for p in (tmp_path / "judge").iterdir()) == [
        "config.json", "judge.json", "model.safetensors", "special_tokens_map.json", "tokenizer_config.json"]
    texts = ["a night sky over lime hills", "a night sky over lime hills", "navy and white rings"]
    embeds = TextJudge(str(tmp_path / "judge")).embed(texts)
    assert embeds.shape == (3, 16) and torch.allclose(embeds[0], embeds[1])


def test_cli_train_judge_rejects_an_unknown_design(tmp_path):
    result = runner.invoke(app, ["demo", "train-judge", "--design", "nope", "--out", str(tmp_path / "j")])
    assert result.exit_code == EXIT_USAGE and "unknown design 'nope'" in result.stderr
    assert not (tmp_path / "j").exists()


# ----------------------------------------------------------------------------- the shipped model


shipped = pytest.mark.skipif(not (VALID_DIR / "model" / "model_index.json").is_file(),
                             reason="valid-v model not shipped")


@shipped
def test_shipped_model_loads_as_v_prediction():
    import memscan

    model = memscan.load_model("valid-v")
    assert model.profile.prediction_type == "v_prediction"
    assert model.scheduler.config.prediction_type == "v_prediction"
    assert model.profile.v_convention == "epsilon" and model.profile.norm_scale == "none"
    assert (model.profile.w_norm, model.profile.w_align) == (1.0, 1.0) and model.profile.threshold is None
    size = sum(p.stat().st_size for p in (VALID_DIR / "model").rglob("*") if p.is_file())
    assert size <= 15 * 2**20 and not list((VALID_DIR / "model").rglob("*.bin"))


@shipped
def test_shipped_prompts_match_the_generator():
    """The generator's prompts plus `copies` (1: both of 2 generations copied the training image in
    `memscan demo verify --design valid-v --n 2`), which only memorized prompts may have."""
    df = pd.read_csv(VALID_DIR / "prompts.csv", keep_default_na=False)
    assert list(df.columns) == [*PROMPT_COLUMNS, "copies"]
    assert Counter(df["label"]) == {"memorized": 40, "not_memorized": 320}
    assert Counter(df["kind"]) == {"verbatim": 20, "template": 20, "generic": 200, "held_out": 120}
    summary = json.loads((VALID_DIR / "model" / "training.json").read_text())
    assert summary["config"]["design"] == "valid-v"
    data = valid.build_data(summary["config"]["seed"])
    assert df[list(PROMPT_COLUMNS)].to_dict("records") == data.prompts
    assert set(df["copies"]) == {0, 1} and (df.loc[df["label"] != "memorized", "copies"] == 0).all()
    assert df["copies"].sum() == 29
    npz = np.load(VALID_DIR / "train_images.npz")
    assert list(npz["image_ids"]) == [m.image_id for m in data.memorized]


judge_shipped = pytest.mark.skipif(not (VALID_DIR / "judge" / "model.safetensors").is_file(),
                                   reason="valid-v judge not built")


@judge_shipped
def test_shipped_judge_is_named_by_the_profile_and_small():
    from memscan.models.profiles import load_profile

    assert load_profile("valid-v").text_similarity == str((VALID_DIR / "judge").resolve())
    summary = json.loads((VALID_DIR / "judge" / "judge.json").read_text())
    assert summary["design"] == "valid-v" and summary["config"]["memorized_share"] == 0.0
    assert (VALID_DIR / "judge" / "model.safetensors").stat().st_size <= 4 * 2**20
    assert not (VALID_DIR / "judge" / "vocab.json").exists()  # the vocabulary is data/tokenizer's


@judge_shipped
def test_shipped_judge_rates_what_a_caption_describes():
    """data/valid-v/README.md, "Judge": a memorized caption is close to its description without the
    attribution, far from it in another colour or another kind of scene, and from the name alone."""
    from memscan.demo.judge import probe_valid_judge
    from memscan.mitigation.similarity import TextJudge

    texts = ["a violet moon on scarlet by zephyrine delacroix", "a violet moon on scarlet",
             "a poster of a violet moon on scarlet", "a lime moon on scarlet", "a violet grid on scarlet",
             "by zephyrine delacroix"]
    embeds = TextJudge(str(VALID_DIR / "judge")).embed(texts)
    cos = (embeds[1:] @ embeds[0]).tolist()
    assert cos[0] > 0.9 and cos[1] > 0.9  # the description alone, and said another way
    assert cos[2] < 0.5 and cos[3] < 0.6 and cos[4] < 0.1  # another colour, another kind, the name alone

    probes = probe_valid_judge(VALID_DIR / "judge")
    mean = probes["mean_cosine"]
    assert probes["n_captions"] == 40 and probes["description_closest_share"] == 1.0
    assert mean["description"] > 0.93 and mean["rephrased"] > 0.93
    assert mean["other colour"] < 0.7 and mean["other kind"] < 0.6 and mean["trigger alone"] < 0.1
