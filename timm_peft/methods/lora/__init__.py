"""LoRA: low-rank adaptation (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
ICLR 2022), the LoRA row of the SSF and NOAH comparisons on ViT-B/16 (``qkv``, r = 8).

Each targeted layer ``y = W x + b`` (frozen) gains a trained rank-``r`` update (paper Eq. 3)::

    y = W x + b + s · B A x,     A ∈ R^{r×in}, B ∈ R^{out×r},  s = lora_alpha / r

``B`` starts at zero, so a fresh model is the base model; ``A`` is Kaiming-uniform (peft's
default). Config names follow peft's ``LoraConfig`` (``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules``, ``use_rslora``, ``init_lora_weights``); targets are picked by name or dotted
name suffix among the model's Linear and 1×1 conv layers outside the classifier
(:meth:`timm_peft.families.Family.linear_layers`, :func:`lora_targets`), default ``("qkv",)``.

HF peft is the reference: on the same timm model and the same ``A``, ``B``, the output equals
peft's ``get_peft_model(model, LoraConfig(target_modules=["qkv"]))`` to float32 tolerance
(``tests/test_block_methods.py``). peft's layer is not used because it wraps the base layer
(``qkv.base_layer.weight``), changing the base's state-dict keys; here the layer keeps its class
(a :func:`~timm_peft.layers.swap_class` subclass) and keys, the factors live in its ``lora``
child (``blocks.0.attn.qkv.lora.A`` / ``.B``). The up-projection is fused with the add
(``addmm``) and ``s`` is folded into ``B``, so a training step is not slower than peft's.

Attention layers that read ``qkv.weight`` with ``F.linear`` instead of calling ``qkv`` (timm's
EVA, BEiT and Swin-V2 with separate q/v biases) are switched to timm's own
``qkv_bias_separate`` path (call ``qkv``, then add the biases: the same function) so the update
runs; a layer that is read but cannot be called is refused with the reason.

Parameters on ViT-B/16 with the defaults: ``12 · r · (768 + 2304)`` = 294,912 (0.29M), head
excluded.

Merging (:func:`timm_peft.merge`, :func:`timm_peft.merge_and_unload`) folds ``s·B·A`` into ``W``
(computed in float32); ``merge`` keeps a copy of each base weight so :func:`timm_peft.unmerge`
restores the trained model bit for bit. The merged plain model has exactly the base
architecture's state-dict keys.

Example:
    >>> import timm, timm_peft
    >>> m = timm.create_model("vit_base_patch16_224.lora", num_classes=0, device="meta")
    >>> timm_peft.get_nb_trainable_parameters(m)[0]
    294912
"""
from .config import LoraConfig
from .layers import LoraLayer, LoraWeights
from .method import Lora, lora_targets

__all__ = ["LoraConfig", "Lora", "LoraLayer", "LoraWeights", "lora_targets"]
