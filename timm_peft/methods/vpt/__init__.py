"""VPT: Visual Prompt Tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv:2203.12119).

A frozen backbone reads ``T`` learnable prompt tokens (the paper's ``p`` prompts ``P``) next to
its own tokens; only the prompts and the head train.

* ``vpt`` (VPT-Deep, the default): a new set of prompts ``P_{i-1}`` enters every block ``L_i``;
  the previous block's prompt outputs are discarded (paper Eq. 3). ``L·T·d`` parameters:
  460,800 for 50 prompts on ViT-B/16.
* ``vpt_shallow`` (VPT-Shallow): prompts enter the first block only and their outputs ``Z_i``
  flow on through the network (paper Eq. 2). ``T·d`` parameters: 38,400 on ViT-B/16.

Per family structure (the family wing answers; see :mod:`timm_peft.families`):

* **ViT** — ``[x, P, E]``: prompts sit right after the prefix tokens (class and register tokens,
  ``num_prefix_tokens``), after the position embedding (they carry none), so ``no_embed_class``,
  ``reg_tokens`` and dynamic image sizes need nothing special. The model stays a
  ``VisionTransformer`` (its class becomes a subclass, :data:`PromptedVisionTransformer`); prompts
  are inserted and overwritten by forward pre-hooks on the blocks, and ``forward_features`` /
  ``forward_intermediates`` drop them again, so the head, every ``global_pool`` (``token``:
  class token; ``avg``/``max``/``avgmax``: image tokens only, as the paper's "Image-pool"; ``map``
  and ``prr``: what they read before), ``features_only`` and intermediates see exactly the base
  layout. timm's ``Attention`` (SDPA) is untouched.
* **Swin** — deep prompts only, one set per block at its stage's width. Within every local window
  the window tokens also attend to the block's prompts (normalised by the block's ``norm1`` and
  projected by its frozen ``qkv``, like any token); the relative-position bias and the shifted-
  window mask are padded with zeros for them, so prompts are visible from every window. The
  prompts' own outputs would be discarded before the next block and before patch merging (the
  paper's reading, Sec. 4.2), so they are never computed: prompts enter as extra keys and values.
  Prompt dropout, if set, draws its mask per window.
  The authors' variant (one prompt set carried through blocks and merging, averaged over
  windows) is not offered, and neither is VPT-Shallow on Swin, whose carried prompt outputs the
  paper leaves undefined across windows.
* **ConvNets** (every family with a pixel input: ResNet, ConvNeXt, and the ConvNets of
  :mod:`timm_peft.families.convnets`) — a learnable pixel border of width ``p`` (``pad_size``)
  around the image: ``forward_features`` and ``forward_intermediates`` see an ``(H+2p)×(W+2p)``
  input, so ``features_only`` maps are those of the padded image (``feature_info``'s channels
  and reductions) (paper Sec. 4.2, "Apply VPT to ConvNets").
  Pixels are stored in the model's normalised input space and initialised as an image drawn from
  uniform(0, 1) and normalised with the model's mean and std (the authors' init).

Defaults follow the paper (and ``shared/notes/methods.md``): uniform(-v, v) init with
``v = sqrt(6 / (3·patch_h·patch_w + d))`` (0.0625 for ViT-B/16), no prompt dropout (the authors
ran with 0.1), no projection. Saved adapters hold the prompts (+ projection) and the head only.

Extension interface (E²VPT and other prompt methods reuse this machinery):

* :class:`VPTConfig` is a dataclass: subclass it to add fields.
* :meth:`VPT.make_prompts` ``(config, num_layers, dim, patch_size) -> VisualPrompts`` is the one
  place that creates a prompt container; it is called once per group of layers of one width
  (ViT: once for all blocks, Swin: once per stage). Override it to return a
  :class:`VisualPrompts` subclass.
* :meth:`VisualPrompts.tokens` ``(layer) -> Tensor[T', d]`` is the one place where a layer's
  prompt tokens are produced (projection included, dropout not); every family reads prompts
  through it. Override it to transform them (e.g. multiply by a token mask ``(T,)`` and a segment
  mask ``(T, R)``). ``T'`` may be smaller than the configured ``num_prompts`` (a pruned export);
  :attr:`VisualPrompts.num_tokens` must then return ``T'``, and all layers must agree on it.
* Every insertion is a class swap (:func:`timm_peft.layers.swap_class`; blocks become
  :class:`~timm_peft.layers.PromptedBlock`, the model :class:`~timm_peft.layers.PromptedViT` or
  :class:`~timm_peft.layers.PixelPromptedModel`, Swin's window attention
  :class:`~timm_peft.layers.ExtraKVWindowAttention`), undone by :meth:`VPT.unload`; state-dict
  keys and ``isinstance`` never change, and the model pickles.
* Swin windows take extra keys and values from several sources (visual prompts, key-value
  prompts) that compose, see :class:`~timm_peft.layers.ExtraKVWindowAttention`.
* The prompt module(s) live at ``model.vpt`` (a :class:`VisualPrompts`, a ``ModuleList`` of one
  per Swin stage, or :class:`PixelPrompts`).

Example:
    >>> import timm, timm_peft
    >>> m = timm.create_model("vit_base_patch16_224.vpt", num_classes=0, device="meta")
    >>> timm_peft.get_nb_trainable_parameters(m)[0]
    460800
"""
from ...layers.kv_attention import ExtraKVWindowAttention, add_extra_kv
from ...layers.prompts import (PixelPromptedModel, PixelPrompts, PromptedBlock, PromptedViT,
                               VisualPrompts, prompt_init_bound)
from ...layers.swap import restore_classes, swap_class
from .config import VPTConfig
from .method import VPT

__all__ = ["VPTConfig", "VPT", "VisualPrompts", "PixelPrompts", "ExtraKVWindowAttention",
           "PromptedViT", "PromptedBlock", "PixelPromptedModel", "add_extra_kv", "swap_class",
           "restore_classes", "prompt_init_bound"]
