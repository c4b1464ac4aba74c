"""The family wing: one module per timm model family, registered like timm's ``@register_model``.

Methods ask a model's :class:`Family` structural questions (see :mod:`.base`); nothing outside
this package knows what a ViT or a ResNet looks like. A model that no registered family claims
gets the generic family, which answers from what timm itself exposes.

Adding a family is adding a module here (see the README, "Adding a family")::

    @register_family
    class MyFamily(Family):
        name = "myfamily"
        modules = ("my_timm_module",)
        ...

Example:
    >>> import timm
    >>> get_family(timm.create_model("vit_tiny_patch16_224", depth=1)).name
    'vit'
"""
from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from .base import (Family, FamilyCapabilityError, LayerGroups, PixelInput, SsfSite, TokenSequence,
                   WindowLayer, classifier_modules)

__all__ = ["Family", "FamilyCapabilityError", "LayerGroups", "PixelInput", "SsfSite",
           "TokenSequence", "WindowLayer", "classifier_modules", "register_family", "get_family",
           "list_families", "family_of_arch", "GENERIC", "refuse"]

_FAMILIES: dict[str, Family] = {}
#: the fallback for models no registered family claims
GENERIC = Family()


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator registering a :class:`Family` (one instance; families are stateless)."""
    if not cls.name.isidentifier() or cls.name == GENERIC.name:
        raise ValueError(f"{cls.__name__}.name must be an identifier other than 'generic', "
                         f"got {cls.name!r}")
    claimed = {m: f.name for f in _FAMILIES.values() for m in f.modules if f.name != cls.name}
    taken = [m for m in cls.modules if m in claimed]
    if taken:
        raise ValueError(f"family {cls.name!r}: timm modules {taken} already belong to "
                         f"{sorted({claimed[m] for m in taken})}")
    _FAMILIES[cls.name] = cls()
    return cls


def list_families() -> list[str]:
    """Names of the registered families (the generic fallback not included)."""
    return sorted(_FAMILIES)


def get_family(model: nn.Module | str) -> Family:
    """The family of a (plain, or ``features_only`` getter-wrapped) timm model, or by name.

    Falls back on the generic family, which answers from timm's own ``group_matcher``,
    ``get_classifier`` and ``pretrained_cfg``.
    """
    if isinstance(model, str):
        if model == GENERIC.name:
            return GENERIC
        if model not in _FAMILIES:
            raise KeyError(f"unknown family {model!r}; registered: {list_families()}")
        return _FAMILIES[model]
    from ..core import unwrap_features
    model = unwrap_features(model)
    for fam in _FAMILIES.values():
        if fam.matches(model):
            return fam
    return GENERIC


def family_of_arch(arch: str) -> Family:
    """The family of a registered timm arch, from its model module (no model is built)."""
    from timm.models import _registry
    mod = _registry._model_to_module.get(arch)
    for fam in _FAMILIES.values():
        if mod in fam.modules:
            return fam
    return GENERIC


def refuse(method: str, what: str, model: nn.Module, family: Family) -> FamilyCapabilityError:
    """The build-time error of a method whose family lacks a capability (raise it)."""
    from ..core import unwrap_features
    name = type(unwrap_features(model)).__name__
    return FamilyCapabilityError(
        f"method {method!r} needs {what}, which the {family.name!r} family ({name}) does not "
        f"provide; see timm_peft.list_models(method={method!r}) for the models it supports")


for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
