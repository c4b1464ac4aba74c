"""The adapter format: file names, limits, and the checks every adapter passes before use.

An adapter is untrusted input. Everything read from one goes through this module, which
bounds what it may cost (file sizes, JSON depth, tensor counts, config values, architecture
arguments) and turns every defect into an :class:`AdapterError` that names the file, the field
and what is allowed. Nothing here knows which PEFT method an adapter carries: methods are asked
for their config class, and shapes are compared with a model built on the ``meta`` device.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import inspect
import json
import math
import os
import re
import stat
import tempfile
import typing
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from torch import nn

from ..core import get_method, resolve_method, unwrap_features

__all__ = ["AdapterError", "WEIGHTS_NAME", "CONFIG_NAME", "TIMM_CONFIG_NAME", "FORMAT_VERSION",
           "ADAPTER_MARKER", "LIMITS", "LOADING_KWARGS", "atomic_write", "base_fingerprint",
           "read_adapter_config", "read_header", "check_tensors", "read_weights"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
#: timm's own config file, read by ``timm.create_model("hf-hub:...")`` / ``("local-dir:...")``
TIMM_CONFIG_NAME = "config.json"
#: key in the ``model_args`` of an adapter's ``config.json`` that marks it as a timm_peft adapter
ADAPTER_MARKER = "timm_peft_adapter"
#: 2 adds ``data_config``, ``label_names`` and ``base_source``; version 1 adapters still load
FORMAT_VERSION = 2

#: Upper bounds on what an adapter may make us read, parse or build (documented in the README).
LIMITS = dict(
    config_bytes=1 << 20,           # adapter_config.json
    json_depth=16,                  # nesting of any JSON value in it
    header_bytes=4 << 20,           # the safetensors JSON header
    tensors=10_000,                 # tensors in the weights file
    tensor_dims=8,
    num_classes=100_000,            # model_args.num_classes and the class names
    img_size=1024,                  # model_args.img_size, data_config.input_size (each side)
    resize_side=2048,               # eval's resize before the crop: input_size / crop_pct
    label_chars=1024,               # one class name
    string_chars=256,               # any other string value
    list_items=64,                  # a list-valued architecture argument
    arch_scale=2,                   # any other int architecture argument: <= 2x its default
    arch_int_no_default=64,         # ... or this, when the constructor gives no int default
    base_params_scale=4,            # frozen base: <= this x the parameters of the default arch
)

#: create_model keywords that choose where weights come from or how the model is wrapped: an
#: adapter never sets them (the caller may pass them to ``from_pretrained``)
LOADING_KWARGS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
    "pretrained_model_args", "checkpoint_path", "cache_dir", "features_only", "out_indices",
    "feature_cls", "feature_cfg", "output_stride", "device", "dtype", "scriptable", "exportable",
    "no_jit", "kwargs_filter", "pretrained_filter_fn", "feature_location", "peft", "peft_cfg",
    ADAPTER_MARKER,
})

_DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
_CROP_MODES = ("center", "squash", "border")
_BASE_KINDS = ("timm", "file", "random", "other", "unknown")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_HEX64 = re.compile(r"[0-9a-f]{64}")


class AdapterError(ValueError):
    """An adapter cannot be read, is out of bounds, or does not fit the model it is loaded onto.

    Example:
        >>> import tempfile, timm_peft
        >>> try:
        ...     timm_peft.read_adapter_config(tempfile.mkdtemp())
        ... except timm_peft.AdapterError as e:
        ...     print("not an adapter directory" in str(e))
        True
    """

    #: longest message kept: a hostile file must not make the error itself unbounded
    MAX_CHARS = 2000

    def __init__(self, message: Any = "", *args: Any) -> None:
        if isinstance(message, str):
            # control characters (terminal escapes from a hostile file or path) are shown escaped
            message = _CONTROL.sub(lambda m: repr(m.group())[1:-1], message)
            if len(message) > self.MAX_CHARS:
                cut = len(message) - self.MAX_CHARS + 80
                message = (message[:self.MAX_CHARS - 140] + f" … [{cut:,d} characters left out] … "
                           + message[-60:])
        super().__init__(message, *args)


_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


# ----------------------------------------------------------------------------------------------
# writing and fingerprints
# ----------------------------------------------------------------------------------------------

def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    A temporary file next to ``path`` is renamed over it once complete, so a crash never leaves
    a half-written file; it gets the permissions a plain ``open`` would (mkstemp's are 0600).

    Example:
        >>> import tempfile; p = Path(tempfile.mkdtemp()) / "x.bin"
        >>> atomic_write(p, b"ab"); atomic_write(p, lambda fh: fh.write(b"c")); p.read_bytes()
        b'c'
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            data(fh) if callable(data) else fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _storage(t: torch.Tensor) -> tuple[Any, ...]:
    """What identifies the memory of ``t``: its storage (a meta or empty tensor has none that
    can be told apart, so the tensor object itself)."""
    ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
    return (t.device, ptr) if ptr else ("object", id(t))


def _view(t: torch.Tensor) -> tuple[Any, ...]:
    """What identifies the values of ``t``: its storage and where in it ``t`` reads."""
    return (*_storage(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the frozen base tensors.

    Each distinct tensor is hashed once, under its first state-dict name, however many names the
    state dict gives it (a module shared by two paths, as CoaT's ``cpe``/``crpe``, has one entry
    per path). Tensors whose memory the adapter owns (:attr:`peft_adapter_keys`, under any of
    their names) are left out, so the fingerprint identifies the base weights an adapter was
    trained on and does not change during training.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.linear")
        >>> timm_peft.base_fingerprint(m).startswith("sha256:")
        True
    """
    inner = unwrap_features(model)
    state = inner.state_dict(keep_vars=True)
    owned = {_storage(state[k]) for k in getattr(inner, "peft_adapter_keys", ()) if k in state}
    seen: set[tuple[Any, ...]] = set()
    h = hashlib.sha256()
    for name, t in state.items():
        if t is None or _storage(t) in owned or _view(t) in seen:
            continue
        seen.add(_view(t))
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------
# adapter_config.json
# ----------------------------------------------------------------------------------------------

