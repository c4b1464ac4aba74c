"""Scale-shift: SSF's per-channel affine map ``y = γ ⊙ x + β`` and the operations it can follow.

Lian et al., "Scaling & Shifting Your Features", NeurIPS 2022, Eq. 4-5. The map is defined per
operation, so where it goes is decided by module *type* (:data:`CHANNEL_AXIS`), never by a
family's name; :func:`scan` finds the operations of a model and says, for every operation it
must skip, why.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import norm as timm_norm
from timm.layers import norm_act as timm_norm_act
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.linear import Linear as TimmLinear
from torch import nn
from torch.nn.utils import parametrize

from ..ops import (conv_scale_shift, fold_bias, layer_scaled, linear_scale_shift,
                   scale_shift)
from .swap import (AdapterModule, Swappable, is_swapped, mixins_of, original_class, restore_class,
                   swap_class)

__all__ = ["ScaleShift", "CHANNEL_AXIS", "NORMS", "scan", "num_channels", "unfoldable",
           "ScaleShiftOutput", "ScaleShiftLinear", "ScaleShiftConv", "ScaleShiftNorm",
           "attach_scale_shift",
           "detach_scale_shift", "scale_shift_attached", "takes_residual", "residual_into",
           "scale_shift_deferred",
           "ResidualBranch", "ResidualIntoBranch"]

#: Channel axis of each site type's output: -1 for channels-last outputs (Linear, LayerNorm over
#: the last dim), 1 for channels-first ones (Conv, BatchNorm, GroupNorm, timm's LayerNorm2d,
#: which subclasses nn.LayerNorm but normalises dim 1). Exact types only: a subclass may compute
#: something else (a weight-standardised conv), so it is reported and skipped until listed here.
#: timm's norm + activation layers are sites too: the map goes between the norm and its
#: activation, i.e. it folds into the norm's affine parameters.
CHANNEL_AXIS: dict[type[nn.Module], int] = {
    nn.Linear: -1, TimmLinear: -1,
    nn.LayerNorm: -1, timm_norm.LayerNorm: -1, timm_norm.LayerNormFp32: -1,
    nn.Conv1d: 1, nn.Conv2d: 1, nn.Conv3d: 1, Conv2dSame: 1, Conv2dSameExport: 1,
    timm_norm.LayerNorm2d: 1, timm_norm.LayerNorm2dFp32: 1,
    nn.BatchNorm1d: 1, nn.BatchNorm2d: 1, nn.BatchNorm3d: 1,
    nn.GroupNorm: 1, timm_norm.GroupNorm: 1, timm_norm.GroupNorm1: 1,
    timm_norm_act.BatchNormAct2d: 1, timm_norm_act.GroupNormAct: 1,
    timm_norm_act.GroupNorm1Act: 1, timm_norm_act.LayerNormAct: -1,
    timm_norm_act.LayerNormAct2d: 1,
}

NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
#: what an operation must be for :func:`scan` to report it when it is not a site
_OPS = (nn.Linear, nn.modules.conv._ConvNd, nn.LayerNorm, nn.modules.batchnorm._BatchNorm,
        nn.GroupNorm, timm_norm.RmsNorm, timm_norm.RmsNorm2d, timm_norm_act.RmsNormAct,
        timm_norm_act.FrozenBatchNorm2d)


def num_channels(op: nn.Module) -> int:
    """Channels of the operation's output (the length of γ and β)."""
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


def unfoldable(op: nn.Module) -> str | None:
    """Why SSF after ``op`` cannot be folded into it exactly, or None."""
    if parametrize.is_parametrized(op):
        return "its weight is parametrized (computed on the fly), so it cannot be overwritten"
    if getattr(op, "weight", None) is None:
        return "it has no affine weight to absorb the scale (a norm built without affine params)"
    return None


def _skip_reason(op: nn.Module) -> str | None:
    """Why ``op`` (an operation-like module of a type SSF does not list) is skipped."""
    cls = original_class(op)
    if cls in CHANNEL_AXIS or not isinstance(op, _OPS):
        return None
    if isinstance(op, (timm_norm.RmsNorm, timm_norm.RmsNorm2d, timm_norm_act.RmsNormAct)):
        return "an RMS norm has no bias to absorb the shift"
    if isinstance(op, timm_norm_act.FrozenBatchNorm2d):
        return "a frozen batch norm keeps its affine parameters as buffers"
    return (f"{cls.__name__} subclasses {cls.__mro__[1].__name__} but may compute something "
            "else (e.g. weight standardisation), so folding into it is not known to be exact")


