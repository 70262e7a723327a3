"""The shard plan: fixed-size, deterministic slices of the input rows.

The plan is a pure function of the sorted input files, their row counts and the shard size,
so every worker, rank or attempt computes the same shard ids. Parquet inputs are counted from
their footers (no data read). Text inputs are streamed once into a staged Parquet copy in the
run directory, so any shard can later be read in O(shard) without re-parsing the text.
Inputs and the run directory may be URLs (memscan.storage): a bucket prefix or a glob on it is
listed like a folder, and a Parquet input on a store is counted from its footer alone.
"""

from __future__ import annotations

import glob
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from memscan import storage
from memscan.errors import InputError
from memscan.io.readers import FORMATS, DatasetRef, PromptSource, is_dataset_spec
from memscan.io.scores import atomic_write_bytes
from memscan.storage import Location, RemotePath

_INPUT_SUFFIXES = tuple(f".{fmt}" for fmt in FORMATS) + tuple(f".{fmt}.gz" for fmt in FORMATS if fmt != "parquet")


@dataclass(frozen=True)
class InputFile:
    """One input file as planned: where to read it, and how many rows it has."""

    path: str
    rows: int
    size: int
    staged: str | None = None  # staged Parquet copy (text inputs), relative to the run directory

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of input `input` (an index into the plan's inputs)."""

    id: int
    input: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"part-{self.id:05d}"


def expand_inputs(spec: str | Location) -> list[Location]:
    """A file, a folder (its prompt files), a glob or brace ranges (`captions-{000..009}.tar`, each
    name must exist), as a sorted list of files (local or on a store); a `hf-dataset:` spec as itself."""
    if is_dataset_spec(spec):
        return [DatasetRef(str(spec))]  # type: ignore[list-item]
    names = storage.expand_braces(spec) if isinstance(spec, str) else [spec]
    if len(names) == 1:
        return _expand_one(names[0])
    files: list[Location] = []
    missing: list[str] = []
    for name in names:
        if any(ch in name for ch in "*?["):
            files += _expand_one(name)
        elif (path := storage.location(name)).exists():
            files.append(path)
        else:
            missing.append(name)
    if not files:
        raise InputError(f"{spec}: no file matches")
    if missing:
        raise InputError(f"{missing[0]}: no such file ({len(missing)} of the {len(names)} names of {spec} are missing)")
    return sorted(dict.fromkeys(files), key=str)


def _expand_one(spec: str | Location) -> list[Location]:
    if storage.is_remote(spec):
        return _expand_remote(str(spec))
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(_INPUT_SUFFIXES))
        if not files:
            raise InputError(f"{path}: folder holds no prompt files ({', '.join(_INPUT_SUFFIXES)})")
        return files
    if any(ch in str(spec) for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(spec)) if Path(p).is_file())
        if not files:
            raise InputError(f"{spec}: no file matches")
        return files
    return [path]


def _expand_remote(spec: str) -> list[Location]:
    """expand_inputs for a URL: a prefix lists its prompt files, a glob matches on the store."""
    head, _, tail = spec.partition("://")
    if any(ch in tail for ch in "*?["):
        base, _, pattern = tail.rpartition("/")
        if any(ch in base for ch in "*?["):
            raise InputError(f"{spec}: a glob on a store may use wildcards in the last part of the name only")
        files = RemotePath(f"{head}://{base}").files(pattern)
        if not files:
            raise InputError(f"{spec}: no file matches")
        return files
    path = RemotePath(spec)
    if spec.endswith("/") or path.is_dir():
        files = [p for p in path.files() if p.name.lower().endswith(_INPUT_SUFFIXES)]
        if not files:
            raise InputError(f"{path}: folder holds no prompt files ({', '.join(_INPUT_SUFFIXES)})")
        return files
    return [path]


def make_plan(inputs: list[InputFile], shard_size: int) -> list[Shard]:
    """Consecutive shards of `shard_size` rows per input file, numbered across files."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    shards: list[Shard] = []
    for index, item in enumerate(inputs):
        for start in range(0, item.rows, shard_size):
            shards.append(Shard(len(shards), index, start, min(start + shard_size, item.rows)))
    return shards


def stage_text_input(source: PromptSource, dest: Location, shard_size: int) -> int:
    """Stream a text input into a canonical Parquet file (one row group per shard); rows written."""
    schema = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("row_index", pa.int64())])
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for frame in source.iter_batches(rows=shard_size):
                table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
                writer.write_table(table, row_group_size=shard_size)
                rows += len(frame)

    atomic_write_bytes(dest, write)
    return rows


def open_input(item: InputFile, run_dir: Location, prompt_column: str | None, id_column: str | None) -> PromptSource:
    """The source a shard of `item` is read from: the staged copy if there is one."""
    if item.staged is not None:
        return PromptSource(storage.location(run_dir) / item.staged, prompt_column="prompt", id_column="prompt_id")
    return PromptSource(storage.location(item.path), prompt_column=prompt_column, id_column=id_column)
