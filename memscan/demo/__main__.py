"""`python -m memscan.demo {train,export,verify,score}` (later wrapped by `memscan demo`).

    train   train the demo model into a diffusers folder
    export  write the labelled prompts (prompts.csv) and the memorized training images (npz)
    verify  generate (DDIM 50, guidance 7.5) and report copying of training images
    score   detection AUC / TPR@1%FPR on the labelled prompts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def export_data(out_dir: Path, seed: int) -> None:
    import pandas as pd

    from memscan.demo.data import build_data

    data = build_data(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(data.prompts).to_csv(out_dir / "prompts.csv", index=False)
    np.savez_compressed(
        out_dir / "train_images.npz",
        images=(data.memorized_images * 255).round().astype(np.uint8),
        image_ids=np.array([m.image_id for m in data.memorized]),
    )
    print(f"wrote {out_dir / 'prompts.csv'} ({len(data.prompts)} prompts) and train_images.npz "
          f"({len(data.memorized)} images)")


def _load_prompts(path: str | None, seed: int):
    import pandas as pd

    from memscan.demo.data import build_data

    if path:
        return pd.read_csv(path, keep_default_na=False)
    return pd.DataFrame(build_data(seed).prompts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memscan.demo")
    sub = parser.add_subparsers(dest="cmd", required=True)

    tr = sub.add_parser("train", help="train the demo model")
    tr.add_argument("--out", required=True)
    tr.add_argument("--work-dir", default=None, help="checkpoints (default OUT.work); reruns resume")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--batch", type=int, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--vae-steps", type=int, default=None)
    tr.add_argument("--memorized-share", type=float, default=None)
    tr.add_argument("--caption-dropout", type=float, default=None)
    tr.add_argument("--min-snr-gamma", type=float, default=None, help="0 = plain MSE")
    tr.add_argument("--pool-size", type=int, default=None)
    tr.add_argument("--unet-channels", type=_ints, default=None, help="e.g. 32,64,64")
    tr.add_argument("--unet-heads", type=int, default=None)
    tr.add_argument("--text-width", type=int, default=None)
    tr.add_argument("--text-layers", type=int, default=None)
    tr.add_argument("--vae-channels", type=_ints, default=None)
    tr.add_argument("--tiny", action="store_true", help="tiny architecture (tests)")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--threads", type=int, default=1)

    ex = sub.add_parser("export", help="write prompts.csv and train_images.npz")
    ex.add_argument("--out-dir", default="data/demo")
    ex.add_argument("--seed", type=int, default=0)

    ve = sub.add_parser("verify", help="generate and check copying")
    ve.add_argument("--model", required=True)
    ve.add_argument("--seed", type=int, default=0, help="data seed the model was trained with")
    ve.add_argument("--prompts", default=None, help="prompts.csv (default: rebuilt from --seed)")
    ve.add_argument("--n", type=int, default=4, help="generations per prompt")
    ve.add_argument("--gen-seed", type=int, default=0)
    ve.add_argument("--out", default=None, help="write the per-prompt table (csv)")
    ve.add_argument("--device", default="cpu")

    sc = sub.add_parser("score", help="detection AUC on the labelled prompts")
    sc.add_argument("--model", required=True)
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--prompts", default=None)
    sc.add_argument("--n", type=int, default=1, help="noise samples per prompt")
    sc.add_argument("--score-seed", type=int, default=51)
    sc.add_argument("--minimal", action="store_true", help="demo's own minimal scorer, not memscan's")
    sc.add_argument("--w-norm", type=float, default=1.0)
    sc.add_argument("--w-align", type=float, default=1.0)
    sc.add_argument("--out", default=None)

    args = parser.parse_args(argv)
    import torch

    if args.cmd == "train":
        from memscan.demo.models import TINY
        from memscan.demo.train import TrainConfig, config_with, train_demo

        torch.set_num_threads(args.threads)
        cfg = TrainConfig(arch=TINY) if args.tiny else TrainConfig()
        gamma = args.min_snr_gamma
        cfg = config_with(
            cfg, seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr, vae_steps=args.vae_steps,
            memorized_share=args.memorized_share, caption_dropout=args.caption_dropout,
            pool_size=args.pool_size, unet_channels=args.unet_channels, unet_heads=args.unet_heads,
            text_width=args.text_width, text_layers=args.text_layers, vae_channels=args.vae_channels,
        )
        if gamma is not None:
            from dataclasses import replace

            cfg = replace(cfg, min_snr_gamma=gamma or None)
        summary = train_demo(args.out, cfg, device=args.device, work_dir=args.work_dir)
        print(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}))
        return 0

    if args.cmd == "export":
        export_data(Path(args.out_dir), args.seed)
        return 0

    if args.cmd == "verify":
        from diffusers import StableDiffusionPipeline

        from memscan.demo.data import build_data
        from memscan.demo.verify import (
            copy_cutoffs,
            copy_table,
            generate,
            reference_images,
            summarize,
            vae_roundtrip_check,
        )

        data = build_data(args.seed)
        prompts = _load_prompts(args.prompts, args.seed)
        pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None,
                                                       requires_safety_checker=False).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        images = generate(pipe, prompts["prompt"].tolist(), n_per_prompt=args.n, seed=args.gen_seed)
        # primary: both sides through the VAE round trip; secondary: raw pixels (stricter: it also
        # charges the model for the VAE's reconstruction error)
        vae_cut = copy_cutoffs(data, pipe)
        table = copy_table(data, prompts, images, vae_cut, reference_images(data, pipe))
        raw_cut = copy_cutoffs(data)
        raw_table = copy_table(data, prompts, images, raw_cut, reference_images(data))
        if args.out:
            table.to_csv(args.out, index=False)
            np.savez_compressed(Path(args.out).with_suffix(".npz"),
                                images=(images * 255).round().astype(np.uint8))
        result = {"n_per_prompt": args.n, "space": "vae_roundtrip", **summarize(table),
                  "raw_pixels": summarize(raw_table), **vae_roundtrip_check(pipe, data, raw_cut)}
        print(json.dumps(result))
        return 0

    if args.cmd == "score":
        from memscan.demo.evaluate import detection_report, score_labelled

        prompts = _load_prompts(args.prompts, args.seed)
        scored = score_labelled(args.model, prompts, n_noise=args.n, seed=args.score_seed,
                                w_norm=args.w_norm, w_align=args.w_align, use_memscan=not args.minimal)
        if args.out:
            scored.to_csv(args.out, index=False)
        print(json.dumps({"scorer": scored["scorer"].iloc[0], "n": args.n, **detection_report(scored)}))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
