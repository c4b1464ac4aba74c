"""Small reusable layers that PEFT methods insert, and the one mechanism that inserts them.

* :mod:`.swap`: :func:`swap_class` / :func:`restore_class`, the picklable way every method gives a
  module new behaviour (and takes it back on unload).
* :mod:`.prompts`: prompt tokens, prompted blocks and models, pixel borders (VPT, E²VPT).
* :mod:`.kv_attention`: key-value prompts and attention with extra keys and values (E²VPT, VPT on
  windowed attention).
* :mod:`.scale_shift`: SSF's scale-shift and the operation types it follows.

The deep-equilibrium solver LION uses is :mod:`timm_peft.deq`.
"""
from .kv_attention import (ExtraKVWindowAttention, KVPrompt, KVPromptAttention, add_extra_kv,
                           pad_attn_mask)
from .prompts import (PixelPromptedModel, PixelPrompts, PromptedBlock, PromptedViT, PromptsAsPrefix,
                      VisualPrompts, prompt_init_bound)
from .scale_shift import CHANNEL_AXIS, ScaleShift
from .swap import (AdapterModule, Swappable, is_swapped, mixins_of, original_class, restore_class,
                   restore_classes, swap_class)

__all__ = ["AdapterModule", "Swappable", "swap_class", "restore_class", "restore_classes",
           "original_class", "is_swapped", "mixins_of", "VisualPrompts", "PixelPrompts",
           "PromptedBlock", "PromptedViT", "PromptsAsPrefix", "PixelPromptedModel", "prompt_init_bound", "KVPrompt",
           "KVPromptAttention", "ExtraKVWindowAttention", "add_extra_kv", "pad_attn_mask",
           "ScaleShift", "CHANNEL_AXIS"]
