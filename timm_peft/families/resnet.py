"""ResNet family: timm's ``ResNet`` (``resnet.py``: ResNet, ResNet-D/-T, SE-ResNet, ResNeXt...)."""
from __future__ import annotations

from torch import nn

from ..layers.scale_shift import NORMS, scan
from . import register_family
from .base import Family, LayerGroups, PixelInput, SsfSite, entrypoint_uses as _entrypoint_uses


@register_family
class ResNet(Family):
    name = "resnet"
    modules = ("resnet",)
    capabilities = frozenset({"layer_groups", "ssf", "classifier", "pixels"})

    def matches(self, model: nn.Module) -> bool:
        from timm.models.resnet import ResNet as TimmResNet
        return isinstance(model, TimmResNet)

    def arch_capabilities(self, arch: str) -> frozenset[str]:
        # anti-aliased downsampling by stride-2 average pooling (resnetaa*, seresnextaa*) breaks
        # the residual sum at odd sizes, which VPT's padded input gives (a build says why)
        if _entrypoint_uses(arch, "aa_layer=nn.AvgPool2d"):
            return self.capabilities - {"pixels"}
        return self.capabilities

    def layer_groups(self, model: nn.Module) -> LayerGroups:
        return LayerGroups([[b] for n in ("layer1", "layer2", "layer3", "layer4")
                            for b in getattr(model, n)], self.final_norms(model))

    def final_norms(self, model: nn.Module) -> list[nn.Module]:
        return list(self.submodules(model, ("norm", "fc_norm", "head_norm")))

    def pixel_input(self, model: nn.Module) -> PixelInput | None:
        return self._pretrained_pixel_input(model)

    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        # every conv is followed by a norm: one map after the pair covers both sites (two
        # per-channel affine maps compose into one) and folds into the norm
        return list(scan(model, ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
                         keep=lambda name, op: isinstance(op, NORMS), skip_unfoldable=True))
