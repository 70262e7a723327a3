"""`detect`: score every prompt of a file and write one Parquet row per input row.

Library entry point behind `memscan detect`; the CLI only parses flags and prints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan import __version__, storage
from memscan.cache import ScoreCache, open_cache
from memscan.config import DetectSettings, fingerprint
from memscan.errors import InputError, MemscanError, OutputError
from memscan.io.readers import PromptSource
from memscan.io.scores import (
    STATUS_OK,
    STATUS_SKIPPED_EMPTY,
    scores_schema,
    to_table,
    write_scores,
)
from memscan.methods import method_for
from memscan.models.loading import ScoringModel, load_model
from memscan.models.profiles import ModelProfile
from memscan.outputs import check_output
from memscan.progress import Progress
from memscan.scorer import Scorer

log = logging.getLogger("memscan")


@dataclass
class DetectResult:
    """The scores (one row per input row), the run summary, and where they were written."""

    scores: pd.DataFrame
    summary: dict[str, Any]
    output: Path | None


def build_scorer(settings: DetectSettings, model: ScoringModel | None = None) -> Scorer:
    """Load the model (unless given) and set up the method and noise bank once; method, n_noise and
    seed not given take the loaded profile's calibration values (see DetectSettings)."""
    if model is None:
        model = load_model(
            settings.model, device=settings.device, dtype=settings.dtype,
            allow_pickle=settings.allow_pickle, architecture=settings.architecture,
            profile_overrides=settings.profile_overrides(),
        )
    else:
        model = replace(model, profile=model.profile.with_overrides(**settings.profile_overrides()))
    settings = settings.for_profile(model.profile)
    method = method_for(settings.method, model.profile)
    return Scorer(
        model, method, n_noise=settings.n_noise, seed=settings.seed,
        batch_size=settings.batch_size, threshold=applicable_threshold(settings, model.profile, method.name),
        compile=settings.compile, prefetch=settings.prefetch, channels_last=settings.channels_last,
    )


def threshold_conflicts(settings: DetectSettings, profile: ModelProfile, method: str) -> list[str]:
    """Why the profile's calibrated threshold does not hold for this run (empty: it holds).

    A threshold holds for the method, weights and n_noise it was calibrated with (a profile without
    a calibration record counts as anisotropy at the run's n_noise)."""
    calibration = profile.calibration
    reasons = []
    if calibration.get("method", "anisotropy") != method:
        reasons.append(f"it was calibrated for method {calibration.get('method', 'anisotropy')!r}, not {method!r}")
    if calibration.get("n_noise", settings.n_noise) != settings.n_noise:
        reasons.append(f"it was calibrated with n_noise={calibration['n_noise']}, not {settings.n_noise}")
    if settings.w_norm is not None or settings.w_align is not None:
        reasons.append("--w-norm/--w-align change the score it was calibrated on")
    if settings.norm_scale is not None:
        reasons.append("--norm-scale changes the score it was calibrated on")
    if settings.v_convention is not None and profile.prediction_type == "v_prediction":
        reasons.append("--v-convention changes the score it was calibrated on")
    return reasons


def applicable_threshold(settings: DetectSettings, profile: ModelProfile, method: str) -> float | None:
    """The profile's threshold, unless it was calibrated for numbers this run does not produce.

    See threshold_conflicts; a threshold that does not hold is dropped with a warning, since its FPR
    would be unknown. `--threshold` always wins."""
    if settings.threshold is not None or profile.threshold is None:
        return profile.threshold
    reasons = threshold_conflicts(settings, profile, method)
    if reasons:
        log.warning("not flagging with the profile's threshold: %s; pass --threshold to set one", "; ".join(reasons))
        return None
    return profile.threshold


def score_prompts(
    prompts: Sequence[str | None],
    model: ScoringModel | str = "demo",
    *,
    n_noise: int | None = None,
    seed: int | None = None,
    batch_size: int = 16,
    method: str | None = None,
) -> pd.DataFrame:
    """Score an in-memory list of prompts; the quickest way in from Python (n_noise, seed, method:
    None takes the profile's calibration values, else 1, 51, anisotropy)."""
    settings = DetectSettings(
        model=model if isinstance(model, str) else model.profile.name, method=method,
        n_noise=n_noise, seed=seed, batch_size=batch_size,
    )
    scorer = build_scorer(settings, None if isinstance(model, str) else model)
    frame = pd.DataFrame({"prompt_id": [str(i) for i in range(len(prompts))], "prompt": list(prompts)})
    return scorer.score_frame(frame)


