"""MLP-k: a k-layer MLP head on a frozen backbone (the "Mlp-k" baseline of Jia et al., "Visual
Prompt Tuning", ECCV 2022, Sec. 4.1: "utilize a multilayer perceptron (MLP) with k layers,
instead of a linear layer, as classification head").

The backbone is frozen; the model's classifier stays the last layer of the head and reads
``MLP(F)`` instead of the pooled features ``F``::

    logits = W_k · σ(W_{k-1} · … σ(W_1 · F + b_1) … + b_{k-1}) + b_k

``k - 1`` hidden layers ``Linear → activation (ReLU) → dropout`` of widths ``d → h → … → h → d``
(``h = d`` by default), so the classifier keeps its shape and its timm state-dict keys.

* ``mlp`` (default ``num_layers=3``) and the preset ``mlp3``: VPT's Mlp-3, two hidden layers of
  the feature width, ``2·(d² + d)`` parameters besides the head: 1,181,184 on ViT-B/16
  (``d = 768``), which is VPT Table 1's "1.35×" total for 24 tasks
  (``(85.8M + 24·(1.18M + head)) / 85.8M``), and 2,099,200 on Swin-B (Table 2's "1.47×").
* Every classifier the model's family names reads the MLP of its width (both heads of distilled
  DeiT, one stack per branch width for CrossViT, VOLO's token head too); a 1×1-conv classifier
  (BiT, DLA) gets it on its channel axis. ``forward_head(pre_logits=True)`` returns ``MLP(F)``,
  what the classifier reads. ``forward_features`` and ``forward_intermediates`` are the frozen
  backbone's.
* The VPT text does not state the activation or normalisation of its MLP: ReLU, no norm, no
  dropout by default (``act``, ``dropout`` are options).

Saved adapters hold the hidden layers (``mlp_head.*``) and the head.

Example:
    >>> import timm, timm_peft
    >>> m = timm.create_model("vit_base_patch16_224.mlp3", num_classes=0, device="meta")
    >>> timm_peft.get_nb_trainable_parameters(m)[0]
    1181184
"""
from .config import MlpConfig
from .method import Mlp, MlpClassifier, MlpForward, MlpHead

__all__ = ["MlpConfig", "Mlp", "MlpHead", "MlpClassifier", "MlpForward"]
