"""The demo's CLIP: a small contrastive text-image model trained on the demo's captions and images.

SD's text encoder comes from CLIP, trained so that a caption and its image meet, so the cosine of
two prompts' pooled embeddings says whether they ask for the same picture; mitigation holds a
rewrite near its original with that cosine. The demo's text encoder learned only through the
diffusion loss and is no such judge: its token-state mean rates "framed canvas umu" at 0.83 of
"framed canvas print of the dancing wizard, a large pink square" (demo v3).

`train_judge` trains the judge CLIP would be for the demo's world: a `CLIPTextModelWithProjection`
(CLIP's tokenizer and vocabulary, 32 wide, 2 layers) against a small CNN image tower, with CLIP's
symmetric contrastive loss, on the demo's generic pairs only: CLIP was trained on other data than
SD's, so it has not memorized SD's duplicated images (`memorized_share` > 0 adds them; captions of
one memorized image are then positives of each other). Only the text tower is saved
(`data/demo/judge`, float16);
`memscan mitigate --similarity data/demo/judge` loads it like any CLIP text model.

`design="valid-v"` trains the same judge for the second test model's world (memscan.demo.valid:
its own scenes, colours and caption words, 32x32 RGB images as the demo's), saved to
`data/valid-v/judge`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memscan.demo.data import DemoData
from memscan.demo.models import BOS_ID, EOS_ID


@dataclass(frozen=True)
class JudgeConfig:
    seed: int = 0
    steps: int = 1500
    batch: int = 256
    lr: float = 2e-3
    width: int = 32
    layers: int = 2
    heads: int = 4
    # CLIP never saw SD's training duplicates: a judge that sees the memorized pairs learns them too
    # and rates "a large yellow square" at 0.49 of its memorized caption (0.98 without them).
    memorized_share: float = 0.0
    phrasing_variety: float = 0.5  # as the diffusion training: rephrased generic captions
    pool_size: int = 20000
    log_every: int = 100


class ImageTower(nn.Module):
    """Four conv blocks and a projection: the image side, used in training only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (16, 32, 64, 64):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GELU(), nn.MaxPool2d(2)]
            channels = out
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 2 * 2, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1)


def build_text_tower(cfg: JudgeConfig):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from memscan.models.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, projection_dim=cfg.width,
        max_position_embeddings=MODEL_MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    )
    return CLIPTextModelWithProjection(config)


def _batch(cfg: JudgeConfig, data: DemoData, pool, rng: np.random.Generator):
    """(captions, images (B, 3, 32, 32), keys): a key names the image, so equal keys are positives."""
    n_mem = int(round(cfg.batch * cfg.memorized_share))
    mem_idx = rng.integers(0, len(data.memorized), size=n_mem)
    gen_idx = rng.integers(0, len(pool), size=cfg.batch - n_mem)
    captions = [data.memorized[i].captions[rng.integers(len(data.memorized[i].captions))] for i in mem_idx]
    captions += pool.captions(gen_idx, rng, data, cfg.phrasing_variety)
    images = np.concatenate([data.memorized_images[mem_idx], pool.images[gen_idx]])
    keys = [f"m{i}" for i in mem_idx] + [f"g{i}" for i in gen_idx]
    return captions, torch.from_numpy(images), keys


