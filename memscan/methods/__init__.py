"""Detection methods behind one protocol (`DetectionMethod`), selected by name."""

from __future__ import annotations

from collections.abc import Callable

from memscan.errors import UsageError
from memscan.methods.anisotropy import AnisotropyMethod
from memscan.methods.base import DetectionMethod
from memscan.models.profiles import ModelProfile

_FACTORIES: dict[str, Callable[[ModelProfile], DetectionMethod]] = {
    "anisotropy": AnisotropyMethod.from_profile,
}


def available_methods() -> list[str]:
    return sorted(_FACTORIES)


def method_for(name: str, profile: ModelProfile) -> DetectionMethod:
    """The method `name`, configured from the model profile (weights, timesteps)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None
    return factory(profile)


__all__ = ["AnisotropyMethod", "DetectionMethod", "available_methods", "method_for"]
