"""Swin family: timm's ``SwinTransformer`` (``swin_transformer.py``): local windows, stages."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers.scale_shift import ResidualBranch, scan, takes_residual
from ..layers.swap import Swappable
from ..ops import packed_attention
from . import register_family
from .base import Family, LayerGroups, SsfSite, WindowLayer

#: timm's ``SwinTransformerBlock``: ``x + drop_path1(_attn(norm1(x)))`` (windows reversed,
#: rolled back and cropped after ``attn.proj``, so that add stays outside the Linear, but the
#: positions are only rearranged: proj's SSF is applied at the add), then
#: ``x + drop_path2(mlp(norm2(x)))`` on the same tokens (timm flattens H, W around it; the norm
#: and MLP act per token either way)
BLOCK_BRANCHES = (ResidualBranch("norm1", "_attn", None, None, "drop_path1", site="attn.proj",
                                 after_site="attn.proj_drop"),
                  ResidualBranch("norm2", "mlp", "fc2", "drop2", "drop_path2"))


class PackedWindowAttention(Swappable):
    """timm's ``WindowAttention`` whose unfused path (its default) runs as
    :func:`~timm_peft.ops.packed_attention` in eager training when SSF follows ``qkv``: the
    attention then saves the probabilities and the ``qkv`` output SSF saves anyway, instead of
    copies of q·scale, kᵀ and v (as many bytes as ``qkv`` again). The same sums as timm's
    forward, the relative-position bias and the shift mask added before the softmax (to
    rounding); timm's forward runs otherwise (SDPA, dropout, a bias that trains, autocast,
    ``torch.compile``, no grad)."""

    prefix = "PackedQkv"
    method = "ssf"

    def _packed(self) -> bool:
        return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled() and not self.fused_attn
                and takes_residual(self.qkv) and self.relative_position_bias_table is not None
                and not self.relative_position_bias_table.requires_grad
                and (self.attn_drop.p == 0 or not self.training))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self._packed():
            return super().forward(x, mask)
        B_, N, C = x.shape
        bias = self._get_rel_pos_bias()  # (1, H, N, N)
        if mask is not None:  # (num_win, N, N), windows of one image consecutive in B_
            num_win = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(
                B_ // num_win, -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
        x = packed_attention(self.qkv(x), self.num_heads, self.scale, bias)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))


@register_family
class Swin(Family):
    name = "swin"
    modules = ("swin_transformer",)
    capabilities = frozenset({"layer_groups", "ssf", "classifier", "windows", "block_mlp",
                              "block_attn", "qkv"})

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

    def ssf_attention(self, model: nn.Module) -> list[tuple[nn.Module, type]]:
        from timm.models.swin_transformer import WindowAttention

        from ..layers.swap import original_class
        return [(b.attn, PackedWindowAttention) for stage in model.layers for b in stage.blocks
                if original_class(b.attn) is WindowAttention]

    def residual_branches(self, model: nn.Module) -> list[tuple[nn.Module, tuple[Any, ...]]]:
        from timm.layers import Mlp
        from timm.models.swin_transformer import SwinTransformerBlock

        from ..layers.swap import original_class
        return [(b, BLOCK_BRANCHES) for stage in model.layers for b in stage.blocks
                if original_class(b) is SwinTransformerBlock and original_class(b.mlp) is Mlp]
