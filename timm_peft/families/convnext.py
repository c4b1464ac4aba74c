"""ConvNeXt family: timm's ``ConvNeXt`` (``convnext.py``, ConvNeXt and ConvNeXt-V2)."""
from __future__ import annotations

from torch import nn

from ..layers.scale_shift import scan
from . import register_family
from .base import Family, LayerGroups, PixelInput, SsfSite


@register_family
class ConvNeXt(Family):
    name = "convnext"
    modules = ("convnext",)
    capabilities = frozenset({"layer_groups", "ssf", "classifier", "pixels", "block_mlp"})

    def matches(self, model: nn.Module) -> bool:
        from timm.models.convnext import ConvNeXt as TimmConvNeXt
        return isinstance(model, TimmConvNeXt)

    def layer_groups(self, model: nn.Module) -> LayerGroups:
        return LayerGroups([[b] for stage in model.stages for b in stage.blocks],
                           self.final_norms(model))

    def final_norms(self, model: nn.Module) -> list[nn.Module]:
        return list(self.submodules(model, ("norm", "fc_norm", "head_norm")))

    def pixel_input(self, model: nn.Module) -> PixelInput | None:
        return self._pretrained_pixel_input(model)

    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        return list(scan(model, ("stem", "stages", "norm_pre", "head.norm"), skip_unfoldable=True))