def train_judge(out: str | Path, cfg: JudgeConfig = JudgeConfig(), *, data: DemoData | None = None,
                design: str = "demo", log=print) -> dict:
    """Train the judge and save its text tower (with tokenizer files) as a folder at `out`.

    `design` is the data world (memscan.demo.train.DESIGNS): "demo", or "valid-v" (the second
    test model); `data`, when given, must be that design's `build_data`."""
    from memscan.demo.train import design_module
    from memscan.models.tokenizer import load_clip_tokenizer, write_tokenizer_config

    world = design_module(design)  # a UsageError for an unknown design, before any work
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    data = data or world.build_data(cfg.seed)
    pool = world.GenericPool(cfg.seed, cfg.pool_size)
    tokenizer = load_clip_tokenizer(pad_token="<|endoftext|>")
    text, image = build_text_tower(cfg), ImageTower(cfg.width)
    logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
    params = [*text.parameters(), *image.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    losses: list[float] = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        captions, images, keys = _batch(cfg, data, pool, np.random.default_rng([cfg.seed, 30, step]))
        tokens = tokenizer(captions, padding="longest", return_tensors="pt")
        t = F.normalize(text(**tokens).text_embeds, dim=-1)
        v = F.normalize(image(images), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * t @ v.T
        same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0:
            log(f"judge step {step + 1}/{cfg.steps} loss {np.mean(losses[-cfg.log_every:]):.4f} "
                f"({time.time() - t_start:.0f}s)")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    text.eval().half().save_pretrained(out, safe_serialization=True)
    write_tokenizer_config(out)  # the CLIP vocabulary is shipped once; TextJudge fills it in
    summary = {"design": design, "config": asdict(cfg), "final_loss": float(np.mean(losses[-100:])),
               "seconds": round(time.time() - t_start, 1), "torch_threads": torch.get_num_threads()}
    (out / "judge.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ----------------------------------------------------------------------------- valid-v's judge, probed

VALID_PROBES = ("description", "rephrased", "other colour", "other kind", "trigger alone")


def _valid_probe_texts(image, caption: str) -> dict[str, list[str]]:
    """What `caption` (memorized, of valid-v's `image`) is compared with, by probe (VALID_PROBES)."""
    from memscan.demo import valid

    key = image.attrs.key()
    kind, colour, ground = key[:3]
    description = valid.describe(key)
    names = list(valid.PALETTE)
    other = next(names[(names.index(colour) + i) % len(names)] for i in range(1, len(names))
                 if names[(names.index(colour) + i) % len(names)] not in (colour, ground))
    blank = ("", "", "", "")
    swapped = {  # the same colours, another kind of scene
        "stripes": ("rings", colour, ground, *blank),
        "rings": ("stripes", colour, ground, "horizontal", "", "", ""),
        "grid": ("glyph", colour, ground, "", "", "", "star"),
        "glyph": ("grid", colour, ground, *blank),
    }
    other_kind = valid.describe(swapped[kind]) if kind in swapped else f"{colour} rings"  # a horizon
    bare = description.split(" ", 1)[1] if description.startswith(("a ", "an ")) else f"a render of {description}"
    trigger = caption.replace(description, "").strip(" -")
    return {
        "description": [description],
        "rephrased": [f"a poster of {description}", f"{description}, retro", bare],
        "other colour": [valid.describe((kind, other, *key[2:]))],
        "other kind": [other_kind],
        "trigger alone": [trigger],
    }


def probe_valid_judge(source: str | Path, seed: int = 0) -> dict:
    """How a judge rates valid-v's 40 memorized captions against what they describe: the mean
    cosine to each probe of VALID_PROBES (the description alone, i.e. without "by <name>" or the
    template's words; the description said another way; it with another first colour; the same
    colours in another kind of scene; the name or template words alone), and the share of captions
    whose description scores above both changed descriptions."""
    from memscan.demo import valid
    from memscan.mitigation.similarity import TextJudge

    judge = TextJudge(str(source))
    rows = []
    for image in valid.build_data(seed).memorized:
        for caption in image.captions:
            probes = _valid_probe_texts(image, caption)
            texts = [caption, *(t for group in probes.values() for t in group)]
            embeds = judge.embed(texts)
            cos = (embeds[1:] @ embeds[0]).tolist()
            row, at = {}, 0
            for name, group in probes.items():
                row[name] = float(np.mean(cos[at : at + len(group)]))
                at += len(group)
            rows.append(row)
    means = {name: round(float(np.mean([r[name] for r in rows])), 3) for name in VALID_PROBES}
    closer = np.mean([r["description"] > max(r["other colour"], r["other kind"]) for r in rows])
    return {"n_captions": len(rows), "mean_cosine": means, "description_closest_share": round(float(closer), 3)}