def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------
# reading: one bounded reader for every file of an adapter
# ----------------------------------------------------------------------------------------------

def _os_error(path: Path, e: OSError) -> AdapterError:
    """An OS error while reading ``path``, as the AdapterError that names the file."""
    reason = {errno.ENAMETOOLONG: "the path is too long", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.ENOENT: "it does not exist",
              errno.ELOOP: "too many levels of symbolic links", errno.EISDIR: "it is a directory",
              errno.ENOTDIR: "a part of the path is not a directory"}.get(
        e.errno, e.strerror or type(e).__name__)
    return AdapterError(f"cannot read {path}: {reason}")


def open_file(path: Path) -> BinaryIO:
    """Open a file of an adapter for reading: a regular file, without ever blocking.

    Opened non-blocking and checked on the open descriptor (no race with a swap of the path), so a
    FIFO, device, socket or directory is refused instead of hanging or streaming forever; every
    OS error is an :class:`AdapterError` naming the file. Symbolic links are followed (the Hub
    cache is made of them), and what they lead to is checked the same way.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _os_error(path, e) from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise AdapterError(f"cannot read {path}: it is {kind}; an adapter's files must be "
                               "regular files")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, limit: int, what: str) -> bytes:
    """At most ``limit`` bytes of a regular file, else an :class:`AdapterError`.

    Reads at most ``limit + 1`` bytes whatever size the file reports (``/proc`` files say 0, a
    file may grow between a size check and the read).
    """
    with open_file(path) as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as e:
            raise _os_error(path, e) from e
    if len(data) > limit:
        raise AdapterError(f"{path} is larger than {limit:,d} bytes; {what} may be at most "
                           f"{limit:,d}")
    return data


_INT_BOUND = 2 ** 63  # no field of an adapter needs more; larger ints overflow in torch


def parse_json(raw: bytes, path: Path, what: str) -> Any:
    """Parse untrusted JSON: UTF-8, no duplicate keys, no NaN/Infinity or numbers that overflow,
    integers within int64, strings without lone surrogates, at most ``json_depth`` levels."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            seen: set[str] = set()
            dup = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise AdapterError(f"{path}: key {_short(dup)} appears twice in one object; "
                               f"{what} may name each field once")
        return out

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise AdapterError(f"{path}: the number {text[:40]} is out of range; only finite "
                               "numbers are allowed")
        return value

    def integer(text: str) -> int:
        value = int(text)
        if not -_INT_BOUND <= value < _INT_BOUND:
            raise AdapterError(f"{path}: the integer {text[:40]}{'…' if len(text) > 40 else ''} "
                               "is out of range; integers must fit in 64 bits")
        return value

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterError(f"{path} is not UTF-8 text: {e}") from e
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=pairs,
                           parse_float=number, parse_int=integer)
    except RecursionError as e:
        raise AdapterError(f"{path} is nested too deeply to be {what}") from e
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an int too long to convert
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"{path} is not valid JSON: {e}") from e
    _check_json_value(value, "the file", path)
    return value


