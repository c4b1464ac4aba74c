"""EVA family: timm's ``Eva`` (``eva.py``: EVA-01, EVA-02, and the ViTs timm builds with it such as
PE, Naver ROPE-ViT): a ViT whose attention applies rotary position embeddings after the prefix
tokens. Token prompts join the prefix inside attention, so they get no rotary embedding."""
from __future__ import annotations

from torch import nn

from ..layers.scale_shift import scan
from . import register_family
from .base import SsfSite, TokenBlocksFamily, TokenSequence, report_functional_qkv


@register_family
class Eva(TokenBlocksFamily):
    name = "eva"
    capabilities = TokenBlocksFamily.capabilities | {"kv_attention"}
    modules = ("eva",)

    def matches(self, model: nn.Module) -> bool:
        from timm.models.eva import Eva as TimmEva
        return isinstance(model, TimmEva)

    def token_sequence(self, model: nn.Module) -> TokenSequence:
        return super().token_sequence(model, prefix_attention=[b.attn for b in model.blocks])

    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        roots = ("patch_embed", "norm_pre", "blocks", "norm", "fc_norm", "attn_pool")
        return report_functional_qkv(model, scan(model, roots, skip_unfoldable=True))
