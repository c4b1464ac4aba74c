"""Loading an adapter: the one path every entry point goes through.

``from_pretrained``, ``load_adapter``, ``verify_adapter``, ``timm.create_model("local-dir:..."/
"hf-hub:...")``, ``torch.hub`` and ``timm-peft eval|info`` all start with :func:`open_adapter`,
which resolves the name and reads and checks ``adapter_config.json``, the weights header and the
pointer ``config.json`` (bounded, see :mod:`.format`) before any model exists. Then:

* a new model is checked whole on the ``meta`` device (nothing allocated), including one forward
  pass at the recorded input size, before the real one is built (:func:`check_against_meta`);
* a load onto an existing model runs first on a *twin* of it (its frozen tensors shared, the
  rest copied: no memory for the base), so every check passes before the model is touched, and a
  failed load leaves the model bit-identical.

``training_args.json`` is read by :func:`read_training_args` with the same bounds and a schema.
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import json
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core import _check_state, get_method, get_peft_config, resolve_method, unwrap_features
from .card import HUB_PREFIX, LOCAL_PREFIX
from .save_load import recover_interrupted_save
from .format import (ADAPTER_MARKER, CONFIG_NAME, LIMITS, LOADING_KWARGS, TIMM_CONFIG_NAME,
                     WEIGHTS_NAME, _DATA_KEYS, AdapterError, Header, _check_data_config,
                     _no_unknown, _os_error, _short, arch_profile, base_fingerprint, check_tensors, read_adapter_config,
                     read_header, read_json, read_weights)

__all__ = ["Adapter", "open_adapter", "resolve_adapter_dir", "load_adapter", "from_pretrained",
           "verify_adapter", "check_against_meta", "restore_pretrained_cfg", "read_training_args",
           "TRAINING_ARGS_NAME"]

#: ``timm-peft train`` writes the run's settings next to the adapter under this name
TRAINING_ARGS_NAME = "training_args.json"


# ----------------------------------------------------------------------------------------------
# names -> directories
# ----------------------------------------------------------------------------------------------

def _is_offline() -> bool:
    from huggingface_hub import constants
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _split_hub_id(hub_id: str, revision: str | None) -> tuple[str, str | None]:
    """``org/name[@rev]`` -> ``(repo id, revision)``, checked (timm's ``@revision`` spelling too)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, rev = hub_id.partition("@")
    if at and (not rev or "@" in rev):
        raise AdapterError(f"bad Hub adapter id '{HUB_PREFIX}{hub_id}': expected "
                           f"'{HUB_PREFIX}<org>/<name>' or '{HUB_PREFIX}<org>/<name>@<revision>'")
    if rev and revision and rev != revision:
        raise AdapterError(f"'{HUB_PREFIX}{hub_id}' names revision {rev!r} but revision={revision!r} "
                           "was also given; give one")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise AdapterError(f"bad Hub adapter id '{HUB_PREFIX}{hub_id}': expected "
                           f"'{HUB_PREFIX}<org>/<name>[@<revision>]' ({e})") from e
    return repo_id, rev or revision


def _download_adapter(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None,
                      token: str | bool | None) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (EntryNotFoundError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    where = f"Hub adapter '{HUB_PREFIX}{repo_id}' (revision {revision or 'main'})"
    snapshot: Path | None = None
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            # the weights are fetched at the commit the config came from: never a mixed pair
            path = hf_hub_download(repo_id, filename, cache_dir=cache_dir, token=token,
                                   revision=revision if snapshot is None else snapshot.name)
        except LocalEntryNotFoundError as e:  # before EntryNotFoundError: it is a subclass
            from .offline import hub_unreachable
            reason = hub_unreachable() or ("HF_HUB_OFFLINE is set" if _is_offline()
                                           else "the Hub cannot be reached")
            raise AdapterError(
                f"cannot load {where}: {reason} and its {filename} is not in the local Hugging "
                f"Face cache ({cache_dir or constants.HF_HUB_CACHE}); download it once with network "
                "access, or pass the adapter's local directory") from e
        except RevisionNotFoundError as e:
            raise AdapterError(f"cannot load {where}: the repo has no such revision") from e
        except RepositoryNotFoundError as e:
            raise AdapterError(f"cannot load {where}: no such model repo, or it is private or gated "
                               "(log in with `hf auth login` or pass token=)") from e
        except EntryNotFoundError as e:
            hint = (f"it is not a timm_peft adapter repo (a plain timm model loads with "
                    f"timm.create_model('{HUB_PREFIX}{repo_id}'))" if filename == CONFIG_NAME
                    else "the upload is incomplete")
            raise AdapterError(f"cannot load {where}: the repo has no {filename}; {hint}") from e
        except OSError as e:  # the cache itself: permissions, a full disk, a too-long path
            raise AdapterError(f"cannot load {where}: {filename} cannot be fetched into the "
                               f"Hugging Face cache ({type(e).__name__}: {e})") from e
        snapshot = Path(path).parent
    assert snapshot is not None
    return snapshot


def _stat(path: Path) -> os.stat_result | None:
    """``os.stat`` of a local adapter path: None when it does not exist, else an AdapterError."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            return None
        raise _os_error(path, e) from e


def resolve_adapter_dir(
        adapter: str | os.PathLike,
        revision: str | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
) -> Path:
    """The local directory holding the adapter named by ``adapter``.

    ``adapter`` is a directory (``local-dir:<path>`` also works) or a Hugging Face Hub model repo
    ``hf-hub:<org>/<name>``, optionally pinned by ``revision=`` or timm's ``@<revision>`` suffix.
    A Hub adapter is fetched through huggingface_hub's cache (only ``adapter_config.json`` and
    ``adapter_model.safetensors``, both from one commit), so ``HF_HUB_OFFLINE=1`` works once it
    is cached; an uncached adapter with no network is an :class:`AdapterError` that says so.

    Example:
        >>> import timm, timm_peft, tempfile
        >>> from timm_peft.io import resolve_adapter_dir
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp())
        >>> resolve_adapter_dir(d) == d
        True
    """
    if isinstance(adapter, str) and adapter.startswith(HUB_PREFIX):
        repo_id, revision = _split_hub_id(adapter[len(HUB_PREFIX):], revision)
        return _download_adapter(repo_id, revision, cache_dir, token)
    if not isinstance(adapter, (str, os.PathLike)):
        raise AdapterError(f"an adapter is a directory, '{LOCAL_PREFIX}<dir>' or "
                           f"'{HUB_PREFIX}<org>/<name>', got {type(adapter).__name__}")
    if isinstance(adapter, str) and adapter.startswith(LOCAL_PREFIX):
        adapter = adapter[len(LOCAL_PREFIX):]
    if revision is not None:
        raise AdapterError(f"revision={revision!r} applies to Hub adapters ('{HUB_PREFIX}<org>/"
                           f"<name>'), not to the local path {str(adapter)!r}")
    path = Path(adapter)
    recover_interrupted_save(path)  # a save killed between its two renames: the old adapter back
    st = _stat(path)
    if st is not None and stat.S_ISDIR(st.st_mode):
        return path
    if st is not None:
        raise AdapterError(f"adapter {str(adapter)!r} is a file; pass the directory that holds "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    hint = ""
    if isinstance(adapter, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", adapter) \
            and not adapter.startswith("."):
        hint = f"; for a Hugging Face Hub repo write '{HUB_PREFIX}{adapter}'"
    raise AdapterError(f"adapter directory {str(adapter)!r} does not exist{hint}")


# ----------------------------------------------------------------------------------------------
# the gate: every file read and checked, no model yet
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Adapter:
    """An adapter whose config, weights header and ``config.json`` passed every check."""

    dir: Path
    cfg: dict[str, Any]
    header: Header

    @property
    def weights(self) -> Path:
        return self.dir / WEIGHTS_NAME

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_NAME


_TIMM_CONFIG_KEYS = ("architecture", "num_classes", "label_names", "model_args", "pretrained_cfg")


def _check_pointer(adapter_dir: Path, cfg: dict[str, Any]) -> None:
    """An adapter's timm ``config.json``, when there is one, only points at ``adapter_config.json``:
    same arch, same architecture arguments, nothing else that timm would act on."""
    path = adapter_dir / TIMM_CONFIG_NAME
    if _stat(path) is None:
        return
    pointer = read_json(path, "timm's config.json")
    if not isinstance(pointer, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(pointer).__name__}")
    _no_unknown(path, pointer, _TIMM_CONFIG_KEYS)
    if pointer.get("architecture") != cfg["architecture"]:
        raise AdapterError(f"{path}: field 'architecture' {_short(pointer.get('architecture'))} "
                           f"differs from {CONFIG_NAME}'s {cfg['architecture']!r}")
    # what timm would act on must agree with the adapter (it is never passed to timm)
    for key, want in (("num_classes", cfg["model_args"].get("num_classes")),
                      ("label_names", cfg.get("label_names"))):
        if key in pointer and want is not None and pointer[key] != want:
            raise AdapterError(f"{path}: field {key!r} {_short(pointer[key])} differs from "
                               f"{CONFIG_NAME}'s {_short(want)}")
    pcfg = pointer.get("pretrained_cfg", {})
    if not isinstance(pcfg, dict):
        raise AdapterError(f"{path}: field 'pretrained_cfg' must be an object, got {_short(pcfg)}")
    _no_unknown(path, pcfg, (*_DATA_KEYS, "num_classes"), " in field 'pretrained_cfg'")
    args = pointer.get("model_args")
    args = {k: v for k, v in args.items() if k != ADAPTER_MARKER} if isinstance(args, dict) else args
    if args != cfg["model_args"]:
        raise AdapterError(f"{path}: field 'model_args' of {TIMM_CONFIG_NAME} "
                           f"({_short(sorted(args) if isinstance(args, dict) else args)}) differs "
                           f"from {CONFIG_NAME}'s ({_short(sorted(cfg['model_args']))}); they must "
                           "be equal")


def open_adapter(adapter: str | os.PathLike | Adapter, revision: str | None = None, *,
                 cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                 pointer: bool = False) -> Adapter:
    """Resolve ``adapter`` and read and check its files, without building any model.

    ``adapter_config.json`` and the weights header always; timm's ``config.json`` with
    ``pointer=True`` (the entry points that timm reaches through it, and ``verify_adapter``).

    Example:
        >>> import timm, timm_peft, tempfile
        >>> from timm_peft.io.load import open_adapter
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp())
        >>> open_adapter(d).cfg["peft_type"]
        'bias'
    """
    if isinstance(adapter, Adapter):
        return adapter
    adapter_dir = resolve_adapter_dir(adapter, revision, cache_dir=cache_dir, token=token)
    cfg = read_adapter_config(adapter_dir)
    if _stat(adapter_dir / WEIGHTS_NAME) is None:
        raise AdapterError(f"no {WEIGHTS_NAME} in {adapter_dir}")
    header = read_header(adapter_dir / WEIGHTS_NAME)
    if pointer:
        _check_pointer(adapter_dir, cfg)
    return Adapter(adapter_dir, cfg, header)


# ----------------------------------------------------------------------------------------------
# checks against a model built on the meta device
# ----------------------------------------------------------------------------------------------

def _model_name(cfg: dict[str, Any]) -> str:
    return cfg["architecture"] + (f".{cfg['pretrained_tag']}" if cfg.get("pretrained_tag") else "")


def _meta_forward(model: nn.Module, src: Adapter) -> None:
    """One forward pass on the ``meta`` device at the recorded input size: an adapter whose
    architecture arguments or method config cannot run on its own input is refused at load."""
    size = (src.cfg.get("data_config") or {}).get("input_size")
    if not size:
        return
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.eval()(torch.empty(1, *size, device="meta"))
    except (NotImplementedError, RuntimeError) as e:
        if "meta" in str(e):  # an op that reads values (a solver's convergence test): unknown
            return
        raise AdapterError(f"{src.config_path}: the model its fields build does not run on its "
                           f"field 'data_config.input_size' {size}: {type(e).__name__}: "
                           f"{str(e)[:300]}") from e
    except Exception as e:  # timm and the methods refuse bad inputs in many ways
        raise AdapterError(f"{src.config_path}: the model its fields build does not run on its "
                           f"field 'data_config.input_size' {size}: {type(e).__name__}: "
                           f"{str(e)[:300]}") from e


def check_against_meta(adapter: Adapter | Path, cfg: dict[str, Any] | None = None,
                       overrides: dict[str, Any] | None = None) -> None:
    """Build base + method on the ``meta`` device (no memory) and check the adapter against it.

    Bounds the base the architecture arguments ask for (at most ``base_params_scale`` times the
    parameters of the default arch), checks every tensor's name, shape and dtype, and runs one
    forward pass at the recorded input size. Nothing is ever built for real here.
    """
    import timm
    from ..integration import install
    install()
    src = open_adapter(adapter)
    cfg = src.cfg
    kwargs = {**cfg["model_args"],
              **{k: v for k, v in (overrides or {}).items() if k not in LOADING_KWARGS}}
    name = _model_name(cfg)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = timm.create_model(name, pretrained=False, peft=cfg["peft_type"],
                                     peft_cfg=cfg["peft_config"], **kwargs)
    except Exception as e:  # timm and the method refuse bad arguments in many ways
        raise AdapterError(f"{src.config_path}: fields 'model_args'/'peft_config' do "
                           f"not build {name} with {cfg['peft_type']!r}: {type(e).__name__}: "
                           f"{str(e)[:300]}") from e
    inner = unwrap_features(meta)
    keys = set(inner.peft_adapter_keys)
    base_params = sum(p.numel() for n, p in inner.named_parameters() if n not in keys)
    _, default_params = arch_profile(cfg["architecture"])  # inspected by read_adapter_config
    limit = LIMITS["base_params_scale"] * default_params
    if base_params > limit:
        raise AdapterError(f"{src.config_path}: field 'model_args' makes a base of "
                           f"{base_params:,d} parameters; at most {limit:,d} "
                           f"({LIMITS['base_params_scale']}x {cfg['architecture']}'s) are allowed")
    method = get_method(cfg["peft_type"])
    try:
        method.prepare_load(inner, method.config_cls.from_dict(cfg["peft_config"]))
    except (ValueError, RuntimeError, NotImplementedError) as e:
        raise AdapterError(f"{src.config_path}: field 'peft_config' does not fit {name}: {e}") from e
    state = inner.state_dict()
    check_tensors(src.weights, src.header, {k: state[k] for k in inner.peft_adapter_keys},
                  f"{name} with {cfg['peft_type']!r}")
    _meta_forward(meta, src)


def verify_adapter(adapter: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """Check a whole adapter without building a real model; returns its config.

    The config is read and bounded, the weights header is checked against base + method built
    on the ``meta`` device, and the weights are read to check their hash and that every value
    is finite. ``timm-peft info`` runs this.

    Example:
        >>> import timm, timm_peft, tempfile
        >>> from timm_peft.io import verify_adapter
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp())
        >>> verify_adapter(d)["peft_type"]
        'bias'
    """
    src = open_adapter(adapter, revision)
    check_against_meta(src)
    read_weights(src.weights, src.cfg["weights_sha256"], src.header)
    _check_pointer(src.dir, src.cfg)
    return src.cfg


# ----------------------------------------------------------------------------------------------
# loading onto a model: checked on a twin, then done
# ----------------------------------------------------------------------------------------------

def restore_pretrained_cfg(model: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    """Put the adapter's data configuration and class names into ``model.pretrained_cfg``."""
    inner = unwrap_features(model)
    data = {k: tuple(v) if isinstance(v, list) else v
            for k, v in (cfg.get("data_config") or {}).items()}
    for m in {id(model): model, id(inner): inner}.values():
        pc = dict(getattr(m, "pretrained_cfg", None) or {})
        pc.update(data)
        if isinstance(getattr(inner, "num_classes", None), int):
            pc["num_classes"] = inner.num_classes
        if cfg.get("label_names"):
            pc["label_names"] = tuple(cfg["label_names"])
        else:
            pc.pop("label_names", None)
        m.pretrained_cfg = pc
        if "default_cfg" in m.__dict__:
            m.default_cfg = pc
    return model


