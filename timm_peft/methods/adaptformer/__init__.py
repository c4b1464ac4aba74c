"""AdaptFormer: a parallel bottleneck beside every block's MLP (Chen et al., "AdaptFormer:
Adapting Vision Transformers for Scalable Visual Recognition", NeurIPS 2022).

The block's MLP and a bottleneck ("AdaptMLP") read the same normalised tokens and their outputs
are summed, the bottleneck's scaled by ``s`` (paper Eq. 5-6)::

    x̃ = ReLU(LN(x') · W_down) · W_up
    x = MLP(LN(x')) + s · x̃ + x'

with ``W_down ∈ R^{d×d̂}``, ``W_up ∈ R^{d̂×d}``, ``d̂ = 64`` and ``s = 0.1`` (the paper's
defaults, :class:`AdaptFormerConfig`). ``W_down`` is Kaiming-uniform, ``W_up`` and the biases
zero (the paper's LoRA-style init), so a fresh model computes exactly the base function. The
bottleneck reads the MLP's input (the block's ``norm2`` output, the paper's ``LN(x')``); what
follows the MLP in the block (a layer scale, drop-path) applies to the sum. The authors' code
can read ``x'`` without the norm; the paper's equation is what is implemented.

Parameters on ViT-B/16: ``12·(2·d·d̂ + d̂ + d)`` = 1,189,632 at ``d̂ = 64`` (head excluded).

Where: every family whose blocks have a width-preserving MLP (as :mod:`~timm_peft.methods.adapter`).
Not mergeable (the ReLU does not fold): the bottleneck costs ``2·d·d̂`` multiply-adds per token
and block at inference; :func:`timm_peft.unload` drops it.

Example:
    >>> import timm, timm_peft
    >>> m = timm.create_model("vit_base_patch16_224.adaptformer", num_classes=0, device="meta")
    >>> timm_peft.get_nb_trainable_parameters(m)[0]
    1189632
"""
from ...layers.bottleneck import Bottleneck, ParallelAdapter
from .method import AdaptFormer, AdaptFormerConfig

__all__ = ["AdaptFormerConfig", "AdaptFormer", "Bottleneck", "ParallelAdapter"]
