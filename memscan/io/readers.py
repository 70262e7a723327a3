"""Read prompts from CSV, TSV, Parquet, JSONL, TXT, WebDataset tar shards or Hugging Face `datasets`
datasets into one canonical DataFrame shape.

Every reader streams: text formats are parsed incrementally (optionally through gzip) and Parquet
is read batch by batch with only the needed columns, so a file of any size runs in bounded memory.
Each batch has the columns

    prompt_id  (str)          the id column's value, else "<file name>:<row_index>"
    prompt     (str or None)  exactly as written; None only for a null in Parquet/JSONL
    row_index  (int64)        0-based position of the row in the input
    *keep_columns             copied as read: strings from CSV/TSV, Parquet's own types,
                              pandas' inference from JSONL values

Anything wrong with the input raises `InputError` with one line that names the file. A file is a
local path or any fsspec URL (memscan.storage: s3://, gs://, az://, hf://, https://, memory://);
Parquet over a URL is read by byte ranges, so counting rows reads the footer only.

A WebDataset tar shard (`.tar`, `.tar.gz`) is one row per sample (consecutive members sharing a key,
the member name up to the first dot of its base name): the caption is its `.txt` member, else the
prompt/caption/text key of its `.json` member (`prompt_column` names a JSON key); ids are
`SHARD:KEY`. The tar is streamed (`r|*`): only `.txt` and `.json` members are read out, images are
skipped in the stream, nothing is extracted. `hf-dataset:NAME[:CONFIG][#SPLIT]` reads a Hugging Face
dataset (split `train` unless named) streamed from the hub, or a local folder: a `save_to_disk` one,
or one of data files; it needs the `datasets` package (`memscan[datasets]`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from itertools import islice
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memscan import storage
from memscan.errors import InputError, UsageError, one_line
from memscan.storage import Location

FORMATS = ("csv", "tsv", "parquet", "jsonl", "txt", "tar")
_TEXT_FORMATS = frozenset({"csv", "tsv", "jsonl", "txt"})
_GZIP_FORMATS = _TEXT_FORMATS | {"tar"}
PROMPT_COLUMN_CANDIDATES = ("prompt", "caption", "text")  # auto-detection priority, any case
OUTPUT_COLUMNS = ("prompt_id", "prompt", "row_index")
CSV_DELIMITERS = (",", ";", "\t", "|")  # sniffed in this order of preference

_SNIFF_BYTES = 1 << 16
_SNIFF_ROWS = 50
_JSONL_SCHEMA_RECORDS = 1000  # records whose keys make up a JSONL file's `columns`
_TAR_SCHEMA_SAMPLES = 100  # samples whose .json keys make up a tar shard's `columns`
_TAR_TEXT_MEMBERS = frozenset({"txt", "json"})  # the only members read out of a tar stream
DATASET_PREFIX = "hf-dataset:"
_CHUNK_BYTES = 1 << 20
_ARROW_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_null)


class _RawBatch(NamedTuple):
    """One batch as read from the file, before ids and row numbers are attached."""

    prompts: list[str | None]
    ids: list[str | None] | None
    keep: pd.DataFrame | None  # the keep columns, None when there are none (or not wanted)


def _format_of(path: Location, fmt: str | None) -> tuple[str, bool]:
    """(format, gzip-compressed?) from `fmt` or the file name."""
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] == ".gz"
    if fmt is not None:
        if fmt not in FORMATS:
            raise InputError(f"{path}: unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    else:
        ext = suffixes[-2] if compressed and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
        fmt = ext.lstrip(".")
        if fmt not in FORMATS:
            name = "".join(path.suffixes[-2:] if compressed else path.suffixes[-1:]) or "(none)"
            supported = ", ".join(f".{f}" for f in FORMATS)
            raise InputError(
                f"{path}: unsupported file extension {name}; supported: {supported} "
                "(csv, tsv, jsonl, txt, tar also gzip-compressed as .gz)"
            )
    if compressed and fmt not in _GZIP_FORMATS:
        raise InputError(f"{path}: gzip-compressed {fmt} is not supported; decompress it first")
    return fmt, compressed


def _score_delimiter(sample: str, truncated: bool, delimiter: str) -> int:
    """Columns per row if `delimiter` splits the sample into a consistent table of 2+ columns, else 0."""
    try:
        rows = list(islice(csv.reader(io.StringIO(sample), delimiter=delimiter), _SNIFF_ROWS + 1))
    except csv.Error:
        return 0
    if truncated and len(rows) > 1:
        rows = rows[:-1]  # the last row may be cut off mid-way
    widths = {len(row) for row in rows[:_SNIFF_ROWS] if row}
    if len(widths) == 1 and (width := widths.pop()) >= 2:
        return width
    return 0


def _sniff_delimiter(sample: str, truncated: bool) -> str:
    """The delimiter among `CSV_DELIMITERS` giving the widest consistent table; ',' if none does."""
    scores = {d: _score_delimiter(sample, truncated, d) for d in CSV_DELIMITERS}
    best = max(CSV_DELIMITERS, key=lambda d: scores[d])  # max keeps the first of equal scores
    if scores[best]:
        return best
    header = sample.split("\n", 1)[0]
    return max(CSV_DELIMITERS, key=header.count) if any(d in header for d in CSV_DELIMITERS) else ","


class PromptSource:
    """A prompt file, read in canonical batches (see the module docstring).

    The format comes from the extension (`.csv`, `.tsv`, `.parquet`, `.jsonl`, `.txt`, text formats
    optionally `.gz`) unless `fmt` names one. The prompt column is `prompt_column`, else the first of
    prompt/caption/text found in any case; TXT files have no columns: each line is a prompt.
    `columns` lists the input's columns (for JSONL, the keys of its first 1000 records).
    Construction checks the file, its format and its columns, so mistakes surface before any work.
    """

    def __init__(
        self,
        path: str | Location,
        *,
        prompt_column: str | None = None,
        id_column: str | None = None,
        fmt: str | None = None,
        keep_columns: Sequence[str] = (),
    ) -> None:
        self.path: Location | DatasetRef
        self._data: Any = None  # a `datasets` dataset, loaded once
        self._tar_has_txt = False  # a tar shard: some sample has a .txt member
        self._tar_json_key: str | None = None  # a tar shard without --prompt-column: the JSON caption key
        if is_dataset_spec(path):
            self.path = path if isinstance(path, DatasetRef) else DatasetRef(str(path))
            self.fmt, self.compressed = "dataset", False
        else:
            self.path = storage.location(path)  # type: ignore[arg-type]
            if not self.path.exists():
                raise InputError(f"{self.path}: no such file")
            if self.path.is_dir():
                raise InputError(f"{self.path}: is a directory, not a prompt file")
            self.fmt, self.compressed = _format_of(self.path, fmt)
        self._footer: pq.FileMetaData | None = None  # a Parquet file's footer, read once
        self.keep_columns: tuple[str, ...] = tuple(keep_columns)
        self.id_column = id_column
        self._delimiter = "\t" if self.fmt == "tsv" else ","
        if self.fmt == "csv":
            self._delimiter = self._sniff()
        with self._input_errors():
            self.columns: list[str] = self._read_columns()
        self.prompt_column: str | None = self._resolve_columns(prompt_column)

    # ----------------------------------------------------------------- public API

    def iter_batches(self, rows: int = 65536) -> Iterator[pd.DataFrame]:
        """Canonical DataFrames of at most `rows` rows each, streamed from the file in order.

        Raises InputError for a file without rows and, once reached, for a duplicate or empty id.
        """
        if rows < 1:
            raise ValueError(f"rows must be at least 1, not {rows}")
        seen: dict[str, int] = {}
        start = 0
        for raw in self._raw_batches(rows):
            if not raw.prompts:
                continue
            yield self._canonical(raw, start, seen)
            start += len(raw.prompts)
        if start == 0:
            raise InputError(f"{self.path}: no rows to read (empty file or header only)")

    def read(self) -> pd.DataFrame:
        """All rows as one canonical DataFrame."""
        return pd.concat(list(self.iter_batches()), ignore_index=True)

    def read_range(self, start: int, stop: int) -> pd.DataFrame:
        """Rows [start, stop) as one canonical DataFrame (ids and row_index as in a full read).

        Parquet reads only the row groups that overlap the range (from the footer); text formats
        stream up to `stop`. Duplicate ids are checked within the range only."""
        if not 0 <= start < stop:
            raise ValueError(f"bad row range [{start}, {stop})")
        first, batches = 0, self._raw_batches(65536)
        if self.fmt == "parquet":
            with self._input_errors(), self._parquet_file() as parquet:
                meta = parquet.metadata
                offsets = [0]
                for group in range(meta.num_row_groups):
                    offsets.append(offsets[-1] + meta.row_group(group).num_rows)
            groups = [g for g in range(len(offsets) - 1) if offsets[g] < stop and offsets[g + 1] > start]
            first = offsets[groups[0]] if groups else start
            with self._input_errors():
                batches = self._parquet_batches(65536, True, row_groups=groups)
        parts: list[pd.DataFrame] = []
        seen: dict[str, int] = {}
        position = first
        for raw in batches:
            end = position + len(raw.prompts)
            if end > start:
                frame = self._canonical(raw, position, seen)
                parts.append(frame.iloc[max(start - position, 0) : stop - position])
            position = end
            if position >= stop:
                break
        if position < stop:
            raise InputError(f"{self.path}: has {position} rows, expected at least {stop}")
        return pd.concat(parts, ignore_index=True)

    def count_rows(self) -> int:
        """Number of rows: from the footer for Parquet (no data read), else by streaming the file."""
        if self.fmt == "parquet":
            with self._input_errors(), self._parquet_file() as parquet:
                return parquet.metadata.num_rows
        if self.fmt == "dataset" and hasattr(self._data, "__len__"):
            return len(self._data)  # a local saved dataset knows its length
        return sum(len(raw.prompts) for raw in self._raw_batches(65536, with_extras=False))

    def __repr__(self) -> str:
        return f"PromptSource({str(self.path)!r}, fmt={self.fmt!r}, prompt_column={self.prompt_column!r})"

    # ----------------------------------------------------------------- columns

    def _read_columns(self) -> list[str]:
        if self.fmt == "txt":
            return []
        if self.fmt == "parquet":
            with self._parquet_file() as parquet:
                return list(parquet.schema_arrow.names)
        if self.fmt == "tar":
            return self._tar_columns()
        if self.fmt == "dataset":
            self._data = self.path.load()  # type: ignore[union-attr]
            names = getattr(self._data, "column_names", None)
            if names is None:  # a streamed dataset without declared features: its first example's keys
                names = list(next(iter(self._data), {}))
            return [str(name) for name in names]
        if self.fmt == "jsonl":
            names: dict[str, None] = {}
            with closing(self._jsonl_records()) as records:
                for _, record in islice(records, _JSONL_SCHEMA_RECORDS):
                    names.update(dict.fromkeys(record))
            if not names:
                raise InputError(f"{self.path}: empty file (no JSON records)")
            return list(names)
        with self._open() as stream:
            return [str(c) for c in pd.read_csv(stream, **self._csv_options(), nrows=0).columns]

    def _resolve_columns(self, prompt_column: str | None) -> str | None:
        """Check the requested columns exist; return the prompt column (auto-detected if not given)."""
        available = ", ".join(self.columns) or "(none)"
        if self.fmt == "txt":
            if prompt_column or self.id_column or self.keep_columns:
                raise InputError(
                    f"{self.path}: a txt file has no columns (one prompt per line); "
                    "prompt, id and keep columns cannot be chosen"
                )
            return None
        for role, name in (("prompt", prompt_column), ("id", self.id_column)):
            if name is not None and name not in self.columns:
                raise InputError(f"{self.path}: {role} column {name!r} not found; available: {available}")
        missing = [name for name in self.keep_columns if name not in self.columns]
        if missing:
            raise InputError(f"{self.path}: keep column {missing[0]!r} not found; available: {available}")
        reserved = [name for name in self.keep_columns if name in OUTPUT_COLUMNS]
        if reserved:
            raise InputError(
                f"{self.path}: keep column {reserved[0]!r} clashes with an output column "
                f"({', '.join(OUTPUT_COLUMNS)})"
            )
        if prompt_column is not None:
            return prompt_column
        for candidate in PROMPT_COLUMN_CANDIDATES:
            for name in self.columns:
                if name.strip().lower() == candidate:
                    return name if self.fmt != "tar" else self._tar_auto(name)
        if self.fmt == "tar":
            return self._tar_auto(None)
        raise InputError(
            f"{self.path}: no prompt column found (looked for {', '.join(PROMPT_COLUMN_CANDIDATES)} "
            f"in any case); available: {available}; name one with prompt_column"
        )

    # ----------------------------------------------------------------- reading

    def _raw_batches(self, rows: int, *, with_extras: bool = True) -> Iterator[_RawBatch]:
        """The format's reader, with its failures turned into InputError."""
        reader = {
            "csv": self._csv_batches,
            "tsv": self._csv_batches,
            "parquet": self._parquet_batches,
            "jsonl": self._jsonl_batches,
            "txt": self._txt_batches,
            "tar": self._tar_batches,
            "dataset": self._dataset_batches,
        }[self.fmt]
        with self._input_errors():
            yield from reader(rows, with_extras)

    def _csv_options(self, *, single_column: bool = False) -> dict[str, Any]:
        # Every field is a string, as written: no NA conversion ("NA", "null" and "" are prompts),
        # and no implicit index column. No usecols: pandas would silently drop extra fields.
        # With one column every line is a row, as in TXT (pandas would skip whitespace-only ones);
        # with several, a blank line is no row.
        return {
            "skip_blank_lines": not single_column,
            "sep": self._delimiter,
            "dtype": str,
            "keep_default_na": False,
            "na_filter": False,
            "index_col": False,
            "encoding": "utf-8",
            "engine": "c",
        }

    def _csv_batches(self, rows: int, with_extras: bool) -> Iterator[_RawBatch]:
        with (
            self._open() as stream,
            pd.read_csv(
                stream, **self._csv_options(single_column=len(self.columns) == 1), chunksize=rows
            ) as reader,
        ):
            for chunk in reader:
                yield self._raw_from_frame(chunk, with_extras)

    def _raw_from_frame(self, frame: pd.DataFrame, with_extras: bool) -> _RawBatch:
        ids = frame[self.id_column].tolist() if with_extras and self.id_column else None
        keep = frame[list(self.keep_columns)] if with_extras and self.keep_columns else None
        return _RawBatch(frame[self.prompt_column].tolist(), ids, keep)

    def _parquet_batches(
        self, rows: int, with_extras: bool, row_groups: Sequence[int] | None = None
    ) -> Iterator[_RawBatch]:
        wanted = [self.prompt_column, *((self.id_column,) if self.id_column else ()), *self.keep_columns]
        columns = list(dict.fromkeys(wanted if with_extras else wanted[:1]))
        with self._parquet_file() as parquet:
            self._check_parquet_prompt_type(parquet.schema_arrow.field(self.prompt_column).type)
            for batch in parquet.iter_batches(batch_size=rows, columns=columns, row_groups=row_groups):
                prompts = pc.cast(batch.column(self.prompt_column), pa.string()).to_pylist()
                ids = None
                if with_extras and self.id_column:
                    try:
                        ids = pc.cast(batch.column(self.id_column), pa.string()).to_pylist()
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                        problem = f"id column {self.id_column!r} cannot be read as text"
                        raise InputError(f"{self.path}: {problem} ({one_line(exc)})") from exc
                wants_keep = with_extras and self.keep_columns
                keep = batch.select(list(self.keep_columns)).to_pandas() if wants_keep else None
                yield _RawBatch(prompts, ids, keep)

    def _check_parquet_prompt_type(self, kind: pa.DataType) -> None:
        value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not any(is_text(value_kind) for is_text in _ARROW_TEXT_TYPES):
            raise InputError(f"{self.path}: prompt column {self.prompt_column!r} holds {kind}, not strings")

    def _jsonl_records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, object) for each non-blank line of a JSONL file."""
        with self._open_text() as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(
                        f"{self.path}: line {number}: malformed JSON ({exc.msg} at column {exc.colno})"
                    ) from None
                if not isinstance(record, dict):
                    raise InputError(
                        f"{self.path}: line {number}: expected a JSON object, got {type(record).__name__}"
                    )
                yield number, record

    def _jsonl_batches(self, rows: int, with_extras: bool) -> Iterator[_RawBatch]:
        batch: list[tuple[int, dict[str, Any]]] = []
        for item in self._jsonl_records():
            batch.append(item)
            if len(batch) == rows:
                yield self._raw_from_records(batch, with_extras)
                batch = []
        if batch:
            yield self._raw_from_records(batch, with_extras)

    def _raw_from_records(self, batch: list[tuple[int, dict[str, Any]]], with_extras: bool) -> _RawBatch:
        prompts: list[str | None] = []
        for number, record in batch:
            value = record.get(self.prompt_column)
            if value is not None and not isinstance(value, str):
                raise InputError(
                    f"{self.path}: line {number}: prompt {self.prompt_column!r} is a "
                    f"{type(value).__name__}, not a string"
                )
            prompts.append(value)
        if not with_extras:
            return _RawBatch(prompts, None, None)
        ids = None
        if self.id_column:
            ids = []
            for number, record in batch:
                value = record.get(self.id_column)
                if isinstance(value, (dict, list)):
                    raise InputError(f"{self.path}: line {number}: id {self.id_column!r} is not a scalar")
                ids.append(None if value is None else str(value))
        keep = None
        if self.keep_columns:
            keep = pd.DataFrame({name: [rec.get(name) for _, rec in batch] for name in self.keep_columns})
        return _RawBatch(prompts, ids, keep)

    def _txt_batches(self, rows: int, with_extras: bool) -> Iterator[_RawBatch]:
        batch: list[str | None] = []
        with self._open_text() as lines:
            for line in lines:
                batch.append(line[:-1] if line.endswith("\n") else line)
                if len(batch) == rows:
                    yield _RawBatch(batch, None, None)
                    batch = []
        if batch:
            yield _RawBatch(batch, None, None)

    # ----------------------------------------------------------------- WebDataset tar shards

    def _tar_samples(self) -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
        """(key, {ext: (member name, bytes)}) per sample: consecutive members sharing a key. The tar
        is streamed; only .txt and .json members are read out, the others pass by in the stream."""
        with self._open() as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            key: str | None = None
            parts: dict[str, tuple[str, bytes]] = {}
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name.removeprefix("./"))
                stem, dot, ext = base.partition(".")
                if not dot or not stem:
                    continue  # no extension, or a hidden file: no sample's member
                name = posixpath.join(folder, stem) if folder else stem
                if name != key:
                    if key is not None:
                        yield key, parts
                    key, parts = name, {}
                ext = ext.lower()
                if ext in _TAR_TEXT_MEMBERS:
                    handle = tar.extractfile(member)
                    parts[ext] = (member.name, handle.read() if handle is not None else b"")
            if key is not None:
                yield key, parts

    def _tar_columns(self) -> list[str]:
        """The keys of the first samples' .json members (and whether captions come as .txt)."""
        names: dict[str, None] = {}
        seen = 0
        with closing(self._tar_samples()) as samples:
            for _, parts in islice(samples, _TAR_SCHEMA_SAMPLES):
                seen += 1
                self._tar_has_txt = self._tar_has_txt or "txt" in parts
                if "json" in parts:
                    names.update(dict.fromkeys(self._tar_json(*parts["json"])))
        if not seen:
            raise InputError(f"{self.path}: no samples (an empty tar)")
        return list(names)

    def _tar_auto(self, json_key: str | None) -> None:
        """No --prompt-column: captions from .txt members, else `json_key`; neither is an error."""
        if json_key is None and not self._tar_has_txt:
            raise InputError(
                f"{self.path}: no caption: no .txt member and no prompt, caption or text key in the .json "
                f"members of the first {_TAR_SCHEMA_SAMPLES} samples; available keys: "
                f"{', '.join(self.columns) or '(none)'}; name one with --prompt-column"
            )
        self._tar_json_key = json_key

    def _tar_text(self, member: str, data: bytes) -> str:
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{self.path}: member {member}: not valid UTF-8 text (undecodable byte at offset {exc.start})"
            ) from None

    def _tar_json(self, member: str, data: bytes) -> dict[str, Any]:
        try:
            record = json.loads(self._tar_text(member, data))
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{self.path}: member {member}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        if not isinstance(record, dict):
            raise InputError(f"{self.path}: member {member}: expected a JSON object, got {type(record).__name__}")
        return record

    def _tar_batches(self, rows: int, with_extras: bool) -> Iterator[_RawBatch]:
        batch: list[tuple[str, dict[str, tuple[str, bytes]]]] = []
        for sample in self._tar_samples():
            batch.append(sample)
            if len(batch) == rows:
                yield self._raw_from_samples(batch, with_extras)
                batch = []
        if batch:
            yield self._raw_from_samples(batch, with_extras)

    def _raw_from_samples(self, batch: list[tuple[str, dict[str, tuple[str, bytes]]]], with_extras: bool) -> _RawBatch:
        prompts: list[str | None] = []
        records: list[dict[str, Any]] = []
        json_key = self.prompt_column or self._tar_json_key
        for _, parts in batch:
            record = self._tar_json(*parts["json"]) if "json" in parts else {}
            records.append(record)
            if self.prompt_column is None and "txt" in parts:
                text = self._tar_text(*parts["txt"])
                prompts.append(text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text)
                continue
            value = record.get(json_key) if json_key else None
            if value is not None and not isinstance(value, str):
                member, kind = parts["json"][0], type(value).__name__
                raise InputError(f"{self.path}: member {member}: prompt {json_key!r} is a {kind}, not a string")
            prompts.append(value)
        if not with_extras:
            return _RawBatch(prompts, None, None)
        if self.id_column:
            ids: list[str | None] = []
            for (_, parts), record in zip(batch, records, strict=True):
                value = record.get(self.id_column)
                if isinstance(value, (dict, list)):
                    raise InputError(f"{self.path}: member {parts['json'][0]}: id {self.id_column!r} is not a scalar")
                ids.append(None if value is None else str(value))
        else:
            ids = [f"{self.path.name}:{key}" for key, _ in batch]
        keep = None
        if self.keep_columns:
            keep = pd.DataFrame({name: [rec.get(name) for rec in records] for name in self.keep_columns})
        return _RawBatch(prompts, ids, keep)

    # ----------------------------------------------------------------- Hugging Face datasets

    def _dataset_batches(self, rows: int, with_extras: bool) -> Iterator[_RawBatch]:
        if self._data is None:
            self._data = self.path.load()  # type: ignore[union-attr]
        position = 0
        for batch in self._data.iter(batch_size=rows):
            prompts = batch[self.prompt_column]
            for offset, value in enumerate(prompts):
                if value is not None and not isinstance(value, str):
                    raise InputError(f"{self.path}: row {position + offset}: prompt {self.prompt_column!r} is a "
                                     f"{type(value).__name__}, not a string")
            position += len(prompts)
            if not with_extras:
                yield _RawBatch(list(prompts), None, None)
                continue
            ids = None
            if self.id_column:
                ids = [None if v is None else str(v) for v in batch[self.id_column]]
            keep = pd.DataFrame({c: list(batch[c]) for c in self.keep_columns}) if self.keep_columns else None
            yield _RawBatch(list(prompts), ids, keep)

    # ----------------------------------------------------------------- canonical form

    def _canonical(self, raw: _RawBatch, start: int, seen: dict[str, int]) -> pd.DataFrame:
        """Attach ids and row numbers; check user ids are present and unique across all batches."""
        row_index = range(start, start + len(raw.prompts))
        if raw.ids is None:
            ids = [f"{self.path.name}:{i}" for i in row_index]
        else:
            ids = raw.ids
            for i, value in zip(row_index, ids, strict=True):
                if value is None or value == "":
                    raise InputError(f"{self.path}: row {i} has an empty id in column {self.id_column!r}")
                first = seen.setdefault(value, i)
                if first != i:
                    where = f"in column {self.id_column!r}" if self.id_column else "(sample key)"
                    raise InputError(f"{self.path}: duplicate id {value!r} {where} (rows {first} and {i})")
        frame = pd.DataFrame(
            {
                "prompt_id": pd.Series(ids, dtype=object),
                "prompt": pd.Series(raw.prompts, dtype=object),
                "row_index": pd.Series(row_index, dtype="int64"),
            }
        )
        if raw.keep is not None:
            frame = pd.concat([frame, raw.keep.reset_index(drop=True)], axis=1)
        return frame

    # ----------------------------------------------------------------- files and errors

    def _open(self) -> IO[bytes]:
        """The file's (decompressed) bytes."""
        if isinstance(self.path, Path):
            return gzip.open(self.path, "rb") if self.compressed else open(self.path, "rb")
        raw = storage.open_read(self.path)
        if not self.compressed:
            return raw
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
        stream.myfileobj = raw  # type: ignore[attr-defined]  # closing the gzip stream closes the object too
        return stream

    @contextmanager
    def _parquet_file(self) -> Iterator[pq.ParquetFile]:
        """The Parquet file: the local path as before, a URL by byte ranges (the footer alone to plan).
        The footer is read once and reused: on a store each read of it is a request."""
        with storage.parquet_source(self.path) as source, pq.ParquetFile(source, metadata=self._footer) as parquet:
            self._footer = parquet.metadata
            yield parquet

    def _open_text(self) -> IO[str]:
        # utf-8-sig drops a byte-order mark; universal newlines make \r\n and \r line ends too.
        return io.TextIOWrapper(self._open(), encoding="utf-8-sig", newline=None)

    def _sniff(self) -> str:
        with self._input_errors(), self._open() as stream:
            head = stream.read(_SNIFF_BYTES + 1)
        truncated = len(head) > _SNIFF_BYTES
        return _sniff_delimiter(head[:_SNIFF_BYTES].decode("utf-8", errors="replace"), truncated)

    def _locate_undecodable(self) -> str:
        """Where the first invalid UTF-8 byte is: 'byte offset N (line L)' of the (decompressed) data."""
        offset, line, pending = 0, 1, b""
        with self._open() as stream:
            while True:
                chunk = stream.read(_CHUNK_BYTES)
                data = pending + chunk
                try:
                    data.decode("utf-8")
                    good, pending = len(data), b""
                except UnicodeDecodeError as exc:
                    if chunk and exc.reason == "unexpected end of data":
                        good, pending = exc.start, data[exc.start :]  # sequence split across chunks
                    else:
                        line += data[: exc.start].count(b"\n")
                        return f"byte offset {offset + exc.start} (line {line})"
                offset += good
                line += data[:good].count(b"\n")
                if not chunk:
                    return "an unknown position"

    @contextmanager
    def _input_errors(self) -> Iterator[None]:
        """Turn the parsing libraries' failures into one-line InputErrors naming the file."""
        where = f"{self.path}:"
        try:
            yield
        except InputError:
            raise
        except UnicodeDecodeError:
            position = self._locate_undecodable()
            suffix = " of the decompressed data" if self.compressed else ""
            message = f"not valid UTF-8 text: undecodable byte at {position}{suffix}"
            raise InputError(f"{where} {message}") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise InputError(f"{where} corrupt or truncated gzip data ({one_line(exc)})") from exc
        except pd.errors.EmptyDataError:
            raise InputError(f"{where} empty file (no header line)") from None
        except (pd.errors.ParserError, csv.Error) as exc:
            raise InputError(f"{where} malformed {self.fmt.upper()} ({one_line(exc)})") from exc
        except pa.ArrowException as exc:
            raise InputError(f"{where} corrupt or unreadable Parquet file ({one_line(exc)})") from exc
        except tarfile.TarError as exc:
            raise InputError(f"{where} corrupt or unreadable tar ({one_line(exc)})") from exc
        except OSError as exc:
            raise InputError(f"{where} cannot read the file ({one_line(exc)})") from exc
        except Exception as exc:
            if not storage.is_storage_error(exc):  # a store's client failing (unreachable, denied)
                raise
            raise InputError(f"{where} {storage.describe(exc)}") from exc


