"""Save an adapter as one unit.

``save_pretrained`` writes every file of an adapter into a sibling temporary directory and swaps
it in with one atomic rename, under a lock, so a reader sees the old adapter or the new one,
never a mix. Where the atomic exchange is missing (macOS, some filesystems) two renames do it,
and a journal beside the adapter lets the next save or load put the previous adapter back after
a kill between them; a save removes only the temporaries its journal names. Loading is
:mod:`.load`'s.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..core import get_method, get_nb_trainable_parameters, get_peft_config, unwrap_features
from .card import make_model_card, timm_config
from .format import (CONFIG_NAME, FORMAT_VERSION, LOADING_KWARGS, TIMM_CONFIG_NAME, WEIGHTS_NAME,
                     AdapterError, base_fingerprint, check_model_args)

__all__ = ["save_pretrained"]

_DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


# ----------------------------------------------------------------------------------------------
# what an adapter records about its base and its data
# ----------------------------------------------------------------------------------------------

def _base_info(model: nn.Module) -> dict[str, Any]:
    """Arch, weight tag, model args and whether weights were loaded (None: not known)."""
    info = getattr(model, "peft_base", None) or getattr(unwrap_features(model), "peft_base", None)
    if info is not None:
        return {"pretrained": None, **info}
    pc = getattr(unwrap_features(model), "pretrained_cfg", None) or {}
    arch = pc.get("architecture")
    if not arch:
        raise AdapterError("cannot tell which timm architecture this model is (no pretrained_cfg); "
                           "build it with timm.create_model")
    args = dict(getattr(model, "_model_args", {}) or {})
    args.setdefault("num_classes", getattr(model, "num_classes", None))
    return dict(architecture=arch, pretrained_tag=pc.get("tag") or None, pretrained=None,
                model_args=args)


def _registry_cfg(arch: str, tag: str | None) -> dict[str, Any]:
    """timm's registered pretrained_cfg for ``arch.tag``; empty when timm has none."""
    from timm.models import get_pretrained_cfg
    if not tag:
        return {}
    try:
        pc = get_pretrained_cfg(f"{arch}.{tag}", allow_unregistered=False)
    except (RuntimeError, ValueError):
        return {}
    return pc.to_dict() if pc is not None else {}


def _base_source(model: nn.Module, arch: str, tag: str | None, pretrained: bool | None) -> dict:
    """Where the frozen base weights really came from: timm's weights, a file, random init."""
    pc = getattr(unwrap_features(model), "pretrained_cfg", None) or {}
    if pretrained is False:
        return dict(kind="random")
    if pretrained is None:
        return dict(kind="unknown")
    if pc.get("file") or pc.get("state_dict") is not None:
        return dict(kind="file")
    reg = _registry_cfg(arch, tag)
    same = reg and all(pc.get(k) == reg.get(k) for k in ("hf_hub_id", "url", "hf_hub_filename"))
    if not same:
        return dict(kind="other")
    out = dict(kind="timm", name=f"{arch}.{tag}")
    for key in ("hf_hub_id", "license"):
        if reg.get(key):
            out[key] = reg[key]
    return out


def _data_config(inner: nn.Module) -> dict[str, Any]:
    """The data configuration the model expects now (timm's own resolution of its input)."""
    try:
        from timm.data import resolve_input_data_config as resolve
    except ImportError:  # timm < 1.0.31
        from timm.data import resolve_data_config as resolve  # type: ignore[no-redef]
    if getattr(inner, "pretrained_cfg", None) is None:
        return {}
    dc = resolve(model=inner)
    return {k: list(dc[k]) if isinstance(dc[k], tuple) else dc[k] for k in _DATA_KEYS if k in dc}


def _label_names(inner: nn.Module, label_names: Any) -> list[str] | None:
    num_classes = getattr(inner, "num_classes", None)
    if label_names is None:
        label_names = (getattr(inner, "pretrained_cfg", None) or {}).get("label_names")
        if label_names is None or len(label_names) != num_classes:
            return None  # the base's classes, not this head's
    if isinstance(label_names, str) or not all(isinstance(n, str) for n in label_names):
        raise TypeError("label_names must be a list of class-name strings")
    if num_classes is not None and len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label_names for a model with {num_classes} classes")
    return list(label_names)


