"""ByobNet family: timm's configurable ConvNets (``byobnet.py``: GerNet, RepVGG, RegNetZ, the CLIP
ResNets, ...). A ConvNet like the others, except for the pixel prompts' promise: archs whose
config downsamples with stride-2 average pooling (``aa_layer='avg'``: odd sizes break the
residual sum) or uses bottleneck attention (``attn_layer='bat'``: built for one feature size)
cannot take VPT's padded input size, so they are not listed for it (a build says why)."""
from __future__ import annotations

from . import register_family
from .convnets import ConvNets


@register_family
class ByobNet(ConvNets):
    name = "byobnet"
    modules = ("byobnet",)

    def arch_capabilities(self, arch: str) -> frozenset[str]:
        from timm.models.byobnet import model_cfgs
        cfg = model_cfgs.get(arch)
        if cfg is not None and (cfg.aa_layer == "avg" or cfg.attn_layer == "bat"):
            return self.capabilities - {"pixels"}
        return self.capabilities
