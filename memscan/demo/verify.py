"""Is the memorization real? Generate images for the labelled prompts and check for copies.

Generation: the standard diffusers `StableDiffusionPipeline` with the demo's VAE, DDIM 50 steps,
guidance 7.5, 32x32 pixels.

Similarity measure: mean squared error in RGB pixel space ([0, 1]) between a generated image and a
training image. The demo's images are rendered exactly (no crops, no augmentation), so a copy is
literal: same shape, colour, texture, position and background. SSCD, the measure of the public
benchmarks, would need a network trained on natural photos; plain pixel MSE is the honest measure
here.

Cutoff, per training image (as the prototype notes suggest, in the spirit of SSCD-verified copies):
render 200 FRESH images that share everything a caption can say about the training image (shape,
colour, size, texture) and differ in what no caption names (position, background, noise), and take
the 1st percentile of their MSE to the training image. A generation closer than that is a copy:
closer than 99% of images that match the same description. For memorized prompts we report each
generation's MSE to its OWN training image; for the others the closest training image (MSE below
THAT image's cutoff = a copy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memscan.demo.data import DemoData, fresh_renders

N_FRESH = 200
PERCENTILE = 1.0


@torch.no_grad()
def vae_roundtrip(pipe, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """decode(encode(images)) with the pipeline's VAE (posterior mean): the closest image to
    `images` that the model can produce at all."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).to(pipe.device, pipe.vae.dtype) * 2 - 1
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
        out.append(((rec.clamp(-1, 1) + 1) / 2).float().cpu().numpy())
    return np.concatenate(out)


def reference_images(data: DemoData, pipe=None) -> np.ndarray:
    """The training images in the space of the comparison: raw pixels, or (pipe given) their
    VAE round trip."""
    return data.memorized_images if pipe is None else vae_roundtrip(pipe, data.memorized_images)


def copy_cutoffs(data: DemoData, pipe=None, n_fresh: int = N_FRESH,
                 percentile: float = PERCENTILE, fresh_renders=fresh_renders) -> np.ndarray:
    """Per memorized image: the `percentile` of MSE(training image, fresh renders), both in
    raw pixels or (pipe given) both through the VAE round trip. `fresh_renders` is the design's
    (memscan.demo.data's or memscan.demo.valid's)."""
    ref = reference_images(data, pipe)
    cut = []
    for k, m in enumerate(data.memorized):
        fresh = fresh_renders(m.attrs, n_fresh, seed=1000 + k)
        if pipe is not None:
            fresh = vae_roundtrip(pipe, fresh)
        mse = ((fresh - ref[k][None]) ** 2).mean(axis=(1, 2, 3))
        cut.append(np.percentile(mse, percentile))
    return np.array(cut)


