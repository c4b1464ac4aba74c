"""BEiT family: timm's ``Beit`` (``beit.py``: BEiT, BEiT-v2): a ViT whose attention adds a
relative-position bias over ``[class token, patches]``. Token prompts have no relative position:
the bias (per layer or shared) is padded with zeros for them."""
from __future__ import annotations

from torch import nn

from ..layers.prompts import PromptedViT, PromptPaddedBias, PromptPaddedRelPos
from ..layers.scale_shift import scan
from . import register_family
from .base import Family, LayerGroups, SsfSite, TokenSequence, _pair


def _not_biased_qkv(name: str, op: nn.Module) -> bool:
    # with separate q/k/v biases the attention calls F.linear on qkv.weight itself, so an SSF
    # after qkv would never run; qkv is left out (SSF follows the attention's proj instead)
    return not name.endswith("attn.qkv")


@register_family
class Beit(Family):
    name = "beit"
    modules = ("beit",)
    capabilities = frozenset({"layer_groups", "ssf", "tokens"})

    def matches(self, model: nn.Module) -> bool:
        from timm.models.beit import Beit as TimmBeit
        return isinstance(model, TimmBeit)

    def layer_groups(self, model: nn.Module) -> LayerGroups:
        return LayerGroups([[b] for b in model.blocks], self.final_norms(model))

    def final_norms(self, model: nn.Module) -> list[nn.Module]:
        return list(self.submodules(model, ("norm", "fc_norm", "head_norm")))

    def token_sequence(self, model: nn.Module) -> TokenSequence:
        adapters = [(b.attn, PromptPaddedRelPos) for b in model.blocks
                    if b.attn.relative_position_bias_table is not None]
        if model.rel_pos_bias is not None:
            adapters.append((model.rel_pos_bias, PromptPaddedBias))
        return TokenSequence(list(model.blocks), model.num_prefix_tokens, model.embed_dim,
                             _pair(getattr(model.patch_embed, "patch_size", 16)),
                             prompt_adapters=adapters)

    def prompted_model_mixin(self, model: nn.Module) -> type:
        return PromptedViT

    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        return list(scan(model, ("patch_embed", "blocks", "norm", "fc_norm"),
                         skip_unfoldable=True, keep=_not_biased_qkv))
