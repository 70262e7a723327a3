"""memscan: audit prompts for training-data memorization in Stable Diffusion models.

Scoring
    load_model(spec) -> ScoringModel       a profile name ("demo", "sd-v1-4"), a diffusers folder,
                                           a .safetensors file or a hub id, loaded once
    score_prompts(prompts, model)          a DataFrame: norm, alignment, score per prompt
    detect(input, output, DetectSettings(...)) -> DetectResult
                                           score a prompt file into a Parquet file
    run_detect(input, out_dir, DetectSettings(...)) -> RunOutcome
                                           the same as a sharded, resumable run directory
Evaluating
    evaluate(labels, scores) -> Evaluation          ROC AUC and TPR at target FPRs
    evaluate_files(paths, labels_path)              `memscan evaluate`
    calibrate_scores(scores, output) -> (ModelProfile, Calibration)
    run_bench(model) -> (suite, [BenchResult])      the public benchmark, every method
Rewriting
    mitigate(input, output, MitigateSettings(...)) -> MitigateResult
    run_mitigate(input, out_dir, MitigateSettings(...)) -> RunOutcome
Guarding generation
    Guard(pipe, profile, threshold, policy)(prompt=[...]) -> GuardResult
                                           score a diffusers pipeline's prompts on the call's own
                                           noise and warn, block, reseed, optimize or rewrite

The names load on first use, so `import memscan` and `memscan --help` do not import torch.
`memscan.detect` and `memscan.evaluate` are always the functions, although modules of the same
names exist: reach those with `from memscan.detect import ...` / `from memscan.evaluate import ...`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from memscan.errors import ConfigError, InputError, MemscanError, ModelError, UsageError

__version__ = "0.1.0"  # the one version: pyproject.toml reads it ([tool.hatch.version])

_EXPORTS = {
    # scoring
    "load_model": "memscan.models.loading",
    "ScoringModel": "memscan.models.loading",
    "ModelProfile": "memscan.models.profiles",
    "score_prompts": "memscan.detect",
    "detect": "memscan.detect",
    "DetectResult": "memscan.detect",
    "DetectSettings": "memscan.config",
    "Scorer": "memscan.scorer",
    "run_detect": "memscan.run",
    "RunOptions": "memscan.run",
    "RunOutcome": "memscan.run",
    # evaluating
    "evaluate": "memscan.evaluate",
    "evaluate_files": "memscan.evaluate",
    "calibrate_scores": "memscan.evaluate",
    "Evaluation": "memscan.evaluate",
    "OperatingPoint": "memscan.evaluate",
    "Calibration": "memscan.evaluate",
    "run_bench": "memscan.bench",
    "BenchResult": "memscan.bench",
    # rewriting
    "mitigate": "memscan.mitigation",
    "MitigateSettings": "memscan.mitigation",
    "MitigateResult": "memscan.mitigation",
    "run_mitigate": "memscan.mitigation.run",
    # guarding generation
    "Guard": "memscan.guard",
    "GuardResult": "memscan.guard",
}

__all__ = [  # _EXPORTS' names, written out so linters and type checkers read them
    "__version__",
    "load_model", "ScoringModel", "ModelProfile", "score_prompts", "detect", "DetectResult", "DetectSettings",
    "Scorer", "run_detect", "RunOptions", "RunOutcome",
    "evaluate", "evaluate_files", "calibrate_scores", "Evaluation", "OperatingPoint", "Calibration", "run_bench",
    "BenchResult",
    "mitigate", "MitigateSettings", "MitigateResult", "run_mitigate",
    "Guard", "GuardResult",
    "MemscanError", "UsageError", "ConfigError", "ModelError", "InputError",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on first use
    from memscan.bench import BenchResult, run_bench
    from memscan.config import DetectSettings
    from memscan.detect import DetectResult, detect, score_prompts
    from memscan.evaluate import Calibration, Evaluation, OperatingPoint, calibrate_scores, evaluate, evaluate_files
    from memscan.guard import Guard, GuardResult
    from memscan.mitigation import MitigateResult, MitigateSettings, mitigate
    from memscan.mitigation.run import run_mitigate
    from memscan.models.loading import ScoringModel, load_model
    from memscan.models.profiles import ModelProfile
    from memscan.run import RunOptions, RunOutcome, run_detect
    from memscan.scorer import Scorer


def __getattr__(name: str) -> Any:
    """Import a public name on first use, and keep it."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'memscan' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """memscan's module type: a submodule named like a public function never hides the function.

    After loading `memscan.detect` the import system sets it as the attribute `detect` of
    `memscan`, where it would shadow the lazily imported function `detect` (and `memscan.evaluate`
    the same); this binding alone is skipped. `sys.modules["memscan.detect"]` keeps the module.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