def is_dataset_spec(spec: object) -> bool:
    """`hf-dataset:NAME[:CONFIG][#SPLIT]`: a Hugging Face dataset, not a file."""
    return isinstance(spec, DatasetRef) or (isinstance(spec, str) and spec.startswith(DATASET_PREFIX))


class DatasetRef:
    """A Hugging Face `datasets` dataset named as an input, `hf-dataset:NAME[:CONFIG][#SPLIT]` (split
    train unless named): a hub dataset streamed (`load_dataset(..., streaming=True)`), a local folder
    saved with `save_to_disk` (`load_from_disk`), or a local folder of data files (streamed). It
    answers the few path questions planning a run asks (name, stat, resolve)."""

    suffixes: list[str] = []
    suffix = ""

    def __init__(self, spec: str) -> None:
        body, _, split = spec[len(DATASET_PREFIX):].partition("#")
        name, config = body, ""
        if not os.path.isdir(os.path.expanduser(body)):
            name, _, config = body.partition(":")
        if not name.strip():
            raise UsageError(f"{spec}: names no dataset; give {DATASET_PREFIX}NAME[:CONFIG][#SPLIT]")
        self.spec, self.dataset, self.config = spec, name, config or None
        self.split = split or "train"
        local = Path(name).expanduser()
        self.local: Path | None = local if local.is_dir() else None

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"DatasetRef({self.spec!r})"

    def __fspath__(self) -> str:
        """The spec, so output checks can compare it with an output path (it never names a file)."""
        return self.spec

    @property
    def name(self) -> str:
        return posixpath.basename(self.dataset.replace(os.sep, "/").rstrip("/")) or self.dataset

    def resolve(self) -> DatasetRef:
        """A local folder by its absolute path (a run's manifest names it so); a hub name as it is."""
        if self.local is None:
            return self
        body = str(self.local.resolve()) + (f":{self.config}" if self.config else "")
        return DatasetRef(DATASET_PREFIX + body + (self.spec.partition("#")[1] + self.spec.partition("#")[2]))

    def exists(self) -> bool:
        return True

    def is_dir(self) -> bool:
        return False

    def stat(self) -> SimpleNamespace:
        """A local folder's bytes (a changed dataset is another input to resume); 0 for the hub."""
        if self.local is None:
            return SimpleNamespace(st_size=0)
        size = sum(f.stat().st_size for f in self.local.rglob("*") if f.is_file())
        return SimpleNamespace(st_size=size)

    def load(self) -> Any:
        """The dataset's split: memory-mapped from a save_to_disk folder, else streamed."""
        try:
            import datasets
        except ImportError:
            raise UsageError(f"{self.spec}: reading a Hugging Face dataset needs the datasets package: "
                             "pip install 'memscan[datasets]'") from None
        try:
            if self.local is not None and any((self.local / f).is_file() for f in ("dataset_dict.json", "state.json")):
                loaded = datasets.load_from_disk(str(self.local))
                if isinstance(loaded, datasets.DatasetDict):
                    if self.split not in loaded:
                        raise InputError(f"{self.spec}: split {self.split!r} not found; available: {', '.join(loaded)}")
                    loaded = loaded[self.split]
                return loaded
            return datasets.load_dataset(str(self.local or self.dataset), self.config, split=self.split, streaming=True)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - hub unreachable, unknown dataset, config or split: one line
            detail = one_line(exc, with_type=True, limit=300)
            raise InputError(f"{self.spec}: cannot load the dataset ({detail})") from None


def read_prompts(path: str | Location, **kwargs: Any) -> pd.DataFrame:
    """All prompts of a file as one canonical DataFrame; `kwargs` as for `PromptSource`."""
    return PromptSource(path, **kwargs).read()
