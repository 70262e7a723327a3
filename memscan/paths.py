"""Where memscan finds its shipped files (tokenizer, profiles, demo model).

An installed wheel carries them inside the package (`memscan/_data`, `memscan/_configs`);
a source checkout keeps them at the repository root (`data/`, `configs/`). The environment
variables MEMSCAN_DATA_DIR and MEMSCAN_CONFIG_DIR override both.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_REPO = _PACKAGE.parent


def _first_existing(env: str, *candidates: Path) -> Path:
    override = os.environ.get(env)
    if override:
        return Path(override)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[-1]


def data_dir() -> Path:
    """Folder holding `tokenizer/` and `demo/`."""
    return _first_existing("MEMSCAN_DATA_DIR", _PACKAGE / "_data", _REPO / "data")


def config_dir() -> Path:
    """Folder holding the model profiles (`*.toml`) and architecture configs."""
    return _first_existing("MEMSCAN_CONFIG_DIR", _PACKAGE / "_configs", _REPO / "configs")


def tokenizer_dir() -> Path:
    """The shipped CLIP BPE tokenizer (vocab.json, merges.txt), identical to SD v1.x's."""
    return data_dir() / "tokenizer"


def demo_dir() -> Path:
    """The bundled demo model and its labelled prompts."""
    return data_dir() / "demo"
