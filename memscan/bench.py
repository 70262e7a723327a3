"""`memscan bench`: the public memorization benchmark (or any labelled prompt file) in one command.

The model loads once; every method scores the same labelled prompts on the same noise bank, and
the table reads like the papers' Table 1: AUC, TPR at 1% (and 3%) FPR under both conventions,
seconds per prompt (wall time of scoring, shared pass included, model loading excluded) and the
UNet evaluations each method declares.

Suites: `sd1` (sd1_mem vs sd1_nmem), `sd2` (sd2_mem vs sd1_nmem), `demo` (the demo model's
labelled prompts), or a path to any prompt file with a `label` column.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from memscan.errors import InputError, UsageError
from memscan.evaluate import DEFAULT_TARGETS, LABEL_COLUMN, Evaluation, evaluate_frame, read_labels
from memscan.io.scores import STATUS_OK
from memscan.methods.base import DetectionMethod
from memscan.models.loading import ScoringModel
from memscan.models.profiles import ModelProfile
from memscan.paths import data_dir, demo_dir

log = logging.getLogger("memscan")

DEFAULT_METHODS = ("anisotropy", "wen", "norm", "alignment", "sharpness")
SUITES: dict[str, tuple[str, str] | str] = {
    "sd1": ("sd1_mem.txt", "sd1_nmem.txt"),
    "sd2": ("sd2_mem.txt", "sd1_nmem.txt"),
    "demo": "prompts.csv",
}
# the flags that override the profile's scoring settings, by DetectSettings field (as in `detect`)
SCORING_FLAGS = {"w_norm": "--w-norm", "w_align": "--w-align", "v_convention": "--v-convention",
                 "norm_scale": "--norm-scale"}


def benchmark_dir() -> Path:
    """The shipped benchmark prompt lists (see data/benchmark/README.md)."""
    return data_dir() / "benchmark"


def default_suite(profile: ModelProfile) -> str:
    """`demo` for the demo model, `sd2` for SD 2.x models, else `sd1`."""
    if profile.name == "demo":
        return "demo"
    if profile.name.startswith("sd-v2") or profile.prediction_type == "v_prediction":
        return "sd2"
    return "sd1"


def _labelled_list(path: Path, label: float) -> pd.DataFrame:
    from memscan.io.readers import read_prompts

    frame = read_prompts(path)
    return pd.DataFrame({"prompt_id": frame["prompt_id"], "prompt": frame["prompt"], "label": label})


def load_suite(suite: str, *, limit: int | None = None, seed: int = 0) -> pd.DataFrame:
    """`prompt_id`, `prompt`, `label` (1 memorized, 0 not) of a named suite or a labelled file.

    `limit` keeps at most that many prompts of each class, a seeded random sample in file order."""
    spec = SUITES.get(suite)
    if isinstance(spec, tuple):
        mem, nmem = (benchmark_dir() / name for name in spec)
        frame = pd.concat([_labelled_list(mem, 1.0), _labelled_list(nmem, 0.0)], ignore_index=True)
    else:
        path = demo_dir() / spec if spec else Path(suite)
        if not path.is_file():
            hint = " (the demo model's prompts are not there yet)" if spec else f"; suites: {', '.join(SUITES)}"
            raise InputError(f"no benchmark prompts at {path}{hint}")
        frame = read_labels(path, label_column=LABEL_COLUMN).dropna(subset=["label"]).reset_index(drop=True)
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit must be >= 1, got {limit}")
        keep = [
            part.sample(n=min(limit, len(part)), random_state=seed).index
            for _, part in frame.groupby("label")
        ]
        frame = frame.loc[sorted(i for index in keep for i in index)].reset_index(drop=True)
    return frame


@dataclass
class BenchResult:
    """One method's scores on the suite, its evaluation, speed and declared cost."""

    method: str
    evaluation: Evaluation
    seconds_per_prompt: float
    unet_evals_per_prompt: int
    scores: pd.DataFrame
    facts: dict[str, Any]

    @property
    def failed(self) -> pd.DataFrame:
        """Rows the method could not score (status not ok), left out of the evaluation."""
        return self.scores[self.scores["status"] != STATUS_OK]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, **self.evaluation.to_dict(), "seconds_per_prompt": self.seconds_per_prompt,
            "unet_evals_per_prompt": self.unet_evals_per_prompt, "failed": len(self.failed),
        }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def method_overrides(overrides: Mapping[str, Any], method: DetectionMethod) -> tuple[dict[str, Any], list[str]]:
    """The given (non-None) scoring overrides `method` has a setting for, and the flags of the others.

    A method's run facts name every profile setting it reads: anisotropy all four, norm and alignment
    v_convention and norm_scale, wen and sharpness v_convention."""
    given = {key: value for key, value in overrides.items() if value is not None}
    facts = method.run_facts()
    return {k: v for k, v in given.items() if k in facts}, [SCORING_FLAGS[k] for k in given if k not in facts]


