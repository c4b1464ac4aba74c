"""Many named adapters on one frozen timm model: add, load, switch, disable, delete and route.

One frozen backbone serves many tasks. A model built with a method suffix carries one adapter
named ``"default"``; :func:`add_adapter` and :func:`load_adapter` (with ``adapter_name``) add more,
each with its own method config and its own head (heads may differ in size). One adapter is
*active*: its tensors are the model's, so ``model(x)``, training, :func:`save_pretrained` and
:func:`merge_and_unload` see it exactly as if it were the only one. The others wait in
``model.peft_adapters``.

How switching works, and why it is cheap:

* Every adapter owns its tensors as its own ``Parameter`` objects. :func:`set_adapter` points the
  model's modules at the target's objects: no tensor is copied, the base weights are never
  touched, and an optimiser built for one adapter keeps holding that adapter's parameters.
* Tensors that the base owns and an adapter trains (biases for bias tuning, unfrozen blocks, the
  head) are cloned once when the adapter is created; the originals are kept in
  ``model.peft_base_state``, so :func:`disable_adapter` and :func:`unload` give back the base
  exactly as it was built.
* Adapters of one method and one config share the model's structure, so switching between them
  only re-points tensors (microseconds). Another method, config or head size needs the method's
  surgery to be redone (:meth:`PeftMethod.unload` then :meth:`PeftMethod.apply`; milliseconds,
  still without touching a base weight).

Per-sample routing (:func:`route`) runs a mixed batch in one backbone pass: every sample's forward
is the model's own forward with that sample's adapter tensors, vectorised over the batch with
:func:`torch.func.vmap` over :func:`torch.func.functional_call`. Each sample is computed exactly
as if it ran alone with its adapter, for every method, since the method's own code runs
unchanged. Heads of different sizes are padded: the routed logits are one ``(B, C_max)``
tensor whose entries past a sample's own class count are ``-inf`` (``softmax``, ``argmax`` and
``topk`` work on it directly); :attr:`Routing.num_classes` gives each sample's count.

The states of a model's adapters, and what may change them (:data:`ALLOWED`, which every
operation checks before it touches the model):

==============  =====================================================  ===========================
state           what the model computes                                operations allowed
==============  =====================================================  ===========================
``active``      the active adapter, or the composition                 every operation
                ``set_adapter(m, [a, b])`` made
``disabled``    inside ``with disable_adapter(m)``: the plain base;    ``disable_adapter`` again
                the adapters wait unchanged, the suspended one         (a nested block changes
                comes back when the block ends                         nothing)
``routed``      inside ``with route(m, names)``: ``model(x)`` runs     none
                sample ``i`` with adapter ``names[i]``
==============  =====================================================  ===========================

Reading (:func:`get_adapters`, :func:`active_adapter`, :func:`composed`, ``model(x)``) works in
every state. Anything else in ``disabled`` or ``routed`` (adding, loading, switching, deleting,
routing, saving, merging or unloading) raises :class:`AdapterStateError` and changes nothing:
the block ends with the model exactly as it began. Every operation checks its arguments before
the model is touched, and a surgery that fails halfway (e.g. ``add_adapter`` of a method the
family cannot take) restores the adapter that was active.

Example:
    >>> import timm, timm_peft, torch
    >>> m = timm.create_model("resnet18.ssf", num_classes=3).eval()
    >>> _ = timm_peft.add_adapter(m, "pets", num_classes=5)
    >>> _ = timm_peft.set_adapter(m, "pets"); m(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 5])
    >>> with timm_peft.route(m, ["default", "pets"]) as r:
    ...     logits = m(torch.zeros(2, 3, 64, 64))
    >>> logits.shape, r.num_classes.tolist()
    (torch.Size([2, 5]), [3, 5])
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from collections.abc import KeysView
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .core import (PeftConfig, PeftMethod, _make_config, adapter_keys, freeze, get_method,
                   resolve_method, unfreeze, unwrap_features, walk_modules)
from .families import get_family
from .layers.swap import Swappable, restore_class, swap_class

__all__ = ["Adapter", "Routing", "add_adapter", "set_adapter", "delete_adapter", "disable_adapter",
           "get_adapters", "active_adapter", "using_adapter", "composed", "route", "DEFAULT_ADAPTER",
           "AdapterStateError", "ALLOWED", "adapter_state", "check_allowed"]

#: the name of the adapter a method suffix (or :func:`timm_peft.apply_method`) creates (peft's)
DEFAULT_ADAPTER = "default"


class AdapterStateError(ValueError):
    """An operation the state of the model's adapters does not allow (see :data:`ALLOWED`).

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.bias")
        >>> with timm_peft.disable_adapter(m):
        ...     timm_peft.delete_adapter(m, "default")
        Traceback (most recent call last):
        ...
        timm_peft.adapters.AdapterStateError: delete_adapter is not allowed inside disable_adapter (the model runs its plain base until the block ends, then 'default' comes back); allowed there: disable_adapter, reading (get_adapters, active_adapter) and the forward. Call it after the with block.
    """


#: the operations each state of a model's adapters allows (the module docstring's table)
ALLOWED: dict[str, frozenset[str]] = {
    "active": frozenset({
        "add_adapter", "load_adapter", "set_adapter", "using_adapter", "delete_adapter",
        "disable_adapter", "route", "save_pretrained", "push_to_hub", "merge", "unmerge",
        "merge_and_unload", "unload", "apply_method"}),
    "disabled": frozenset({"disable_adapter"}),
    "routed": frozenset(),
}


def adapter_state(model: nn.Module) -> str:
    """The state of the model's adapters: ``"active"``, ``"disabled"`` or ``"routed"``.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.bias")
        >>> with timm_peft.disable_adapter(m):
        ...     adapter_state(m)
        'disabled'
    """
    inner = unwrap_features(model)
    if "peft_suspended" in inner.__dict__:
        return "disabled"
    if inner.__dict__.get("_peft_routing") is not None:
        return "routed"
    return "active"


def check_allowed(model: nn.Module, operation: str) -> None:
    """Raise :class:`AdapterStateError` unless the model's state allows ``operation``."""
    state = adapter_state(model)
    if operation in ALLOWED[state]:
        return
    inner = unwrap_features(model)
    if state == "disabled":
        where = ("inside disable_adapter (the model runs its plain base until the block ends, "
                 f"then {inner.peft_suspended!r} comes back)")
    else:
        where = ("inside route (model(x) runs each sample with its own adapter until the block "
                 "ends)")
    allowed = ", ".join(sorted(ALLOWED[state]) + ["reading (get_adapters, active_adapter) and "
                                                  "the forward"])
    raise AdapterStateError(f"{operation} is not allowed {where}; allowed there: {allowed}. "
                            "Call it after the with block.")


