"""Test helpers: write a diffusers-format pipeline back as an original (CompVis/LDM) checkpoint.

The key mapping is the inverse of diffusers' `convert_ldm_unet_checkpoint`,
`convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint`, written independently so that
loading a checkpoint made here checks memscan's single-file loader end to end.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# diffusers ResnetBlock2D name -> LDM ResBlock name
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# diffusers CLIPEncoderLayer name -> OpenCLIP ResidualAttentionBlock name
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _resnet(rest: str) -> str:
    name, _, param = rest.partition(".")
    return f"{_RESNET[name]}.{param}"


def _slot(kind: str, rest: str) -> str:
    """Inside an LDM level block, the ResBlock is module 0 and the SpatialTransformer module 1."""
    return f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"


def _unet_key(key: str, layers_per_block: int, attention_blocks: set[int]) -> str:
    """One diffusers UNet2DConditionModel key in LDM's `model.diffusion_model.` layout."""
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    per_level = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_level + layer
        return f"input_blocks.{index}.{_slot(kind, rest)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, layer, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * layer}.{_resnet(rest)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_level + layer
        return f"output_blocks.{index}.{_slot(kind, rest)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if block in attention_blocks else 1
        return f"output_blocks.{block * per_level + layers_per_block}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's state dict under LDM names (`model.diffusion_model.input_blocks.1.0...`)."""
    config: Any = unet.config
    attention_blocks = {i for i, t in enumerate(config.up_block_types) if "CrossAttn" in t}
    return {
        "model.diffusion_model." + _unet_key(key, config.layers_per_block, attention_blocks): value
        for key, value in unet.state_dict().items()
    }


def _text_state_dict(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict without the `text_model.` level (transformers 4 has it, 5.6+ not)."""
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def clip_to_ldm(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """SD 1.x layout: HF CLIP names under `cond_stage_model.transformer.text_model.`."""
    prefix = "cond_stage_model.transformer.text_model."
    out = {prefix + k: v for k, v in _text_state_dict(text_encoder).items()}
    out[prefix + "embeddings.position_ids"] = torch.arange(text_encoder.config.max_position_embeddings)[None]
    return out


def open_clip_to_ldm(text_encoder: torch.nn.Module, *, extra_layer_seed: int = 1) -> dict[str, torch.Tensor]:
    """SD 2.x layout: OpenCLIP names under `cond_stage_model.model.`, q/k/v fused into in_proj.

    Like the real SD 2 checkpoints it holds one more transformer block than the text encoder uses
    (SD 2 takes the penultimate layer), plus text_projection and logit_scale.
    """
    source = _text_state_dict(text_encoder)
    prefix = "cond_stage_model.model."
    out = {prefix + new: source[old] for old, new in _OPEN_CLIP_TOP.items()}
    n_layers = text_encoder.config.num_hidden_layers
    for i in range(n_layers):
        layer = f"encoder.layers.{i}."
        block = f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            qkv = [source[f"{layer}self_attn.{p}_proj.{part}"] for p in "qkv"]
            out[f"{block}attn.in_proj_{part}"] = torch.cat(qkv)
        for old, new in _OPEN_CLIP_LAYER.items():
            for part in ("weight", "bias"):
                out[f"{block}{new}.{part}"] = source[f"{layer}{old}.{part}"]
    generator = torch.Generator().manual_seed(extra_layer_seed)
    last = f"{prefix}transformer.resblocks.{n_layers - 1}."
    for key in [k for k in out if k.startswith(last)]:
        extra = f"{prefix}transformer.resblocks.{n_layers}." + key[len(last) :]
        out[extra] = torch.randn(out[key].shape, generator=generator)
    projection = (text_encoder.config.hidden_size, text_encoder.config.projection_dim)
    out[prefix + "text_projection"] = torch.randn(projection, generator=generator)
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def pipeline_to_ldm(pipe: Any, *, open_clip: bool = False) -> dict[str, torch.Tensor]:
    """UNet + text encoder of a diffusers pipeline as one LDM state dict, with a stray VAE key."""
    text = open_clip_to_ldm(pipe.text_encoder) if open_clip else clip_to_ldm(pipe.text_encoder)
    state = {**unet_to_ldm(pipe.unet), **text}
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def write_ldm_safetensors(pipe: Any, path: Path, *, open_clip: bool = False) -> Path:
    """Save `pipeline_to_ldm(pipe)` as one .safetensors file."""
    save_file(pipeline_to_ldm(pipe, open_clip=open_clip), str(path))
    return path
