"""Adapter: bottleneck adapters in every block (Houlsby et al., "Parameter-Efficient Transfer
Learning for NLP", ICML 2019), the "Adapter" baseline of VPT (Jia et al., ECCV 2022, Table 1),
SSF, E²VPT and LION.

A bottleneck maps a block's ``d`` channels down to ``d'``, applies a non-linearity, maps back up
and adds the result to its input (SSF paper Eq. 2, with the residual)::

    y ← y + W_up · act(W_down · y + b_down) + b_up,     W_down ∈ R^{d'×d}, W_up ∈ R^{d×d'}

Placement (``AdapterConfig.placement``):

* ``"pfeiffer"`` (default): one adapter on the output of each block's MLP, before the block's
  residual add: the configuration VPT benchmarks (its Adapter baseline follows Pfeiffer et al.,
  refs. [46, 47] of the VPT paper, where one adapter after the feed-forward layer works best).
* ``"houlsby"``: one after the attention and one after the MLP (Houlsby et al.).

The width is ``d' = d // reduction_factor`` (at least 1); VPT tunes the reduction factor per task
over 8, 64 and 256 (its Fig. 6 ablates it; the grid is from the VPT appendix, not in the shipped
text). ``W_up`` and both biases start at zero, so a fresh adapter computes exactly the base
model's function; ``W_down`` starts as a torch Linear does. Non-linearity: ReLU (Pfeiffer's
configuration; ``act`` offers GELU and SiLU).

Parameters on ViT-B/16 (12 blocks, ``d = 768``), head excluded: ``12·(2·d·d' + d' + d)``:
1,779,840 at reduction 8, 230,544 at 64, 64,548 at 256. With a 100-class head, reduction 64 gives
307,444, the SSF paper's 0.31M for Adapter on CIFAR-100 (its Table 5; 1.00M with the 1000-class
head on ImageNet-1K; 0.33M / 1.26M on Swin-B and 0.45M / 1.37M on ConvNeXt-B, where ``d'``
follows each stage's width, all reproduced by ``tests/test_block_methods.py``).

Where: every family whose blocks have a width-preserving MLP
(:meth:`timm_peft.families.Family.block_layers`: ViT, DeiT, EVA, BEiT, CaiT, Swin, Swin-V2,
ConvNeXt, where 1×1-conv MLPs get the bottleneck over the channel axis); Houlsby also needs an
attention in every block (not ConvNeXt). Other models are refused at build time.

Merging: impossible (the non-linearity does not fold into a Linear): :func:`timm_peft.merge`
refuses with the reason, inference keeps the bottlenecks' cost, :func:`timm_peft.unload` returns
the plain model.

Example:
    >>> import timm, timm_peft
    >>> m = timm.create_model("vit_base_patch16_224.adapter", num_classes=100, device="meta")
    >>> timm_peft.get_nb_trainable_parameters(m)[0]
    307444
"""
from ...layers.bottleneck import Bottleneck, SequentialAdapter
from .config import AdapterConfig
from .method import Adapter

__all__ = ["AdapterConfig", "Adapter", "Bottleneck", "SequentialAdapter"]