def _twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to try a load on: frozen base parameters are shared (new tensor
    objects over the same storage, so nothing is allocated for them and flags set on the twin
    stay there); everything an adapter owns, every buffer and every trainable tensor is copied."""
    inner = unwrap_features(model)
    owned = set(getattr(inner, "peft_adapter_keys", ()))
    adapter_ids = {id(p) for n, p in inner.named_parameters(remove_duplicate=False) if n in owned}
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if not p.requires_grad and id(p) not in adapter_ids:
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    return copy.deepcopy(model, memo)


def _config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{k}: adapter {saved[k]!r}, model {current.get(k)!r}"
            for k in saved if saved[k] != current.get(k)]


def reload_code(adapter: str | os.PathLike | Adapter,
                overlay: dict[str, Any] | None = None) -> list[str]:
    """The Python lines that rebuild the base an adapter was trained on and load it onto it.

    ``timm-peft train`` prints them after a run, and loading onto other base weights says them in
    its error. The base comes from where ``base_source`` says: timm's weights for the recorded
    tag, a local file (``overlay`` as timm's ``pretrained_cfg_overlay``, else a placeholder for
    that file), or a random initialisation, which only the seed it was drawn with rebuilds: the
    ``seed`` that ``timm-peft train`` records in ``training_args.json``.

    Example:
        >>> import timm, timm_peft, tempfile
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp())
        >>> print("\\n".join(reload_code(d)))  # doctest: +ELLIPSIS
        import torch, timm_peft
        torch.manual_seed(<the seed set before the base was built; timm-peft train records it>)
        model = timm_peft.from_pretrained('...', pretrained=False)
    """
    src = open_adapter(adapter)
    kind = (src.cfg.get("base_source") or {}).get("kind", "unknown")
    lines, args = ["import timm_peft"], [repr(str(src.dir))]
    if kind == "random":
        seed = read_training_args(src.dir).get("seed",
                                                "<the seed set before the base was built; "
                                                "timm-peft train records it>")
        lines = ["import torch, timm_peft", f"torch.manual_seed({seed})"]
        args.append("pretrained=False")
    if overlay:
        args.append(f"pretrained_cfg_overlay={overlay!r}")
    elif kind == "file":
        args.append("pretrained_cfg_overlay=dict(file='<the base weights file>', "
                    "custom_load=False)")
    return [*lines, f"model = timm_peft.from_pretrained({', '.join(args)})"]


def _check_base(model: nn.Module, src: Adapter) -> None:
    fp = base_fingerprint(model)
    if fp != src.cfg.get("base_fingerprint"):
        kind = (src.cfg.get("base_source") or {}).get("kind", "unknown")
        raise AdapterError(
            f"the model's base weights differ from those the adapter in {src.dir} was "
            f"trained on (field 'base_fingerprint': {fp[:19]}… vs "
            f"{str(src.cfg.get('base_fingerprint'))[:19]}…; recorded origin: {kind}); rebuild "
            f"that base and load the adapter with `{'; '.join(reload_code(src))}`, or pass "
            "check_base=False to load it onto this base anyway")


def _load_into(model: nn.Module, src: Adapter, tensors: dict[str, torch.Tensor] | None,
               check_base: bool) -> nn.Module:
    """Load ``src`` as the model's active adapter; ``tensors`` None: every check, no values."""
    cfg = src.cfg
    inner = unwrap_features(model)
    if resolve_method(cfg["peft_type"])[0] != inner.peft_method:
        raise AdapterError(f"adapter in {src.dir} is for method {cfg['peft_type']!r}, the model "
                           f"carries {inner.peft_method!r}")
    method = get_method(inner.peft_method)
    arch = (getattr(inner, "pretrained_cfg", None) or {}).get("architecture")
    if arch is not None and arch != cfg["architecture"]:
        raise AdapterError(f"adapter in {src.dir} is for arch {cfg['architecture']!r}, the model "
                           f"is {arch!r}")
    saved_config = method.config_cls.from_dict(cfg["peft_config"])  # checked on read
    try:
        method.prepare_load(inner, saved_config)
    except (ValueError, RuntimeError) as e:
        raise AdapterError(f"{src.config_path}: field 'peft_config' does not fit the model: "
                           f"{e}") from e
    diff = _config_diff(saved_config.to_dict(), inner.peft_config.to_dict())
    if diff:
        raise AdapterError(f"{src.config_path}: field 'peft_config' differs from the "
                           f"model's {type(saved_config).__name__}: {diff[:8]}; build the model "
                           "with the adapter's config (timm_peft.from_pretrained does)")
    state = inner.state_dict()
    check_tensors(src.weights, src.header, {k: state[k] for k in inner.peft_adapter_keys},
                  "the model")
    if check_base:  # after the structure checks: it only means something for the same key set
        _check_base(model, src)
    if tensors is not None:
        inner.load_state_dict(tensors, strict=False)
    return restore_pretrained_cfg(model, cfg)


