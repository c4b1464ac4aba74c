"""SSF: Scaling & Shifting your Features (Lian et al., "Scaling & Shifting Your Features: A New
Baseline for Efficient Model Tuning", NeurIPS 2022).

After every *site* (an operation with a linear coefficient) of a frozen backbone, SSF applies a
learnt per-channel affine map (paper Eq. 4)::

    y = γ ⊙ x + β,        γ, β ∈ R^C

and, because the map is linear, folds it into the operation before it for inference (Eq. 5)::

    γ ⊙ (W * t + b) + β = (diag(γ) W) * t + (γ ⊙ b + β)

so a merged model is a plain timm model with no extra parameters or FLOPs.

Sites, per model family (``C`` channels each; the channel axis comes from the operation's type,
never from the tensor's shape — see :data:`CHANNEL_AXIS`):

* ``vit`` (VisionTransformer, DeiT, ...): ``patch_embed.proj`` (and ``patch_embed.norm`` if any),
  ``norm_pre`` if any, every Linear / Conv / norm inside ``blocks`` (for the standard block:
  ``norm1``, ``attn.qkv``, ``attn.q_norm``/``attn.k_norm`` when ``qk_norm``, ``attn.proj``,
  ``norm2``, ``mlp.fc1``, ``mlp.fc2``), the final ``norm`` or ``fc_norm``, and ``attn_pool`` (MAP
  head) when present. The classifier ``head`` is not a site. A hybrid ViT's CNN stem
  (``patch_embed.backbone``) is not a site either. ViT-B/16: 205,824 values.
* ``swin``: ``patch_embed.proj``, ``patch_embed.norm``; per block ``norm1``, ``attn.qkv``,
  ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``; the patch-merging ``downsample.norm`` (not
  its bias-free ``reduction``); the final ``norm``.
* ``convnext``: the stem conv and norm; per stage the downsample norm and conv; per block
  ``conv_dw``, ``norm``, ``mlp.fc1``, ``mlp.fc2`` (1x1 convs with ``conv_mlp``); the final norm
  (``head.norm`` or ``norm_pre``). ConvNeXt-V2's GRN and the layer scale ``gamma`` are not sites.
* ``resnet``: every normalisation layer (BatchNorm, GroupNorm) outside the head. Each follows a
  convolution, so one SSF after the pair covers both "after the conv" and "after the BN" sites
  (two per-channel affine maps compose into one) and folds into the norm's affine parameters.

Only modules of the exact types in :data:`CHANNEL_AXIS` are sites: subclasses that compute
something else (weight-standardised convs, norms fused with an activation) are skipped, and so are
RmsNorm-style norms, which have no bias to absorb β.

How the map is applied while training: after an affine norm it is folded into the norm's
parameters on the fly, ``norm(x; γ ⊙ w, γ ⊙ b + β)`` (the same function, with no extra pass over
the activations); after every other site a forward hook computes ``γ ⊙ y + β`` with torch's
batch-norm kernel.

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
  map: merging such a model raises and names the sites, before anything is changed.

``merge`` keeps a copy of every tensor it overwrites, so ``unmerge`` restores the trained SSF
model bit for bit (at the cost of one copy of the folded base tensors while merged);
``merge_and_unload`` drops the copies. While merged the sites run their plain forward, so
inference costs exactly the base model's. A merged model cannot be saved with
``save_pretrained`` (its base weights are no longer the ones the adapter belongs to): unmerge
first.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import norm as timm_norm
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.linear import Linear as TimmLinear
from torch import nn
from torch.nn.utils import parametrize

from ..core import (AdapterModule, PeftConfig, PeftMethod, cfg_field, get_model_family,
                    register_method)

__all__ = ["SSFConfig", "ScaleShift", "SSF", "CHANNEL_AXIS", "ssf_sites"]


@dataclass
class SSFConfig(PeftConfig):
    """Config of ``ssf``: how the scales γ and shifts β start, and what happens at bias-free ops.

    Example:
        >>> SSFConfig(init="identity").init
        'identity'
    """

    init: str = cfg_field("normal", choices=("normal", "identity"),
                          help="'normal': γ ~ N(1, init_std), β ~ N(0, init_std) (paper); "
                               "'identity': γ = 1, β = 0 (output equals the base model's)")
    init_std: float = cfg_field(0.02, ge=0.0, help="standard deviation of the 'normal' init")
    bias_free: str = cfg_field(
        "add_bias", choices=("add_bias", "scale_only"),
        help="after an operation without a bias (CLIP's patch embedding, qkv_bias=False): "
             "'add_bias' learns γ and β and merging adds a bias there (paper Eq. 5; the merged "
             "state dict gains that key); 'scale_only' learns only γ there, so the merged model "
             "has exactly the base architecture's keys")


#: Channel axis of each site type's output: -1 for channels-last outputs (Linear, LayerNorm over
#: the last dim), 1 for channels-first ones (Conv, BatchNorm, GroupNorm, timm's LayerNorm2d,
#: which subclasses nn.LayerNorm but normalises dim 1). Exact types only: a subclass may compute
#: something else, so it is not a site until listed here.
CHANNEL_AXIS: dict[type[nn.Module], int] = {
    nn.Linear: -1, TimmLinear: -1,
    nn.LayerNorm: -1, timm_norm.LayerNorm: -1, timm_norm.LayerNormFp32: -1,
    nn.Conv1d: 1, nn.Conv2d: 1, nn.Conv3d: 1, Conv2dSame: 1, Conv2dSameExport: 1,
    timm_norm.LayerNorm2d: 1, timm_norm.LayerNorm2dFp32: 1,
    nn.BatchNorm1d: 1, nn.BatchNorm2d: 1, nn.BatchNorm3d: 1,
    nn.GroupNorm: 1, timm_norm.GroupNorm: 1, timm_norm.GroupNorm1: 1,
}

_NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def _num_channels(op: nn.Module) -> int:
    if isinstance(op, nn.Linear):
        return op.out_features
    if isinstance(op, nn.modules.conv._ConvNd):
        return op.out_channels
    if isinstance(op, nn.LayerNorm):
        if len(op.normalized_shape) != 1:
            raise ValueError(f"SSF needs a LayerNorm over one dim, got normalized_shape "
                             f"{tuple(op.normalized_shape)}")
        return op.normalized_shape[0]
    if isinstance(op, nn.GroupNorm):
        return op.num_channels
    return op.num_features  # BatchNorm


class ScaleShift(AdapterModule):
    """SSF-ADA (paper Fig. 2c, Eq. 4): ``y = γ ⊙ x + β`` along channel axis ``dim``.

    ``scale`` is γ and ``shift`` is β (None with ``shift=False``: ``y = γ ⊙ x``). While the
    owning operation is merged, ``merged`` is True and the non-persistent buffers ``base_weight``
    / ``base_bias`` hold the operation's tensors from before the merge.

    Example:
        >>> ss = ScaleShift(3, dim=1)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.equal(ss(x), x)  # γ = 1, β = 0 until initialised
        True
    """

    def __init__(self, num_channels: int, dim: int, shift: bool = True, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        if dim not in (1, -1):
            raise ValueError(f"ScaleShift.dim must be 1 (channels first) or -1 (channels last), "
                             f"got {dim}")
        self.dim = dim
        self.scale = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
        self.shift = (nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
                      if shift else None)
        self.merged = False
        self.added_bias = False

    def reset_parameters(self, init: str = "normal", std: float = 0.02) -> None:
        """γ ~ N(1, std), β ~ N(0, std) for ``"normal"``; γ = 1, β = 0 for ``"identity"``."""
        with torch.no_grad():
            if init == "normal":
                nn.init.normal_(self.scale, mean=1.0, std=std)
                if self.shift is not None:
                    nn.init.normal_(self.shift, mean=0.0, std=std)
            else:
                self.scale.fill_(1.0)
                if self.shift is not None:
                    self.shift.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # γ ⊙ x + β is an inference-mode batch norm with mean 0, variance 1 and eps 0 (so its
        # 1/sqrt(var + eps) is exactly 1). torch's fused batch-norm kernels produce the output,
        # and in backward all three gradients, in fewer passes over the activations than
        # mul/add do: about 40% less SSF time per training step on CPU.
        mean, var = torch.zeros_like(self.scale), torch.ones_like(self.scale)
        if self.dim == 1 and x.is_contiguous():
            return F.batch_norm(x, mean, var, self.scale, self.shift, False, 0.0, 0.0)
        # Otherwise as rows of channels: a view for channels-last memory (Linear, LayerNorm,
        # LayerNorm2d's output, channels_last convs). torch's 4-D channels-last batch-norm
        # backward is not used: it returns wrong gradients for some strides of size-1 dims.
        rows = x.movedim(self.dim, -1)
        y = F.batch_norm(rows.reshape(-1, rows.shape[-1]), mean, var, self.scale, self.shift,
                         False, 0.0, 0.0)
        return y.reshape(rows.shape).movedim(-1, self.dim)

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(γ ⊙ w, γ ⊙ b + β)``: the map folded into per-channel affine parameters (Eq. 5).

        Differentiable in γ and β; ``b`` may be None (then ``β``, or None without a shift).

        Example:
            >>> ss = ScaleShift(2, dim=1); ss.reset_parameters("identity")
            >>> [t.tolist() for t in ss.fold(torch.tensor([2., 3.]), None)]
            [[2.0, 3.0], [0.0, 0.0]]
        """
        if bias is None:
            return weight * self.scale, self.shift
        if self.shift is None:
            return weight * self.scale, bias * self.scale
        return weight * self.scale, torch.addcmul(self.shift, bias, self.scale)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, dim={self.dim}" + (", merged" if self.merged else "")


