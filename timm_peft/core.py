"""Method registry, configs, model families, freezing and parameter accounting.

Everything here is method-agnostic: a method registers a :class:`PeftMethod` subclass that brings
its config, its surgery and its optional behaviours (merge, custom adapter state, training hooks),
and shared code only ever calls those hooks. Nothing in this module branches on a method's name.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

from .families import Family, get_family, family_of_arch, list_families, GENERIC
from .layers.swap import (AdapterModule, Swappable, is_swapped, restore_class, restore_classes,
                          swap_class)

__all__ = [
    "PeftConfig", "PeftMethod", "AdapterModule", "FrozenNorm", "cfg_field",
    "register_method", "register_preset", "list_methods", "get_method", "resolve_method",
    "get_model_family", "get_blocks", "freeze", "unfreeze", "apply_method", "get_peft_config",
    "get_nb_trainable_parameters", "print_trainable_parameters", "adapter_keys",
    "merge", "unmerge", "merge_and_unload", "unload",
]


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

def cfg_field(
        default: Any = dataclasses.MISSING,
        *,
        ge: float | None = None,
        gt: float | None = None,
        le: float | None = None,
        lt: float | None = None,
        choices: Iterable[Any] | None = None,
        help: str = "",
        default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field whose value :class:`PeftConfig` checks on construction.

    Example:
        >>> @dataclass
        ... class MyConfig(PeftConfig):
        ...     num_prompts: int = cfg_field(50, ge=0, help="prompt tokens per layer")
    """
    meta = dict(ge=ge, gt=gt, le=le, lt=lt, choices=tuple(choices) if choices is not None else None,
                help=help)
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # an int is a fine float, a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        if not isinstance(value, origin):
            return False
        args = typing.get_args(tp)
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args))
        return all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _from_json(value: Any, tp: Any) -> Any:
    """``value`` with lists turned into tuples wherever ``tp`` declares a tuple."""
    if not isinstance(value, list):
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is tuple:
                return _from_json(value, arg)
        return value
    if origin is not tuple:
        return value
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_from_json(v, args[0]) for v in value)
    if len(args) == len(value):
        return tuple(_from_json(v, a) for v, a in zip(value, args))
    return tuple(value)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclass
