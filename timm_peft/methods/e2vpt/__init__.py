"""E²VPT: Effective and Efficient Visual Prompt Tuning (Han et al., ICCV 2023, arXiv:2307.13770).

E²VPT adds two things to VPT-Deep (:mod:`timm_peft.methods.vpt`, whose machinery it reuses):

* **Key-value prompts** (Sec. 3.2, Eq. 4-5): in every block a tensor ``P_K`` of shape
  (heads, T_kv, head_dim) is concatenated in front of the projected keys and ``P_V`` in front of
  the values; queries are unchanged, so attention is N × (T_kv + N). ``share_kv=True`` (the
  paper's choice) uses one tensor for both. ViT: timm's ``Attention`` becomes
  :class:`KVPromptAttention` (same state-dict keys, same arguments ``attn_mask`` / ``is_causal``,
  masks padded for the prompt keys, always ``F.scaled_dot_product_attention``); prompts are
  concatenated after ``k_norm``. Swin: the prompts join VPT's ``extra_kv`` of every window
  (relative-position bias and shift mask padded with zeros). Init: kaiming-uniform,
  ``U(-b, b)``, ``b = sqrt(6 / (T_kv·head_dim))`` (the authors' "He" init, Table 5b);
  ``kv_init="trunc_normal"`` gives the paper's alternative. ViT-B/16 with 10 visual and 5
  key-value prompts: 12·768·10 + 12·768·5 = 138,240 parameters without the head.
* **Pruning and rewinding** (Sec. 3.3): every layer's visual prompts are multiplied by a token
  mask ρ (T) and a segment mask (T, R) that splits each token into R segments (``num_segments``:
  the paper's 8; the authors' code used 16, strided: ``segment_layout="strided"``). One pass over
  the training data scores every mask entry by ``E|∂L/∂ρ|`` (Eq. 6; the expectation is the mean
  over batches of the batch gradient's magnitude, as in Michel et al. 2019). Per layer the
  ``floor(token_prune_ratio·T)`` lowest tokens are pruned (at least one kept), then in every
  surviving token its ``floor(segment_prune_ratio·R)`` lowest segments (at least one kept): all
  layers of a group keep the same number of tokens and segments, so a pruned adapter is a dense
  tensor. ``importance="signed"`` (the authors' code uses a signed mean) scores by ``-E[∂L/∂ρ]``,
  the first-order estimate of how much the loss rises when the part is removed.
  A caveat we measured: a deep prompt reaches the other tokens only through the block's
  ``norm1``, and LayerNorm is scale-invariant, so ``∂L/∂ρ`` of a whole token is nearly zero (only
  LayerNorm's ε breaks the invariance; about 1000x smaller than segment gradients on a random
  ViT) and token scores carry little signal. The default ``token_importance="segments"``
  scores a token by the sum of its segments' scores instead (not in the paper; pruning the
  lowest-scored tokens by it measurably hurts less than random or highest-scored ones);
  ``"mask"`` keeps the paper's literal score. The authors' code shares ONE token mask and ONE
  segment mask between all layers (``mask_layout="shared"``: same tokens pruned everywhere);
  the default ``"per_layer"`` prunes every layer on its own. Rewinding
  retrains the survivors from their initial values (lottery-ticket rewinding;
  ``rewind="random"`` re-initialises them as the authors' code does) with the masks frozen and
  pruned values held at exactly zero; the key-value prompts and the head continue from their
  trained values. On Swin only the stages in ``swin_prune_stages`` are pruned (the paper prunes
  the first stage only, Sec. 4.2).

A pruned token is *removed from the sequence*, not left as a zero token (a zero token still
attends and is attended through the LayerNorm bias), so the masked model, the saved adapter and
the reloaded model compute the same function and inference runs on fewer tokens. The surviving
segments are recorded in the config (``kept_segments``), which is all :meth:`E2VPT.apply` needs
to build the compact model; the saved tensors hold only surviving segments.

The cycle train → score → prune → rewind is one call, :func:`train_prune_rewind`, and runs from
the training CLI through :meth:`E2VPT.training_hooks` when a prune ratio is set (preset
``e2vpt_prune``: token ratio 0.5, segment ratio 0.25, i.e. 62.5% of the visual prompt values, the
rate of the paper's Table 4 SVHN row).

Example:
    >>> import timm, timm_peft
    >>> m = timm.create_model("vit_base_patch16_224.e2vpt", num_classes=0, device="meta")
    >>> timm_peft.get_nb_trainable_parameters(m)[0]
    138240
"""
from ...layers.kv_attention import KVPrompt, KVPromptAttention, pad_attn_mask
from .config import E2VPTConfig
from .method import E2VPT, add_kv_prompt, remove_kv_prompt
from .prompts import E2VPTPrompts, segment_dims
from .pruning import (compact, compute_importance, prune, rewind, select_segments, select_tokens,
                      train_prune_rewind)

__all__ = ["E2VPTConfig", "E2VPT", "E2VPTPrompts", "KVPrompt", "KVPromptAttention",
           "add_kv_prompt", "remove_kv_prompt", "pad_attn_mask", "compute_importance",
           "prune", "rewind", "compact", "train_prune_rewind", "select_tokens", "select_segments",
           "segment_dims"]
