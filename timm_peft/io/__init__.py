"""Adapter I/O: one generic save / load / share path that never knows which method it carries.

An adapter directory holds ``adapter_model.safetensors`` (only the task-specific tensors: the
method's parameters and buffers plus the head, never a frozen base tensor),
``adapter_config.json`` (how to rebuild base + adapter, the data configuration and class names
it was trained with, where its base weights came from), timm's ``config.json`` and a model card.
Nothing is ever unpickled.

* :mod:`.format`: the files, their limits, one bounded reader and every check an (untrusted)
  adapter passes;
* :mod:`.load`: the one loading path every entry point takes (``from_pretrained``,
  ``load_adapter``, timm's ``local-dir:``/``hf-hub:``, the CLI): checked first, on the ``meta``
  device or a twin of the model, then done;
* :mod:`.save_load`: atomic per-adapter saves;
* :mod:`.card`: the model card and ``config.json``;
* :mod:`.hub`: :func:`push_to_hub`.
"""
from .card import make_model_card, timm_config
from .format import (ADAPTER_MARKER, CONFIG_NAME, FORMAT_VERSION, LIMITS, TIMM_CONFIG_NAME,
                     WEIGHTS_NAME, AdapterError, atomic_write, base_fingerprint,
                     read_adapter_config)
from .card import HUB_PREFIX, LOCAL_PREFIX
from .hub import push_to_hub
from .load import (_register_hooks, from_pretrained, load_adapter, read_training_args,
                   resolve_adapter_dir, verify_adapter)
from .save_load import save_pretrained

__all__ = ["save_pretrained", "load_adapter", "from_pretrained", "read_adapter_config",
           "verify_adapter", "base_fingerprint", "atomic_write", "AdapterError", "WEIGHTS_NAME",
           "CONFIG_NAME", "FORMAT_VERSION", "TIMM_CONFIG_NAME", "ADAPTER_MARKER", "LIMITS",
           "push_to_hub", "resolve_adapter_dir", "make_model_card", "timm_config",
           "HUB_PREFIX", "LOCAL_PREFIX", "read_training_args"]

_register_hooks()
