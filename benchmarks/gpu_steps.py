"""The GPU checks of issue 15 that `throughput.py` does not time, and the summary of a gpu_check run.

    python benchmarks/gpu_steps.py oom --arch sd-v1 --device cuda --json out/oom.json
    python benchmarks/gpu_steps.py methods --arch sd-v1 --device cuda --json out/methods.json
    python benchmarks/gpu_steps.py mitigate --arch sd-v1 --device cuda --json out/mitigate.json
    python benchmarks/gpu_steps.py summary STEP_DIR --json out/summary.json --markdown out/summary.md

- `oom`: a real CUDA out-of-memory. The method is probed for its bytes per prompt (as
  `--batch-size auto` does), the batch is set to `--factor` times what fits, and the scorer must
  halve down and complete with every row `ok` and the scores of a clean run at the batch size it
  ended on. `--cap-gib` caps the process's CUDA memory (torch.cuda.set_per_process_memory_fraction:
  the allocator raises the same OutOfMemoryError, but the runs are small); 0 uses the whole card.
  Then `--batch-size auto` runs the same prompts: it must not hit an out-of-memory.
- `methods`: seconds per prompt of `anisotropy`, `wen:steps=10` and `sharpness` (bf16, and
  sharpness in fp32 as the README advises), one untimed warm-up batch each.
- `mitigate`: seconds per prompt of the text search and of the embedding optimisation on the
  prompts scored above their median (the target).
- `summary`: one table (JSON and Markdown) from the step JSON files of a gpu_check run.

On a CPU every step runs (tiny shapes, SMOKE mode) except `oom`, which needs CUDA and says so.
Random weights give the architecture's cost, not a real model's scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402 - the benchmark's model builder, prompts and clock

# Issue 15's targets (SD v1.4, 512 px, n = 1, one H200) and its estimate of the physical limit.
TARGET_DEFAULT = 150.0
TARGET_COMPILE = 250.0
TARGET_UNET_SHARE = 0.95
PHYSICAL_LIMIT = 450.0  # prompts/s: ~790 bf16 TFLOP/s over two UNet evaluations of ~0.8 TFLOP


def model_args(args: argparse.Namespace, dtype: str | None = None) -> argparse.Namespace:
    """The Namespace throughput.build_model reads."""
    return argparse.Namespace(
        arch=args.arch, model=None, device=args.device, dtype=dtype or args.dtype,
        resolution=args.resolution, seed=args.seed,
    )


def sync(device: torch.device) -> None:
    throughput.sync(device)


class OomCounter(logging.Handler):
    """Counts the scorer's 'out of memory at batch size N; retrying with M' warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "out of memory" in record.getMessage():
            self.events.append(record.getMessage())


