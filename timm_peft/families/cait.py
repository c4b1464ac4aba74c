"""CaiT family: timm's ``Cait`` (``cait.py``, Touvron et al., "Going deeper with Image
Transformers", ICCV 2021): self-attention blocks over the patches alone, then class-attention
blocks (``blocks_token_only``) that bring in the class token. E²VPT's key-value prompts go into
the self-attention blocks' talking-heads attention.

Token prompts go in front of the patches of the self-attention blocks (there is no prefix token
yet); the class-attention blocks see them as keys, and they are dropped from the output
``[class token, prompts, patches]`` like ViT's."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..layers.scale_shift import ResidualBranch
from . import register_family
from .base import LayerGroups, TokenBlocksFamily, TokenSequence, pre_norm_blocks

#: ``LayerScaleBlock``: ``x + drop_path(gamma_1 * attn(norm1(x)))``, then the same with ``mlp``
#: (one drop-path for both; the class-attention blocks add to the class token only)
LAYER_SCALE_BLOCK_BRANCHES = (
    ResidualBranch("norm1", "attn", "proj", "proj_drop", "drop_path", "gamma_1"),
    ResidualBranch("norm2", "mlp", "fc2", "drop2", "drop_path", "gamma_2"))


@register_family
class Cait(TokenBlocksFamily):
    name = "cait"
    modules = ("cait",)
    capabilities = frozenset({"layer_groups", "ssf", "classifier", "tokens", "kv_attention",
                              "block_mlp", "block_attn", "qkv"})

    def layer_groups(self, model: nn.Module) -> LayerGroups:
        # timm's group_matcher is a function here (no block patterns to number)
        return LayerGroups([[b] for b in (*model.blocks, *model.blocks_token_only)],
                           self.final_norms(model))

    def residual_branches(self, model: nn.Module) -> list[tuple[nn.Module, tuple[Any, ...]]]:
        from timm.models.cait import LayerScaleBlock, TalkingHeadAttn
        return pre_norm_blocks(model.blocks, LayerScaleBlock, TalkingHeadAttn,
                               LAYER_SCALE_BLOCK_BRANCHES)

    def token_sequence(self, model: nn.Module, **extra: Any) -> TokenSequence:
        seq = super().token_sequence(model, **extra)
        seq.num_prefix_tokens = 0  # the class token joins after the self-attention blocks
        return seq
