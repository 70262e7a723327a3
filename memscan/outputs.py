"""Where memscan writes: one set of rules for every command and library function that writes.

- An output that exists is replaced only when asked (`if_exists="overwrite"`; run directories
  also `resume`), and an output is never one of the inputs (same path or same file), whatever
  `if_exists` says.
- The location is checked before any work (model loading, scoring): the parent exists or can be
  created, is a writable directory, and a file output is not a directory. The check creates nothing.
- `detect`/`mitigate -o`: a name ending in `.parquet` is one file; an existing directory, a path
  ending in `/`, or a name with no suffix is a run directory; any other suffix is refused.
- Files are written to a temporary name in the same folder and moved into place (a reader never
  sees half a file), with mode `0o666 & ~umask` as `open()` would give, not mkstemp's 0o600:
  results on shared storage stay readable by the group when the umask says so.
- A URL (memscan.storage: s3://, gs://, az://, memory://, ...) follows the same rules on its store:
  nothing is probed locally; the bucket must exist and take a small probe object (written, then
  deleted) before any work, and every object is written whole (object stores have no rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Literal

from memscan import storage
from memscan.errors import InputError, MemscanError, OutputError, OutputRefusedError, UsageError, one_line
from memscan.storage import Location, RemotePath

FILE_SUFFIXES = (".parquet",)
RUN_RULE = (
    "a file output ends in .parquet; a run directory is an existing directory, a path ending in '/', "
    "or a name with no suffix"
)
IF_EXISTS_FILE = ("fail", "overwrite")
IF_EXISTS_RUN = ("fail", "overwrite", "resume")

OutputKind = Literal["file", "run"]


def output_kind(path: str | Location, *, flag: str = "-o") -> OutputKind:
    """`file` or `run` (directory) by the rule above; give the path as typed (a str keeps a trailing '/')."""
    text = str(path) if isinstance(path, RemotePath) else os.fspath(path)
    if storage.is_url(text):
        if text.endswith("/"):
            return "run"
        suffix = PurePosixPath(text.split("://", 1)[1]).suffix.lower()
        if suffix in FILE_SUFFIXES or not suffix:
            return "file" if suffix else "run"
        if storage.location(text).is_dir():  # asked of the store only for a name with another suffix
            return "run"
        raise UsageError(f"{flag} {text}: {RUN_RULE}")
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return "run"
    suffix = Path(text).suffix.lower()
    if suffix in FILE_SUFFIXES:
        return "file"
    if not suffix:
        return "run"
    raise UsageError(f"{flag} {text}: {RUN_RULE}")


def _same_path(a: Location, b: Location) -> bool:
    """The same file or folder: by inode when both exist, else by resolved path (URLs: by their text)."""
    if isinstance(a, RemotePath) or isinstance(b, RemotePath):
        return storage.same_location(a, b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (where a write would create things)."""
    path = path.absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable_location(path: Location, *, what: str = "output", inside: bool = False) -> None:
    """Raise OutputError unless the folder that will receive `path` (or, `inside`, the files of an
    existing folder `path`) exists or can be created, and is writable. On a URL: a probe object is
    written and deleted there (the bucket exists, the credentials may write)."""
    if isinstance(path, RemotePath) or storage.is_url(path):
        remote = storage.location(path)
        assert isinstance(remote, RemotePath)
        storage.probe_writable(remote if inside else remote.parent, what, remote)
        return
    path = Path(path)
    place = _nearest_existing(path if inside and path.is_dir() else path.parent)
    if not place.is_dir():
        raise OutputError(f"cannot write {what} {path}: {place} is not a directory")
    if not os.access(place, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path}: permission denied in {place}")
    try:  # access() trusts root and misses read-only mounts: create and remove a probe file
        fd, probe = tempfile.mkstemp(prefix=".memscan-probe-", suffix=".tmp", dir=place)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or one_line(exc)} in {place}") from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)  # a run's sweep of stale temporaries may have taken it already


def check_output(
    path: str | Location, *, inputs: Iterable[str | Location] = (), if_exists: str = "fail",
    kind: OutputKind = "file", what: str = "output",
) -> Location:
    """Check an output before any work: valid `if_exists`, not an input, not an existing file unless
    `overwrite` (run directories: an existing run folder is the job's to resume), writable place.
    A URL is checked on its store (errors are one OutputError line, exit 4)."""
    path = storage.location(path)
    allowed = IF_EXISTS_RUN if kind == "run" else IF_EXISTS_FILE
    if if_exists not in allowed:
        hint = "; resume applies to run directories" if if_exists == "resume" else ""
        raise UsageError(f"--if-exists {if_exists!r}: use {' or '.join(allowed)}{hint}")
    for source in inputs:
        if _same_path(path, storage.location(source)):
            raise OutputRefusedError(f"{what} {path} is also an input ({source}); write somewhere else")
    try:
        exists = path.exists()
    except InputError as exc:  # a store that cannot be reached or read (URLs only): nor can it be written
        raise OutputError(f"cannot write {what} {exc}") from None
    if exists:
        if kind == "file" and path.is_dir():
            raise UsageError(f"{what} {path} is a directory; give a file path")
        if kind == "run" and not path.is_dir():
            raise UsageError(f"{what} {path} exists and is not a directory")
        if kind == "file" and if_exists == "fail":
            raise OutputRefusedError(f"{what} {path} exists; pass --if-exists overwrite to replace it")
    check_writable_location(path, what=what, inside=kind == "run")
    return path


def check_distinct(outputs: dict[str, str | Path | None]) -> None:
    """Two outputs of one command (e.g. `-o` and `--emit-embeddings`) must not be the same file."""
    given = [(flag, storage.location(p)) for flag, p in outputs.items() if p is not None]
    for i, (flag, path) in enumerate(given):
        for other_flag, other in given[i + 1:]:
            if _same_path(path, other):
                raise UsageError(f"{flag} and {other_flag} name the same file {path}; give two paths")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic, hence the /proc read first)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Location, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, give the file the umask's mode, then move it into place: readers never
    see half a file. An OS error (permission, disk full, a file where a folder should be) is an
    OutputError naming the path; nothing is left behind. A URL gets the file as one whole object
    (object stores have no rename; a PUT is all or nothing)."""
    if isinstance(path, RemotePath) or storage.is_url(path):
        remote = storage.location(path)
        assert isinstance(remote, RemotePath)
        storage.upload(remote, write)
        return
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        tmp = None
    except MemscanError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or one_line(exc)}") from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
