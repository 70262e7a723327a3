"""The bundled demo model: a toy Stable-Diffusion-format model that memorizes known prompts.

`train_demo` (memscan.demo.train) builds it, `memscan.demo.verify` proves the copying,
`memscan.demo.evaluate` measures detection; `memscan demo ...` (memscan.demo.cli) runs them.
The exports load lazily: importing the package (as `memscan --help` does) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memscan.demo.train import TrainConfig, train_demo

__all__ = ["TrainConfig", "train_demo"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from memscan.demo import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
