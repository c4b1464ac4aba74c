"""EVA family: timm's ``Eva`` (``eva.py``: EVA-01, EVA-02, and the ViTs timm builds with it such as
PE, Naver ROPE-ViT): a ViT whose attention applies rotary position embeddings after the prefix
tokens. Token prompts join the prefix inside attention, so they get no rotary embedding."""
from __future__ import annotations

from torch import nn

from ..layers.prompts import PromptedViT, PromptsAsPrefix
from ..layers.scale_shift import scan
from . import register_family
from .base import Family, LayerGroups, SsfSite, TokenSequence, _pair


def _not_biased_qkv(name: str, op: nn.Module) -> bool:
    # with separate q/k/v biases the attention calls F.linear on qkv.weight itself, so an SSF
    # after qkv would never run; qkv is left out (SSF follows the attention's proj instead)
    return not name.endswith("attn.qkv")


@register_family
class Eva(Family):
    name = "eva"
    modules = ("eva",)
    capabilities = frozenset({"layer_groups", "ssf", "tokens"})

    def matches(self, model: nn.Module) -> bool:
        from timm.models.eva import Eva as TimmEva
        return isinstance(model, TimmEva)

    def layer_groups(self, model: nn.Module) -> LayerGroups:
        return LayerGroups([[b] for b in model.blocks], self.final_norms(model))

    def final_norms(self, model: nn.Module) -> list[nn.Module]:
        return list(self.submodules(model, ("norm", "fc_norm", "head_norm")))

    def token_sequence(self, model: nn.Module) -> TokenSequence:
        return TokenSequence(list(model.blocks), model.num_prefix_tokens, model.embed_dim,
                             _pair(getattr(model.patch_embed, "patch_size", 16)),
                             prefix_attention=[b.attn for b in model.blocks])

    def prompted_model_mixin(self, model: nn.Module) -> type:
        return PromptedViT

    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        return list(scan(model, ("patch_embed", "norm_pre", "blocks", "norm", "fc_norm",
                                 "attn_pool"), skip_unfoldable=True, keep=_not_biased_qkv))
