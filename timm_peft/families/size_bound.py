"""ConvNets that take only inputs whose size is a multiple of a stride: DLA (``dla.py``, its
aggregation nodes add upsampled maps to skip maps), HRNet (``hrnet.py``, its fusion layers
likewise) and TResNet (``tresnet.py``, a space-to-depth stem). VPT's pixel border adds
``2·pad_size`` to the input, so pixel prompts are not promised for them (not listed): a build
whose padded size fits (e.g. ``pad_size=16`` at 224 px) works, any other is refused at build
time. Everything else is answered by timm, as for :mod:`.convnets`."""
from __future__ import annotations

from torch import nn

from . import register_family
from .base import Family, PixelInput


@register_family
class SizeBoundConvNets(Family):
    name = "size_bound_convnets"
    modules = ("dla", "hrnet", "tresnet")
    capabilities = frozenset({"layer_groups", "ssf", "classifier"})

    def pixel_input(self, model: nn.Module) -> PixelInput | None:
        return self._pretrained_pixel_input(model)
