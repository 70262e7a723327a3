"""memscan: audit prompts for training-data memorization in Stable Diffusion models.

The public names are imported lazily so `memscan --help` and `import memscan.errors`
do not pay for importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DetectResult": "memscan.detect",
    "detect": "memscan.detect",
    "score_prompts": "memscan.detect",
    "DetectSettings": "memscan.config",
    "Scorer": "memscan.scorer",
    "ScoringModel": "memscan.models.loading",
    "load_model": "memscan.models.loading",
    "run_detect": "memscan.run",
    "RunOptions": "memscan.run",
    "evaluate": "memscan.evaluate",
    "mitigate": "memscan.mitigation",
    "MitigateSettings": "memscan.mitigation",
    "run_mitigate": "memscan.mitigation.run",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memscan' has no attribute {name!r}")
