"""A Runner over a PyTorch module: pipelines run on the very modules that get exported, without exporting.

Used as the PyTorch reference for pipelines and in tests; inputs are fed in the module's argument order.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from turbo_export.backends.base import TensorInfo, to_numpy


class TorchRunner:
    backend = "torch"

    def __init__(self, module: nn.Module, example_inputs: Mapping[str, torch.Tensor], output_names: Sequence[str],
                 name: str = "torch") -> None:
        self.module = module.eval()
        self.name = name
        self._inputs = [TensorInfo(k, tuple(v.shape), np.dtype(str(v.dtype).replace("torch.", "")))
                        for k, v in example_inputs.items()]
        self.output_names = list(output_names)

    @property
    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo(n, (), np.dtype("float32")) for n in self.output_names]

    def run(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(to_numpy(feed[i.name]))) for i in self._inputs]
        with torch.no_grad():
            out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().cpu().numpy() for n, o in zip(self.output_names, out)}
