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
- closeness to the prompt of what was generated from (`prompt_similarities`): 1.0 for the prompt
  itself (off, warn, reseed, and every prompt the guard left alone); for a rewrite, the text
  similarity of the rewrite to the prompt as the rewrite search measures it (the profile's
  `text_similarity`: the demo's judge); for an optimised embedding, the cosine of it and the
  prompt's own embedding flattened over the token positions after BOS (the optimiser keeps BOS,
  and in SD's CLIP encoder the BOS state's norm, far above the others', would hold any cosine
  near 1); a text judge does not apply there. None where blocked. Two different measures: compare
  them within a policy, not across;
- clean prompts: how many give bit-identical images to the unguarded pipeline, and how many the
  guard flagged (a false alarm changes the images under every policy but warn);
- cost: wall seconds per image of the whole guarded call (scoring, mitigation, generation), and
  the guard's own share.

Run: `python -m memscan.guard_check --model demo --html guard.html --json guard.json`; `memscan report
--guard-check guard.json` puts the table and the trade-off plot on the report page.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from memscan.errors import MemscanError, one_line
from memscan.mitigation.check import GenerationCheck

if TYPE_CHECKING:
    from memscan.guard import PromptDecision
    from memscan.models.loading import ScoringModel
    from memscan.models.profiles import ModelProfile

POLICY_ORDER = ("off", "warn", "reseed", "optimize", "rewrite", "block")


@dataclass(frozen=True)
class GuardCheckSettings(GenerationCheck):
    """The shared generation settings, plus prompts per guarded call, the subset, the policies and
    the Guard's own settings."""

    batch_prompts: int = 16
    memorized: int | None = None  # a seeded subset of this many memorized prompts (None: all)
    clean: int | None = None  # ... and of clean prompts
    subset_seed: int = 0
    policies: tuple[str, ...] = POLICY_ORDER
    target: float | None = None  # what reseed, optimize and rewrite aim under (None: the threshold)
    optimize_steps: int = 50
    optimize_depth: float = 0.0
    optimize_late: float | None = None  # Guard(optimize_late=): re-optimise at this share of the steps

    def guard_kwargs(self) -> dict[str, Any]:
        """The Guard settings these name (the rest are the Guard's defaults)."""
        return {"optimize_steps": self.optimize_steps, "optimize_depth": self.optimize_depth,
                "optimize_late": self.optimize_late, **({} if self.target is None else {"target": self.target})}


def _subset(prompts: pd.DataFrame, settings: GuardCheckSettings) -> pd.DataFrame:
    """All labelled prompts, or a seeded sample of `memorized` / `clean` of them (order kept)."""
    parts = []
    for label, count in (("memorized", settings.memorized), ("not_memorized", settings.clean)):
        rows = prompts[prompts["label"] == label]
        if count is not None and count < len(rows):
            rows = rows.sample(n=count, random_state=settings.subset_seed).sort_index()
        parts.append(rows)
    return pd.concat(parts).reset_index(drop=True)


def embedding_cosine(original: torch.Tensor, other: torch.Tensor) -> float:
    """Cosine of two (1, 77, hidden) prompt embeddings, flattened over the token positions after BOS."""
    from memscan.mitigation.embeddings import embedding_cosine as cosine

    return float(cosine(*(x.detach().cpu().double() for x in (original, other))))


def prompt_similarities(model: ScoringModel, decisions: Sequence[PromptDecision]) -> list[float | None]:
    """Per prompt, how close what it was generated from is to it (see the module); None: no images."""
    from memscan.mitigation.similarity import cosine_to, resolve_similarity, sentence_embeddings
    from memscan.models.text import encode_prompts

    out: list[float | None] = [1.0 if d.generated else None for d in decisions]
    rewritten = [i for i, d in enumerate(decisions)
                 if d.generated and d.embedding is None and d.prompt_used not in (None, d.prompt)]
    if rewritten:
        kind = resolve_similarity(model.profile.text_similarity)
        texts = [t for i in rewritten for t in (decisions[i].prompt, decisions[i].prompt_used)]
        vectors = sentence_embeddings(model, texts, kind)
        for j, i in enumerate(rewritten):
            out[i] = float(cosine_to(vectors[2 * j], vectors[2 * j + 1 : 2 * j + 2])[0])
    for i, d in enumerate(decisions):
        if d.generated and d.embedding is not None:
            with torch.no_grad():
                out[i] = embedding_cosine(encode_prompts(model, [d.prompt]), d.embedding)
    return out