def read_json(path: Path, what: str, limit: int | None = None) -> Any:
    """Read and parse one JSON file of an adapter, bounded (see :func:`read_bytes`,
    :func:`parse_json`); every defect is an :class:`AdapterError` naming the file."""
    return parse_json(read_bytes(path, LIMITS["config_bytes"] if limit is None else limit, what),
                      path, what)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _check_json_value(value: Any, where: str, path: Path) -> None:
    """Depth, finiteness and encodable strings of a parsed JSON value, without recursion."""
    stack = [(value, 0, where)]
    while stack:
        v, depth, at = stack.pop()
        if depth > LIMITS["json_depth"]:
            raise AdapterError(f"{path}: {at} is nested deeper than {LIMITS['json_depth']} levels")
        if isinstance(v, float) and not math.isfinite(v):
            raise AdapterError(f"{path}: {at} is {v}; only finite numbers are allowed")
        if isinstance(v, str):
            _check_text(path, at, v)
        elif isinstance(v, dict):
            for k in v:
                _check_text(path, f"{at} key", k)
            stack.extend((x, depth + 1, f"{at}.{k}"[:200]) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, depth + 1, f"{at}[{i}]") for i, x in enumerate(v))


def _check_text(path: Path, at: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise AdapterError(f"{path}: {at} holds a lone surrogate ({text[e.start:e.end]!r}); "
                           "only Unicode text that can be written as UTF-8 is allowed") from e


def _no_unknown(path: Path, obj: dict[str, Any], allowed: tuple[str, ...] | set[str],
                where: str = "") -> None:
    """Only ``allowed`` keys in ``obj``; the message lists a bounded few of the others."""
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        shown = [k[:40] for k in unknown[:8]]
        more = f" and {len(unknown) - 8:,d} more" if len(unknown) > 8 else ""
        raise AdapterError(f"{path}: unknown field(s) {shown}{more}{where}; allowed: "
                           f"{sorted(allowed)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _want(ok: bool, path: Path, field: str, allowed: str, value: Any) -> None:
    if not ok:
        raise AdapterError(f"{path}: field {field!r} must be {allowed}, got {_short(value)}")


def _check_str(path: Path, field: str, value: Any, pattern: str | None = None,
               nullable: bool = False) -> None:
    if value is None and nullable:
        return
    ok = isinstance(value, str) and 0 < len(value) <= LIMITS["string_chars"]
    if ok and pattern is not None:
        ok = re.fullmatch(pattern, value) is not None
    allowed = f"a string of 1-{LIMITS['string_chars']} characters" + (
        f" matching {pattern}" if pattern else "") + (" or null" if nullable else "")
    _want(ok, path, field, allowed, value)


@functools.lru_cache(maxsize=32)
def arch_profile(arch: str) -> tuple[dict[str, Any], int]:
    """``(constructor defaults, parameter count)`` of timm's ``arch`` built with default args.

    Built on the ``meta`` device, so nothing is allocated; the constructor's named parameters,
    minus :data:`LOADING_KWARGS`, are the architecture arguments an adapter may set.
    """
    import timm
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    defaults: dict[str, Any] = {}
    # a subclass taking (*args, **kwargs) (distilled DeiT, LeViT) passes them to its base class:
    # read the classes up the chain until one takes no more **kwargs
    for cls in type(model).__mro__:
        if "__init__" not in cls.__dict__ or cls is torch.nn.Module:
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        for p in params:
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) \
                    and p.name not in LOADING_KWARGS:
                defaults.setdefault(p.name, p.default if p.default is not p.empty else None)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
        # a constructor that takes a config dataclass plus **kwargs onto its fields (NaFlexVit's
        # cfg): those fields are architecture arguments too, bounded by the class's defaults
        for cfg_cls in _dataclass_params(cls.__init__):
            for f in dataclasses.fields(cfg_cls):
                if f.name not in LOADING_KWARGS and f.default is not dataclasses.MISSING:
                    defaults.setdefault(f.name, f.default)
    return defaults, sum(p.numel() for p in model.parameters())


def _dataclass_params(init: Any) -> list[type]:
    """The dataclass types among ``init``'s parameter annotations (``Optional[...]`` unwrapped)."""
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve names no dataclass
        return []
    out = []
    for name, tp in hints.items():
        for t in (tp, *typing.get_args(tp)):
            if isinstance(t, type) and dataclasses.is_dataclass(t) and name != "return":
                out.append(t)
    return out


def _int_bound(name: str, default: Any) -> int:
    if name in ("num_classes", "img_size"):
        return LIMITS[name]
    ints = [default] if _is_int(default) else (
        [d for d in default if _is_int(d)] if isinstance(default, (tuple, list)) else [])
    if ints and max(ints) > 0:
        return max(LIMITS["arch_scale"] * max(ints), 8)
    return LIMITS["arch_int_no_default"]


def check_model_args(arch: str, model_args: dict[str, Any], path: Path) -> None:
    """Only architecture arguments of ``arch``, each a bounded JSON scalar or list of them."""
    try:
        defaults, _ = arch_profile(arch)
    except Exception as e:  # an arch timm cannot build without memory: nothing to check against
        raise AdapterError(f"{path}: field 'architecture' {arch!r} cannot be inspected on the meta "
                           f"device ({type(e).__name__}: {str(e)[:200]}), so its arguments "
                           "cannot be checked") from e
    for key, value in model_args.items():
        field = f"model_args.{key}"
        if key in LOADING_KWARGS or key not in defaults:
            what = ("chooses where weights come from or how the model is wrapped"
                    if key in LOADING_KWARGS else f"is not an argument of {arch}'s constructor")
            raise AdapterError(
                f"{path}: field {field!r} is not allowed: it {what}. An adapter may set only "
                f"architecture arguments of {arch}: {sorted(defaults)}; pass loading keywords "
                "(pretrained_cfg_overlay, checkpoint_path, ...) to from_pretrained yourself")
        items = value if isinstance(value, list) else [value]
        ok = not isinstance(value, list) or len(value) <= LIMITS["list_items"]
        ok = ok and all(v is None or isinstance(v, (bool, int, float, str)) for v in items)
        _want(ok, path, field, f"a JSON scalar or a list of at most {LIMITS['list_items']} "
                               "scalars", value)
        default = defaults[key]
        if isinstance(default, (bool, int, float, str)) and not isinstance(value, list):
            # a scalar default fixes the type: timm compares and multiplies these, so a
            # string or float where an int belongs would fail deep inside the constructor
            want = bool if isinstance(default, bool) else int if isinstance(default, int) else (
                (int, float) if isinstance(default, float) else str)
            ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
            _want(ok, path, field, f"{type(default).__name__} (like its default)", value)
        bound = _int_bound(key, default)
        for v in items:
            if isinstance(v, str):
                _check_str(path, field, v)
            elif _is_int(v) and not -bound <= v <= bound:
                raise AdapterError(f"{path}: field {field!r} must be within [-{bound}, {bound}] "
                                   f"({LIMITS['arch_scale']}x the default of {arch}, or the "
                                   f"documented limit), got {_short(value)}")


def _check_data_config(path: Path, value: Any, where: str = "data_config") -> None:
    _want(isinstance(value, dict) and set(value) <= set(_DATA_KEYS), path, where,
          f"an object with keys from {list(_DATA_KEYS)}", value)
    side = LIMITS["img_size"]  # what eval feeds the model: no larger than a model may be built
    size = value.get("input_size")
    _want(isinstance(size, list) and len(size) == 3 and all(_is_int(v) for v in size)
          and 1 <= size[0] <= 64 and all(1 <= v <= side for v in size[1:]), path,
          f"{where}.input_size", f"[channels <= 64, height <= {side}, width <= {side}]", size)
    for key in ("mean", "std"):
        v = value.get(key)
        _want(isinstance(v, list) and len(v) == size[0] and all(_is_num(x) for x in v)
              and (key == "mean" or all(x > 0 for x in v)), path, f"{where}.{key}",
              f"a list of {size[0]} numbers" + (" > 0" if key == "std" else ""), v)
    interp = value.get("interpolation")
    _want(interp in _INTERPOLATIONS, path, f"{where}.interpolation",
          f"one of {list(_INTERPOLATIONS)}", interp)
    crop = value.get("crop_pct")
    # eval resizes to input_size / crop_pct before cropping: bound the image it allocates
    low = max(size[1:]) / LIMITS["resize_side"]
    _want(_is_num(crop) and low <= crop <= 4, path, f"{where}.crop_pct",
          f"a number in [{low:.4g}, 4] (eval resizes to input_size / crop_pct, at most "
          f"{LIMITS['resize_side']} pixels a side)", crop)
    mode = value.get("crop_mode", "center")
    _want(mode in _CROP_MODES, path, f"{where}.crop_mode", f"one of {list(_CROP_MODES)}", mode)


def _check_labels(path: Path, value: Any, num_classes: Any) -> None:
    if value is None:
        return
    ok = isinstance(value, list) and len(value) <= LIMITS["num_classes"] and all(
        isinstance(v, str) and len(v) <= LIMITS["label_chars"] for v in value)
    _want(ok, path, "label_names", f"a list of class-name strings (each at most "
                                   f"{LIMITS['label_chars']} characters)", value)
    if _is_int(num_classes) and len(value) != num_classes:
        raise AdapterError(f"{path}: field 'label_names' has {len(value)} names but model_args."
                           f"num_classes is {num_classes}; one name per class is allowed")


def _check_base_source(path: Path, value: Any) -> None:
    ok = isinstance(value, dict) and value.get("kind") in _BASE_KINDS and set(value) <= {
        "kind", "name", "hf_hub_id", "license"}
    _want(ok, path, "base_source", f"an object with 'kind' in {list(_BASE_KINDS)} and optional "
                                   "'name', 'hf_hub_id', 'license' strings", value)
    for key in ("name", "hf_hub_id", "license"):
        if key in value:
            _check_str(path, f"base_source.{key}", value[key], r"[\w.\-/]+", nullable=True)


_COUNTS = ("num_trainable_parameters", "num_parameters", "num_adapter_values")
_VERSIONS = ("timm_peft_version", "timm_version", "torch_version")
_REQUIRED = ("format_version", "peft_type", "peft_config", "architecture", "model_args",
             "weights_sha256")
_OPTIONAL = ("library_name", "base_model_name_or_path", "pretrained_tag", "inference_mode",
             "base_fingerprint", "data_config", "label_names", "base_source", *_COUNTS,
             *_VERSIONS)


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``adapter_config.json``: complete, well-formed, bounded and known.

    Every field is checked against what it may hold; the method config is validated by the
    method's own config class (which bounds every size-like field); ``model_args`` may hold only
    the architecture's constructor arguments, each bounded (see :data:`LIMITS`).

    Example:
        >>> import timm, timm_peft, tempfile
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp())
        >>> timm_peft.read_adapter_config(d)["peft_type"]
        'bias'
    """
    if not isinstance(adapter_dir, (str, os.PathLike)):
        raise AdapterError(f"an adapter is a directory path, got {type(adapter_dir).__name__}")
    path = Path(adapter_dir) / CONFIG_NAME
    try:
        cfg = read_json(path, "an adapter config")
    except AdapterError as e:
        if isinstance(e.__cause__, OSError) and e.__cause__.errno in (errno.ENOENT, errno.ENOTDIR):
            raise AdapterError(f"no {CONFIG_NAME} in {adapter_dir}: not an adapter directory "
                               f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})") from e
        raise
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise AdapterError(f"{path} is incomplete: missing {missing}")
    _no_unknown(path, cfg, (*_REQUIRED, *_OPTIONAL))
    version = cfg["format_version"]
    if not _is_int(version) or version < 1:
        raise AdapterError(f"{path}: format_version must be a positive integer, got {_short(version)}")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {version}, newer than this timm_peft reads "
                           f"({FORMAT_VERSION}); upgrade timm_peft")
    try:
        resolve_method(cfg["peft_type"])
    except ValueError as e:
        raise AdapterError(f"{path}: field 'peft_type': {e}") from e
    if not isinstance(cfg["model_args"], dict) or not isinstance(cfg["peft_config"], dict):
        raise AdapterError(f"{path}: model_args and peft_config must be JSON objects")
    try:
        get_method(cfg["peft_type"]).config_cls.from_dict(cfg["peft_config"])
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{path}: bad peft_config: {e}") from e
    _check_str(path, "weights_sha256", cfg["weights_sha256"], _HEX64.pattern)
    if cfg.get("base_fingerprint") is not None:
        _check_str(path, "base_fingerprint", cfg["base_fingerprint"], "sha256:" + _HEX64.pattern)
    import timm
    arch = cfg["architecture"]
    _check_str(path, "architecture", arch, r"[\w]+")
    if not timm.is_model(arch):
        raise AdapterError(f"{path}: field 'architecture' names {arch!r}, not a timm "
                           "architecture (see timm.list_models())")
    tag = cfg.get("pretrained_tag")
    _check_str(path, "pretrained_tag", tag, r"[\w\-]+(\.[\w\-]+)*", nullable=True)
    if tag is not None:
        from timm.models import get_pretrained_cfg
        try:
            known = get_pretrained_cfg(f"{arch}.{tag}", allow_unregistered=False) is not None
        except (RuntimeError, ValueError):
            known = False
        if not known:
            raise AdapterError(f"{path}: field 'pretrained_tag' {tag!r} is not a timm weight tag "
                               f"of {arch} (see timm.list_pretrained('{arch}*'))")
    name = cfg.get("base_model_name_or_path")
    if name is not None:
        _check_str(path, "base_model_name_or_path", name, r"[\w.\-]+")
    for key in _COUNTS:
        if key in cfg:
            _want(_is_int(cfg[key]) and cfg[key] >= 0, path, key, "a non-negative integer",
                  cfg[key])
    for key in _VERSIONS:
        if key in cfg:
            _check_str(path, key, cfg[key], r"[\w.+\-]+")
    for key, allowed in (("library_name", ("timm_peft",)), ("inference_mode", (True, False))):
        if key in cfg:
            _want(cfg[key] in allowed and type(cfg[key]) is type(allowed[0]), path, key,
                  f"one of {list(allowed)}", cfg[key])
    check_model_args(arch, cfg["model_args"], path)
    if "data_config" in cfg:
        _check_data_config(path, cfg["data_config"])
    _check_labels(path, cfg.get("label_names"), cfg["model_args"].get("num_classes"))
    if "base_source" in cfg:
        _check_base_source(path, cfg["base_source"])
    return cfg


# ----------------------------------------------------------------------------------------------
# adapter_model.safetensors
# ----------------------------------------------------------------------------------------------

class Header(dict):
    """Name -> (dtype, shape) of a checked safetensors header; ``file_bytes``: the file's size."""

    def __init__(self, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], file_bytes: int):
        super().__init__(entries)
        self.file_bytes = file_bytes


