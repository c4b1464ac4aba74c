"""An unreachable Hugging Face Hub found once, then offline: :func:`offline_when_unreachable`.

Without network, huggingface_hub retries every request with back-off before it reads its cache:
``timm-peft info hf-hub:...`` took 28 s and pretrained weights 52 s to reach their error. The
``timm-peft`` command asks the Hub once instead, and then works offline.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

__all__ = ["offline_when_unreachable", "hub_unreachable", "PROBE_TIMEOUT_S"]

_log = logging.getLogger(__name__)

#: seconds the one probe of the Hub waits for any answer (huggingface_hub itself waits 10 s per
#: request and tries 6 times with back-off)
PROBE_TIMEOUT_S = 3.0

#: why the Hub was found unreachable inside :func:`offline_when_unreachable` (None: not found so)
_unreachable: str | None = None


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

    When huggingface_hub first opens its HTTP session (that is, before its first request, and
    only if one is made), one ``HEAD`` request to its endpoint (``HF_ENDPOINT``) with a
    ``timeout``-second limit and no retry decides: with any HTTP answer nothing changes; without
    one, huggingface_hub's offline mode (what ``HF_HUB_OFFLINE=1`` sets) holds for the rest of
    the block, so every later request reads the local cache at once, and a warning says how to
    work offline. With ``HF_HUB_OFFLINE=1`` already set nothing is probed. The ``timm-peft``
    command runs each command inside it; a Python program is left to huggingface_hub's own
    behaviour unless it asks for this.

    Example:
        >>> from timm_peft.io.offline import offline_when_unreachable
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
