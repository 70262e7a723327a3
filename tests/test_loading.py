"""Resolving `--model`: local folders, hub ids offline, refusals, devices and dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memscan.errors import ModelError, ModelNotCachedError, PickleRefusedError, UsageError
from memscan.models.builders import build_tiny_pipeline
from memscan.models.device import resolve_device, resolve_dtype
from memscan.models.loading import load_model
from memscan.models.profiles import ModelProfile


def test_local_folder_loads_without_vae(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), device="cpu")
    assert model.pipeline.vae is None and model.pipeline.safety_checker is None
    assert model.profile.name == "custom" and model.profile.prediction_type == "epsilon"
    assert model.profile.resolution == model.unet.config.sample_size * 8
    assert model.latent_shape == (4, model.unet.config.sample_size, model.unet.config.sample_size)
    assert type(model.scheduler).__name__ == "DDIMScheduler"
    assert model.tokenizer.pad_token == "<|endoftext|>"
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_v_prediction_folder_gets_v_defaults_and_its_own_tokenizer(tmp_path: Path) -> None:
    build_tiny_pipeline(seed=0, prediction_type="v_prediction", pad_token="!").save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    assert model.profile.prediction_type == "v_prediction"
    assert (model.profile.w_norm, model.profile.w_align) == (1.0, 0.1)
    assert model.tokenizer.pad_token == "!" and model.tokenizer.pad_token_id == 0


def test_overrides_and_vae_on_request(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), device="cpu", profile_overrides={"threshold": 3.0, "w_align": None})
    assert model.profile.threshold == 3.0 and model.profile.w_align == 2.0


def test_hub_model_not_cached_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotCachedError) as info:
        load_model("sd-v1-4", device="cpu")
    message = str(info.value)
    assert "CompVis/stable-diffusion-v1-4" in message and "local" in message and "\n" not in message


def test_refusals(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle")
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        load_model(str(ckpt))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        load_model(str(tmp_path / "folder"))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "gone.safetensors"))
    with pytest.raises(ModelError, match="unknown model"):
        load_model("not-a-profile")


def test_profile_object_is_accepted(tiny_model_dir: Path) -> None:
    profile = ModelProfile(name="mine", source=str(tiny_model_dir), resolution=64, w_norm=3.0)
    model = load_model(profile, device="cpu")
    assert model.profile.name == "mine" and model.profile.w_norm == 3.0


def test_device_and_dtype_resolution() -> None:
    cpu = resolve_device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == torch.float16
    with pytest.raises(UsageError):
        resolve_dtype("fp8", cpu)
    with pytest.raises(UsageError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            resolve_device("cuda:0")