def bench_method(
    model: ScoringModel, spec: str, prompts: pd.DataFrame, *, n_noise: int | None = None, seed: int | None = None,
    batch_size: int = 16, targets: Sequence[float] = DEFAULT_TARGETS, overrides: Mapping[str, Any] | None = None,
) -> BenchResult:
    """Score the labelled prompts with one method and evaluate (n_noise, seed: None takes the profile's
    calibration values, else 1 and 51). `overrides` (w_norm, w_align, v_convention, norm_scale; None:
    the profile's) change the profile as in `detect`, those the method has a setting for only; its
    calibrated threshold is dropped as in `detect` when they change its score. Untimed warm-up: one
    full batch, and the tokenizer's word cache filled with every prompt, so the order of methods does
    not matter."""
    from memscan.config import DetectSettings, calibrated_defaults
    from memscan.detect import applicable_threshold
    from memscan.methods import method_for
    from memscan.models.text import tokenize
    from memscan.scorer import Scorer

    defaults = calibrated_defaults(model.profile.calibration)
    n_noise = defaults["n_noise"] if n_noise is None else n_noise
    seed = defaults["seed"] if seed is None else seed
    applied, _ = method_overrides(overrides or {}, method_for(spec, model.profile))
    run = DetectSettings(method=spec, n_noise=n_noise, seed=seed, **applied)
    model = replace(model, profile=model.profile.with_overrides(**run.profile_overrides()))
    method = method_for(spec, model.profile)
    tokenize(model, prompts["prompt"].tolist())
    Scorer(model, method, n_noise=n_noise, seed=seed, batch_size=batch_size).score_texts(
        prompts["prompt"].head(batch_size).tolist()
    )
    threshold = applicable_threshold(run, model.profile, method.name)
    scorer = Scorer(model, method, n_noise=n_noise, seed=seed, batch_size=batch_size, threshold=threshold)
    started = time.perf_counter()
    scores = scorer.score_frame(prompts[["prompt_id", "prompt"]])
    seconds = time.perf_counter() - started
    scores["label"] = prompts["label"].to_numpy()
    evaluation = evaluate_frame(scores, ("score",), targets=targets, name=spec)[0]
    return BenchResult(
        method=spec, evaluation=evaluation, seconds_per_prompt=seconds / len(prompts),
        unet_evals_per_prompt=method.unet_evals_per_prompt(n_noise), scores=scores, facts=scorer.run_facts(),
    )


def warn_unused_overrides(overrides: Mapping[str, Any], methods: Sequence[str], profile: ModelProfile) -> None:
    """One warning line naming the given flags that some of `methods` have no setting for (ignored there)."""
    from memscan.methods import method_for

    unused: dict[str, list[str]] = {}
    for spec in methods:
        for flag in method_overrides(overrides, method_for(spec, profile))[1]:
            unused.setdefault(flag, []).append(spec)
    by_methods: dict[tuple[str, ...], list[str]] = {}  # flags ignored by the same methods, named together
    for flag, specs in unused.items():
        by_methods.setdefault(tuple(specs), []).append(flag)
    if by_methods:
        log.warning("ignoring %s (those methods have no such setting)",
                    "; ".join(f"{', '.join(flags)} for {', '.join(specs)}" for specs, flags in by_methods.items()))


