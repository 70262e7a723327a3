"""`memscan confirm`: generations, the near-duplicate rule, training images, the labelled file, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from memscan.cli import app
from memscan.confirm import (
    DEFAULT_THRESHOLDS,
    Confirmer,
    ConfirmSettings,
    distances,
    merge_distance,
    prompt_evidence,
)
from memscan.confirm.decision import largest_cluster
from memscan.confirm.embedders import PixelEmbedder, VaeEmbedder
from memscan.confirm.generate import generate_images
from memscan.confirm.train_images import TrainImages
from memscan.models.builders import build_tiny_pipeline
from memscan.models.loading import ScoringModel, scoring_model_from_pipeline
from memscan.models.profiles import ModelProfile
from tests.conftest import strengthen_text_conditioning

runner = CliRunner()
FAST = {"k": 2, "steps": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def vae_model() -> ScoringModel:
    """The tiny random pipeline WITH its VAE (64x64 images, 8x8 latents)."""
    pipeline = build_tiny_pipeline(seed=0, with_vae=True)
    strengthen_text_conditioning(pipeline.unet)
    profile = ModelProfile(name="tiny", source="tiny", resolution=64)
    return scoring_model_from_pipeline(pipeline, profile)


# ------------------------------------------------------------------ generation


def test_generations_are_deterministic_per_seed_and_batch_independent(vae_model: ScoringModel) -> None:
    prompts = ["a photo of a cat", "a red square on a blue background", "the mona lisa"]
    common = {"k": 3, "steps": 2, "guidance": 7.5}
    batched = generate_images(vae_model, prompts, seed=5, batch_size=9, **common)
    assert batched.shape == (3, 3, 3, 64, 64) and batched.dtype == np.float32
    assert 0.0 <= batched.min() and batched.max() <= 1.0
    one_by_one = generate_images(vae_model, prompts, seed=5, batch_size=1, **common)
    np.testing.assert_allclose(batched, one_by_one, atol=2e-5)
    again = generate_images(vae_model, prompts, seed=5, batch_size=4, **common)
    np.testing.assert_allclose(batched, again, atol=2e-5)
    # the seeds are independent: generation j differs from generation j+1, and seed 6 shifts them by one
    assert np.abs(batched[:, 0] - batched[:, 1]).mean() > 1e-3
    shifted = generate_images(vae_model, prompts[:1], seed=6, batch_size=2, **common)
    np.testing.assert_allclose(shifted[0, 0], batched[0, 1], atol=2e-5)


# ------------------------------------------------------------------ the decision rule, on planted images


def _image(rng: np.random.Generator, side: int = 16) -> np.ndarray:
    return rng.random((3, side, side)).astype(np.float32)


def test_planted_near_duplicates_get_the_right_labels() -> None:
    rng = np.random.default_rng(0)
    pixel = PixelEmbedder()
    base = _image(rng)
    copies = np.stack([np.clip(base + rng.normal(0, 0.01, base.shape), 0, 1) for _ in range(4)]).astype(np.float32)
    distinct = np.stack([_image(rng) for _ in range(4)])
    half = np.concatenate([copies[:2], distinct[:2]])  # two of four are one image
    threshold = 0.1
    labels = {}
    for name, images in (("copies", copies), ("distinct", distinct), ("half", half)):
        for m in (2, 3):
            labels[name, m] = prompt_evidence(pixel.embed(images), "rms", threshold, m)
    assert labels["copies", 2]["label"] == "memorized" and labels["copies", 3]["label"] == "memorized"
    assert labels["copies", 2]["near_duplicate_fraction"] == 1.0 and labels["copies", 2]["largest_cluster"] == 4
    assert labels["distinct", 2]["label"] == "not_memorized" and labels["distinct", 2]["largest_cluster"] == 1
    assert labels["distinct", 2]["near_duplicate_fraction"] == 0.0
    # uniform noise images are ~0.41 RMS apart (sqrt(1/6)); copies with sigma 0.01 noise ~0.014
    assert labels["distinct", 2]["pair_distance_mean"] == pytest.approx(np.sqrt(1 / 6), abs=0.02)
    assert labels["copies", 2]["cluster_distance"] == pytest.approx(0.01 * np.sqrt(2), abs=0.003)
    assert labels["half", 2]["label"] == "memorized" and labels["half", 3]["label"] == "not_memorized"
    assert labels["half", 2]["near_duplicate_fraction"] == pytest.approx(1 / 6)
    assert labels["half", 2]["reason"] == "near_duplicates" and labels["distinct", 2]["reason"] == ""


def test_merge_distance_is_the_single_linkage_height() -> None:
    d = np.array([[0, 1, 5, 9], [1, 0, 2, 9], [5, 2, 0, 3], [9, 9, 3, 0]], dtype=float)
    assert [merge_distance(d, m) for m in (1, 2, 3, 4, 5)] == [0.0, 1.0, 2.0, 3.0, np.inf]
    assert largest_cluster(d, 2.5) == 3 and largest_cluster(d, 1.0) == 1  # strictly under the threshold
    assert distances(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0], [3.0, 0.0]]), "cosine").tolist() == [[1.0, 0.0]]
    assert distances(np.zeros((1, 4)), np.ones((1, 4)), "rms").tolist() == [[1.0]]


# ------------------------------------------------------------------ training images


def _write_train_set(tmp_path: Path, images: np.ndarray) -> dict[str, Path]:
    """The same images as a folder of PNGs, an npz and a Parquet of PNG bytes."""
    import io

    from PIL import Image

    folder = tmp_path / "train"
    folder.mkdir()
    blobs = []
    for i, image in enumerate(images):
        pil = Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8))
        pil.save(folder / f"img{i}.png")
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    npz = tmp_path / "train.npz"
    ids = np.array([f"img{i}.png" for i in range(len(images))])
    np.savez(npz, images=(images * 255).round().astype(np.uint8), image_ids=ids)
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image_id": [f"img{i}.png" for i in range(len(images))], "image": blobs}), parquet)
    return {"folder": folder, "npz": npz, "parquet": parquet}


def test_training_images_match_a_generation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = np.stack([_image(rng) for _ in range(3)])
    train = (np.round(train * 255) / 255).astype(np.float32)  # exactly representable in uint8 files
    paths = _write_train_set(tmp_path, train)
    loaded = {name: TrainImages(path, side=16) for name, path in paths.items()}
    for name, images in loaded.items():
        assert images.ids == ["img0.png", "img1.png", "img2.png"], name
        np.testing.assert_allclose(np.concatenate(list(images.batches(2))), train, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(images.get(1), train[1], atol=1e-6)
    assert TrainImages(paths["npz"], side=8).get(0).shape == (3, 8, 8)  # resized to the generations' side

    pixel = PixelEmbedder()
    train_vectors = pixel.embed(train)
    # two generations near training image 1 (0.06 and 0.042 RMS), 0.095 apart: not near-duplicates of
    # each other at 0.07, but both within 0.07 of the same training image
    noise = rng.choice([-0.06, 0.06], size=train[1].shape).astype(np.float32)
    half = (rng.random(train[1].shape) < 0.5).astype(np.float32)
    gens = np.stack([train[1] + noise, train[1] - noise * half, _image(rng), _image(rng)])
    row = prompt_evidence(pixel.embed(gens), "rms", 0.07, 2, train_vectors=train_vectors, train_ids=loaded["npz"].ids)
    assert row["train_id"] == "img1.png" and row["train_matches"] == 2
    assert row["train_distance"] < 0.07 < row["cluster_distance"]
    assert row["label"] == "memorized" and row["reason"] == "train_match"
    assert row["nearest_train_distance"] <= row["train_distance"]
    without = prompt_evidence(pixel.embed(gens), "rms", 0.07, 2)
    assert without["label"] == "not_memorized" and np.isnan(without["train_distance"])


def test_confirmer_measures_training_images_through_the_vae(vae_model: ScoringModel, tmp_path: Path) -> None:
    """A training set holding one prompt's own two generations: each generation has an exact match, and
    the rule's train distance (the 2nd generation's distance to the best training image) is the
    distance between the two generations, all in the VAE's latent space."""
    from dataclasses import replace

    from memscan.confirm.core import vae_roundtrip

    prompts = ["a photo of a cat", "the mona lisa"]
    gens = generate_images(vae_model, prompts[:1], k=2, seed=3, steps=2, batch_size=4)[0]
    np.savez(tmp_path / "train.npz", images=gens, image_ids=np.array(["cat0", "cat1"]))
    settings = ConfirmSettings(embedder="vae", seed=3, threshold=1e-3, train_images=str(tmp_path / "train.npz"),
                               train_roundtrip=False, **FAST)
    confirmer = Confirmer(vae_model, settings)
    assert isinstance(confirmer.embedder, VaeEmbedder)
    # by default the training images are compared through the model's VAE round trip
    roundtrip = Confirmer(vae_model, replace(settings, train_roundtrip=True))
    np.testing.assert_allclose(roundtrip.train_vectors, confirmer.embedder.embed(vae_roundtrip(vae_model, gens)),
                               rtol=1e-5, atol=1e-5)
    assert np.abs(roundtrip.train_vectors - confirmer.train_vectors).max() > 1e-2
    rows = confirmer.confirm_frame(pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": [*prompts, " "]}))
    assert rows["status"].tolist() == ["ok", "ok", "skipped_empty"] and rows["label"].isna().tolist() == [0, 0, 1]
    cat = rows.loc[0]
    latents = confirmer.embedder.embed(gens)
    apart = distances(latents[:1], latents[1:], "rms")[0, 0]
    assert apart > 1e-2  # independent seeds: two different images
    assert cat["nearest_train_distance"] < 1e-4 and cat["train_id"] in ("cat0", "cat1")
    assert cat["train_distance"] == pytest.approx(apart, rel=1e-4)
    assert cat["cluster_distance"] == pytest.approx(apart, rel=1e-4)
    assert cat["label"] == "not_memorized" and cat["train_matches"] == 1
    assert rows.loc[1, "nearest_train_distance"] > 1e-3


# ------------------------------------------------------------------ the CLI


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\na photo of a cat\na red square on a blue background\n\nthe mona lisa\n"
                    "a photo of a cat\nan astronaut riding a horse\n", encoding="utf-8")
    return path


