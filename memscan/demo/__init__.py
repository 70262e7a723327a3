"""The bundled demo model: a toy Stable-Diffusion-format model that memorizes known prompts.

`train_demo` (memscan.demo.train) builds it, `memscan.demo.verify` proves the copying,
`memscan.demo.evaluate` measures detection; `python -m memscan.demo` runs them.
"""

from memscan.demo.train import TrainConfig, train_demo

__all__ = ["TrainConfig", "train_demo"]
