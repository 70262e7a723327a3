"""`mitigate`: rewrite memorized prompts into close ones that the detection score no longer flags.

Library entry point behind `memscan mitigate`. For each prompt scored above the target, token
attribution names the trigger words (memscan.mitigation.attribution), a beam search over edits
around them finds a rewrite under the target that stays close in meaning (.search, .edits), and
optionally the prompt embedding itself is optimised under the target (.embeddings).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan import __version__
from memscan.io.scores import STATUS_NONFINITE, STATUS_SKIPPED_EMPTY, to_table, write_scores
from memscan.mitigation.attribution import attribute
from memscan.mitigation.differentiable import DifferentiableScore
from memscan.mitigation.edits import EditSpace
from memscan.mitigation.embeddings import load_embeddings, optimise_embedding, save_embeddings
from memscan.mitigation.late import LATE_PREFIX, LateRefiner, late_facts
from memscan.mitigation.neighbours import TokenNeighbours
from memscan.mitigation.search import RewriteSearch, SearchSettings
from memscan.mitigation.settings import MitigateSettings, no_target_error
from memscan.mitigation.similarity import resolve_similarity
from memscan.mitigation.table import (
    STATUS_NOT_FLAGGED,
    STATUS_OK,
    STATUS_UNRESOLVED,
    output_schema,
    read_rows,
)
from memscan.mitigation.words import WordSubstitutes, read_words
from memscan.models.loading import ScoringModel
from memscan.outputs import check_distinct, check_output
from memscan.progress import Progress
from memscan.scorer import Scorer
from memscan.storage import location

__all__ = ["MitigateResult", "MitigateSettings", "load_embeddings", "mitigate", "rewrite_prompts"]


@dataclass
class MitigateResult:
    """One row per mitigated input row, the run summary, and where things were written."""

    rows: pd.DataFrame
    summary: dict[str, Any]
    output: Path | None
    embeddings: Path | None


def mitigate(
    input_path: str | Path,
    output: str | Path | None = None,
    settings: MitigateSettings | None = None,
    *,
    model: ScoringModel | None = None,
    if_exists: str = "fail",
    progress: Progress | None = None,
) -> MitigateResult:
    """Rewrite the flagged prompts of `input_path` (a prompt file or a detect output) to `output`.

    The input is read before the model is loaded, so input errors cost nothing. `progress`
    (none: silent) gets a start line, the model's load time, and the rows as they are done."""
    from memscan.detect import build_scorer

    settings = settings or MitigateSettings()
    output_path = location(output) if output is not None else None
    check_distinct({"-o": output_path, "--emit-embeddings": settings.emit_embeddings})
    for path, what in ((output_path, "output"), (settings.emit_embeddings, "embeddings")):
        if path is not None:
            check_output(path, inputs=[input_path], if_exists=if_exists, what=what)
    detect = settings.detect
    frame = read_rows(
        input_path, prompt_column=detect.prompt_column, id_column=detect.id_column, all_rows=settings.all_rows
    )
    started = time.perf_counter()
    if progress is not None:
        progress.start(f"rewriting {len(frame)} rows of {input_path} with model {detect.model} "
                       f"-> {output_path or 'no file'}", total=len(frame))
    try:
        scorer = build_scorer(detect, model)
        target = settings.target if settings.target is not None else scorer.threshold
        if target is None:
            raise no_target_error(detect.for_profile(scorer.model.profile), scorer.model.profile, scorer.method.name)
        if progress is not None and model is None:
            progress.model_loaded()
        rows, timing = rewrite_prompts(scorer, frame, target, settings,
                                       progress=None if progress is None else progress.advance)
    except BaseException:
        if progress is not None:
            progress.close(final=False)
        raise
    if progress is not None:
        progress.close()
    embeddings_path = location(settings.emit_embeddings) if settings.emit_embeddings else None
    facts = {
        **scorer.run_facts(), "memscan_version": __version__, "input": str(input_path), "target": target,
        "mitigation": {k: v for k, v in settings.__dict__.items() if k not in ("detect", "emit_embeddings")},
    }
    late = settings.embedding_late is not None
    if embeddings_path is not None:
        embeds, timing["seconds_embeddings"] = emit_embeddings(scorer, rows, target, settings)
        save_embeddings(embeddings_path, embeds, {**facts, **({"late": late_facts(settings)} if late else {})})
    if output_path is not None:
        schema = output_schema(embeddings=embeddings_path is not None, late=late)
        write_scores(to_table(rows, schema, facts), output_path)
    summary = {
        **summarize(rows, target=target), **timing, "seconds": round(time.perf_counter() - started, 3),
        "output": str(output_path) if output_path else None,
        "embeddings": str(embeddings_path) if embeddings_path else None, "model": facts["model"],
    }
    return MitigateResult(rows=rows, summary=summary, output=output_path, embeddings=embeddings_path)


