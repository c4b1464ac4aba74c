"""Swin-V2 family: timm's ``SwinTransformerV2`` (``swin_transformer_v2.py``, Liu et al., "Swin
Transformer V2", CVPR 2022). Its window attention (cosine attention, continuous position bias)
calls ``F.linear`` on ``qkv.weight`` with separate q/v biases, so SSF reports ``qkv`` as skipped
and follows ``proj`` (and skips the position-bias MLP, which reads coordinates); blocks and norms come from timm's ``group_matcher``."""
from __future__ import annotations

from torch import nn

from . import register_family
from .base import Family, SsfSite, report_functional_qkv


@register_family
class SwinV2(Family):
    name = "swinv2"
    modules = ("swin_transformer_v2",)
    capabilities = frozenset({"layer_groups", "ssf", "classifier"})

    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        sites = report_functional_qkv(model, super().ssf_sites(model))
        for site in sites:
            if ".cpb_mlp." in site.name and site.reason is None:
                # its input is a table of relative coordinates, not the image's features (and an
                # in-place ReLU follows its first Linear)
                site.reason = ("the continuous position-bias MLP reads relative coordinates, not "
                               "features: SSF modulates feature operations only")
        return sites