def check_bench_settings(
    methods: Sequence[str], *, suite: str | None = None, limit: int | None = None, n_noise: int | None = None,
    batch_size: int = 16, out_dir: Path | None = None, report: Path | None = None, if_exists: str = "fail",
    w_norm: float | None = None, w_align: float | None = None, v_convention: str | None = None,
    norm_scale: str | None = None,
) -> None:
    """Everything that can be refused before the model loads: flag values, method names, and the
    outputs (`--out-dir` files, `--report`): not existing unless `overwrite`, never a prompt list."""
    from memscan.config import DetectSettings
    from memscan.methods import available_methods, parse_method_spec
    from memscan.outputs import check_output

    DetectSettings(n_noise=n_noise, batch_size=batch_size, w_norm=w_norm, w_align=w_align, v_convention=v_convention,
                   norm_scale=norm_scale)  # the same bounds and values as detect
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if not methods:
        raise UsageError("--methods names no method")
    for spec in methods:
        name, _ = parse_method_spec(spec)
        if name not in available_methods():
            raise UsageError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    inputs = [benchmark_dir() / name for spec in SUITES.values() if isinstance(spec, tuple) for name in spec]
    inputs += [demo_dir() / "prompts.csv"] + ([Path(suite)] if suite and suite not in SUITES else [])
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"--out-dir {out_dir} exists and is not a directory")
        for path in bench_output_paths(methods, out_dir):
            check_output(path, inputs=inputs, if_exists=if_exists, what="--out-dir file")
    if report is not None:
        check_output(report, inputs=inputs, if_exists=if_exists, what="report")


def bench_output_paths(methods: Sequence[str], out_dir: Path) -> list[Path]:
    """`labels.csv`, then one scores file per method spec, in `out_dir`."""
    return [Path(out_dir) / "labels.csv"] + [Path(out_dir) / f"{_slug(spec)}.parquet" for spec in methods]


def write_bench_outputs(results: Sequence[BenchResult], prompts: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One scores Parquet per method plus `labels.csv`, ready for `memscan evaluate` / `report`."""
    from memscan import __version__
    from memscan.io.scores import scores_schema, to_table, write_scores
    from memscan.outputs import atomic_write_bytes

    labels = prompts[["prompt_id", "prompt", "label"]].astype({"label": int})
    atomic_write_bytes(Path(out_dir) / "labels.csv", lambda tmp: labels.to_csv(tmp, index=False))
    paths = []
    for result in results:
        columns = tuple(c for c in result.scores.columns if c in ("norm", "alignment", "score"))
        path = out_dir / f"{_slug(result.method)}.parquet"
        facts = {**result.facts, "memscan_version": __version__, "input": "bench"}
        write_scores(to_table(result.scores, scores_schema(columns), facts), path)
        paths.append(path)
    return paths


def run_bench(
    model: ScoringModel | str = "demo", *, methods: Sequence[str] = DEFAULT_METHODS, suite: str | None = None,
    limit: int | None = None, n_noise: int | None = None, seed: int | None = None, batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto", targets: Sequence[float] = DEFAULT_TARGETS, out_dir: Path | None = None,
    if_exists: str = "fail", w_norm: float | None = None, w_align: float | None = None,
    v_convention: str | None = None, norm_scale: str | None = None,
) -> tuple[str, list[BenchResult]]:
    """Load the model once and bench every method on the suite; returns (suite, results). Flags and
    `out_dir` are checked first (see check_bench_settings), so a bad one costs no model load; n_noise
    and seed not given are the profile's calibration values (else 1 and 51). w_norm, w_align,
    v_convention, norm_scale (None: the profile's) override the profile as in `detect` for the methods
    that have the setting; the others ignore them, with one warning."""
    from memscan.models.loading import load_model

    check_bench_settings(methods, suite=suite, limit=limit, n_noise=n_noise, batch_size=batch_size,
                         out_dir=out_dir, if_exists=if_exists, w_norm=w_norm, w_align=w_align,
                         v_convention=v_convention, norm_scale=norm_scale)
    overrides = {"w_norm": w_norm, "w_align": w_align, "v_convention": v_convention, "norm_scale": norm_scale}
    if isinstance(model, str):
        model = load_model(model, device=device, dtype=dtype)
    warn_unused_overrides(overrides, methods, model.profile)
    suite = suite or default_suite(model.profile)
    prompts = load_suite(suite, limit=limit)
    results = [
        bench_method(model, spec, prompts, n_noise=n_noise, seed=seed, batch_size=batch_size, targets=targets,
                     overrides=overrides)
        for spec in methods
    ]
    if out_dir is not None:
        write_bench_outputs(results, prompts, Path(out_dir))
    return suite, results
