"""timm integration: method suffixes in model names, ``peft=``/``peft_cfg=`` keywords, listing.

timm has no plugin or post-build hook, so every registered entrypoint in
``timm.models._registry._model_entrypoints`` is replaced by a thin wrapper. The wrapper strips a
method suffix from the pretrained tag (``vit_base_patch16_224.augreg_in21k.ssf`` reaches it as
``pretrained_cfg="augreg_in21k.ssf"``), calls the original entrypoint so that timm loads weights,
runs its filters and sets ``pretrained_cfg`` exactly as usual, and then applies the surgery. A name
without a method suffix reaches the original entrypoint with unchanged arguments, so plain timm
models are bit-identical. Archs are never re-registered (in timm 1.0.31 that deletes their tags);
archs registered after ``import timm_peft`` are wrapped on demand when
``timm.create_model`` looks them up.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
from typing import Any, Callable

from torch import nn

from .core import (PeftConfig, apply_method, get_method, iter_family_archs, list_methods,
                   resolve_method)
from .families import family_of_arch

__all__ = ["create_model", "list_models", "split_method", "model_name_help", "install",
           "BUILD_HOOKS", "UnknownSuffixError"]

_WRAPPED_ATTR = "__timm_peft_original__"
# kwargs of create_model that describe loading, not the architecture (not recorded for rebuild)
_NON_ARCH_KWARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                    "device", "dtype", "pretrained_model_args", "features_only", "out_indices",
                    "feature_cls", "feature_cfg", "output_stride"}

#: Callables ``hook(entrypoint, arch, kwargs) -> model | None`` tried before the normal path; a
#: hook that recognises its keywords (e.g. an adapter repo's marker in ``model_args``) builds the
#: model itself.
BUILD_HOOKS: list[Callable[[Callable[..., nn.Module], str, dict[str, Any]], nn.Module | None]] = []


class UnknownSuffixError(RuntimeError, ValueError):
    """A model-name suffix that is neither a weight tag of the arch nor a PEFT method.

    A RuntimeError like timm's ``Invalid pretrained tag`` error, whose text it starts with, and
    a ValueError like timm_peft's other bad-name errors, so a handler of either still catches it.

    Example:
        >>> import timm, timm_peft
        >>> try:
        ...     timm.create_model("vit_tiny_patch16_224.lroa")
        ... except RuntimeError as e:
        ...     print(str(e).split(";")[0])
        Invalid pretrained tag (lroa) for vit_tiny_patch16_224. 'lroa' is neither one of its weight tags nor a PEFT method
    """


def model_name_help(arch: str) -> str:
    """What may follow ``arch`` in a model name: its weight tags, the methods and an example.

    The one wording of it, for the Python errors and the command line's alike.

    Example:
        >>> print(model_name_help("vit_tiny_patch16_224"))  # doctest: +ELLIPSIS
        use <arch>[.<weight tag>].<method>; weight tags of vit_tiny_patch16_224: ['augreg_in21k_ft_in1k', 'augreg_in21k']; methods: ['adapter', ...]; e.g. 'vit_tiny_patch16_224.linear' or 'vit_tiny_patch16_224.augreg_in21k_ft_in1k.linear'
    """
    from timm.models import _registry
    # timm lists an arch registered with an untagged cfg under its bare name: no tag to offer
    tags = [name.partition(".")[2] for name in _registry._model_with_tags.get(arch, ())
            if "." in name]
    known = f"weight tags of {arch}: {tags}" if tags else f"{arch} has no weight tags"
    example = f"'{arch}.linear'" + (f" or '{arch}.{tags[0]}.linear'" if tags else "")
    return (f"use <arch>[.<weight tag>].<method>; {known}; methods: {list_methods()}; "
            f"e.g. {example}")


def split_method(arch: str, tag: str | None) -> tuple[str | None, str | None]:
    """Split a timm pretrained tag into ``(weight tag, method)``.

    A tag with a dot must end in a registered method; a tag without one is a method if it names
    one, else a weight tag. A weight tag timm does not know for ``arch`` is an
    :class:`UnknownSuffixError` listing the arch's tags and the methods (timm's judgment, asked
    here so the error can say both).

    Example:
        >>> split_method("vit_base_patch16_224", "augreg2_in21k_ft_in1k.ssf")
        ('augreg2_in21k_ft_in1k', 'ssf')
        >>> split_method("vit_base_patch16_224", "linear")
        (None, 'linear')
    """
    if not tag:
        return None, None
    from timm.models import _registry
    if f"{arch}.{tag}" in _registry._model_pretrained_cfgs:
        return tag, None
    weight_tag, dot, method = tag.rpartition(".")
    if not dot:
        if tag in list_methods():
            return None, tag
        weight_tag, method = tag, None
    elif method not in list_methods():
        raise UnknownSuffixError(f"unknown PEFT method suffix {method!r} in '{arch}.{tag}'; "
                                 f"{model_name_help(arch)}")
    try:
        _registry.get_pretrained_cfg(f"{arch}.{weight_tag}")  # timm's own judgment of the tag
    except RuntimeError as e:  # timm's "Invalid pretrained tag (<tag>) for <arch>."
        what = "is not one of its weight tags" if method else \
            "is neither one of its weight tags nor a PEFT method"
        raise UnknownSuffixError(f"{e} {weight_tag!r} {what}; {model_name_help(arch)}") from None
    return weight_tag, method


def _wrap(arch: str, entrypoint: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    @functools.wraps(entrypoint)
    def wrapper(*args: Any, **kwargs: Any) -> nn.Module:
        for hook in BUILD_HOOKS:
            model = hook(entrypoint, arch, kwargs)
            if model is not None:
                return model
        method = kwargs.pop("peft", None)
        peft_cfg = kwargs.pop("peft_cfg", None)
        tag = kwargs.get("pretrained_cfg")
        if isinstance(tag, str):
            weight_tag, suffix = split_method(arch, tag)
            if suffix is not None:
                if method is not None and resolve_method(method) != resolve_method(suffix):
                    raise ValueError(f"method suffix {suffix!r} and peft={method!r} disagree")
                method = suffix
                kwargs["pretrained_cfg"] = weight_tag
        if method is None:
            if peft_cfg is not None:
                raise ValueError("peft_cfg was given but no method: add a method suffix to the "
                                 f"model name or pass peft=<one of {list_methods()}>")
            return entrypoint(*args, **kwargs)
        resolve_method(method)  # fail on an unknown method before building anything
        if kwargs.get("features_only"):
            # the getter wrapper keeps the whole model, which the surgery needs
            kwargs.setdefault("feature_cls", "getter")
        model = entrypoint(*args, **kwargs)
        pc = getattr(model, "pretrained_cfg", None) or {}
        model.peft_base = dict(
            architecture=arch,
            pretrained_tag=pc.get("tag") or None,
            pretrained=bool(kwargs.get("pretrained", False)),
            model_args={k: v for k, v in kwargs.items() if k not in _NON_ARCH_KWARGS},
        )
        return apply_method(model, method, peft_cfg)

    setattr(wrapper, _WRAPPED_ATTR, entrypoint)
    return wrapper


def _ensure_wrapped(arch: str) -> None:
    from timm.models import _registry
    fn = _registry._model_entrypoints.get(arch)
    if fn is not None and not hasattr(fn, _WRAPPED_ATTR):
        _registry._model_entrypoints[arch] = _wrap(arch, fn)


def install() -> None:
    """Wrap every registered timm entrypoint (idempotent; runs on ``import timm_peft``)."""
    from timm.models import _factory, _registry
    for arch in list(_registry._model_entrypoints):
        _ensure_wrapped(arch)
    if not hasattr(_factory.model_entrypoint, _WRAPPED_ATTR):
        original = _factory.model_entrypoint

        @functools.wraps(original)
        def model_entrypoint(model_name: str, *args: Any, **kwargs: Any) -> Callable[..., nn.Module]:
            _ensure_wrapped(_registry.get_arch_name(model_name))
            return original(model_name, *args, **kwargs)

        setattr(model_entrypoint, _WRAPPED_ATTR, original)
        _factory.model_entrypoint = model_entrypoint


def create_model(
        model_name: str,
        peft: str | None = None,
        peft_cfg: PeftConfig | dict[str, Any] | None = None,
        **kwargs: Any,
) -> nn.Module:
    """Explicit form of ``timm.create_model("<arch>[.<tag>].<method>", ...)``.

    Example:
        >>> import timm_peft
        >>> m = timm_peft.create_model("vit_tiny_patch16_224", peft="linear", num_classes=10,
        ...                            img_size=32)
        >>> m.peft_method
        'linear'
    """
    import timm
    install()
    if peft is not None:
        kwargs["peft"] = peft
    if peft_cfg is not None:
        kwargs["peft_cfg"] = peft_cfg
    return timm.create_model(model_name, **kwargs)


def supported_archs(method: str) -> list[str]:
    """Registered timm archs (no tags) whose family provides what ``method`` needs, decided from
    the family's capabilities for each arch (:meth:`Family.arch_capabilities`), no model built."""
    import timm
    impl = get_method(method)
    current = set(timm.list_models())  # deprecated names stay out, as in timm's own listing
    if impl.families is None:  # the method takes any timm model
        return [a for a in iter_family_archs(None) if a in current]
    out = []
    for arch in iter_family_archs(impl.families):
        if arch not in current:
            continue
        family = family_of_arch(arch)
        caps = family.arch_capabilities(arch)
        if caps != family.capabilities:
            family = copy.copy(family)
            family.capabilities = caps  # this arch's view of the family
        if impl.supports(family):  # the family may support it for other modules only
            out.append(arch)
    return out