def generate_policy(
    pipe: Any, policy: str, texts: list[str], latents: torch.Tensor, settings: GuardCheckSettings,
    guard_kwargs: dict[str, Any] | None = None, profile: str | ModelProfile = "demo",
) -> dict[str, Any]:
    """Images (P, n, 3, H, W) (NaN where blocked), per-prompt decisions and timings of one policy."""
    from memscan.guard import Guard

    n, size = settings.n_per_prompt, settings.batch_prompts
    guard = None if policy == "off" else Guard(pipe, profile, policy=policy, **(guard_kwargs or {}))
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
                           "score_before": None, "score_after": None, "prompt_used": t, "similarity": 1.0}
                          for t in batch]
        else:
            result = guard(batch, num_images_per_prompt=n, latents=lat, num_inference_steps=settings.steps,
                           guidance_scale=settings.guidance, output_type="np")
            seconds_guard += result.seconds_guard
            side = pipe.unet.config.sample_size * pipe.vae_scale_factor
            shape = next((np.asarray(i).shape for i in result.images if i is not None), (side, side, 3))
            got = np.stack([np.full(shape, np.nan, np.float32) if i is None else np.asarray(i, np.float32)
                            for i in result.images])
        seconds += time.perf_counter() - began
        if guard is not None:  # the similarity is measured off the clock
            similarity = prompt_similarities(guard.model, result.prompts)
            decisions += [{"flagged": d.flagged, "action": d.action, "generated": d.generated,
                           "resolved": d.resolved, "score_before": d.score_before, "score_after": d.score_after,
                           "prompt_used": d.prompt_used, "error": d.error, "similarity": s}
                          for d, s in zip(result.prompts, similarity, strict=True)]
        images.append(got.transpose(0, 3, 1, 2))
    stacked = np.concatenate(images)
    return {"images": stacked.reshape(len(texts), n, *stacked.shape[1:]), "decisions": pd.DataFrame(decisions),
            "seconds": seconds, "seconds_guard": seconds_guard}


