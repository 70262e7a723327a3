"""`memscan confirm`: labels from generations, for `memscan calibrate` on a model nobody labelled.

For each prompt, k images from independent seeds on the pipeline memscan loads (with its VAE,
DDIM); a prompt is memorized when its generations are near-duplicates of each other (Carlini
et al. 2023's extraction criterion) or of a training image. Modules: `generate` (the images),
`embedders` (pluggable image similarity: pixel, vae, a CLIP/DINO model), `decision` (the rule
and its evidence), `train_images` (folders, Parquet, npz), `sheet` (the contact sheet), `core`
(settings, `Confirmer`, single-file `confirm`), `run` (run directories).
"""

from memscan.confirm.core import Confirmer, ConfirmResult, ConfirmSettings, confirm, file_output
from memscan.confirm.decision import MEMORIZED, NOT_MEMORIZED, is_memorized, merge_distance, prompt_evidence
from memscan.confirm.embedders import DEFAULT_THRESHOLDS, Embedder, distances, make_embedder

__all__ = [
    "DEFAULT_THRESHOLDS", "MEMORIZED", "NOT_MEMORIZED", "ConfirmResult", "ConfirmSettings", "Confirmer", "Embedder",
    "confirm", "distances", "file_output", "is_memorized", "make_embedder", "merge_distance", "prompt_evidence",
    "run_confirm",
]


def __getattr__(name: str) -> object:
    if name == "run_confirm":  # the run machinery loads only when a run directory is asked for
        from memscan.confirm.run import run_confirm

        return run_confirm
    raise AttributeError(name)
