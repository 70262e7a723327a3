"""Incremental re-audit with a score cache: the first audit of N prompts vs the rerun over the same
prompts grown by 5% new ones, measured in one process on one loaded model.

Both runs are `memscan.detect(..., DetectSettings(cache=DIR))` on a Parquet input, with the model
loaded once beforehand (its load time is printed on its own); each run hashes the weights for its
fingerprint itself (the memo is cleared before each). Printed, all from this one run:

- first-run and rerun wall time (and process CPU time, steadier on a shared machine), their ratio
  (target <= 10%);
- rows reused and scored in the rerun: reused must be exactly the N old prompts (checked: the
  counts, the UNet rows scored, and every old row's numbers bitwise equal to the first run's);
- the cache read overhead per reused row (loading the segments + lookups) over the cost of scoring
  a row (first-run wall / N) (target <= 2%);
- where the rerun's time went: cache read, UNet + text encoder on the new prompts, and the rest
  (reading the input, tokenizing every prompt for its key, writing the output and the segment).

The prompts are the demo's 384 captions with numbered variants (", take K"), all distinct.

    OMP_NUM_THREADS=1 python benchmarks/incremental.py --n 20000            # CPU, one torch thread
    python benchmarks/incremental.py --n 100000 --device cuda --json out/incremental.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch


def make_prompts(total: int) -> list[str]:
    """`total` distinct prompts: the demo captions, then the same with ', take K' (K = 1, 2, ...)."""
    from memscan.paths import demo_dir

    captions = pd.read_csv(demo_dir() / "prompts.csv")["prompt"].tolist()
    out = []
    take = 0
    while len(out) < total:
        out += captions if take == 0 else [f"{c}, take {take}" for c in captions]
        take += 1
    return out[:total]


class Timers:
    """Seconds and calls spent inside wrapped functions, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.rows: dict[str, int] = {}

    def wrap(self, owner: Any, name: str, label: str, rows: Callable[..., int] | None = None) -> Callable[[], None]:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started
                if rows is not None:
                    self.rows[label] = self.rows.get(label, 0) + rows(*args, **kwargs)

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


@contextmanager
def measured(timers: Timers) -> Iterator[None]:
    """Time the cache's reads and writes and the scorer's UNet batches while the block runs."""
    from memscan.cache import ScoreCache
    from memscan.scorer import Scorer

    undo = [
        timers.wrap(ScoreCache, "load", "cache_load"),
        timers.wrap(ScoreCache, "lookup", "cache_lookup"),
        timers.wrap(ScoreCache, "flush", "cache_write"),
        timers.wrap(ScoreCache, "bind", "fingerprint"),  # the weights digest
        timers.wrap(Scorer, "_score_batch", "score_batches", rows=lambda self, tokens, rows, *a, **k: len(rows)),
    ]
    try:
        yield
    finally:
        for restore in undo:
            restore()