def rewrite_prompts(
    scorer: Scorer, frame: pd.DataFrame, target: float, settings: MitigateSettings,
    progress: Callable[[int], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Output rows for a canonical prompt frame, and the seconds the search took per prompt.

    `progress` hears of the rows done: those not above the target once scored, then one per search."""
    prompts = frame["prompt"]
    empty = (prompts.isna() | (prompts.fillna("").astype(str).str.strip() == "")).to_numpy()
    texts = prompts[~empty].astype(str).tolist()
    before = np.full(len(frame), np.nan)
    before[~empty] = scorer.score_texts(texts).columns["score"]
    todo = np.flatnonzero(~empty & (before > target))
    if progress is not None and len(frame) > len(todo):
        progress(len(frame) - len(todo))
    started = time.perf_counter()
    scoring = DifferentiableScore(scorer)
    attributions = attribute(scoring, [str(prompts.iloc[i]) for i in todo], batch_size=scorer.batch_size)
    similarity = resolve_similarity(settings.similarity or scorer.model.profile.text_similarity)
    edits = EditSpace(substitutes_for(scorer, settings.substitute_words, similarity),
                      n_substitutes=settings.n_substitutes, insert_words=settings.insert_words)
    search = RewriteSearch(scorer, edits, SearchSettings(
        target=target, min_similarity=settings.min_similarity, beam_width=settings.beam_width,
        max_edits=settings.max_edits, n_triggers=settings.n_triggers, similarity=similarity, prefer=settings.prefer,
    ), verifier=verifier_for(scorer, settings.verify_noise))
    out = pd.DataFrame({
        "prompt_id": frame["prompt_id"].astype(str).to_numpy(),
        "prompt": pd.Series(prompts.to_numpy(), dtype=object),
        "rewritten": pd.Series(prompts.to_numpy(), dtype=object),
        "score_before": before.astype(np.float32),
        "score_after": before.astype(np.float32),
        "score_verified": np.full(len(frame), np.nan, dtype=np.float32),
        "similarity": np.where(empty, np.nan, 1.0).astype(np.float32),
        "trigger_tokens": pd.Series([[] for _ in range(len(frame))], dtype=object),
        "edits": pd.Series([[] for _ in range(len(frame))], dtype=object),
        "status": np.where(
            empty, STATUS_SKIPPED_EMPTY, np.where(np.isnan(before), STATUS_NONFINITE, STATUS_NOT_FLAGGED)
        ),
    })
    out.loc[empty, "rewritten"] = None
    candidates = 0
    for i, attribution in zip(todo, attributions, strict=True):
        found = search.run(str(prompts.iloc[i]), float(before[i]), attribution)
        candidates += found.scored
        out.at[i, "rewritten"] = found.text
        out.at[i, "score_after"] = found.score
        out.at[i, "score_verified"] = np.nan if found.verified is None else found.verified
        out.at[i, "similarity"] = found.similarity
        out.at[i, "trigger_tokens"] = attribution.top_tokens(settings.report_triggers)
        out.at[i, "edits"] = list(found.edits)
        out.at[i, "status"] = STATUS_OK if found.resolved else STATUS_UNRESOLVED
        if progress is not None:
            progress(1)
    seconds = time.perf_counter() - started
    return out, {
        "seconds_search": round(seconds, 3),
        "seconds_per_prompt": round(seconds / len(todo), 4) if len(todo) else None,
        "candidates_per_prompt": round(candidates / len(todo), 1) if len(todo) else None,
    }


def substitutes_for(scorer: Scorer, words: str, similarity: str) -> Callable[[str, int], list[str]]:
    """The substitute source `--substitute-words` names: real words of a list ranked by `similarity`
    (memscan.mitigation.words), or `embedding`, the token table's own neighbours (noise words on
    models trained on other captions; kept to compare)."""
    if words == "embedding":
        return TokenNeighbours(scorer.model).substitutes
    return WordSubstitutes(scorer.model, read_words(words), similarity).substitutes


VERIFY_SEED_OFFSET = 7919  # the verifier's noise bank: independent of the search's, fixed by its seed


def verifier_for(scorer: Scorer, n_noise: int) -> Scorer | None:
    """The search's scorer on an independent noise bank of `n_noise` samples (None when 0)."""
    if n_noise < 1:
        return None
    return Scorer(scorer.model, scorer.method, n_noise=n_noise, seed=scorer.seed + VERIFY_SEED_OFFSET,
                  batch_size=scorer.batch_size)


def emit_embeddings(
    scorer: Scorer, rows: pd.DataFrame, target: float, settings: MitigateSettings
) -> tuple[dict[str, Any], float]:
    """Optimise the embedding of every flagged row (adds embedding columns to `rows` in place); with
    `settings.embedding_late`, also its late embedding (key `LATE_PREFIX + prompt_id`)."""
    started = time.perf_counter()
    scoring = DifferentiableScore(scorer)
    verifier = verifier_for(scorer, settings.verify_noise)
    checking = DifferentiableScore(verifier) if verifier is not None else None
    rows["embedding_score"] = np.full(len(rows), np.nan, dtype=np.float32)
    rows["embedding_score_verified"] = np.full(len(rows), np.nan, dtype=np.float32)
    rows["embedding_steps"] = pd.array([None] * len(rows), dtype="Int32")
    rows["embedding_similarity"] = np.full(len(rows), np.nan, dtype=np.float32)  # cosine to the prompt's own
    rows["embedding_resolved"] = pd.array([None] * len(rows), dtype="boolean")  # score and norm term under, verified
    late = None if settings.embedding_late is None else LateRefiner(scorer, settings)
    if late is not None:
        rows["embedding_late_norm_ratio"] = np.full(len(rows), np.nan, dtype=np.float32)
    embeds = {}
    for i in np.flatnonzero(rows["status"].isin([STATUS_OK, STATUS_UNRESOLVED]).to_numpy()):
        result = optimise_embedding(
            scoring, str(rows.at[i, "prompt"]), target, steps=settings.embedding_steps, lr=settings.embedding_lr,
            verifier=checking, depth=settings.embedding_depth,
        )
        embeds[str(rows.at[i, "prompt_id"])] = result.embeds
        rows.at[i, "embedding_score"] = result.score
        rows.at[i, "embedding_score_verified"] = np.nan if result.verified is None else result.verified
        rows.at[i, "embedding_steps"] = result.steps
        rows.at[i, "embedding_similarity"] = result.similarity
        rows.at[i, "embedding_resolved"] = result.resolved
        if late is not None and result.norm_fall is not None:
            key = str(rows.at[i, "prompt_id"])
            embeds[LATE_PREFIX + key], ratio = late.refine(result.embeds, result.norm_fall)
            rows.at[i, "embedding_late_norm_ratio"] = np.nan if ratio is None else ratio
    return embeds, round(time.perf_counter() - started, 3)


def summarize(rows: pd.DataFrame, *, target: float) -> dict[str, Any]:
    """Counts per status, success rate, similarity distribution of the successful rewrites."""
    status = rows["status"]
    attempted = status.isin([STATUS_OK, STATUS_UNRESOLVED])
    ok = rows[status == STATUS_OK]
    sims = ok["similarity"].astype(float)
    summary: dict[str, Any] = {
        "rows": int(len(rows)), "target": float(target), "attempted": int(attempted.sum()),
        **{name: int((status == name).sum()) for name in
           (STATUS_OK, STATUS_UNRESOLVED, STATUS_NOT_FLAGGED, STATUS_SKIPPED_EMPTY, STATUS_NONFINITE)},
        "success_rate": round(float(len(ok) / attempted.sum()), 4) if attempted.any() else None,
        "similarity": None if ok.empty else {
            "mean": round(float(sims.mean()), 4), "min": round(float(sims.min()), 4),
            **{f"q{int(q * 100)}": round(float(sims.quantile(q)), 4) for q in (0.1, 0.25, 0.5)},
        },
    }
    if "embedding_resolved" in rows:  # under the target with the norm term, confirmed on the other bank
        resolved = rows.loc[attempted, "embedding_resolved"].fillna(False).astype(bool)
        summary["embedding_success_rate"] = round(float(resolved.mean()), 4) if len(resolved) else None
    return summary


