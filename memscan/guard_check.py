"""The guard's policies compared on the demo model: do they stop the copies, keep the prompt's
intent, leave clean prompts alone, and at what cost?

Every labelled demo prompt (54 memorized, 330 clean in data/demo/prompts.csv) is generated `n`
times through `memscan.guard.Guard` under each policy (warn, reseed, optimize, rewrite, block)
and once without the guard (`off`), from the SAME initial latents (one seeded CPU bank, sliced per
batch; DDIM 50, guidance 7.5, `batch_prompts` prompts per call, so every policy sees the same
batches). Per policy:

- copying: the demo's copy check (`memscan.demo.verify`: pixel MSE to the prompt's training image
  under that image's calibrated cutoff, both through the VAE round trip); a blocked prompt has no
  image, so nothing copies; a prompt copies when most of its generations do;
- intent: attribute agreement with what the memorized prompt asks for (size, colour, shape), read
  by the demo's attribute reader exactly as `python -m memscan.mitigation.check` reads it (only
  attributes the reader reads right on >= 80% of decoded renders of that size count), over the
  prompts that produced images, and as a ratio to the unguarded images of the same prompts;
- clean prompts: how many give bit-identical images to the unguarded pipeline, and how many the
  guard flagged (a false alarm changes the images under every policy but warn);
- cost: wall seconds per image of the whole guarded call (scoring, mitigation, generation), and
  the guard's own share.

Run: `python -m memscan.guard_check --model demo --html guard.html --json guard.json`.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from memscan.errors import MemscanError, one_line

POLICY_ORDER = ("off", "warn", "reseed", "optimize", "rewrite", "block")


@dataclass(frozen=True)
class GuardCheckSettings:
    """What is generated and how: images per prompt, seeds, batch, DDIM steps, guidance, subset."""

    n_per_prompt: int = 4
    gen_seed: int = 0
    data_seed: int = 0
    batch_prompts: int = 16
    steps: int = 50
    guidance: float = 7.5
    memorized: int | None = None  # a seeded subset of this many memorized prompts (None: all)
    clean: int | None = None  # ... and of clean prompts
    subset_seed: int = 0
    reader_renders: int = 4000
    reader_holdout: int = 1000
    min_reader_accuracy: float = 0.8
    policies: tuple[str, ...] = POLICY_ORDER


def _subset(prompts: pd.DataFrame, settings: GuardCheckSettings) -> pd.DataFrame:
    """All labelled prompts, or a seeded sample of `memorized` / `clean` of them (order kept)."""
    parts = []
    for label, count in (("memorized", settings.memorized), ("not_memorized", settings.clean)):
        rows = prompts[prompts["label"] == label]
        if count is not None and count < len(rows):
            rows = rows.sample(n=count, random_state=settings.subset_seed).sort_index()
        parts.append(rows)
    return pd.concat(parts).reset_index(drop=True)


def generate_policy(
    pipe: Any, policy: str, texts: list[str], latents: torch.Tensor, settings: GuardCheckSettings,
    guard_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Images (P, n, 3, H, W) (NaN where blocked), per-prompt decisions and timings of one policy."""
    from memscan.guard import Guard

    n, size = settings.n_per_prompt, settings.batch_prompts
    guard = None if policy == "off" else Guard(pipe, "demo", policy=policy, **(guard_kwargs or {}))
    images: list[np.ndarray] = []
    decisions: list[dict[str, Any]] = []
    seconds = seconds_guard = 0.0
    for start in range(0, len(texts), size):
        batch = texts[start : start + size]
        lat = latents[start * n : (start + len(batch)) * n].clone()
        began = time.perf_counter()
        if guard is None:
            out = pipe(batch, num_images_per_prompt=n, latents=lat, num_inference_steps=settings.steps,
                       guidance_scale=settings.guidance, output_type="np").images
            got = np.asarray(out, dtype=np.float32)
            decisions += [{"flagged": False, "action": "off", "generated": True, "resolved": None,
                           "score_before": None, "score_after": None, "prompt_used": t} for t in batch]
        else:
            result = guard(batch, num_images_per_prompt=n, latents=lat, num_inference_steps=settings.steps,
                           guidance_scale=settings.guidance, output_type="np")
            seconds_guard += result.seconds_guard
            side = pipe.unet.config.sample_size * pipe.vae_scale_factor
            shape = next((np.asarray(i).shape for i in result.images if i is not None), (side, side, 3))
            got = np.stack([np.full(shape, np.nan, np.float32) if i is None else np.asarray(i, np.float32)
                            for i in result.images])
            decisions += [{"flagged": d.flagged, "action": d.action, "generated": d.generated,
                           "resolved": d.resolved, "score_before": d.score_before, "score_after": d.score_after,
                           "prompt_used": d.prompt_used, "error": d.error} for d in result.prompts]
        seconds += time.perf_counter() - began
        images.append(got.transpose(0, 3, 1, 2))
    stacked = np.concatenate(images)
    return {"images": stacked.reshape(len(texts), n, *stacked.shape[1:]), "decisions": pd.DataFrame(decisions),
            "seconds": seconds, "seconds_guard": seconds_guard}