def _load_named(model: nn.Module, src: Adapter, tensors: dict[str, torch.Tensor] | None,
                adapter_name: str, check_base: bool) -> nn.Module:
    """Add ``src`` as ``adapter_name``, then load it like the only one."""
    from ..adapters import add_adapter, delete_adapter, get_adapters, using_adapter
    from .save_load import _base_info
    cfg = src.cfg
    if adapter_name in get_adapters(model):
        raise ValueError(f"the model already has an adapter {adapter_name!r}; delete_adapter it "
                         "first or choose another name")
    base = _base_info(model)
    arch = base["architecture"]
    if arch != cfg["architecture"]:
        raise AdapterError(f"adapter in {src.dir} is for arch {cfg['architecture']!r}, the "
                           f"model is {arch!r}")
    ours = {k: v for k, v in base["model_args"].items() if k not in (*LOADING_KWARGS, "num_classes")}
    theirs = {k: v for k, v in cfg["model_args"].items() if k not in (*LOADING_KWARGS, "num_classes")}
    if json.loads(json.dumps(ours, default=str)) != theirs:
        raise AdapterError(f"{src.config_path}: field 'model_args' {theirs} differs from "
                           f"the model's {ours}: one backbone serves adapters of its own build only")
    method = get_method(cfg["peft_type"])
    config = method.config_cls.from_dict(cfg["peft_config"])
    add_adapter(model, adapter_name, config, method=resolve_method(cfg["peft_type"])[0],
                num_classes=cfg["model_args"].get("num_classes"))
    try:
        with using_adapter(model, adapter_name):
            _load_into(model, src, tensors, check_base)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    return model


