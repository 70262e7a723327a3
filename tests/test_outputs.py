"""memscan.outputs: the one set of rules every writer follows (never clobber, never write over an
input, check the location before the work, honour the umask)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from memscan.errors import EXIT_INPUT, EXIT_USAGE, OutputError, UsageError
from memscan.outputs import atomic_write_bytes, check_output, output_kind


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("spec", "kind"),
    [("s.parquet", "file"), ("S.PARQUET", "file"), ("audit", "run"), ("audit/", "run"), ("a.b/", "run")],
)
def test_output_kind_by_suffix(spec: str, kind: str, tmp_path: Path) -> None:
    assert output_kind(str(tmp_path / spec) if not spec.endswith("/") else f"{tmp_path / spec[:-1]}/") == kind


def test_existing_directory_is_a_run_whatever_its_name(tmp_path: Path) -> None:
    (tmp_path / "runs.v2").mkdir()
    assert output_kind(tmp_path / "runs.v2") == "run"


@pytest.mark.parametrize("name", ["out.csv", "scores.json", "a.pq", "audit.2024"])
def test_other_suffixes_are_refused_in_one_line(name: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        output_kind(tmp_path / name)
    message = str(info.value)
    assert info.value.exit_code == EXIT_USAGE and "\n" not in message
    assert name in message and ".parquet" in message and "'/'" in message and "no suffix" in message
    assert not (tmp_path / name).exists()


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    out.write_bytes(b"keep")
    with pytest.raises(UsageError, match="--if-exists overwrite"):
        check_output(out)
    assert check_output(out, if_exists="overwrite") == out
    with pytest.raises(UsageError, match="--if-exists 'nope'"):
        check_output(tmp_path / "new.parquet", if_exists="nope")


def test_an_input_is_never_an_output_even_with_overwrite(tmp_path: Path) -> None:
    scores = tmp_path / "s.parquet"
    scores.write_bytes(b"scores")
    link = tmp_path / "link.parquet"
    link.symlink_to(scores)
    for output in (scores, link, tmp_path / "sub" / ".." / "s.parquet"):
        with pytest.raises(UsageError, match="is also an input") as info:
            check_output(output, inputs=[scores], if_exists="overwrite")
        assert info.value.exit_code == EXIT_USAGE
    (tmp_path / "sub").mkdir()
    with pytest.raises(UsageError, match="is also an input"):
        check_output(tmp_path / "sub" / ".." / "s.parquet", inputs=[scores], if_exists="overwrite")
    assert scores.read_bytes() == b"scores"


def test_a_run_directory_is_not_an_input_folder(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    with pytest.raises(UsageError, match="is also an input"):
        check_output(tmp_path / "prompts", inputs=[tmp_path / "prompts"], kind="run", if_exists="resume")
    assert check_output(tmp_path / "audit", inputs=[tmp_path / "prompts"], kind="run", if_exists="resume")


def test_directory_where_a_file_is_wanted_and_file_where_a_directory_is(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        check_output(tmp_path / "d.parquet", if_exists="overwrite")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        check_output(tmp_path / "f", kind="run", if_exists="resume")


def test_unwritable_location_is_an_output_error_exit_4(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as info:
        check_output(blocker / "deeper" / "s.parquet")
    assert info.value.exit_code == EXIT_INPUT and "a-file" in str(info.value) and "not a directory" in str(info.value)
    assert not (blocker.parent / "deeper").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_directory_is_an_output_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(OutputError, match="cannot write"):
            check_output(locked / "new" / "s.parquet")
    finally:
        locked.chmod(0o700)


def test_read_only_mount_is_found_by_a_probe_even_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """access() says yes to root and on some mounts; creating a file is the real test."""
    import tempfile

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match="Read-only file system") as info:
        check_output(tmp_path / "s.parquet")
    assert info.value.exit_code == EXIT_INPUT


def test_missing_parents_are_fine_and_not_created_by_the_check(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "s.parquet"
    assert check_output(out) == out
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o007, 0o660), (0o077, 0o600)])
def test_written_files_honour_the_umask(umask: int, mode: int, tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        out = tmp_path / "sub" / "f.bin"
        atomic_write_bytes(out, lambda tmp: tmp.write_bytes(b"data"))
        atomic_write_bytes(tmp_path / "g.bin", lambda tmp: tmp.write_bytes(b"data"))
    finally:
        os.umask(old)
    assert out.read_bytes() == b"data"
    assert _mode(out) == mode and _mode(tmp_path / "g.bin") == mode
    assert not list(tmp_path.rglob(".*.tmp"))


def test_failed_write_is_an_output_error_and_leaves_nothing(tmp_path: Path) -> None:
    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left"):
        atomic_write_bytes(tmp_path / "f.bin", fail)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        atomic_write_bytes(tmp_path / "blocker" / "f.bin", lambda tmp: tmp.write_bytes(b"x"))