@torch.no_grad()
def generate(pipe, prompts: list[str], n_per_prompt: int = 1, seed: int = 0, batch_size: int = 64,
             steps: int = 50, guidance: float = 7.5) -> np.ndarray:
    """(len(prompts), n_per_prompt, 3, H, W) images in [0, 1]."""
    out = []
    expanded = [p for p in prompts for _ in range(n_per_prompt)]
    for i in range(0, len(expanded), batch_size):
        gen = torch.Generator().manual_seed(seed + i)
        res = pipe(expanded[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gen, output_type="np")
        out.append(res.images.transpose(0, 3, 1, 2))
    imgs = np.concatenate(out).astype(np.float32)
    return imgs.reshape(len(prompts), n_per_prompt, *imgs.shape[1:])


def copy_table(data: DemoData, prompts: pd.DataFrame, images: np.ndarray,
               cutoffs: np.ndarray, train: np.ndarray) -> pd.DataFrame:
    """Per prompt: own-image MSE (memorized), nearest training image and MSE, copy rate.
    `train` (M, 3, H, W) are the training images in the space `cutoffs` were calibrated in."""
    ids = [m.image_id for m in data.memorized]
    index = {i: k for k, i in enumerate(ids)}
    rows = []
    for (_, row), gens in zip(prompts.iterrows(), images, strict=True):
        mse = ((gens[:, None] - train[None]) ** 2).mean(axis=(2, 3, 4))  # (n, M)
        copies_any = (mse < cutoffs[None]).any(axis=1)
        nearest = mse.argmin(axis=1)
        rec = {"prompt": row["prompt"], "label": row["label"], "kind": row["kind"],
               "nearest_id": ids[int(np.bincount(nearest).argmax())],
               "nearest_mse": float(mse.min(axis=1).mean()),
               "copy_any_rate": float(copies_any.mean())}
        if row["label"] == "memorized":
            k = index[row["train_image_id"]]
            rec["own_mse"] = float(mse[:, k].mean())
            rec["own_cutoff"] = float(cutoffs[k])
            rec["copy_rate"] = float((mse[:, k] < cutoffs[k]).mean())
        else:
            rec["copy_rate"] = rec["copy_any_rate"]
        rows.append(rec)
    return pd.DataFrame(rows)


def vae_roundtrip_check(pipe, data: DemoData, raw_cutoffs: np.ndarray) -> dict:
    """Can a perfect latent copy pass the raw-pixel cutoff at all?"""
    rec = vae_roundtrip(pipe, data.memorized_images)
    mse = ((rec - data.memorized_images) ** 2).mean(axis=(1, 2, 3))
    return {"vae_mse_mean": round(float(mse.mean()), 5), "raw_cutoff_mean": round(float(raw_cutoffs.mean()), 5),
            "vae_roundtrip_passes_raw": round(float((mse < raw_cutoffs).mean()), 4)}


def summarize(table: pd.DataFrame) -> dict:
    mem = table[table["label"] == "memorized"]
    non = table[table["label"] != "memorized"]
    out = {
        "memorized_prompts_reproducing": float((mem["copy_rate"] > 0.5).mean()),
        "memorized_generation_copy_rate": float(mem["copy_rate"].mean()),
        "non_memorized_prompts_copying": float((non["copy_rate"] > 0.5).mean()),
        "non_memorized_prompts_any_copy": float((non["copy_rate"] > 0).mean()),
        "non_memorized_generation_copy_rate": float(non["copy_rate"].mean()),
    }
    for kind, grp in table.groupby("kind"):
        out[f"copy_rate_{kind}"] = round(float(grp["copy_rate"].mean()), 4)
    return {k: round(v, 4) for k, v in out.items()}


def load_pipeline(model_dir: str | Path, device: str = "cpu"):
    """The demo model folder as a diffusers `StableDiffusionPipeline` (no safety checker, no
    progress bars); a ModelError when `model_dir` is not a diffusers folder."""
    from diffusers import StableDiffusionPipeline

    from memscan.models.loading import folder_tokenizer

    check_model_dir(model_dir)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False,
                                                   **folder_tokenizer(model_dir)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_model_dir(model_dir: str | Path) -> Path:
    """`model_dir` if it is a diffusers pipeline folder, else a ModelError naming the fix."""
    from memscan.errors import ModelError

    path = Path(model_dir)
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{model_dir} is not a diffusers model folder (no model_index.json); "
                         f"train one with `memscan demo train --out {model_dir}`")
    return path


def verify_model(model_dir: str | Path, *, seed: int = 0, prompts: str | Path | None = None, n: int = 4,
                 gen_seed: int = 0, out: str | Path | None = None, device: str = "cpu",
                 steps: int = 50, n_fresh: int = N_FRESH, design: str = "demo") -> dict:
    """Generate `n` images per labelled prompt (DDIM `steps`, guidance 7.5) and measure copying of
    the training images of data seed `seed` of `design` (demo, or valid-v).

    Primary: both sides through the VAE round trip; secondary (`raw_pixels`): raw pixels, stricter,
    as it also charges the model for the VAE's reconstruction error. `out` (csv): the per-prompt
    table, and the generations next to it (.npz, uint8). Returns the summary."""
    from memscan.demo.train import design_module

    world = design_module(design)
    check_model_dir(model_dir)
    data = world.build_data(seed)
    table_prompts = world.load_prompts(prompts, seed)
    pipe = load_pipeline(model_dir, device)
    images = generate(pipe, table_prompts["prompt"].tolist(), n_per_prompt=n, seed=gen_seed, steps=steps)
    vae_cut = copy_cutoffs(data, pipe, n_fresh=n_fresh, fresh_renders=world.fresh_renders)
    table = copy_table(data, table_prompts, images, vae_cut, reference_images(data, pipe))
    raw_cut = copy_cutoffs(data, n_fresh=n_fresh, fresh_renders=world.fresh_renders)
    raw_table = copy_table(data, table_prompts, images, raw_cut, reference_images(data))
    if out:
        table.to_csv(out, index=False)
        np.savez_compressed(Path(out).with_suffix(".npz"), images=(images * 255).round().astype(np.uint8))
    return {"n_per_prompt": n, "space": "vae_roundtrip", **summarize(table),
            "raw_pixels": summarize(raw_table), **vae_roundtrip_check(pipe, data, raw_cut)}
