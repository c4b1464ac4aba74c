"""Adapter I/O: one generic save / load / rebuild path for every method.

An adapter directory holds ``adapter_model.safetensors`` (only the task-specific tensors: the
method's parameters and buffers plus the head, never a frozen base tensor) and
``adapter_config.json`` (how to rebuild base + adapter). Nothing is ever unpickled. Files are
written to a temporary name and renamed into place, and the config records the SHA-256 of the
weights it belongs to, so an interrupted or mixed save is detected on load.

The same directory is what goes to the Hugging Face Hub (:func:`push_to_hub`) and what
``hf-hub:<org>/<name>`` names when loading; a ``config.json`` beside it lets
``timm.create_model("hf-hub:<org>/<name>")`` rebuild the model too, and makes plain timm refuse it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from torch import nn

from .core import (get_method, get_nb_trainable_parameters, get_peft_config, resolve_method,
                   unwrap_features)

__all__ = ["save_pretrained", "load_adapter", "from_pretrained", "read_adapter_config",
           "base_fingerprint", "AdapterError", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT_VERSION",
           "push_to_hub", "resolve_adapter_dir", "make_model_card", "timm_config",
           "TIMM_CONFIG_NAME", "ADAPTER_MARKER"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1
#: timm's own config file, read by ``timm.create_model("hf-hub:...")`` / ``("local-dir:...")``
TIMM_CONFIG_NAME = "config.json"
#: key in the ``model_args`` of an adapter's ``config.json`` that marks it as a timm_peft adapter
ADAPTER_MARKER = "timm_peft_adapter"
HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"
_DATA_CFG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode",
                  "fixed_input_size")
_REQUIRED = ("format_version", "peft_type", "peft_config", "architecture", "model_args",
             "weights_sha256")


class AdapterError(ValueError):
    """An adapter cannot be read, or does not fit the model it is loaded onto."""


# ----------------------------------------------------------------------------------------------
# helpers
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
            reason = ("HF_HUB_OFFLINE is set" if _is_offline() else "the Hub cannot be reached")
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
        snapshot = Path(path).parent
    assert snapshot is not None
    return snapshot


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
        raise TypeError(f"adapter must be a directory or '{HUB_PREFIX}<org>/<name>', got "
                        f"{type(adapter).__name__}")
    if isinstance(adapter, str) and adapter.startswith(LOCAL_PREFIX):
        adapter = adapter[len(LOCAL_PREFIX):]
    if revision is not None:
        raise AdapterError(f"revision={revision!r} applies to Hub adapters ('{HUB_PREFIX}<org>/"
                           f"<name>'), not to the local path {str(adapter)!r}")
    path = Path(adapter)
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterError(f"adapter {str(adapter)!r} is a file; pass the directory that holds "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    hint = ""
    if isinstance(adapter, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", adapter) \
            and not adapter.startswith("."):
        hint = f"; for a Hugging Face Hub repo write '{HUB_PREFIX}{adapter}'"
    raise AdapterError(f"adapter directory {str(adapter)!r} does not exist{hint}")


_CARD_FIELDS: dict[str, tuple[type, ...]] = {
    "repo_id": (str,), "dataset": (str,), "metrics": (dict,), "training": (dict,),
    "license": (str,), "tags": (list, tuple), "description": (str,),
}


def _base_pretrained_cfg(arch: str, tag: str | None) -> dict[str, Any]:
    """timm's registry entry for the base weights; empty when they are not known to timm."""
    from timm.models import get_pretrained_cfg
    if not tag:  # no recorded weight tag: claiming timm's default weights could be wrong
        return {}
    try:
        pc = get_pretrained_cfg(f"{arch}.{tag}")
    except RuntimeError:  # a tag timm does not know (the base came from elsewhere)
        return {}
    return pc.to_dict() if pc is not None else {}


