"""Throughput of memscan's batched scorer against the reference code's per-prompt protocol.

Both are measured in ONE process on the same model, noise bank and prompts:

- memscan: `Scorer.score_texts` on N prompts, from a fresh Scorer, so the one-off shared
  unconditional pass (2n UNet evaluations) is inside the timed region; every prompt then costs
  2n conditional evaluations, `--batch-size` prompts per UNet call.
- reference: `reference_score` (4n separate batch-1 UNet calls per prompt, the empty prompt
  re-encoded every time, as the reference code does) on the first M of the same prompts.

Each timed run follows an untimed warm-up of the same shapes (reported separately). UNet time is
measured with forward pre/post hooks on the UNet (synchronized on CUDA), so the table also gives
the share of wall time spent inside UNet calls. The scores of the common prompts are compared:
the two protocols must give the same numbers (up to float rounding).

    python benchmarks/throughput.py                         # demo model if present, else tiny
    python benchmarks/throughput.py --arch sd-v1 --resolution 128 --prompts 8 --reference-prompts 4
    python benchmarks/throughput.py --arch sd-v1 --device cuda --dtype bf16 --prompts 256 \\
        --batch-size 8,16,32 --reference-prompts 16 --json out/sd-v1.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_PROMPTS_FILE = "benchmark/sd1_mem.txt"  # under memscan's data folder (data/ in a checkout)
RANDOM_ARCHES = ("tiny", "sd-v1", "sd-v2", "sd-v2-base")
# The shipped profile that holds each architecture's scoring settings (weights, v convention).
ARCH_PROFILES = {"sd-v1": "sd-v1-4", "sd-v2": "sd-v2", "sd-v2-base": "sd-v2-base"}

# memscan speed options timed by --variants: Scorer keyword arguments over the defaults (prefetch
# and channels_last on CUDA only, no compile). Each variant starts from an eager, contiguous UNet.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "prefetch": {"prefetch": True},
    "no-prefetch": {"prefetch": False},
    "channels-last": {"channels_last": True},
    "no-channels-last": {"channels_last": False},
    "compile": {"compile": True},
    "sequential": {"prefetch": False, "channels_last": False},  # the pre-issue-15 path
}

# Built-in prompts (used when the benchmark prompt file is absent). Subjects x styles gives
# distinct texts; the prompt text does not change the cost (every prompt is padded to 77 tokens).
SUBJECTS = (
    "a cat sitting on a windowsill", "the mona lisa", "a red sports car", "a lighthouse at dusk",
    "an astronaut riding a horse", "a bowl of ramen", "a mountain lake", "a portrait of an old man",
    "a city street in the rain", "a vintage poster of paris", "a dragon over a castle",
    "a field of sunflowers", "a robot reading a book", "a wooden cabin in the snow",
    "a bouquet of roses", "a sailing ship in a storm", "a fox in the forest", "a bowl of fruit",
    "a desert at sunset", "a jazz band on stage", "a cup of coffee on a table", "a koi pond",
    "a steam locomotive", "a hot air balloon festival",
)
STYLES = (
    "", ", oil painting", ", photograph", ", watercolor", ", digital art", ", pencil sketch",
    ", 4k, highly detailed", ", by claude monet", ", studio lighting", ", pixel art",
    ", in the style of ukiyo-e", ", cinematic",
)


def builtin_prompts() -> list[str]:
    return [f"{subject}{style}" for style in STYLES for subject in SUBJECTS]


def load_prompts(count: int, path: Path | None) -> tuple[list[str], str]:
    """`count` distinct prompts from `path` (one per line) if readable, else the built-in list.

    Distinct texts are needed: the Scorer scores identical prompts once, which would flatter it."""
    source = "built-in list"
    pool: list[str] = []
    if path is not None:
        try:
            pool = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            source = str(path)
        except (OSError, UnicodeDecodeError) as exc:
            print(f"note: cannot read {path} ({exc.__class__.__name__}); using built-in prompts",
                  file=sys.stderr)
    pool = list(dict.fromkeys(p for p in pool if p)) or builtin_prompts()
    prompts = pool[:count]
    copy = 1
    while len(prompts) < count:  # more prompts than the pool: numbered variants stay distinct
        prompts += [f"{p} #{copy}" for p in pool[: count - len(prompts)]]
        copy += 1
    return prompts, source


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class UNetClock:
    """Wall time and sample rows inside UNet forward calls, via pre/post forward hooks."""

    def __init__(self, unet: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.cpu_s = 0.0
        self.calls = 0
        self.rows = 0
        self._start = 0.0
        self._handles = [
            unet.register_forward_pre_hook(self._pre, with_kwargs=True),
            unet.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.rows += int(sample.shape[0])
        self.calls += 1
        sync(self.device)
        self._start = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._start

    def reset(self) -> None:
        self.seconds, self.calls, self.rows = 0.0, 0, 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class Timing:
    method: str
    batch_size: int  # prompts per UNet call (what `auto` resolved to, for an `auto` row)
    prompts: int
    warmup_s: float
    seconds: float
    prompts_per_s: float
    unet_calls: int
    unet_evals_per_prompt: float  # measured: UNet sample rows / prompts (shared pass included)
    nominal_evals_per_prompt: int
    unet_s: float
    unet_share: float
    speedup: float | None = None  # prompts/s over the reference's
    peak_memory_gib: float | None = None  # CUDA only: peak allocated during the timed run
    cpu_s: float | None = None  # process CPU time of the timed run (on a busy CPU: compare these)
    variant: str = "default"  # memscan's speed options (VARIANTS)
    batch_spec: str = ""  # the --batch-size entry: a number or auto


def timed(clock: UNetClock, device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of `work()` and its result; `clock.cpu_s` gets its process CPU seconds."""
    clock.reset()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cpu_start = time.process_time()
    start = time.perf_counter()
    result = work()
    sync(device)
    seconds = time.perf_counter() - start
    clock.cpu_s = time.process_time() - cpu_start
    return seconds, result


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The ScoringModel to benchmark and facts about how it was made."""
    from memscan.models.device import resolve_device, resolve_dtype
    from memscan.models.loading import load_model, scoring_model_from_pipeline

    start = time.perf_counter()
    import diffusers  # noqa: F401 - imports are timed apart from the build
    import transformers  # noqa: F401

    import_s = time.perf_counter() - start
    start = time.perf_counter()
    if args.arch is None:
        model = load_model(
            args.model, device=args.device, dtype=args.dtype,
            profile_overrides={"resolution": args.resolution},
        )
        facts = {"model": args.model, "weights": "loaded"}
    else:
        from memscan.models.builders import build_random_pipeline, build_tiny_pipeline
        from memscan.models.profiles import ModelProfile, load_profile

        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        if args.arch == "tiny":
            pipeline = build_tiny_pipeline(seed=args.seed, dtype=dtype, device=device)
            profile = ModelProfile(name="tiny", source="random:tiny", resolution=64, w_norm=1.0, w_align=2.0)
        else:
            pipeline = build_random_pipeline(args.arch, seed=args.seed, dtype=dtype, device=device)
            profile = load_profile(ARCH_PROFILES[args.arch])
        profile = profile.with_overrides(resolution=args.resolution)
        model = scoring_model_from_pipeline(
            pipeline, profile, device=device, dtype=dtype, source=f"random:{args.arch}"
        )
        facts = {"model": f"{args.arch} (random weights, seed {args.seed})", "weights": "random"}
    sync(model.device)
    facts["build_s"] = time.perf_counter() - start
    facts["import_s"] = import_s
    facts["unet_parameters"] = sum(p.numel() for p in model.unet.parameters())
    return model, facts


def reset_unet(unet: torch.nn.Module) -> None:
    """Eager and contiguous: every variant starts from the model as loaded."""
    from memscan.models.device import set_channels_last, uncompile_unet

    uncompile_unet(unet)
    set_channels_last(unet, False)


def compare_variants(
    columns: dict[tuple[str, str], dict[str, np.ndarray]], timings: list[Timing], base: str
) -> list[dict[str, Any]]:
    """Each variant against the first one (`base`) at the same batch size: prompts/s and CPU-time
    ratios, and the largest score difference (0 = bit-identical)."""
    rows = {(t.variant, t.batch_spec): t for t in timings if t.method == "memscan"}
    out = []
    for (variant, spec), cols in columns.items():
        if variant == base or (base, spec) not in columns:
            continue
        this, that = rows[(variant, spec)], rows[(base, spec)]
        diff = max(float(np.max(np.abs(cols[c].astype(np.float64) - columns[(base, spec)][c]), initial=0.0))
                   for c in cols)
        out.append({
            "variant": variant, "base": base, "batch_spec": spec, "batch_size": this.batch_size,
            "prompts_per_s_ratio": this.prompts_per_s / that.prompts_per_s,
            "cpu_s_ratio": (this.cpu_s / that.cpu_s) if this.cpu_s and that.cpu_s else None,
            "max_abs_diff": diff, "bit_identical": diff == 0.0,
        })
    return out


def score_diff(memscan_cols: dict[str, np.ndarray], reference_rows: list[dict[str, float]]) -> dict[str, Any]:
    """Max absolute (and relative) differences of each column on the common prompts (the first ones)."""
    out: dict[str, Any] = {}
    for name in ("norm", "alignment", "score"):
        ours = memscan_cols[name][: len(reference_rows)].astype(np.float64)
        ref = np.asarray([row[name] for row in reference_rows], dtype=np.float64)
        diff = np.abs(ours - ref)
        out[f"max_abs_{name}"] = float(np.max(diff)) if diff.size else 0.0
        out[f"max_rel_{name}"] = float(np.max(diff / np.maximum(np.abs(ref), 1e-12))) if diff.size else 0.0
    out["score_range"] = [float(np.min(memscan_cols["score"])), float(np.max(memscan_cols["score"]))]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from memscan.methods.anisotropy import AnisotropyMethod, reference_score
    from memscan.models.device import dtype_name
    from memscan.models.text import encode_prompts
    from memscan.scorer import Scorer

    model, facts = build_model(args)
    device = model.device
    method = AnisotropyMethod.from_profile(model.profile)
    prompts, prompt_source = load_prompts(args.prompts, args.prompts_file)
    n_ref = min(args.reference_prompts, len(prompts))
    clock = UNetClock(model.unet, device)
    timings: list[Timing] = []
    runs: list[dict[str, np.ndarray]] = []  # memscan's columns for each batch size

    # memscan: for each batch size, warm up on one batch (untimed shapes), then a fresh Scorer
    # scores all N prompts; its shared unconditional pass is inside the timed region.
    # An `auto` batch size is resolved (probed on CUDA) once, by the first warm-up, and the timed
    # runs get the number: the probe is a one-off per process, like loading.
    resolved: dict[str, int] = {}
    samples: dict[str, dict[str, list[float]]] = {}  # the first --save-scores prompts' scores, per row
    by_variant: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for variant in args.variants:
        options = VARIANTS[variant]
        reset_unet(model.unet)
        for spec in args.batch_size:

            def warm(spec: int | str = spec, options: dict[str, Any] = options) -> Any:
                scorer = Scorer(model, method, n_noise=args.n_noise, seed=args.noise_seed,
                                batch_size=resolved.get(str(spec), spec), **options)
                resolved[str(spec)] = scorer.batch_size
                count = args.warmup_prompts or scorer.batch_size
                return scorer.score_texts(prompts[: max(1, min(count, len(prompts)))])

            warmup_s, _ = timed(clock, device, warm)  # with --compile: the time to first score
            batch_size = resolved[str(spec)]

            def work(batch_size: int = batch_size, options: dict[str, Any] = options) -> Any:
                scorer = Scorer(model, method, n_noise=args.n_noise, seed=args.noise_seed, batch_size=batch_size,
                                **options)
                return scorer.score_texts(prompts)

            seconds, scored = timed(clock, device, work)
            if scored.unique != len(prompts):
                print(f"note: {len(prompts) - scored.unique} prompts tokenized like another one and were "
                      "scored once", file=sys.stderr)
            runs.append(scored.columns)
            by_variant[(variant, str(spec))] = scored.columns
            samples[f"{variant}@{spec}"] = {c: [float(v) for v in scored.columns[c][: args.save_scores]]
                                            for c in method.columns}
            timings.append(Timing(
                method="memscan", batch_size=batch_size, prompts=len(prompts), warmup_s=warmup_s,
                seconds=seconds, prompts_per_s=len(prompts) / seconds, unet_calls=clock.calls,
                unet_evals_per_prompt=clock.rows / len(prompts),
                nominal_evals_per_prompt=method.unet_evals_per_prompt(args.n_noise),
                unet_s=clock.seconds, unet_share=clock.seconds / seconds, peak_memory_gib=peak_memory(device),
                cpu_s=clock.cpu_s, variant=variant, batch_spec=str(spec),
            ))
    reset_unet(model.unet)

    # reference: one prompt at a time, 4n batch-1 UNet calls each, on the first M prompts.
    from memscan.models.noise import noise_bank

    noise = noise_bank(args.n_noise, model.latent_shape, args.noise_seed, device=device, dtype=model.dtype)

    def reference(subset: Sequence[str]) -> list[dict[str, float]]:
        with torch.inference_mode():
            return [reference_score(method, model, noise, encode_prompts(model, [p])) for p in subset]

    reference_rows: list[dict[str, float]] = []
    if n_ref > 0:
        warmup_s, _ = timed(clock, device, lambda: reference(prompts[:1]))
        seconds, reference_rows = timed(clock, device, lambda: reference(prompts[:n_ref]))
        ref = Timing(
            method="reference", batch_size=1, prompts=n_ref, warmup_s=warmup_s, seconds=seconds,
            prompts_per_s=n_ref / seconds, unet_calls=clock.calls,
            unet_evals_per_prompt=clock.rows / n_ref, nominal_evals_per_prompt=4 * args.n_noise,
            unet_s=clock.seconds, unet_share=clock.seconds / seconds, speedup=1.0,
            peak_memory_gib=peak_memory(device), cpu_s=clock.cpu_s,
        )
        for t in timings:
            t.speedup = t.prompts_per_s / ref.prompts_per_s
        timings.append(ref)
    clock.remove()

    columns = runs[0]
    comparison: dict[str, Any] = {}
    for cols in runs if reference_rows else []:  # the worst difference over all batch sizes
        for key, value in score_diff(cols, reference_rows).items():
            comparison[key] = max(comparison.get(key, value), value) if key.startswith("max_") else value
    comparison["common_prompts"] = len(reference_rows)
    fp32 = model.dtype == torch.float32
    if reference_rows and fp32:
        scale = max(1.0, float(np.max(np.abs(columns["score"][:n_ref]))))
        comparison["tolerance"] = args.tolerance * scale
        comparison["equal"] = bool(comparison["max_abs_score"] <= comparison["tolerance"])
    comparison["nonfinite_scores"] = max(int(np.sum(~np.isfinite(cols["score"]))) for cols in runs)
    comparison["variants"] = compare_variants(by_variant, timings, args.variants[0])

    info = {
        **facts,
        "profile": model.profile.name,
        "prediction_type": model.profile.prediction_type,
        "v_convention": method.v_convention,
        "resolution": model.profile.resolution,
        "latent_shape": list(model.latent_shape),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "dtype": dtype_name(model.dtype),
        "threads": torch.get_num_threads(),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "n_noise": args.n_noise,
        "noise_seed": args.noise_seed,
        "prompt_source": prompt_source,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    with contextlib.suppress(ImportError):
        import diffusers

        info["diffusers"] = diffusers.__version__
    return {"config": info, "results": [asdict(t) for t in timings], "scores_check": comparison,
            "scores_sample": samples}


def format_report(report: dict[str, Any]) -> str:
    c, check = report["config"], report["scores_check"]
    latent = "x".join(str(v) for v in c["latent_shape"])
    lines = [
        f"model {c['model']}  profile {c['profile']} ({c['prediction_type']}, v_convention "
        f"{c['v_convention']})  UNet {c['unet_parameters'] / 1e6:.1f} M params  build {c['build_s']:.1f} s "
        f"(+ imports {c['import_s']:.1f} s)",
        f"{c['resolution']}x{c['resolution']} (latent {latent})  device {c['device']} ({c['device_name']})  "
        f"dtype {c['dtype']}  threads {c['threads']}  n_noise {c['n_noise']}  "
        f"prompts from {c['prompt_source']}",
        "",
    ]
    header = ("method", "variant", "batch", "prompts", "warm-up s", "seconds", "CPU s", "prompts/s",
              "UNet evals/prompt", "UNet share", "speed-up", "peak GiB")
    rows = []
    for r in report["results"]:
        evals = f"{r['unet_evals_per_prompt']:.2f} ({r['nominal_evals_per_prompt']})"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        memory = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        batch = str(r["batch_size"]) + (" (auto)" if r.get("batch_spec") == "auto" else "")
        variant = r.get("variant", "default") if r["method"] == "memscan" else "-"
        rows.append((r["method"], variant, batch, str(r["prompts"]), f"{r['warmup_s']:.2f}",
                     f"{r['seconds']:.2f}", f"{r['cpu_s']:.2f}", _rate(r["prompts_per_s"]), evals,
                     f"{100 * r['unet_share']:.1f}%", speedup, memory))
    if all(r["peak_memory_gib"] is None for r in report["results"]):  # CPU: no memory column
        header, rows = header[:-1], [row[:-1] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append("UNet evals/prompt: measured UNet sample rows per prompt (memscan's shared unconditional "
                 "pass included), nominal in parentheses; speed-up: prompts/s over the reference's;")
    lines.append("CPU s: process CPU time of the timed run (all threads; on a busy machine wall time "
                 "inflates, CPU time much less).")
    if check.get("common_prompts"):
        verdict = ""
        if "equal" in check:
            tolerance = f"tolerance {check['tolerance']:.1e}"
            verdict = f"  -> EQUAL ({tolerance})" if check["equal"] else f"  -> DIFFERENT ({tolerance})"
        lines.append(
            f"max |memscan - reference| on {check['common_prompts']} common prompts: score "
            f"{check['max_abs_score']:.3e} (rel {check['max_rel_score']:.1e}), "
            f"norm {check['max_abs_norm']:.3e}, "
            f"alignment {check['max_abs_alignment']:.3e}{verdict}"
        )
    for v in check.get("variants", []):
        cpu = "-" if v["cpu_s_ratio"] is None else f"{v['cpu_s_ratio']:.3f}"
        same = "bit-identical" if v["bit_identical"] else f"max |diff| {v['max_abs_diff']:.3e}"
        lines.append(f"{v['variant']} vs {v['base']} at batch {v['batch_size']}: prompts/s x"
                     f"{v['prompts_per_s_ratio']:.3f}, CPU s x{cpu}, scores {same}")
    if check.get("nonfinite_scores"):
        lines.append(f"warning: {check['nonfinite_scores']} memscan scores are not finite")
    return "\n".join(lines)


def _rate(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _batch_sizes(text: str) -> list[int | str]:
    """`8,16,auto`: integers >= 1 and `auto` (memscan.models.batching)."""
    sizes: list[int | str] = []
    for value in (v.strip().lower() for v in text.split(",") if v.strip()):
        if value == "auto":
            sizes.append(value)
        elif value.isdigit() and int(value) >= 1:
            sizes.append(int(value))
        else:
            raise argparse.ArgumentTypeError(f"batch sizes are integers >= 1 or auto, got {value!r}")
    if not sizes:
        raise argparse.ArgumentTypeError("no batch size given")
    return sizes


def _variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"variants are {', '.join(VARIANTS)}; got {text!r}")
    return list(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="memscan profile, diffusers folder or checkpoint "
                        "(default: demo if that profile exists, else --arch tiny)")
    source.add_argument("--arch", choices=RANDOM_ARCHES,
                        help="build this architecture with seeded random weights (no download)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (latent = side/8); "
                        "default: the profile's (512 for sd-v1, 768 for sd-v2); shrink it for CPU runs")
    parser.add_argument("--prompts", type=int, default=32, help="prompts scored by memscan")
    parser.add_argument("--reference-prompts", type=int, default=8,
                        help="prompts scored by the slow reference protocol (the first M of memscan's)")
    parser.add_argument("--prompts-file", type=Path, default=None,
                        help="one prompt per line (default: the shipped data/benchmark/sd1_mem.txt); "
                        "falls back to a built-in list when unreadable")
    parser.add_argument("--n-noise", type=int, default=1, help="noise samples per prompt (n)")
    parser.add_argument("--batch-size", type=_batch_sizes, default=[16],
                        help="memscan prompts per UNet call; a comma list (8,16,32,auto) times each")
    parser.add_argument("--variants", type=_variants, default=["default"],
                        help=f"memscan speed options to time, each at every batch size, compared with the "
                        f"first: {', '.join(VARIANTS)}")
    parser.add_argument("--warmup-prompts", type=int, default=0,
                        help="prompts of memscan's untimed warm-up (0: one batch)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, else fp32), fp32, fp16, bf16")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (--arch)")
    parser.add_argument("--noise-seed", type=int, default=51, help="seed of the shared noise bank")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="fp32 only: max |score difference| allowed, relative to max(1, |score|)")
    parser.add_argument("--no-tf32", action="store_true",
                        help="CUDA fp32: no TF32 convolutions/matmuls (exact fp32 for the equality check)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': stdout only)")
    parser.add_argument("--save-scores", type=int, default=32, metavar="K",
                        help="the JSON keeps the scores of the first K prompts of every memscan row "
                        "(to compare runs, e.g. bf16 with fp32 on the same seeded weights)")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.reference_prompts < 0 or args.n_noise < 1 or args.threads < 1:
        parser.error("--prompts, --n-noise and --threads must be >= 1, --reference-prompts >= 0")
    if args.prompts_file is None:
        from memscan.paths import data_dir

        args.prompts_file = data_dir() / DEFAULT_PROMPTS_FILE
    if args.model is None and args.arch is None:
        from memscan.models.profiles import profile_path

        if profile_path("demo").is_file():
            args.model = "demo"
        else:
            args.arch = "tiny"
    return args


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision advisories
    torch.set_num_threads(args.threads)
    if args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    from memscan.errors import MemscanError

    try:
        with _quiet_warnings(), torch.inference_mode():
            report = run(args)
    except MemscanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {path}")
    check = report["scores_check"]
    if check.get("equal") is False or check.get("nonfinite_scores"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
