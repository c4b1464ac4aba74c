"""Swin-V2 family: timm's ``SwinTransformerV2`` (``swin_transformer_v2.py``, Liu et al., "Swin
Transformer V2", CVPR 2022). Its window attention (cosine attention, continuous position bias)
calls ``F.linear`` on ``qkv.weight`` with separate q/v biases, so SSF reports ``qkv`` as skipped
and follows ``proj`` (and skips the position-bias MLP, which reads coordinates); blocks and norms
come from timm's ``group_matcher``. VPT and E²VPT prompts are extra keys and values of every
window (:class:`~timm_peft.layers.kv_attention.ExtraKVWindowAttentionV2`), as on Swin."""
from __future__ import annotations

from torch import nn

from . import register_family
from .base import Family, SsfSite, WindowLayer, report_functional_qkv


@register_family
class SwinV2(Family):
    name = "swinv2"
    modules = ("swin_transformer_v2",)
    capabilities = frozenset({"layer_groups", "ssf", "classifier", "windows", "block_mlp",
                              "block_attn", "qkv"})

    def matches(self, model: nn.Module) -> bool:
        from timm.models.swin_transformer_v2 import SwinTransformerV2
        return isinstance(model, SwinTransformerV2)

    def window_attention(self, model: nn.Module) -> list[list[WindowLayer]]:
        # V2 normalises after attention (res-post-norm): the attention reads the block's input
        # as it is, so prompts join the window's tokens unnormalised
        return [[WindowLayer(nn.Identity(), b.attn, b.dim) for b in stage.blocks]
                for stage in model.layers]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [b for stage in model.layers for b in stage.blocks]

    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        sites = report_functional_qkv(model, super().ssf_sites(model))
        for site in sites:
            if ".cpb_mlp." in site.name and site.reason is None:
                # its input is a table of relative coordinates, not the image's features (and an
                # in-place ReLU follows its first Linear)
                site.reason = ("the continuous position-bias MLP reads relative coordinates, not "
                               "features: SSF modulates feature operations only")
        return sites
