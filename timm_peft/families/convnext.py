"""ConvNeXt family: timm's ``ConvNeXt`` (``convnext.py``, ConvNeXt and ConvNeXt-V2)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..layers.scale_shift import ResidualBranch, scan
from . import register_family
from .base import Family, LayerGroups, PixelInput, SsfSite

#: timm's ``ConvNeXtBlock`` without ``conv_mlp``: ``x + drop_path(γ ⊙ mlp(norm(conv_dw(x))))``,
#: the norm and MLP channels-last between two permutations, ``shortcut`` an Identity
BLOCK_BRANCH = ResidualBranch("norm", "mlp", "fc2", "drop2", "drop_path", "gamma",
                              pre="conv_dw", channels_last=True, shortcut="shortcut")


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

    def residual_branches(self, model: nn.Module) -> list[tuple[nn.Module, tuple[Any, ...]]]:
        # the classes BLOCK_BRANCH was read from; a conv MLP (conv_mlp=True) runs channels-first
        from timm.layers import GlobalResponseNormMlp, Mlp
        from timm.models.convnext import ConvNeXtBlock

        from ..layers.swap import original_class
        return [(b, (BLOCK_BRANCH,)) for stage in model.stages for b in stage.blocks
                if original_class(b) is ConvNeXtBlock and not b.use_conv_mlp
                and original_class(b.mlp) in (Mlp, GlobalResponseNormMlp)]
