"""NF-Net family: timm's normaliser-free networks (``nfnet.py``: NFNet, NF-ResNet, NF-RegNet).
They have no norm layers and standardise their convolution weights on every call
(``ScaledStdConv2d``), so no operation can take SSF's scale and shift and fold it exactly: SSF is
not promised (a build is refused with the skipped sites listed). The rest comes from timm."""
from __future__ import annotations

from torch import nn

from . import register_family
from .base import Family, PixelInput


@register_family
class NFNet(Family):
    name = "nfnet"
    modules = ("nfnet",)
    capabilities = frozenset({"layer_groups", "classifier", "pixels"})

    def pixel_input(self, model: nn.Module) -> PixelInput | None:
        return self._pretrained_pixel_input(model)