@dataclass
class Adapter:
    """One named adapter of a model: its method, config, head size and tensors.

    ``state`` maps the model's tensor names (``named_parameters``/``named_buffers``) to the
    adapter's own tensors; while the adapter is active they *are* the model's.
    """

    method: str
    config: PeftConfig
    num_classes: int | None
    state: dict[str, torch.Tensor]
    pretrained_cfg: dict[str, Any] | None = None
    #: device and dtype of the model when the adapter was last active
    placement: tuple[torch.device, torch.dtype] | None = None

    def structure(self) -> tuple[Any, ...]:
        """What the model's modules depend on: adapters with equal structures switch in place."""
        return self.method, self.config.to_dict(), self.num_classes


# ----------------------------------------------------------------------------------------------
# the model's tensors, by name
# ----------------------------------------------------------------------------------------------

def _owner(inner: nn.Module, name: str) -> tuple[dict[str, Any], str]:
    path, _, attr = name.rpartition(".")
    mod = inner.get_submodule(path) if path else inner
    for table in (mod._parameters, mod._buffers):
        if attr in table:
            return table, attr
    raise KeyError(f"{type(inner).__name__} has no parameter or buffer {name!r}")


# name -> (the owning module's parameter or buffer table, attribute) of the active adapter's
# tensors, per model: switching reads and writes these tables directly. Kept out of the model
# (nothing to pickle), and forgotten whenever a surgery changes the modules.
_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _handles(inner: nn.Module) -> dict[str, tuple[dict[str, Any], str]]:
    # a surgery, a load or E²VPT's pruning gives the model a new key tuple or config object
    token = (id(inner.peft_adapter_keys), id(inner.peft_config))
    token_handles = _HANDLES.get(inner)
    handles = token_handles[1] if token_handles and token_handles[0] == token else None
    if handles is None:
        keys = set(inner.peft_adapter_keys)
        handles = {prefix + attr: (table, attr)
                   for prefix, mod, inside in walk_modules(inner)
                   for table in (mod._parameters, mod._buffers)
                   for attr, t in table.items()
                   if t is not None and (inside or prefix + attr in keys)}
        _HANDLES[inner] = token, handles
    return handles


