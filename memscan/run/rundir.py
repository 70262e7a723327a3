"""The run directory: manifest, shards, stats markers, failures and summary.

    OUT/manifest.json            settings, fingerprint, inputs and shard plan, versions
    OUT/inputs/input-NNNNN.parquet   staged copies of text inputs
    OUT/shards/part-NNNNN.parquet    one scores file per shard
    OUT/stats/part-NNNNN.json        written LAST: a shard is done iff its stats file exists
    OUT/failed/part-NNNNN.json       why a shard failed (removed when it later succeeds)
    OUT/summary.json                 the merged view, rewritten at the end of each attempt

Every file is written to a temporary name and moved into place.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from memscan.errors import InputError, UsageError
from memscan.io.scores import atomic_write_bytes, write_scores
from memscan.run.plan import InputFile, Shard

MANIFEST_FORMAT = 1


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically write `data` as indented JSON."""
    blob = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
    atomic_write_bytes(path, lambda tmp: tmp.write_bytes(blob))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


class RunDirectory:
    """Paths and atomic reads/writes of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.summary_path = self.root / "summary.json"
        self.inputs_dir = self.root / "inputs"
        self.shards_dir = self.root / "shards"
        self.stats_dir = self.root / "stats"
        self.failed_dir = self.root / "failed"

    # -------------------------------------------------------------- manifest and plan

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def check_is_run(self) -> None:
        if not self.exists():
            raise UsageError(f"{self.root} is not a memscan run directory (no manifest.json)")

    def manifest(self) -> dict[str, Any]:
        self.check_is_run()
        return read_json(self.manifest_path)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json(self.manifest_path, {"format": MANIFEST_FORMAT, **manifest})

    def plan(self) -> tuple[list[InputFile], list[Shard]]:
        manifest = self.manifest()
        inputs = [InputFile(**item) for item in manifest["inputs"]]
        shards = [Shard(*row) for row in manifest["shards"]]
        return inputs, shards

    @contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock for planning, so concurrent ranks plan and stage once."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -------------------------------------------------------------- shards

    def shard_path(self, shard: Shard) -> Path:
        return self.shards_dir / f"{shard.name}.parquet"

    def stats_path(self, shard: Shard) -> Path:
        return self.stats_dir / f"{shard.name}.json"

    def failed_path(self, shard: Shard) -> Path:
        return self.failed_dir / f"{shard.name}.json"

    def is_done(self, shard: Shard) -> bool:
        return self.stats_path(shard).is_file()

    def write_shard(self, shard: Shard, table: pa.Table, stats: dict[str, Any]) -> None:
        """Write the shard's scores, then its stats marker: only now is the shard done."""
        write_scores(table, self.shard_path(shard))
        write_json(self.stats_path(shard), {"shard": shard.id, **stats})
        self.failed_path(shard).unlink(missing_ok=True)

    def read_shard(self, shard: Shard) -> pa.Table:
        return pq.read_table(self.shard_path(shard))

    def record_failure(self, shard: Shard, message: str, worker: str) -> None:
        write_json(self.failed_path(shard), {"shard": shard.id, "error": message, "worker": worker})

    def all_stats(self) -> dict[int, dict[str, Any]]:
        """Stats of the done shards, by shard id."""
        if not self.stats_dir.is_dir():
            return {}
        out = {}
        for path in sorted(self.stats_dir.glob("part-*.json")):
            stats = read_json(path)
            out[int(stats["shard"])] = stats
        return out

    def failures(self) -> dict[int, dict[str, Any]]:
        if not self.failed_dir.is_dir():
            return {}
        return {int(read_json(p)["shard"]): read_json(p) for p in sorted(self.failed_dir.glob("part-*.json"))}

    def remove_stale_temporaries(self) -> None:
        """Delete half-written temporaries of a killed attempt (only safe with no other writer)."""
        for folder in (self.shards_dir, self.stats_dir, self.failed_dir, self.inputs_dir, self.root):
            if folder.is_dir():
                for path in folder.glob(".*.tmp"):
                    path.unlink(missing_ok=True)

    def clear_outputs(self) -> None:
        """Remove everything a previous run wrote (for --if-exists overwrite)."""
        for folder in (self.shards_dir, self.stats_dir, self.failed_dir, self.inputs_dir):
            if folder.is_dir():
                for path in folder.iterdir():
                    path.unlink()
        for path in (self.manifest_path, self.summary_path):
            path.unlink(missing_ok=True)


def describe_pid() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"
