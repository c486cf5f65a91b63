"""The features the dermoscopy check scores (check.py): each channel's mean and standard deviation at a few early
layers of the network, taken by forward hooks during the pass that also classifies, so checking costs no second pass.
"""

from __future__ import annotations

import numpy as np
import torch

TAP_STRIDES = (2,)  # the layers summarised: the last module whose output is half the input's side (bench_check)


def tap_names(model: torch.nn.Module, size: int, strides: tuple[int, ...] = TAP_STRIDES) -> list[str]:
    """The modules whose outputs the check summarises: for each stride, the last leaf module a forward pass runs
    whose output is that many times smaller than the `size` x `size` input (the end of that stage)."""
    calls: list[tuple[str, int]] = []
    leaves = [(name, m) for name, m in model.named_modules() if name and not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: calls.append((name, out.shape[-1]))
                                     if isinstance(out, torch.Tensor) and out.dim() == 4 else None)
             for name, m in leaves]
    try:
        param = next(model.parameters())
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device)
                  .contiguous(memory_format=torch.channels_last))
    finally:
        for h in hooks:
            h.remove()
    last = {size // width: name for name, width in calls if width and size % width == 0}
    missing = [s for s in strides if s not in last]
    if missing:
        raise ValueError(f"the network has no layer at stride {missing[0]} for a {size} px input")
    return [last[s] for s in strides]


class Taps:
    """While entered, keeps the last output of each named module; `keep()` after a pass stores each channel's mean
    and standard deviation per image, taps in order, and `collected()` gives them all: (n, 2 * channels summed)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"the network has no module {missing[0]!r} to check photos at")
        self.modules, self.names = [modules[n] for n in names], list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self.hooks: list = []
        self.kept: list[torch.Tensor] = []
        self.widths: list[int] = []  # features per tap (twice its channels), known after the first pass

    def __enter__(self) -> Taps:
        # a module called twice in one pass (a ResNet block's ReLU) keeps its last output: the block's
        self.hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: self.outputs.__setitem__(name, out))
                      for name, m in zip(self.names, self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks, self.outputs = [], {}

    def statistics(self) -> torch.Tensor:
        """The last pass's channel statistics: (n, features), float32."""
        parts = []
        for name in self.names:
            out = self.outputs[name].detach().float()
            parts += [out.mean((2, 3)), out.std((2, 3), correction=0)]
        self.widths = [2 * self.outputs[name].shape[1] for name in self.names]
        return torch.cat(parts, 1)

    def keep(self) -> None:
        """Store the last pass's channel statistics on the CPU, for `collected`."""
        self.kept.append(self.statistics().cpu())

    def collected(self) -> np.ndarray:
        """Every stored pass's statistics, in order, as one array; emptied for the next photos."""
        kept, self.kept = self.kept, []
        return torch.cat(kept).numpy() if kept else np.zeros((0, 0), dtype=np.float32)
