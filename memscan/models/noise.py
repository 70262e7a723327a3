"""The shared noise bank: every prompt is scored on the same initial latents x_T.

Convention (documented in the README): `torch.randn((n, C, h, w),
generator=torch.Generator("cpu").manual_seed(seed))` in float32, then moved to the device
and dtype. Drawing on the CPU makes the bank identical on every machine and device.
"""

from __future__ import annotations

import torch


def noise_bank(
    n: int,
    latent_shape: tuple[int, int, int],
    seed: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`n` initial latents of `latent_shape`, reproducible from `seed` alone."""
    if n < 1:
        raise ValueError("the noise bank needs at least one sample")
    generator = torch.Generator("cpu").manual_seed(seed)
    bank = torch.randn((n, *latent_shape), generator=generator, dtype=torch.float32)
    return bank.to(device=device, dtype=dtype)
