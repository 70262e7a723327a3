"""Merge a run directory's shards into one scores file, in shard order, in bounded memory.

The run directory and the output may each be local or on a store (memscan.storage)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from memscan import storage
from memscan.errors import PartialRunError
from memscan.io.scores import METADATA_KEY, atomic_write_bytes
from memscan.outputs import check_output
from memscan.run.rundir import RunDirectory
from memscan.storage import Location


def merge_run(
    run_dir: str | Location, output: str | Location, *, allow_partial: bool = False, if_exists: str = "fail"
) -> int:
    """Concatenate the done shards into `output`; refuses an incomplete run unless allowed, an existing
    output unless `if_exists="overwrite"`, and any file of the run or its inputs always.

    Returns the number of rows written."""
    run = RunDirectory(run_dir)
    inputs, shards = run.plan()
    own = [run.root, run.manifest_path, run.summary_path]
    own += [p for s in shards for p in (run.shard_path(s), run.stats_path(s), run.failed_path(s))]
    own += [storage.location(i.path) for i in inputs] + [run.root / i.staged for i in inputs if i.staged]
    check_output(output, inputs=own, if_exists=if_exists)
    done = [s for s in shards if run.is_done(s)]
    if len(done) < len(shards) and not allow_partial:
        raise PartialRunError(
            f"{run.root}: {len(shards) - len(done)} of {len(shards)} shards are not done; "
            "rerun to resume, or pass --partial to merge what is there"
        )
    if not done:
        raise PartialRunError(f"{run.root}: no shard is done yet")
    first = storage.read_schema(run.shard_path(done[0]))
    facts = json.loads((first.metadata or {}).get(METADATA_KEY, b"{}"))
    facts["merged_shards"] = len(done)
    facts["complete"] = len(done) == len(shards)
    schema = first.with_metadata({METADATA_KEY: json.dumps(facts, sort_keys=True).encode()})
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for shard in done:
                table = run.read_shard(shard).replace_schema_metadata(schema.metadata)
                writer.write_table(table)
                rows += table.num_rows

    atomic_write_bytes(storage.location(output), write)
    return rows
