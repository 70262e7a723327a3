"""Detection methods behind one protocol (`DetectionMethod`), selected by name.

A method spec is `NAME` or `NAME:key=value,...` (e.g. `wen:steps=10`); the options go to the
method's factory, which configures it from the model profile.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from memscan.errors import UsageError
from memscan.methods.anisotropy import AnisotropyMethod
from memscan.methods.base import DetectionMethod
from memscan.methods.sharpness import SharpnessMethod
from memscan.methods.terms import AlignmentMethod, NormMethod
from memscan.methods.wen import WenMethod
from memscan.models.profiles import ModelProfile

_FACTORIES: dict[str, Callable[..., DetectionMethod]] = {
    "anisotropy": AnisotropyMethod.from_profile,
    "wen": WenMethod.from_profile,
    "norm": NormMethod.from_profile,
    "alignment": AlignmentMethod.from_profile,
    "sharpness": SharpnessMethod.from_profile,
}


def available_methods() -> list[str]:
    return sorted(_FACTORIES)


def _option_value(text: str) -> Any:
    """An option value as int, else float, else the string itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`wen:steps=10,guidance_scale=5` -> ("wen", {"steps": 10, "guidance_scale": 5})."""
    name, _, text = spec.strip().partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"method {spec!r}: options are key=value pairs separated by commas")
        options[key.strip()] = _option_value(value.strip())
    return name, options


def method_for(name: str, profile: ModelProfile) -> DetectionMethod:
    """The method a spec names (`NAME[:key=value,...]`), configured from the model profile."""
    method, options = parse_method_spec(name)
    try:
        factory = _FACTORIES[method]
    except KeyError:
        raise UsageError(f"unknown method {method!r}; available: {', '.join(available_methods())}") from None
    try:
        inspect.signature(factory).bind(profile, **options)
    except TypeError:
        accepted = [p for p in inspect.signature(factory).parameters if p != "profile"]
        raise UsageError(
            f"method {method!r} does not take options {sorted(options)}; it takes: {', '.join(accepted) or 'none'}"
        ) from None
    return factory(profile, **options)


__all__ = [
    "AlignmentMethod", "AnisotropyMethod", "DetectionMethod", "NormMethod", "SharpnessMethod", "WenMethod",
    "available_methods", "method_for", "parse_method_spec",
]
