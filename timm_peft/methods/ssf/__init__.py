"""SSF: Scaling & Shifting your Features (Lian et al., "Scaling & Shifting Your Features: A New
Baseline for Efficient Model Tuning", NeurIPS 2022).

After every *site* (an operation with a linear coefficient) of a frozen backbone, SSF applies a
learnt per-channel affine map (paper Eq. 4)::

    y = γ ⊙ x + β,        γ, β ∈ R^C

and, because the map is linear, folds it into the operation before it for inference (Eq. 5)::

    γ ⊙ (W * t + b) + β = (diag(γ) W) * t + (γ ⊙ b + β)

so a merged model is a plain timm model with no extra parameters or FLOPs.

Sites (``C`` channels each; the channel axis comes from the operation's type, never from the
tensor's shape — see :data:`timm_peft.layers.CHANNEL_AXIS`). By default, on any timm model,
every operation of a listed type outside the classifier: Linear, Conv, affine norms (LayerNorm,
LayerNorm2d, BatchNorm, GroupNorm, and timm's norm + activation layers such as
``BatchNormAct2d``, where the map sits between the norm and its activation). Operations SSF
cannot fold into exactly (a norm without affine parameters, a parametrized weight, an RMS norm,
a weight-standardised conv) are skipped and reported in a warning, never silently. Families
narrow the sites where the paper does:

* ``vit`` (VisionTransformer, DeiT, ...): ``patch_embed.proj`` (and ``patch_embed.norm`` if any),
  ``norm_pre`` if any, every Linear / Conv / norm inside ``blocks`` (for the standard block:
  ``norm1``, ``attn.qkv``, ``attn.q_norm``/``attn.k_norm`` when ``qk_norm``, ``attn.proj``,
  ``norm2``, ``mlp.fc1``, ``mlp.fc2``), the final ``norm``, and ``attn_pool`` (MAP head) when
  present. The classifier ``head`` is not a site. A hybrid ViT's CNN stem
  (``patch_embed.backbone``) is not a site either. ViT-B/16: 205,824 values.
  Average pooling (``global_pool="avg"``): timm makes ``norm`` an Identity and normalises the
  pooled tokens with ``fc_norm``. By default (``SSFConfig.pooled_norm_site="before_pool"``) the
  last map follows that Identity ``norm``, as in the authors' code (the paper's "after every
  operation", the final norm being Identity): the head sees ``fc_norm(γ ⊙ mean(x) + β)``. No
  operation can absorb it exactly (the Identity has no weight, the last block ends in a residual
  sum, a LayerNorm follows the mean), so :func:`timm_peft.merge` refuses such a model by naming
  this site; the model itself computes the authors' function exactly, unmerged.
  ``pooled_norm_site="after_fc_norm"`` puts the map after ``fc_norm`` instead,
  ``γ ⊙ fc_norm(mean(x)) + β`` (a different function: logits differ by ~1 with the same values),
  and merges exactly.
* ``swin``: ``patch_embed.proj``, ``patch_embed.norm``; per block ``norm1``, ``attn.qkv``,
  ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``; the patch-merging ``downsample.norm`` (not
  its bias-free ``reduction``); the final ``norm``.
* ``convnext``: the stem conv and norm; per stage the downsample norm and conv; per block
  ``conv_dw``, ``norm``, ``mlp.fc1``, ``mlp.fc2`` (1x1 convs with ``conv_mlp``); the final norm
  (``head.norm`` or ``norm_pre``). ConvNeXt-V2's GRN and the layer scale ``gamma`` are not sites.
* ``resnet``: every normalisation layer (BatchNorm, GroupNorm) outside the head. Each follows a
  convolution, so one SSF after the pair covers both "after the conv" and "after the BN" sites
  (two per-channel affine maps compose into one) and folds into the norm's affine parameters.

Only modules of the exact types in :data:`CHANNEL_AXIS` are sites: subclasses that may compute
something else (weight-standardised convs) are skipped and reported, and so are RmsNorm-style
norms, which have no bias to absorb β.

How the map is applied while training: after an affine norm it is folded into the norm's
parameters on the fly, ``norm(x; γ ⊙ w, γ ⊙ b + β)`` (the same function, with no extra pass over
the activations); a Linear or a 2-D convolution runs as one matmul or convolution with the map
folded into its weight and bias, saving its output only (:func:`timm_peft.ops.linear_scale_shift`,
:func:`timm_peft.ops.conv_scale_shift`; a frozen convolution of its own would save its input);
after every other site the operation's output goes through ``γ ⊙ y + β`` (torch's batch-norm
kernel). All are class swaps (:mod:`timm_peft.layers.swap`).

Defaults follow the paper (Sec. 4.3, Table 6c): γ ~ N(1, 0.02), β ~ N(0, 0.02); ``init="identity"``
starts from γ = 1, β = 0, where the model computes exactly the base model's function.

Merging (:func:`timm_peft.merge`, :func:`timm_peft.merge_and_unload`) is exact:

* Linear / Conv: ``W' = diag(γ) W``, ``b' = γ ⊙ b + β``. Where the operation has no bias (CLIP's
  patch embedding, ``qkv_bias=False``), the default ``bias_free="add_bias"`` adds one (``b' = β``,
  as in Eq. 5) with a warning, since the merged state dict then has a key the base architecture
  lacks; ``bias_free="scale_only"`` learns only γ there, so every merge keeps the base's keys.
* Norms (LayerNorm, LayerNorm2d, BatchNorm, GroupNorm): ``w' = γ ⊙ w``, ``b' = γ ⊙ b + β``
  through their affine parameters. BatchNorm's affine map comes after its normalisation, so the
  fold is exact whatever statistics it uses. A norm without affine parameters cannot absorb the
  map, so it is not a site (reported when SSF is applied).

``merge`` keeps a copy of every tensor it overwrites, so ``unmerge`` restores the trained SSF
model bit for bit (at the cost of one copy of the folded base tensors while merged);
``merge_and_unload`` drops the copies. While merged the sites run their plain forward, so
inference costs exactly the base model's. A merged model cannot be saved with
``save_pretrained`` (its base weights are no longer the ones the adapter belongs to): unmerge
first.
"""
from ...layers.scale_shift import CHANNEL_AXIS, ScaleShift, scale_shift_attached
from .config import SSFConfig
from .method import SSF, ssf_sites

__all__ = ["SSFConfig", "ScaleShift", "SSF", "CHANNEL_AXIS", "ssf_sites", "scale_shift_attached"]
