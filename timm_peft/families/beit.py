"""BEiT family: timm's ``Beit`` (``beit.py``: BEiT, BEiT-v2): a ViT whose attention adds a
relative-position bias over ``[class token, patches]``. Token prompts have no relative position:
the bias (per layer or shared) is padded with zeros for them."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..layers.prompts import PromptPaddedBias, PromptPaddedRelPos
from ..layers.scale_shift import scan
from . import register_family
from .base import SsfSite, TokenBlocksFamily, TokenSequence, pre_norm_blocks, report_functional_qkv
from .eva import GAMMA_BRANCHES


@register_family
class Beit(TokenBlocksFamily):
    name = "beit"
    capabilities = TokenBlocksFamily.capabilities | {"kv_attention", "block_mlp", "block_attn", "qkv"}
    modules = ("beit",)

    def matches(self, model: nn.Module) -> bool:
        from timm.models.beit import Beit as TimmBeit
        return isinstance(model, TimmBeit)

    def token_sequence(self, model: nn.Module) -> TokenSequence:
        adapters = [(b.attn, PromptPaddedRelPos) for b in model.blocks
                    if b.attn.relative_position_bias_table is not None]
        if model.rel_pos_bias is not None:
            adapters.append((model.rel_pos_bias, PromptPaddedBias))
        return super().token_sequence(model, prompt_adapters=adapters)

    def residual_branches(self, model: nn.Module) -> list[tuple[nn.Module, tuple[Any, ...]]]:
        from timm.models.beit import Attention, Block
        return pre_norm_blocks(model.blocks, Block, Attention, GAMMA_BRANCHES)

    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        roots = ("patch_embed", "blocks", "norm", "fc_norm")
        return report_functional_qkv(model, scan(model, roots, skip_unfoldable=True))
