"""Device and dtype resolution (`auto` means the reference setup: bf16 on CUDA, fp32 on CPU), and
the UNet speed options: channels_last and `torch.compile`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from memscan.errors import UsageError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # torch's names, as run facts write them


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be available."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device {spec!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA (as the reference code runs) and fp32 elsewhere."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = _ALIASES.get(spec, spec)
    if spec not in _DTYPES:
        raise UsageError(f"--dtype {spec!r}: use auto, fp32, fp16 or bf16")
    return _DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def on_cuda_by_default(flag: bool | None, device: torch.device) -> bool:
    """A speed option's value: as given, or (None) on CUDA only."""
    return device.type == "cuda" if flag is None else flag


def uses_channels_last(module: torch.nn.Module) -> bool:
    """Whether the module's first 4-d weight (a convolution's) is stored channels_last."""
    for param in module.parameters():
        if param.dim() == 4:
            return param.is_contiguous(memory_format=torch.channels_last) and not param.is_contiguous()
    return False


def set_channels_last(module: torch.nn.Module, on: bool) -> None:
    """Store the 4-d weights channels_last (on) or contiguous (off); a no-op when already so."""
    if uses_channels_last(module) != on:
        module.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def is_compiled(unet: torch.nn.Module) -> bool:
    """Whether `compile_unet` replaced the UNet's forward."""
    return "forward" in vars(unet)


def compile_unet(unet: torch.nn.Module, *, mode: str | None = None, backend: str = "inductor") -> None:
    """`torch.compile` the UNet's forward in place, with static shapes (the Scorer pads its last
    batch to the batch size and runs its one-off shared pass eagerly, so a run compiles one shape).

    Only the forward is compiled: forward hooks stay eager, and `uncompile_unet` undoes it."""
    if not is_compiled(unet):
        unet.forward = torch.compile(unet.forward, dynamic=False, mode=mode, backend=backend)


def uncompile_unet(unet: torch.nn.Module) -> None:
    """Back to the eager forward (a no-op when not compiled)."""
    vars(unet).pop("forward", None)


@contextmanager
def eager_forward(unet: torch.nn.Module) -> Iterator[None]:
    """The eager forward for a while (a memory probe at other shapes must not recompile)."""
    compiled = vars(unet).pop("forward", None)
    try:
        yield
    finally:
        if compiled is not None:
            unet.forward = compiled
