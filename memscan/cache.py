"""Score cache for incremental re-audits (`detect --cache PATH_OR_URL`).

A nightly audit over a growing dataset rescoring yesterday's prompts recomputes yesterday's
numbers. The cache keeps every score under the two things that determine it:

- the **fingerprint** of the numbers (`cache_fingerprint`): the model (profile name, revision, a
  digest of the loaded weights and configs, the scheduler), the method with its version, weights,
  timesteps, conventions and norm scale, the dtype, seed and n_noise. Not the threshold (the flag is
  recomputed from the run's threshold), not batch size or device (float rounding only), not input
  file names or ids;
- the prompt's **token ids after truncation** (`token_key`: blake2b-128 of the int32 ids), the same
  key the Scorer already deduplicates on.

Layout: `<root>/<fingerprint>/seg-<UTC time>-<uuid>.parquet`, each segment holding `key`
(16 bytes) and the method's float32 columns, written whole by one run or shard and never changed.
Readers take the union of a fingerprint's segments in name order and keep the first row of a key,
so any number of concurrent runs may append; `compact` merges a fingerprint's segments into one
(written whole, then the merged ones deleted: segments written meanwhile are never touched, and a
reader that finds a listed segment gone lists again). Only `ok` rows with finite scores are stored.
Paths are fsspec URLs (`s3://`, `gs://`, `memory://`, local paths).

A segment that cannot be read is an error (CacheError, exit 4) naming the file: deleting it loses
nothing but cached scores, which the next run recomputes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from memscan.errors import InputError, OutputError, one_line

if TYPE_CHECKING:
    from memscan.models.loading import ScoringModel
    from memscan.scorer import Scorer

log = logging.getLogger("memscan")

FORMAT = 1  # the segment layout; part of the fingerprint, so a new layout starts a new store
KEY_BYTES = 16
METADATA_KEY = b"memscan_cache"
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".parquet"
# run facts that do not change a stored number: the flag is recomputed from the run's threshold,
# and the weights digest stands for where the weights were read from
_NOT_CACHE_FACTS = ("threshold", "source")
# config entries that name files and versions, not numbers
_CONFIG_SKIP_PREFIX = "_"
_CONFIG_SKIP = ("transformers_version", "torch_dtype", "architectures", "name_or_path")


class CacheError(InputError):
    """A cache cannot be read (unreachable store, corrupt segment): one line, exit 4."""


def token_key(ids: np.ndarray) -> bytes:
    """The cache key of one prompt: blake2b-128 of its token ids (after truncation) as int32."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int32).tobytes(), digest_size=KEY_BYTES).digest()


# ---------------------------------------------------------------------- fingerprint

_digests: weakref.WeakKeyDictionary[Any, tuple[int, str]] = weakref.WeakKeyDictionary()


def weights_digest(model: ScoringModel) -> str:
    """blake2b of the UNet's and text encoder's tensors as loaded (names, dtypes, shapes, bytes).

    What the weights are, wherever they were read from: the same weights copied to another disk or
    node give the same digest, new weights under the same path do not. Once per loaded model."""
    import torch

    unet, encoder = model.unet, model.text_encoder
    known = _digests.get(unet)
    if known is not None and known[0] == id(encoder):
        return known[1]
    def tensor_digest(tensor: torch.Tensor) -> bytes:  # hashlib lets go of the GIL: tensors hash in parallel
        flat = tensor.detach().contiguous().reshape(-1)
        return hashlib.blake2b(flat.view(torch.uint8).cpu().numpy(), digest_size=16).digest()

    named = [(f"{part}.{name.removeprefix('_orig_mod.')}", tensor)
             for part, module in (("unet", unet), ("text_encoder", encoder))
             for name, tensor in sorted(module.state_dict().items())]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(tensor_digest, [tensor for _, tensor in named]))
    digest = hashlib.blake2b(digest_size=16)
    for (name, tensor), part in zip(named, parts, strict=True):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode() + part)
    _digests[unet] = (id(encoder), digest.hexdigest())
    return _digests[unet][1]


