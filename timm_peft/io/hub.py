"""Sharing adapters on the Hugging Face Hub: :func:`push_to_hub`.

An adapter repo is the directory :func:`~timm_peft.save_pretrained` writes; ``hf-hub:<org>/<name>``
names it when loading (:mod:`.load`). Its ``config.json`` makes plain timm refuse it, and is only
a pointer for timm_peft: everything that builds the model comes from ``adapter_config.json``.
"""
from __future__ import annotations

import tempfile
from typing import Any

from torch import nn

from ..core import get_peft_config, unwrap_features
from .card import HUB_PREFIX, LOCAL_PREFIX
from .format import AdapterError, read_adapter_config
from .load import _split_hub_id
from .save_load import save_pretrained

__all__ = ["push_to_hub", "HUB_PREFIX", "LOCAL_PREFIX"]


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
