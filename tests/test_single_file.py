"""Single-file (CompVis/LDM-format) checkpoints load offline into exactly the weights written."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from _tiny import clip_to_ldm, open_clip_to_ldm, pipeline_to_ldm, unet_to_ldm, write_ldm_safetensors
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from memscan.errors import ConfigError, ModelError, PickleRefusedError
from memscan.models.builders import (
    build_random_pipeline,
    count_parameters,
    empty_text_encoder,
    empty_unet,
    export_architecture,
    tiny_overrides,
)
from memscan.models.single_file import PICKLE_SUFFIXES, load_single_file, pipeline_from_ldm
from memscan.models.tokenizer import EOS_TOKEN, SD2_PAD_TOKEN

BASES = {"sd-v1": False, "sd-v2": True}  # base architecture -> OpenCLIP (SD 2.x) text encoder layout


@pytest.fixture(scope="module", params=sorted(BASES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(config folder, original pipeline, LDM safetensors file) for a tiny SD 1.x or 2.x model."""
    base = request.param
    root = tmp_path_factory.mktemp(base)
    folder = export_architecture(base, root / "arch", tiny_overrides())
    pipe = build_random_pipeline(folder, seed=7)
    path = write_ldm_safetensors(pipe, root / "model.safetensors", open_clip=BASES[base])
    return folder, pipe, path


def assert_same_weights(loaded: StableDiffusionPipeline, original: StableDiffusionPipeline) -> None:
    for name in ("unet", "text_encoder"):
        expected = getattr(original, name).state_dict()
        actual = getattr(loaded, name).state_dict()
        assert actual.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(actual[key].to(value.dtype), value), f"{name}.{key}"


def assert_one_line(error: pytest.ExceptionInfo[BaseException]) -> None:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    assert error.value.__cause__ is None


def test_loads_every_tensor_exactly(tiny) -> None:
    folder, pipe, path = tiny
    loaded = load_single_file(path, architecture=folder)
    assert_same_weights(loaded, pipe)
    assert loaded.vae is None and loaded.safety_checker is None
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.tokenizer.pad_token == pipe.tokenizer.pad_token
    assert loaded.tokenizer.pad_token == (SD2_PAD_TOKEN if "sd-v2" in str(folder) else EOS_TOKEN)
    assert not any(p.is_meta for p in [*loaded.unet.parameters(), *loaded.text_encoder.parameters()])
    ids = loaded.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids)[0], pipe.text_encoder(ids)[0])


@pytest.mark.parametrize("arch", ["sd-v1", "sd-v2", "sd-v2-base"])
def test_shipped_architectures_take_the_full_size_original_layout(arch: str) -> None:
    """Every key of a full-size LDM checkpoint finds its place (meta tensors: no memory, no I/O)."""
    unet, text_encoder = empty_unet(arch), empty_text_encoder(arch)
    text = clip_to_ldm(text_encoder) if arch == "sd-v1" else open_clip_to_ldm(text_encoder)
    pipe = pipeline_from_ldm({**unet_to_ldm(unet), **text}, architecture=arch, source=f"{arch}.safetensors")
    assert count_parameters(pipe.unet) == count_parameters(unet)
    assert count_parameters(pipe.text_encoder) == count_parameters(text_encoder)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if arch == "sd-v2" else "epsilon")


