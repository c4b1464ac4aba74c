"""Token-mixing networks without a family module of their own: timm model files whose models
mix tokens by attention (hierarchical, cross-covariance, multi-branch), MLPs or pooling. Their
blocks come from timm's ``group_matcher``, their classifiers from ``get_classifier`` (two for
the distilled LeViT and EfficientFormer, one per branch for CrossViT), so one declaration covers
them; token and key-value prompts need a family module that knows their attention."""
from __future__ import annotations

from . import register_family
from .base import Family


@register_family
class Mixers(Family):
    name = "mixers"
    modules = ("crossvit", "davit", "edgenext", "efficientformer", "fastvit", "focalnet", "hiera",
               "levit", "maxxvit", "mlp_mixer", "pvt_v2", "xcit")
    capabilities = frozenset({"layer_groups", "ssf", "classifier"})
