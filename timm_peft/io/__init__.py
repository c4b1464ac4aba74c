"""Adapter I/O: one generic save / load / share path that never knows which method it carries.

An adapter directory holds ``adapter_model.safetensors`` (only the task-specific tensors: the
method's parameters and buffers plus the head, never a frozen base tensor),
``adapter_config.json`` (how to rebuild base + adapter, the data configuration and class names
it was trained with, where its base weights came from), timm's ``config.json`` and a model card.
Nothing is ever unpickled.

* :mod:`.format`: the files, their limits and every check an (untrusted) adapter passes;
* :mod:`.save_load`: atomic per-adapter saves, loading checked on the ``meta`` device first;
* :mod:`.card`: the model card and ``config.json``;
* :mod:`.hub`: ``hf-hub:`` names, :func:`push_to_hub` and the ``timm.create_model`` hook.
"""
from .card import make_model_card, timm_config
from .format import (ADAPTER_MARKER, CONFIG_NAME, FORMAT_VERSION, LIMITS, TIMM_CONFIG_NAME,
                     WEIGHTS_NAME, AdapterError, atomic_write, base_fingerprint,
                     read_adapter_config)
from .hub import HUB_PREFIX, LOCAL_PREFIX, _register_build_hook, push_to_hub, resolve_adapter_dir
from .save_load import from_pretrained, load_adapter, save_pretrained, verify_adapter

__all__ = ["save_pretrained", "load_adapter", "from_pretrained", "read_adapter_config",
           "verify_adapter", "base_fingerprint", "atomic_write", "AdapterError", "WEIGHTS_NAME",
           "CONFIG_NAME", "FORMAT_VERSION", "TIMM_CONFIG_NAME", "ADAPTER_MARKER", "LIMITS",
           "push_to_hub", "resolve_adapter_dir", "make_model_card", "timm_config",
           "HUB_PREFIX", "LOCAL_PREFIX"]

_register_build_hook()