def timed_scores(scorer: Any, prompts: list[str], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    scored = scorer.score_texts(prompts)
    sync(device)
    return time.perf_counter() - start, scored


def step_oom(args: argparse.Namespace) -> dict[str, Any]:
    """A batch `factor` times too large halves down, completes, and equals a clean run."""
    from memscan.methods.anisotropy import AnisotropyMethod
    from memscan.models.batching import auto_batch_size, cuda_free_bytes, per_prompt_cost
    from memscan.scorer import Scorer

    model, facts = throughput.build_model(model_args(args))
    device = model.device
    if device.type != "cuda":
        return {"skipped": "needs CUDA: a real out-of-memory cannot happen on a CPU", **facts}
    total = torch.cuda.get_device_properties(device).total_memory
    if args.cap_gib > 0:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), device)
    method = AnisotropyMethod.from_profile(model.profile)
    counter = OomCounter()
    logging.getLogger("memscan").addHandler(counter)

    def scorer(batch_size: int | str) -> Scorer:
        return Scorer(model, method, n_noise=args.n_noise, seed=51, batch_size=batch_size)

    probe_scorer = scorer(1)
    peaks = {size: probe_scorer._probe_peak_bytes(size) for size in (2, 4)}
    slope, fixed = per_prompt_cost(peaks)
    free = cuda_free_bytes(device)
    fits = auto_batch_size(free, slope, fixed_bytes=fixed, fraction=1.0, maximum=1 << 20, multiple=1)
    too_large = max(8, int(args.factor * fits))
    prompts, _ = throughput.load_prompts(too_large, None)

    counter.events.clear()
    oom_scorer = scorer(too_large)
    oom_s, oom_run = timed_scores(oom_scorer, prompts, device)
    events = list(counter.events)
    clean_s, clean_run = timed_scores(scorer(oom_scorer.batch_size), prompts, device)
    counter.events.clear()
    auto_scorer = scorer("auto")
    auto_s, auto_run = timed_scores(auto_scorer, prompts, device)
    auto_events = list(counter.events)
    logging.getLogger("memscan").removeHandler(counter)

    diff = max(float(np.max(np.abs(oom_run.columns[c].astype(np.float64) - clean_run.columns[c]))) for c in
               oom_run.columns)
    scale = max(1.0, float(np.max(np.abs(clean_run.columns["score"]))))
    statuses = {str(s): int(n) for s, n in zip(*np.unique(oom_run.status, return_counts=True), strict=True)}
    result = {
        **facts, "cap_gib": args.cap_gib or None, "total_gib": total / 2**30, "n_noise": args.n_noise,
        "probe_peaks_bytes": peaks, "bytes_per_prompt": slope, "fixed_bytes": fixed, "free_bytes": free,
        "fits_prompts": fits, "batch_size_start": too_large, "prompts": len(prompts),
        "oom_events": events, "batch_size_end": oom_scorer.batch_size, "statuses": statuses,
        "seconds_with_oom": oom_s, "seconds_clean": clean_s,
        "max_abs_diff_vs_clean": diff, "tolerance": args.tolerance * scale,
        "auto_batch_size": auto_scorer.batch_size, "auto_oom_events": auto_events, "seconds_auto": auto_s,
        "auto_statuses_ok": bool(np.all(auto_run.status == "ok")),
    }
    result["passed"] = bool(
        events and statuses == {"ok": len(prompts)} and diff <= result["tolerance"] and not auto_events
        and result["auto_statuses_ok"]
    )
    return result


