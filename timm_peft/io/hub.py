"""Sharing adapters on the Hugging Face Hub: :func:`push_to_hub`; :func:`offline_when_unreachable`.

An adapter repo is the directory :func:`~timm_peft.save_pretrained` writes; ``hf-hub:<org>/<name>``
names it when loading (:mod:`.load`). Its ``config.json`` makes plain timm refuse it, and is only
a pointer for timm_peft: everything that builds the model comes from ``adapter_config.json``.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from typing import Any, Iterator

from torch import nn

from ..core import get_peft_config, unwrap_features
from .card import HUB_PREFIX, LOCAL_PREFIX
from .format import AdapterError, read_adapter_config
from .load import _split_hub_id
from .save_load import save_pretrained

__all__ = ["push_to_hub", "offline_when_unreachable", "hub_unreachable", "HUB_PREFIX",
           "LOCAL_PREFIX", "PROBE_TIMEOUT_S"]

_log = logging.getLogger(__name__)

#: seconds the one probe of the Hub waits for any answer (huggingface_hub itself waits 10 s per
#: request and retries 5 times with back-off: 28 s to 52 s before a command's error)
PROBE_TIMEOUT_S = 3.0

#: why the Hub was found unreachable inside :func:`offline_when_unreachable` (None: not found so)
_unreachable: str | None = None


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


def hub_unreachable() -> str | None:
    """Why the Hub was found unreachable by :func:`offline_when_unreachable`, or None.

    Example:
        >>> hub_unreachable() is None  # nothing probed outside the command line
        True
    """
    return _unreachable


@contextlib.contextmanager
def offline_when_unreachable(timeout: float = PROBE_TIMEOUT_S) -> Iterator[None]:
    """Inside the block, find an unreachable Hub once and then work offline, without retries.

    huggingface_hub retries a request that gets no connection, with back-off, before the cache is
    read: 28 s for ``timm-peft info hf-hub:...`` and 52 s for pretrained weights without network.
    Here, when huggingface_hub first opens its HTTP session (that is, before its first request,
    and only if one is made), one ``HEAD`` request to its endpoint (``HF_ENDPOINT``) with a
    ``timeout``-second limit and no retry decides: with any HTTP answer nothing changes; without
    one, huggingface_hub's offline mode (what ``HF_HUB_OFFLINE=1`` sets) holds for the rest of
    the block, so every later request reads the local cache at once, and a warning says how to
    work offline. With ``HF_HUB_OFFLINE=1`` already set nothing is probed. The ``timm-peft``
    command runs each command inside it; a Python program is left to huggingface_hub's own
    behaviour unless it asks for this.

    Example:
        >>> from timm_peft.io.hub import offline_when_unreachable
        >>> with offline_when_unreachable():
        ...     pass  # timm.create_model(..., pretrained=True), from_pretrained("hf-hub:...")
    """
    global _unreachable
    from huggingface_hub import constants
    from huggingface_hub.utils import _http, set_client_factory

    previous_factory = _http._GLOBAL_CLIENT_FACTORY  # no public getter (huggingface_hub >= 1.0)
    previous_offline = constants.HF_HUB_OFFLINE
    probed = False

    def probing_factory() -> Any:
        global _unreachable
        nonlocal probed
        client = previous_factory()
        if probed or constants.HF_HUB_OFFLINE:
            return client
        probed = True
        try:
            client.head(constants.ENDPOINT, timeout=timeout)  # one try: no back-off
        except Exception as e:  # noqa: BLE001 - no answer at all, whatever the transport's error
            _unreachable = (f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
                            f"({type(e).__name__}: {str(e)[:160]})")
            constants.HF_HUB_OFFLINE = True
            _log.warning(f"{_unreachable}: working offline from the local cache "
                         f"({constants.HF_HUB_CACHE}); set HF_HUB_OFFLINE=1 to skip this "
                         f"{timeout:g} s check, and use local files: base weights with "
                         "--pretrained-file (pretrained_cfg_overlay=dict(file=...) in Python), "
                         "adapters as directories")
        return client

    set_client_factory(probing_factory)
    try:
        yield
    finally:
        set_client_factory(previous_factory)
        constants.HF_HUB_OFFLINE = previous_offline
        _unreachable = None
