"""LoRA's layer: a low-rank update ``s·B·A`` on a Linear or 1×1 conv, and its exact merge."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.swap import AdapterModule, Swappable

__all__ = ["LoraWeights", "LoraLayer"]


class LoraWeights(AdapterModule):
    """The factors of one layer's update: ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}``, scale ``s``.

    ``B`` starts at zero (the layer computes the base function); ``A`` Kaiming-uniform as peft's
    default (or N(0, 1/r), ``init="gaussian"``).
    """

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float,
                 dropout: float = 0.0, init: str = "kaiming", device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(torch.empty(r, in_features, **dd))
        self.B = nn.Parameter(torch.zeros(out_features, r, **dd))
        self.scaling = float(scaling)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        if not self.A.is_meta:
            if init == "gaussian":
                nn.init.normal_(self.A, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` (``out × in``) in at least float32."""
        acc = torch.promote_types(self.A.dtype, torch.float32)
        return (self.B.to(acc) @ self.A.to(acc)) * self.scaling

    def add_to(self, y: torch.Tensor, x: torch.Tensor, conv: bool) -> torch.Tensor:
        """``y + s·B·A·x`` for a layer's output ``y`` and input ``x``: one small matmul down,
        and the up-projection fused with the add (``addmm``; ``s`` folded into the ``out × r``
        factor rather than applied to the ``N × out`` output)."""
        B = self.B * self.scaling if self.scaling != 1.0 else self.B
        x = self.drop(x)
        if conv:  # 1×1 conv on NCHW maps: the same products over the channel axis
            h = F.conv2d(x, self.A[:, :, None, None])
            return y + F.conv2d(h, B[:, :, None, None])
        h = F.linear(x, self.A)
        if y.dim() < 2:
            return y + F.linear(h, B)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t())
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"r={self.A.shape[0]}, scaling={self.scaling}, merged={self.merged}"


class LoraLayer(Swappable):
    """A Linear or 1×1 conv whose output gains its ``lora`` child's update (none while merged)."""

    prefix = "Lora"
    method = "lora"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        lora = self.lora
        if lora.merged:
            return y
        return lora.add_to(y, x, isinstance(self, nn.Conv2d))

    def merge_lora(self) -> None:
        """``W ← W + s·B·A``, keeping the base weight for a bit-exact :meth:`unmerge_lora`."""
        lora = self.lora
        weight = self.weight
        lora.register_buffer("base_weight", weight.detach().clone(), persistent=False)
        with torch.no_grad():
            delta = lora.delta_weight().view(weight.shape)
            weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
        lora.merged = True

    def unmerge_lora(self) -> None:
        lora = self.lora
        with torch.no_grad():
            self.weight.copy_(lora.base_weight)
        del lora.base_weight
        lora.merged = False
