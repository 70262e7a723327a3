"""The demo model's architecture: SD's component classes at toy size.

- VAE: diffusers `AutoencoderKL`, 3 levels (vae_scale_factor 4): 32x32 RGB <-> 4x8x8 latent, the
  SD v1 latent layout (4 channels) at a size a 2-core CPU can train. A factor-8 VAE would leave a
  4x4 latent, too coarse for a shape at a random position; 16x16 latents would cost the UNet 4x.
- Text encoder: `CLIPTextModel` with CLIP's vocabulary (49408) and 77 positions, so the real CLIP
  BPE tokenizer (data/tokenizer) feeds it; 32 wide, 2 layers (the 49408x32 token table is most of
  its 6.4 MB).
- UNet: `UNet2DConditionModel` on 4x8x8 latents, cross-attention at 8x8, 4x4 and in the middle.
- Scheduler: SD's scaled-linear betas (0.00085 to 0.012, 1000 steps), epsilon-prediction; saved as
  the DDIMScheduler SD v1 ships (steps_offset 1, set_alpha_to_one False, clip_sample False).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memscan.models.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE

BOS_ID = 49406
EOS_ID = 49407


@dataclass(frozen=True)
class ArchConfig:
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_heads: int = 2
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 32)
    latent_size: int = 8
    norm_groups: int = 16

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def image_size(self) -> int:
        return self.latent_size * 2 ** (len(self.vae_channels) - 1)


# The valid-v test model (memscan.demo.valid): the demo's UNet and VAE, a deeper text encoder.
VALID = ArchConfig(text_layers=3, text_heads=2)

TINY = ArchConfig(unet_channels=(16, 32, 32), unet_heads=2, text_width=16, text_layers=1, text_heads=2,
                  vae_channels=(8, 16, 16), norm_groups=8)


def build_vae(arch: ArchConfig):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(arch.vae_channels), layers_per_block=1, latent_channels=4,
        norm_num_groups=arch.norm_groups, sample_size=arch.image_size,
    )


def build_text_encoder(arch: ArchConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=arch.text_width, intermediate_size=4 * arch.text_width,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    )
    return CLIPTextModel(config)


def build_unet(arch: ArchConfig):
    from diffusers import UNet2DConditionModel

    n = len(arch.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=arch.latent_size, in_channels=4, out_channels=4,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(arch.unet_channels),
        layers_per_block=1, cross_attention_dim=arch.text_width, attention_head_dim=arch.unet_heads,
        norm_num_groups=arch.norm_groups,
    )


def scheduler_kwargs(prediction_type: str = "epsilon") -> dict:
    """SD's noise schedule and DDIM settings (SD v1: epsilon; SD 2 ships the same with v_prediction)."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def build_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_kwargs(prediction_type))


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