def _tensor_slots(inner: nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's tensors: its state-dict keys plus everything inside its modules."""
    return {name: table[attr] for name, (table, attr) in _handles(inner).items()}


def _head_slots(inner: nn.Module) -> dict[str, torch.Tensor]:
    ids = {id(h) for h in get_family(inner).classifiers(inner)}
    out: dict[str, torch.Tensor] = {}
    for mod_name, mod in inner.named_modules():
        if id(mod) in ids:
            for n, t in [*mod.named_parameters(), *mod.named_buffers()]:
                out[f"{mod_name}.{n}" if mod_name else n] = t
    return out


def _placement(inner: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    p = next(inner.parameters(), None)
    return None if p is None else (p.device, p.dtype)


def _assign(inner: nn.Module, tensors: dict[str, torch.Tensor], follow: bool = True) -> None:
    """Point the model's modules at ``tensors`` (no copy). With ``follow``, a tensor whose
    device or dtype differs from the one it replaces is converted first (the model was moved or
    cast since its adapter was active)."""
    handles = _handles(inner)
    for name, t in tensors.items():
        table, attr = handles.get(name) or _owner(inner, name)
        current = table[attr]
        if follow and current is not None and (t.device != current.device or (
                t.is_floating_point() and t.dtype != current.dtype)):
            t.data = t.data.to(current.device, current.dtype if t.is_floating_point() else t.dtype)
        table[attr] = t


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, nn.Parameter):
        return nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
    return t.detach().clone()


# ----------------------------------------------------------------------------------------------
# the host: where the adapters live on the model
# ----------------------------------------------------------------------------------------------

def _adapters(model: nn.Module) -> dict[str, Adapter]:
    inner = unwrap_features(model)
    adapters = inner.__dict__.get("peft_adapters")
    if adapters is None:
        if getattr(inner, "peft_config", None) is None:
            raise ValueError(f"{type(inner).__name__} carries no PEFT method: build it with a "
                             "method suffix (e.g. 'vit_base_patch16_224.ssf') first")
        raise ValueError(f"method {inner.peft_method!r} trains the base itself, so the model "
                         "cannot hold other adapters next to it")
    return adapters


def adopt(model: nn.Module, base_names: set[str]) -> None:
    """Make the method just applied the model's ``"default"`` adapter (called by ``apply_method``).

    ``base_names`` are the tensor names the model had before the surgery: those the adapter
    trains are cloned for it, and the base keeps its originals (and its head) for
    :func:`disable_adapter` and :func:`timm_peft.unload`.
    """
    inner = unwrap_features(model)
    if get_method(inner.peft_method).saves_whole_model:
        return
    base = dict(_head_slots(inner))
    own: dict[str, torch.Tensor] = {}
    for name, t in _tensor_slots(inner).items():
        if name in base_names or name in base:
            base.setdefault(name, t)
            own[name] = _own_copy(t)
    for t in base.values():
        t.requires_grad_(False)
    _assign(inner, own)
    inner.peft_base_state = base
    inner.peft_base_num_classes = getattr(inner, "num_classes", None)
    inner.peft_active_adapter = DEFAULT_ADAPTER
    inner.peft_adapters = {DEFAULT_ADAPTER: _capture_active(inner)}


def _capture_active(inner: nn.Module) -> Adapter:
    return Adapter(method=inner.peft_method, config=inner.peft_config,
                   num_classes=getattr(inner, "num_classes", None), state=_tensor_slots(inner),
                   pretrained_cfg=dict(getattr(inner, "pretrained_cfg", None) or {}),
                   placement=_placement(inner))


def _sync(inner: nn.Module) -> None:
    """Bring the active adapter's record up to date (its config and tensors may be replaced
    during training, e.g. by E²VPT's pruning)."""
    name = inner.__dict__.get("peft_active_adapter")
    if isinstance(name, tuple):  # a composition: each member's tensors, by its own names
        slots = _tensor_slots(inner)
        for member in name:
            a = inner.peft_adapters[member]
            a.state = {k: slots[k] for k in a.state}
            a.placement = _placement(inner)
    elif name is not None:
        inner.peft_adapters[name] = _capture_active(inner)


def _set_pretrained_cfg(model: nn.Module, pc: dict[str, Any] | None) -> None:
    if pc is None:
        return
    inner = unwrap_features(model)
    for m in {id(model): model, id(inner): inner}.values():
        m.pretrained_cfg = dict(pc)
        if "default_cfg" in m.__dict__:
            m.default_cfg = m.pretrained_cfg


def _to_base(inner: nn.Module) -> None:
    """Take the active adapters' surgery out (the last applied first) and give the modules the
    base's own tensors."""
    active = inner.__dict__.get("peft_active_adapter")
    methods = ([inner.peft_adapters[n].method for n in active] if isinstance(active, tuple)
               else [inner.peft_method])
    for method in reversed(methods):
        get_method(method).unload(inner)
    inner.peft_method, inner.peft_config, inner.peft_adapter_keys = None, None, ()
    _HANDLES.pop(inner, None)
    n = inner.peft_base_num_classes
    if n is not None and getattr(inner, "num_classes", n) != n:
        inner.reset_classifier(n)
    _assign(inner, {k: v for k, v in inner.peft_base_state.items() if _has(inner, k)})
    inner.requires_grad_(False)


def _has(inner: nn.Module, name: str) -> bool:
    try:
        _owner(inner, name)
    except (KeyError, AttributeError):
        return False
    return True


def _build(model: nn.Module, parts: list[tuple[str, PeftConfig]], num_classes: int | None,
           state: dict[str, torch.Tensor] | None) -> None:
    """Apply ``parts`` (method, config) in order to the base structure and give the modules
    ``state`` (None: a fresh adapter, with its own copies of what it trains of the base)."""
    inner = unwrap_features(model)
    if num_classes is not None and getattr(inner, "num_classes", num_classes) != num_classes:
        inner.reset_classifier(num_classes)
    freeze(inner)
    before = {n for n, _ in [*inner.named_parameters(), *inner.named_buffers()]}
    for method, config in parts:
        get_method(method).apply(inner, config)
        if config.train_head:
            for h in get_family(inner).classifiers(inner):
                unfreeze(h)
    inner.train(inner.training)  # new modules (prompt dropout, a new head) follow the model's mode
    method, config = parts[0]
    inner.peft_method, inner.peft_config = method, config
    inner.peft_adapter_keys = tuple(adapter_keys(inner))
    _HANDLES.pop(inner, None)  # the surgery made new modules
    slots = _tensor_slots(inner)
    if state is None:
        base = inner.peft_base_state
        state = {}
        for name, t in slots.items():
            if base.get(name) is t or (name in before and name not in base):
                state[name] = _own_copy(t)
                base.setdefault(name, t).requires_grad_(False)  # first adapter to train it
    elif set(slots) != set(state):
        raise RuntimeError(f"methods {[m for m, _ in parts]} built other tensors than the adapters "
                           f"hold ({sorted(set(slots) ^ set(state))[:4]}): a method's "
                           "unload/apply does not round-trip, or composed surgeries interfere")
    _assign(inner, state)
    keys = tuple(adapter_keys(inner))  # the assigned tensors' own requires_grad flags
    for m in {id(model): model, id(inner): inner}.values():
        m.peft_method, m.peft_config, m.peft_adapter_keys = method, config, keys
    _HANDLES.pop(inner, None)


def _check_composition(adapters: dict[str, Adapter], names: tuple[str, ...]) -> int | None:
    """Refuse what cannot run together; the head size of the composition."""
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat in {list(names)}")
    members = [adapters[n] for n in names]
    methods = [a.method for a in members]
    if len(set(methods)) != len(methods):
        raise ValueError(f"a composition takes one adapter per method, got methods {methods}")
    for n, a in zip(names, members):
        impl = get_method(a.method)
        if type(impl).training_hooks is not PeftMethod.training_hooks or impl.saves_whole_model:
            raise ValueError(f"adapter {n!r} ({a.method}) brings its own training behaviour "
                             "(optimiser or stages), so it cannot be composed with another")
    seen: dict[str, str] = {}
    for n, a in zip(names, members):
        shared = sorted(k for k in a.state if k in seen)
        if shared:
            raise ValueError(
                f"adapters {seen[shared[0]]!r} and {n!r} both own {shared[:4]}; they compose "
                "only where they train different tensors (e.g. give all but one of them "
                "train_head=False so one head is trained)")
        seen.update({k: n for k in a.state})
    heads = [a for a in members if a.config.train_head]
    return heads[0].num_classes if heads else None


def _compose(model: nn.Module, names: tuple[str, ...]) -> None:
    """Apply several adapters' methods in order on the base structure, each with its tensors."""
    inner = unwrap_features(model)
    members = [inner.peft_adapters[n] for n in names]
    num_classes = _check_composition(inner.peft_adapters, names)
    _build(model, [(a.method, a.config) for a in members],
           inner.peft_base_num_classes if num_classes is None else num_classes,
           {k: t for a in members for k, t in a.state.items()})


def _activate(model: nn.Module, name: str | tuple[str, ...]) -> None:
    """Build the adapter (or composition) ``name`` on the base structure and make it active."""
    inner = unwrap_features(model)
    if isinstance(name, tuple):
        _compose(model, name)
    else:
        a = inner.peft_adapters[name]
        _build(model, [(a.method, a.config)], a.num_classes, a.state)
    inner.peft_active_adapter = name


def composed(model: nn.Module) -> bool:
    """Whether several adapters are active together (see :func:`set_adapter`).

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.ssf", num_classes=3)
        >>> _ = timm_peft.add_adapter(m, "b", dict(train_head=False), method="vpt")
        >>> composed(timm_peft.set_adapter(m, ["default", "b"]))
        True
    """
    return isinstance(unwrap_features(model).__dict__.get("peft_active_adapter"), tuple)


# ----------------------------------------------------------------------------------------------
# public API (peft's names)
# ----------------------------------------------------------------------------------------------

def active_adapter(model: nn.Module) -> str | tuple[str, ...]:
    """Name of the model's active adapter (a tuple of names while several are composed).

    Example:
        >>> import timm, timm_peft
        >>> timm_peft.active_adapter(timm.create_model("resnet18.bias"))
        'default'
    """
    _adapters(model)
    return unwrap_features(model).peft_active_adapter


def get_adapters(model: nn.Module) -> dict[str, Adapter]:
    """The model's adapters by name (method, config, head size, tensors), active one included.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.bias", num_classes=10)
        >>> {k: (a.method, a.num_classes) for k, a in timm_peft.get_adapters(m).items()}
        {'default': ('bias', 10)}
    """
    _adapters(model)
    _sync(unwrap_features(model))
    return dict(unwrap_features(model).peft_adapters)


def _check_name(adapter_name: Any) -> None:
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise ValueError(f"adapter_name must be an identifier-like string (letters, digits, _), "
                         f"got {adapter_name!r}")


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> nn.Module:
    """Make ``adapter_name`` the active adapter: the model computes, trains and saves it.

    Only the active adapter's parameters are in ``model.parameters()``, so build the optimiser
    after switching (as with peft). Switching never copies a tensor: adapters of one method and
    config trade places in microseconds; another method, config or head size redoes the
    method's surgery on the same base weights.

    A list of names *composes* adapters of different methods: their surgeries are applied in
    that order and all of them compute and train together (e.g. SSF on the operations and VPT
    prompts on the tokens). They compose where they own different tensors, so at most one of
    them trains the head (create the others with ``train_head=False``), and where no member
    brings its own training behaviour (LION's optimiser, E²VPT's stages); otherwise a clear
    error, before the model is touched. ``save_pretrained`` saves each member on its own;
    merging and routing take one adapter at a time.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.bias", num_classes=3)
        >>> _ = timm_peft.add_adapter(m, "b", num_classes=7)
        >>> timm_peft.set_adapter(m, "b").num_classes
        7
    """
    adapters = _adapters(model)
    inner = unwrap_features(model)
    check_allowed(model, "set_adapter")
    if not isinstance(adapter_name, str):
        # an ordered collection of names (the composition's order); a set has none
        if not isinstance(adapter_name, (Sequence, KeysView)) or not all(
                isinstance(n, str) for n in adapter_name):
            raise TypeError(f"set_adapter takes an adapter name or a list of names to compose, "
                            f"got {adapter_name!r}; the model has {list(adapters)}")
        names = tuple(adapter_name)
        if not names:
            raise ValueError(f"set_adapter got an empty list: give an adapter name or a list of "
                             f"names to compose; the model has {list(adapters)}")
        unknown = [n for n in names if n not in adapters]
        if unknown:
            raise KeyError(f"no adapter(s) {unknown}; the model has {list(adapters)}")
        if len(names) > 1:
            if names == inner.peft_active_adapter:
                return model
            _check_composition(adapters, names)  # before the model is touched
            _sync(inner)
            _to_base(inner)
            _compose(model, names)
            inner.peft_active_adapter = names
            return model
        adapter_name = names[0]
    if adapter_name not in adapters:
        raise KeyError(f"no adapter {adapter_name!r}; the model has {list(adapters)}")
    if adapter_name == inner.peft_active_adapter:
        return model
    _sync(inner)
    target = adapters[adapter_name]
    active = inner.peft_active_adapter
    if not isinstance(active, tuple) and adapters[active].structure() == target.structure():
        _assign(inner, target.state, follow=target.placement != _placement(inner))
        for m in {id(model): model, id(inner): inner}.values():
            m.peft_config = target.config
    else:
        _to_base(inner)
        _build(model, [(target.method, target.config)], target.num_classes, target.state)
    _set_pretrained_cfg(model, target.pretrained_cfg)
    inner.peft_active_adapter = adapter_name
    return model


def _config_for(method: str | None, peft_cfg: PeftConfig | dict[str, Any] | None,
                default_method: str) -> tuple[str, PeftConfig]:
    if method is None and isinstance(peft_cfg, PeftConfig):
        from .core import _METHODS
        owners = [n for n, impl in _METHODS.items() if type(peft_cfg) is impl.config_cls]
        if len(owners) != 1:
            raise ValueError(f"cannot tell the method of a {type(peft_cfg).__name__}; pass method=")
        method = owners[0]
    name = method or default_method
    return resolve_method(name)[0], _make_config(name, peft_cfg)


def add_adapter(model: nn.Module, adapter_name: str,
                peft_cfg: PeftConfig | dict[str, Any] | None = None, *, method: str | None = None,
                num_classes: int | None = None) -> nn.Module:
    """Add a fresh, trainable adapter; the active adapter stays active (peft's behaviour).

    ``method`` is a method or preset name (default: the config's method, else the active
    adapter's); ``num_classes`` sizes its head (default: the head the base was built with).

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.ssf", num_classes=3)
        >>> _ = timm_peft.add_adapter(m, "birds", num_classes=200)
        >>> _ = timm_peft.add_adapter(m, "bias_only", method="bias")
        >>> sorted(timm_peft.get_adapters(m))
        ['bias_only', 'birds', 'default']
    """
    adapters = _adapters(model)
    inner = unwrap_features(model)
    check_allowed(model, "add_adapter")
    _check_name(adapter_name)
    if adapter_name in adapters:
        raise ValueError(f"the model already has an adapter {adapter_name!r}; delete_adapter it "
                         "first or choose another name")
    method_name, config = _config_for(method, peft_cfg, inner.peft_method)
    if get_method(method_name).saves_whole_model:
        raise ValueError(f"method {method_name!r} trains the base itself and cannot be added "
                         "as one adapter among others")
    if num_classes is None:
        num_classes = inner.peft_base_num_classes
    elif not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
    _sync(inner)
    previous = inner.peft_active_adapter
    pc = dict(getattr(inner, "pretrained_cfg", None) or {})
    _to_base(inner)
    try:
        _build(model, [(method_name, config)], num_classes, None)
    except BaseException:
        # the method refused this model (e.g. a capability its family lacks): take out what its
        # surgery may have done and give the previous adapter back
        with contextlib.suppress(Exception):
            get_method(method_name).unload(inner)
        _HANDLES.pop(inner, None)
        _activate(model, previous)
        _set_pretrained_cfg(model, pc)
        raise
    created = _capture_active(inner)
    pc = dict(pc)
    pc.pop("label_names", None)
    pc["num_classes"] = num_classes
    created.pretrained_cfg = pc
    adapters[adapter_name] = created
    inner.peft_active_adapter = adapter_name
    set_adapter(model, previous)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an adapter and free its tensors; deleting the active one activates the first left.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.bias")
        >>> _ = timm_peft.add_adapter(m, "b")
        >>> sorted(timm_peft.get_adapters(timm_peft.delete_adapter(m, "default")))
        ['b']
    """
    adapters = _adapters(model)
    inner = unwrap_features(model)
    check_allowed(model, "delete_adapter")
    if adapter_name not in adapters:
        raise KeyError(f"no adapter {adapter_name!r}; the model has {list(adapters)}")
    if len(adapters) == 1:
        raise ValueError(f"{adapter_name!r} is the model's only adapter; use timm_peft.unload "
                         "to get the plain base back")
    active = inner.peft_active_adapter
    if adapter_name == active or (isinstance(active, tuple) and adapter_name in active):
        set_adapter(model, next(n for n in adapters if n != adapter_name))
    del adapters[adapter_name]
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the plain base inside the block: no adapter, the base's own head and tensors.

    The base head is the one the model was built with (the pretrained classifier when it was
    built with the pretrained class count). The active adapter comes back on exit. Inside the
    block the adapters cannot change (adding, switching, deleting, routing, saving raise
    :class:`AdapterStateError`); a nested ``disable_adapter`` block changes nothing.

    Example:
        >>> import copy, timm, timm_peft, torch
        >>> plain = timm.create_model("resnet18", num_classes=3).eval()
        >>> m = timm_peft.apply_method(copy.deepcopy(plain), "ssf")
        >>> x = torch.randn(1, 3, 64, 64)
        >>> with timm_peft.disable_adapter(m):
        ...     type(m).__name__, torch.equal(m(x), plain(x))
        ('ResNet', True)
    """
    _adapters(model)
    inner = unwrap_features(model)
    check_allowed(model, "disable_adapter")
    if adapter_state(model) == "disabled":  # nested: the model already runs its plain base
        yield model
        return
    _sync(inner)
    name = inner.peft_active_adapter
    pc = dict(getattr(inner, "pretrained_cfg", None) or {})
    _to_base(inner)
    inner.peft_active_adapter = None
    inner.peft_suspended = name
    for m in {id(model): model, id(inner): inner}.values():
        m.peft_method = m.peft_config = None
        m.peft_adapter_keys = ()
    try:
        yield model
    finally:
        del inner.peft_suspended
        _activate(model, name)
        _set_pretrained_cfg(model, pc)


@contextlib.contextmanager
def using_adapter(model: nn.Module, adapter_name: str) -> Iterator[nn.Module]:
    """Make ``adapter_name`` active inside the block, the previous one again after it.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.bias", num_classes=3)
        >>> _ = timm_peft.add_adapter(m, "b", num_classes=4)
        >>> with using_adapter(m, "b"):
        ...     m.num_classes
        4
    """
    check_allowed(model, "using_adapter")
    previous = active_adapter(model)
    set_adapter(model, adapter_name)
    try:
        yield model
    finally:
        # the block may have deleted an adapter or failed halfway: never leave a missing one
        left = unwrap_features(model).peft_adapters
        if all(n in left for n in (previous if isinstance(previous, tuple) else (previous,))):
            set_adapter(model, previous)


# ----------------------------------------------------------------------------------------------
# per-sample routing
# ----------------------------------------------------------------------------------------------

class RoutedModel(Swappable):
    """While :func:`route` is open, ``model(x)`` runs each sample with its own adapter."""

    prefix = "Routed"
    method = "timm_peft routing"
    refs = ("_peft_routing",)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routing = self.__dict__.get("_peft_routing")
        if routing is None or routing.inside:
            return super().forward(*args, **kwargs)
        return routing(*args, **kwargs)

    def _refuse(self, what: str) -> None:
        routing = self.__dict__.get("_peft_routing")
        if routing is not None and not routing.inside:
            raise RuntimeError(f"{what} is not routed per sample: inside timm_peft.route only "
                               "model(x) is; call it outside the route block")

    def forward_features(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse("forward_features")
        return super().forward_features(*args, **kwargs)

    def forward_head(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse("forward_head")
        return super().forward_head(*args, **kwargs)

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse("forward_intermediates")
        return super().forward_intermediates(*args, **kwargs)


class Routing:
    """What :func:`route` yields: the per-sample adapters and their class counts.

    Attributes:
        adapter_names: the adapter of each sample, in batch order.
        num_classes: ``LongTensor`` of each sample's class count; ``logits[i, :num_classes[i]]``
            are sample ``i``'s logits, the rest of its row is ``-inf``.
    """

    def __init__(self, model: nn.Module, adapter_names: Sequence[str]) -> None:
        self.model = model
        self.adapter_names = list(adapter_names)
        self.inside = False
        adapters = _adapters(model)
        unknown = sorted({n for n in self.adapter_names if n not in adapters})
        if unknown:
            raise KeyError(f"no adapter(s) {unknown}; the model has {list(adapters)}")
        self.unique = list(dict.fromkeys(self.adapter_names))
        first = adapters[self.unique[0]]
        for n in self.unique[1:]:
            a = adapters[n]
            if (a.method, a.config.to_dict()) != (first.method, first.config.to_dict()):
                diff = sorted(k for k, v in a.config.to_dict().items()
                              if first.config.to_dict().get(k) != v) if a.method == first.method \
                    else ["method"]
                raise ValueError(
                    f"route runs one backbone pass, so its adapters must share one method and "
                    f"config: {n!r} ({a.method}) differs from {self.unique[0]!r} ({first.method}) "
                    f"in {diff}; route them in separate batches")
        self.num_classes = torch.tensor([adapters[n].num_classes or 0 for n in self.adapter_names])
        self._index = torch.tensor([self.unique.index(n) for n in self.adapter_names])
        self._banks, self._shared = self._stack([adapters[n] for n in self.unique])

    def _stack(self, adapters: list[Adapter]) -> tuple[dict[str, torch.Tensor],
                                                       dict[str, torch.Tensor]]:
        inner = unwrap_features(self.model)
        heads = set(_head_slots(inner))
        banks, shared = {}, {}
        for name in adapters[0].state:
            ts = [a.state[name] for a in adapters]
            if not ts[0].is_floating_point():
                if any(t.shape != ts[0].shape or not torch.equal(t, ts[0]) for t in ts[1:]):
                    raise ValueError(f"adapters {self.unique} differ in the structural tensor "
                                     f"{name!r}; route them in separate batches")
                shared[name] = ts[0]
                continue
            if len({tuple(t.shape) for t in ts}) > 1:
                if name not in heads:
                    raise ValueError(f"adapters {self.unique} hold {name!r} in different shapes "
                                     f"{[tuple(t.shape) for t in ts]}; route them separately")
                rows = max(t.shape[0] for t in ts)
                ts = [torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) for t in ts]
            banks[name] = torch.stack(ts)
        return banks, shared

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        from torch.func import functional_call, vmap
        if x.shape[0] != len(self.adapter_names):
            raise ValueError(f"the batch has {x.shape[0]} samples but route was given "
                             f"{len(self.adapter_names)} adapter names")
        index = self._index.to(x.device)
        params = {k: b.to(x.device)[index] for k, b in self._banks.items()}
        model, shared = self.model, self._shared

        def one(p: dict[str, torch.Tensor], xi: torch.Tensor) -> Any:
            out = functional_call(model, {**p, **shared}, (xi.unsqueeze(0), *args), kwargs,
                                  strict=False)
            return torch.utils._pytree.tree_map(lambda t: t.squeeze(0), out)

        self.inside = True
        try:
            with contextlib.ExitStack() as stack, warnings.catch_warnings():
                # torch's note that its CPU flash-attention kernel has no batching rule (it
                # loops over samples; measured in benchmarks/results/serving.md)
                warnings.filterwarnings("ignore", message="There is a performance drop because "
                                        "we have not yet implemented the batching rule")
                for m in model.modules():  # modules whose forward needs a vmap-safe variant
                    if hasattr(m, "vmap_context"):
                        stack.enter_context(m.vmap_context())
                out = vmap(one, randomness="different")(params, x)
        finally:
            self.inside = False
        counts = self.num_classes.to(x.device)
        if isinstance(out, torch.Tensor) and out.dim() == 2 and bool((counts != out.shape[1]).any()):
            pad = torch.arange(out.shape[1], device=x.device)[None, :] >= counts[:, None]
            out = out.masked_fill(pad, float("-inf"))
        return out


@contextlib.contextmanager
def route(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[Routing]:
    """Inside the block, ``model(x)`` runs sample ``i`` with adapter ``adapter_names[i]``.

    One backbone pass for the whole batch (the forward is vectorised over samples), each sample
    computed as if it ran alone with its adapter: prompts, key-value prompts, scale-shift
    factors, LION's prompt layers and gates, biases and heads are all per sample. The adapters
    must share one method and config (heads may differ in size: missing classes are ``-inf``).
    Gradients reach every routed adapter, so a mixed batch can also train several of them.

    Example:
        >>> import timm, timm_peft, torch
        >>> m = timm.create_model("resnet18.bias", num_classes=3).eval()
        >>> _ = timm_peft.add_adapter(m, "b", num_classes=2)
        >>> with timm_peft.route(m, ["b", "default", "b"]) as r:
        ...     out = m(torch.randn(3, 3, 32, 32))
        >>> out.shape, bool(out[0, 2].isinf())
        (torch.Size([3, 3]), True)
    """
    if unwrap_features(model) is not model:
        raise ValueError("route works on a classification model, not a features_only wrapper")
    check_allowed(model, "route")
    if isinstance(adapter_names, str):
        raise TypeError(f"route takes one adapter name per sample (a list), got the string "
                        f"{adapter_names!r}; for a batch of n samples of one adapter pass "
                        f"[{adapter_names!r}] * n, or use set_adapter")
    names = list(adapter_names) if isinstance(adapter_names, Sequence) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a non-empty list of adapter names, one per "
                        f"sample, got {adapter_names!r}")
    previous = active_adapter(model)
    set_adapter(model, names[0])
    try:
        _sync(model)
        routing = Routing(model, names)
    except Exception:
        set_adapter(model, previous)
        raise
    swap_class(model, RoutedModel, _peft_routing=routing)
    try:
        yield routing
    finally:
        restore_class(model, RoutedModel)
        set_adapter(model, previous)
