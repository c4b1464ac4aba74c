"""ByobNet family: timm's configurable ConvNets (``byobnet.py``: GerNet, RepVGG, RegNetZ, the CLIP
ResNets, ...). A ConvNet like the others, except for the pixel prompts' promise: archs whose
config downsamples with stride-2 average pooling (``aa_layer='avg'``: odd sizes break the
residual sum) or uses bottleneck attention (``attn_layer='bat'``: built for one feature size)
cannot take VPT's padded input size, so they are not listed for it (a build says why); nor are
the archs with self-attention blocks (BoTNet, HaloNet, LambdaNet in ``byoanet.py``)."""
from __future__ import annotations

from . import register_family
from .convnets import ConvNets


@register_family
class ByobNet(ConvNets):
    name = "byobnet"
    #: MobileViT (``mobilevit.py``) and the attention ByobNets (``byoanet.py``: BoTNet, HaloNet,
    #: LambdaNet) are ByobNets configured in model files of their own
    modules = ("byobnet", "mobilevit", "byoanet")

    #: MobileViT's transformer blocks use timm's attention, with a packed ``qkv`` (LoRA)
    module_capabilities = {"mobilevit": frozenset({"qkv"})}

    def arch_capabilities(self, arch: str) -> frozenset[str]:
        import sys
        from timm.models import _registry
        module = sys.modules.get(f"timm.models.{_registry._model_to_module.get(arch)}")
        cfg = getattr(module, "model_cfgs", {}).get(arch)
        caps = super().arch_capabilities(arch)
        # only MobileViT (v1) blocks have it; MobileViT-v2's separable attention has no qkv
        if cfg is None or "mobilevit" not in _block_types(cfg.blocks):
            caps -= {"qkv"}
        # self-attention blocks (halo, bottleneck, lambda) are built for one feature size too
        if cfg is not None and (cfg.aa_layer == "avg" or cfg.attn_layer == "bat"
                                or cfg.self_attn_layer is not None):
            return caps - {"pixels"}
        return caps


def _block_types(blocks: tuple) -> set[str]:
    """The block types of a ByobNet config (its stages may nest tuples or lists of blocks)."""
    return {t for b in blocks for t in (_block_types(b) if isinstance(b, (tuple, list)) else {b.type})}
