"""Shared fixtures: tiny random SD pipelines (epsilon and v-prediction) with fixed seeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memscan.models.builders import build_tiny_pipeline
from memscan.models.loading import ScoringModel, scoring_model_from_pipeline
from memscan.models.profiles import ModelProfile

torch.set_num_threads(1)


def strengthen_text_conditioning(unet: torch.nn.Module, factor: float = 10.0) -> None:
    """Scale the cross-attention outputs of a random UNet so the prompt matters as in a
    trained model; at random init the guidance vector is so small that fp32 rounding alone
    moves its per-pixel cosine by 1e-5, which would hide real errors in the comparisons."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(factor)


def tiny_scoring_model(prediction_type: str = "epsilon", *, seed: int = 0, **profile: object) -> ScoringModel:
    """A tiny random pipeline wrapped for scoring, at its native latent size."""
    pipeline = build_tiny_pipeline(seed=seed, prediction_type=prediction_type)
    strengthen_text_conditioning(pipeline.unet)
    resolution = int(pipeline.unet.config.sample_size) * 8
    fields = {"w_norm": 1.0, "w_align": 2.0, **profile}
    base = ModelProfile(name="tiny", source="tiny", prediction_type=prediction_type, resolution=resolution)
    return scoring_model_from_pipeline(pipeline, base.with_overrides(**fields))


@pytest.fixture(scope="session")
def tiny_model() -> ScoringModel:
    return tiny_scoring_model("epsilon")


@pytest.fixture(scope="session")
def tiny_v_model() -> ScoringModel:
    return tiny_scoring_model("v_prediction", seed=1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny epsilon pipeline saved as a diffusers folder (what `--model DIR` loads)."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def prompts_csv(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_text(
        "id,prompt\n"
        "a,a photo of a cat\n"
        "b,a red square on a blue background\n"
        "c,\n"
        "d,a photo of a cat\n"
        "e,the mona lisa by leonardo da vinci\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="session")
def tiny_vae_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny epsilon pipeline WITH its VAE saved as a diffusers folder (for generating commands)."""
    folder = tmp_path_factory.mktemp("tiny-sd-vae")
    pipeline = build_tiny_pipeline(seed=0, with_vae=True)
    strengthen_text_conditioning(pipeline.unet)
    pipeline.save_pretrained(folder)
    return folder


_CLI_WITHOUT = """
import sys
sys.modules[sys.argv[1]] = None  # as if the optional package were not installed
from memscan.cli import main
sys.argv = ["memscan", *sys.argv[2:]]
main()
"""


def run_cli_without(package: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`memscan ARGS` in a fresh interpreter where importing `package` fails (a missing extra)."""
    return subprocess.run([sys.executable, "-c", _CLI_WITHOUT, package, *args], capture_output=True, text=True,
                          timeout=300)
