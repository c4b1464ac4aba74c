"""The one way timm_peft inserts behaviour into a model's modules, and the one way back.

A method never adds hooks or replaces a bound ``forward``: it *swaps the class* of a module for a
cached subclass ``(mixin, ..., original class)``. The module keeps its state-dict keys, its
``isinstance`` and its attributes; the mixin's methods run first and call ``super()``. Modules a
method must reach from the swapped one (e.g. the prompt container a block reads) are stored as
*references*: plain instance attributes, not child modules, so they add no state-dict keys and
are saved, moved and copied through the module that owns them.

The generated classes are not importable by name, so every swapped module pickles through
:func:`_rebuild` (the mixins and the original class, all importable): ``pickle`` and
``torch.save`` of a whole model work, and an unloaded model holds no trace of timm_peft.

Example:
    >>> from torch import nn
    >>> class Loud(Swappable):
    ...     prefix = "Loud"
    >>> lin = nn.Linear(2, 2)
    >>> swap_class(lin, Loud, note="hi"); type(lin).__name__, isinstance(lin, nn.Linear), lin.note
    ('LoudLinear', True, 'hi')
    >>> restore_class(lin); type(lin).__name__, hasattr(lin, "note")
    ('Linear', False)
"""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["AdapterModule", "Swappable", "swap_class", "restore_class", "restore_classes", "original_class",
           "is_swapped", "mixins_of", "refuse_fx"]


class AdapterModule(nn.Module):
    """Marker base class of every module a method inserts: all its state is adapter state."""


class Swappable:
    """Base of every mixin given to :func:`swap_class`.

    ``prefix`` names the generated class (``prefix + original name``); ``method`` names the PEFT
    method for error messages (TorchScript refuses a swapped module and says which method).
    """

    prefix: str = "Peft"
    method: str = "timm_peft"
    #: True for a mixin that leaves the module's computation as it is (e.g. a frozen norm that
    #: only ignores ``train()``): its modules stay leaves for ``torch.fx`` like their torch class;
    #: any other swapped module refuses ``torch.fx.symbolic_trace`` with a clear error
    fx_transparent: bool = False

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the generated class is not importable: rebuild it from its importable parts
        cls = type(self)
        _, _, *rest = super().__reduce_ex__(protocol)
        return (_rebuild, (cls._peft_mixins, cls._peft_base), *rest)

    def __prepare_scriptable__(self) -> Any:
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__name__}: the {self.method!r} PEFT "
            f"method changed this module's forward. Call timm_peft.merge_and_unload(model) first "
            "(methods that merge), or use torch.compile / torch.export instead")


def refuse_fx(module: nn.Module) -> None:
    """Raise a clear error while ``torch.fx.symbolic_trace`` traces a swapped module (naming the
    PEFT method); a model's own ``forward_*`` mixins call it, since fx traces the root model's
    ``forward`` without calling the model."""
    if _fx_symbolic_tracing():
        method = next((m.method for m in mixins_of(module) if not m.fx_transparent), "timm_peft")
        raise RuntimeError(
            f"torch.fx.symbolic_trace cannot trace {type(module).__name__}: the {method!r} PEFT "
            "method changed this module's forward. Call timm_peft.merge_and_unload(model) first "
            "(methods that merge), or use torch.compile / torch.export instead")


def _fx_symbolic_tracing() -> bool:
    from torch.fx import _symbolic_trace as fx
    check = getattr(fx, "is_fx_symbolic_tracing", None)  # torch.export traces with fx's flag too
    return check() if check is not None else fx._is_fx_tracing_flag


def _guarded_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    refuse_fx(self)
    return nn.Module.__call__(self, *args, **kwargs)


_CLASSES: dict[tuple[tuple[type, ...], type], type] = {}


def _make(mixins: tuple[type, ...], base: type) -> type:
    key = (mixins, base)
    if key not in _CLASSES:
        name = "".join(m.prefix for m in mixins) + base.__name__
        body: dict[str, Any] = {"__module__": __name__, "__qualname__": name,
                                "_peft_mixins": mixins, "_peft_base": base}
        if all(m.fx_transparent for m in mixins):
            # torch.fx keeps modules of torch.nn as leaves by their __module__: so do we
            body["__module__"] = base.__module__
        else:
            body["__call__"] = _guarded_call
        _CLASSES[key] = type(name, (*mixins, base), body)
    return _CLASSES[key]


def _rebuild(mixins: tuple[type, ...], base: type) -> nn.Module:
    cls = _make(tuple(mixins), base)
    return cls.__new__(cls)


def original_class(module: nn.Module) -> type:
    """The module's class before any swap (its timm or torch class)."""
    return getattr(type(module), "_peft_base", type(module))


def mixins_of(module: nn.Module) -> tuple[type, ...]:
    """The mixins swapped into the module's class, outermost first."""
    return getattr(type(module), "_peft_mixins", ())


def is_swapped(module: nn.Module, mixin: type | None = None) -> bool:
    """Whether the module's class was swapped (by ``mixin`` if given)."""
    mixins = mixins_of(module)
    return bool(mixins) if mixin is None else mixin in mixins


def swap_class(module: nn.Module, mixin: type, *, innermost: bool = False, **refs: Any) -> None:
    """Put ``mixin`` in front of the module's class; ``refs`` become plain attributes.

    Swaps compose: a module swapped by two methods runs both mixins (the last swap outermost;
    ``innermost=True`` puts it next to the original class instead, for a mixin that replaces
    the original computation rather than wrapping it, so the other mixins still wrap it).
    ``refs`` are stored without registering modules as children, so the state dict is unchanged.
    """
    if not issubclass(mixin, Swappable):
        raise TypeError(f"{mixin.__name__} must subclass timm_peft.layers.Swappable")
    if is_swapped(module, mixin):
        raise ValueError(f"{type(module).__name__} is already swapped with {mixin.__name__}")
    mixins = (*mixins_of(module), mixin) if innermost else (mixin, *mixins_of(module))
    module.__class__ = _make(mixins, original_class(module))
    names = set(module.__dict__.get("_peft_refs", ()))
    for k, v in refs.items():
        object.__setattr__(module, k, v)
        names.add(k)
    if names:
        object.__setattr__(module, "_peft_refs", tuple(sorted(names)))


def restore_class(module: nn.Module, mixin: type | None = None) -> None:
    """Take ``mixin`` (default: every mixin) out of the module's class and drop its references."""
    mixins = mixins_of(module)
    if not mixins or (mixin is not None and mixin not in mixins):
        return
    keep = () if mixin is None else tuple(m for m in mixins if m is not mixin)
    base = original_class(module)
    module.__class__ = _make(keep, base) if keep else base
    drop = set(module.__dict__.get("_peft_refs", ())) if mixin is None else set(
        getattr(mixin, "refs", ()))
    for k in drop:
        module.__dict__.pop(k, None)
    left = tuple(k for k in module.__dict__.get("_peft_refs", ()) if k not in drop)
    module.__dict__.pop("_peft_refs", None)
    if left:
        object.__setattr__(module, "_peft_refs", left)


def restore_classes(model: nn.Module, mixin: type | None = None) -> None:
    """:func:`restore_class` for every module in ``model``."""
    for m in model.modules():
        restore_class(m, mixin)