def read_header(path: Path) -> Header:
    """Name -> (dtype, shape) from a safetensors header, after checking it describes the file.

    Only the header is read. Its size is bounded, every entry must be a known dtype with a
    shape whose byte size equals its data range, and the ranges must tile the rest of the file
    exactly (no gaps, overlaps or trailing bytes), so the file holds what the header says.
    """
    with open_file(path) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(LIMITS["header_bytes"], size - 8):
                raise AdapterError(
                    f"{path} is not a readable safetensors file: its header length "
                    f"{n if n >= 0 else '(missing)'} does not fit a {size:,d}-byte file (at most "
                    f"{LIMITS['header_bytes']:,d}); the file is truncated or corrupted")
            raw = fh.read(n)
        except OSError as e:
            raise _os_error(path, e) from e
    try:
        header = parse_json(raw, path, "a safetensors header")
    except AdapterError as e:
        raise AdapterError(f"{path} is not a readable safetensors file: bad header ({e})") from e
    if not isinstance(header, dict):
        raise AdapterError(f"{path} is not a readable safetensors file: the header is not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise AdapterError(f"{path}: header field '__metadata__' must map strings to strings")
    if len(header) > LIMITS["tensors"]:
        raise AdapterError(f"{path}: {len(header):,d} tensors; at most {LIMITS['tensors']:,d} "
                           "are allowed")
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    ranges = []
    for name, info in header.items():
        where = f"{path}: tensor {name[:80]!r}"
        ok = isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}
        if not ok:
            raise AdapterError(f"{where}: header entry must have exactly 'dtype', 'shape', "
                               f"'data_offsets', got {_short(info)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise AdapterError(f"{where}: dtype {_short(dtype)} is not allowed; allowed: "
                               f"{sorted(_ST_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= LIMITS["tensor_dims"]
                and all(_is_int(d) and 0 <= d < 2 ** 40 for d in shape)):
            raise AdapterError(f"{where}: shape must be a list of at most "
                               f"{LIMITS['tensor_dims']} non-negative integers, got {_short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise AdapterError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= "
                               f"end, got {_short(offsets)}")
        nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise AdapterError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]:,d} "
                               f"bytes, its dtype and shape need {nbytes:,d}")
        ranges.append((offsets[0], offsets[1]))
        out[name] = (_ST_DTYPES[dtype], tuple(shape))
    end = 0
    for begin, stop in sorted(ranges):
        if begin != end:
            raise AdapterError(f"{path}: tensor data ranges overlap or leave a gap at byte {end:,d}")
        end = stop
    if 8 + n + end != size:
        raise AdapterError(f"{path} is {size:,d} bytes but its header describes {8 + n + end:,d}: "
                           "the file is truncated, corrupted or from another save")
    return Header(out, file_bytes=size)


