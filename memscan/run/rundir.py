"""The run directory: manifest, shards, stats markers, failures and summary.

    OUT/manifest.json            settings, fingerprint, inputs and shard plan, versions
    OUT/inputs/input-NNNNN.parquet   staged copies of text inputs
    OUT/shards/part-NNNNN.parquet    one scores file per shard
    OUT/stats/part-NNNNN.json        written LAST: a shard is done iff its stats file exists
    OUT/failed/part-NNNNN.json       why a shard failed (removed when it later succeeds)
    OUT/summary.json                 the merged view, rewritten at the end of each attempt

Every file is written to a temporary name and moved into place. On an object store (`-o s3://bucket/audit/`,
memscan.storage) there is no rename and no lock: every object is written whole, the stats marker last,
text inputs are staged under `inputs/<writer>/` (each starter its own), and the manifest is published
once, so two starters racing on an empty prefix agree on one plan:

- on stores with a conditional write (S3's If-None-Match; storage.ATOMIC_CREATE) the manifest is
  created only if absent; the starter that loses reads the winner's and adopts it;
- elsewhere each starter writes `claims/<fingerprint>-<writer>.json`, waits CLAIM_SETTLE_S for the
  others' claims, and unless a manifest appeared meanwhile publishes the lexicographically smallest
  claim as the manifest; everyone then reads the manifest back.

Either way a starter whose settings (fingerprint) differ from the manifest in force refuses (exit 2,
naming the settings) and removes what it staged; one with the same settings works on the same plan.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from memscan import storage
from memscan.errors import FingerprintMismatchError, InputError, UsageError
from memscan.io.scores import atomic_write_bytes, write_scores
from memscan.run.plan import InputFile, Shard
from memscan.storage import Location, RemotePath

MANIFEST_FORMAT = 1
CLAIM_SETTLE_S = 2.0  # stores without a conditional write: how long a starter waits for rival claims


def _json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode()


def write_json(path: Location, data: dict[str, Any]) -> None:
    """Atomically write `data` as indented JSON (renamed into place, or one whole object)."""
    blob = _json_bytes(data)
    if isinstance(path, RemotePath):
        path.write_bytes(blob)
        return
    atomic_write_bytes(path, lambda tmp: tmp.write_bytes(blob))


def read_json(path: Location) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


class RunDirectory:
    """Paths and atomic reads/writes of one run directory (a local folder or a prefix on a store)."""

    def __init__(self, root: str | Location) -> None:
        self.root: Location = storage.location(root)
        self.remote = isinstance(self.root, RemotePath)
        self.manifest_path = self.root / "manifest.json"
        self.summary_path = self.root / "summary.json"
        self.inputs_dir = self.root / "inputs"
        self.shards_dir = self.root / "shards"
        self.stats_dir = self.root / "stats"
        self.failed_dir = self.root / "failed"
        self.claims_dir = self.root / "claims"
        # who writes here from this object: names this starter's staged inputs and its manifest claim
        self.writer = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{describe_pid()}-{uuid.uuid4().hex[:8]}")

    # -------------------------------------------------------------- manifest and plan

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def check_is_run(self) -> None:
        if not self.exists():
            raise UsageError(f"{self.root} is not a memscan run directory (no manifest.json)")

    def manifest(self) -> dict[str, Any]:
        self.check_is_run()
        return read_json(self.manifest_path)

    def write_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Publish the manifest; returns the one in force. Locally (under `lock`) it is this one; on a
        store a rival starter's may have won the race (module docstring): adopted when its
        fingerprint is this one's, else FingerprintMismatchError."""
        data = {"format": MANIFEST_FORMAT, **manifest}
        if not isinstance(self.root, RemotePath):
            write_json(self.manifest_path, data)
            return data
        blob = _json_bytes(data)
        if self.root.protocol in storage.ATOMIC_CREATE:
            storage.create_exclusive(self.manifest_path, blob)
        else:
            (self.claims_dir / f"{data.get('fingerprint')}-{self.writer}.json").write_bytes(blob)
            time.sleep(CLAIM_SETTLE_S)
            if not self.manifest_path.is_file():
                first = self.claims_dir.files("*.json")[0]
                self.manifest_path.write_bytes(first.read_bytes())
        in_force = read_json(self.manifest_path)
        self._adopt(data, in_force)
        return in_force

    def _adopt(self, mine: dict[str, Any], in_force: dict[str, Any]) -> None:
        """After a race: drop what this starter staged for a plan not in force; refuse other settings."""
        used = {item.get("staged") for item in in_force.get("inputs", [])}
        for item in mine.get("inputs", []):
            if item.get("staged") and item["staged"] not in used:
                (self.root / item["staged"]).unlink(missing_ok=True)
        if in_force.get("fingerprint") == mine.get("fingerprint"):
            return
        old, new = in_force.get("fingerprint_fields", {}), mine.get("fingerprint_fields", {})
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)) or ["kind"]
        raise FingerprintMismatchError(
            f"{self.root}: another run started here at the same time with different settings "
            f"({', '.join(changed)}); rerun with its settings, --if-exists overwrite, or another output directory"
        )

    def staged_name(self, index: int) -> str:
        """Where input `index`'s staged copy goes, relative to the root: on a store each starter
        stages under its own prefix, so a rival's copy is never overwritten."""
        if isinstance(self.root, RemotePath):
            return f"inputs/{self.writer}/input-{index:05d}.parquet"
        return f"inputs/input-{index:05d}.parquet"

    def plan(self) -> tuple[list[InputFile], list[Shard]]:
        manifest = self.manifest()
        inputs = [InputFile(**item) for item in manifest["inputs"]]
        shards = [Shard(*row) for row in manifest["shards"]]
        return inputs, shards

    @contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock for planning, so concurrent ranks plan and stage once (a store has no
        locks: there, write_manifest settles a race)."""
        if isinstance(self.root, RemotePath):
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -------------------------------------------------------------- shards

    def shard_path(self, shard: Shard) -> Location:
        return self.shards_dir / f"{shard.name}.parquet"

    def stats_path(self, shard: Shard) -> Location:
        return self.stats_dir / f"{shard.name}.json"

    def failed_path(self, shard: Shard) -> Location:
        return self.failed_dir / f"{shard.name}.json"

    def is_done(self, shard: Shard) -> bool:
        return self.stats_path(shard).is_file()

    def write_shard(self, shard: Shard, table: pa.Table, stats: dict[str, Any]) -> None:
        """Write the shard's scores, then its stats marker: only now is the shard done."""
        write_scores(table, self.shard_path(shard))
        write_json(self.stats_path(shard), {"shard": shard.id, **stats})
        self.failed_path(shard).unlink(missing_ok=True)

    def read_shard(self, shard: Shard) -> pa.Table:
        path = self.shard_path(shard)
        if isinstance(path, RemotePath):
            return storage.read_table(path)
        return pq.read_table(path)

    def record_failure(self, shard: Shard, message: str, worker: str) -> None:
        write_json(self.failed_path(shard), {"shard": shard.id, "error": message, "worker": worker})

    def all_stats(self) -> dict[int, dict[str, Any]]:
        """Stats of the done shards, by shard id."""
        if isinstance(self.stats_dir, RemotePath):
            return {int(s["shard"]): s for s in self._read_markers(self.stats_dir)}
        if not self.stats_dir.is_dir():
            return {}
        out = {}
        for path in sorted(self.stats_dir.glob("part-*.json")):
            stats = read_json(path)
            out[int(stats["shard"])] = stats
        return out

    def failures(self) -> dict[int, dict[str, Any]]:
        if isinstance(self.failed_dir, RemotePath):
            return {int(s["shard"]): s for s in self._read_markers(self.failed_dir)}
        if not self.failed_dir.is_dir():
            return {}
        return {int(read_json(p)["shard"]): read_json(p) for p in sorted(self.failed_dir.glob("part-*.json"))}

    @staticmethod
    def _read_markers(folder: RemotePath) -> list[dict[str, Any]]:
        """The part-*.json markers of a folder on a store: one listing, then concurrent reads."""
        paths = folder.files("part-*.json")
        out = []
        for path, blob in storage.read_many(paths).items():
            try:
                out.append(json.loads(blob))
            except json.JSONDecodeError as exc:
                raise InputError(f"cannot read {path}: {exc}") from exc
        return out

    def remove_stale_temporaries(self) -> None:
        """Delete half-written temporaries of a killed attempt (only safe with no other writer; a
        store has none: its objects are written whole)."""
        if isinstance(self.root, RemotePath):
            return
        for folder in (self.shards_dir, self.stats_dir, self.failed_dir, self.inputs_dir, self.root):
            if folder.is_dir():
                for path in folder.glob(".*.tmp"):
                    path.unlink(missing_ok=True)

    def clear_outputs(self) -> None:
        """Remove everything a previous run wrote (for --if-exists overwrite)."""
        if isinstance(self.root, RemotePath):
            for folder in (self.shards_dir, self.stats_dir, self.failed_dir, self.inputs_dir, self.claims_dir):
                folder.remove_tree()
            for path in (self.manifest_path, self.summary_path):
                path.unlink(missing_ok=True)
            return
        for folder in (self.shards_dir, self.stats_dir, self.failed_dir, self.inputs_dir):
            if folder.is_dir():
                for path in folder.iterdir():
                    path.unlink()
        for path in (self.manifest_path, self.summary_path):
            path.unlink(missing_ok=True)


def describe_pid() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"