def _config(config: Any) -> dict[str, Any]:
    """A module's config without the entries that name files or versions."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in items.items() if not k.startswith(_CONFIG_SKIP_PREFIX) and k not in _CONFIG_SKIP}


def cache_facts(scorer: Scorer) -> dict[str, Any]:
    """Everything that determines a cached number (see the module docstring)."""
    model = scorer.model
    facts = {k: v for k, v in scorer.run_facts().items() if k not in _NOT_CACHE_FACTS}
    facts.update({
        "cache_format": FORMAT,
        "columns": list(scorer.method.columns),
        "weights_digest": weights_digest(model),
        "latent_shape": list(model.latent_shape),
        "unet_config": _config(model.unet.config),
        "text_encoder_config": _config(model.text_encoder.config),
        "scheduler_config": _config(model.scheduler.config),
    })
    return facts


def cache_fingerprint(facts: dict[str, Any]) -> str:
    """A short stable hash of `cache_facts`."""
    blob = json.dumps(facts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------- the store


@dataclass
class _Part:
    """Sorted unique keys and their values, in memory (the store's, or one flush of this process)."""

    keys: np.ndarray  # dtype S16, sorted, unique
    values: dict[str, np.ndarray]  # float32, aligned with keys


@dataclass
class CacheCounts:
    """Rows this process read from the cache and rows it scored, since it was opened."""

    reused: int = 0
    scored: int = 0
    segments_written: list[str] = field(default_factory=list)


def _segment_name() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{SEGMENT_PREFIX}{stamp}-{uuid.uuid4().hex[:12]}{SEGMENT_SUFFIX}"


def _unique_first(keys: np.ndarray, values: dict[str, np.ndarray]) -> _Part:
    """Sorted unique keys, each with the values of its first occurrence."""
    unique, first = np.unique(keys, return_index=True)
    return _Part(unique, {name: column[first] for name, column in values.items()})


class ScoreCache:
    """A score store at `url` (a local path or fsspec URL); `bind` it to a scorer to look up and add.

    Unbound, it answers `info()` and `compact()` for the whole store."""

    def __init__(self, url: str | Path) -> None:
        from memscan import storage

        self.url = str(url)
        # the storage options in force (--storage-option, MEMSCAN_STORAGE_OPTIONS); a missing
        # filesystem package is one line naming the extra (exit 2)
        self.fs, root = storage.filesystem(self.url)
        self.root = root.rstrip("/") or root
        self.fingerprint: str | None = None
        self.facts: dict[str, Any] = {}
        self.columns: tuple[str, ...] = ()
        self._parts: list[_Part] | None = None
        self._staged_keys: list[bytes] = []
        self._staged_values: dict[str, list[np.ndarray]] = {}
        self.counts = CacheCounts()

    # ----------------------------------------------------------- places

    @property
    def local(self) -> bool:
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self.fs, LocalFileSystem)

    def _join(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _display(self, path: str) -> str:
        """A path as the user wrote the cache's (its URL, then the path inside)."""
        if path.startswith(self.root + "/"):
            return self.url.rstrip("/") + path[len(self.root):]
        return path if self.local else self.fs.unstrip_protocol(path)

    def check(self) -> None:
        """Before any work: the store can be listed and written (unreachable endpoint, missing bucket,
        denied credentials, a file in the way: one line, exit 4)."""
        from memscan import storage

        with storage.storage_errors(f"cache {self.url}", "read", CacheError):
            kind = self._kind(self.root)
            if kind == "file":
                raise CacheError(f"cache {self.url} is a file, not a folder")
            if kind is None and not self.local and storage.protocol_of(self.url) in storage.EXTRAS:
                bucket = self.root.split("/", 1)[0]
                if bucket and self._kind(bucket) is None:
                    raise CacheError(f"cache {self.url}: no bucket or container {bucket!r}")
            self.fingerprints()
        if self.local:
            from memscan.outputs import check_writable_location

            check_writable_location(Path(self.root), what="cache", inside=True)
            return
        probe = self._join(f".memscan-probe-{uuid.uuid4().hex[:12]}")  # an object store says no only on a write
        with storage.storage_errors(f"cache {self.url}", "write", OutputError):
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)

    def _kind(self, path: str) -> str | None:
        """'file', 'directory' or None: asked with info (fsspec's exists answers False to any error)."""
        self.fs.invalidate_cache(path)
        try:
            return str(self.fs.info(path).get("type"))
        except FileNotFoundError:
            return None

    def fingerprints(self) -> list[str]:
        """The fingerprint folders in the store, sorted."""
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def segments(self, fingerprint: str) -> list[tuple[str, int]]:
        """(path, bytes) of a fingerprint's segments, in name (time) order."""
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self._join(fingerprint), detail=True)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] == "file" and name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX):
                found.append((entry["name"], int(entry.get("size") or 0)))
        return sorted(found, key=lambda item: item[0].rsplit("/", 1)[-1])

    # ----------------------------------------------------------- binding

    def bind(self, scorer: Scorer) -> ScoreCache:
        """Look up and add under the fingerprint of `scorer`'s numbers; the scorer then consults it."""
        self.facts = cache_facts(scorer)
        self.fingerprint = cache_fingerprint(self.facts)
        self.columns = tuple(scorer.method.columns)
        scorer.cache = self
        return self

    def load(self) -> None:
        """Read the fingerprint's segments into memory (once; `lookup` does it when needed)."""
        if self._parts is not None:
            return
        fingerprint = self._bound()
        for _attempt in range(5):  # a segment compacted away between listing and reading: list again
            paths = [path for path, _ in self.segments(fingerprint)]
            try:
                tables = self._read_segments(paths)
            except FileNotFoundError:
                continue
            break
        else:
            raise CacheError(f"cache {self.url}: segments keep disappearing while read (a compact loop?)")
        if not tables:
            self._parts = []
            return
        keys = np.concatenate([_keys_of(t) for t in tables])
        values = {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in tables]).astype(np.float32)
                  for c in self.columns}
        self._parts = [_unique_first(keys, values)]

    def _read_segments(self, paths: list[str]) -> list[pa.Table]:
        """Every segment whole, checked; FileNotFoundError when one vanished (compacted)."""
        if not paths:
            return []
        try:
            blobs = self.fs.cat(paths, on_error="return")
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store itself failed
            raise CacheError(f"cannot read cache {self.url}: {one_line(exc, with_type=True)}") from None
        tables = []
        for path in paths:
            blob = blobs.get(path, blobs.get(self.fs.unstrip_protocol(path)))
            if isinstance(blob, FileNotFoundError):
                raise blob
            tables.append(self._parse(path, blob))
        return tables

    def _parse(self, path: str, blob: Any) -> pa.Table:
        """One segment's table, or a CacheError naming it."""
        where = self._display(path)
        if isinstance(blob, BaseException) or blob is None:
            reason = "missing" if blob is None else one_line(blob, with_type=True)
            raise CacheError(f"cannot read cache segment {where}: {reason}")
        try:
            table = pq.read_table(pa.BufferReader(blob))
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for damaged files
            raise CacheError(
                f"cache segment {where} is corrupt ({one_line(exc, limit=160)}); delete it: it holds only "
                "cached scores, which the next run recomputes"
            ) from None
        wanted = ("key", *self.columns) if self.columns else ("key",)
        missing = [c for c in wanted if c not in table.column_names]
        if missing or table.schema.field("key").type != pa.binary(KEY_BYTES):
            raise CacheError(
                f"cache segment {where} is not a memscan cache segment for these columns "
                f"(missing {', '.join(missing) or 'a 16-byte key'}); delete it"
            )
        return table

    def _bound(self) -> str:
        if self.fingerprint is None:
            raise RuntimeError("ScoreCache.bind(scorer) first")
        return self.fingerprint

    # ----------------------------------------------------------- lookup and add

    def lookup(self, keys: Sequence[bytes]) -> pd.DataFrame:
        """One row per key, in order: `hit` and the method's columns (NaN where missed).

        A hit is the stored number exactly (the first stored row of the key)."""
        self.load()
        query = np.array(keys, dtype=f"S{KEY_BYTES}") if len(keys) else np.empty(0, dtype=f"S{KEY_BYTES}")
        hit = np.zeros(len(query), dtype=bool)
        out = {c: np.full(len(query), np.nan, dtype=np.float32) for c in self.columns}
        for part in self._parts or []:
            todo = np.flatnonzero(~hit)
            if not len(todo) or not len(part.keys):
                continue
            at = np.minimum(np.searchsorted(part.keys, query[todo]), len(part.keys) - 1)
            found = part.keys[at] == query[todo]
            rows, where = todo[found], at[found]
            hit[rows] = True
            for c in self.columns:
                out[c][rows] = part.values[c][where]
        self.counts.reused += int(hit.sum())
        return pd.DataFrame({"hit": hit, **out})

    def stage(self, keys: Sequence[bytes], values: dict[str, np.ndarray]) -> None:
        """Hold freshly scored rows (ok, finite) for the next `flush`."""
        if not len(keys):
            return
        self._staged_keys.extend(keys)
        for c in self.columns:
            self._staged_values.setdefault(c, []).append(np.asarray(values[c], dtype=np.float32))

    def scored(self, rows: int) -> None:
        """Count rows the model scored (misses), for the summary."""
        self.counts.scored += rows

    def flush(self) -> str | None:
        """Write the staged rows as one new segment (None: nothing staged); later lookups here see them."""
        if not self._staged_keys:
            return None
        keys = np.array(self._staged_keys, dtype=f"S{KEY_BYTES}")
        values = {c: np.concatenate(self._staged_values[c]) for c in self.columns}
        path = self._write(keys, values)
        self._staged_keys, self._staged_values = [], {}
        if self._parts is not None:
            self._parts.append(_unique_first(keys, values))
        self.counts.segments_written.append(self._display(path))
        return self._display(path)

    def append(self, rows: pd.DataFrame) -> str | None:
        """Write `rows` (`key` as 16 bytes, the method's columns) as one new segment."""
        if rows.empty:
            return None
        keys = np.array(rows["key"].tolist(), dtype=f"S{KEY_BYTES}")
        return self._display(self._write(keys, {c: rows[c].to_numpy(dtype=np.float32) for c in self.columns}))

    def _write(self, keys: np.ndarray, values: dict[str, np.ndarray], *, name: str | None = None,
               fingerprint: str | None = None, facts: dict[str, Any] | None = None) -> str:
        """One whole segment file; returns its path."""
        fingerprint = fingerprint or self._bound()
        # from the buffer: a numpy item would drop the key's trailing NUL bytes
        keys = np.ascontiguousarray(keys, dtype=f"S{KEY_BYTES}")
        buffers = [None, pa.py_buffer(keys.tobytes())]
        key_array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(KEY_BYTES), len(keys), buffers)
        columns: dict[str, pa.Array] = {"key": key_array}
        columns.update({c: pa.array(v, type=pa.float32()) for c, v in values.items()})
        meta = {"fingerprint": fingerprint, "facts": facts if facts is not None else self.facts,
                "rows": len(keys), "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        table = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(meta, default=str).encode()})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        path = self._join(fingerprint, name or _segment_name())
        if self.local:
            from memscan.outputs import atomic_write_bytes

            atomic_write_bytes(Path(path), lambda tmp: tmp.write_bytes(buffer.getvalue()))
            return path
        try:
            self.fs.pipe_file(path, buffer.getvalue())
        except Exception as exc:  # noqa: BLE001 - any store failure is one line
            where = self._display(path)
            raise OutputError(f"cannot write cache segment {where}: {one_line(exc, with_type=True)}") from None
        return path

    # ----------------------------------------------------------- maintenance

    def info(self) -> dict[str, Any]:
        """Fingerprints (with what they score), rows, segments and bytes; rows count stored rows (a key
        stored by two concurrent runs counts twice until `compact`)."""
        try:
            if self._kind(self.root) != "directory":
                raise CacheError(f"no cache at {self.url}")
            fingerprints = self.fingerprints()
            entries = []
            for fingerprint in fingerprints:
                segments = self.segments(fingerprint)
                rows, facts = 0, {}
                for path, _ in segments:
                    meta = self._footer(path)
                    rows += meta.num_rows
                    if not facts:
                        raw = (meta.metadata or {}).get(METADATA_KEY)
                        facts = json.loads(raw).get("facts", {}) if raw else {}
                entries.append({
                    "fingerprint": fingerprint, "rows": rows, "segments": len(segments),
                    "bytes": sum(size for _, size in segments),
                    **{k: facts.get(k) for k in ("model", "revision", "method", "n_noise", "seed", "dtype")},
                })
        except CacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable store, denied credentials
            raise CacheError(f"cannot read cache {self.url}: {one_line(exc, with_type=True)}") from None
        return {
            "cache": self.url, "fingerprints": entries,
            "rows": sum(e["rows"] for e in entries), "segments": sum(e["segments"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
        }

    def _footer(self, path: str) -> pq.FileMetaData:
        try:
            with self.fs.open(path, "rb") as handle:
                return pq.read_metadata(handle)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CacheError(
                f"cache segment {self._display(path)} is corrupt ({one_line(exc, limit=160)}); delete it: it "
                "holds only cached scores, which the next run recomputes"
            ) from None

    def compact(self) -> dict[str, Any]:
        """Merge each fingerprint's segments into one (first row of a key kept), then delete the merged ones.

        Safe while runs append: only the segments listed at the start are merged and deleted."""
        before = self.info()
        for fingerprint in self.fingerprints():
            self._compact_one(fingerprint)
        after = self.info()
        return {
            "cache": self.url, "fingerprints": len(after["fingerprints"]),
            "segments_before": before["segments"], "segments_after": after["segments"],
            "rows_before": before["rows"], "rows_after": after["rows"],
            "bytes_before": before["bytes"], "bytes_after": after["bytes"],
        }

    def _compact_one(self, fingerprint: str) -> None:
        segments = self.segments(fingerprint)
        if len(segments) < 2:
            return
        paths = [path for path, _ in segments]
        first = self._footer(paths[0])
        raw = (first.metadata or {}).get(METADATA_KEY)
        facts = json.loads(raw).get("facts", {}) if raw else {}
        self.columns = tuple(name for name in first.schema.to_arrow_schema().names if name != "key")
        try:
            tables = self._read_segments(paths)
        except FileNotFoundError:  # another compact took them: nothing left for this one to do
            return
        keys = np.concatenate([_keys_of(t) for t in tables])
        values = {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in tables]).astype(np.float32)
                  for c in self.columns}
        merged = _unique_first(keys, values)
        # named with the oldest merged segment's time, so it sorts where its rows were first written
        oldest = paths[0].rsplit("/", 1)[-1].removeprefix(SEGMENT_PREFIX).split("-", 1)[0]
        name = f"{SEGMENT_PREFIX}{oldest}-{uuid.uuid4().hex[:12]}{SEGMENT_SUFFIX}"
        self._write(merged.keys, merged.values, name=name, fingerprint=fingerprint, facts=facts)
        for path in paths:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:  # a concurrent compact deleted it first
                pass


def _keys_of(table: pa.Table) -> np.ndarray:
    """The `key` column as an S16 array (no copy of the bytes beyond one buffer)."""
    column = table.column("key").combine_chunks()
    data = column.buffers()[1]
    return np.frombuffer(data, dtype=f"S{KEY_BYTES}", count=len(column), offset=column.offset * KEY_BYTES).copy()


def open_cache(url: str | Path | None) -> ScoreCache | None:
    """The cache `--cache` names, checked before any work (None: no cache)."""
    if url is None or str(url) == "":
        return None
    cache = ScoreCache(url)
    cache.check()
    return cache
