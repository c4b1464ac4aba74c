"""Adapter I/O: one generic save / load / rebuild path for every method.

An adapter directory holds ``adapter_model.safetensors`` (only the task-specific tensors: the
method's parameters and buffers plus the head, never a frozen base tensor) and
``adapter_config.json`` (how to rebuild base + adapter). Nothing is ever unpickled. Files are
written to a temporary name and renamed into place, and the config records the SHA-256 of the
weights it belongs to, so an interrupted or mixed save is detected on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core import (get_method, get_nb_trainable_parameters, get_peft_config, resolve_method,
                   unwrap_features)

__all__ = ["save_pretrained", "load_adapter", "from_pretrained", "read_adapter_config",
           "base_fingerprint", "AdapterError", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT_VERSION"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "peft_type", "peft_config", "architecture", "model_args",
             "weights_sha256")


class AdapterError(ValueError):
    """An adapter cannot be read, or does not fit the model it is loaded onto."""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the frozen base tensors.

    The adapter's own tensors are excluded, so the fingerprint identifies the base weights an
    adapter was trained on and does not change during training.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.linear")
        >>> timm_peft.base_fingerprint(m).startswith("sha256:")
        True
    """
    inner = unwrap_features(model)
    skip = set(getattr(inner, "peft_adapter_keys", ()))
    h = hashlib.sha256()
    for name, t in inner.state_dict().items():
        if name in skip:
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _base_info(model: nn.Module) -> dict[str, Any]:
    """Arch, weight tag and model args: recorded by the timm wrapper, else read off the model."""
    info = getattr(model, "peft_base", None)
    if info is not None:
        return dict(info)
    pc = getattr(model, "pretrained_cfg", None) or {}
    arch = pc.get("architecture")
    if not arch:
        raise AdapterError("cannot tell which timm architecture this model is (no pretrained_cfg); "
                           "build it with timm.create_model")
    args = dict(getattr(model, "_model_args", {}) or {})
    args.setdefault("num_classes", getattr(model, "num_classes", None))
    return dict(architecture=arch, pretrained_tag=pc.get("tag") or None,
                model_args={k: v for k, v in args.items() if k not in ("peft", "peft_cfg")})


def _versions() -> dict[str, str]:
    import timm
    from . import __version__
    return dict(timm_peft_version=__version__, timm_version=timm.__version__,
                torch_version=torch.__version__.split("+")[0])


def resolve_adapter_dir(adapter: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory holding the adapter named by ``adapter`` (a directory for now)."""
    path = Path(adapter)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {adapter} does not exist")
    return path


def make_model_card(cfg: dict[str, Any], nbytes: int, **card_info: Any) -> str:
    """A short Markdown model card for an adapter described by ``cfg``."""
    return (f"# {cfg['peft_type']} adapter for {cfg['base_model_name_or_path']}\n\n"
            f"Trainable parameters: {cfg['num_trainable_parameters']:,d}; adapter bytes: {nbytes:,d}.\n")


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------

def save_pretrained(model: nn.Module, save_directory: str | os.PathLike,
                    **card_info: Any) -> Path:
    """Save only the adapter of ``model``: ``adapter_model.safetensors`` + ``adapter_config.json``.

    ``card_info`` (e.g. ``dataset=``, ``metrics=``, ``training=``) goes to the model card.
    For the ``full`` method the saved adapter is the whole model, and a warning says so.

    Example:
        >>> import timm, timm_peft, tempfile
        >>> m = timm.create_model("resnet18.linear", num_classes=10)
        >>> d = timm_peft.save_pretrained(m, tempfile.mkdtemp())
        >>> sorted(p.name for p in d.iterdir())
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    """
    from safetensors.torch import save

    config = get_peft_config(model)
    inner = unwrap_features(model)
    method = get_method(inner.peft_method)
    state = method.adapter_state_dict(inner)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    blob = save(tensors, metadata={"format": "pt", "peft_type": inner.peft_method})
    base = _base_info(model)
    try:
        json.dumps(base["model_args"])
    except TypeError as e:
        raise AdapterError(f"model args {base['model_args']!r} cannot be written as JSON ({e}); "
                           "pass only JSON values (numbers, strings, lists) to create_model") from e
    if method.saves_whole_model:
        import warnings
        warnings.warn(f"method {inner.peft_method!r} trains every parameter: the saved adapter is "
                      f"the whole model ({sum(t.numel() for t in tensors.values()):,d} values)",
                      stacklevel=2)
    trainable, total = get_nb_trainable_parameters(inner)
    arch, tag = base["architecture"], base.get("pretrained_tag")
    cfg = dict(
        format_version=FORMAT_VERSION,
        library_name="timm_peft",
        peft_type=inner.peft_method,
        peft_config=config.to_dict(),
        base_model_name_or_path=f"{arch}.{tag}" if tag else arch,
        architecture=arch,
        pretrained_tag=tag,
        model_args=base["model_args"],
        num_trainable_parameters=trainable,
        num_parameters=total,
        num_adapter_values=sum(t.numel() for t in tensors.values()),
        inference_mode=True,
        base_fingerprint=base_fingerprint(model),
        weights_sha256=hashlib.sha256(blob).hexdigest(),
        **_versions(),
    )
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, blob)
    _atomic_write(out / "README.md", make_model_card(cfg, nbytes=len(blob), **card_info).encode())
    # the config is written last: it names the weights' hash, so a crash in between is detected
    _atomic_write(out / CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
    return out


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------

def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``adapter_config.json``: complete, well-formed and of a known format.

    Example:
        >>> import timm, timm_peft, tempfile
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp())
        >>> timm_peft.read_adapter_config(d)["peft_type"]
        'bias'
    """
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"no {CONFIG_NAME} in {adapter_dir}: not an adapter directory "
                           f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise AdapterError(f"{path} is incomplete: missing {missing}")
    version = cfg["format_version"]
    if not isinstance(version, int) or version < 1:
        raise AdapterError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {version}, newer than this timm_peft reads "
                           f"({FORMAT_VERSION}); upgrade timm_peft")
    try:
        resolve_method(cfg["peft_type"])
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from e
    if not isinstance(cfg["model_args"], dict) or not isinstance(cfg["peft_config"], dict):
        raise AdapterError(f"{path}: model_args and peft_config must be JSON objects")
    return cfg


