"""Token-mixing networks without a family module of their own: timm model files whose models
mix tokens by attention (hierarchical, cross-covariance, multi-branch), MLPs or pooling. Their
blocks come from timm's ``group_matcher``, their classifiers from ``get_classifier`` (two for
the distilled LeViT and EfficientFormer, one per branch for CrossViT), so one declaration covers
them; token and key-value prompts need a family module that knows their attention."""
from __future__ import annotations

from . import register_family
from .base import Family, entrypoint_uses


@register_family
class Mixers(Family):
    name = "mixers"
    modules = ("crossvit", "davit", "edgenext", "efficientformer", "fastvit", "focalnet", "hiera",
               "levit", "maxxvit", "mlp_mixer", "pvt_v2", "xcit",
               # issue 24: the token mixers the all-modules coverage sweep found working
               "convit", "cpubone", "deepseek_vit",
               "efficientformer_v2", "efficientvim", "efficientvit_mit", "efficientvit_msra",
               "gcvit", "gemma4_vit", "hieradet_sam2", "iformer", "lowformer",
               "mobilenetv5", "mvitv2", "naflexvit", "nest", "nextvit", "qwen3_vit",
               "sequencer", "shvit", "swiftformer", "swin_transformer_v2_cr", "tiny_vit", "tnt",
               "twins", "visformer", "vision_transformer_relpos", "vision_transformer_sam")
    capabilities = frozenset({"layer_groups", "ssf", "classifier"})
    #: what the coverage sweep found these modules' blocks provide: timm ``Mlp``/attention pairs
    #: a bottleneck adapter follows (``block_mlp``, ``block_attn``) and packed ``qkv`` Linears
    #: LoRA changes (``qkv``)
    module_capabilities = {
        **dict.fromkeys(("convit", "deepseek_vit", "hiera", "hieradet_sam2", "naflexvit", "qwen3_vit",
                         "vision_transformer_relpos", "vision_transformer_sam", "xcit"),
                        frozenset({"block_mlp", "block_attn", "qkv"})),
        **dict.fromkeys(("gemma4_vit", "mlp_mixer", "nextvit", "tnt"),
                        frozenset({"block_mlp", "block_attn"})),
        **dict.fromkeys(("crossvit", "davit", "edgenext", "efficientformer", "gcvit", "maxxvit", "mvitv2",
                         "nest", "swin_transformer_v2_cr", "tiny_vit", "twins", "visformer"),
                        frozenset({"qkv"})),
    }

    #: modules whose archs differ: a module capability holds only for the archs whose timm
    #: entrypoint passes the marker. MLP-Mixer's own ``MixerBlock`` has no channel MLP a
    #: bottleneck can follow (gMLP's and ResMLP's blocks, chosen with ``block_layer=``, have);
    #: Twins-PCPVT's attention has no packed ``qkv`` (SVT's, chosen with ``wss=``, has)
    module_markers = {"mlp_mixer": "block_layer=", "twins": "wss="}

    def arch_capabilities(self, arch: str) -> frozenset[str]:
        """Nothing for the VLM encoders (DeepSeek, Gemma 4, Qwen 3, MobileNet-V5 ``*_enc``):
        they return tokens for a language model, no class scores, so no method is promised."""
        from timm.models import _registry
        if entrypoint_uses(arch, "_encoder(") or entrypoint_uses(arch, "encoder=True"):
            return frozenset()
        module = _registry._model_to_module.get(arch)
        marker = self.module_markers.get(module)
        if marker is not None and not entrypoint_uses(arch, marker):
            return self.capabilities
        return super().arch_capabilities(arch)


@register_family
class UngroupedMixers(Family):
    """Token mixers whose timm ``group_matcher`` does not number their blocks (CoaT's serial and
    parallel stages, CSATv2, MetaFormer's stages, PiT's pooling transformer): Partial-k has no
    blocks to count, so it is not promised (a build is refused); the rest is as :class:`Mixers`."""

    name = "ungrouped_mixers"
    modules = ("coat", "csatv2", "metaformer", "pit")
    capabilities = frozenset({"ssf", "classifier"})
    module_capabilities = dict.fromkeys(("coat", "csatv2", "pit"), frozenset({"qkv"}))
