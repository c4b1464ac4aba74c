"""ViT family: timm's ``VisionTransformer`` and its subclasses (DeiT incl. distilled, DeiT-III,
hybrid ViTs, CLIP/SigLIP/DINOv2 ViTs), files ``vision_transformer*.py`` and ``deit.py``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers.scale_shift import residual_into, scan, takes_residual
from ..layers.swap import Swappable, original_class
from . import register_family
from .base import SsfSite, TokenBlocksFamily, entrypoint_uses as _entrypoint_uses


def _passes_through(m: nn.Module) -> bool:
    """Whether ``m`` returns its input unchanged: an Identity, or a dropout / drop-path that is
    off (p = 0, or eval mode)."""
    from timm.layers import DropPath
    if isinstance(m, nn.Identity):
        return True
    if isinstance(m, nn.Dropout):
        return m.p == 0 or not m.training
    if isinstance(m, DropPath):
        return m.drop_prob == 0 or not m.training
    return False


_NOT_FUSABLE = object()


def _layer_scale(ls: nn.Module) -> torch.Tensor | None | object:
    """A block's ``ls1``/``ls2`` as the fused add sees it: None (an identity), the frozen λ of
    timm's ``LayerScale``, or ``_NOT_FUSABLE`` (anything else, or a λ that trains)."""
    from timm.layers import LayerScale
    if _passes_through(ls):
        return None
    if original_class(ls) is LayerScale and not ls.gamma.requires_grad:
        return ls.gamma
    return _NOT_FUSABLE


class ResidualIntoBranch(Swappable):
    """timm's ViT ``Block`` (``x + drop_path(ls(attn(norm1(x))))``, then the same with ``mlp``)
    with each residual add done by the branch's last Linear (``attn.proj``, ``mlp.fc2``) through
    :func:`~timm_peft.layers.scale_shift.residual_into`: SSF's memory-lean training step.

    It applies in eager training where the modules between that Linear and the add are
    identities (no active dropout or drop-path) or a frozen layer scale (DeiT-III, DINOv2),
    which the Linear folds in; otherwise, and under ``torch.compile``/``torch.export`` (whose
    partitioner plans saved tensors itself), it runs timm's ``forward``. Both compute the same
    sum (with a layer scale, to rounding: λ is folded into the weight).
    """

    prefix = "ResidualIntoBranch"
    method = "ssf"

    def _layer_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """``(λ₁, λ₂)`` when the adds can move into the branches, else None."""
        if not (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and takes_residual(self.attn.proj) and takes_residual(self.mlp.fc2)
                and all(_passes_through(m) for m in (self.attn.proj_drop, self.drop_path1,
                                                      self.mlp.drop2, self.drop_path2))):
            return None
        scales = (_layer_scale(self.ls1), _layer_scale(self.ls2))
        return None if _NOT_FUSABLE in scales else scales

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scales = self._layer_scales()
        if scales is None:
            return super().forward(x, *args, **kwargs)
        with residual_into(self.attn.proj, x, scales[0]):
            x = self.attn(self.norm1(x), *args, **kwargs)
        with residual_into(self.mlp.fc2, x, scales[1]):
            x = self.mlp(self.norm2(x))
        return x


@register_family
class ViT(TokenBlocksFamily):
    name = "vit"
    modules = ("vision_transformer", "vision_transformer_hybrid", "deit")
    capabilities = frozenset({"layer_groups", "ssf", "classifier", "tokens", "kv_attention"})

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
        if _entrypoint_uses(arch, "ParallelScalingBlock") or _entrypoint_uses(arch, "attn_layer='diff'"):
            return self.capabilities - {"kv_attention"}
        return self.capabilities

    def residual_blocks(self, model: nn.Module) -> list[tuple[nn.Module, type]]:
        # only the classes whose forward ends `proj_drop(proj(x))` / `drop2(fc2(x))`, as the
        # mixin assumes (E²VPT's attention keeps that ending)
        from timm.layers import GluMlp, Mlp, SwiGLU
        from timm.models.vision_transformer import Attention, Block
        return [(b, ResidualIntoBranch) for b in model.blocks
                if original_class(b) is Block and original_class(b.attn) is Attention
                and original_class(b.mlp) in (Mlp, GluMlp, SwiGLU)]

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