def load_adapter(model: nn.Module, adapter: str | os.PathLike, check_base: bool = True, *,
                 revision: str | None = None, adapter_name: str | None = None) -> nn.Module:
    """Load a saved adapter onto a model built with the same arch, method and config.

    ``adapter`` is a directory, ``local-dir:<dir>`` or ``hf-hub:<org>/<name>``. Every mismatch
    is an :class:`AdapterError`: another method, arch or method config, missing, unexpected,
    mis-shaped or other-dtype tensors, a hash that does not match, NaN or Inf values, or (unless
    ``check_base=False``) different base weights. The load is transactional: every check runs
    first on a twin of the model that shares its frozen tensors, so a failed load leaves the
    model exactly as it was. The adapter's data configuration and class names go into
    ``model.pretrained_cfg``.

    Without ``adapter_name`` the adapter replaces the active adapter's values. With it, the
    adapter is added next to the model's others under that name, with its own method, config,
    head size, data configuration and class names (the active adapter stays active; see
    :func:`timm_peft.set_adapter`); it must be for the same arch and architecture arguments.

    Example:
        >>> import timm, timm_peft, tempfile
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp())
        >>> m = timm_peft.load_adapter(timm.create_model("resnet18.bias"), d, check_base=False)
        >>> m = timm_peft.load_adapter(timm.create_model("resnet18.ssf"), d, check_base=False,
        ...                            adapter_name="bias_task")
        >>> sorted(timm_peft.get_adapters(m))
        ['bias_task', 'default']
    """
    _check_state(model, "load_adapter")  # not inside disable_adapter or route
    src = open_adapter(adapter, revision)
    get_peft_config(model)
    tensors = read_weights(src.weights, src.cfg["weights_sha256"], src.header)
    apply: Callable[..., nn.Module] = (
        functools.partial(_load_named, adapter_name=adapter_name) if adapter_name is not None
        else _load_into)
    try:
        twin = _twin(model)
    except Exception as e:  # noqa: BLE001 - a module deepcopy cannot copy (rare): say so
        warnings.warn(f"load_adapter cannot copy {type(model).__name__} to check the load on a "
                      f"twin first ({type(e).__name__}: {str(e)[:120]}); a failed load may leave "
                      "it changed", stacklevel=2)
        return apply(model, src, tensors, check_base=check_base)
    apply(twin, src, None, check_base=check_base)  # every check; the model untouched
    return apply(model, src, tensors, check_base=False)  # the twin checked the shared base


