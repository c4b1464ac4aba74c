"""EVA family: timm's ``Eva`` (``eva.py``: EVA-01, EVA-02, and the ViTs timm builds with it such as
PE, Naver ROPE-ViT): a ViT whose attention applies rotary position embeddings after the prefix
tokens. Token prompts join the prefix inside attention, so they get no rotary embedding."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..layers.scale_shift import ResidualBranch, scan
from . import register_family
from .base import (SsfSite, TokenBlocksFamily, TokenSequence, entrypoint_uses, pre_norm_blocks,
                   report_functional_qkv)

#: ``EvaBlock`` (and BEiT's ``Block``): ``x + drop_path1(gamma_1 * attn(norm1(x), ...))``, then
#: the same with ``mlp``; ``gamma_1``/``gamma_2`` are tensors or None
GAMMA_BRANCHES = (
    ResidualBranch("norm1", "attn", "proj", "proj_drop", "drop_path1", "gamma_1",
                   block_args=True),
    ResidualBranch("norm2", "mlp", "fc2", "drop2", "drop_path2", "gamma_2"))


@register_family
class Eva(TokenBlocksFamily):
    name = "eva"
    capabilities = TokenBlocksFamily.capabilities | {"kv_attention", "block_mlp", "block_attn", "qkv"}
    modules = ("eva",)

    def matches(self, model: nn.Module) -> bool:
        from timm.models.eva import Eva as TimmEva
        return isinstance(model, TimmEva)

    def arch_capabilities(self, arch: str) -> frozenset[str]:
        # separate q/k/v projections (qkv_fused=False; Sapiens2's grouped-query attention): no
        # packed qkv for LoRA's default target
        if entrypoint_uses(arch, "qkv_fused=False") or entrypoint_uses(arch, "_sapiens2_args"):
            return self.capabilities - {"qkv"}
        return self.capabilities

    def token_sequence(self, model: nn.Module) -> TokenSequence:
        return super().token_sequence(model, prefix_attention=[b.attn for b in model.blocks])

    def residual_branches(self, model: nn.Module) -> list[tuple[nn.Module, tuple[Any, ...]]]:
        from timm.models.eva import EvaAttention, EvaBlock  # not EvaBlockPostNorm: post-norm
        return pre_norm_blocks(model.blocks, EvaBlock, EvaAttention, GAMMA_BRANCHES)

    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        roots = ("patch_embed", "norm_pre", "blocks", "norm", "fc_norm", "attn_pool")
        return report_functional_qkv(model, scan(model, roots, skip_unfoldable=True))