def _cli(*args: str) -> list[str]:
    return ["confirm", *args, "--k", "2", "--steps", "2", "--batch-size", "4", "--device", "cpu"]


def test_cli_writes_a_labelled_file_that_calibrate_accepts(tiny_vae_model_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts(tmp_path)
    probe = runner.invoke(app, _cli(str(prompts), "--model", str(tiny_vae_model_dir), "--embedder", "pixel",
                                    "-o", str(tmp_path / "probe.parquet"), "--json"))
    assert probe.exit_code == 0, probe.output
    distance = pq.read_table(tmp_path / "probe.parquet").to_pandas()["cluster_distance"].dropna().sort_values().unique()
    assert len(distance) == 4  # 5 prompts, one repeated: generated once, same numbers
    threshold = float((distance[1] + distance[2]) / 2)  # two prompts on each side
    labels = tmp_path / "labels.csv"
    sheet = tmp_path / "sheet.html"
    result = runner.invoke(app, _cli(str(prompts), "--model", str(tiny_vae_model_dir), "--embedder", "pixel",
                                     "--threshold", str(threshold), "-o", str(labels), "--contact-sheet", str(sheet),
                                     "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    probe_rows = pq.read_table(tmp_path / "probe.parquet").to_pandas()
    expected = int((probe_rows["cluster_distance"] < threshold).sum())  # 2 or 3: the repeated prompt counts twice
    assert expected in (2, 3)
    assert (summary["rows"], summary["memorized"], summary["not_memorized"], summary["skipped_empty"]) == (
        6, expected, 5 - expected, 1)
    assert f"{expected} memorized, {5 - expected} not memorized" in result.stderr
    assert f"threshold {threshold:g}" in result.stderr
    frame = pd.read_csv(labels)
    assert list(frame.columns[:4]) == ["prompt_id", "prompt", "label", "reason"]
    evidence = {"cluster_distance", "pair_distance_mean", "near_duplicate_fraction", "train_distance", "train_id"}
    assert evidence <= set(frame)
    assert frame.loc[0, "label"] == frame.loc[4, "label"]  # the repeated prompt
    page = sheet.read_text()
    assert page.count("data:image/png;base64,") == 5 and "a photo of a cat" in page

    scores = tmp_path / "scores.parquet"
    detect = runner.invoke(app, ["detect", str(prompts), "--model", str(tiny_vae_model_dir), "-o", str(scores)])
    assert detect.exit_code == 0, detect.output
    calibrated = runner.invoke(app, ["calibrate", str(scores), "--labels", str(labels), "-o", str(tmp_path / "p.toml"),
                                     "--json"])
    assert calibrated.exit_code == 0, calibrated.output
    cal = json.loads(calibrated.stdout)
    assert (cal["n_memorized"], cal["n_clean"]) == (expected, 5 - expected)


def test_cli_run_directory_then_merge(tiny_vae_model_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts(tmp_path)
    out = tmp_path / "confirm-run"
    sheet = tmp_path / "sheet.html"
    args = _cli(str(prompts), "--model", str(tiny_vae_model_dir), "--embedder", "pixel", "-o", str(out),
                "--shard-size", "4", "--contact-sheet", str(sheet), "--json")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["kind"] == "confirm" and summary["complete"] and summary["shards"] == 2
    assert summary["memorized"] + summary["not_memorized"] == 5 and summary["threshold"] == DEFAULT_THRESHOLDS["pixel"]
    assert sheet.read_text().count("data:image/png;base64,") == 5
    again = runner.invoke(app, args)  # resume: nothing left to do, same summary
    assert again.exit_code == 0 and json.loads(again.stdout)["memorized"] == summary["memorized"]
    changed = runner.invoke(app, [*args, "--threshold", "0.2"])
    assert changed.exit_code == 2 and "threshold" in changed.stderr
    merged = tmp_path / "labels.parquet"
    assert runner.invoke(app, ["merge", str(out), "-o", str(merged)]).exit_code == 0
    frame = pq.read_table(merged).to_pandas()
    assert len(frame) == 6 and frame["label"].notna().sum() == 5 and "sheet_png" in frame


def test_cli_errors_are_one_line(tiny_vae_model_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts(tmp_path)
    out = tmp_path / "labels.csv"

    def run(*args: str) -> object:
        result = runner.invoke(app, _cli(str(prompts), *args))
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result

    bad = run("--model", str(tiny_vae_model_dir), "--embedder", "nonsense", "-o", str(out))
    assert bad.exit_code == 2 and "--embedder 'nonsense'" in bad.stderr and not out.exists()
    empty_folder = tmp_path / "not-a-model"
    empty_folder.mkdir()
    folder = run("--model", str(tiny_vae_model_dir), "--embedder", str(empty_folder), "-o", str(out))
    assert folder.exit_code == 2 and "no config.json" in folder.stderr
    out.write_text("prompt_id,label\n", encoding="utf-8")
    # refused before the model loads: the model does not even exist
    exists = run("--model", str(tmp_path / "no-model"), "-o", str(out))
    assert exists.exit_code == 2 and "--if-exists overwrite" in exists.stderr
    suffix = run("--model", str(tiny_vae_model_dir), "-o", str(tmp_path / "labels.txt"))
    assert suffix.exit_code == 2 and ".csv or .parquet" in suffix.stderr
    missing = run("--model", str(tiny_vae_model_dir), "--train-images", str(tmp_path / "no"),
                  "-o", str(tmp_path / "x.csv"))
    assert missing.exit_code == 4 and "--train-images" in missing.stderr
    small_k = runner.invoke(app, ["confirm", str(prompts), "--k", "1", "-o", str(tmp_path / "y.csv")])
    assert small_k.exit_code == 2 and "--k must be >= 2" in small_k.stderr


def test_a_failing_prompt_is_a_row_and_retry_errors_labels_it_again(
    vae_model: ScoringModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memscan.confirm.core as core
    from memscan.confirm.run import ConfirmJob

    real = core.generate_images

    def flaky(model: ScoringModel, prompts: list[str], **kwargs: object) -> np.ndarray:
        if "boom" in prompts:
            raise RuntimeError("decoder exploded")
        return real(model, prompts, **kwargs)

    settings = ConfirmSettings(embedder="pixel", batch_size=8, k=2, steps=2).resolved()
    frame = pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": ["a photo of a cat", "boom", "the mona lisa"]})
    monkeypatch.setattr(core, "generate_images", flaky)
    confirmer = Confirmer(vae_model, settings)
    rows = confirmer.confirm_frame(frame)
    assert rows["status"].tolist() == ["ok", "error", "ok"]
    assert rows.loc[1, "error"] == "RuntimeError: decoder exploded" and pd.isna(rows.loc[1, "label"])
    monkeypatch.setattr(core, "generate_images", real)

    class Holder:  # what ConfirmJob keeps its Confirmer with (a worker's scorer)
        model = vae_model

    job, holder = ConfirmJob(settings), Holder()
    fixed, counts = job.redo_failed(holder, frame, rows)  # type: ignore[arg-type]
    assert fixed["status"].tolist() == ["ok", "ok", "ok"] and fixed["label"].notna().all()
    assert fixed.loc[0, "cluster_distance"] == rows.loc[0, "cluster_distance"]  # good rows kept as they were
    assert counts["failed_rows"] == 0 and counts["memorized"] + counts["not_memorized"] == 3
    assert fixed["largest_cluster"].dtype == "Int32" and fixed["cluster_distance"].dtype == np.float32
    from memscan.confirm.core import output_schema
    from memscan.io.scores import to_table

    assert to_table(fixed, output_schema(), {}).num_rows == 3  # the shard is writable as it is
