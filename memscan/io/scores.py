"""The scores table: its Arrow schema, run facts in Parquet key-value metadata, atomic writes
(memscan.outputs.atomic_write_bytes, re-exported here for the writers that import it from here).

One row per input row, always: scored rows carry numbers, skipped or failed rows carry a
status and an error message. A shard of a run directory and a single-file output share
this schema, so merging shards is a concatenation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from memscan import storage
from memscan.errors import InputError
from memscan.outputs import atomic_write_bytes
from memscan.storage import Location

METADATA_KEY = b"memscan"
STATUS_OK = "ok"
STATUS_SKIPPED_EMPTY = "skipped_empty"
STATUS_ERROR = "error"
STATUS_OOM = "oom"
STATUS_NONFINITE = "nonfinite"
STATUSES = (STATUS_OK, STATUS_SKIPPED_EMPTY, STATUS_ERROR, STATUS_OOM, STATUS_NONFINITE)


def scores_schema(method_columns: Sequence[str], *, store_prompt: bool = True) -> pa.Schema:
    """prompt_id, [prompt], the method's float32 columns, flagged, truncated, status, error."""
    fields = [pa.field("prompt_id", pa.string(), nullable=False)]
    if store_prompt:
        fields.append(pa.field("prompt", pa.string()))
    fields += [pa.field(name, pa.float32()) for name in method_columns]
    fields += [
        pa.field("flagged", pa.bool_()),
        pa.field("truncated", pa.bool_()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
    return pa.schema(fields)


def to_table(frame: pd.DataFrame, schema: pa.Schema, facts: dict[str, Any] | None = None) -> pa.Table:
    """The frame as an Arrow table of `schema`, with `facts` as JSON metadata."""
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    if facts is not None:
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(facts, sort_keys=True).encode()})
    return table


def write_scores(table: pa.Table, path: str | Location) -> None:
    """Write a scores table to `path` (a local path or URL) atomically: renamed into place, or one object."""
    atomic_write_bytes(storage.location(path), lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def read_scores(path: str | Location) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A scores file (a local path or URL) and its run facts."""
    try:
        with storage.storage_errors(path):
            table = storage.read_table(storage.location(path))
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"cannot read scores file {path}: {exc}") from exc
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    facts = json.loads(raw) if raw else {}
    return table.to_pandas(), facts