def summarize(
    scores: pd.DataFrame, *, seconds: float, top: int = 10, seconds_load: float = 0.0
) -> dict[str, Any]:
    """Counts, rate and the top-scored prompts, as the `--json` summary prints them.

    `seconds` is the whole run, `seconds_load` the model loading in it; the rate leaves loading out."""
    scoring = seconds - seconds_load
    status = scores["status"]
    ok = scores[status == STATUS_OK]
    flagged = scores["flagged"]
    top_rows = ok.sort_values("score", ascending=False, kind="stable").head(top)
    return {
        "rows": int(len(scores)),
        "scored": int(len(ok)),
        "skipped_empty": int((status == STATUS_SKIPPED_EMPTY).sum()),
        "failed": int(((status != STATUS_OK) & (status != STATUS_SKIPPED_EMPTY)).sum()),
        "truncated": int(scores["truncated"].sum()),
        "flagged": None if flagged.isna().all() else int(flagged.fillna(False).sum()),
        "seconds": round(seconds, 3),
        "seconds_load": round(seconds_load, 3),
        "prompts_per_second": round(len(ok) / scoring, 2) if scoring > 0 else None,
        "score_min": float(np.min(ok["score"])) if len(ok) else None,
        "score_max": float(np.max(ok["score"])) if len(ok) else None,
        "top": [
            {"prompt_id": r.prompt_id, "score": float(r.score), "prompt": r.prompt,
             "flagged": None if pd.isna(r.flagged) else bool(r.flagged)}
            for r in top_rows.itertuples()
        ],
    }


def detect(
    input_path: str | Path,
    output: str | Path | None = None,
    settings: DetectSettings | None = None,
    *,
    model: ScoringModel | None = None,
    if_exists: str = "fail",
    top: int = 10,
    progress: Progress | None = None,
    previous: str | Path | None = None,
) -> DetectResult:
    """Score every prompt in `input_path` and write the scores to `output` (Parquet).

    The input is read before the model is loaded, so input errors cost nothing. `progress`
    (none: silent) gets a start line, the model's load time, and the rows of every batch."""
    settings = settings or DetectSettings()
    if model is not None:
        settings = settings.for_profile(model.profile)
    output_path = storage.location(output) if output is not None else None  # a path or a URL
    if output_path is not None:
        check_output(output_path, inputs=[input_path], if_exists=if_exists)
    source = PromptSource(input_path, prompt_column=settings.prompt_column, id_column=settings.id_column)
    frame = source.read()
    if frame.empty:
        raise InputError(f"{input_path}: no prompts (the file has no rows)")
    prior = None
    if previous is not None:  # compared after scoring (summary "changes"); checked now, before the model loads
        from memscan.diff import read_previous

        prior = read_previous(previous, output_path)
    cache = open_cache(settings.cache)  # reachable (and writable, when local) before the model loads
    started = time.perf_counter()
    if progress is not None:
        name = settings.model if model is None else model.profile.name
        progress.start(
            f"scoring {len(frame)} rows of {input_path} with model {name} ({settings.method}, "
            f"n_noise {settings.n_noise}) -> {output_path or 'no file'}",
            total=len(frame),
        )
    try:
        scorer = build_scorer(settings, model)
        seconds_load = time.perf_counter() - started
        if progress is not None and model is None:
            dtype = str(scorer.model.dtype).removeprefix("torch.")
            progress.model_loaded(detail=f"{scorer.model.device}, {dtype}")
        if cache is not None:
            cache.bind(scorer).load()  # a corrupt segment stops the run here, before any scoring
        scores = scorer.score_frame(frame, progress=None if progress is None else progress.advance)
    except BaseException:
        if progress is not None:
            progress.close(final=False)
        _keep_scored(cache)
        raise
    if progress is not None:
        progress.close()
    seconds = time.perf_counter() - started
    facts = {
        **scorer.run_facts(), "memscan_version": __version__, "input": str(input_path),
        "fingerprint": fingerprint(settings, scorer.run_facts()),
    }
    if output_path is not None:
        schema = scores_schema(scorer.method.columns, store_prompt=settings.store_prompt)
        write_scores(to_table(scores, schema, facts), output_path)
    cache_summary = _flush_cache(cache, scores, output_path)
    summary = {**summarize(scores, seconds=seconds, top=top, seconds_load=seconds_load),
               "output": str(output_path) if output_path else None,
               "model": facts["model"], "method": facts["method"], "threshold": scorer.threshold,
               "cache": cache_summary}
    if prior is not None:
        from memscan.diff import ScoreSet, changes_since

        summary["changes"] = changes_since(prior, ScoreSet(scores, facts, str(output_path or input_path)))
    return DetectResult(scores=scores, summary=summary, output=output_path)


def _flush_cache(cache: ScoreCache | None, scores: pd.DataFrame, output: Path | None) -> dict[str, Any] | None:
    """Write the run's new scores to the cache (after the output: a cache failure loses no result);
    the summary's `cache` entry."""
    if cache is None:
        return None
    try:
        segment = cache.flush()
    except MemscanError as exc:
        raise OutputError(f"{exc} (the scores were written to {output})" if output else str(exc)) from None
    counts = scores.attrs.get("cache", {"reused": 0, "scored": 0})
    return {"path": cache.url, "fingerprint": cache.fingerprint, "reused": counts["reused"],
            "scored": counts["scored"], "segment": segment}


def _keep_scored(cache: ScoreCache | None) -> None:
    """An interrupted or failed run still stores the scores it finished (best effort)."""
    if cache is None or cache.fingerprint is None:
        return
    try:
        cache.flush()
    except Exception as exc:  # noqa: BLE001 - the run's own error is the one to report
        log.warning("could not store the finished scores in the cache: %s", exc)