def test_dtype(tiny) -> None:
    folder, pipe, path = tiny
    loaded = load_single_file(path, architecture=folder, dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16 and loaded.text_encoder.dtype == torch.float16
    expected = pipe.unet.conv_in.weight.to(torch.float16)
    assert torch.equal(loaded.unet.conv_in.weight, expected)


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_pickle_is_refused_without_allow_pickle(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix.upper()}"  # refused before the file is even opened
    with pytest.raises(PickleRefusedError, match="--allow-pickle") as error:
        load_single_file(path, architecture="sd-v1")
    assert str(path) in str(error.value)
    assert_one_line(error)
    assert isinstance(error.value, ModelError)


def test_allow_pickle_loads_a_plain_state_dict(tiny, tmp_path: Path) -> None:
    folder, pipe, _ = tiny
    path = tmp_path / "model.ckpt"
    torch.save(pipeline_to_ldm(pipe, open_clip="sd-v2" in str(folder)), path)
    assert_same_weights(load_single_file(path, architecture=folder, allow_pickle=True), pipe)


def test_allow_pickle_loads_a_lightning_checkpoint_whose_classes_are_not_installed(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Original SD .ckpt files pickle Lightning callbacks; weights_only loading refuses them."""
    folder, pipe, _ = tiny
    lightning = types.ModuleType("fake_lightning_callbacks")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.monitor = None

    ModelCheckpoint.__module__ = lightning.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    lightning.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, lightning.__name__, lightning)
    path = tmp_path / "sd.ckpt"
    weights = pipeline_to_ldm(pipe, open_clip="sd-v2" in str(folder))
    torch.save({"state_dict": weights, "callbacks": {"cb": ModelCheckpoint()}, "global_step": 470000}, path)
    monkeypatch.delitem(sys.modules, lightning.__name__)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(path, weights_only=True)
    assert_same_weights(load_single_file(path, architecture=folder, allow_pickle=True), pipe)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist") as error:
        load_single_file(tmp_path / "absent.safetensors", architecture="sd-v1")
    assert not isinstance(error.value, PickleRefusedError)
    with pytest.raises(ModelError, match="does not exist"):
        load_single_file(tmp_path / "absent.ckpt", architecture="sd-v1", allow_pickle=True)


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.ckpt", "junk.weights"])
def test_a_file_that_is_not_a_checkpoint(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(ModelError, match="not a valid") as error:
        load_single_file(path, architecture="sd-v1", allow_pickle=True)
    assert str(path) in str(error.value)
    assert_one_line(error)


def test_a_pickle_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelError, match="not a checkpoint"):
        load_single_file(path, architecture="sd-v1", allow_pickle=True)


def test_checkpoint_without_unet_or_text_encoder(tiny, tmp_path: Path) -> None:
    folder, pipe, _ = tiny
    weights = pipeline_to_ldm(pipe, open_clip="sd-v2" in str(folder))
    no_unet, no_text = tmp_path / "no_unet.safetensors", tmp_path / "no_text.safetensors"
    save_file({k: v for k, v in weights.items() if not k.startswith("model.")}, str(no_unet))
    save_file({k: v for k, v in weights.items() if not k.startswith("cond_stage_model.")}, str(no_text))
    with pytest.raises(ModelError, match="no UNet weights") as error:
        load_single_file(no_unet, architecture=folder)
    assert_one_line(error)
    with pytest.raises(ModelError, match="no text encoder weights") as error:
        load_single_file(no_text, architecture=folder)
    assert_one_line(error)


def test_partial_checkpoint_is_refused_not_silently_random(tiny, tmp_path: Path) -> None:
    folder, pipe, _ = tiny
    weights = pipeline_to_ldm(pipe, open_clip="sd-v2" in str(folder))
    dropped = next(k for k in weights if k.startswith("model.diffusion_model.output_blocks.2."))
    del weights[dropped]
    path = tmp_path / "partial.safetensors"
    save_file(weights, str(path))
    with pytest.raises(ModelError, match="UNet weights do not fit the architecture: 1 missing") as error:
        load_single_file(path, architecture=folder)
    assert_one_line(error)


def test_wrong_architecture_is_a_one_line_error(tiny, tmp_path: Path) -> None:
    folder, _, path = tiny
    other = "sd-v1" if "sd-v2" in str(folder) else "sd-v2"
    other_folder = export_architecture(other, tmp_path / other, tiny_overrides())
    with pytest.raises(ModelError, match="do not fit the architecture") as error:
        load_single_file(path, architecture=other_folder)
    assert_one_line(error)


def test_full_size_architecture_refuses_a_tiny_checkpoint(tiny) -> None:
    _, _, path = tiny
    with pytest.raises(ModelError, match="architecture sd-v1"):
        load_single_file(path, architecture="sd-v1")


def test_unknown_architecture(tiny) -> None:
    with pytest.raises(ConfigError, match="unknown architecture"):
        load_single_file(tiny[2], architecture="sd-v7")
