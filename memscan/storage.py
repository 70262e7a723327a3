"""Where memscan reads and writes: local paths, or any fsspec URL (s3://, gs://, az://, hf://, https://, memory://).

One small layer over fsspec, so every reader and writer takes both:

- `location(spec)` is a `pathlib.Path` for a local path (and `file://` URLs), else a `RemotePath`:
  the few pathlib methods memscan uses (`/`, `name`, `exists`, `is_dir`, `stat`, `glob`, `read_bytes`,
  `write_bytes`, `unlink`, ...) over the URL's filesystem. Local paths behave exactly as before.
- Credentials come from where each filesystem looks (environment, profiles, instance roles) and
  from storage options: `configure({"endpoint_url": ...})` (the CLI's `--storage-option KEY=VALUE`),
  kept in the environment variable MEMSCAN_STORAGE_OPTIONS (JSON) so that worker processes and Ray
  actors see them too. `KEY` applies to every URL's filesystem, `PROTOCOL.KEY` (`s3.endpoint_url`) to
  that protocol only.
- A missing filesystem package is one line naming the extra to install (exit 2); a store that
  cannot be reached, a missing bucket or denied credentials are one line (exit 4), never a traceback.
- Object stores have no rename and no locks: an object is written whole (`upload`, `write_bytes`),
  which is atomic on S3, GCS and Azure (a reader sees the old object, the new one, or none);
  `create_exclusive` is the conditional write (If-None-Match) a manifest race is settled with.
- Listings and existence checks skip fsspec's listing cache: other processes write the same run.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import IO, Any

from memscan.errors import InputError, MemscanError, OutputError, UsageError, one_line

ENV_OPTIONS = "MEMSCAN_STORAGE_OPTIONS"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# protocol -> (the package that implements it, the memscan extra that installs it)
EXTRAS = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"), "adl": ("adlfs", "azure"),
    "hf": ("huggingface_hub", "hf"),
    "http": ("aiohttp", "http"), "https": ("aiohttp", "http"),
}
# stores whose create_exclusive is a true conditional write (S3 If-None-Match; memory: one process);
# elsewhere fsspec checks then writes, and a run directory settles a manifest race by its claims rule
ATOMIC_CREATE = frozenset({"s3", "s3a", "memory"})
# exceptions raised by these client libraries are storage failures (unreachable, denied, throttled, ...)
_CLIENT_MODULES = frozenset({
    "botocore", "aiobotocore", "boto3", "s3fs", "aiohttp", "gcsfs", "google", "adlfs", "azure",
    "huggingface_hub", "requests", "urllib3", "fsspec",
})


# ---------------------------------------------------------------------------------- options


def parse_storage_options(items: Sequence[str], flag: str = "--storage-option") -> dict[str, Any]:
    """`KEY=VALUE` strings as a dict; a VALUE that parses as JSON is that value (`1`, `true`, `null`,
    `{"region_name": "eu-west-1"}`), anything else is the string itself."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {item!r}: give KEY=VALUE, e.g. endpoint_url=http://localhost:9000")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        options[key.strip()] = value
    return options


def current_options() -> dict[str, Any]:
    """The storage options in force (MEMSCAN_STORAGE_OPTIONS, a JSON object)."""
    raw = os.environ.get(ENV_OPTIONS, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"{ENV_OPTIONS} is not JSON ({one_line(exc)})") from None
    if not isinstance(options, dict):
        raise UsageError(f"{ENV_OPTIONS} must be a JSON object of storage options")
    return options


def configure(options: Mapping[str, Any], *, merge: bool = True) -> None:
    """Set the storage options of this process and of the workers and actors it starts (they inherit
    the environment); `merge` keeps options already set that `options` does not name."""
    combined = {**(current_options() if merge else {}), **options}
    if combined:
        os.environ[ENV_OPTIONS] = json.dumps(combined, sort_keys=True)
    else:
        os.environ.pop(ENV_OPTIONS, None)


def options_for(protocol: str) -> dict[str, Any]:
    """The options for one protocol: plain keys, then `PROTOCOL.KEY` ones (which win)."""
    plain, specific = {}, {}
    package = EXTRAS.get(protocol, (protocol,))[0]
    aliases = {protocol, *(name for name, (pkg, _) in EXTRAS.items() if pkg == package)}
    for key, value in current_options().items():
        head, dot, name = key.partition(".")
        if not dot:
            plain[key] = value
        elif head in aliases:
            specific[name] = value
    return {**plain, **specific}