def step_methods(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per prompt of each method (one warm-up batch each, untimed)."""
    from memscan.methods import method_for
    from memscan.models.device import dtype_name
    from memscan.scorer import Scorer

    prompts, _ = throughput.load_prompts(args.prompts, None)
    rows: list[dict[str, Any]] = []
    plans = [(args.dtype, spec) for spec in args.methods] + [("fp32", spec) for spec in args.fp32_methods]
    models: dict[str, Any] = {}
    for dtype, spec in plans:
        if dtype not in models:
            models.clear()  # one model on the card at a time
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            models[dtype] = throughput.build_model(model_args(args, dtype))
        model, facts = models[dtype]
        method = method_for(spec, model.profile)
        scorer = Scorer(model, method, n_noise=1, seed=51, batch_size=args.batch_size)
        warm_s, _ = timed_scores(scorer, prompts[: scorer.batch_size], model.device)
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        seconds, scored = timed_scores(
            Scorer(model, method, n_noise=1, seed=51, batch_size=scorer.batch_size), prompts, model.device
        )
        rows.append({
            "method": spec, "dtype": dtype_name(model.dtype), "batch_size": scorer.batch_size,
            "prompts": len(prompts), "warmup_s": warm_s, "seconds": seconds,
            "seconds_per_prompt": seconds / len(prompts),
            "nonfinite": int(np.sum(~np.isfinite(scored.columns["score"]))),
            "peak_memory_gib": throughput.peak_memory(model.device),
        })
        print(f"{spec:>16} {rows[-1]['dtype']}  batch {scorer.batch_size}  {seconds / len(prompts):.4f} s/prompt",
              flush=True)
    return {"model": args.arch, "results": rows}


def step_mitigate(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per prompt of the text search and the embedding optimisation."""
    import pandas as pd

    from memscan.config import DetectSettings
    from memscan.detect import build_scorer
    from memscan.mitigation import emit_embeddings, rewrite_prompts
    from memscan.mitigation.settings import MitigateSettings

    model, facts = throughput.build_model(model_args(args))
    prompts, _ = throughput.load_prompts(args.prompts, None)
    detect = DetectSettings(batch_size=args.batch_size)
    settings = MitigateSettings(detect=detect, embedding_steps=args.embedding_steps)
    scorer = build_scorer(detect, model)
    scores = scorer.score_texts(prompts).columns["score"]
    target = float(np.median(scores))  # half the prompts are "flagged"
    frame = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt": prompts})
    sync(model.device)
    rows, timing = rewrite_prompts(scorer, frame, target, settings)
    sync(model.device)
    attempted = int(rows["status"].isin(["ok", "unresolved"]).sum())
    _, embed_s = emit_embeddings(scorer, rows, target, settings)
    sync(model.device)
    return {
        **facts, "prompts": len(prompts), "target": target, "attempted": attempted, **timing,
        "seconds_embeddings": embed_s,
        "embedding_seconds_per_prompt": embed_s / attempted if attempted else None,
        "embedding_steps_max": args.embedding_steps,
        "statuses": rows["status"].value_counts().to_dict(),
    }


# ---------------------------------------------------------------------------------- summary


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _fp32_scores(found: dict[str, dict[str, Any] | None]) -> list[float] | None:
    """The uncompiled fp32 scores of the SD v1 model (same seeded weights and prompts as the bf16
    steps): the yardstick of every bf16 setting."""
    data = found.get("sd-v1-fp32")
    for key, sample in (data or {}).get("scores_sample", {}).items():
        if key.startswith("default@"):
            return sample["score"]
    return None


def summarize(folder: Path, steps: Sequence[str]) -> tuple[dict[str, Any], str]:
    """Every step's JSON under one object, and a Markdown table of the rows of issue 15."""
    found = {name: _load(folder, name) for name in steps}
    lines = []
    configs = [d["config"] for d in found.values() if d and "config" in d]
    if configs:
        c = configs[0]
        lines += [f"Device: {c.get('device_name')} ({c.get('device')}); torch {c.get('torch')}, "
                  f"diffusers {c.get('diffusers')}, python {c.get('python')}.", ""]
    lines += ["| check | setting | measured | target / note |", "|---|---|---|---|"]
    fp32 = _fp32_scores(found)

    def row(check: str, setting: str, measured: str, note: str = "") -> None:
        lines.append(f"| {check} | {setting} | {measured} | {note} |")

    for name, data in found.items():
        if data is None:
            row(name, "-", "no result (failed or skipped: see its log)")
            continue
        if "results" in data and "scores_check" in data:  # a throughput.py run
            config, check = data["config"], data["scores_check"]
            shape = f"{config['resolution']} px {config['dtype']}"
            on_gpu = str(config.get("device", "")).startswith("cuda")
            for r in data["results"]:
                variant = f" {r.get('variant', 'default')}" if r["method"] == "memscan" else ""
                what = (f"{r['method']}{variant} batch {r['batch_size']}"
                        f"{' (auto)' if r.get('batch_spec') == 'auto' else ''}")
                measured = (f"{r['prompts_per_s']:.1f} prompts/s, UNet share {100 * r['unet_share']:.1f}%, "
                            f"peak {_fmt(r.get('peak_memory_gib'), '.1f')} GiB, speed-up "
                            f"{_fmt(r.get('speedup'), '.1f')}x, warm-up {r['warmup_s']:.1f} s")
                sample = data.get("scores_sample", {}).get(f"{r.get('variant')}@{r.get('batch_spec')}")
                if fp32 is not None and sample and name.startswith("sd-v1") and config["dtype"] != "fp32":
                    common = min(len(fp32), len(sample["score"]))
                    worst = max(abs(a - b) for a, b in zip(sample["score"][:common], fp32[:common], strict=True))
                    measured += f", max abs score diff to fp32 {worst:.2e} ({common} prompts)"
                note = ""
                if on_gpu and name.startswith("sd-v1") and r["method"] == "memscan" and config["dtype"] == "bf16":
                    target = TARGET_COMPILE if r.get("variant") == "compile" else TARGET_DEFAULT
                    note = (f">= {target:.0f} prompts/s: {'met' if r['prompts_per_s'] >= target else 'NOT met'}; "
                            f"{100 * r['prompts_per_s'] / PHYSICAL_LIMIT:.0f}% of ~{PHYSICAL_LIMIT:.0f}; UNet share "
                            f"{'met' if r['unet_share'] >= TARGET_UNET_SHARE else 'NOT met'}")
                row(f"{name}: {shape}", what, measured, note)
            if check.get("common_prompts"):
                verdict = ("no verdict outside fp32" if "equal" not in check else
                           f"{'EQUAL' if check['equal'] else 'DIFFERENT'} (tolerance {check['tolerance']:.1e})")
                row(f"{name}: scores vs reference", f"{check['common_prompts']} prompts, worst of all rows",
                    f"max abs diff {check['max_abs_score']:.2e}", verdict)
            for v in check.get("variants", []):
                row(f"{name}: lever", f"{v['variant']} vs {v['base']} batch {v['batch_size']}",
                    f"prompts/s x{v['prompts_per_s_ratio']:.3f}",
                    "scores bit-identical" if v["bit_identical"] else f"max abs diff {v['max_abs_diff']:.2e}")
        elif name.startswith("oom"):
            if "skipped" in data:
                row(name, "-", data["skipped"])
                continue
            cap = f"cap {data['cap_gib']} GiB" if data.get("cap_gib") else f"whole card {data['total_gib']:.0f} GiB"
            row(name, f"{cap}, n_noise {data['n_noise']}",
                f"batch {data['batch_size_start']} -> {data['batch_size_end']} after {len(data['oom_events'])} OOMs, "
                f"statuses {data['statuses']}, max abs diff vs clean {data['max_abs_diff_vs_clean']:.2e}; "
                f"auto batch {data['auto_batch_size']} with {len(data['auto_oom_events'])} OOMs",
                "PASSED" if data.get("passed") else "FAILED")
        elif name.startswith("methods"):
            for r in data["results"]:
                row(name, f"{r['method']} {r['dtype']} batch {r['batch_size']}",
                    f"{r['seconds_per_prompt']:.4f} s/prompt ({r['prompts']} prompts)",
                    f"non-finite {r['nonfinite']}; peak {_fmt(r.get('peak_memory_gib'), '.1f')} GiB")
        elif name.startswith("mitigate"):
            row(name, f"{data['attempted']} of {data['prompts']} prompts above the target",
                f"search {_fmt(data.get('seconds_per_prompt'), '.3f')} s/prompt, embedding "
                f"{_fmt(data.get('embedding_seconds_per_prompt'), '.3f')} s/prompt", f"statuses {data.get('statuses')}")
    return {"steps": found}, "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    for name in ("oom", "methods", "mitigate"):
        p = sub.add_parser(name)
        p.add_argument("--arch", choices=throughput.RANDOM_ARCHES, default="sd-v1")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto")
        p.add_argument("--resolution", type=int)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--json", metavar="PATH", required=True)
        if name == "oom":
            p.add_argument("--cap-gib", type=float, default=16.0, help="CUDA memory cap (0: the whole card)")
            p.add_argument("--factor", type=float, default=4.0, help="the first batch, in multiples of what fits")
            p.add_argument("--n-noise", type=int, default=1)
            p.add_argument("--tolerance", type=float, default=1e-3,
                           help="max |score - clean run's| relative to max(1, |score|)")
        else:
            p.add_argument("--prompts", type=int, default=16)
            p.add_argument("--batch-size", default="auto")
        if name == "methods":
            p.add_argument("--methods", type=lambda t: [s for s in t.split(";") if s],
                           default=["anisotropy", "wen:steps=10", "sharpness"], help="';'-separated specs")
            p.add_argument("--fp32-methods", type=lambda t: [s for s in t.split(";") if s], default=["sharpness"])
        if name == "mitigate":
            p.add_argument("--embedding-steps", type=int, default=50)
    s = sub.add_parser("summary")
    s.add_argument("folder", type=Path)
    s.add_argument("--steps", default="", help="comma-separated step names (default: every *.json there)")
    s.add_argument("--json", metavar="PATH", required=True)
    s.add_argument("--markdown", metavar="PATH", required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step == "summary":
        steps = [s for s in args.steps.split(",") if s] or sorted(p.stem for p in args.folder.glob("*.json"))
        data, table = summarize(args.folder, steps)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        Path(args.markdown).write_text(table, encoding="utf-8")
        print(table)
        return 0
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    step = {"oom": step_oom, "methods": step_methods, "mitigate": step_mitigate}[args.step]
    with throughput._quiet_warnings():
        result = step(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2, default=str)[:4000])
    print(f"wrote {path}")
    if args.step == "oom" and "skipped" not in result and not result["passed"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
