"""ViT family: timm's ``VisionTransformer`` and its subclasses (DeiT incl. distilled, DeiT-III,
hybrid ViTs, CLIP/SigLIP/DINOv2 ViTs), files ``vision_transformer*.py`` and ``deit.py``."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..layers.scale_shift import ResidualBranch, scan
from . import register_family
from .base import (BlockLayers, SsfSite, TokenBlocksFamily, entrypoint_uses as _entrypoint_uses,
                   mlp_width, pre_norm_blocks)


#: timm's ``Block``: ``x + drop_path1(ls1(attn(norm1(x), ...)))``, then the same with ``mlp``
BLOCK_BRANCHES = (
    ResidualBranch("norm1", "attn", "proj", "proj_drop", "drop_path1", "ls1", block_args=True),
    ResidualBranch("norm2", "mlp", "fc2", "drop2", "drop_path2", "ls2"))


@register_family
class ViT(TokenBlocksFamily):
    name = "vit"
    modules = ("vision_transformer", "vision_transformer_hybrid", "deit",
               "vitamin")  # ViTamin: a VisionTransformer behind a convolutional stem
    capabilities = frozenset({"layer_groups", "ssf", "classifier", "tokens", "kv_attention",
                              "block_mlp", "block_attn", "qkv"})

    def matches(self, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer
        return isinstance(model, VisionTransformer)

    def kv_attention(self, model: nn.Module) -> list[nn.Module] | None:
        attns = []
        for b in model.blocks:
            if getattr(b, "attn", None) is not None:
                attns.append(b.attn)
            elif getattr(b, "attns", None) is not None:  # ParallelThingsBlock: one per branch
                attns.extend(branch.attn for branch in b.attns)
            else:  # ParallelScalingBlock: attention fused with the MLP inside the block
                return None
        return attns

    def arch_capabilities(self, arch: str) -> frozenset[str]:
        # ParallelScalingBlock fuses attention into the block: no attention layer to prompt;
        # differential attention (attn_layer='diff') computes two attention maps per head
        if _entrypoint_uses(arch, "ParallelScalingBlock"):  # no MLP, attention or qkv module
            return self.capabilities - {"kv_attention", "block_mlp", "block_attn", "qkv"}
        if _entrypoint_uses(arch, "attn_layer='diff'"):
            return self.capabilities - {"kv_attention"}
        return self.capabilities

    def block_layers(self, model: nn.Module) -> list[BlockLayers] | None:
        # ParallelThingsBlock: one (attention, MLP) pair per parallel branch
        out = []
        for b in model.blocks:
            if getattr(b, "ffns", None) is not None and getattr(b, "attns", None) is not None:
                pairs = [(f.mlp, a.attn) for f, a in zip(b.ffns, b.attns)]
            elif isinstance(getattr(b, "mlp", None), nn.Module):
                pairs = [(b.mlp, getattr(b, "attn", None))]
            else:  # ParallelScalingBlock: attention and MLP fused into the block
                return None
            for mlp, attn in pairs:
                width = mlp_width(mlp)
                if width is None:
                    return None
                out.append(BlockLayers(mlp, attn, *width))
        return out

    def residual_branches(self, model: nn.Module) -> list[tuple[nn.Module, tuple[Any, ...]]]:
        from timm.models.vision_transformer import Attention, Block
        return pre_norm_blocks(model.blocks, Block, Attention, BLOCK_BRANCHES)

    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        # a hybrid ViT's CNN stem (patch_embed.backbone) is a backbone of its own, not a site
        sites = list(scan(model, ("patch_embed", "norm_pre", "blocks", "norm", "fc_norm",
                                  "attn_pool"),
                          keep=lambda name, op: not name.startswith("patch_embed.backbone"),
                          skip_unfoldable=True))
        # average pooling (global_pool="avg"): timm makes `norm` an Identity and normalises the
        # pooled tokens with `fc_norm`. The authors' SSF follows `norm` (the Identity), i.e. acts
        # on the tokens before pooling: fc_norm(γ ⊙ mean(x) + β). It cannot be folded exactly
        # (the Identity has no weight; the block before ends in a residual sum; a LayerNorm
        # follows), so it is offered beside the mergeable site after fc_norm.
        norm, fc_norm = getattr(model, "norm", None), getattr(model, "fc_norm", None)
        if isinstance(norm, nn.Identity) and fc_norm is not None \
                and not isinstance(fc_norm, nn.Identity):
            for site in sites:
                if site.name == "fc_norm":
                    site.placement = "after_fc_norm"
            sites.append(SsfSite("norm", norm, channels=model.embed_dim, placement="before_pool",
                                 merge_reason="the authors' site on the tokens before average "
                                 "pooling and fc_norm (a LayerNorm) has no operation to fold "
                                 "into; build with SSFConfig(pooled_norm_site='after_fc_norm') "
                                 "for a mergeable model"))
            order = {name: i for i, (name, _) in enumerate(model.named_modules())}
            sites.sort(key=lambda s: order.get(s.name, len(order)))
        return sites
