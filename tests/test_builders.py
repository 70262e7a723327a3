"""Architecture config folders and the random-weight pipeline builders."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig

from memscan.errors import ConfigError
from memscan.models.builders import (
    TINY_UNET,
    architecture_dir,
    available_architectures,
    build_random_pipeline,
    build_tiny_pipeline,
    component_config,
    count_parameters,
    ddim_scheduler,
    empty_text_encoder,
    empty_unet,
    export_architecture,
    pad_token_of,
    tiny_overrides,
)
from memscan.models.tokenizer import EOS_TOKEN, SD2_PAD_TOKEN

# Published parameter counts: SD v1 UNet 859.52 M, CLIP ViT-L/14 text tower 123.06 M,
# SD 2 UNet 865.91 M, OpenCLIP ViT-H/14 text tower without its last block 340.39 M.
SD1 = {"unet": 859_520_964, "text": 123_060_480, "prediction": "epsilon", "size": 64, "pad": EOS_TOKEN}
SD2 = {**SD1, "unet": 865_910_724, "text": 340_387_840, "prediction": "v_prediction", "size": 96}
SD2["pad"] = SD2_PAD_TOKEN
ARCHITECTURES = {"sd-v1": SD1, "sd-v2": SD2, "sd-v2-base": {**SD2, "prediction": "epsilon", "size": 64}}


def _weights(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name in ("unet", "text_encoder")
        for key, value in getattr(pipe, name).state_dict().items()
    }


def test_shipped_architectures_are_listed() -> None:
    assert set(ARCHITECTURES) <= set(available_architectures())


def test_unknown_architecture_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="unknown architecture 'sd-v9'.*sd-v1, sd-v2, sd-v2-base"):
        architecture_dir("sd-v9")
    with pytest.raises(ConfigError):
        architecture_dir("../architectures/sd-v1")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_matches_published_parameter_counts(arch: str) -> None:
    facts = ARCHITECTURES[arch]
    unet, text_encoder = empty_unet(arch), empty_text_encoder(arch)
    assert count_parameters(unet) == facts["unet"]
    assert count_parameters(text_encoder) == facts["text"]
    assert all(p.is_meta for p in [*unet.parameters(), *text_encoder.parameters()])
    assert unet.config.sample_size == facts["size"]
    assert pad_token_of(arch) == facts["pad"]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_config_folder_reads_with_the_libraries_own_loaders(arch: str) -> None:
    folder = architecture_dir(arch)
    index = StableDiffusionPipeline.load_config(folder)
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert UNet2DConditionModel.load_config(folder, subfolder="unet")["in_channels"] == 4
    vae = AutoencoderKL.load_config(folder, subfolder="vae")
    assert vae["block_out_channels"] == [128, 256, 512, 512]
    assert vae["scaling_factor"] == 0.18215
    assert vae["sample_size"] == ARCHITECTURES[arch]["size"] * 8
    assert CLIPTextConfig.from_pretrained(folder / "text_encoder").vocab_size == 49408
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.prediction_type == ARCHITECTURES[arch]["prediction"]
    tokenizer_config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] == ARCHITECTURES[arch]["pad"]


def test_ddim_schedule_is_the_one_the_profiles_assume() -> None:
    scheduler = ddim_scheduler("sd-v1")
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0] == 981 and scheduler.timesteps[-3] == 41 and scheduler.timesteps[-1] == 1
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert not scheduler.config.clip_sample and not scheduler.config.set_alpha_to_one


def test_tiny_pipeline_is_sd_shaped_and_runs() -> None:
    pipe = build_tiny_pipeline()
    assert pipe.vae is None and pipe.safety_checker is None and pipe.feature_extractor is None
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.tokenizer.pad_token == EOS_TOKEN
    assert count_parameters(pipe.unet) + count_parameters(pipe.text_encoder) < 3_000_000
    tokens = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt")
    size = TINY_UNET["sample_size"]
    with torch.no_grad():
        hidden = pipe.text_encoder(tokens.input_ids)[0]
        latents = torch.randn(2, 4, size, size)
        out = pipe.unet(latents, 500, encoder_hidden_states=hidden.repeat(2, 1, 1)).sample
    assert hidden.shape == (1, 77, 32)
    assert out.shape == (2, 4, size, size) and torch.isfinite(out).all() and out.std() > 0.01


def test_tiny_pipeline_options() -> None:
    pipe = build_tiny_pipeline(prediction_type="v_prediction", pad_token=SD2_PAD_TOKEN, with_vae=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer.pad_token == SD2_PAD_TOKEN and pipe.tokenizer.pad_token_id == 0
    assert pipe.vae_scale_factor == 8
    with torch.no_grad():
        image = pipe.vae.decode(torch.zeros(1, 4, 8, 8)).sample
    assert image.shape == (1, 3, 64, 64)
    sd2 = build_tiny_pipeline(base="sd-v2")
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.tokenizer.pad_token == SD2_PAD_TOKEN
    assert sd2.unet.config.use_linear_projection and sd2.text_encoder.config.hidden_act == "gelu"


def test_random_weights_are_seeded_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = _weights(build_tiny_pipeline(seed=5))
    assert torch.equal(torch.rand(3), expected_next)
    again = _weights(build_tiny_pipeline(seed=5))
    other = _weights(build_tiny_pipeline(seed=6))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["unet.conv_in.weight"], other["unet.conv_in.weight"])


def test_half_precision_weights_are_the_float32_ones_rounded() -> None:
    full = _weights(build_tiny_pipeline(seed=2))
    half = _weights(build_tiny_pipeline(seed=2, dtype=torch.float16))
    for key, value in full.items():
        assert half[key].dtype == (torch.float16 if value.is_floating_point() else value.dtype)
        assert torch.equal(half[key], value.to(half[key].dtype)), key


def test_random_init_follows_default_scales() -> None:
    unet = build_tiny_pipeline().unet
    weight = unet.conv_in.weight
    bound = (weight[0].numel()) ** -0.5
    assert weight.abs().max() <= bound and weight.std() > bound / 3
    assert unet.conv_in.bias.abs().max() <= bound and unet.conv_in.bias.abs().max() > 0
    norm = unet.conv_norm_out
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    assert not any(p.is_meta for p in unet.parameters())


def test_overrides_merge_and_unknown_components_are_refused() -> None:
    config = component_config("sd-v1", "unet", {"unet": {"sample_size": 8}})
    assert config["sample_size"] == 8 and config["cross_attention_dim"] == 768
    with pytest.raises(ConfigError, match="unknown components in overrides: unett"):
        build_random_pipeline("sd-v1", overrides={"unett": {}})


def test_exported_folder_builds_the_same_model(tmp_path) -> None:
    folder = export_architecture("sd-v2", tmp_path / "tiny", tiny_overrides(prediction_type="epsilon"))
    assert json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"] == [32, 64]
    assert (folder / "model_index.json").is_file()
    from_folder = build_random_pipeline(folder, seed=4)
    direct = build_tiny_pipeline(seed=4, base="sd-v2", prediction_type="epsilon")
    assert from_folder.scheduler.config.prediction_type == "epsilon"
    assert from_folder.tokenizer.pad_token == SD2_PAD_TOKEN
    expected = _weights(direct)
    assert all(torch.equal(value, expected[key]) for key, value in _weights(from_folder).items())
    with pytest.raises(ConfigError, match="not an architecture config folder"):
        build_random_pipeline(tmp_path)
