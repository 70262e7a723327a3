"""Where memscan finds its shipped files (tokenizer, profiles, demo model, benchmark lists).

A source checkout keeps them at the repository root (`data/`, `configs/`); an installed wheel
carries the same two folders inside the package (`memscan/data`, `memscan/configs`). Both layouts
put `configs/` next to `data/`, so a profile's relative path (the demo's `../data/demo/model`)
means the same in each. The environment variables MEMSCAN_DATA_DIR and MEMSCAN_CONFIG_DIR
override both.
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
    """Folder holding `tokenizer/`, `demo/` and `benchmark/`."""
    return _first_existing("MEMSCAN_DATA_DIR", _PACKAGE / "data", _REPO / "data")


def config_dir() -> Path:
    """Folder holding the model profiles (`*.toml`) and architecture configs."""
    return _first_existing("MEMSCAN_CONFIG_DIR", _PACKAGE / "configs", _REPO / "configs")


def tokenizer_dir() -> Path:
    """The shipped CLIP BPE tokenizer (vocab.json, merges.txt), identical to SD v1.x's."""
    return data_dir() / "tokenizer"


def demo_dir() -> Path:
    """The bundled demo model and its labelled prompts."""
    return data_dir() / "demo"


def demo_model_dir() -> Path:
    """The bundled demo model folder (what the `demo` profile's source names)."""
    return demo_dir() / "model"
