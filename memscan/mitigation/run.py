"""`memscan mitigate -o DIR`: rewrites in a run directory, sharded, resumable and idempotent as detect's.

The run machinery (plan, manifest and fingerprint, atomic shards, executors, status, merge) is
memscan.run's; `MitigateJob` only says what a shard's rows become: `rewrite_prompts` against one
target, resolved once before planning and recorded in the manifest, so every shard, worker and
resume uses the same one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa

from memscan.config import DetectSettings
from memscan.errors import UsageError
from memscan.io.scores import STATUS_SKIPPED_EMPTY
from memscan.mitigation.settings import MitigateSettings
from memscan.mitigation.similarity import resolve_similarity
from memscan.mitigation.table import (
    STATUS_NOT_FLAGGED,
    STATUS_OK,
    STATUS_UNRESOLVED,
    check_detect_output,
    is_detect_output,
    output_schema,
    read_detect_range,
)
from memscan.run import RunOptions, RunOutcome, check_run_output, run_job
from memscan.run.job import fingerprint_fields
from memscan.run.plan import InputFile, Shard, expand_inputs, open_input

if TYPE_CHECKING:
    from memscan.models.profiles import ModelProfile
    from memscan.scorer import Scorer

# per-shard counts beyond detect's (rows, ok = scored, skipped_empty, failed_rows, flagged = above target)
COUNTS = ("written", "rewritten", "unresolved", "not_flagged", "seconds_search")
# settings that only concern --emit-embeddings, which run directories do not write
_NOT_RECORDED = ("detect", "emit_embeddings", "embedding_steps", "embedding_lr", "embedding_depth", "embedding_late",
                 "generation_steps", "guidance_scale", "late_noise")


def search_fields(settings: MitigateSettings) -> dict[str, Any]:
    """The mitigation settings that change the rewrites, as JSON values (tuples become lists)."""
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name not in _NOT_RECORDED}
    return json.loads(json.dumps(fields, default=str))


def _profile(settings: MitigateSettings) -> ModelProfile:
    """The profile `--model` names, with the weights' overrides, read without loading the model."""
    from memscan.models.loading import resolve_profile

    return resolve_profile(settings.detect.model).with_overrides(**settings.detect.profile_overrides())


def resolve_target(settings: MitigateSettings, profile: ModelProfile | None = None) -> float:
    """--target, else the profile's threshold where it holds for these settings (as `mitigate` takes it).

    Read from the profile without loading the model: a loaded model keeps its profile's threshold."""
    if settings.target is not None:
        return float(settings.target)
    from memscan.detect import applicable_threshold

    detect = settings.detect
    profile = profile or _profile(settings)
    target = applicable_threshold(detect, profile, detect.method)
    if target is None:
        from memscan.mitigation.settings import no_target_error

        raise no_target_error(detect, profile, detect.method)
    return float(target)