def run_guard_check(
    model: str = "demo", settings: GuardCheckSettings | None = None, prompts_csv: str | Path | None = None,
    log: Any = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per prompt and policy: copy rate, attribute agreement, bit-identity; and the per-policy summary."""
    from memscan.demo.data import build_data, load_prompts
    from memscan.demo.verify import copy_cutoffs, copy_table, load_pipeline, reference_images, vae_roundtrip
    from memscan.mitigation.attributes import ATTRIBUTES, AttributeReader, decoded_renders, readable_attributes
    from memscan.mitigation.check import _agreements
    from memscan.models.loading import resolve_profile

    settings = settings or GuardCheckSettings()
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    profile = resolve_profile(model)
    pipe = load_pipeline(profile.source)
    data = build_data(settings.data_seed)
    prompts = _subset(load_prompts(prompts_csv, settings.data_seed), settings)
    texts = prompts["prompt"].tolist()
    mem = (prompts["label"] == "memorized").to_numpy()
    n = settings.n_per_prompt
    side = pipe.unet.config.sample_size
    latents = torch.randn((len(texts) * n, pipe.unet.config.in_channels, side, side),
                          generator=torch.Generator("cpu").manual_seed(settings.gen_seed))
    cutoffs, train = copy_cutoffs(data, pipe), reference_images(data, pipe)
    decode = partial(vae_roundtrip, pipe)
    reader = AttributeReader.calibrated(decode, n=settings.reader_renders, seed=settings.gen_seed)
    held_out = decoded_renders(decode, n=settings.reader_holdout, seed=settings.gen_seed + 1)
    checked = readable_attributes(reader.accuracy_by_size(*held_out), settings.min_reader_accuracy)
    attrs = {m.image_id: {k: getattr(m.attrs, k) for k in ATTRIBUTES} for m in data.memorized}
    mem_rows = prompts[mem].reset_index(drop=True)
    wanted = [attrs[i] for i in mem_rows["train_image_id"]]
    say(f"guard check: {int(mem.sum())} memorized + {int((~mem).sum())} clean prompts x {n} images, "
        f"policies {', '.join(settings.policies)}")

    table = prompts[["prompt", "label", "kind", "train_image_id"]].copy()
    runs: dict[str, dict[str, Any]] = {}
    for policy in settings.policies:
        run = generate_policy(pipe, policy, texts, latents, settings)
        images, decisions = run["images"], run["decisions"]
        generated = decisions["generated"].to_numpy(bool)
        copies = copy_table(data, prompts, np.nan_to_num(images, nan=-10.0), cutoffs, train)["copy_rate"].to_numpy()
        copies = np.where(generated, copies, 0.0)  # no image, no copy
        agree = np.full(len(texts), np.nan)
        agree_all = np.full(len(texts), np.nan)
        keep = generated[mem]
        if keep.any():
            a, b = _agreements(reader, images[mem][keep], [w for w, k in zip(wanted, keep, strict=True) if k], checked)
            idx = np.flatnonzero(mem)[keep]
            agree[idx], agree_all[idx] = a, b
        for column, values in (("flagged", decisions["flagged"].to_numpy(bool)), ("action", decisions["action"]),
                               ("generated", generated), ("resolved", decisions["resolved"]),
                               ("score_before", decisions["score_before"]), ("score_after", decisions["score_after"]),
                               ("prompt_used", decisions["prompt_used"]), ("copy", copies), ("agree", agree),
                               ("agree_all", agree_all)):
            table[f"{policy}:{column}"] = list(values)
        runs[policy] = run
        say(f"{policy}: {run['seconds']:.1f} s ({run['seconds'] / images.shape[0] / n:.4f} s/image), "
            f"memorized copy rate {copies[mem].mean():.3f}, "
            f"clean flagged {int(decisions['flagged'].to_numpy(bool)[~mem].sum())}")
    reference = runs.get("off")
    summary: dict[str, Any] = {"settings": asdict(settings), "memorized": int(mem.sum()), "clean": int((~mem).sum()),
                               "images_per_prompt": n, "checked_attributes": {k: list(v) for k, v in checked.items()},
                               "policies": {}}
    base_copy = table["off:copy"].to_numpy() if reference is not None else None
    for policy in settings.policies:
        run = runs[policy]
        copies = table[f"{policy}:copy"].to_numpy(float)
        flagged = table[f"{policy}:flagged"].to_numpy(bool)
        generated = table[f"{policy}:generated"].to_numpy(bool)
        agree = table[f"{policy}:agree"].to_numpy(float)
        agree_all = table[f"{policy}:agree_all"].to_numpy(float)
        row: dict[str, Any] = {
            "memorized_flagged": int(flagged[mem].sum()), "clean_flagged": int(flagged[~mem].sum()),
            "memorized_blocked": int((~generated[mem]).sum()),
            "memorized_generation_copy_rate": round(float(copies[mem].mean()), 4),
            "memorized_prompts_copying": int((copies[mem] > 0.5).sum()),
            "clean_prompts_copying": int((copies[~mem] > 0.5).sum()),
            "seconds_per_image": round(run["seconds"] / (len(texts) * n), 5),
            "guard_seconds_per_image": round(run["seconds_guard"] / (len(texts) * n), 5),
        }
        if base_copy is not None:
            was = base_copy[mem] > 0.5
            row["memorized_copying_unguarded"] = int(was.sum())
            row["stopped_copying_of_copying_unguarded"] = (
                round(float((copies[mem][was] <= 0.5).mean()), 4) if was.any() else None)
            same = np.array([np.array_equal(a, b) for a, b in zip(run["images"], reference["images"], strict=True)])
            row["clean_bit_identical"] = int(same[~mem].sum())
            row["clean_unflagged_bit_identical"] = f"{int(same[~mem & ~flagged].sum())}/{int((~mem & ~flagged).sum())}"
            base_agree, base_all = table["off:agree"].to_numpy(float), table["off:agree_all"].to_numpy(float)
            has = mem & np.isfinite(agree)
            row["attribute_agreement"] = round(float(agree[has].mean()), 4) if has.any() else None
            row["attribute_agreement_unguarded_same_prompts"] = (
                round(float(base_agree[has].mean()), 4) if has.any() else None)
            row["attribute_agreement_ratio"] = (round(float(agree[has].mean() / base_agree[has].mean()), 4)
                                                if has.any() and base_agree[has].mean() else None)
            row["attribute_agreement_ratio_all"] = (round(float(agree_all[has].mean() / base_all[has].mean()), 4)
                                                    if has.any() and base_all[has].mean() else None)
        summary["policies"][policy] = row
    return table, summary


def tradeoff_png(summary: dict[str, Any]) -> str:
    """Copy rate (memorized generations) vs attribute agreement ratio, one point per policy (a data URI)."""
    from matplotlib.figure import Figure

    from memscan.report import _png

    figure = Figure(figsize=(5.2, 3.6))
    ax = figure.subplots()
    for policy, row in summary["policies"].items():
        ratio = row.get("attribute_agreement_ratio")
        y = 0.0 if ratio is None else ratio  # block: no images, no agreement
        ax.scatter(row["memorized_generation_copy_rate"], y, s=40)
        ax.annotate(policy, (row["memorized_generation_copy_rate"], y), textcoords="offset points", xytext=(5, 4),
                    fontsize=9)
    ax.axhline(0.7, color="grey", linestyle="--", linewidth=0.8, label="target: 70% of unguarded agreement")
    ax.set_xlabel("copy rate of memorized prompts' generations")
    ax.set_ylabel("attribute agreement / unguarded")
    ax.set_title("guard policies on the demo model")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.05, 1.25)
    ax.legend(fontsize=8, loc="lower right")
    return _png(figure)


COLUMNS = (("memorized_flagged", "mem. flagged"), ("memorized_generation_copy_rate", "mem. copy rate"),
           ("memorized_prompts_copying", "mem. prompts copying"),
           ("stopped_copying_of_copying_unguarded", "stopped copying"),
           ("attribute_agreement_ratio", "agreement / unguarded"), ("memorized_blocked", "mem. blocked"),
           ("clean_flagged", "clean flagged"), ("clean_bit_identical", "clean bit-identical"),
           ("seconds_per_image", "s / image"), ("guard_seconds_per_image", "guard s / image"))


def markdown_table(summary: dict[str, Any]) -> str:
    """The per-policy summary as a Markdown table (the README's)."""
    head = "| policy | " + " | ".join(name for _, name in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    body = [f"| {policy} | " + " | ".join("-" if row.get(key) is None else str(row.get(key)) for key, _ in COLUMNS)
            + " |" for policy, row in summary["policies"].items()]
    return "\n".join([head, rule, *body])


def html_page(summary: dict[str, Any]) -> str:
    """A self-contained page: the table and the trade-off plot (embedded PNG)."""
    from memscan.report import _STYLE

    head = "".join(f"<th>{html.escape(name)}</th>" for _, name in COLUMNS)
    body = "".join(
        f"<tr><td>{html.escape(policy)}</td>" + "".join(
            f"<td>{'-' if row.get(key) is None else html.escape(str(row.get(key)))}</td>" for key, _ in COLUMNS)
        + "</tr>" for policy, row in summary["policies"].items())
    settings = html.escape(json.dumps(summary["settings"]))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>memscan guard check</title>"
            f"<style>{_STYLE}</style></head><body><h1>Guard policies on the demo model</h1>"
            f"<p>{summary['memorized']} memorized and {summary['clean']} clean prompts, "
            f"{summary['images_per_prompt']} images each.</p>"
            f"<table><tr><th>policy</th>{head}</tr>{body}</table>"
            f"<img alt='copy rate vs attribute agreement' src='{tradeoff_png(summary)}'>"
            f"<p class='facts'>settings: <code>{settings}</code></p></body></html>")


def main(argv: list[str] | None = None) -> int:
    """`python -m memscan.guard_check`: the comparison's summary JSON on stdout (and --html / --out)."""
    parser = argparse.ArgumentParser(prog="python -m memscan.guard_check", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="the demo model's profile")
    parser.add_argument("--prompts", default=None, help="labelled prompts.csv [default: rebuilt from --data-seed]")
    parser.add_argument("--n", type=int, default=4, help="images per prompt")
    parser.add_argument("--gen-seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--batch-prompts", type=int, default=16, help="prompts per guarded call")
    parser.add_argument("--memorized", type=int, default=None, help="a seeded subset of memorized prompts")
    parser.add_argument("--clean", type=int, default=None, help="a seeded subset of clean prompts")
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--policies", default=",".join(POLICY_ORDER), help="comma-separated; off first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="the per-prompt table (CSV)")
    parser.add_argument("--html", default=None, help="the table and trade-off plot as one HTML page")
    parser.add_argument("--json", default=None, help="also write the summary JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    settings = GuardCheckSettings(n_per_prompt=args.n, gen_seed=args.gen_seed, data_seed=args.data_seed,
                                  batch_prompts=args.batch_prompts, memorized=args.memorized, clean=args.clean,
                                  subset_seed=args.subset_seed, policies=policies)
    try:
        table, summary = run_guard_check(args.model, settings, args.prompts)
    except MemscanError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
    if args.out:
        table.to_csv(args.out, index=False)
    if args.html:
        Path(args.html).write_text(html_page(summary), encoding="utf-8")
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(text)
    print(markdown_table(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
