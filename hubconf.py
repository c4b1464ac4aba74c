"""torch.hub entrypoints for timm_peft.

``torch.hub.list("<owner>/timm_peft")`` shows one entrypoint per (common arch, method) pair, named
``<arch>_<method>`` (e.g. ``vit_base_patch16_224_lion``), plus ``adapter`` for a saved adapter::

    model = torch.hub.load("<owner>/timm_peft", "vit_base_patch16_224_ssf", pretrained=True,
                           num_classes=100)
    model = torch.hub.load("<owner>/timm_peft", "adapter", "hf-hub:my-org/vit-b16-ssf-cifar100")

The pairs are generated from timm_peft's method registry when this file is imported, so every
registered method and preset gets its entrypoints (and only those it supports for the arch); a
local checkout works the same with ``torch.hub.load(path, name, source="local")``.
"""
from __future__ import annotations

from timm.models import get_pretrained_cfg as _get_pretrained_cfg

import timm_peft as _timm_peft
from timm_peft import core as _core

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]

#: backbones that get an entrypoint per method; every other timm arch is one
#: ``timm.create_model("<arch>.<method>")`` away
_COMMON_ARCHS = (
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
    "vit_large_patch16_224", "swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224",
    "convnext_tiny", "convnext_base", "resnet50",
)

_ENTRY_DOC = """{arch} with the ``{method}`` PEFT method: {description}.

Builds timm's ``{arch}`` (frozen; with its pretrained weights from timm when ``pretrained=True``)
and applies ``{method}``; the same as ``timm.create_model("{arch}.{method}", ...)`` after
``import timm_peft``.

Args:
    pretrained: load the base's pretrained weights through timm.
    tag: a timm weight tag for the base (e.g. ``"{example_tag}"``); default: timm's default.
    peft_cfg: the method's hyper-parameters, a dict or ``{config}``: {fields}.
    **kwargs: ``timm.create_model`` keywords (``num_classes``, ``img_size``, ...).

Example:
    >>> model = torch.hub.load("<owner>/timm_peft", "{name}", pretrained=True, num_classes=100)
"""


def _make_entrypoint(arch: str, method: str):
    impl = _core.get_method(method)
    defaults = _core.resolve_method(method)[1]
    fields = ", ".join(f"``{k}``" for k in impl.config_cls.__dataclass_fields__) or "none"
    default_cfg = _get_pretrained_cfg(arch)

    def entrypoint(pretrained: bool = False, tag: str | None = None, peft_cfg=None, **kwargs):
        name = f"{arch}.{tag}" if tag else arch
        return _timm_peft.create_model(name, peft=method, peft_cfg=peft_cfg,
                                       pretrained=pretrained, **kwargs)

    name = f"{arch}_{method}"
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    description = impl.description or impl.name
    if defaults:
        description += " (preset: " + ", ".join(f"{k}={v!r}" for k, v in defaults.items()) + ")"
    entrypoint.__doc__ = _ENTRY_DOC.format(
        arch=arch, method=method, name=name, description=description,
        config=impl.config_cls.__name__, fields=fields,
        example_tag=getattr(default_cfg, "tag", None) or "...")
    return entrypoint


def _register_entrypoints() -> None:
    # torch.hub only sees real module globals, so each pair becomes one
    for method in _timm_peft.list_methods():
        supported = set(_core.iter_family_archs(_core.get_method(method).families))
        for arch in _COMMON_ARCHS:
            if arch in supported:
                globals()[f"{arch}_{method}"] = _make_entrypoint(arch, method)


_register_entrypoints()


def adapter(id_or_dir: str, pretrained: bool | None = None, revision: str | None = None, **kwargs):
    """A saved adapter rebuilt with its base: ``hf-hub:<org>/<name>`` or a local directory.

    The base arch, weight tag, architecture arguments and method come from the adapter's checked
    ``adapter_config.json``; the base weights come through timm's usual pretrained path for the
    recorded tag, or from what you pass (the adapter never chooses them). The model's
    ``pretrained_cfg`` holds the data config and class names it was trained with. The same as
    ``timm_peft.from_pretrained(id_or_dir, ...)``.

    Args:
        id_or_dir: ``hf-hub:<org>/<name>[@<revision>]`` or the directory ``save_pretrained`` wrote.
        pretrained: load the base's pretrained weights; None (default): as the adapter records
            (False for a base that was randomly initialised).
        revision: branch, tag or commit of a Hub adapter.
        **kwargs: ``check_base`` and ``timm.create_model`` keywords (e.g.
            ``pretrained_cfg_overlay=dict(file=...)`` for base weights in a local file).

    Example:
        >>> model = torch.hub.load("<owner>/timm_peft", "adapter", "hf-hub:my-org/vit-b16-ssf-cifar100")
    """
    return _timm_peft.from_pretrained(id_or_dir, pretrained=pretrained, revision=revision, **kwargs)
