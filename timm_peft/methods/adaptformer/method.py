"""AdaptFormer's config and surgery: a scaled bottleneck beside each block's MLP."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core import PeftConfig, cfg_field, register_method
from ...families import Family, get_family, refuse
from ...layers.bottleneck import Bottleneck, ParallelAdapter
from ...layers.swap import swap_class
from ..adapter.method import BottleneckMethod, _factory

__all__ = ["AdaptFormerConfig", "AdaptFormer"]


@dataclass
class AdaptFormerConfig(PeftConfig):
    """Config of ``adaptformer`` (defaults: the paper's ``d̂ = 64``, ``s = 0.1``).

    Example:
        >>> AdaptFormerConfig(bottleneck=8).scale
        0.1
    """

    bottleneck: int = cfg_field(64, ge=1, le=8192, help="the bottleneck's width d̂")
    scale: float = cfg_field(0.1, ge=0.0, le=100.0, help="s, the bottleneck output's scale")
    dropout: float = cfg_field(0.0, ge=0.0, lt=1.0, help="dropout after the ReLU")


@register_method
class AdaptFormer(BottleneckMethod):
    """AdaptMLP beside every block's MLP: ``MLP(h) + s · up(ReLU(down(h)))``; see
    :mod:`timm_peft.methods.adaptformer`."""

    name = "adaptformer"
    paper = ('Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual '
             'Recognition", NeurIPS 2022.')
    citation = r"""@inproceedings{chen2022adaptformer,
  title={{AdaptFormer}: Adapting Vision Transformers for Scalable Visual Recognition},
  author={Chen, Shoufa and Ge, Chongjian and Tong, Zhan and Wang, Jiangliu and Song, Yibing and Wang, Jue and Luo, Ping},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2022}
}"""
    config_cls = AdaptFormerConfig
    mixin, attr = ParallelAdapter, "adaptformer"
    description = "AdaptFormer: a scaled bottleneck beside each block's MLP + head (not mergeable)"

    def supports(self, family: Family) -> bool:
        return "block_mlp" in family.capabilities

    def apply(self, model: nn.Module, config: AdaptFormerConfig) -> nn.Module:
        family = get_family(model)
        layers = family.block_layers(model)
        if not layers:
            raise refuse(self.name, "a width-preserving MLP in every block", model, family)
        dd = _factory(model)
        for layer in layers:
            layer.mlp.adaptformer = Bottleneck(layer.dim, config.bottleneck, "relu",
                                               config.dropout, config.scale,
                                               channel_axis=layer.channel_axis, **dd)
            swap_class(layer.mlp, ParallelAdapter)
        return model
