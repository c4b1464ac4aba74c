"""Memory-lean operations for PEFT sites of a frozen backbone.

A frozen ``Linear`` or ``Conv2d`` needs only its weight to pass a gradient back to its input, so
it keeps no activation for backward. What a method adds after it should not undo that:

* :func:`scale_shift` is SSF's ``y = γ ⊙ x + β`` (Lian et al., "Scaling & Shifting Your
  Features", NeurIPS 2022, Eq. 4) as an autograd function that saves its *output* instead of its
  input: backward recovers ``x = (y − β) / γ``. The output is what the next operation (GELU, a
  norm, the attention) saves anyway, so an SSF site after a frozen Linear or Conv keeps no extra
  activation alive; autograd's ``x * γ + β`` (or the inference batch-norm SSF uses for speed)
  saves ``x``, one more tensor of the site's size. :func:`linear_scale_shift` does the same
  after a frozen Linear as a single matmul with γ, β folded into the weight and bias, so the
  site costs no pass over the activations in forward (the unmerged model runs at the merged
  model's cost) and one fused reduction in backward.
* :func:`prompted_qkv` / :func:`kv_prompt_attention` prepend key-value prompts (E²VPT, Han et al.
  ICCV 2023, Eq. 5) with one concatenation of the packed ``qkv`` projection: q, k and v are views
  of one buffer, so the attention saves that buffer only. Concatenating the prompts to k and to v
  separately (``torch.cat([P_K, k])``, ``torch.cat([P_V, v])``) creates two more tensors, saved
  next to the ``qkv`` output that q still keeps alive.

Both match the plain formulation to floating-point rounding, forward and backward
(``tests/test_ops.py``); the memory they save is measured in ``benchmarks/efficiency.py``.

Saving an output is only sound while nobody overwrites it before backward, and what follows a
site is any model's code: an in-place activation, ``x += r`` in a ``forward``, a view written in
place. So the output of :class:`ScaleShiftFunction` and :class:`LinearScaleShiftFunction` is a
:class:`SavedOutput` in eager training: the first in-place write to it or to any view of it
copies the saved value first (:class:`KeptOutput`), and backward uses that copy. A site whose
output nobody writes keeps no copy (the memory-saving path, exact); one whose output is written
pays one copy, the activation the plain path ``x * γ + β`` would have saved (exact too). Nothing
in the check depends on which model the site is in.
"""
from __future__ import annotations

from typing import Any

import functools
import inspect

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["SavedOutput", "KeptOutput", "packed_attention", "PackedAttentionFunction",
           "scale_shift", "ScaleShiftFunction", "linear_scale_shift", "LinearScaleShiftFunction",
           "fold_linear", "fold_bias", "layer_scaled", "conv_scale_shift", "floor_magnitude",
           "prompted_qkv", "kv_prompt_attention", "DEFAULT_MIN_SCALE"]

#: smallest magnitude of γ that :func:`scale_shift` applies (see there)
DEFAULT_MIN_SCALE = 1e-3


def _channel_view(t: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-channel ``t`` (C,) shaped to broadcast along axis ``dim`` of ``x``."""
    return t if dim in (-1, x.ndim - 1) else t.view(-1, *(1,) * (x.ndim - dim - 1))


def _reduce_dims(x: torch.Tensor, dim: int) -> list[int]:
    d = dim % x.ndim
    return [i for i in range(x.ndim) if i != d]


def floor_magnitude(scale: torch.Tensor, min_scale: float) -> torch.Tensor:
    """``scale`` with every entry's magnitude raised to at least ``min_scale`` (0 → +min_scale).

    Example:
        >>> floor_magnitude(torch.tensor([2.0, 0.25, -0.25, 0.0]), 0.5).tolist()
        [2.0, 0.5, -0.5, 0.5]
    """
    floor = torch.where(scale < 0, -min_scale, min_scale).to(scale.dtype)
    return torch.where(scale.abs() < min_scale, floor, scale)


def _affine_grads(grad: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor,
                  shift: torch.Tensor | None, dim: int, need_scale: bool, need_shift: bool,
                  fused: bool | None = None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(Σ g ⊙ (y − β) / γ, Σ g)`` over every axis but ``dim``: γ's and β's gradients of
    ``y = γ ⊙ x + β`` from its output, accumulated in at least float32.

    On CPU (``fused`` None → the tensors' device decides) one fused pass of torch's batch-norm
    backward: in eval mode with ``running_mean = β``, ``running_var = γ²`` and ``eps = 0`` its
    weight gradient is ``Σ g ⊙ (y − β) / |γ|`` and its bias gradient ``Σ g``, with no
    activation-sized temporary (mul/sub/sum make three). CUDA's kernel of that op requires a
    weight and saved statistics in eval mode, so elsewhere plain reductions run
    (``Σ g ⊙ y − β Σ g``: one temporary, transient).
    """
    if not (need_scale or need_shift):
        return None, None
    acc = torch.promote_types(y.dtype, torch.float32)
    g32 = gamma.to(acc)
    mean = torch.zeros_like(g32) if shift is None else shift.to(acc)
    if dim == 1 and y.is_contiguous() and grad.is_contiguous():
        yy, gg = y, grad
    else:  # rows of channels; channels-last 4-D batch-norm backward is avoided (see ScaleShift)
        yy = y.movedim(dim, -1).reshape(-1, y.shape[dim])
        gg = grad.movedim(dim, -1).reshape(-1, y.shape[dim])
    if fused if fused is not None else y.device.type == "cpu":
        _, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            gg, yy, None, mean, g32 * g32, None, None, False, 0.0,
            [False, need_scale, need_shift])
        return (grad_w * torch.sign(g32) if need_scale else None,
                grad_b if need_shift else None)
    dims = [d for d in range(yy.ndim) if d != 1]
    grad_b = gg.sum(dims, dtype=acc) if need_shift or shift is not None else None
    grad_scale = None
    if need_scale:
        gy = (gg * yy).sum(dims, dtype=acc)
        grad_scale = (gy if shift is None else gy - mean * grad_b) / g32
    return grad_scale, grad_b if need_shift else None