def run_guard_check(
    model: str = "demo", settings: GuardCheckSettings | None = None, prompts_csv: str | Path | None = None,
    log: Any = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per prompt and policy: copy rate, attribute agreement, similarity, bit-identity; and the summary."""
    from memscan.demo.data import build_data, load_prompts
    from memscan.demo.verify import copy_cutoffs, copy_table, load_pipeline, reference_images, vae_roundtrip
    from memscan.mitigation.check import agreements, content_for
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
    content = content_for("demo", data, partial(vae_roundtrip, pipe), settings)  # as the mitigation check reads
    reader, checked = content.reader, content.checked
    wanted = [content.wanted[i] for i in prompts.loc[mem, "train_image_id"]]
    say(f"guard check: {int(mem.sum())} memorized + {int((~mem).sum())} clean prompts x {n} images, "
        f"policies {', '.join(settings.policies)}")

    table = prompts[["prompt", "label", "kind", "train_image_id"]].copy()
    runs: dict[str, dict[str, Any]] = {}
    for policy in settings.policies:
        run = generate_policy(pipe, policy, texts, latents, settings, settings.guard_kwargs(), profile=profile)
        images, decisions = run["images"], run["decisions"]
        generated = decisions["generated"].to_numpy(bool)
        copies = copy_table(data, prompts, np.nan_to_num(images, nan=-10.0), cutoffs, train)["copy_rate"].to_numpy()
        copies = np.where(generated, copies, 0.0)  # no image, no copy
        agree = np.full(len(texts), np.nan)
        agree_all = np.full(len(texts), np.nan)
        keep = generated[mem]
        if keep.any():
            a, b = agreements(reader, images[mem][keep], [w for w, k in zip(wanted, keep, strict=True) if k], checked)
            idx = np.flatnonzero(mem)[keep]
            agree[idx], agree_all[idx] = a, b
        for column, values in (("flagged", decisions["flagged"].to_numpy(bool)), ("action", decisions["action"]),
                               ("generated", generated), ("resolved", decisions["resolved"]),
                               ("score_before", decisions["score_before"]), ("score_after", decisions["score_after"]),
                               ("prompt_used", decisions["prompt_used"]), ("similarity", decisions["similarity"]),
                               ("copy", copies), ("agree", agree), ("agree_all", agree_all)):
            table[f"{policy}:{column}"] = list(values)
        runs[policy] = run
        say(f"{policy}: {run['seconds']:.1f} s ({run['seconds'] / images.shape[0] / n:.4f} s/image), "
            f"memorized copy rate {copies[mem].mean():.3f}, "
            f"clean flagged {int(decisions['flagged'].to_numpy(bool)[~mem].sum())}")
    if "off" in runs:
        for policy, run in runs.items():
            table[f"{policy}:identical"] = [np.array_equal(a, b) for a, b in
                                            zip(run["images"], runs["off"]["images"], strict=True)]
    seconds = {policy: (run["seconds"], run["seconds_guard"]) for policy, run in runs.items()}
    summary = summarize(table, seconds, settings, text_similarity=similarity_name(profile.text_similarity))
    summary["checked_attributes"] = {k: list(v) for k, v in checked.items()}
    return table, summary


def similarity_name(kind: str) -> str:
    """A text similarity as the summary names it: pooled / tokens / a model's id or folder name."""
    from memscan.models.profiles import TEXT_SIMILARITIES

    return kind if kind in TEXT_SIMILARITIES or not Path(kind).exists() else Path(kind).name


def _mean(values: np.ndarray) -> float | None:
    """The mean of the finite values, rounded; None when there are none."""
    finite = values[np.isfinite(values)]
    return round(float(finite.mean()), 4) if finite.size else None


def summarize(
    table: pd.DataFrame, seconds: dict[str, tuple[float, float]], settings: GuardCheckSettings, *,
    text_similarity: str = "pooled",
) -> dict[str, Any]:
    """The per-policy summary of a guard check table; `seconds`: policy -> (whole calls, the guard's share)."""
    mem = (table["label"] == "memorized").to_numpy()
    n = settings.n_per_prompt
    images = len(table) * n
    measures = {"optimize": "embedding cosine", "rewrite": f"text ({text_similarity})", "block": None}
    summary: dict[str, Any] = {"settings": asdict(settings), "memorized": int(mem.sum()), "clean": int((~mem).sum()),
                               "images_per_prompt": n, "text_similarity": text_similarity, "policies": {}}
    reference = "off:copy" in table
    for policy in settings.policies:
        copies = table[f"{policy}:copy"].to_numpy(float)
        flagged = table[f"{policy}:flagged"].to_numpy(bool)
        generated = table[f"{policy}:generated"].to_numpy(bool)
        agree = table[f"{policy}:agree"].to_numpy(float)
        agree_all = table[f"{policy}:agree_all"].to_numpy(float)
        similarity = pd.to_numeric(table[f"{policy}:similarity"], errors="coerce").to_numpy(float)
        mem_similarity = similarity[mem][np.isfinite(similarity[mem])]
        row: dict[str, Any] = {
            "memorized_flagged": int(flagged[mem].sum()), "clean_flagged": int(flagged[~mem].sum()),
            "memorized_blocked": int((~generated[mem]).sum()),
            "memorized_generation_copy_rate": round(float(copies[mem].mean()), 4),
            "memorized_prompts_copying": int((copies[mem] > 0.5).sum()),
            "clean_prompts_copying": int((copies[~mem] > 0.5).sum()),
            "similarity_measure": measures.get(policy, "same prompt"),
            "memorized_similarity": _mean(similarity[mem]),
            "memorized_similarity_min": round(float(mem_similarity.min()), 4) if mem_similarity.size else None,
            "clean_similarity": _mean(similarity[~mem]),
            "seconds_per_image": round(seconds[policy][0] / images, 5),
            "guard_seconds_per_image": round(seconds[policy][1] / images, 5),
        }
        if reference:
            base_copy = table["off:copy"].to_numpy(float)
            was = base_copy[mem] > 0.5
            row["memorized_copying_unguarded"] = int(was.sum())
            row["stopped_copying_of_copying_unguarded"] = (
                round(float((copies[mem][was] <= 0.5).mean()), 4) if was.any() else None)
            same = table[f"{policy}:identical"].to_numpy(bool)
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
    return summary


def html_page(summary: dict[str, Any]) -> str:
    """A self-contained page: the trade-off plot and the table (`memscan report --guard-check` makes it too)."""
    from memscan.report import build_report

    return build_report([], title="memscan guard check: policies on the demo model", guard_checks={"demo": summary})


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
    parser.add_argument("--target", type=float, default=None,
                        help="the score reseed, optimize and rewrite aim under [default: the threshold]")
    parser.add_argument("--optimize-steps", type=int, default=50, help="most AdamW steps of optimize")
    parser.add_argument("--optimize-depth", type=float, default=0.0,
                        help="optimize aims this share of the starting gap under the target")
    parser.add_argument("--optimize-late", type=float, default=None,
                        help="optimize re-optimises the embedding at this share of the steps on the call's latents")
    parser.add_argument("--out", default=None, help="the per-prompt table (CSV)")
    parser.add_argument("--html", default=None, help="the table and trade-off plot as one HTML page")
    parser.add_argument("--json", default=None, help="also write the summary JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    settings = GuardCheckSettings(n_per_prompt=args.n, gen_seed=args.gen_seed, data_seed=args.data_seed,
                                  batch_prompts=args.batch_prompts, memorized=args.memorized, clean=args.clean,
                                  subset_seed=args.subset_seed, policies=policies, target=args.target,
                                  optimize_steps=args.optimize_steps, optimize_depth=args.optimize_depth,
                                  optimize_late=args.optimize_late)
    from memscan.report import guard_markdown_table

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
    print(guard_markdown_table(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
