"""Mitigation input rows (a prompt file or a `detect` output) and the output table's schema.

From a `detect` output only the flagged rows are taken unless every row is asked for; its
prompt ids are kept, so a rewrite joins back to its scores row.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

from memscan import storage
from memscan.errors import InputError, UsageError
from memscan.io.readers import DatasetRef, PromptSource, is_dataset_spec
from memscan.io.scores import METADATA_KEY, read_scores
from memscan.storage import Location

STATUS_OK = "ok"
STATUS_UNRESOLVED = "unresolved"
STATUS_NOT_FLAGGED = "not_flagged"
EMBEDDING_COLUMNS = ("embedding_score", "embedding_score_verified", "embedding_steps", "embedding_similarity",
                     "embedding_resolved")


def is_detect_output(path: str | Location | DatasetRef) -> bool:
    """A Parquet file that `memscan detect` wrote (its metadata and score columns are there)."""
    if is_dataset_spec(path):
        return False
    path = storage.location(path)  # type: ignore[arg-type]
    if path.suffix.lower() != ".parquet" or not path.is_file():
        return False
    try:
        schema = storage.read_schema(path)
    except (OSError, pa.ArrowInvalid, InputError):
        return False
    return METADATA_KEY in (schema.metadata or {}) and {"score", "flagged"} <= set(schema.names)


def read_rows(path: str | Location, *, prompt_column: str | None, id_column: str | None,
              all_rows: bool) -> pd.DataFrame:
    """Canonical `prompt_id`, `prompt` rows to mitigate, in input order."""
    if not is_detect_output(path):
        return PromptSource(path, prompt_column=prompt_column, id_column=id_column).read()[["prompt_id", "prompt"]]
    path = storage.location(path)
    check_detect_output(path, all_rows=all_rows)
    scores, _facts = read_scores(path)
    if not all_rows:
        scores = scores[scores["flagged"].fillna(False).astype(bool)]
    return scores[["prompt_id", "prompt"]].reset_index(drop=True)


def check_detect_output(path: Location, *, all_rows: bool) -> None:
    """Refuse a detect output without prompt text, or without flags unless every row is asked for."""
    schema = storage.read_schema(path)
    if "prompt" not in schema.names:
        raise InputError(f"{path}: this detect output has no prompt text (written with --no-store-prompt)")
    if not all_rows:
        flagged = storage.read_table(path, columns=["flagged"]).column("flagged")
        if flagged.null_count == len(flagged):
            raise UsageError(f"{path}: no row is flagged or not (detect ran without a threshold); pass --all")


def read_detect_range(path: Path, start: int, stop: int, *, all_rows: bool) -> pd.DataFrame:
    """`prompt_id`, `prompt` of rows [start, stop) of a detect output: its flagged ones unless `all_rows`."""
    keep = () if all_rows else ("flagged",)
    frame = PromptSource(path, prompt_column="prompt", id_column="prompt_id", keep_columns=keep).read_range(start, stop)
    if not all_rows:
        frame = frame[frame["flagged"].fillna(False).astype(bool).to_numpy()]
    return frame[["prompt_id", "prompt"]].reset_index(drop=True)


def output_schema(*, embeddings: bool, late: bool = False) -> pa.Schema:
    """prompt_id, prompt, rewritten, scores (search and verifier noise), similarity, triggers, edits, status
    (then the embedding columns, and with `late` the late embedding's guidance norm ratio)."""
    fields = [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("rewritten", pa.string()),
        pa.field("score_before", pa.float32()),
        pa.field("score_after", pa.float32()),
        pa.field("score_verified", pa.float32()),
        pa.field("similarity", pa.float32()),
        pa.field("trigger_tokens", pa.list_(pa.string())),
        pa.field("edits", pa.list_(pa.string())),
        pa.field("status", pa.string(), nullable=False),
    ]
    if embeddings:
        fields += [pa.field("embedding_score", pa.float32()), pa.field("embedding_score_verified", pa.float32()),
                   pa.field("embedding_steps", pa.int32()), pa.field("embedding_similarity", pa.float32()),
                   pa.field("embedding_resolved", pa.bool_())]
    if embeddings and late:
        fields.append(pa.field("embedding_late_norm_ratio", pa.float32()))
    return pa.schema(fields)