# ----------------------------------------------------------------------------------------------
# Outputs saved for backward, kept safe from in-place writes
# ----------------------------------------------------------------------------------------------

#: in-place methods that change metadata only, not the values backward reads
_METADATA_ONLY = frozenset({"requires_grad_", "retain_grad", "share_memory_"})


@functools.lru_cache(maxsize=None)
def _inplace_param(func: Any) -> int | None:
    """Position of ``func``'s ``inplace`` parameter (``F.relu(x, inplace)``, ``F.dropout``), or
    None."""
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _written(func: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The arguments ``func(*args, **kwargs)`` may write into: from an aten operator's schema;
    otherwise the first argument of an in-place method or function (``add_``, ``__iadd__``,
    ``__setitem__``, ``F.relu(x, inplace=True)``) and any ``out=``. Errs on the side of
    "written": a false alarm costs one copy, never a gradient."""
    schema = getattr(func, "_schema", None)
    if schema is not None:  # torch.ops.aten.*: the schema marks written arguments (Tensor(a!))
        return [args[i] if i < len(args) else kwargs.get(a.name)
                for i, a in enumerate(schema.arguments)
                if a.alias_info is not None and a.alias_info.is_write]
    name = getattr(func, "__name__", "")
    out = [kwargs["out"]] if kwargs.get("out") is not None else []
    inplace = (name.endswith("_") and not name.endswith("__") and name not in _METADATA_ONLY) \
        or (name.startswith("__i") and name.endswith("__")) or name == "__setitem__"
    if not inplace and args:
        try:
            pos = _inplace_param(func)
        except TypeError:  # unhashable callable
            pos = None
        inplace = pos is not None and (kwargs.get("inplace") is True
                                       or (pos < len(args) and args[pos] is True))
    if inplace and args:
        out += list(args[0]) if isinstance(args[0], (list, tuple)) else [args[0]]
    return out


class KeptOutput:
    """Where a saved output's value goes if something is about to overwrite it.

    Holds no tensor until :meth:`keep` (so no reference cycle with the output); then a copy of
    the whole saved output, read from the storage of whichever alias is being written, before
    the write.
    """

    __slots__ = ("dtype", "size", "stride", "offset", "value")

    def __init__(self, y: torch.Tensor) -> None:
        self.dtype, self.size, self.stride = y.dtype, y.shape, y.stride()
        self.offset, self.value = y.storage_offset(), None

    def keep(self, alias: torch.Tensor) -> None:
        if self.value is None:
            with torch.no_grad(), torch._C.DisableTorchFunctionSubclass():
                self.value = torch.empty(0, dtype=self.dtype, device=alias.device).set_(
                    alias.untyped_storage(), self.offset, self.size, self.stride).clone()


class SavedOutput(torch.Tensor):
    """A site's output that its backward saved, in eager training (see the module docstring).

    Every torch call that takes it passes through :meth:`__torch_function__`: an in-place write
    to it (or to a view of it, which is a ``SavedOutput`` too) first makes its
    :class:`KeptOutput` copy the saved value; results that are not views are plain tensors, so
    the check reaches no further than the site's output and its views.

    Example:
        >>> x = torch.randn(3, 4, requires_grad=True)
        >>> g, b = torch.full((4,), 2.0, requires_grad=True), torch.zeros(4, requires_grad=True)
        >>> y = scale_shift(x, g, b)
        >>> type(y).__name__, type(y + 1).__name__, type(y[0]).__name__
        ('SavedOutput', 'Tensor', 'SavedOutput')
        >>> y.relu_().sum().backward()   # written in place: backward reads the kept copy
        >>> torch.allclose(g.grad, (x * (x * 2 > 0)).sum(0))
        True
    """

    _peft_kept: KeptOutput

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        for t in _written(func, args, kwargs):
            kept = getattr(t, "_peft_kept", None)
            if kept is not None:
                kept.keep(t)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        sources = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, SavedOutput)]
        return tree_map(lambda r: _as_saved_view(r, sources), out) if sources else out


def _as_saved_view(r: Any, sources: list[SavedOutput]) -> Any:
    """``r`` as a :class:`SavedOutput` with the guard of the source it aliases, else ``r``."""
    if not isinstance(r, torch.Tensor) or isinstance(r, SavedOutput):
        return r
    with torch._C.DisableTorchFunctionSubclass():
        for src in sources:
            if torch._C._is_alias_of(r, src):
                view = r.as_subclass(SavedOutput)
                view._peft_kept = src._peft_kept
                return view
    return r


def _saved_output(ctx: Any, y: torch.Tensor, *tensors: torch.Tensor | None) -> torch.Tensor:
    """Save ``(y, *tensors)`` for backward and return ``y`` as a :class:`SavedOutput` whose
    :class:`KeptOutput` is ``ctx.kept``. Under ``torch.compile``/``torch.export`` the graph is
    functional (an in-place write after this op is a new value, the saved one unchanged), so
    ``y`` is returned as it is."""
    if torch.compiler.is_compiling():
        ctx.kept = None
        ctx.save_for_backward(y, *tensors)
        return y
    out = torch.Tensor._make_subclass(SavedOutput, y)  # an alias, not a view: autograd tracks it
    out._peft_kept = ctx.kept = KeptOutput(y)
    ctx.save_for_backward(out, *tensors)
    # the rest again, to read without unpacking the written output (inputs and small tensors:
    # no reference cycle), with their versions for autograd's own check
    ctx.unwritten = tensors
    ctx.versions = [None if t is None else t._version for t in tensors]
    return out


def _saved(ctx: Any) -> tuple[torch.Tensor | None, ...]:
    """What :func:`_saved_output` saved, the output replaced by its kept copy if it was written
    (its saved version then no longer matches, and autograd would refuse to unpack it)."""
    kept = ctx.kept.value if ctx.kept is not None else None
    if kept is None:
        return ctx.saved_tensors
    for t, v in zip(ctx.unwritten, ctx.versions):
        if t is not None and t._version != v:
            raise RuntimeError(f"one of the variables needed for gradient computation has been "
                               f"modified by an inplace operation: {tuple(t.shape)} tensor at "
                               f"version {t._version}; expected version {v}")
    return (kept, *ctx.unwritten)


def _scale_shift_value(x: torch.Tensor, gamma: torch.Tensor, shift: torch.Tensor | None,
                       dim: int) -> torch.Tensor:
    g = _channel_view(gamma.to(x.dtype), x, dim)
    return x * g if shift is None else torch.addcmul(_channel_view(shift.to(x.dtype), x, dim), x, g)


class ScaleShiftFunction(torch.autograd.Function):
    """``y = γ̃ ⊙ x + β`` along axis ``dim``, saving ``(y, γ̃, β)`` rather than ``x``; with a
    ``residual`` r, ``out = r + m ⊙ y`` (``m``: timm's drop-path mask, if ``drop_prob`` > 0)
    saving ``(out, γ̃, β, r)``, as :class:`LinearScaleShiftFunction` does.

    ``γ̃`` is ``γ`` with its magnitude floored at ``min_scale`` (:func:`floor_magnitude`), which
    keeps ``x = (y − β) / γ̃`` well defined; the gradient with respect to ``γ`` is the one with
    respect to ``γ̃`` (straight through the floor, so a γ at the floor can still move away). In
    backward: ``∂L/∂x = γ̃ ⊙ g``, ``∂L/∂β = Σ g`` and ``∂L/∂γ = Σ g ⊙ (y − β) / γ̃`` (sums over
    every axis but ``dim``, accumulated in at least float32, :func:`_affine_grads`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                dim: int, min_scale: float, residual: torch.Tensor | None = None,
                drop_prob: float = 0.0, scale_by_keep: bool = True) -> torch.Tensor:
        gamma = floor_magnitude(scale, min_scale)
        y = _scale_shift_value(x, gamma, shift, dim)
        ctx.dim = dim
        return _into_residual(ctx, y, residual, drop_prob, scale_by_keep, gamma, shift)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, gamma, shift, residual = _saved(ctx)
        need_x, need_scale, need_shift = ctx.needs_input_grad[:3]
        grad_y, grad_scale, grad_shift = _branch_grads(ctx, grad, y, residual, gamma, shift,
                                                       need_scale, need_shift, ctx.dim)
        grad_x = grad_y * _channel_view(gamma.to(grad_y.dtype), grad_y, ctx.dim) \
            if need_x else None
        return (grad_x, None if grad_scale is None else grad_scale.to(gamma.dtype),
                None if grad_shift is None else grad_shift.to(shift.dtype), None, None,
                grad if ctx.needs_input_grad[5] else None, None, None)


def _into_residual(ctx: Any, y: torch.Tensor, residual: torch.Tensor | None, drop_prob: float,
                   scale_by_keep: bool, *tensors: torch.Tensor | None) -> torch.Tensor:
    """The output of a site ``y`` (a :class:`SavedOutput`), or ``r + m ⊙ y`` with a residual
    ``r`` and timm's drop-path mask ``m``, and what backward needs saved: ``(y, *tensors, None)``;
    with a residual, ``(out, *tensors, r)``, both of which the norms around the add save anyway
    (a sum below float32 would lose ``y`` to cancellation against ``r``: then ``y`` is saved)."""
    ctx.y_dtype = y.dtype
    ctx.sample_scale = _drop_path_mask(y, drop_prob, scale_by_keep) if drop_prob > 0 else None
    ctx.from_residual = False
    if residual is None:
        return _saved_output(ctx, y, *tensors, None)
    out = residual + _times(y, ctx.sample_scale)
    if out.dtype in (torch.float32, torch.float64):
        ctx.from_residual = True
        return _saved_output(ctx, out, *tensors, residual)
    ctx.kept = None  # the sum is a new tensor; y is saved as it is
    ctx.save_for_backward(y, *tensors, None)
    return out


def _branch_grads(ctx: Any, grad: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None,
                  gamma: torch.Tensor, shift: torch.Tensor | None, need_scale: bool,
                  need_shift: bool, dim: int = -1
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(∂L/∂y, ∂L/∂γ, ∂L/∂β)`` of a site ``y = γ̃ ⊙ z + β`` from what :func:`_into_residual`
    saved (``shift``: the β the output carries, a layer scale folded in; ``dim``: the channel
    axis). With a residual, ``y`` is recovered as ``out − r``
    (``= m ⊙ y``): γ's gradient is then ``(Σ g ⊙ (out − r) − β ⊙ Σ m ⊙ g) / γ̃``, with no
    division by the mask, so a dropped sample adds nothing."""
    m = ctx.sample_scale
    grad_y = _times(grad.to(ctx.y_dtype), m)  # what reaches y through `r + m ⊙ y`
    need_shift = need_shift and shift is not None
    if ctx.from_residual:
        y = y - residual  # one activation-sized temporary, freed on return
    if not (ctx.from_residual and m is not None):
        return (grad_y, *_affine_grads(grad if ctx.from_residual else grad_y, y, gamma, shift,
                                       dim, need_scale, need_shift))
    grad_scale = _affine_grads(grad, y, gamma, None, dim, need_scale, False)[0]
    grad_shift = None
    if need_shift or (need_scale and shift is not None):
        grad_shift = grad_y.sum(_reduce_dims(grad_y, dim),
                                dtype=torch.promote_types(grad_y.dtype, torch.float32))
    if need_scale and shift is not None:
        grad_scale = grad_scale - shift.to(grad_shift.dtype) * grad_shift \
            / gamma.to(grad_shift.dtype)
    return grad_y, grad_scale, grad_shift if need_shift else None


class LinearScaleShiftFunction(torch.autograd.Function):
    """``y = γ̃ ⊙ (x Wᵀ + b) + β`` of a frozen Linear as one matmul, saving ``(y, W, γ̃, β)``;
    with a ``residual`` r, ``out = r + λ ⊙ y`` saving ``(out, r, W, γ̃, β, λ)`` (λ: a frozen
    layer scale between the site and the add, or None).

    Forward is ``F.linear(x, γ̃ ⊙ W, γ̃ ⊙ b + β)`` (λ folded in too): no pass over the
    activations besides the matmul, and neither ``x`` nor ``x Wᵀ + b`` is kept (a frozen Linear
    needs only ``W`` for ``∂L/∂x``). Backward: ``∂L/∂x = g (λ γ̃ ⊙ W)``, and γ's and β's
    gradients from the output as in :class:`ScaleShiftFunction`. ``W`` and ``b`` get no
    gradient: :func:`linear_scale_shift` takes plain autograd when they require one.

    With a residual (the block input of a pre-norm transformer branch, ``x + branch(norm(x))``),
    ``λ ⊙ y`` is recovered in backward as ``out − r``: ``r`` is what the branch's norm saves and
    ``out`` what the next norm saves, so the site keeps no tensor of its own. γ's gradient
    ``Σ g ⊙ λ ⊙ z = Σ g ⊙ (out − r − λ ⊙ β) / γ̃`` needs no division by λ. The subtraction loses
    ``ε·|r|``; that is below the branch's own rounding only when ``out`` is at least float32
    (the residual stream under autocast is), so a lower-precision ``out`` saves ``λ ⊙ y``.

    With ``drop_prob`` > 0 (an active drop-path between the site and the add, Huang et al.
    2016), ``out = r + m ⊙ λ ⊙ y`` with timm's per-sample mask ``m`` (0, or 1/keep; drawn here as
    :func:`timm.layers.drop_path` draws it, so the random stream is the same). Then
    ``out − r = m ⊙ λ ⊙ y`` and γ's gradient is ``(Σ g ⊙ (out − r) − λ ⊙ β ⊙ Σ m ⊙ g) / γ̃``:
    still no division by λ or by m, and a dropped sample (``out − r = 0``) adds nothing.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                scale: torch.Tensor, shift: torch.Tensor | None, residual: torch.Tensor | None,
                layer_scale: torch.Tensor | None, min_scale: float, drop_prob: float = 0.0,
                scale_by_keep: bool = True) -> torch.Tensor:
        gamma = floor_magnitude(scale, min_scale)
        eff_scale, eff_shift = layer_scaled(gamma, shift, layer_scale)
        y = F.linear(x, *fold_linear(weight, bias, eff_scale, eff_shift, x.dtype))
        return _into_residual(ctx, y, residual, drop_prob, scale_by_keep, weight, gamma, shift,
                              layer_scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, weight, gamma, shift, layer_scale, residual = _saved(ctx)
        need_x, _, _, need_scale, need_shift, need_res = ctx.needs_input_grad[:6]
        eff_scale, eff_shift = layer_scaled(gamma, shift, layer_scale)
        grad_y, grad_scale, grad_shift = _branch_grads(ctx, grad, y, residual, gamma, eff_shift,
                                                       need_scale, need_shift)
        grad_x = grad_y.matmul((weight * eff_scale.to(weight.dtype)[:, None]).to(grad_y.dtype)) \
            if need_x else None
        if grad_shift is not None and layer_scale is not None:
            grad_shift = grad_shift * layer_scale.to(grad_shift.dtype)
        return (grad_x, None, None, None if grad_scale is None else grad_scale.to(gamma.dtype),
                None if grad_shift is None else grad_shift.to(shift.dtype),
                grad if need_res else None, None, None, None, None)


def _drop_path_mask(y: torch.Tensor, drop_prob: float, scale_by_keep: bool) -> torch.Tensor:
    """The per-sample factor (0 or 1/keep) :func:`timm.layers.drop_path` multiplies ``y`` by,
    drawn with the same calls, so a fused drop-path consumes the random stream as timm's."""
    keep = 1 - drop_prob
    m = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep)
    return m.div_(keep) if keep > 0 and scale_by_keep else m


def _times(t: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    return t if m is None else t * m.to(t.dtype)


def layer_scaled(gamma: torch.Tensor, shift: torch.Tensor | None,
                 layer_scale: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(λ ⊙ γ, λ ⊙ β)``: the scale and shift a layer scale λ after the site makes of γ, β.

    Example:
        >>> g, b = layer_scaled(torch.ones(2), torch.ones(2), torch.tensor([2., 3.]))
        >>> g.tolist(), b.tolist()
        ([2.0, 3.0], [2.0, 3.0])
    """
    if layer_scale is None:
        return gamma, shift
    lam = layer_scale.to(gamma.dtype)
    return gamma * lam, None if shift is None else shift * lam


def fold_linear(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                shift: torch.Tensor | None, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(γ ⊙ W, γ ⊙ b + β)`` for ``F.linear`` or a convolution (γ scales W's output channels,
    its first axis; ``b`` or ``β`` may be None).

    Example:
        >>> w, b = fold_linear(torch.ones(2, 3), None, torch.tensor([2., 3.]), torch.ones(2))
        >>> w[:, 0].tolist(), b.tolist()
        ([2.0, 3.0], [1.0, 1.0])
    """
    dtype = dtype or weight.dtype
    w = weight.to(dtype) * scale.to(dtype).view(-1, *[1] * (weight.ndim - 1))
    return w, fold_bias(bias, scale, shift, dtype)


def fold_bias(bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor | None,
              dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``γ ⊙ b + β``, the bias of an operation with the map folded in (``b`` or ``β`` may be
    None; None when both are), in ``dtype`` (default: γ's).

    Example:
        >>> fold_bias(torch.tensor([1., 1.]), torch.tensor([2., 3.]), torch.ones(2)).tolist()
        [3.0, 4.0]
    """
    dtype = dtype or scale.dtype
    if bias is None:
        return None if shift is None else shift.to(dtype)
    b, g = bias.to(dtype), scale.to(dtype)
    return b * g if shift is None else torch.addcmul(shift.to(dtype), b, g)


def linear_scale_shift(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       scale: torch.Tensor, shift: torch.Tensor | None = None,
                       min_scale: float = DEFAULT_MIN_SCALE,
                       residual: torch.Tensor | None = None,
                       layer_scale: torch.Tensor | None = None, drop_prob: float = 0.0,
                       scale_by_keep: bool = True) -> torch.Tensor:
    """SSF after a Linear, ``γ ⊙ (x Wᵀ + b) + β``, as one matmul with the map folded in; with
    ``residual``, ``residual + drop_path(λ ⊙ (γ ⊙ (x Wᵀ + b) + β))`` (a transformer branch's
    last Linear, its frozen layer scale λ, if any, the branch's drop-path in training, if
    ``drop_prob`` > 0, as :func:`timm.layers.drop_path` with ``training=True``, and the block's
    residual add).

    Without autograd (or with nothing requiring grad) this is ``F.linear(x, γ ⊙ W, γ ⊙ b + β)``,
    the merged model's computation with the unmerged parameters. In training with a frozen
    ``W``, ``b`` and λ, :class:`LinearScaleShiftFunction`: it saves only its output (with a
    residual: the output and the residual), which the next operations keep anyway, and γ's
    magnitude is floored at ``min_scale`` as in :func:`scale_shift`. A ``W``, ``b`` or λ that
    requires grad gets plain autograd.

    Example:
        >>> lin = torch.nn.Linear(4, 3)
        >>> g, b = torch.full((3,), 2.0, requires_grad=True), torch.ones(3, requires_grad=True)
        >>> x, r, lam = torch.randn(5, 4), torch.randn(5, 3), torch.tensor([0.5, 1.0, 2.0])
        >>> torch.allclose(linear_scale_shift(x, lin.weight, lin.bias, g, b), lin(x) * g + b)
        True
        >>> torch.allclose(linear_scale_shift(x, lin.weight, lin.bias, g, b, residual=r,
        ...                                   layer_scale=lam), r + lam * (lin(x) * g + b))
        True
    """
    if scale.shape != (weight.shape[0],) or (shift is not None and shift.shape != scale.shape):
        raise ValueError(f"linear_scale_shift: scale and shift must have shape (out_features,) = "
                         f"({weight.shape[0]},); got scale {tuple(scale.shape)}, shift "
                         f"{None if shift is None else tuple(shift.shape)}")
    if layer_scale is not None and (residual is None or layer_scale.shape != scale.shape):
        raise ValueError(f"linear_scale_shift: layer_scale goes with a residual and has shape "
                         f"(out_features,) = ({weight.shape[0]},); got "
                         f"{tuple(layer_scale.shape)}"
                         + ("" if residual is not None else " without a residual"))
    _check_drop_prob("linear_scale_shift", drop_prob, residual)
    params = (weight, bias, scale, shift, residual, layer_scale)
    frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad)
                  or (layer_scale is not None and layer_scale.requires_grad))
    if not torch.is_grad_enabled() or not (
            x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        y = F.linear(x, *fold_linear(weight, bias, *layer_scaled(scale, shift, layer_scale),
                                     x.dtype))
    elif not frozen:
        y = scale_shift(F.linear(x, weight, bias), scale, shift, -1, min_scale)
        y = y if layer_scale is None else y * layer_scale
    else:
        return LinearScaleShiftFunction.apply(x, weight, bias, scale, shift, residual,
                                              layer_scale, min_scale, drop_prob, scale_by_keep)
    return _plain_add(y, residual, drop_prob, scale_by_keep)


class ConvScaleShiftFunction(torch.autograd.Function):
    """``y = γ̃ ⊙ conv2d(x; W, b) + β`` of a frozen 2-D convolution as one convolution with the
    map folded into ``W`` and ``b``, saving ``(y, W, γ̃, β)`` as :class:`LinearScaleShiftFunction`
    does: no pass over the activations besides the convolution, and neither ``x`` nor the
    convolution's own output is kept. Backward: ``∂L/∂x`` is the convolution's input gradient
    with ``γ̃ ⊙ W``, γ's and β's gradients come from the output as in
    :class:`ScaleShiftFunction`.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                scale: torch.Tensor, shift: torch.Tensor | None, stride: Any, padding: Any,
                dilation: Any, groups: int, min_scale: float) -> torch.Tensor:
        gamma = floor_magnitude(scale, min_scale)
        y = F.conv2d(x, *fold_linear(weight, bias, gamma, shift, x.dtype), stride, padding,
                     dilation, groups)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return _into_residual(ctx, y, None, 0.0, True, weight, gamma, shift)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, weight, gamma, shift, _ = _saved(ctx)
        need_x, _, _, need_scale, need_shift = ctx.needs_input_grad[:5]
        grad_y, grad_scale, grad_shift = _branch_grads(ctx, grad, y, None, gamma, shift,
                                                       need_scale, need_shift, dim=1)
        grad_x = None
        if need_x:
            shape, stride, padding, dilation, groups = ctx.conv
            w = fold_linear(weight, None, gamma, None, grad_y.dtype)[0]
            # the convolution's own backward; its input argument only picks the kernel, so an
            # unwritten buffer of the input's shape (torch.nn.grad.conv2d_input's stand-in
            # sends depthwise convolutions to a slower kernel on CPU)
            grad_x = torch.ops.aten.convolution_backward(
                grad_y, grad_y.new_empty(shape), w, None, stride, padding, dilation, False,
                [0, 0], groups, [True, False, False])[0]
        return (grad_x, None, None, None if grad_scale is None else grad_scale.to(gamma.dtype),
                None if grad_shift is None else grad_shift.to(shift.dtype),
                None, None, None, None, None)


def conv_scale_shift(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     scale: torch.Tensor, shift: torch.Tensor | None = None, stride: Any = 1,
                     padding: Any = 0, dilation: Any = 1, groups: int = 1,
                     min_scale: float = DEFAULT_MIN_SCALE) -> torch.Tensor:
    """SSF after a 2-D convolution, ``γ ⊙ conv2d(x; W, b) + β``, as one convolution with the
    map folded in (``padding``: numbers, not ``"same"``).

    Without autograd (or with nothing requiring grad) this is the merged model's convolution
    with the unmerged parameters; in training with a frozen ``W`` and ``b``,
    :class:`ConvScaleShiftFunction` (it saves only its output, γ's magnitude floored at
    ``min_scale`` as in :func:`scale_shift`); a ``W`` or ``b`` that requires grad gets plain
    autograd.

    Example:
        >>> conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        >>> g, b = torch.full((4,), 2.0, requires_grad=True), torch.ones(4, requires_grad=True)
        >>> x = torch.randn(2, 3, 5, 5)
        >>> ref = conv(x) * g[:, None, None] + b[:, None, None]
        >>> torch.allclose(conv_scale_shift(x, conv.weight, conv.bias, g, b, padding=1), ref,
        ...                atol=1e-6)
        True
    """
    if weight.ndim != 4 or scale.shape != (weight.shape[0],) or (
            shift is not None and shift.shape != scale.shape):
        raise ValueError(f"conv_scale_shift: a 2-D convolution's weight (out, in/groups, kH, kW) "
                         f"and scale and shift of shape (out,); got weight "
                         f"{tuple(weight.shape)}, scale {tuple(scale.shape)}, shift "
                         f"{None if shift is None else tuple(shift.shape)}")
    if isinstance(padding, str):
        raise ValueError(f"conv_scale_shift: padding must be numbers, got {padding!r}")
    params = (weight, bias, scale, shift)
    if not torch.is_grad_enabled() or not (
            x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return F.conv2d(x, *fold_linear(weight, bias, scale, shift, x.dtype), stride, padding,
                        dilation, groups)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return scale_shift(F.conv2d(x, weight, bias, stride, padding, dilation, groups), scale,
                           shift, 1, min_scale)
    return ConvScaleShiftFunction.apply(x, weight, bias, scale, shift, stride, padding, dilation,
                                        groups, min_scale)


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None,
                dim: int = -1, min_scale: float = DEFAULT_MIN_SCALE,
                residual: torch.Tensor | None = None, drop_prob: float = 0.0,
                scale_by_keep: bool = True) -> torch.Tensor:
    """SSF's ``γ ⊙ x + β`` along channel axis ``dim``, keeping no copy of ``x`` for backward;
    with ``residual``, ``residual + drop_path(γ ⊙ x + β)`` (timm's drop-path in training if
    ``drop_prob`` > 0), keeping nothing but the sum and the residual (see
    :func:`linear_scale_shift`).

    ``scale`` (γ) and ``shift`` (β, or None) have shape ``(x.shape[dim],)``. The output is saved
    for backward; in training it is a :class:`SavedOutput`, so writing it in place afterwards
    copies the saved value first (gradients stay exact, at the plain path's memory). γ is applied
    with its magnitude floored at ``min_scale`` (default 1e-3; SSF starts γ at N(1, 0.02²)): for
    ``|γ| ≥ min_scale`` this is exactly ``γ ⊙ x + β``. Recovering ``x`` costs accuracy when
    ``|γ|`` is tiny: its error is about the dtype's epsilon times ``|y| / |γ|``. See
    :class:`ScaleShiftFunction`.

    Example:
        >>> x = torch.randn(2, 5, 4, requires_grad=True)
        >>> g, b = torch.full((4,), 2.0, requires_grad=True), torch.ones(4, requires_grad=True)
        >>> y = scale_shift(x, g, b)
        >>> torch.allclose(y, x * g + b)
        True
        >>> y.sum().backward(); torch.allclose(g.grad, x.detach().sum((0, 1)))
        True
    """
    if dim not in (1, -1):
        raise ValueError(f"scale_shift: dim must be 1 (channels first) or -1 (channels last), "
                         f"got {dim}")
    if x.ndim < 2 or scale.shape != (x.shape[dim],) or (
            shift is not None and shift.shape != scale.shape):
        raise ValueError(f"scale_shift: scale and shift must have shape (x.shape[{dim}],) = "
                         f"({x.shape[dim] if x.ndim >= 2 else '?'},) for x of shape "
                         f"{tuple(x.shape)} (at least 2-D); got scale {tuple(scale.shape)}, shift "
                         f"{None if shift is None else tuple(shift.shape)}")
    if not min_scale > 0:
        raise ValueError(f"scale_shift: min_scale must be > 0, got {min_scale!r}")
    _check_drop_prob("scale_shift", drop_prob, residual)
    if not torch.is_grad_enabled() or not (
            x.requires_grad or scale.requires_grad or (shift is not None and shift.requires_grad)
            or (residual is not None and residual.requires_grad)):
        y = _scale_shift_value(x, floor_magnitude(scale, min_scale), shift, dim)
        return _plain_add(y, residual, drop_prob, scale_by_keep)
    return ScaleShiftFunction.apply(x, scale, shift, dim, min_scale, residual, drop_prob,
                                    scale_by_keep)


def _check_drop_prob(op: str, drop_prob: float, residual: torch.Tensor | None) -> None:
    if drop_prob and (residual is None or not 0 < drop_prob <= 1):
        raise ValueError(f"{op}: drop_prob goes with a residual and is in (0, 1]; got "
                         f"{drop_prob}" + ("" if residual is not None else " without a residual"))


def _plain_add(y: torch.Tensor, residual: torch.Tensor | None, drop_prob: float,
               scale_by_keep: bool) -> torch.Tensor:
    """``residual + drop_path(y)`` with plain autograd (or ``y`` without a residual)."""
    if drop_prob:
        y = y * _drop_path_mask(y, drop_prob, scale_by_keep)
    return y if residual is None else residual + y


def _qkv_views(qkv: torch.Tensor, num_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, C3 = qkv.shape
    return qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


class PackedAttentionFunction(torch.autograd.Function):
    """``softmax(q kᵀ · scale + bias) v`` from a packed ``qkv`` (B, N, 3·H·d), saving ``qkv``
    and the attention probabilities only.

    The same products as timm's unfused attention (``q * scale @ kᵀ``, ``+ bias``, softmax,
    ``@ v``), whose matmuls each save a contiguous copy of their operands (q·scale, kᵀ, v: as
    many bytes as ``qkv``) next to the probabilities; here backward reads q, k and v as views
    of ``qkv`` itself, so where ``qkv`` is saved anyway (SSF's scale-shift after it) the
    attention keeps nothing more than the probabilities. Backward: ``∂v = Pᵀ g``,
    ``∂S = P ⊙ (g vᵀ − rowsum(P ⊙ g vᵀ))``, ``∂q = scale · ∂S k``, ``∂k = scale · ∂Sᵀ q``.
    ``bias`` (broadcast to (B, H, N, N)) gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
                scale: float) -> torch.Tensor:
        q, k, v = _qkv_views(qkv, num_heads)
        s = (q * scale) @ k.transpose(-2, -1)
        attn = (s if bias is None else s + bias).softmax(-1)
        ctx.num_heads, ctx.scale = num_heads, scale
        ctx.save_for_backward(qkv, attn)
        return attn @ v

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qkv, attn = ctx.saved_tensors
        q, k, v = _qkv_views(qkv, ctx.num_heads)
        g_attn = grad @ v.transpose(-2, -1)
        g_v = attn.transpose(-2, -1) @ grad
        # torch's fused softmax backward (one pass over the map, not four), the scale applied
        # to ∂S in place rather than to ∂q and ∂k
        g_s = torch._softmax_backward_data(g_attn.to(attn.dtype), attn, -1, attn.dtype)
        g_s = g_s.mul_(ctx.scale)
        g_q = g_s @ k
        g_k = g_s.transpose(-2, -1) @ q
        g_qkv = torch.stack([g_q, g_k, g_v]).permute(1, 3, 0, 2, 4).reshape(qkv.shape)
        return g_qkv, None, None, None


def packed_attention(qkv: torch.Tensor, num_heads: int, scale: float,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention ``(B, H, N, d)`` from a packed ``qkv`` (B, N, 3·H·d) with an additive ``bias``
    that does not train, saving ``qkv`` and the probabilities (:class:`PackedAttentionFunction`).

    Example:
        >>> qkv = torch.randn(2, 5, 3 * 2 * 4, requires_grad=True)
        >>> q, k, v = qkv.view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        >>> ref = ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        >>> torch.allclose(packed_attention(qkv, 2, 0.5), ref, atol=1e-6)
        True
    """
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"packed_attention: qkv must be (B, N, 3·heads·head_dim) with heads="
                         f"{num_heads}, got shape {tuple(qkv.shape)}")
    if bias is not None and bias.requires_grad:
        raise ValueError("packed_attention: the bias gets no gradient; use plain autograd for a "
                         "bias that trains")
    return PackedAttentionFunction.apply(qkv, bias, num_heads, scale)


def prompted_qkv(qkv: torch.Tensor, num_heads: int, prompt_k: torch.Tensor,
                 prompt_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a packed ``qkv`` projection with key-value prompts in front of k and v.

    ``qkv`` is the output of timm's ``Attention.qkv`` Linear, ``(B, N, 3·H·d)``; ``prompt_k`` and
    ``prompt_v`` are ``(H, T, d)``. Returns ``q`` ``(B, H, N, d)`` and ``k = [P_K; K]``,
    ``v = [P_V; V]`` ``(B, H, T+N, d)``, in the layout ``F.scaled_dot_product_attention`` takes.
    One concatenation builds a ``(B, T+N, 3, H, d)`` buffer of which all three are views (the q
    slots of the T prompt rows are zeros, never read), so what attention saves for backward is
    that buffer; the ``qkv`` output itself is free once this returns.

    Example:
        >>> qkv = torch.randn(2, 10, 3 * 4 * 8)
        >>> q, k, v = prompted_qkv(qkv, 4, torch.randn(4, 5, 8), torch.randn(4, 5, 8))
        >>> q.shape, k.shape, k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        (torch.Size([2, 4, 10, 8]), torch.Size([2, 4, 15, 8]), True)
    """
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"prompted_qkv: qkv must be (B, N, 3·heads·head_dim) with heads="
                         f"{num_heads}, got shape {tuple(qkv.shape)}")
    B, N, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    if prompt_k.ndim != 3 or prompt_k.shape[0] != num_heads or prompt_k.shape[2] != head_dim \
            or prompt_v.shape != prompt_k.shape:
        raise ValueError(f"prompted_qkv: prompt_k and prompt_v must both be (heads, T, head_dim) "
                         f"= ({num_heads}, T, {head_dim}), got {tuple(prompt_k.shape)} and "
                         f"{tuple(prompt_v.shape)}")
    T = prompt_k.shape[1]
    pk, pv = prompt_k.to(qkv.dtype).transpose(0, 1), prompt_v.to(qkv.dtype).transpose(0, 1)
    rows = torch.stack([torch.zeros_like(pk), pk, pv], dim=1)  # (T, 3, H, d): tiny
    buf = torch.cat([rows.expand(B, -1, -1, -1, -1), qkv.view(B, N, 3, num_heads, head_dim)], 1)
    q, k, v = buf.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T+N, d)
    return q[:, :, T:], k, v


def kv_prompt_attention(qkv: torch.Tensor, num_heads: int, prompt_k: torch.Tensor,
                        prompt_v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                        dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """``softmax(q [P_K; K]ᵀ · scale + mask) [P_V; V]`` with :func:`prompted_qkv`'s single copy.

    ``attn_mask`` is over the ``T + N`` keys (prompts first), as for
    ``F.scaled_dot_product_attention`` on the concatenated keys; returns ``(B, H, N, d)``.
    Equal to ``F.scaled_dot_product_attention(q, cat([P_K, K]), cat([P_V, V]), ...)`` to
    rounding, values and gradients (``tests/test_ops.py``).

    Example:
        >>> qkv = torch.randn(2, 10, 3 * 4 * 8)
        >>> kv_prompt_attention(qkv, 4, torch.randn(4, 5, 8), torch.randn(4, 5, 8)).shape
        torch.Size([2, 4, 10, 8])
    """
    q, k, v = prompted_qkv(qkv, num_heads, prompt_k, prompt_v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          scale=scale)