@dataclass(frozen=True)
class MitigateJob:
    """Each shard's rows rewritten by `rewrite_prompts`; `settings.target` is already resolved."""

    settings: MitigateSettings
    kind: ClassVar[str] = "mitigate"

    def __post_init__(self) -> None:
        if self.settings.target is None:
            raise ValueError("MitigateJob needs a resolved target (see resolve_target)")

    @property
    def scoring(self) -> DetectSettings:
        return self.settings.detect

    @property
    def target(self) -> float:
        return float(self.settings.target)  # type: ignore[arg-type]  # checked in __post_init__

    def on_device(self, device: str) -> MitigateJob:
        """The same job on another device (a worker's own GPU)."""
        return MitigateJob(replace(self.settings, detect=replace(self.settings.detect, device=device)))

    def manifest_entries(self) -> dict[str, Any]:
        return {
            "settings": {**search_fields(self.settings), "detect": self.scoring.to_dict()},
            "facts": {"target": self.target},
            "counts": list(COUNTS),
        }

    def fingerprint_fields(self, inputs: list[InputFile], shard_size: int) -> dict[str, Any]:
        fields = fingerprint_fields(self.scoring, inputs, shard_size)
        fields.update({f"mitigation.{k}": v for k, v in search_fields(self.settings).items()})
        return fields

    def schema(self, scorer: Scorer) -> pa.Schema:
        return output_schema(embeddings=False)

    def facts(self, scorer: Scorer) -> dict[str, Any]:
        return {**scorer.run_facts(), "target": self.target, "mitigation": search_fields(self.settings)}

    def read(self, item: InputFile, run_root: Path, shard: Shard) -> pd.DataFrame:
        """The shard's prompts; from a detect output only its flagged rows unless --all."""
        if item.staged is None and is_detect_output(Path(item.path)):
            return read_detect_range(Path(item.path), shard.start, shard.stop, all_rows=self.settings.all_rows)
        source = open_input(item, run_root, self.scoring.prompt_column, self.scoring.id_column)
        return source.read_range(shard.start, shard.stop)[["prompt_id", "prompt"]]

    def compute(
        self, scorer: Scorer, frame: pd.DataFrame, progress: Callable[[int], None] | None = None
    ) -> tuple[pd.DataFrame, dict[str, Any]]:
        from memscan.mitigation import rewrite_prompts

        rows, timing = rewrite_prompts(scorer, frame, self.target, self.settings, progress=progress)
        return rows, {**rewrite_counts(rows), "seconds_search": float(timing.get("seconds_search") or 0.0)}

    def redo_failed(
        self, scorer: Scorer, frame: pd.DataFrame, old: pd.DataFrame, progress: Callable[[int], None] | None = None
    ) -> tuple[pd.DataFrame, dict[str, Any]]:
        raise UsageError("--retry-errors applies to detect runs only")


def rewrite_counts(rows: pd.DataFrame) -> dict[str, int]:
    """A mitigate shard's counts, in detect's terms where they have one (ok: scored, flagged: above target)."""
    status = rows["status"]
    scored = np.isfinite(rows["score_before"].to_numpy(dtype=np.float64))
    empty = (status == STATUS_SKIPPED_EMPTY).to_numpy()
    return {
        "written": int(len(rows)),
        "ok": int(scored.sum()),
        "skipped_empty": int(empty.sum()),
        "failed_rows": int((~scored & ~empty).sum()),
        "flagged": int((scored & (status != STATUS_NOT_FLAGGED).to_numpy()).sum()),
        "rewritten": int((status == STATUS_OK).sum()),
        "unresolved": int((status == STATUS_UNRESOLVED).sum()),
        "not_flagged": int((status == STATUS_NOT_FLAGGED).sum()),
    }


def run_mitigate(
    input_spec: str | Path,
    out_dir: str | Path,
    settings: MitigateSettings,
    options: RunOptions | None = None,
    *,
    executor: str = "local",
    workers: int | None = None,
    gpus: str | None = None,
    log_interval: float = 60.0,
    interactive: bool | None = None,
) -> RunOutcome:
    """Plan or resume the mitigate run in `out_dir`, rewrite its pending shards, write summary.json.

    The target and the text similarity are resolved here, once, and fingerprinted with the run."""
    options = options or RunOptions()
    if settings.emit_embeddings is not None:
        raise UsageError("--emit-embeddings writes one safetensors file: give -o a .parquet file, not a run directory")
    if options.retry_errors:
        raise UsageError("--retry-errors applies to detect runs only")
    check_run_output(input_spec, out_dir, options)
    for path in expand_inputs(input_spec):
        if is_detect_output(path):
            check_detect_output(path, all_rows=settings.all_rows)
    profile = _profile(settings)
    similarity = resolve_similarity(settings.similarity or profile.text_similarity)
    job = MitigateJob(replace(settings, target=resolve_target(settings, profile), similarity=similarity))
    return run_job(input_spec, out_dir, job, options, executor=executor, workers=workers, gpus=gpus,
                   log_interval=log_interval, interactive=interactive)
