"""VOLO family: timm's ``VOLO`` (``volo.py``, Yuan et al. 2021). Its head adds an auxiliary
token classifier (``aux_head``, token labeling) to the class-token classifier that
``get_classifier`` returns: methods that act on the classifiers' input (LION) must see both."""
from __future__ import annotations

from torch import nn

from . import register_family
from .base import Family, classifier_modules


@register_family
class Volo(Family):
    name = "volo"
    modules = ("volo",)
    capabilities = frozenset({"layer_groups", "ssf", "classifier"})
    module_capabilities = {"volo": frozenset({"qkv"})}  # the outlooker's and class attention's

    def classifiers(self, model: nn.Module) -> list[nn.Module]:
        aux = getattr(model, "aux_head", None)
        return classifier_modules(model) + ([aux] if isinstance(aux, nn.Module) else [])
