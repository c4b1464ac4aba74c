"""Sidetune: a side network whose features are blended with the frozen backbone's before the
head (Zhang et al., "Side-Tuning: A Baseline for Network Adaptation via Additive Side Networks",
ECCV 2020; the "Sidetune" baseline of Jia et al., "Visual Prompt Tuning", ECCV 2022, Sec. 4.1:
"train a 'side' network and linear interpolate between pretrained features and side-tuned
features before being fed into the head").

Every classifier of the frozen model reads (Side-Tuning's "alpha blending")::

    z = α·F + (1 - α)·P·S(x)

``F``: the backbone's pooled features (what the classifier read before), ``S``: the side
network on the same image ``x``, ``P``: a bias-free linear projection to ``F``'s width. The side
network, ``P``, ``α`` and the head train; the backbone is frozen.

Choices (documented deviations in *italics*):

* **Side network**: AlexNet's five convolutions (64, 192, 384, 256, 256 channels), average-pooled
  to 6×6 and flattened (9,216 values), projected to the feature width. On ViT-B/16 that is
  2,469,696 + 7,077,888 = 9,547,584 parameters besides the head, which is VPT Table 1's "3.69×"
  total for 24 tasks (``(85.8M + 24·(9.55M + head)) / 85.8M``): the side network VPT benchmarked.
  *It starts from random weights* (VPT and Side-Tuning start it from pretrained weights, which
  this offline library does not download: load them into ``model.sidetune.side`` before
  training to follow them). *Its max pools pad by one*, so 32 px images run too (see
  :class:`SideNetwork`). ``side_channels`` and ``side_pool`` change its size.
* **α**: learned, as ``α = sigmoid(a)`` with ``a = 0`` at start (``α = 0.5``): Side-Tuning's
  alpha blending with a trained α, as VPT's baseline runs it. Side-Tuning also describes a fixed
  curriculum for α; ``learn_alpha=False`` keeps α at the configured ``alpha`` instead (``1``: the
  linear probe; ``0``: the side network alone).
* **Where**: every classifier the model's family names (both heads of distilled DeiT, each
  branch width of CrossViT, VOLO's token head with the side vector on every token); 1×1-conv
  classifiers on their channel axis. ``forward_head(pre_logits=True)`` returns ``z``;
  ``forward_features`` and ``forward_intermediates`` are the frozen backbone's. The head needs
  the image, so it runs inside ``model(x)`` only: ``forward_head(features)`` alone raises a clear
  error.

Example:
    >>> import timm, timm_peft
    >>> m = timm.create_model("vit_base_patch16_224.sidetune", num_classes=0, device="meta")
    >>> timm_peft.get_nb_trainable_parameters(m)[0]  # side network + projection + α
    9547585
"""
from .config import ALEXNET_CHANNELS, SidetuneConfig
from .method import SideNetwork, Sidetune, SidetuneClassifier, SidetuneForward, SideTuning

__all__ = ["SidetuneConfig", "Sidetune", "SideNetwork", "SideTuning", "SidetuneClassifier",
           "SidetuneForward", "ALEXNET_CHANNELS"]
