"""Guard overhead on non-flagged prompts: a guarded 50-step DDIM generation (guidance 7.5) over the
unguarded one, at batch 1 and batch 8, measured in one process on one loaded pipeline.

The pipeline is the demo model's diffusers folder (its own VAE and DDIM scheduler), the guard uses the
`demo` profile and its calibrated threshold, the prompts are the demo's clean captions that the guard
does not flag on this noise (checked: every guarded image must equal the unguarded one bit for bit,
else the run fails). Guarded and unguarded calls alternate, `--repeats` times each after one warm-up
pair; the medians are compared. Printed: seconds per call, the ratio guarded / unguarded - 1 (target
<= 5%), the guard's own seconds (scoring, before generation), and whether the first denoising step's
UNet call was reused as the score's t_hi evaluation.

    OMP_NUM_THREADS=1 python benchmarks/guard_overhead.py            # CPU, one torch thread
    python benchmarks/guard_overhead.py --device cuda --json out/guard.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import pandas as pd
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="data/demo/model")
    parser.add_argument("--prompts", default="data/demo/prompts.csv")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from memscan.demo.verify import load_pipeline
    from memscan.guard import Guard

    pipe = load_pipeline(args.model, args.device)
    guard = Guard(pipe, "demo", policy="block")
    table = pd.read_csv(args.prompts)
    clean = table.loc[table["label"] != "memorized", "prompt"].astype(str).tolist()
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = _unflagged(guard, clean, batch, args.repeats + 1)

        def unguarded(seed: int, prompts: list[str] = prompts) -> tuple[tuple[float, float], list[np.ndarray], None]:
            start, cpu = time.perf_counter(), time.process_time()
            images = pipe(prompts, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(seed),
                          output_type="np").images
            _sync(args.device)
            return (time.perf_counter() - start, time.process_time() - cpu), list(images), None

        def guarded(seed: int, prompts: list[str] = prompts) -> tuple[tuple[float, float], list[np.ndarray], object]:
            start, cpu = time.perf_counter(), time.process_time()
            result = guard(prompts, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(seed),
                           output_type="np")
            _sync(args.device)
            return (time.perf_counter() - start, time.process_time() - cpu), result.images, result

        times: dict[str, list[tuple[float, float]]] = {"unguarded": [], "guarded": []}
        guard_seconds, reused = [], []
        for repeat in range(args.repeats + 1):
            if repeat % 2:  # alternate which goes first: no order effect in the medians
                t_guard, images, result = guarded(repeat)
                t_plain, plain, _ = unguarded(repeat)
            else:
                t_plain, plain, _ = unguarded(repeat)
                t_guard, images, result = guarded(repeat)
            if any(d.flagged for d in result.prompts):
                raise SystemExit(f"a prompt was flagged on seed {repeat}: not an overhead measurement")
            if not all(np.array_equal(a, b) for a, b in zip(plain, images, strict=True)):
                raise SystemExit("guarded images differ from the unguarded ones")
            if repeat == 0:
                continue  # warm-up pair
            times["unguarded"].append(t_plain)
            times["guarded"].append(t_guard)
            guard_seconds.append(result.seconds_guard)
            reused.append(result.reused_first_step)
        plain, guarded_s = (statistics.median(t[0] for t in times[k]) for k in ("unguarded", "guarded"))
        plain_cpu, guarded_cpu = (statistics.median(t[1] for t in times[k]) for k in ("unguarded", "guarded"))
        results.append({
            "batch": batch, "unguarded_s": round(plain, 4), "guarded_s": round(guarded_s, 4),
            "overhead": round(guarded_s / plain - 1, 4), "unguarded_cpu_s": round(plain_cpu, 4),
            "guarded_cpu_s": round(guarded_cpu, 4), "overhead_cpu": round(guarded_cpu / plain_cpu - 1, 4),
            "guard_scoring_s": round(statistics.median(guard_seconds), 4),
            "first_step_reused": all(reused), "bit_identical": True, "repeats": args.repeats,
        })
    facts = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or
             platform.machine(), "model": args.model, "steps": args.steps, "scheduler": type(pipe.scheduler).__name__}
    print(f"# guard overhead, {args.device.upper()} ({facts['torch_threads']} torch threads), {args.model}, "
          f"{args.steps}-step {facts['scheduler']}, guidance 7.5, median of {args.repeats}")
    print("| batch | unguarded s | guarded s | overhead (wall) | overhead (CPU time) | guard scoring s "
          "| first step reused | bit-identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['batch']} | {r['unguarded_s']:.4f} | {r['guarded_s']:.4f} | {100 * r['overhead']:+.1f}% "
              f"| {100 * r['overhead_cpu']:+.1f}% "
              f"| {r['guard_scoring_s']:.4f} | {r['first_step_reused']} | {r['bit_identical']} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"facts": facts, "results": results}, handle, indent=2)


def _unflagged(guard: object, clean: list[str], batch: int, seeds: int) -> list[str]:
    """`batch` clean captions that the guard flags on none of the seeds' noise (a clean caption can
    score above the threshold on some noise: that is the calibrated false-positive rate)."""
    from diffusers.utils.torch_utils import randn_tensor

    pool = iter(clean)
    chosen = [next(pool) for _ in range(batch)]
    shape = (batch, guard.pipe.unet.config.in_channels, guard.pipe.unet.config.sample_size,
             guard.pipe.unet.config.sample_size)
    for seed in range(seeds):
        while True:
            noise = randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            flagged = [i for i, s in enumerate(guard.score_latents(chosen, noise)) if s > guard.threshold]
            if not flagged:
                break
            for i in flagged:
                chosen[i] = next(pool)
    for seed in range(seeds):  # replacements change no earlier seed's noise, but their scores: check all
        noise = randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        if any(s > guard.threshold for s in guard.score_latents(chosen, noise)):
            return _unflagged(guard, clean[1:], batch, seeds)
    return chosen


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
