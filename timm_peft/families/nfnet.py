"""NF-Net family: timm's normaliser-free networks (``nfnet.py``: NFNet, NF-ResNet, NF-RegNet).
They have no norm layers and standardise their convolution weights on every call
(``ScaledStdConv2d``), so SSF can follow and fold into only the plain convolutions of their
channel attention (squeeze-excitation or ECA, ``attn_layer`` in timm's ``model_cfgs``): SSF is
promised for the archs that have one (e.g. NF-RegNet, NFNet-F, ECA-NFNet) and not for the others
(NF-ResNet-26/50/101: a build is refused with the skipped sites listed). The rest comes from
timm."""
from __future__ import annotations

from torch import nn

from . import register_family
from .base import Family, PixelInput


@register_family
class NFNet(Family):
    name = "nfnet"
    modules = ("nfnet",)
    capabilities = frozenset({"layer_groups", "ssf", "classifier", "pixels"})

    def arch_capabilities(self, arch: str) -> frozenset[str]:
        """``ssf`` only where timm's config gives the blocks a channel attention."""
        from timm.models.nfnet import model_cfgs
        cfg = model_cfgs.get(arch)
        if cfg is None or not cfg.attn_layer:
            return self.capabilities - {"ssf"}
        return self.capabilities

    def pixel_input(self, model: nn.Module) -> PixelInput | None:
        return self._pretrained_pixel_input(model)