def from_pretrained(adapter: str | os.PathLike, pretrained: bool | None = None,
                    check_base: bool = True, revision: str | None = None,
                    **overrides: Any) -> nn.Module:
    """Rebuild base + method + adapter from an adapter directory or ``hf-hub:org/name``.

    The base arch, weight tag, architecture arguments and method config come from
    ``adapter_config.json``, and the whole adapter is checked against a ``meta``-device build
    before anything is allocated. The base weights come from timm's pretrained source for the
    recorded tag, or from what you pass in ``overrides`` (``timm.create_model`` keywords such as
    ``pretrained_cfg_overlay=dict(file=...)``); the adapter never chooses them. ``pretrained``
    defaults to the recorded origin (False for a randomly initialised base). The returned model's
    ``pretrained_cfg`` holds the data configuration and class names it was trained with.

    Example:
        >>> import timm, timm_peft, tempfile
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp())
        >>> m = timm_peft.from_pretrained(d, pretrained=False, check_base=False)
        >>> m.peft_method
        'bias'
    """
    import timm
    src = open_adapter(adapter, revision)
    cfg = src.cfg
    kind = (cfg.get("base_source") or {}).get("kind", "unknown")
    if pretrained is None:
        pretrained = kind != "random"
    weights_given = any(overrides.get(k) is not None
                        for k in ("pretrained_cfg_overlay", "pretrained_cfg", "checkpoint_path"))
    if pretrained and kind == "file" and not weights_given:
        raise AdapterError(f"{src.config_path}: field 'base_source' says the base weights "
                           "came from a local file, not from timm; pass that file with "
                           "pretrained_cfg_overlay=dict(file=..., custom_load=False)")
    check_against_meta(src, overrides=overrides)
    tensors = read_weights(src.weights, cfg["weights_sha256"], src.header)  # before building
    try:
        model = timm.create_model(_model_name(cfg), pretrained=pretrained, peft=cfg["peft_type"],
                                  peft_cfg=cfg["peft_config"], **{**cfg["model_args"], **overrides})
    except (OSError, RuntimeError) as e:
        if not pretrained or weights_given:  # the caller's own keywords: timm's error
            raise
        # the meta build passed: what failed is fetching the base weights the adapter names
        raise AdapterError(
            f"{src.config_path}: the base weights its fields 'architecture'/'pretrained_tag' "
            f"name ({_model_name(cfg)}, origin {kind!r}) cannot be loaded: {type(e).__name__}: "
            f"{str(e)[:300]}; make them available (network or cache), pass them with "
            "pretrained_cfg_overlay=dict(file=..., custom_load=False), or load with "
            "pretrained=False") from e
    # a fresh model needs no twin: a failed load discards it
    return _load_into(model, src, tensors, check_base)