def _ssf_hook(op: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return op.ssf(output)


class _FoldedView:
    """A norm as its own ``forward`` sees it, with other ``weight`` and ``bias`` tensors."""

    __slots__ = ("_op", "weight", "bias")

    def __init__(self, op: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._op, self.weight, self.bias = op, weight, bias

    def __getattr__(self, name: str) -> Any:
        if name == "_op":  # not set yet (e.g. while torch.compile builds the object)
            raise AttributeError(name)
        return getattr(self._op, name)


class _FusedNormForward:
    """``forward`` of an affine norm site: the norm's own code with ``γ ⊙ w`` and ``γ ⊙ b + β``.

    ``γ ⊙ norm(x; w, b) + β = norm(x; γ ⊙ w, γ ⊙ b + β)``, so SSF after a norm costs no pass over
    the activations and keeps no extra one for backward (measured on a CPU: a ResNet-50 step,
    whose sites are all norms, went from 0.80 to 0.61 of full fine-tuning and its memory from
    1.30 to 0.88; on a ViT, two sites in six, mostly memory). It runs the norm class's own
    ``forward`` (BatchNorm's statistics, timm's fast-norm paths included) on a view of the module
    whose ``weight`` and ``bias`` are the folded tensors. A small class rather than a bound
    function, so the model still deep-copies and pickles.
    """

    def __init__(self, op: nn.Module) -> None:
        self.op = op

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        op = self.op
        weight, bias = op.ssf.fold(op.weight, op.bias)
        return type(op).forward(_FoldedView(op, weight, bias), *args, **kwargs)


def _wire(op: nn.Module) -> None:
    """Route ``op``'s output through its ``ssf``: folded into an affine norm, else a hook."""
    if isinstance(op, _NORMS) and getattr(op, "weight", None) is not None:
        op.forward = _FusedNormForward(op)
    else:
        op.register_forward_hook(_ssf_hook)


def _unwire(op: nn.Module) -> None:
    # Found by type and identity rather than through a stored handle, so it survives deepcopy
    # and pickling.
    if isinstance(op.__dict__.get("forward"), _FusedNormForward):
        del op.forward
    for key in [k for k, fn in op._forward_hooks.items() if fn is _ssf_hook]:
        del op._forward_hooks[key]


def _wired(op: nn.Module) -> bool:
    """Whether ``op``'s output currently goes through its SSF."""
    return (isinstance(op.__dict__.get("forward"), _FusedNormForward)
            or any(fn is _ssf_hook for fn in op._forward_hooks.values()))


# ----------------------------------------------------------------------------------------------
# Sites
# ----------------------------------------------------------------------------------------------

def _scan(model: nn.Module, roots: tuple[str, ...], keep: Callable[[str, nn.Module], bool]
          = lambda name, op: True) -> Iterator[tuple[str, nn.Module]]:
    for root in roots:
        try:
            mod = model.get_submodule(root)
        except AttributeError:
            continue
        for name, op in mod.named_modules(prefix=root):
            if type(op) in CHANNEL_AXIS and keep(name, op):
                yield name, op


def _vit_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return _scan(model, ("patch_embed", "norm_pre", "blocks", "norm", "fc_norm", "attn_pool"),
                 keep=lambda name, op: not name.startswith("patch_embed.backbone"))


def _swin_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return _scan(model, ("patch_embed", "layers", "norm"),
                 keep=lambda name, op: not name.endswith("downsample.reduction"))


def _convnext_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return _scan(model, ("stem", "stages", "norm_pre", "head.norm"))


def _resnet_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return _scan(model, ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
                 keep=lambda name, op: isinstance(op, _NORMS))


_SITES: dict[str, Callable[[nn.Module], Iterator[tuple[str, nn.Module]]]] = {
    "vit": _vit_sites, "swin": _swin_sites, "convnext": _convnext_sites, "resnet": _resnet_sites,
}


def ssf_sites(model: nn.Module) -> list[str]:
    """Names of the operations SSF follows in ``model`` (a plain timm model), in forward order.

    Example:
        >>> import timm
        >>> ssf_sites(timm.create_model("vit_tiny_patch16_224", depth=1))[:4]
        ['patch_embed.proj', 'blocks.0.norm1', 'blocks.0.attn.qkv', 'blocks.0.attn.proj']
    """
    family = get_model_family(model)
    if family not in _SITES:
        raise ValueError(f"SSF supports model families {sorted(_SITES)}; "
                         f"{type(model).__name__} is not one of them")
    return [name for name, _ in _SITES[family](model)]


def _factory_kwargs(op: nn.Module) -> dict[str, Any]:
    """Device and float dtype of the operation's own tensors (a non-affine norm may have none)."""
    ref = next(itertools.chain(op.parameters(recurse=False), op.buffers(recurse=False)), None)
    if ref is None:
        return {}
    return dict(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)


def _attached(model: nn.Module) -> Iterator[tuple[str, nn.Module, ScaleShift]]:
    for name, op in model.named_modules():
        ss = op._modules.get("ssf")
        if isinstance(ss, ScaleShift):
            yield name, op, ss


# ----------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------

def _unfoldable(op: nn.Module) -> str | None:
    """Why SSF after ``op`` cannot be folded into it exactly, or None."""
    if parametrize.is_parametrized(op):
        return "its weight is parametrized (computed on the fly), so it cannot be overwritten"
    if getattr(op, "weight", None) is None:
        return "it has no affine weight to absorb the scale (a norm built without affine params)"
    return None


def _fold(op: nn.Module, ss: ScaleShift) -> None:
    weight, bias = op.weight, op.bias
    ss.register_buffer("base_weight", weight.detach().clone(), persistent=False)
    ss.register_buffer("base_bias", None if bias is None else bias.detach().clone(),
                       persistent=False)
    acc = torch.promote_types(weight.dtype, torch.float32)
    gamma = ss.scale.detach().to(acc)
    beta = None if ss.shift is None else ss.shift.detach().to(acc)
    with torch.no_grad():
        # the channel is axis 0 of every site's weight: Linear (out, in), Conv (out, in/g, k...),
        # norms (C,)
        weight.copy_(weight.to(acc) * gamma.view((-1,) + (1,) * (weight.ndim - 1)))
        if bias is None and beta is not None:
            op.bias = nn.Parameter(beta.to(weight.dtype), requires_grad=False)
            ss.added_bias = True
        elif bias is not None:
            bias.copy_(bias.to(acc) * gamma if beta is None
                       else torch.addcmul(beta, bias.to(acc), gamma))
    ss.merged = True


def _unfold(op: nn.Module, ss: ScaleShift) -> None:
    with torch.no_grad():
        op.weight.copy_(ss.base_weight)
        if ss.added_bias:
            op.bias = None
        elif op.bias is not None:
            op.bias.copy_(ss.base_bias)
    del ss.base_weight, ss.base_bias
    ss.merged = ss.added_bias = False


def _check_not_merged(model: nn.Module, action: str) -> None:
    merged = [name for name, _, ss in _attached(model) if ss.merged]
    if merged:
        raise ValueError(f"cannot {action} a merged SSF model: its base weights hold the folded "
                         f"scales and shifts ({len(merged)} sites, e.g. {merged[0]!r}); call "
                         "timm_peft.unmerge(model) first")


# ----------------------------------------------------------------------------------------------
# Method
# ----------------------------------------------------------------------------------------------

@register_method
class SSF(PeftMethod):
    """SSF: a learnt per-channel scale γ and shift β after every site of the frozen backbone.

    See the module docstring for the sites per family, the init and the exact merge.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("vit_base_patch16_224.ssf", num_classes=100)
        >>> timm_peft.get_nb_trainable_parameters(m)[0]
        282724
        >>> plain = timm_peft.merge_and_unload(m)  # a plain timm ViT-B/16 with SSF folded in
    """

    name = "ssf"
    config_cls = SSFConfig
    families = ("vit", "swin", "convnext", "resnet")
    description = "SSF: per-channel scale and shift after every operation, mergeable"

    def apply(self, model: nn.Module, config: SSFConfig) -> nn.Module:
        for name, op in _SITES[get_model_family(model)](model):
            if hasattr(op, "ssf"):
                raise ValueError(f"{name} already has an attribute 'ssf'; SSF cannot be applied")
            # a non-affine norm keeps β: it is not mergeable either way (see merge)
            shift = not (config.bias_free == "scale_only" and op.bias is None
                         and getattr(op, "weight", None) is not None)
            ss = ScaleShift(_num_channels(op), CHANNEL_AXIS[type(op)], shift=shift,
                            **_factory_kwargs(op))
            ss.reset_parameters(config.init, config.init_std)
            op.ssf = ss
            _wire(op)
        return model

    def merge(self, model: nn.Module) -> None:
        """Fold every γ, β into its operation (Eq. 5); a no-op on an already merged model.

        Raises ``ValueError`` naming every site that cannot be folded exactly, before any change.
        """
        todo = [(name, op, ss) for name, op, ss in _attached(model) if not ss.merged]
        problems = [f"{name} ({type(op).__name__}): {why}" for name, op, _ in todo
                    if (why := _unfoldable(op)) is not None]
        if problems:
            raise ValueError("SSF cannot be merged exactly into these operations: "
                             + "; ".join(problems) + ". Keep the model unmerged (it computes "
                             "the same function) or build the base with affine norms")
        added = [f"{name}.bias" for name, op, ss in todo
                 if op.bias is None and ss.shift is not None]
        for _, op, ss in todo:
            _unwire(op)
            _fold(op, ss)
        if added:
            warnings.warn(f"SSF merge added a bias to {len(added)} bias-free operation(s) "
                          f"({', '.join(added[:4])}{', ...' if len(added) > 4 else ''}): the "
                          "merged state dict has these keys on top of the base architecture's "
                          "(SSFConfig(bias_free='scale_only') avoids them)", stacklevel=3)

    def unmerge(self, model: nn.Module) -> None:
        """Restore the base tensors saved by :meth:`merge` and the SSF wiring (bit-exact)."""
        for _, op, ss in _attached(model):
            if ss.merged:
                _unfold(op, ss)
                _wire(op)

    def unload(self, model: nn.Module) -> nn.Module:
        """Remove the SSF wiring and ``ssf`` children; the operations keep their current weights."""
        for _, op, _ in list(_attached(model)):
            _unwire(op)
            del op.ssf
        return model

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        _check_not_merged(model, "save the adapter of")
        return super().adapter_state_dict(model)

    def prepare_load(self, model: nn.Module, config: PeftConfig) -> None:
        _check_not_merged(model, "load an adapter into")