# ---------------------------------------------------------------------------------- URLs and filesystems


def is_url(spec: object) -> bool:
    """A URL memscan hands to fsspec (not a local path, not file://)."""
    if isinstance(spec, RemotePath):
        return True
    if not isinstance(spec, str):
        return False
    if "::" in spec and _URL.search(spec.split("::")[-1]):
        return True  # fsspec chaining, e.g. simplecache::s3://bucket/key
    return bool(_URL.match(spec)) and not spec.lower().startswith("file://")


def protocol_of(url: str) -> str:
    return url.split("::")[0].split("://", 1)[0].lower() if "://" in url else "file"


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `url`, built with the storage options in force.

    A missing filesystem package is a UsageError naming the extra (exit 2)."""
    import fsspec.core

    protocol = protocol_of(url)
    try:
        return fsspec.core.url_to_fs(url, **options_for(protocol))
    except ImportError as exc:
        raise UsageError(missing_extra(url, protocol, exc)) from None
    except TypeError as exc:
        raise UsageError(f"{url}: bad storage option for {protocol}:// ({one_line(exc)})") from None
    except ValueError as exc:
        raise UsageError(f"{url}: {one_line(exc)}") from None


def missing_extra(url: str, protocol: str, exc: BaseException | None = None) -> str:
    """The one line for a URL whose filesystem package is not installed."""
    if protocol in EXTRAS:
        package, extra = EXTRAS[protocol]
        return f"{url}: {protocol}:// needs the {package} package: pip install 'memscan[{extra}]'"
    detail = f" ({one_line(exc)})" if exc is not None else ""
    return f"{url}: {protocol}:// needs its fsspec filesystem package{detail}"


def is_storage_error(exc: BaseException) -> bool:
    """An OS-level or storage-client failure (as opposed to a bug): reported as one line."""
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    return any(cls.__module__.split(".")[0] in _CLIENT_MODULES for cls in type(exc).__mro__)


def describe(exc: BaseException, action: str = "read") -> str:
    """A storage failure in words: what kind (unreachable, denied, not found), then the store's own message."""
    message = one_line(exc)
    if isinstance(exc, FileNotFoundError):
        return f"not found ({message})"
    if isinstance(exc, PermissionError):
        return f"permission denied ({message})"
    name = type(exc).__name__
    if isinstance(exc, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
        return f"cannot reach the store ({message})"
    return f"cannot {action} ({message if name in message else f'{name}: {message}'})"


@contextmanager
def storage_errors(where: object, action: str = "read", error: type[MemscanError] = InputError) -> Iterator[None]:
    """Turn a storage failure inside the block into one `error` line naming `where` (exit 4)."""
    try:
        yield
    except MemscanError:
        raise
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        raise error(f"{where}: {describe(exc, action)}") from exc


class RemotePath:
    """A file or folder at a URL, with the pathlib methods memscan uses; the URL is normalised
    (`s3a://b/k/` -> `s3://b/k`). Never os.PathLike: local-only code fails loudly instead of
    writing to a folder named `s3:`."""

    __slots__ = ("url",)

    def __init__(self, url: str | RemotePath) -> None:
        text = str(url)
        fs, path = filesystem(text)
        normal = fs.unstrip_protocol(path) if "::" not in text else text
        self.url = normal.rstrip("/") if not normal.endswith("://") else normal

    @classmethod
    def _raw(cls, url: str) -> RemotePath:
        made = object.__new__(cls)
        made.url = url
        return made

    # ---- names
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, part: str | Path) -> RemotePath:
        return RemotePath._raw(f"{self.url.rstrip('/')}/{str(part).lstrip('/')}")

    @property
    def protocol(self) -> str:
        return protocol_of(self.url)

    @property
    def name(self) -> str:
        tail = self.url.split("://", 1)[-1]
        if self.protocol in ("http", "https"):
            tail = tail.split("?", 1)[0].split("#", 1)[0]
        return posixpath.basename(tail.rstrip("/"))

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.name).suffixes

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> RemotePath:
        head, _, tail = self.url.partition("://")
        if "/" not in tail.strip("/"):
            return self
        return RemotePath._raw(f"{head}://{tail.rstrip('/').rsplit('/', 1)[0]}")

    def resolve(self) -> RemotePath:
        return self

    def absolute(self) -> RemotePath:
        return self

    # ---- the store
    def fs(self) -> tuple[Any, str]:
        return filesystem(self.url)

    def _fresh(self) -> tuple[Any, str]:
        """The filesystem with this path's listings forgotten: other processes write here too."""
        fs, path = self.fs()
        fs.invalidate_cache(path)
        return fs, path

    def _kind(self) -> str | None:
        """'file', 'directory' or None (nothing there). Asked with `info`, not fsspec's exists/isfile/
        isdir, which answer False to any error: a store that cannot be reached is not an empty one."""
        with storage_errors(self, "check"):
            fs, path = self._fresh()
            try:
                return str(fs.info(path).get("type"))
            except FileNotFoundError:
                return None

    def exists(self) -> bool:
        return self._kind() is not None

    def is_file(self) -> bool:
        return self._kind() == "file"

    def is_dir(self) -> bool:
        return self._kind() == "directory"

    def stat(self) -> SimpleNamespace:
        with storage_errors(self, "read"):
            fs, path = self._fresh()
            return SimpleNamespace(st_size=int(fs.size(path) or 0))

    def read_bytes(self) -> bytes:
        with storage_errors(self, "read"):
            fs, path = self.fs()
            return bytes(fs.cat_file(path))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """Write the object whole (one PUT: readers never see half of it)."""
        with storage_errors(self, "write", OutputError):
            fs, path = self.fs()
            fs.pipe_file(path, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        with storage_errors(self, "delete", OutputError):
            fs, path = self._fresh()
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                if not missing_ok:
                    raise

    def remove_tree(self) -> None:
        """Delete every object under this prefix (nothing there is no error)."""
        with storage_errors(self, "delete", OutputError):
            fs, path = self._fresh()
            try:
                fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no folders (a prefix exists once it holds an object)."""

    def iterdir(self) -> Iterator[RemotePath]:
        with storage_errors(self, "list"):
            fs, path = self._fresh()
            try:
                names = sorted(fs.ls(path, detail=False))
            except FileNotFoundError:
                names = []
        yield from (RemotePath._raw(fs.unstrip_protocol(n)) for n in names if n.rstrip("/") != path.rstrip("/"))

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        with storage_errors(self, "list"):
            fs, path = self._fresh()
            names = sorted(fs.glob(f"{path.rstrip('/')}/{pattern}"))
        yield from (RemotePath._raw(fs.unstrip_protocol(n)) for n in names)

    def files(self, pattern: str | None = None) -> list[RemotePath]:
        """The files (not folders) directly in this folder, or matching `pattern` in it, sorted; one
        listing, not one request per file."""
        with storage_errors(self, "list"):
            fs, path = self._fresh()
            if pattern is not None:
                entries = list(fs.glob(f"{path.rstrip('/')}/{pattern}", detail=True).values())
            else:
                try:
                    entries = fs.ls(path, detail=True)
                except FileNotFoundError:
                    entries = []
        names = sorted(e["name"] for e in entries if e.get("type") == "file")
        return [RemotePath._raw(fs.unstrip_protocol(n)) for n in names]

    def open(self, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        with storage_errors(self, "open", OutputError if "w" in mode else InputError):
            fs, path = self.fs()
            return fs.open(path, mode, **kwargs)


Location = Path | RemotePath


def location(spec: str | Path | RemotePath) -> Location:
    """A local `Path` (also for `file://` URLs), or a `RemotePath` for any other URL."""
    if isinstance(spec, (Path, RemotePath)):
        return spec
    text = os.fspath(spec)
    if text.lower().startswith("file://"):
        return Path(text[len("file://"):])
    return RemotePath(text) if is_url(text) else Path(text)


def is_remote(spec: object) -> bool:
    return isinstance(spec, RemotePath) or (isinstance(spec, str) and is_url(spec))


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(spec: str) -> list[str]:
    """Shell-style brace ranges and lists, as WebDataset shard names use them: `captions-{000..009}.tar`
    (zero padding kept), `{a,b}`; several braces multiply. Text without a range or a list is itself."""
    match = next((m for m in _BRACE.finditer(spec) if ".." in m.group(1) or "," in m.group(1)), None)
    if match is None:
        return [spec]
    inner = match.group(1)
    low, dots, high = inner.partition("..")
    if dots and low.isdigit() and high.isdigit():
        width = len(low) if low.startswith("0") or len(low) == len(high) else 0
        step = 1 if int(high) >= int(low) else -1
        choices = [str(n).zfill(width) for n in range(int(low), int(high) + step, step)]
    elif "," in inner:
        choices = inner.split(",")
    else:  # `{..}` or `{x..y}` of non-numbers: literal text
        return [spec[: match.end()] + rest for rest in expand_braces(spec[match.end():])]
    head, tail = spec[: match.start()], spec[match.end():]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def same_location(a: str | Path | RemotePath, b: str | Path | RemotePath) -> bool:
    """Two names of the same file or folder: URLs by their normalised text, local paths by inode or
    resolved path (see memscan.outputs)."""
    la, lb = location(a), location(b)
    if isinstance(la, RemotePath) or isinstance(lb, RemotePath):
        return isinstance(la, RemotePath) and isinstance(lb, RemotePath) and la.url == lb.url
    try:
        if la.exists() and lb.exists():
            return os.path.samefile(la, lb)
    except OSError:
        pass
    return la.resolve() == lb.resolve()


# ---------------------------------------------------------------------------------- reads and writes


def open_read(loc: Location, *, random_access: bool = False) -> IO[bytes]:
    """A binary file to read. `random_access` (Parquet): no read-ahead, so reading the footer costs
    the footer's bytes, not a 50 MB block."""
    if isinstance(loc, Path):
        return open(loc, "rb")
    kwargs: dict[str, Any] = {"cache_type": "none"} if random_access else {}
    return loc.open("rb", **kwargs)


@contextmanager
def parquet_source(loc: Location) -> Iterator[str | IO[bytes]]:
    """What pyarrow.parquet opens: the local path itself (memory-mapped as before), or a
    random-access remote file, closed afterwards."""
    if isinstance(loc, Path):
        yield str(loc)
        return
    handle = open_read(loc, random_access=True)
    try:
        yield handle
    finally:
        handle.close()


def read_table(loc: Location, columns: Sequence[str] | None = None) -> Any:
    """A whole Parquet file as an Arrow table (a remote one is fetched in one GET)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(loc, Path):
        return pq.read_table(loc, columns=columns)
    data = loc.read_bytes()
    return pq.read_table(pa.BufferReader(data), columns=columns)


def read_schema(loc: Location) -> Any:
    """A Parquet file's Arrow schema (with its key-value metadata), read from the footer only."""
    import pyarrow.parquet as pq

    with storage_errors(loc, "read"), parquet_source(loc) as source:
        return pq.read_schema(source)


def read_many(paths: Sequence[RemotePath]) -> dict[RemotePath, bytes]:
    """Several small objects of one store, fetched concurrently where the filesystem can."""
    if not paths:
        return {}
    with storage_errors(paths[0].parent, "read"):
        fs, _ = paths[0].fs()
        raw = {p: p.fs()[1] for p in paths}
        got = fs.cat(list(raw.values()), on_error="raise")
        return {p: bytes(got[path]) for p, path in raw.items()}


def upload(loc: RemotePath, write: Callable[[Path], object]) -> None:
    """Call `write(local_tmp)`, then put the file at `loc` whole (one object: no rename, no temporary
    object a reader could see). The local temporary is always removed."""
    fd, name = tempfile.mkstemp(prefix=".memscan-upload-", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            write(tmp)
        except OSError as exc:
            raise OutputError(f"cannot write {loc}: {exc.strerror or one_line(exc)}") from exc
        with storage_errors(loc, "write", OutputError):
            fs, path = loc.fs()
            fs.put_file(str(tmp), path)
            fs.invalidate_cache(path)
    finally:
        tmp.unlink(missing_ok=True)


def create_exclusive(loc: RemotePath, data: bytes) -> bool:
    """Write `data` at `loc` only if nothing is there: True if this call created it, False if an
    object was there already. A conditional write (If-None-Match) on the stores of ATOMIC_CREATE."""
    with storage_errors(loc, "write", OutputError):
        fs, path = loc._fresh()
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True


def probe_writable(folder: RemotePath, what: str, target: object) -> None:
    """Write and delete a small object in `folder`: the bucket exists, the credentials may write."""
    import uuid

    probe = folder / f".memscan-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OutputError as exc:
        detail = str(exc).removeprefix(f"{probe}: ")
        raise OutputError(f"cannot write {what} {target}: {detail}") from None