def scan(model: nn.Module, roots: tuple[str, ...],
         keep: Callable[[str, nn.Module], bool] = lambda name, op: True,
         skip_unfoldable: bool = False, exclude: tuple[nn.Module, ...] = ()) -> Iterator[Any]:
    """:class:`~timm_peft.families.SsfSite` for every operation under ``roots`` (forward order).

    Operations of a :data:`CHANNEL_AXIS` type are sites; operation-like modules of other types
    are yielded with the reason they are skipped, and so are operations whose fold would not be
    exact when ``skip_unfoldable``. Modules inside ``exclude`` (the classifier) are not scanned,
    nor those another method inserted (inside an :class:`AdapterModule`: not the base's).
    """
    from ..families.base import SsfSite
    excluded = {id(m) for e in exclude for m in e.modules()}
    excluded |= {id(m) for a in model.modules() if isinstance(a, AdapterModule) for m in a.modules()}
    for root in roots:
        try:
            mod = model.get_submodule(root)
        except AttributeError:
            continue
        for name, op in mod.named_modules(prefix=root):
            if id(op) in excluded or not keep(name, op):
                continue
            if original_class(op) in CHANNEL_AXIS:
                why = unfoldable(op) if skip_unfoldable else None
                yield SsfSite(name, op, why)
            elif (why := _skip_reason(op)) is not None:
                yield SsfSite(name, op, why)