def check_tensors(path: Path, header: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                  expected: dict[str, torch.Tensor], what: str) -> None:
    """The header names exactly ``expected``'s tensors, each with its shape and dtype."""
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or extra:
        raise AdapterError(f"{path} does not fit {what}: missing tensors {missing[:8]}"
                           f"{'…' if len(missing) > 8 else ''}, unexpected tensors "
                           f"{[e[:80] for e in extra[:8]]}{'…' if len(extra) > 8 else ''}")
    bad = [f"{k}: saved {tuple(header[k][1])}, model {tuple(t.shape)}"
           for k, t in expected.items() if tuple(t.shape) != header[k][1]]
    if bad:
        raise AdapterError(f"{path} has mis-shaped tensors for {what} (another num_classes or "
                           f"config?): {bad[:8]}")
    bad = [f"{k}: saved {header[k][0]}, model {t.dtype}"
           for k, t in expected.items() if t.dtype != header[k][0]]
    if bad:
        raise AdapterError(f"{path} has tensors of another dtype than {what} (never cast "
                           f"silently; convert the model or the adapter): {bad[:8]}")


def read_weights(path: Path, sha256: str, header: Header | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, if its hash matches and every floating-point value is
    finite; at most the bytes its checked ``header`` describes are read (a file swapped since
    then fails the hash)."""
    from safetensors.torch import load

    header = read_header(path) if header is None else header
    blob = read_bytes(path, header.file_bytes, "the weights file its header describes")
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise AdapterError(f"{path} does not match {CONFIG_NAME} (field 'weights_sha256' differs): "
                           "the file is truncated, corrupted or from another save")
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises several types on bad files
        raise AdapterError(f"{path} is not a readable safetensors file: {e}") from e
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterError(f"{path}: tensor {name!r} holds NaN or Inf values; only finite "
                               "values are allowed")
    return tensors
