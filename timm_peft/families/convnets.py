"""ConvNets without a family module of their own: timm model files whose models are pure
convolutional networks. Their structure comes from timm itself (``group_matcher`` for blocks,
``pretrained_cfg['first_conv']`` for the image input), so one declaration covers them all."""
from __future__ import annotations

from torch import nn

from . import register_family
from .base import Family, PixelInput


@register_family
class ConvNets(Family):
    name = "convnets"
    modules = ("cspnet", "densenet", "dpn", "efficientnet", "ghostnet",
               "hardcorenas", "hgnet", "inception_resnet_v2", "inception_v3",
               "inception_v4", "mobilenetv3", "nasnet", "pnasnet", "regnet", "repghost",
               "repvit", "res2net", "resnest", "resnetv2", "rexnet", "selecsls", "senet", "sknet",
               "vgg", "vovnet", "xception", "xception_aligned",
               # issue 24: ConvNets (some with attention late in the network) that read any
               # input size, as the all-modules coverage sweep shows
               "convmixer", "cspnext", "fasternet", "inception_next", "lcnetv2", "mambaout",
               "rdnet", "starnet")
    capabilities = frozenset({"layer_groups", "ssf", "classifier", "pixels"})

    def pixel_input(self, model: nn.Module) -> PixelInput | None:
        return self._pretrained_pixel_input(model)
