"""Swin family: timm's ``SwinTransformer`` (``swin_transformer.py``): local windows, stages."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..layers.scale_shift import ResidualBranch, scan
from . import register_family
from .base import Family, LayerGroups, SsfSite, WindowLayer

#: timm's ``SwinTransformerBlock``: ``x + drop_path1(_attn(norm1(x)))`` (windows reversed after
#: ``attn.proj``, so that add stays), then ``x + drop_path2(mlp(norm2(x)))`` on the same tokens
#: (timm flattens H, W around it; the norm and MLP act per token either way)
BLOCK_BRANCHES = (ResidualBranch("norm1", "_attn", None, None, "drop_path1"),
                  ResidualBranch("norm2", "mlp", "fc2", "drop2", "drop_path2"))


@register_family
class Swin(Family):
    name = "swin"
    modules = ("swin_transformer",)
    capabilities = frozenset({"layer_groups", "ssf", "classifier", "windows"})

    def matches(self, model: nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer
        return isinstance(model, SwinTransformer)

    def layer_groups(self, model: nn.Module) -> LayerGroups:
        return LayerGroups([[b] for stage in model.layers for b in stage.blocks],
                           self.final_norms(model))

    def final_norms(self, model: nn.Module) -> list[nn.Module]:
        return list(self.submodules(model, ("norm", "fc_norm", "head_norm")))

    def window_attention(self, model: nn.Module) -> list[list[WindowLayer]]:
        return [[WindowLayer(b.norm1, b.attn, b.dim) for b in stage.blocks]
                for stage in model.layers]

    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        # patch merging's reduction is bias-free and followed by nothing SSF could not reach
        # through the next block's norm: the paper's sites leave it out
        return list(scan(model, ("patch_embed", "layers", "norm"),
                         keep=lambda name, op: not name.endswith("downsample.reduction"),
                         skip_unfoldable=True))

    def residual_branches(self, model: nn.Module) -> list[tuple[nn.Module, tuple[Any, ...]]]:
        from timm.layers import Mlp
        from timm.models.swin_transformer import SwinTransformerBlock

        from ..layers.swap import original_class
        return [(b, BLOCK_BRANCHES) for stage in model.layers for b in stage.blocks
                if original_class(b) is SwinTransformerBlock and original_class(b.mlp) is Mlp]