def _read_weights(adapter_dir: Path, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"no {WEIGHTS_NAME} in {adapter_dir}")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != cfg["weights_sha256"]:
        raise AdapterError(f"{path} does not match {CONFIG_NAME} (SHA-256 differs): the file is "
                           "truncated, corrupted or from another save")
    try:
        return load(blob)
    except (SafetensorError, Exception) as e:  # safetensors raises several types on bad headers
        raise AdapterError(f"{path} is not a readable safetensors file: {e}") from e


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Load a saved adapter onto a model built with the same arch and method.

    Every mismatch is an :class:`AdapterError`: another method or arch, missing, unexpected or
    mis-shaped tensors, or (unless ``check_base=False``) different base weights.

    Example:
        >>> import timm, timm_peft, tempfile
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp())
        >>> m = timm_peft.load_adapter(timm.create_model("resnet18.bias"), d, check_base=False)
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    inner = unwrap_features(model)
    get_peft_config(model)
    if resolve_method(cfg["peft_type"])[0] != inner.peft_method:
        raise AdapterError(f"adapter in {adapter_dir} is for method {cfg['peft_type']!r}, the model "
                           f"carries {inner.peft_method!r}")
    method = get_method(inner.peft_method)
    arch = (getattr(inner, "pretrained_cfg", None) or {}).get("architecture")
    if arch is not None and arch != cfg["architecture"]:
        raise AdapterError(f"adapter in {adapter_dir} is for arch {cfg['architecture']!r}, the model "
                           f"is {arch!r}")
    try:
        saved_config = method.config_cls.from_dict(cfg["peft_config"])
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{adapter_dir / CONFIG_NAME}: bad peft_config: {e}") from e
    tensors = _read_weights(adapter_dir, cfg)
    method.prepare_load(inner, saved_config)
    expected = set(inner.peft_adapter_keys)
    state = inner.state_dict()
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise AdapterError(f"adapter in {adapter_dir} does not fit the model: missing tensors "
                           f"{missing[:8]}{'…' if len(missing) > 8 else ''}, unexpected tensors "
                           f"{extra[:8]}{'…' if len(extra) > 8 else ''}")
    bad = [f"{k}: saved {tuple(t.shape)}, model {tuple(state[k].shape)}"
           for k, t in tensors.items() if t.shape != state[k].shape]
    if bad:
        raise AdapterError(f"adapter in {adapter_dir} has mis-shaped tensors (another num_classes "
                           f"or config?): {bad[:8]}")
    # after the structure checks: the fingerprint only means something for the same key set
    if check_base:
        fp = base_fingerprint(model)
        if fp != cfg.get("base_fingerprint"):
            raise AdapterError(
                f"the model's base weights differ from those the adapter in {adapter_dir} was "
                f"trained on (fingerprint {fp[:19]}… vs {str(cfg.get('base_fingerprint'))[:19]}…); "
                "build the base with the recorded weights or pass check_base=False")
    inner.load_state_dict(tensors, strict=False)
    return model


def from_pretrained(adapter: str | os.PathLike, pretrained: bool = True, check_base: bool = True,
                    revision: str | None = None, **overrides: Any) -> nn.Module:
    """Rebuild base + method + adapter from an adapter directory or ``hf-hub:org/name`` in one call.

    The base arch, weight tag, model args and method config come from ``adapter_config.json``; the
    base weights come through timm's usual pretrained path (``pretrained=True``). ``overrides`` go
    to ``timm.create_model`` (e.g. ``pretrained_cfg_overlay=dict(file=...)`` for local weights).

    Example:
        >>> import timm, timm_peft, tempfile
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp())
        >>> m = timm_peft.from_pretrained(d, pretrained=False, check_base=False)
        >>> m.peft_method
        'bias'
    """
    import timm
    from .integration import install

    adapter_dir = resolve_adapter_dir(adapter, revision=revision)
    cfg = read_adapter_config(adapter_dir)
    install()
    name = cfg["architecture"] + (f".{cfg['pretrained_tag']}" if cfg.get("pretrained_tag") else "")
    kwargs = {**cfg["model_args"], **overrides}
    model = timm.create_model(name, pretrained=pretrained, peft=cfg["peft_type"],
                              peft_cfg=cfg["peft_config"], **kwargs)
    return load_adapter(model, adapter_dir, check_base=check_base)
