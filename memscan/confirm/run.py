"""`memscan confirm -o DIR`: labels from generations in a run directory, sharded and resumable as detect's.

The run machinery (plan, manifest and fingerprint, atomic shards, executors, status, merge) is
memscan.run's; `ConfirmJob` says what a shard's rows become (`Confirmer.confirm_frame`) and
that its workers load the model with its VAE (`load_model`). The settings are resolved once
(embedder path, threshold, min_cluster, training images) and fingerprinted with the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from weakref import WeakKeyDictionary

import pandas as pd
import pyarrow as pa

from memscan.config import DetectSettings
from memscan.confirm.core import (
    Confirmer,
    ConfirmSettings,
    label_counts,
    load_confirm_model,
    output_schema,
)
from memscan.errors import UsageError
from memscan.run import RunOptions, RunOutcome, check_run_output, run_job
from memscan.run.job import fingerprint_fields
from memscan.run.plan import InputFile, Shard, open_input

if TYPE_CHECKING:
    from memscan.models.loading import ScoringModel
    from memscan.scorer import Scorer

COUNTS = ("memorized", "not_memorized", "seconds_generate")
_CONFIRMERS: WeakKeyDictionary[Any, Confirmer] = WeakKeyDictionary()


@dataclass(frozen=True)
class ConfirmJob:
    """Each shard's rows labelled from k generations; `settings` already resolved."""

    settings: ConfirmSettings
    kind: ClassVar[str] = "confirm"

    @property
    def scoring(self) -> DetectSettings:
        return self.settings.detect

    def on_device(self, device: str) -> ConfirmJob:
        """The same job on another device (a worker's own GPU)."""
        return ConfirmJob(replace(self.settings, detect=replace(self.settings.detect, device=device)))

    def load_model(self) -> ScoringModel:
        """The worker's model, with its VAE (ShardWorker calls this instead of loading without one)."""
        return load_confirm_model(self.settings)

    def manifest_entries(self) -> dict[str, Any]:
        return {
            "settings": {**self.settings.fields(), "detect": self.scoring.to_dict()},
            "facts": {"threshold": self.settings.threshold, "embedder": self.settings.embedder,
                      "min_cluster": self.settings.min_cluster, "k": self.settings.k},
            "counts": list(COUNTS),
        }

    def fingerprint_fields(self, inputs: list[InputFile], shard_size: int) -> dict[str, Any]:
        fields = fingerprint_fields(self.scoring, inputs, shard_size)
        fields.update({f"confirm.{k}": v for k, v in self.settings.fields().items() if k != "batch_size"})
        return fields

    def confirmer(self, scorer: Scorer) -> Confirmer:
        """The worker's Confirmer, made on its first shard and kept with its scorer."""
        made = _CONFIRMERS.get(scorer)
        if made is None:
            made = _CONFIRMERS[scorer] = Confirmer(scorer.model, self.settings)
        return made

    def schema(self, scorer: Scorer) -> pa.Schema:
        return output_schema(store_prompt=self.scoring.store_prompt, sheet=self.settings.contact_sheet)

    def facts(self, scorer: Scorer) -> dict[str, Any]:
        return self.confirmer(scorer).facts()

    def read(self, item: InputFile, run_root: Path, shard: Shard) -> pd.DataFrame:
        source = open_input(item, run_root, self.scoring.prompt_column, self.scoring.id_column)
        return source.read_range(shard.start, shard.stop)[["prompt_id", "prompt"]]

    def compute(
        self, scorer: Scorer, frame: pd.DataFrame, progress: Callable[[int], None] | None = None
    ) -> tuple[pd.DataFrame, dict[str, Any]]:
        import time

        started = time.perf_counter()
        rows = self.confirmer(scorer).confirm_frame(frame, progress=progress)
        return rows, {**label_counts(rows), "seconds_generate": round(time.perf_counter() - started, 3)}

    def redo_failed(
        self, scorer: Scorer, frame: pd.DataFrame, old: pd.DataFrame, progress: Callable[[int], None] | None = None
    ) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Keep the shard's good rows; label again only the rows whose status is a failure."""
        redo = old["status"].isin(("error", "oom", "nonfinite")).to_numpy()
        fresh = self.confirmer(scorer).confirm_frame(frame[redo].reset_index(drop=True), progress=progress)
        merged = old.copy()
        if "prompt" not in merged:
            merged["prompt"] = frame["prompt"].to_numpy()
        merged.loc[redo, fresh.columns] = fresh.to_numpy()
        return merged, label_counts(merged)


def run_confirm(
    input_spec: str | Path,
    out_dir: str | Path,
    settings: ConfirmSettings,
    options: RunOptions | None = None,
    *,
    executor: str = "local",
    workers: int | None = None,
    gpus: str | None = None,
    log_interval: float = 60.0,
    interactive: bool | None = None,
    contact_sheet: str | Path | None = None,
) -> RunOutcome:
    """Plan or resume the confirm run in `out_dir`, label its pending shards, write summary.json.

    `contact_sheet` (an .html path) is written once the run is complete, from the shards' images."""
    from memscan.outputs import check_output

    options = options or RunOptions()
    if contact_sheet is not None:
        from memscan.run.rundir import RunDirectory

        settings = replace(settings, contact_sheet=True)
        # a resumed run rewrites its own sheet; a new run refuses an existing file unless told to overwrite
        resuming = options.if_exists == "resume" and Path(out_dir).is_dir() and RunDirectory(out_dir).exists()
        check_output(contact_sheet, inputs=[input_spec, out_dir],
                     if_exists="overwrite" if resuming or options.if_exists == "overwrite" else "fail",
                     what="contact sheet")
    check_run_output(input_spec, out_dir, options)
    job = ConfirmJob(settings.resolved())
    outcome = run_job(input_spec, out_dir, job, options, executor=executor, workers=workers, gpus=gpus,
                      log_interval=log_interval, interactive=interactive)
    if contact_sheet is not None and outcome.summary["complete"]:
        outcome.summary["contact_sheet"] = str(write_run_sheet(out_dir, contact_sheet))
    return outcome


def write_run_sheet(out_dir: str | Path, path: str | Path) -> Path:
    """The contact sheet of a complete confirm run directory, from its shards."""
    import json

    from memscan.confirm.sheet import write_contact_sheet
    from memscan.io.scores import METADATA_KEY
    from memscan.run.rundir import RunDirectory

    run = RunDirectory(out_dir)
    _, shards = run.plan()
    tables = [run.read_shard(s) for s in shards if run.is_done(s)]  # local or on a store
    if not tables or "sheet_png" not in tables[0].column_names:
        raise UsageError(f"{out_dir}: its shards hold no images; rerun confirm with --contact-sheet "
                         "and --if-exists overwrite")
    facts = json.loads((tables[0].schema.metadata or {}).get(METADATA_KEY, b"{}"))
    frame = pa.concat_tables(tables).to_pandas()
    keys = ("model", "embedder", "metric", "threshold", "k", "min_cluster", "seed", "steps", "guidance", "train_images")
    return write_contact_sheet(frame, path, threshold=float(facts["threshold"]), facts={k: facts.get(k) for k in keys})