def _md_table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def make_model_card(cfg: dict[str, Any], nbytes: int, **card_info: Any) -> str:
    """The ``README.md`` of an adapter: Hub YAML front matter and a vision model card.

    ``cfg`` is the adapter's ``adapter_config.json`` and ``nbytes`` the size of its weights file.
    ``card_info`` (all optional): ``repo_id`` (the Hub repo, used in the loading snippet),
    ``dataset`` (a Hub dataset id), ``metrics`` (``{"accuracy": 0.91}``; with a dataset they also
    become Hub evaluation results), ``training`` (settings such as ``{"epochs": 100}``),
    ``license`` (default: the base weights' license), ``tags`` and ``description``.

    The YAML carries ``library_name: timm``, ``tags`` (timm, timm_peft, image-classification,
    the method), ``pipeline_tag``, ``base_model`` (the base weights' Hub repo, when timm has one)
    with ``base_model_relation: adapter``, ``license``, ``datasets`` and metrics.

    Example:
        >>> import timm, timm_peft, tempfile
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp(),
        ...                               dataset="cifar10", metrics={"accuracy": 0.9})
        >>> (d / "README.md").read_text().splitlines()[0]
        '---'
    """
    from huggingface_hub import EvalResult, ModelCardData

    unknown = sorted(set(card_info) - set(_CARD_FIELDS))
    if unknown:
        raise TypeError(f"unknown model card field(s) {unknown}; allowed: {sorted(_CARD_FIELDS)}")
    for key, value in card_info.items():
        if value is not None and not isinstance(value, _CARD_FIELDS[key]):
            allowed = " or ".join(t.__name__ for t in _CARD_FIELDS[key])
            raise TypeError(f"model card field {key!r} must be {allowed}, got {type(value).__name__}")
    repo_id: str | None = card_info.get("repo_id")
    dataset: str | None = card_info.get("dataset")
    metrics: dict[str, Any] = dict(card_info.get("metrics") or {})
    training: dict[str, Any] = dict(card_info.get("training") or {})

    method = get_method(cfg["peft_type"])
    base_name = cfg["base_model_name_or_path"]
    base_pc = _base_pretrained_cfg(cfg["architecture"], cfg.get("pretrained_tag"))
    base_hub = base_pc.get("hf_hub_id") or None
    license_ = card_info.get("license") or base_pc.get("license")
    name = repo_id or f"{base_name}.{cfg['peft_type']}"
    tags = ["timm", "timm_peft", "peft", "image-classification", cfg["peft_type"],
            *[str(t) for t in card_info.get("tags") or ()]]
    results = [EvalResult(task_type="image-classification", dataset_type=dataset,
                          dataset_name=dataset, metric_type=str(k), metric_value=v)
               for k, v in metrics.items()] if dataset else None
    extra = dict(base_model_relation="adapter") if base_hub else {}
    data = ModelCardData(library_name="timm", tags=tags, pipeline_tag="image-classification",
                         base_model=base_hub, license=license_,
                         datasets=[dataset] if dataset else None,
                         metrics=[str(k) for k in metrics] or None,
                         model_name=name if results else None, eval_results=results, **extra)

    trainable, total = cfg["num_trainable_parameters"], cfg["num_parameters"]
    base_link = f"[`{base_name}`](https://huggingface.co/{base_hub})" if base_hub else f"`{base_name}`"
    hp = ", ".join(f"`{k}={v!r}`" for k, v in cfg["peft_config"].items())
    margs = ", ".join(f"`{k}={v!r}`" for k, v in cfg["model_args"].items()) or "(defaults)"
    source = f"{HUB_PREFIX}{repo_id}" if repo_id else "path/to/this/folder"
    desc = card_info.get("description")
    parts = [
        f"# {name}\n",
        (desc + "\n") if desc else "",
        f"A **{cfg['peft_type']}** adapter ({method.description or method.name}) for the timm "
        f"model {base_link}, made with timm_peft. This repository holds only the task-specific "
        f"tensors; the frozen base weights come from timm's usual pretrained source.\n",
        "## Adapter\n",
        _md_table(("", ""), [
            ("method", f"`{cfg['peft_type']}`" + (f" ({method.description})" if method.description else "")),
            ("method config", hp or "(defaults)"),
            ("base model", f"`{base_name}` (timm arch `{cfg['architecture']}`)"),
            ("model args", margs),
            ("trainable parameters", f"{trainable:,d} of {total:,d} "
                                     f"({100 * trainable / total if total else 0:.4f}%)"),
            ("adapter file", f"`{WEIGHTS_NAME}`, {nbytes:,d} bytes "
                             f"({cfg['num_adapter_values']:,d} values)"),
        ]),
        "## How to use\n",
        "```python\n"
        "import timm, timm_peft\n"
        f"model = timm_peft.from_pretrained(\"{source}\").eval()  # timm base weights + this adapter\n"
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))\n"
        "```\n",
        f"With `timm_peft` imported, `timm.create_model(\"{HUB_PREFIX if repo_id else 'local-dir:'}"
        f"{repo_id or 'path/to/this/folder'}\", pretrained=True)` builds the same model. "
        "Without it, timm refuses the repo (its `config.json` holds a `timm_peft_adapter` "
        "argument no timm model accepts), so the adapter is never mistaken for full weights.\n",
    ]
    if training:
        parts += ["## Training\n", _md_table(("setting", "value"),
                                             [(str(k), f"`{v!r}`") for k, v in training.items()])]
    if metrics:
        where = f"on `{dataset}`" if dataset else ""
        parts += ["## Results\n", _md_table(("metric", "value"),
                                             [(f"{k} {where}".strip(), f"{v}") for k, v in metrics.items()])]
    parts += [
        "## Files\n",
        f"- `{WEIGHTS_NAME}`: the adapter tensors (safetensors, nothing pickled)\n"
        f"- `{CONFIG_NAME}`: method, config, base arch, weight tag, model args, base-weights "
        "fingerprint, weights hash\n"
        f"- `{TIMM_CONFIG_NAME}`: what `timm.create_model(\"{HUB_PREFIX}...\")` reads\n",
        f"Saved with timm_peft {cfg.get('timm_peft_version', '?')}, timm {cfg.get('timm_version', '?')}, "
        f"torch {cfg.get('torch_version', '?')}.\n",
    ]
    body = "\n".join(p for p in parts if p)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def timm_config(model: nn.Module, cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` that makes ``timm.create_model("hf-hub:<adapter repo>")`` rebuild the model.

    timm reads ``architecture``, ``model_args`` and ``pretrained_cfg`` (data settings) from it.
    ``model_args`` carries ``timm_peft_adapter``: timm_peft's build hook recognises it and rebuilds
    base + method + adapter, while plain timm passes it on to the model's ``__init__``, which
    raises ``TypeError``, so an adapter directory is never loaded as full weights.
    """
    inner = unwrap_features(model)
    pc = getattr(inner, "pretrained_cfg", None) or {}
    data = {k: pc[k] for k in _DATA_CFG_KEYS if pc.get(k) is not None}
    out: dict[str, Any] = dict(architecture=cfg["architecture"])
    if isinstance(getattr(inner, "num_classes", None), int):
        out["num_classes"] = data["num_classes"] = inner.num_classes
    out["model_args"] = {**cfg["model_args"], ADAPTER_MARKER: CONFIG_NAME}
    out["pretrained_cfg"] = data
    return out


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
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors', 'config.json']
    """
    from safetensors.torch import save

    config = get_peft_config(model)
    inner = unwrap_features(model)
    method = get_method(inner.peft_method)
    state = method.adapter_state_dict(inner)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # one metadata key: safetensors orders several at random, and the saved bytes are hashed
    blob = save(tensors, metadata={"format": "pt"})
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
    _, total = get_nb_trainable_parameters(inner)
    # counted in the saved form: a pruned-but-full-size tensor (E²VPT) trains only what it saves
    trainable_names = {n for n, p in inner.named_parameters() if p.requires_grad}
    trainable = sum(t.numel() for k, t in tensors.items() if k in trainable_names) + sum(
        p.numel() for n, p in inner.named_parameters() if p.requires_grad and n not in tensors)
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
    card = make_model_card(cfg, nbytes=len(blob), **card_info)  # bad card_info writes nothing
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, blob)
    atomic_write(out / "README.md", card.encode())
    atomic_write(out / TIMM_CONFIG_NAME,
                  (json.dumps(timm_config(model, cfg), indent=2) + "\n").encode())
    # the config is written last: it names the weights' hash, so a crash in between is detected
    atomic_write(out / CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
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


# ----------------------------------------------------------------------------------------------
# Hugging Face Hub
# ----------------------------------------------------------------------------------------------

def push_to_hub(
        model: nn.Module,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        **card_info: Any,
) -> Any:
    """Upload the adapter of ``model`` to a Hugging Face Hub model repo (peft's name).

    The folder :func:`save_pretrained` writes is uploaded as one commit, and nothing else:
    ``adapter_model.safetensors``, ``adapter_config.json``, ``config.json`` and the model card
    ``README.md`` (``card_info`` as for :func:`make_model_card`); never a frozen base tensor. The
    repo is created if needed (``private`` applies to a new repo), and a ``revision`` names a
    branch, created if needed. Returns huggingface_hub's ``CommitInfo``.

    Example:
        >>> import timm, timm_peft
        >>> model = timm.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k.linear",
        ...                           pretrained=True, num_classes=100)  # doctest: +SKIP
        >>> # ... train ...
        >>> timm_peft.push_to_hub(model, "my-org/vit-b16-linear-cifar100", dataset="cifar100",
        ...                       metrics={"accuracy": 0.91})  # doctest: +SKIP
        >>> model = timm_peft.from_pretrained("hf-hub:my-org/vit-b16-linear-cifar100")  # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    get_peft_config(model)
    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be a str like 'my-org/my-adapter', got {type(repo_id).__name__}")
    if "repo_id" in card_info:
        raise TypeError("push_to_hub sets the card's repo_id itself; pass the repo as repo_id")
    repo_id, at_rev = _split_hub_id(repo_id.removeprefix(HUB_PREFIX), None)
    if at_rev is not None:
        raise AdapterError(f"push_to_hub takes the branch as revision={at_rev!r}, not in repo_id")
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="timm_peft_push_") as tmp:
        # written before any network call: a bad model or card_info fails without touching the Hub
        folder = save_pretrained(model, tmp, repo_id=repo_id, **card_info)
        full_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
        if full_id != repo_id:  # a name without namespace lands in the user's namespace
            folder = save_pretrained(model, tmp, repo_id=full_id, **card_info)
        if revision is not None and revision != "main" and not revision.startswith("refs/pr/"):
            api.create_branch(full_id, branch=revision, exist_ok=True, token=token)
        cfg = read_adapter_config(folder)
        operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
                      for p in sorted(folder.iterdir()) if p.is_file()]
        return api.create_commit(
            full_id, operations, token=token, revision=revision, create_pr=create_pr,
            commit_message=commit_message or (f"Upload {cfg['peft_type']} adapter for "
                                              f"{cfg['base_model_name_or_path']} (timm_peft)"))


def _build_from_adapter_repo(entrypoint: Any, arch: str, kwargs: dict[str, Any]) -> nn.Module | None:
    """Build hook: ``timm.create_model("hf-hub:<adapter repo>")`` rebuilds base + method + adapter.

    timm has read the repo's ``config.json`` and passes its ``model_args``, including
    :data:`ADAPTER_MARKER`, and a ``pretrained_cfg`` naming the source. As in timm,
    ``pretrained=True`` loads weights (the base's through timm, then the adapter) and
    ``pretrained=False`` gives the architecture only: base + method, freshly initialised.
    """
    if ADAPTER_MARKER not in kwargs:
        return None
    kwargs = dict(kwargs)
    kwargs.pop(ADAPTER_MARKER)
    kwargs.pop("pretrained_model_args", None)
    source_cfg = kwargs.pop("pretrained_cfg", None)
    source = source_cfg.get("source") if isinstance(source_cfg, dict) else None
    if source == "hf-hub":
        adapter = HUB_PREFIX + source_cfg["hf_hub_id"]
    elif source == "local-dir":
        adapter = source_cfg["file"]
    else:
        raise AdapterError(f"{ADAPTER_MARKER!r} belongs in an adapter's {TIMM_CONFIG_NAME}; load an "
                           f"adapter with timm.create_model('{HUB_PREFIX}<org>/<name>') or "
                           f"('{LOCAL_PREFIX}<dir>'), or timm_peft.from_pretrained")
    adapter_dir = resolve_adapter_dir(adapter, cache_dir=kwargs.get("cache_dir"))
    cfg = read_adapter_config(adapter_dir)
    if cfg["architecture"] != arch:
        raise AdapterError(f"{adapter}: {TIMM_CONFIG_NAME} names arch {arch!r} but {CONFIG_NAME} "
                           f"names {cfg['architecture']!r}")
    if kwargs.pop("pretrained", False):
        return from_pretrained(adapter_dir, pretrained=True, **kwargs)
    import timm
    name = cfg["architecture"] + (f".{cfg['pretrained_tag']}" if cfg.get("pretrained_tag") else "")
    return timm.create_model(name, pretrained=False, peft=cfg["peft_type"],
                             peft_cfg=cfg["peft_config"], **{**cfg["model_args"], **kwargs})


def _register_build_hook() -> None:
    from .integration import BUILD_HOOKS
    if _build_from_adapter_repo not in BUILD_HOOKS:
        BUILD_HOOKS.append(_build_from_adapter_repo)


_register_build_hook()
