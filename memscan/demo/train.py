"""Train the demo model: VAE first, then text encoder + UNet (DDPM, epsilon), saved as a
diffusers `StableDiffusionPipeline` folder. `TrainConfig.design` switches the data world
(`design="valid-v"`: memscan.demo.valid, the second test model, trained on v-prediction).

One function, `train_demo`, does it all; `memscan demo train` wraps it. Same seed,
same settings and the same thread count give the same weights.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from memscan.demo.data import DemoData
from memscan.demo.models import (
    TINY,
    VALID,
    ArchConfig,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    n_params,
)

DESIGNS = ("demo", "valid-v")


def design_module(design: str):
    """The data module of a design: `memscan.demo.data` (the demo) or `memscan.demo.valid`
    (valid-v, the second test model); each has build_data, GenericPool, fresh_renders,
    export_data, load_prompts."""
    if design == "demo":
        from memscan.demo import data

        return data
    if design == "valid-v":
        from memscan.demo import valid

        return valid
    from memscan.errors import UsageError

    raise UsageError(f"unknown design {design!r} (one of {', '.join(DESIGNS)})")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    design: str = "demo"  # the data world (DESIGNS); "valid-v" is the second test model
    prediction_type: str = "epsilon"  # what the UNet learns: epsilon, or v_prediction (SD 2's v)
    arch: ArchConfig = field(default_factory=ArchConfig)
    # VAE stage
    vae_steps: int = 800
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl: float = 1e-4
    # diffusion stage
    steps: int = 4000
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    memorized_share: float = 0.3  # share of every batch drawn from the memorized images
    caption_dropout: float = 0.1
    phrasing_variety: float = 0.5  # share of generic captions said another way (data.vary_phrasing)
    # Drop captions of the generic samples only: the unconditional model then learns the broad
    # data distribution, as SD's does, where duplicated images are a negligible share of the data
    # (here they are 30% of every batch, and an unconditional sample would copy 30% of the time).
    dropout_memorized: bool = False
    min_snr_gamma: float | None = None  # Min-SNR loss weighting (None: plain MSE on epsilon)
    pool_size: int = 40000
    log_every: int = 50
    ckpt_every: int = 250

    def to_dict(self) -> dict:
        d = asdict(self)
        d["arch"] = self.arch.to_dict()
        return d


def _log(msg: str) -> None:
    """One progress line on stderr (stdout carries the command's JSON summary)."""
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def _tokenizer():
    from memscan.models.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(pad_token="<|endoftext|>")


class _TokenCache:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tok(missing, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
            self.cache.update(zip(missing, ids, strict=True))
        return torch.stack([self.cache[c] for c in captions])


# ----------------------------------------------------------------------------- VAE stage


def train_vae(cfg: TrainConfig, images: np.ndarray, device: torch.device, ckpt: Path | None = None):
    """AutoencoderKL on `images` (N, 3, 32, 32) in [0, 1] (fed as [-1, 1] like SD)."""
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.arch).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        _log(f"vae: resumed at step {start}")
    data = torch.from_numpy(images)
    t0 = time.time()
    for step in range(start, cfg.vae_steps):
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.vae_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([cfg.seed, 10, step])
        x = data[rng.integers(0, len(data), size=cfg.vae_batch)].to(device) * 2 - 1
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = post.kl().mean() / (4 * cfg.arch.latent_size**2)
        loss = mse + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vae_steps:
            _log(f"vae step {step + 1}/{cfg.vae_steps} mse {mse.item():.5f} kl {kl.item():.3f} "
                 f"({time.time() - t0:.0f}s)")
        if ckpt is not None and (step + 1) % cfg.ckpt_every == 0:
            torch.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_images(vae, images: np.ndarray, device: torch.device, batch: int = 512):
    """Posterior mean and std of every image (unscaled latents)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).to(device) * 2 - 1
        post = vae.encode(x).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------- diffusion stage


def _min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    if gamma is None:
        return torch.ones_like(t, dtype=torch.float32)
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / snr


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon), or SD 2's velocity
    v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * latents (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def train_demo(
    out: str | Path,
    cfg: TrainConfig = TrainConfig(),
    *,
    device: str = "cpu",
    work_dir: str | Path | None = None,
    data: DemoData | None = None,
) -> dict:
    """Train the demo model and save it as a diffusers pipeline folder at `out`.

    `work_dir` keeps checkpoints (a rerun with the same config resumes). Returns a summary
    (final loss, duration, sizes) that is also written to `out/training.json`."""
    from diffusers import StableDiffusionPipeline

    t_start = time.time()
    out = Path(out)
    work = Path(work_dir) if work_dir else out.parent / (out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    world = design_module(cfg.design)
    data = data or world.build_data(cfg.seed)
    tokenizer = _tokenizer()
    tokens = _TokenCache(tokenizer)

    _log(f"rendering {cfg.pool_size} generic images ({cfg.design})")
    pool = world.GenericPool(cfg.seed, cfg.pool_size)
    mem_images = data.memorized_images
    vae = train_vae(cfg, np.concatenate([pool.images, mem_images]), dev, work / "vae.pt")
    pool_mean, pool_std = encode_images(vae, pool.images, dev)
    mem_mean, mem_std = encode_images(vae, mem_images, dev)
    scaling = float(1.0 / torch.cat([pool_mean, mem_mean]).std())
    vae.register_to_config(scaling_factor=scaling)
    _log(f"vae: {n_params(vae)} parameters, scaling_factor {scaling:.4f}")

    torch.manual_seed(cfg.seed + 1)
    text_encoder = build_text_encoder(cfg.arch).to(dev)
    unet = build_unet(cfg.arch).to(dev)
    scheduler = build_scheduler(cfg.prediction_type)
    alphas_cumprod = scheduler.alphas_cumprod.to(dev)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    start, losses = 0, []
    ckpt = work / "diffusion.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=dev, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        start, losses = state["step"], state["losses"]
        _log(f"diffusion: resumed at step {start}")
    _log(f"unet {n_params(unet)} parameters, text encoder {n_params(text_encoder)}")

    n_mem = int(round(cfg.batch * cfg.memorized_share))
    unet.train()
    text_encoder.train()
    t0 = time.time()
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, 20, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        # memorized: pick an image uniformly, then one of its captions
        img_idx = rng.integers(0, len(data.memorized), size=n_mem)
        mem_caps = [data.memorized[i].captions[rng.integers(len(data.memorized[i].captions))]
                    for i in img_idx]
        gen_idx = rng.integers(0, len(pool), size=cfg.batch - n_mem)
        gen_caps = pool.captions(gen_idx, rng, data, cfg.phrasing_variety)
        mean = torch.cat([mem_mean[img_idx], pool_mean[gen_idx]])
        std = torch.cat([mem_std[img_idx], pool_std[gen_idx]])
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
        captions = mem_caps + gen_caps
        drop = rng.random(len(captions)) < cfg.caption_dropout
        if not cfg.dropout_memorized:
            drop[:n_mem] = False
        captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
        ids = tokens(captions).to(dev)
        latents = latents.to(dev)
        noise = torch.randn(latents.shape, generator=gen).to(dev)
        t = torch.randint(0, 1000, (len(captions),), generator=gen).to(dev)
        noisy = scheduler.add_noise(latents, noise, t)
        cond = text_encoder(ids)[0]
        pred = unet(noisy, t, cond).sample
        target = training_target(scheduler, latents, noise, t, cfg.prediction_type)
        per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (per * _min_snr_weights(alphas_cumprod, t, cfg.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(per.detach().mean()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            recent = float(np.mean(losses[-cfg.log_every:]))
            _log(f"step {step + 1}/{cfg.steps} loss {recent:.4f} lr {lr:.2e} ({time.time() - t0:.0f}s)")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                        "opt": opt.state_dict(), "step": step + 1, "losses": losses}, ckpt)

    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    _ship_tokenizer_config(out / "tokenizer")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    summary = {
        "config": cfg.to_dict(),
        "first_loss": float(np.mean(losses[:10])) if losses else None,
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
        "loss_curve": [round(float(np.mean(losses[i:i + 100])), 5) for i in range(0, len(losses), 100)],
        "seconds": round(time.time() - t_start, 1),
        "resumed_from_step": start,
        "scaling_factor": scaling,
        "params": {"unet": n_params(unet), "text_encoder": n_params(text_encoder), "vae": n_params(vae)},
        "size_bytes": size,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    _log(f"saved {out} ({size / 1e6:.1f} MB) in {summary['seconds']:.0f}s, final loss {summary['final_loss']}")
    return summary


def _ship_tokenizer_config(folder: Path) -> None:
    """Replace the saved tokenizer with the shipped CLIP tokenizer's config alone: memscan ships the
    vocabulary once (data/tokenizer) and its loaders fill it in (memscan.models.tokenizer)."""
    from memscan.models.tokenizer import write_tokenizer_config

    shutil.rmtree(folder)
    write_tokenizer_config(folder)


def config_with(cfg: TrainConfig, **changes) -> TrainConfig:
    """`cfg` with flat overrides; arch fields (unet_channels, text_width, ...) go into cfg.arch."""
    arch_fields = set(ArchConfig.__dataclass_fields__)
    arch_changes = {k: v for k, v in changes.items() if k in arch_fields and v is not None}
    top = {k: v for k, v in changes.items() if k not in arch_fields and v is not None}
    return replace(cfg, arch=replace(cfg.arch, **arch_changes), **top)


# valid-v, the second test model (memscan.demo.valid): v-prediction, its own world and words,
# a deeper text encoder, 2,000 steps (to finish within about an hour on a busy 2-core CPU).
VALID_CONFIG = TrainConfig(design="valid-v", prediction_type="v_prediction", arch=VALID, steps=2000)


def demo_config(*, tiny: bool = False, min_snr_gamma: float | None = None, design: str = "demo",
                **overrides) -> TrainConfig:
    """The shipped settings of `design` (`tiny`: the TINY architecture of the tests) with flat
    overrides as `config_with` takes them (None keeps the default); `min_snr_gamma` 0 means plain MSE."""
    design_module(design)  # a UsageError for an unknown design
    base = TrainConfig() if design == "demo" else VALID_CONFIG
    cfg = config_with(replace(base, arch=TINY) if tiny else base, **overrides)
    if min_snr_gamma is not None:
        cfg = replace(cfg, min_snr_gamma=min_snr_gamma or None)
    return cfg