# ----------------------------------------------------------------------------------------------
# training_args.json
# ----------------------------------------------------------------------------------------------

#: what ``timm-peft eval`` may take from ``training_args.json`` besides TrainConfig's data fields:
#: never weights, URLs or where to write
_RUN_ONLY = ("classes", "data_config", "metrics")
#: TrainConfig fields eval never takes from the file: they choose weights, devices or outputs
_NOT_FROM_FILE = ("pretrained_file", "pretrained_cfg", "device", "output", "resume", "overwrite",
                  "checkpoint")
#: generated-task sizes eval renders (train, val and test together)
_GENERATED_IMAGES = 100_000


def read_training_args(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The checked ``training_args.json`` of an adapter directory (``{}`` when it has none).

    Read with the bounds of every adapter file; its fields must be those ``timm-peft train``
    writes (TrainConfig's, each checked by TrainConfig's own rules, plus ``classes``,
    ``data_config`` and ``metrics``). Fields that choose base weights, URLs, devices or outputs
    (``pretrained_file``, ``pretrained_cfg``, ...) are dropped: eval takes those from its caller.
    Generated-task sizes are bounded by what eval may render.

    Example:
        >>> import tempfile
        >>> read_training_args(tempfile.mkdtemp())
        {}
    """
    from ..train import TrainConfig
    path = Path(adapter_dir) / TRAINING_ARGS_NAME
    if _stat(path) is None:
        return {}
    args = read_json(path, "a training_args.json")
    if not isinstance(args, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(args).__name__}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    _no_unknown(path, args, fields | set(_RUN_ONLY))
    kept = {k: v for k, v in args.items() if k in fields and k not in _NOT_FROM_FILE}
    try:
        TrainConfig(**{**kept, "model": kept.get("model") or "x"})
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # untrusted values, any way
        raise AdapterError(f"{path}: {type(e).__name__}: {e}") from e
    total = sum(kept.get(k) or 0 for k in ("train_size", "val_size", "test_size"))
    if total > _GENERATED_IMAGES or (kept.get("task_image_size") or 0) > LIMITS["img_size"]:
        raise AdapterError(f"{path}: fields 'train_size'/'val_size'/'test_size' ask for {total:,d} "
                           f"generated images of {kept.get('task_image_size')} pixels; at most "
                           f"{_GENERATED_IMAGES:,d} images of at most {LIMITS['img_size']} pixels "
                           "are allowed")
    if kept.get("batch_size", 0) > 4096:
        raise AdapterError(f"{path}: field 'batch_size' must be at most 4096, got "
                           f"{kept['batch_size']}")
    if args.get("data_config") is not None:
        _check_data_config(path, args["data_config"])
        kept["data_config"] = args["data_config"]
    classes = args.get("classes")
    if classes is not None:
        ok = isinstance(classes, list) and len(classes) <= LIMITS["num_classes"] and all(
            isinstance(c, str) and len(c) <= LIMITS["label_chars"] for c in classes)
        if not ok:
            raise AdapterError(f"{path}: field 'classes' must be a list of class-name strings, "
                               f"got {_short(classes)}")
        kept["classes"] = classes
    metrics = args.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, dict):
            raise AdapterError(f"{path}: field 'metrics' must be an object, got {_short(metrics)}")
        kept["metrics"] = metrics
    return kept


# ----------------------------------------------------------------------------------------------
# timm's entry points: local-dir: and hf-hub:
# ----------------------------------------------------------------------------------------------

def _holds_adapter(path: Path) -> bool:
    """Whether a local directory holds an adapter file (never raises: timm keeps its errors)."""
    try:
        return any(os.path.lexists(path / name) for name in (CONFIG_NAME, WEIGHTS_NAME))
    except (OSError, ValueError):
        return False


def _hub_adapter_dir(model_id: str, cache_dir: Any) -> Path | None:
    """The snapshot of a Hub repo that holds ``adapter_config.json``; None when the repo has
    none, or when that cannot be known (offline, uncached): then timm goes on as usual."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    try:
        repo_id, revision = _split_hub_id(model_id, None)
    except AdapterError:
        return None  # not our name: timm says what is wrong with it
    try:
        hf_hub_download(repo_id, CONFIG_NAME, revision=revision, cache_dir=cache_dir)
    except LocalEntryNotFoundError:
        return None
    except EntryNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - no such repo, no network ...: timm reports it itself
        return None
    return _download_adapter(repo_id, revision, cache_dir, None)


def _adapter_source(src: Adapter, extra: dict[str, Any]) -> tuple[dict[str, Any], str, dict]:
    """What timm's config loaders return, for an adapter: the arch and, as the only model
    argument, the checked adapter itself (the build hook takes it from there)."""
    return dict(extra), src.cfg["architecture"], {ADAPTER_MARKER: src}


def _wrap_config_loaders() -> None:
    """Put :func:`open_adapter` in front of timm's ``config.json`` readers, so a directory or repo
    holding an adapter file is read and checked by timm_peft first, whatever its ``config.json``
    says; anything else reaches timm's own reader untouched."""
    from timm.models import _factory

    original_path = getattr(_factory, "load_model_config_from_path", None)
    if original_path is not None and not hasattr(original_path, "__timm_peft_original__"):
        @functools.wraps(original_path)
        def load_model_config_from_path(model_path: Any, *args: Any, **kwargs: Any) -> Any:
            if not _holds_adapter(Path(model_path)):
                return original_path(model_path, *args, **kwargs)
            return _adapter_source(open_adapter(Path(model_path), pointer=True),
                                   {"file": str(model_path), "source": "local-dir"})
        load_model_config_from_path.__timm_peft_original__ = original_path  # type: ignore[attr-defined]
        _factory.load_model_config_from_path = load_model_config_from_path

    original_hf = getattr(_factory, "load_model_config_from_hf", None)
    if original_hf is not None and not hasattr(original_hf, "__timm_peft_original__"):
        @functools.wraps(original_hf)
        def load_model_config_from_hf(model_id: str, *args: Any, **kwargs: Any) -> Any:
            snapshot = _hub_adapter_dir(model_id, kwargs.get("cache_dir", args[0] if args else None))
            if snapshot is None:
                return original_hf(model_id, *args, **kwargs)
            return _adapter_source(open_adapter(snapshot, pointer=True),
                                   {"hf_hub_id": model_id, "source": "hf-hub"})
        load_model_config_from_hf.__timm_peft_original__ = original_hf  # type: ignore[attr-defined]
        _factory.load_model_config_from_hf = load_model_config_from_hf


def _build_from_adapter(entrypoint: Any, arch: str, kwargs: dict[str, Any]) -> nn.Module | None:
    """Build hook: ``timm.create_model("local-dir:"/"hf-hub:<adapter>")`` rebuilds base + method +
    adapter from the :class:`Adapter` the config loaders opened.

    As in timm, ``pretrained=True`` loads weights (the base's through timm, then the adapter) and
    ``pretrained=False`` gives the architecture only: base + method, freshly initialised. The
    caller's keywords are passed on; the adapter's only come from its checked config.
    """
    if ADAPTER_MARKER not in kwargs:
        return None
    src = kwargs[ADAPTER_MARKER]
    if not isinstance(src, Adapter):
        raise AdapterError(f"{ADAPTER_MARKER!r} belongs in an adapter's {TIMM_CONFIG_NAME}, in a "
                           f"directory or repo with its {CONFIG_NAME} and {WEIGHTS_NAME}; load an "
                           f"adapter with timm.create_model('{HUB_PREFIX}<org>/<name>') or "
                           f"('{LOCAL_PREFIX}<dir>'), or timm_peft.from_pretrained")
    # timm passes its own keywords (pretrained_cfg_overlay=None, ...): only what the caller set
    kwargs = {k: v for k, v in kwargs.items() if v is not None
              and k not in (ADAPTER_MARKER, "pretrained_model_args", "pretrained_cfg", "cache_dir")}
    if kwargs.pop("pretrained", False):
        return from_pretrained(src, **kwargs)
    import timm
    cfg = src.cfg
    check_against_meta(src, overrides=kwargs)
    model = timm.create_model(_model_name(cfg), pretrained=False, peft=cfg["peft_type"],
                              peft_cfg=cfg["peft_config"], **{**cfg["model_args"], **kwargs})
    return restore_pretrained_cfg(model, cfg)


def _register_hooks() -> None:
    from ..integration import BUILD_HOOKS
    _wrap_config_loaders()
    if _build_from_adapter not in BUILD_HOOKS:
        BUILD_HOOKS.append(_build_from_adapter)