def list_models(
        filter: str = "*",
        method: str | None = None,
        pretrained: bool = False,
) -> list[str]:
    """Model names usable with a method suffix, e.g. ``vit_base_patch16_224.ssf``.

    An arch is listed when its family (:func:`timm_peft.families.family_of_arch`, from its timm
    model module) provides what the method needs (:meth:`PeftMethod.supports` of the family's
    capabilities for that arch); models no registered family claims are not listed (the generic
    fallback promises nothing before a model is built), except for methods that take any model. With ``pretrained=True`` each weight tag is listed
    (``arch.tag.method``) and ``filter`` may include a tag pattern. Without ``method`` every
    registered method and preset is listed.

    Example:
        >>> import timm_peft
        >>> "vit_base_patch16_224.ssf" in timm_peft.list_models("vit_base_*", method="ssf")
        True
    """
    import timm
    methods = [method] if method is not None else list_methods()
    tagged = timm.list_pretrained() if pretrained else []
    out: list[str] = []
    for name in methods:
        archs = set(supported_archs(name))
        if pretrained:
            bases = [n for n in tagged if n.split(".")[0] in archs and fnmatch.fnmatch(n, filter)]
        else:
            bases = [a for a in archs if fnmatch.fnmatch(a, filter)]
        out.extend(f"{b}.{name}" for b in bases)
    return sorted(out)