def _drop_kwargs(drop_path: nn.Module | None) -> dict[str, Any]:
    """timm's ``DropPath`` module as the fused ops take it."""
    return {} if drop_path is None else dict(drop_prob=drop_path.drop_prob,
                                             scale_by_keep=drop_path.scale_by_keep)


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

    @contextlib.contextmanager
    def vmap_context(self) -> Iterator[None]:
        """Plain ``γ ⊙ x + β`` inside the block, for per-sample routing (:func:`timm_peft.route`):
        with per-sample γ and β, ``vmap`` turns it into one broadcast multiply-add, while the
        batch-norm kernel below would be split and transposed."""
        self._plain = True
        try:
            yield
        finally:
            self.__dict__.pop("_plain", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.__dict__.get("_plain"):
            shape = [-1 if d == self.dim % x.ndim else 1 for d in range(x.ndim)]
            if self.shift is None:
                return x * self.scale.view(shape)
            return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))
        if x.ndim >= 2 and torch.is_grad_enabled() and (
                x.requires_grad or self.scale.requires_grad
                or (self.shift is not None and self.shift.requires_grad)):
            # In training, save the output instead of the input (issue 16): the output is what
            # the next operation saves anyway, so a site after a frozen Linear/Conv keeps no
            # extra activation alive (γ's magnitude is floored at ops.DEFAULT_MIN_SCALE). Whatever
            # writes the output in place later makes it keep a copy first (ops.SavedOutput).
            return scale_shift(x, self.scale, self.shift, self.dim)
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

    def after_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     residual: torch.Tensor | None = None,
                     layer_scale: torch.Tensor | None = None,
                     drop_path: nn.Module | None = None) -> torch.Tensor:
        """``γ ⊙ F.linear(x, W, b) + β`` (or ``residual + drop_path(λ ⊙ (...))``) as one matmul
        (:func:`timm_peft.ops.linear_scale_shift`: in training it keeps only its output, or with
        a residual nothing of its own, since the neighbouring norms save both)."""
        if self.__dict__.get("_plain"):
            # per-sample γ must not be folded into a per-sample W (a batch of weight copies);
            # b, β and λ fold into per-sample vectors, so one pass over the matmul's output
            # applies them all: γλ ⊙ xWᵀ + (γ ⊙ b + β)λ
            g, s = layer_scaled(self.scale, self.shift, layer_scale)
            c = fold_bias(bias, g, s)
            y = F.linear(x, weight)
            y = y * g if c is None else torch.addcmul(c, y, g)
            y = y if drop_path is None else drop_path(y)
            return y if residual is None else residual + y
        return linear_scale_shift(x, weight, bias, self.scale, self.shift, residual=residual,
                                  layer_scale=layer_scale, **_drop_kwargs(drop_path))

    def after_conv(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """``γ ⊙ conv(x) + β`` as one convolution (:func:`timm_peft.ops.conv_scale_shift`: in
        training it keeps only its output, as the plain site does, without the extra pass)."""
        if self.__dict__.get("_plain"):  # per-sample γ must not be folded into a per-sample W
            return self(conv._conv_forward(x, conv.weight, conv.bias))
        return conv_scale_shift(x, conv.weight, conv.bias, self.scale, self.shift, conv.stride,
                                conv.padding, conv.dilation, conv.groups)

    def add_into(self, x: torch.Tensor, residual: torch.Tensor,
                 drop_path: nn.Module | None = None) -> torch.Tensor:
        """``residual + drop_path(γ ⊙ x + β)`` (:func:`timm_peft.ops.scale_shift` with a residual:
        in training it keeps only the sum and the residual, which the norms around save)."""
        if self.__dict__.get("_plain"):
            y = self(x)
            return residual + (y if drop_path is None else drop_path(y))
        return scale_shift(x, self.scale, self.shift, self.dim, residual=residual,
                           **_drop_kwargs(drop_path))

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


class ScaleShiftOutput(Swappable):
    """An operation whose output goes through its ``ssf`` child."""

    prefix = "SSF"
    method = "ssf"

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.ssf(super().forward(*args, **kwargs))


class ScaleShiftLinear(Swappable):
    """A Linear computing ``γ ⊙ (x Wᵀ + b) + β`` in one matmul with its ``ssf`` folded in; inside
    :func:`residual_into` it adds the residual it was handed too."""

    prefix = "SSF"
    method = "ssf"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.__dict__.pop("_peft_deferred", None):  # applied at the add by the block
            return super().forward(x)
        if mixins_of(self)[-1] is not ScaleShiftLinear:
            # another method's mixin changes the Linear's own output (LoRA): scale-shift that
            return self.ssf(super().forward(x))
        return self.ssf.after_linear(x, self.weight, self.bias,
                                     *self.__dict__.pop("_peft_residual", ()))


class ScaleShiftConv(Swappable):
    """A 2-D convolution computing ``γ ⊙ conv(x) + β`` in one convolution with its ``ssf``
    folded in (an ``nn.Conv2d`` of zero padding given as numbers; others are
    :class:`ScaleShiftOutput`)."""

    prefix = "SSF"
    method = "ssf"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if mixins_of(self)[-1] is not ScaleShiftConv:
            # another method's mixin changes the conv's own output (LoRA): scale-shift that
            return self.ssf(super().forward(x))
        return self.ssf.after_conv(x, self)


def _fusable_conv(op: nn.Module) -> bool:
    return (original_class(op) is nn.Conv2d and op.padding_mode == "zeros"
            and not isinstance(op.padding, str))


def takes_residual(op: nn.Module) -> bool:
    """Whether ``op`` can add a residual handed to it by :func:`residual_into` (a Linear with
    SSF attached and nothing else: another mixin may add to its output after the residual)."""
    return mixins_of(op) == (ScaleShiftLinear,)


@contextlib.contextmanager
def residual_into(op: nn.Module, residual: torch.Tensor,
                  layer_scale: torch.Tensor | None = None,
                  drop_path: nn.Module | None = None) -> Iterator[None]:
    """Hand ``residual`` to ``op``'s next call, which returns ``residual + op(x)`` (with a
    frozen per-channel ``layer_scale`` λ: ``residual + λ ⊙ op(x)``; with timm's ``DropPath``
    in training: ``residual + drop_path(λ ⊙ op(x))``, its mask drawn when ``op`` runs, where
    timm's forward draws it).

    A block ``x + branch(x)`` whose branch ends in ``op`` (followed only by identities and that
    layer scale) runs its branch inside this instead of adding ``x`` itself (see
    :class:`ResidualIntoBranch`): SSF's Linear then recovers its output in backward from ``x``
    and the sum, which the branch's norm and the next norm save anyway, and keeps no activation
    of its own (:class:`~timm_peft.ops.LinearScaleShiftFunction`). Raises ``RuntimeError`` if
    the branch returns without calling ``op`` (the residual would be lost).

    Example:
        >>> lin = nn.Linear(3, 3); lin.ssf = ScaleShift(3, dim=-1); attach_scale_shift(lin)
        >>> x, r = torch.randn(2, 3), torch.randn(2, 3)
        >>> with residual_into(lin, r):
        ...     out = lin(x)
        >>> torch.allclose(out, r + lin(x))
        True
    """
    if not takes_residual(op):
        raise TypeError(f"{type(op).__name__} cannot take a residual (only a Linear with SSF "
                        "attached does)")
    op.__dict__["_peft_residual"] = (residual, layer_scale, drop_path)
    try:
        yield
    except BaseException:
        op.__dict__.pop("_peft_residual", None)
        raise
    if op.__dict__.pop("_peft_residual", None) is not None:
        raise RuntimeError(f"residual_into: {type(op).__name__} was not called inside the block, "
                           "so its residual was not added")


@contextlib.contextmanager
def scale_shift_deferred(op: nn.Module) -> Iterator[None]:
    """``op``'s next call returns its plain Linear output, SSF left out: the caller applies
    ``op.ssf`` where that output lands (:meth:`ScaleShift.add_into`, after a rearrangement of
    positions that keeps channels, which a per-channel map commutes with). Raises
    ``RuntimeError`` if ``op`` was not called (its SSF would be lost).

    Example:
        >>> lin = nn.Linear(3, 3); lin.ssf = ScaleShift(3, dim=-1); attach_scale_shift(lin)
        >>> x, r = torch.randn(2, 3), torch.randn(2, 3)
        >>> with scale_shift_deferred(lin):
        ...     a = lin(x)
        >>> torch.allclose(lin.ssf.add_into(a.flip(0), r), r + lin(x).flip(0))
        True
    """
    if not takes_residual(op):
        raise TypeError(f"{type(op).__name__} cannot defer its SSF (only a Linear with SSF "
                        "attached and nothing else can)")
    op.__dict__["_peft_deferred"] = True
    try:
        yield
    finally:
        if op.__dict__.pop("_peft_deferred", None) is not None:
            raise RuntimeError(f"scale_shift_deferred: {type(op).__name__} was not called "
                               "inside the block, so its SSF was not applied")


class _FoldedView:
    """A norm as its own ``forward`` sees it, with other ``weight`` and ``bias`` tensors."""

    __slots__ = ("_op", "weight", "bias")

    def __init__(self, op: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._op, self.weight, self.bias = op, weight, bias

    def __getattr__(self, name: str) -> Any:
        if name == "_op":  # not set yet (e.g. while torch.compile builds the object)
            raise AttributeError(name)
        return getattr(self._op, name)


class ScaleShiftNorm(Swappable):
    """An affine norm computing ``norm(x; γ ⊙ w, γ ⊙ b + β)``: SSF folded in on the fly.

    ``γ ⊙ norm(x; w, b) + β = norm(x; γ ⊙ w, γ ⊙ b + β)``, so SSF after a norm costs no pass over
    the activations and keeps no extra one for backward (measured on a CPU: a ResNet-50 step,
    whose sites are all norms, went from 0.80 to 0.61 of full fine-tuning and its memory from
    1.30 to 0.88; on a ViT, two sites in six, mostly memory). It runs the norm class's own
    ``forward`` (BatchNorm's statistics, timm's fast-norm paths, a fused activation included)
    on a view of the module whose ``weight`` and ``bias`` are the folded tensors.
    """

    prefix = "SSF"
    method = "ssf"

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        weight, bias = self.ssf.fold(self.weight, self.bias)
        return original_class(self).forward(_FoldedView(self, weight, bias), *args, **kwargs)


def _mixin(op: nn.Module) -> type:
    if isinstance(op, NORMS) and getattr(op, "weight", None) is not None:
        return ScaleShiftNorm
    # exact types: a Linear subclass may compute something else in forward
    if original_class(op) in (nn.Linear, TimmLinear):
        return ScaleShiftLinear
    return ScaleShiftConv if _fusable_conv(op) else ScaleShiftOutput


def attach_scale_shift(op: nn.Module) -> None:
    """Route ``op``'s output through its ``ssf`` child (folded into an affine norm or Linear)."""
    swap_class(op, _mixin(op))


def detach_scale_shift(op: nn.Module) -> None:
    """Stop routing ``op``'s output through its ``ssf`` (the child stays)."""
    for mixin in (ScaleShiftNorm, ScaleShiftLinear, ScaleShiftConv, ScaleShiftOutput):
        restore_class(op, mixin)


def scale_shift_attached(op: nn.Module) -> bool:
    """Whether ``op``'s output currently goes through its SSF."""
    return any(is_swapped(op, m) for m in (ScaleShiftNorm, ScaleShiftLinear, ScaleShiftConv,
                                           ScaleShiftOutput))


@dataclass(frozen=True)
class ResidualBranch:
    """One pre-norm branch of a block, ``x = x + drop_path(λ ⊙ body(norm(x)))``, by the block's
    attribute names: a family's description for :class:`ResidualIntoBranch`.

    ``last`` is the body's last Linear and ``after_last`` the body's module after it (a dropout),
    relative to the body. ``layer_scale`` names a module (timm's ``LayerScale``, or an Identity)
    or a tensor attribute that may be None (BEiT's and EVA's ``gamma_1``); None: no layer scale.
    ``block_args``: the block's extra forward arguments go to the body (attention masks, rotary
    embeddings), in the block's order.

    A channels-first block whose branch runs channels-last (ConvNeXt:
    ``x + drop_path(λ ⊙ body(norm(pre(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2))``) names
    its ``pre`` module (the depthwise conv) and sets ``channels_last``: the residual is handed
    to ``last`` as the same permuted view, so the sum comes out channels-first again by one
    permutation of a view. ``shortcut`` names a module on the residual path that must pass its
    input through (an Identity) for the add to move.

    ``last=None`` describes a branch whose add cannot move into a Linear (Swin's windowed
    attention, whose output is reversed out of its windows after ``proj``): it runs as
    ``x + drop_path(body(norm(x)))``, ``body`` possibly a method of the block, so that the
    block's other branches can still move theirs. If its last Linear's output reaches the add
    only through a rearrangement of positions that keeps each channel (window reversal, a
    cyclic shift, a crop), that Linear is its ``site`` and the module after it ``after_site``
    (both relative to the block): a per-channel ``γ ⊙ · + β`` commutes with such a
    rearrangement, so the site's SSF is applied at the add instead, fused with it
    (:meth:`ScaleShift.add_into`), and keeps nothing the norms around the add do not.
    """

    norm: str
    body: str
    last: str | None
    after_last: str | None
    drop_path: str
    layer_scale: str | None = None
    block_args: bool = False
    pre: str | None = None
    channels_last: bool = False
    shortcut: str | None = None
    site: str | None = None
    after_site: str | None = None


_NOT_FUSABLE = object()


def _fused_drop_path(m: nn.Module) -> Any:
    """A branch's drop-path as the fused add sees it: None (it passes its input through), the
    module (timm's ``DropPath`` in training, whose per-sample mask the Linear applies), or
    ``_NOT_FUSABLE`` (anything else)."""
    from timm.layers import DropPath
    if _passes_through(m):
        return None
    return m if original_class(m) is DropPath else _NOT_FUSABLE


def _passes_through(m: nn.Module) -> bool:
    """Whether ``m`` returns its input unchanged: an Identity, or a dropout / drop-path that is
    off (p = 0, or eval mode)."""
    from timm.layers import DropPath
    if isinstance(m, nn.Identity):
        return True
    if isinstance(m, nn.Dropout):
        return m.p == 0 or not m.training
    if isinstance(m, DropPath):
        return m.drop_prob == 0 or not m.training
    return False


#: smallest layer scale |λ| the fused add takes: backward recovers ``λ ⊙ y`` as ``out − r``,
#: exact to the add's rounding ``ε·|out|``, so its relative error is ``ε·|out| / |λ ⊙ y|``
#: (float32: about 6e-5·|out|/|y| at λ = 1e-3). Below it (timm's 1e-5/1e-6 inits before
#: pretraining) the branch runs timm's forward and its Linear saves its own output.
MIN_FUSED_LAYER_SCALE = 1e-3


def _frozen_layer_scale(ls: Any) -> Any:
    """A branch's layer scale as the fused add sees it: None (none, or an identity), a frozen
    λ, or ``_NOT_FUSABLE`` (a module of another kind, a λ that trains, or one with an entry
    below :data:`MIN_FUSED_LAYER_SCALE`; checked once per version of λ, so no host sync per
    step)."""
    from timm.layers import LayerScale
    if ls is None or (isinstance(ls, nn.Module) and _passes_through(ls)):
        return None
    lam = ls.gamma if isinstance(ls, nn.Module) and original_class(ls) is LayerScale else ls
    frozen = isinstance(lam, torch.Tensor) and lam.ndim == 1 and not lam.requires_grad
    if not frozen or lam.device.type == "meta":  # meta: no values to check (shapes only)
        return _NOT_FUSABLE
    version, large = lam.__dict__.get("_peft_large", (None, False))  # kept with the tensor
    if version != lam._version:
        large = bool(lam.detach().abs().min() >= MIN_FUSED_LAYER_SCALE)
        lam.__dict__["_peft_large"] = (lam._version, large)
    return lam if large else _NOT_FUSABLE


class ResidualIntoBranch(Swappable):
    """A pre-norm block whose residual adds are done by each branch's last Linear, through
    :func:`residual_into`: with SSF on those Linears, a training step keeps no activation of
    theirs (the norms save what their backward needs).

    The reference ``residual_branches`` (a tuple of :class:`ResidualBranch`, from the family's
    :meth:`~timm_peft.families.Family.residual_branches`) says what the block's ``forward``
    computes. That is run in eager training when every branch's last Linear has SSF attached and
    what lies between it and the add is an identity (no active dropout), a frozen layer scale,
    which the Linear folds in, or timm's ``DropPath``, whose per-sample mask the Linear applies
    (drawn at the same point of the random stream as timm's forward draws it); otherwise, and under ``torch.compile`` /
    ``torch.export`` (whose partitioner plans saved tensors itself), the block's own ``forward``
    runs. Both compute the same sum (with a layer scale, to rounding: λ is folded into W).
    """

    prefix = "ResidualIntoBranch"
    method = "ssf"
    refs = ("residual_branches",)
    residual_branches: tuple[ResidualBranch, ...]

    def _layer_scales(self) -> list[torch.Tensor | None] | None:
        """Each branch's frozen λ (or None) when the adds can move into the branches, else None."""
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        scales: list[Any] = []
        for br in self.residual_branches:
            body = getattr(self, br.body)
            if any(getattr(m, "wraps_output", False) for m in mixins_of(body)):
                return None  # another method adds to the branch's output (Adapter, AdaptFormer)
            if br.last is None:
                scales.append(None)
                continue
            if not (takes_residual(body.get_submodule(br.last))
                    and _passes_through(body.get_submodule(br.after_last))
                    and _fused_drop_path(getattr(self, br.drop_path)) is not _NOT_FUSABLE
                    and (br.shortcut is None or _passes_through(getattr(self, br.shortcut)))):
                return None
            scales.append(_frozen_layer_scale(
                None if br.layer_scale is None else getattr(self, br.layer_scale)))
        return None if any(s is _NOT_FUSABLE for s in scales) else scales

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scales = self._layer_scales()
        if scales is None:
            return super().forward(x, *args, **kwargs)
        for br, lam in zip(self.residual_branches, scales):
            body = getattr(self, br.body)
            if br.last is None:
                x = self._unmoved_branch(br, body, x)
                continue
            h = x if br.pre is None else getattr(self, br.pre)(x)
            r = x
            if br.channels_last:
                h, r = h.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)
            with residual_into(body.get_submodule(br.last), r, lam,
                               _fused_drop_path(getattr(self, br.drop_path))):
                h = getattr(self, br.norm)(h)
                x = body(h, *args, **kwargs) if br.block_args else body(h)
            if br.channels_last:
                x = x.permute(0, 3, 1, 2)
        return x

    def _unmoved_branch(self, br: ResidualBranch, body: Callable[..., torch.Tensor],
                        x: torch.Tensor) -> torch.Tensor:
        """``x + drop_path(body(norm(x)))``; with a ``site`` whose SSF can go to the add, that SSF
        applied there, fused with the add."""
        drop_path = getattr(self, br.drop_path)
        site = None if br.site is None else self.get_submodule(br.site)
        drop = _fused_drop_path(drop_path)
        if site is None or not takes_residual(site) or drop is _NOT_FUSABLE or not (
                br.after_site is None or _passes_through(self.get_submodule(br.after_site))):
            return x + drop_path(body(getattr(self, br.norm)(x)))
        with scale_shift_deferred(site):
            a = body(getattr(self, br.norm)(x))
        return site.ssf.add_into(a, x, drop)
