"""The Hugging Face Hub side of adapters: ``hf-hub:`` names, ``push_to_hub`` and timm's hook.

An adapter repo is the directory :func:`~timm_peft.save_pretrained` writes; ``hf-hub:<org>/<name>``
names it when loading. Its ``config.json`` lets ``timm.create_model("hf-hub:<org>/<name>")``
rebuild base + method + adapter through timm_peft (and makes plain timm refuse it), but it is
only a pointer: everything that builds the model comes from ``adapter_config.json``, checked.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..core import get_peft_config, unwrap_features
from .card import HUB_PREFIX, LOCAL_PREFIX
from .format import CONFIG_NAME, TIMM_CONFIG_NAME, WEIGHTS_NAME, ADAPTER_MARKER, AdapterError, \
    read_adapter_config
from .save_load import from_pretrained, restore_pretrained_cfg, save_pretrained

__all__ = ["resolve_adapter_dir", "push_to_hub", "HUB_PREFIX", "LOCAL_PREFIX"]


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
        raise AdapterError(f"an adapter is a directory, '{LOCAL_PREFIX}<dir>' or "
                           f"'{HUB_PREFIX}<org>/<name>', got {type(adapter).__name__}")
    if isinstance(adapter, str) and adapter.startswith(LOCAL_PREFIX):
        adapter = adapter[len(LOCAL_PREFIX):]
    if revision is not None:
        raise AdapterError(f"revision={revision!r} applies to Hub adapters ('{HUB_PREFIX}<org>/"
                           f"<name>'), not to the local path {str(adapter)!r}")
    path = Path(adapter)
    from .save_load import recover_interrupted_save
    recover_interrupted_save(path)  # a save killed halfway: its previous adapter comes back
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


def push_to_hub(
        model: nn.Module,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        adapter_name: str | None = None,
        **card_info: Any,
) -> Any:
    """Upload the adapter of ``model`` to a Hugging Face Hub model repo (peft's name).

    A repo holds one adapter: the one named ``adapter_name``, by default the active one (see
    :func:`timm_peft.add_adapter`).

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
    if adapter_name is None and unwrap_features(model).__dict__.get("peft_adapters"):
        adapter_name = unwrap_features(model).peft_active_adapter
        if isinstance(adapter_name, tuple):
            raise ValueError(f"adapters {list(adapter_name)} are composed and a repo holds one "
                             "adapter: pass adapter_name (push each one)")
    card_info = dict(card_info, adapter_name=adapter_name)
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

    timm has read the repo's ``config.json`` and merged its ``model_args`` (with
    :data:`ADAPTER_MARKER`) into the keywords, and passes a ``pretrained_cfg`` naming the source.
    ``config.json`` is only a pointer: its ``model_args`` are dropped (the adapter's checked
    ``adapter_config.json`` says how to build), so it can never pass loading keywords. As in
    timm, ``pretrained=True`` loads weights (the base's through timm, then the adapter) and
    ``pretrained=False`` gives the architecture only: base + method, freshly initialised.
    """
    if ADAPTER_MARKER not in kwargs:
        return None
    from_config = kwargs.get("pretrained_model_args") or {}
    # keywords timm merged in from config.json are the config's objects; the caller's are not
    kwargs = {k: v for k, v in kwargs.items()
              if k not in (ADAPTER_MARKER, "pretrained_model_args")
              and not (k in from_config and from_config[k] is v)}
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
    adapter_dir = resolve_adapter_dir(adapter, cache_dir=kwargs.pop("cache_dir", None))
    cfg = read_adapter_config(adapter_dir)
    if cfg["architecture"] != arch:
        raise AdapterError(f"{adapter}: {TIMM_CONFIG_NAME} names arch {arch!r} but {CONFIG_NAME} "
                           f"names {cfg['architecture']!r}")
    pointer_args = {k: v for k, v in from_config.items() if k != ADAPTER_MARKER}
    if pointer_args != cfg["model_args"]:
        raise AdapterError(f"{adapter}: field 'model_args' of {TIMM_CONFIG_NAME} "
                           f"({sorted(pointer_args)}) differs from {CONFIG_NAME}'s "
                           f"({sorted(cfg['model_args'])}); they must be equal")
    if kwargs.pop("pretrained", False):
        return from_pretrained(adapter_dir, **kwargs)
    import timm
    from .save_load import _model_name, check_against_meta
    check_against_meta(adapter_dir, cfg, kwargs)
    model = timm.create_model(_model_name(cfg), pretrained=False, peft=cfg["peft_type"],
                              peft_cfg=cfg["peft_config"], **{**cfg["model_args"], **kwargs})
    return restore_pretrained_cfg(model, cfg)


def _register_build_hook() -> None:
    from ..integration import BUILD_HOOKS
    if _build_from_adapter_repo not in BUILD_HOOKS:
        BUILD_HOOKS.append(_build_from_adapter_repo)