# ----------------------------------------------------------------------------------------------
# one adapter, one atomic unit on disk
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(directory: Path, blocking: bool = True) -> Iterator[bool]:
    """Serialise saves into ``directory`` (an advisory ``flock`` on it; a no-op without fcntl).

    Yields whether the lock is held: without ``blocking``, False when another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _load_renameat2() -> Any:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:  # pragma: no cover - no C library to ask
        return None


#: Linux ``renameat2`` (None elsewhere: macOS, other libcs); tests set it to None to force the
#: two-rename fallback
_RENAMEAT2 = _load_renameat2()


def _exchange(tmp: Path, out: Path, aside: Path) -> None:
    """Put the directory ``tmp`` in place of the directory ``out``.

    Atomically with Linux ``renameat2(RENAME_EXCHANGE)`` (``tmp`` then holds the old adapter).
    Where the exchange is not available, two renames: ``out`` to ``aside``, ``tmp`` to ``out``;
    a kill between them leaves the previous adapter in ``aside``, and the save's journal tells
    the next save or load to put it back (:func:`_recover`).
    """
    fn = _RENAMEAT2
    if fn is not None:
        at_fdcwd, rename_exchange = -100, 2
        if fn(at_fdcwd, os.fsencode(tmp), at_fdcwd, os.fsencode(out), rename_exchange) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(out))
    os.rename(out, aside)
    os.rename(tmp, out)


# What a save leaves beside ``out`` while it runs: the new adapter being written
# (``.<out>.tmp-<token>``), where the fallback moves the previous adapter aside
# (``.<out>.old-<token>``), and a journal (``.<out>.timm_peft-save``) naming both, written before
# either exists. A save removes only the directories its journal names (a 128-bit token a user's
# directory does not carry, and for the one moved aside its inode), so a user's own
# ``.<out>.tmp-*`` is never touched.
_TOKEN_HEX = 32
_NAME_MAX = 255


def _unit_names(out: Path, token: str = "") -> tuple[str, str, str]:
    """The journal, temporary and moved-aside names of a save into ``out``."""
    stem = f".{out.name}"
    if len(os.fsencode(stem)) + 6 + _TOKEN_HEX > _NAME_MAX:  # a long name: its hash instead
        stem = ".timm_peft-" + hashlib.sha256(os.fsencode(out.name)).hexdigest()[:24]
    return f"{stem}.timm_peft-save", f"{stem}.tmp-{token}", f"{stem}.old-{token}"


def _read_journal(out: Path) -> dict[str, Any] | None:
    """The journal of an interrupted save into ``out``; None when there is none we wrote."""
    path = out.parent / _unit_names(out)[0]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    import stat as stat_mod
    if not stat_mod.S_ISREG(st.st_mode) or st.st_size > 4096:
        return None  # not ours: leave it
    try:
        j = json.loads(path.read_text())
        token = j["token"]
        ok = (isinstance(j, dict) and j.get("timm_peft_save") == 1 and j.get("target") == out.name
              and isinstance(token, str) and len(token) == _TOKEN_HEX
              and all(c in "0123456789abcdef" for c in token)
              and (j.get("old") is None or (isinstance(j["old"], list) and len(j["old"]) == 2
                                            and all(isinstance(v, int) for v in j["old"]))))
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError):
        ok = False
    if ok:
        return {**j, "path": path}
    if st.st_size == 0:
        # a save killed between creating its journal and writing it (one small write, which a
        # kill does not cut): nothing it would name exists yet, and an empty file holds nothing
        return {"path": path, "token": None}
    raise AdapterError(f"cannot save the adapter to {out}: {path} is not a journal timm_peft "
                       "wrote, and a save keeps its journal under that name; move the file away")


def _recover(out: Path) -> None:
    """Finish what an interrupted save into ``out`` left (call it holding the lock).

    The previous adapter moved aside by the fallback comes back when the new one never took its
    place; the new adapter's temporary, or the previous adapter once the new one is in place, is
    removed. Only directories the journal names are touched.
    """
    j = _read_journal(out)
    if j is None:
        return
    if j["token"] is not None:
        _, tmp_name, aside_name = _unit_names(out, j["token"])
        tmp, aside = out.parent / tmp_name, out.parent / aside_name
        old = tuple(j["old"]) if j.get("old") else None
        try:
            st = os.lstat(aside)
            moved = old is not None and (st.st_dev, st.st_ino) == old
        except FileNotFoundError:
            moved = False
        if moved:
            if not os.path.lexists(out):  # killed between the renames: the previous one back
                os.rename(aside, out)
            elif not os.path.lexists(tmp):  # the new adapter took its place: no longer needed
                shutil.rmtree(aside)
            # else something else was put at ``out`` meanwhile: the previous adapter stays aside
        if os.path.lexists(tmp) and os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp)  # the new adapter cut short, or the old one after an exchange
    os.unlink(j["path"])


def recover_interrupted_save(path: str | os.PathLike) -> None:
    """Undo or finish a save into ``path`` that was killed halfway (called before a load).

    Does nothing when no save of ours was interrupted there, while another process is saving
    (it holds the lock and will finish), or where the directory cannot be written.
    """
    out = Path(os.path.realpath(path))
    if not os.path.lexists(out.parent / _unit_names(out)[0]):
        return
    with contextlib.suppress(OSError, AdapterError), _locked(out.parent, blocking=False) as held:
        if held:
            _recover(out)


def _write_unit(out: Path, files: dict[str, bytes]) -> None:
    """Replace the adapter in ``out`` with ``files`` as one unit.

    Files already in ``out`` that the adapter does not own (e.g. ``training_args.json``) are kept;
    a save that was killed halfway is first finished or undone (:func:`_recover`). An OS error
    (disk full, permissions, another filesystem) is an :class:`AdapterError` naming the path,
    and leaves the previous adapter as it was.
    """
    out = Path(os.path.realpath(out))  # a link to an adapter: replace what it points to
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with _locked(parent):
            _recover(out)
            _write_locked(out, files)
    except OSError as e:
        raise AdapterError(_os_error_message(out, e)) from e


def _os_error_message(out: Path, e: OSError) -> str:
    where = e.filename or out
    name = errno.errorcode.get(e.errno or 0, "")
    text = f"cannot save the adapter to {out}: {e.strerror or e} ({name}) at {where}"
    if e.errno == errno.EXDEV:
        text += (f"; {out} is on another filesystem than {out.parent} (a mount point?): an "
                 "adapter is swapped in by a rename within one filesystem, so save into a new "
                 "directory inside it")
    elif e.errno == errno.ENAMETOOLONG:
        text += "; choose a shorter directory name"
    return text + "; the previous adapter there, if any, is unchanged"


def _write_locked(out: Path, files: dict[str, bytes]) -> None:
    parent = out.parent
    if out.exists() and not out.is_dir():
        raise AdapterError(f"cannot save an adapter to {out}: it is a file")
    old = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if old and CONFIG_NAME not in old:
        raise AdapterError(f"cannot save an adapter to {out}: it holds other files "
                           f"({old[:5]}) and no adapter; choose a new or empty directory")
    import secrets
    token = secrets.token_hex(_TOKEN_HEX // 2)
    journal, tmp_name, aside_name = _unit_names(out, token)
    tmp, aside = parent / tmp_name, parent / aside_name
    st = os.stat(out) if out.is_dir() else None
    record = dict(timm_peft_save=1, target=out.name, token=token,
                  old=[st.st_dev, st.st_ino] if st is not None else None)
    # before anything it names exists; one write, so a kill leaves it empty or whole
    fd = os.open(parent / journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.mkdir(tmp, 0o777)  # the umask applies, as to any directory the user makes
        for name, data in files.items():
            with open(tmp / name, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for name in old:
            src = out / name
            if name in files or (name.startswith(".") and name.endswith(".tmp")):
                continue  # ours, or a temporary of the old per-file writes
            if src.is_dir():
                shutil.copytree(src, tmp / name, symlinks=True)
            else:
                shutil.copy2(src, tmp / name, follow_symlinks=False)
        if st is not None:
            _exchange(tmp, out, aside)
        else:
            os.rename(tmp, out)
    finally:
        _recover(out)  # the old adapter, or what a failure left: the journal says which


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------

def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *,
                    label_names: list[str] | None = None, adapter_name: str | None = None,
                    **card_info: Any) -> Path:
    """Save only the adapter of ``model`` (peft's name), as one atomic unit.

    Writes ``adapter_model.safetensors`` (the method's tensors and the head, never a frozen base
    tensor), ``adapter_config.json`` (method, config, base arch and tag, architecture arguments,
    the data configuration ``timm.data`` resolves for the model, class names, where the base
    weights came from and their fingerprint), timm's ``config.json`` and a model card. The class
    names are ``label_names`` or ``model.pretrained_cfg["label_names"]`` (when it has one name
    per class); set ``model.pretrained_cfg``'s ``input_size``/``mean``/``std``/... to the values
    you trained with. ``card_info`` (e.g. ``dataset=``, ``metrics=``, ``training=``) goes to the
    card. The previous adapter in ``save_directory`` stays loadable until the new one is
    complete; concurrent saves to one place are serialised.

    A model with several adapters (:func:`timm_peft.add_adapter`) saves the one named
    ``adapter_name`` into ``save_directory``; without a name it saves every adapter into its own
    subdirectory ``save_directory/<adapter name>``.

    Example:
        >>> import timm, timm_peft, tempfile
        >>> m = timm.create_model("resnet18.linear", num_classes=2)
        >>> d = timm_peft.save_pretrained(m, tempfile.mkdtemp(), label_names=["cat", "dog"])
        >>> sorted(p.name for p in d.iterdir())
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors', 'config.json']
    """
    from ..adapters import get_adapters, using_adapter
    from ..core import _check_state

    _check_state(model, "save_pretrained")
    get_peft_config(model)
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path, got {type(save_directory).__name__}")
    named = unwrap_features(model).__dict__.get("peft_adapters") or {}
    if adapter_name is not None or len(named) > 1:
        if adapter_name is None and label_names is not None:
            raise ValueError("label_names names one adapter's classes: pass adapter_name too "
                             "(each adapter otherwise saves the class names it was loaded with)")
        names = [adapter_name] if adapter_name is not None else list(get_adapters(model))
        for name in names:
            with using_adapter(model, name):
                target = Path(save_directory) if adapter_name is not None else \
                    Path(save_directory) / name
                _save_one(model, target, label_names, card_info)
        return Path(save_directory)
    return _save_one(model, save_directory, label_names, card_info)


def _save_one(model: nn.Module, save_directory: str | os.PathLike, label_names: list[str] | None,
              card_info: dict[str, Any]) -> Path:
    """Save the active adapter as one atomic unit."""
    from safetensors.torch import save

    config = get_peft_config(model)
    inner = unwrap_features(model)
    method = get_method(inner.peft_method)
    out = Path(save_directory)
    state = method.adapter_state_dict(inner)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterError(f"cannot save: adapter tensors {bad[:8]} hold NaN or Inf values")
    # one metadata key: safetensors orders several at random, and the saved bytes are hashed
    blob = save(tensors, metadata={"format": "pt"})
    base = _base_info(model)
    arch, tag = base["architecture"], base.get("pretrained_tag")
    model_args = {k: v for k, v in base["model_args"].items() if k not in LOADING_KWARGS}
    if isinstance(getattr(inner, "num_classes", None), int):
        # the head this adapter trained (one model may hold adapters with heads of any size)
        model_args["num_classes"] = inner.num_classes
    try:
        model_args = json.loads(json.dumps(model_args))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"model args {model_args!r} cannot be written as JSON ({e}); "
                           "pass only JSON values (numbers, strings, lists) to create_model") from e
    check_model_args(arch, model_args, out / CONFIG_NAME)  # never write what load would refuse
    if method.saves_whole_model:
        warnings.warn(f"method {inner.peft_method!r} trains every parameter: the saved adapter is "
                      f"the whole model ({sum(t.numel() for t in tensors.values()):,d} values)",
                      stacklevel=2)
    _, total = get_nb_trainable_parameters(inner)
    # counted in the saved form: a pruned-but-full-size tensor (E²VPT) trains only what it saves
    trainable_names = {n for n, p in inner.named_parameters() if p.requires_grad}
    trainable = sum(t.numel() for k, t in tensors.items() if k in trainable_names) + sum(
        p.numel() for n, p in inner.named_parameters() if p.requires_grad and n not in tensors)
    from .. import __version__
    import timm
    source = _base_source(model, arch, tag, base.get("pretrained"))
    cfg = dict(
        format_version=FORMAT_VERSION,
        library_name="timm_peft",
        peft_type=inner.peft_method,
        peft_config=config.to_dict(),
        # the weights' name only when they are timm's; the tag still selects the arch's config
        base_model_name_or_path=source.get("name", arch),
        architecture=arch,
        pretrained_tag=tag,
        base_source=source,
        model_args=model_args,
        data_config=_data_config(inner),
        label_names=_label_names(inner, label_names),
        num_trainable_parameters=trainable,
        num_parameters=total,
        num_adapter_values=sum(t.numel() for t in tensors.values()),
        inference_mode=True,
        base_fingerprint=base_fingerprint(model),
        weights_sha256=hashlib.sha256(blob).hexdigest(),
        timm_peft_version=__version__, timm_version=timm.__version__,
        torch_version=torch.__version__.split("+")[0],
    )
    if not cfg["data_config"]:
        del cfg["data_config"]
    card = make_model_card(cfg, nbytes=len(blob), **card_info)  # bad card_info writes nothing
    _write_unit(out, {
        WEIGHTS_NAME: blob,
        CONFIG_NAME: (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode(),
        TIMM_CONFIG_NAME: (json.dumps(timm_config(model, cfg), indent=2) + "\n").encode(),
        "README.md": card.encode(),
    })
    return out
