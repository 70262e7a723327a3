"""memscan's exception tree; every error a user can cause maps to one documented exit code.

    MemscanError                      exit 1  (internal; the base never escapes on purpose)
    ├── UsageError                    exit 2  bad flag value, unknown option combination
    │   ├── ConfigError               exit 2  bad profile / config file / setting
    │   ├── OutputRefusedError        exit 2  output exists (no --if-exists overwrite) or is an input
    │   ├── ModelError                exit 2  unknown model, unloadable or refused checkpoint
    │   │   ├── PickleRefusedError    exit 2  .ckpt/.bin without --allow-pickle
    │   │   └── ModelNotCachedError   exit 2  hub model not cached while offline
    │   └── FingerprintMismatchError  exit 2  resume with different settings
    ├── InputError                    exit 4  missing file or column, undecodable, no prompts
    ├── OutputError                   exit 4  the output location cannot be written (checked before the work)
    ├── PartialRunError               exit 3  some shards failed; a rerun resumes
    └── FlaggedPromptsError           exit 10 done, prompts flagged (only with --fail-on-flagged)

Interrupted runs exit 130 (KeyboardInterrupt is not wrapped).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INPUT = 4
EXIT_FLAGGED = 10
EXIT_INTERRUPTED = 130


def one_line(exc: BaseException, *, with_type: bool = False, limit: int | None = None) -> str:
    """An exception's message on one line (whitespace folded), for error rows and one-line errors;
    the type name stands in for an empty message; longer than `limit` ends in '...'."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if with_type else (text or type(exc).__name__)
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


class MemscanError(Exception):
    """Base of every error memscan raises on purpose; `exit_code` is what the CLI returns."""

    exit_code: int = EXIT_INTERNAL


class UsageError(MemscanError):
    """A flag or setting the user gave cannot work."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A profile, config file or setting is malformed or inconsistent."""


class ModelError(UsageError):
    """The model spec cannot be resolved or loaded."""


class PickleRefusedError(ModelError):
    """A pickle checkpoint (.ckpt, .bin) was given without --allow-pickle."""


class ModelNotCachedError(ModelError):
    """A hub model is not in the local cache and the hub cannot be reached."""


class OutputRefusedError(UsageError):
    """An output would replace a file the user did not ask to replace, or one of the inputs."""


class FingerprintMismatchError(UsageError):
    """An existing run directory was made with different settings."""


class InputError(MemscanError):
    """The prompt input is missing, unreadable or holds no usable column."""

    exit_code = EXIT_INPUT


class OutputError(MemscanError):
    """The output cannot be written there: no permission, a file where a folder should be, disk full."""

    exit_code = EXIT_INPUT


class PartialRunError(MemscanError):
    """The run finished but some shards failed; rerunning resumes them."""

    exit_code = EXIT_PARTIAL


class FlaggedPromptsError(MemscanError):
    """The run finished and flagged prompts while --fail-on-flagged was set."""

    exit_code = EXIT_FLAGGED
