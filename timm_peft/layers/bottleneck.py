"""Bottleneck adapters: ``up(act(down(x)))`` modules and the two ways blocks run them.

* :class:`Bottleneck`: down-projection ``d → d'``, non-linearity, dropout, up-projection
  ``d' → d``, times a scale ``s``. The up-projection starts at zero, so a fresh bottleneck outputs
  zeros and whatever adds it computes exactly the base function.
* :class:`SequentialAdapter` (Adapter, Houlsby et al. 2019; Pfeiffer et al. 2020): a module's
  output ``y`` becomes ``y + bottleneck(y)``.
* :class:`ParallelAdapter` (AdaptFormer, Chen et al. 2022): a module's output becomes
  ``module(x) + bottleneck(x)``, the bottleneck reading the module's input.

Both are class swaps (:func:`~timm_peft.layers.swap_class`) of a width-preserving module (a
block's MLP or attention); the bottleneck is the module's child ``adapter`` (``adaptformer``),
so the base's state-dict keys do not change.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from timm_peft.layers import swap_class
    >>> mlp = nn.Linear(8, 8); mlp.adapter = Bottleneck(8, 2)
    >>> swap_class(mlp, SequentialAdapter)
    >>> x = torch.randn(3, 8); bool((mlp(x) == nn.functional.linear(x, mlp.weight, mlp.bias)).all())
    True
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .swap import AdapterModule, Swappable

__all__ = ["Bottleneck", "SequentialAdapter", "ParallelAdapter", "ACTIVATIONS"]

#: the non-linearities a bottleneck may use (by name: configs are JSON)
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class Bottleneck(AdapterModule):
    """``s · up(dropout(act(down(x))))`` over the channels at ``channel_axis``.

    ``down`` is initialised as torch initialises a Linear (Kaiming-uniform, as LoRA's and
    AdaptFormer's ``lora`` init), ``up`` and both biases at zero: a fresh bottleneck outputs 0.
    """

    def __init__(self, dim: int, hidden: int, act: str = "relu", dropout: float = 0.0,
                 scale: float = 1.0, channel_axis: int = -1,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; allowed: {sorted(ACTIVATIONS)}")
        dd = dict(device=device, dtype=dtype)
        self.down = nn.Linear(dim, hidden, **dd)
        self.up = nn.Linear(hidden, dim, **dd)
        self.act_name, self.scale, self.channel_axis = act, float(scale), channel_axis
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.down.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_axis != -1:
            x = x.movedim(self.channel_axis, -1)
        h = self.drop(ACTIVATIONS[self.act_name](self.down(x)))
        up_w, up_b = self.up.weight, self.up.bias
        if self.scale != 1.0:  # fold s into the (d × d') up-projection, not the (N × d) output
            up_w, up_b = up_w * self.scale, up_b * self.scale
        out = F.linear(h, up_w, up_b)
        return out.movedim(-1, self.channel_axis) if self.channel_axis != -1 else out

    def extra_repr(self) -> str:
        return f"act={self.act_name}, scale={self.scale}, channel_axis={self.channel_axis}"


class SequentialAdapter(Swappable):
    """A module whose output ``y`` becomes ``y + adapter(y)`` (its ``adapter`` child)."""

    prefix = "Adapter"
    method = "adapter"
    #: the module's output is not its own computation's (SSF's residual fusion checks this)
    wraps_output = True

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = super().forward(*args, **kwargs)
        return y + self.adapter(y)


class ParallelAdapter(Swappable):
    """A module whose output becomes ``module(x) + adaptformer(x)`` (its ``adaptformer`` child
    reads the same input)."""

    prefix = "AdaptFormer"
    method = "adaptformer"
    wraps_output = True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(x, *args, **kwargs) + self.adaptformer(x)