def audit(path: Path, out: Path, settings: Any, model: Any) -> dict[str, Any]:
    """One timed detect run: wall and CPU seconds, the summary, the scores, the timers."""
    import memscan.cache
    from memscan.detect import detect

    memscan.cache._digests.clear()  # each run fingerprints the weights, as a fresh process would
    timers = Timers()
    with measured(timers):
        wall, cpu = time.perf_counter(), time.process_time()
        result = detect(path, out, settings, model=model)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "summary": result.summary, "scores": result.scores, "timers": timers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="prompts in the first audit")
    parser.add_argument("--growth", type=float, default=0.05, help="new prompts in the rerun, as a share of N")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where inputs, outputs and the cache go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import memscan
    from memscan.cache import ScoreCache
    from memscan.config import DetectSettings

    work = args.workdir or Path(tempfile.mkdtemp(prefix="memscan-incremental-"))
    work.mkdir(parents=True, exist_ok=True)
    new = math.ceil(args.n * args.growth)
    texts = make_prompts(args.n + new)
    ids = [f"p{i:07d}" for i in range(len(texts))]
    base = pd.DataFrame({"id": ids[: args.n], "prompt": texts[: args.n]})
    grown = pd.DataFrame({"id": ids, "prompt": texts}).sample(frac=1.0, random_state=0)  # new rows interleaved
    base.to_parquet(work / "base.parquet", index=False)
    grown.to_parquet(work / "grown.parquet", index=False)
    cache = work / "cache"

    started = time.perf_counter()
    model = memscan.load_model(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - started
    settings = DetectSettings(model=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                              id_column="id", cache=str(cache))
    print(f"incremental: N = {args.n} prompts, rerun N + {new} new ({args.growth:.0%}); model {args.model} "
          f"on {args.device}, {args.threads} torch thread(s), batch {args.batch_size}; model load {load_s:.1f} s "
          f"(outside both runs); {platform.node()}, torch {torch.__version__}", flush=True)

    first = audit(work / "base.parquet", work / "first.parquet", settings, model)
    scored = first["summary"]["cache"]["scored"]
    print(f"first run: {first['wall']:.1f} s wall, {first['cpu']:.1f} s CPU, {scored} scored", flush=True)
    rerun = audit(work / "grown.parquet", work / "rerun.parquet", settings, model)

    # reused must be exactly the old prompts: counts, UNet rows, bitwise-equal numbers
    s_first, s_rerun = first["summary"]["cache"], rerun["summary"]["cache"]
    old = first["scores"].set_index("prompt_id")
    again = rerun["scores"].set_index("prompt_id").loc[old.index]
    bitwise = all(np.array_equal(old[c].to_numpy(), again[c].to_numpy()) for c in ("norm", "alignment", "score"))
    unet_rows = rerun["timers"].rows.get("score_batches", 0)
    exact = s_rerun["reused"] == args.n and s_rerun["scored"] == new and unet_rows == new and bitwise

    t_first, t_rerun = first["timers"].seconds, rerun["timers"].seconds
    read_s = t_rerun.get("cache_load", 0.0) + t_rerun.get("cache_lookup", 0.0)
    per_reused = read_s / max(s_rerun["reused"], 1)
    per_scored = first["wall"] / args.n
    unet_s = t_rerun.get("score_batches", 0.0)
    other_s = rerun["wall"] - read_s - unet_s - t_rerun.get("cache_write", 0.0) - t_rerun.get("fingerprint", 0.0)
    info = ScoreCache(cache).info()
    results = {
        "n": args.n, "new": new, "model": args.model, "device": args.device, "threads": args.threads,
        "batch_size": args.batch_size, "model_load_s": round(load_s, 2),
        "first_wall_s": round(first["wall"], 2), "first_cpu_s": round(first["cpu"], 2),
        "rerun_wall_s": round(rerun["wall"], 2), "rerun_cpu_s": round(rerun["cpu"], 2),
        "ratio_wall": round(rerun["wall"] / first["wall"], 4), "ratio_cpu": round(rerun["cpu"] / first["cpu"], 4),
        "first_scored": s_first["scored"], "rerun_reused": s_rerun["reused"], "rerun_scored": s_rerun["scored"],
        "rerun_unet_rows": unet_rows, "reused_bitwise_equal": bitwise, "reused_exactly_the_old": exact,
        "cache_read_s": round(read_s, 4), "cache_read_us_per_reused_row": round(per_reused * 1e6, 2),
        "scoring_ms_per_row": round(per_scored * 1e3, 3), "read_overhead_ratio": round(per_reused / per_scored, 5),
        "rerun_unet_s": round(unet_s, 2), "rerun_other_s": round(other_s, 2),
        "fingerprint_s": round(t_rerun.get("fingerprint", 0.0), 3),
        "first_cache_write_s": round(t_first.get("cache_write", 0.0), 3),
        "cache_rows": info["rows"], "cache_segments": info["segments"], "cache_bytes": info["bytes"],
    }
    print(f"rerun: {rerun['wall']:.1f} s wall, {rerun['cpu']:.1f} s CPU; reused {s_rerun['reused']}, scored "
          f"{s_rerun['scored']} (UNet rows {unet_rows})")
    print(f"rerun / first: {results['ratio_wall']:.1%} wall, {results['ratio_cpu']:.1%} CPU (target <= 10%)")
    print(f"rows reused = exactly the {args.n} old ones: {'yes' if exact else 'NO'} (bitwise equal: {bitwise})")
    print(f"cache read: {read_s:.3f} s for {s_rerun['reused']} rows = {per_reused * 1e6:.1f} us/row vs scoring "
          f"{per_scored * 1e3:.2f} ms/row: {per_reused / per_scored:.3%} (target <= 2%)")
    print(f"rerun breakdown: cache read {read_s:.2f} s, UNet + text encoder on the new prompts {unet_s:.2f} s, "
          f"fingerprint (weights digest) {results['fingerprint_s']:.2f} s, cache write "
          f"{t_rerun.get('cache_write', 0.0):.2f} s, the rest (input, tokenizing all, output) {other_s:.2f} s")
    print(f"cache: {info['rows']} rows in {info['segments']} segments, {info['bytes']} bytes "
          f"({info['bytes'] / max(info['rows'], 1):.1f} B/row); first run's segment write "
          f"{results['first_cache_write_s']:.2f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