class PeftConfig:
    """Base class of every method's hyper-parameters.

    Subclasses are dataclasses whose fields use :func:`cfg_field` to declare allowed values; the
    values are validated on construction, so a bad config never reaches a model.

    Example:
        >>> from timm_peft.methods.baselines import PartialConfig
        >>> PartialConfig(num_blocks=2).num_blocks
        2
    """

    train_head: bool = cfg_field(True, help="train the classifier head along with the method")

    def __post_init__(self) -> None:
        # JSON has no tuples: accept lists where a tuple is declared (alone or in a union,
        # e.g. ``int | tuple[int, int] | None``), nested ones included.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _from_json(getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range; subclasses may add cross-field checks."""
        hints = typing.get_type_hints(type(self))
        name = type(self).__name__
        for f in dataclasses.fields(self):
            value, meta, tp = getattr(self, f.name), f.metadata, hints[f.name]
            if not _type_ok(value, tp):
                raise TypeError(f"{name}.{f.name} must be {_type_name(tp)}, got {value!r} "
                                f"({type(value).__name__})")
            if value is None:
                continue
            choices = meta.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"{name}.{f.name} must be one of {list(choices)}, got {value!r}")
            bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                      ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
            for key, ok, sym in bounds:
                bound = meta.get(key)
                if bound is None:
                    continue
                items = value if isinstance(value, (tuple, list)) else (value,)
                for v in items:
                    if isinstance(v, (int, float)) and not ok(v, bound):
                        raise ValueError(f"{name}.{f.name} must be {sym} {bound}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PeftConfig":
        """Build from a dict, rejecting unknown keys with the list of allowed ones.

        Example:
            >>> from timm_peft.methods.baselines import PartialConfig
            >>> PartialConfig.from_dict({"num_blocks": 3}).num_blocks
            3
        """
        if not isinstance(values, dict):
            raise TypeError(f"{cls.__name__} values must be a dict, got {type(values).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {allowed}")
        return cls(**values)

    def replace(self, **changes: Any) -> "PeftConfig":
        """A validated copy with some fields changed."""
        return type(self).from_dict({**dataclasses.asdict(self), **changes})


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------
# Model families (the family wing answers; these are shortcuts for shared code)
# ----------------------------------------------------------------------------------------------

def unwrap_features(model: nn.Module) -> nn.Module:
    """The timm model inside a ``features_only`` wrapper.

    Only ``FeatureGetterNet`` keeps the whole model (and its ``forward_intermediates``); the other
    wrappers hold loose pieces of it that no surgery can understand, so they are refused.
    """
    from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet
    if isinstance(model, FeatureGetterNet):
        return model.model
    if isinstance(model, (FeatureDictNet, FeatureHookNet)):
        raise ValueError(f"a PEFT method needs the whole model inside features_only, but "
                         f"{type(model).__name__} keeps only its pieces; build it with "
                         "feature_cls='getter'")
    return model


def get_model_family(model: nn.Module) -> str:
    """Name of the model's family (``"generic"`` when no registered family claims it).

    Example:
        >>> import timm
        >>> get_model_family(timm.create_model("resnet18"))
        'resnet'
    """
    return get_family(model).name


def get_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's residual blocks in forward order, as its family sees them."""
    fam = get_family(model)
    blocks = fam.blocks(unwrap_features(model))
    if blocks is None:
        raise ValueError(f"the {fam.name!r} family cannot locate the blocks of "
                         f"{type(unwrap_features(model)).__name__} (no group_matcher that numbers "
                         "them)")
    return blocks


# ----------------------------------------------------------------------------------------------
# Freezing
# ----------------------------------------------------------------------------------------------

class FrozenNorm(Swappable):
    """A frozen BatchNorm: it keeps using, and never updates, its running statistics.

    The statistics belong to the frozen base, so training must not change them behind the
    adapter's back: ``train(mode)`` leaves the norm in eval mode.
    """

    prefix = "Frozen"
    fx_transparent = True  # the computation is the norm's own (in eval mode)

    def train(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self, False)


def freeze(module: nn.Module) -> None:
    """Stop training ``module``: no gradients, and BatchNorm statistics held fixed (eval mode).

    Example:
        >>> import timm
        >>> m = timm.create_model("resnet18"); freeze(m)
        >>> any(p.requires_grad for p in m.parameters())
        False
    """
    module.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not is_swapped(m, FrozenNorm):
            swap_class(m, FrozenNorm)
            m.train(False)


def unfreeze(module: nn.Module) -> None:
    """Undo :func:`freeze` for ``module`` and everything in it."""
    module.requires_grad_(True)
    for m in module.modules():
        restore_class(m, FrozenNorm)


# ----------------------------------------------------------------------------------------------
# Methods and the registry
# ----------------------------------------------------------------------------------------------

class PeftMethod:
    """A parameter-efficient fine-tuning method: its config, its surgery and its behaviours.

    Subclass, set the class attributes, implement :meth:`apply` and decorate with
    :func:`register_method`. Optional hooks have generic defaults that suit most methods.

    Example:
        >>> @register_method
        ... class HeadOnly(PeftMethod):
        ...     name = "head_only_example"
        ...     config_cls = PeftConfig
        ...     def apply(self, model, config):
        ...         return model  # the head is unfrozen by the shared code
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[PeftConfig]] = PeftConfig
    #: one line for listings and model cards
    description: ClassVar[str] = ""
    #: the paper, one line (model cards); None: the method module's opening paragraph
    paper: ClassVar[str | None] = None
    #: BibTeX of the paper (model cards)
    citation: ClassVar[str | None] = None
    #: True when the saved adapter is the whole model (the user is told so)
    saves_whole_model: ClassVar[bool] = False

    def apply(self, model: nn.Module, config: PeftConfig) -> nn.Module:
        """Insert the method's modules into a frozen ``model`` and unfreeze what it trains.

        Ask :func:`timm_peft.families.get_family` about the model's structure; where the family
        cannot answer, raise :func:`timm_peft.families.refuse`'s error.
        """
        raise NotImplementedError

    def supports(self, family: Family) -> bool:
        """Whether every model of ``family`` can take the method (from ``family.capabilities``,
        without building a model); drives :func:`timm_peft.list_models`. Default: any model."""
        return True

    @property
    def families(self) -> tuple[str, ...] | None:
        """Registered families the method supports; None when it supports any timm model."""
        if self.supports(GENERIC):
            return None
        return tuple(f for f in list_families() if self.supports(get_family(f).widest()))

    # --- optional behaviours ------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold the adapter into the base weights in place (inference costs nothing extra)."""
        raise NotImplementedError(f"method {self.name!r} cannot be merged into the base weights")

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge` in place so training can resume."""
        raise NotImplementedError(f"method {self.name!r} cannot be merged into the base weights")

    def unload(self, model: nn.Module) -> nn.Module:
        """Remove the adapter's modules, returning the plain timm model (adapter discarded)."""
        if any(isinstance(m, AdapterModule) for m in model.modules()):
            raise NotImplementedError(f"method {self.name!r} does not implement unload")
        return model

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that make up the saved adapter (default: :func:`adapter_keys`)."""
        state = model.state_dict()
        return {k: state[k] for k in model.peft_adapter_keys}

    def prepare_load(self, model: nn.Module, config: PeftConfig) -> None:
        """Called before loading an adapter saved with ``config`` onto ``model`` (e.g. to reshape)."""

    def training_hooks(self, model: nn.Module) -> dict[str, Any]:
        """What the training loop needs from the method beyond a plain optimiser step.

        Keys understood by :mod:`timm_peft.train` (all optional, the default needs nothing):

        * ``"optimizer_wrapper"``: ``callable(optimizer, model) -> optimizer``, wraps the
          optimiser the loop built (e.g. LION's robust update rule).
        * ``"no_weight_decay"``: set of parameter names to exclude from weight decay (on top of
          the loop's own rule: 1-D tensors).
        * ``"stages"``: list of ``(name, callable(model, ctx))`` run in order after the main
          training; ``ctx`` has ``train_loader``, ``loss_fn``, ``device`` and
          ``fit(model, epochs, desc)`` which re-runs the standard loop with a fresh optimiser over
          the currently trainable parameters (e.g. E²VPT's score → prune → rewind); also
          ``epochs`` (of the main training), ``val_loader``, ``autocast()`` and ``all_reduce(t)``
          (sums a tensor over ``torchrun`` processes; identity on one), see
          :class:`timm_peft.train.StageContext`.
        * ``"metrics"``: ``callable(reset: bool) -> dict[str, float]``, the method's own
          statistics (e.g. LION's solver iterations). The loop calls it with ``reset=True``
          before each training epoch and logs what it returns after the epoch under
          ``"<method>/<key>"`` in the run's JSON log.
        """
        return {}


_METHODS: dict[str, PeftMethod] = {}
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}


def register_method(cls: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator registering a :class:`PeftMethod` (also as a preset of its own name)."""
    if not getattr(cls, "name", None) or not cls.name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be an identifier, got {getattr(cls, 'name', None)!r}")
    if cls.name in _PRESETS and _PRESETS[cls.name][0] != cls.name:
        raise ValueError(f"{cls.name!r} is already a preset of method {_PRESETS[cls.name][0]!r}")
    _METHODS[cls.name] = cls()
    _PRESETS[cls.name] = (cls.name, {})
    return cls


def register_preset(name: str, method: str, **overrides: Any) -> None:
    """Register ``name`` as ``method`` with some config fields changed (e.g. ``vpt_shallow``).

    Example:
        >>> register_preset("partial_2", "partial", num_blocks=2)
    """
    if method not in _METHODS:
        raise KeyError(f"unknown method {method!r}; registered: {sorted(_METHODS)}")
    if name in _METHODS and name != method:
        raise ValueError(f"{name!r} is a method: a preset cannot take its name")
    _METHODS[method].config_cls(**overrides)  # validate now, not at first use
    _PRESETS[name] = (method, dict(overrides))


def list_methods() -> list[str]:
    """Names of all registered methods and presets, usable as a model-name suffix.

    Example:
        >>> "linear" in list_methods()
        True
    """
    return sorted(_PRESETS)


def get_method(name: str) -> PeftMethod:
    """The registered :class:`PeftMethod` for a method or preset name."""
    return _METHODS[resolve_method(name)[0]]


def resolve_method(name: str) -> tuple[str, dict[str, Any]]:
    """``(method name, preset overrides)`` for a method or preset name; unknown names list the known."""
    if not isinstance(name, str) or name not in _PRESETS:
        raise ValueError(f"unknown PEFT method {name!r}; registered methods: {list_methods()}")
    method, overrides = _PRESETS[name]
    return method, dict(overrides)


def _make_config(name: str, peft_cfg: PeftConfig | dict[str, Any] | None) -> PeftConfig:
    method_name, overrides = resolve_method(name)
    method = _METHODS[method_name]
    if isinstance(peft_cfg, PeftConfig):
        if not isinstance(peft_cfg, method.config_cls):
            raise TypeError(f"peft_cfg is a {type(peft_cfg).__name__}, method {name!r} takes "
                            f"{method.config_cls.__name__}")
        return peft_cfg
    if peft_cfg is not None and not isinstance(peft_cfg, dict):
        raise TypeError(f"peft_cfg must be a dict or {method.config_cls.__name__}, "
                        f"got {type(peft_cfg).__name__}")
    return method.config_cls.from_dict({**overrides, **(peft_cfg or {})})


# ----------------------------------------------------------------------------------------------
# Surgery entry point
# ----------------------------------------------------------------------------------------------

def walk_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
    """``(name prefix, module, inside an AdapterModule)`` for each module once, in
    ``named_modules`` order (a module shared by two paths counts at the first); the prefix is
    ``""`` or ``"a.b."``, ready to put in front of a parameter's name.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.ssf")
        >>> [p for p, _, inside in walk_modules(m) if inside][:2]
        ['bn1.ssf.', 'layer1.0.bn1.ssf.']
    """
    seen: set[int] = set()

    def walk(mod: nn.Module, prefix: str, inside: bool) -> Iterator[tuple[str, nn.Module, bool]]:
        if id(mod) in seen:
            return
        seen.add(id(mod))
        inside = inside or isinstance(mod, AdapterModule)
        yield prefix, mod, inside
        for name, child in mod._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}{name}.", inside)

    return walk(model, "", False)


def adapter_keys(model: nn.Module) -> list[str]:
    """State-dict keys that are task-specific right now.

    A key is adapter state if it is a trainable parameter, belongs to a module a method inserted
    (:class:`AdapterModule`), or is a buffer of a module all of whose parameters train (e.g. the
    running statistics of a BatchNorm in an unfrozen block). A tensor the state dict names more
    than once (a module or parameter shared by two paths) gets one key, its first name: loading
    it sets every alias, and a saved file holds each tensor once.
    """
    keys: set[str] = set()
    for prefix, mod, inside_adapter in walk_modules(model):
        params = list(mod.named_parameters(recurse=False))
        all_train = bool(params) and all(p.requires_grad for _, p in params)
        for n, p in params:
            if p.requires_grad or inside_adapter:
                keys.add(prefix + n)
        for n, b in mod.named_buffers(recurse=False):
            if b is not None and (inside_adapter or all_train) and n not in mod._non_persistent_buffers_set:
                keys.add(prefix + n)
    out, seen = [], set()
    for k, t in model.state_dict(keep_vars=True).items():
        if k in keys and id(t) not in seen:
            seen.add(id(t))
            out.append(k)
    return out


def apply_method(
        model: nn.Module,
        method: str,
        peft_cfg: PeftConfig | dict[str, Any] | None = None,
) -> nn.Module:
    """Freeze ``model`` and apply a registered PEFT method to it.

    This is the model-surgery entry point that ``timm.create_model("<arch>.<method>")`` uses; call
    it yourself for a model built some other way. The config is kept as ``model.peft_config``.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18", num_classes=10)
        >>> m = timm_peft.apply_method(m, "linear")
        >>> timm_peft.get_nb_trainable_parameters(m)[0]
        5130
    """
    config = _make_config(method, peft_cfg)
    method_name = resolve_method(method)[0]
    impl = _METHODS[method_name]
    _check_state(model, "apply_method")  # inside disable_adapter the model has no config
    if getattr(model, "peft_config", None) is not None:
        raise ValueError(f"model already carries PEFT method {model.peft_method!r}; "
                         "build a fresh model to apply another")
    target = unwrap_features(model)
    freeze(target)
    base_names = {n for n, _ in [*target.named_parameters(), *target.named_buffers()]}
    out = impl.apply(target, config)
    if out is not target:
        raise RuntimeError(f"method {method_name!r} must modify the model in place and return it")
    if config.train_head:
        for h in get_family(target).classifiers(target):  # two in distilled models, VOLO's aux
            unfreeze(h)
    for m in (target, model):
        m.peft_method = method_name
        m.peft_config = config
        m.peft_adapter_keys = tuple(adapter_keys(target))
    from .adapters import adopt
    adopt(model, base_names)
    return model


def get_peft_config(model: nn.Module) -> PeftConfig:
    """The config of the method applied to ``model``; a clear error for a plain model."""
    cfg = getattr(model, "peft_config", None)
    if cfg is None and "peft_suspended" in unwrap_features(model).__dict__:
        raise _state_error(model, "using the adapter")
    if cfg is None:
        raise ValueError(f"{type(model).__name__} carries no PEFT method: build it with a method "
                         f"suffix (e.g. 'vit_base_patch16_224.linear') or timm_peft.apply_method")
    return cfg


def _state_error(model: nn.Module, operation: str) -> Exception:
    from .adapters import AdapterStateError, check_allowed
    try:
        check_allowed(model, operation)
    except AdapterStateError as e:
        return e
    raise AssertionError("only called where the state refuses")  # pragma: no cover


def _check_state(model: nn.Module, operation: str) -> None:
    if unwrap_features(model).__dict__.get("peft_adapters") is not None:
        from .adapters import check_allowed
        check_allowed(model, operation)


def _method_of(model: nn.Module, operation: str) -> PeftMethod:
    _check_state(model, operation)
    get_peft_config(model)
    if isinstance(unwrap_features(model).__dict__.get("peft_active_adapter"), tuple):
        raise ValueError(f"adapters {list(unwrap_features(model).peft_active_adapter)} are "
                         "composed: merge one at a time (timm_peft.set_adapter(model, name) first)")
    return _METHODS[model.peft_method]


# ----------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------

def _unique_params(model: nn.Module) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for p in model.parameters():  # parameters() already de-duplicates shared tensors
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each shared tensor counted once (peft's name).

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("vit_base_patch16_224.linear", num_classes=100)
        >>> timm_peft.get_nb_trainable_parameters(m)[0]
        76900
    """
    trainable = total = 0
    for p in _unique_params(model):
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print trainable and total parameter counts as peft does.

    Example:
        >>> import timm, timm_peft
        >>> timm_peft.print_trainable_parameters(timm.create_model("resnet18.linear", num_classes=10))
        trainable params: 5,130 || all params: 11,181,642 || trainable%: 0.0459
    """
    trainable, total = get_nb_trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")


# ----------------------------------------------------------------------------------------------
# Merge / unload (each method brings its own behaviour)
# ----------------------------------------------------------------------------------------------

def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights in place; :func:`unmerge` undoes it."""
    _method_of(model, "merge").merge(unwrap_features(model))
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` in place so training can resume."""
    _method_of(model, "unmerge").unmerge(unwrap_features(model))
    return model


# create_model keywords that only timm_peft understands (the method, its config, the adapter-repo
# marker of timm_peft.io); timm records them in ``_model_args``
_PEFT_MODEL_ARGS = ("peft", "peft_cfg", "timm_peft_adapter")


def _strip(model: nn.Module) -> nn.Module:
    """Make a plain timm model again: its recorded args must not ask for timm_peft."""
    # the frozen norms go back to their timm class: nothing of timm_peft is left to pickle
    restore_classes(unwrap_features(model))
    for m in {id(model): model, id(unwrap_features(model)): unwrap_features(model)}.values():
        for attr in ("peft_method", "peft_config", "peft_adapter_keys", "peft_base",
                     "peft_adapters", "peft_active_adapter", "peft_base_state",
                     "peft_base_num_classes"):
            m.__dict__.pop(attr, None)
        args = m.__dict__.get("_model_args")
        if isinstance(args, dict):
            m._model_args = {k: v for k, v in args.items() if k not in _PEFT_MODEL_ARGS}
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapter into the base weights and return the plain timm model (peft's name).

    The result has exactly the base architecture's state-dict keys, so it loads into a model built
    by plain ``timm.create_model(arch)``. Its parameters keep their ``requires_grad`` flags.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.bias", num_classes=10)
        >>> plain = timm_peft.merge_and_unload(m)
        >>> hasattr(plain, "peft_config")
        False
    """
    impl = _method_of(model, "merge_and_unload")
    inner = unwrap_features(model)
    impl.merge(inner)
    impl.unload(inner)
    return _strip(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging, returning the plain base model (peft's name).

    The base gets back the tensors it was built with, including those an adapter trained (the
    biases of bias tuning, unfrozen blocks, the head).

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.bias", num_classes=10)
        >>> b = m.fc.bias.detach().clone(); _ = m.fc.bias.data.add_(1)
        >>> bool((timm_peft.unload(m).fc.bias == b).all())
        True
    """
    inner = unwrap_features(model)
    _check_state(model, "unload")
    get_peft_config(model)
    if inner.__dict__.get("peft_adapters") is not None:
        from .adapters import _to_base
        _to_base(inner)
    else:
        _METHODS[inner.peft_method].unload(inner)
    return _strip(model)


def iter_family_archs(family_names: Iterable[str] | None) -> list[str]:
    """timm arch names (no tags) whose family is one of ``family_names`` (every arch if None)."""
    from timm.models import _registry
    names = None if family_names is None else set(family_names)
    return sorted(a for a in _registry._model_to_module
                  if names is None or family_of_arch(a).name in names)
