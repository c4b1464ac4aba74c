"""LION: implicit vision prompt tuning (Wang et al., "LION: Implicit Vision Prompt Tuning",
AAAI 2024; arXiv:2303.09992).

Two deep-equilibrium prompt blocks sit at the two ends of a frozen backbone ``F`` and the head
``H`` reads the blended features (paper Eq. 1-3)::

    x̃ = α₁·x + β₁·P₁(x)                 P₁: implicit conv layer on the image
    z̃ = α₂·F(x̃) + β₂·MLP(P₂(F(x̃)))      P₂: implicit layer on the pooled features
    (αᵢ, βᵢ) = softmax(g_αᵢ, g_βᵢ)        logits = H(z̃)

and all trainable parameters (P₁, P₂, the projection, the gates and the head) are trained with
the paper's robust rule (Eq. 7-11, :class:`RobustOptimizer`). No code of LION is public, so every
choice below is ours; each is a :class:`LionConfig` field.

Choices where the paper is silent:

* **Cell.** "A ResNet layer" with input injection: ``f(z, u) = GN(relu(u + W₂·relu(W₁·z)))``,
  a residual block whose skip carries the injection ``u``; ``u`` is GroupNorm-ed once (no
  affine), so the cell's gain depends neither on the scale of the backbone's features nor on a
  learned rescaling. GroupNorm (``norm_groups``) keeps each sample's equilibrium independent of
  the rest of the batch. ``W₁, W₂`` start at N(0, 0.01²) and their Frobenius norms are capped at
  ``cell_max_norm`` (0.5), which keeps ``f`` a contraction through training (without the cap,
  Adam at usual learning rates makes the cell expansive within tens of steps); ``z₀ = 0``. The
  DEQ paper's cell normalises ``W₁z`` and adds ``z`` before its last norm; both make the map
  expansive here, so they are left out (see :class:`EquilibriumCell`).
* **P₁** works on the normalised image at stride ``p1_stride``: injection ``u`` = 3×3 conv
  (``in_chans → p1_width``, stride ``p1_stride``); the prompt is read out by a 1×1 conv to
  ``in_chans·stride²`` channels and a pixel shuffle, so it has full resolution while the
  equilibrium is solved on a ``stride²``-times smaller map.
* **P₂** reads the backbone's pooled pre-logits features ``F(x̃)`` (one backbone pass; the paper's
  Eq. 2 writes ``P₂(zᵢ)`` with ``zᵢ = F(xᵢ)``, which would need a second pass): injection
  ``Linear(d → p2_width)``, the same cell on vectors, and "MLP" = ``Linear(p2_width → d)``.
* **Initialisation.** Both read-outs (P₁'s 1×1 conv, P₂'s projection) start at zero. With
  ``identity_prompt=True`` (default) each prompt block is residual like the ResNet layer it is
  built from, ``P₁(x) = x + R₁(x)`` and ``MLP(P₂(F)) = F + R₂(F)``, so the blends are
  ``x + β₁R₁(x)`` and ``F + β₂R₂(F)``: at step 0 the model *is* the frozen backbone for any gate
  value, and the gates start neutral (``gate_init = β = 0.5``, i.e. ``g_α = g_β = 0``). With
  ``identity_prompt=False`` the blends are the literal ``α·x + β·R(x)``; then pick a small
  ``gate_init`` (e.g. 0.01) to start close to the backbone.
* **Solver.** Anderson acceleration (memory ``anderson_m``) or plain iteration (``solver``),
  tolerance ``tol`` on the per-sample relative residual, caps ``max_iter`` (training) and
  ``eval_max_iter``; gradients by implicit differentiation (adjoint solved to ``backward_tol``
  within ``backward_max_iter``) or the phantom gradient (``backward="phantom"``). See
  :mod:`timm_peft.deq`.
* **Robust training.** τ is the *fraction* of elements that are non-crucial (the paper writes a
  threshold on ``|g·θ|`` but sweeps τ in 0.2-0.8 like a ratio). Elements are ranked within each
  tensor by default (``robust_scope="tensor"``): ranked over all tensors at once, whole tensors
  whose gradients are small in absolute terms (everything behind a zero-initialised read-out, at
  first) would be non-crucial at every step and only ever shrink. The shrink step is the group's
  learning rate (``robust_shrink`` scales it) and never crosses zero; the wrapped optimiser keeps
  its state for every element (see :class:`RobustOptimizer`). The training loop picks the
  wrapper up through :meth:`Lion.training_hooks` (``"optimizer_wrapper"``).
* **Where it acts.** A cached subclass of the model's own timm class overrides
  ``forward_features`` (P₁ first) and ``forward_head`` (blend with P₂, then the classifier), so
  ``model(x)``, ``forward_features`` and ``forward_head(pre_logits=True)`` (which returns ``z̃``)
  all include LION; ``forward_intermediates`` (hence ``features_only``) runs the backbone on
  the prompted image ``x̃`` (P₂ acts after pooling, so no intermediate holds it). The subclass
  keeps ``isinstance`` and every base state-dict key; LION's modules live under ``model.lion``;
  ``unload`` restores the plain class.

Ablations of the paper's Table 4 are presets: ``lion_no_p1`` (LION-P1), ``lion_no_p2``
(LION-P2) and ``lion_no_robust`` (LION-R).

Example:
    >>> import timm, timm_peft
    >>> m = timm.create_model("resnet18.lion", num_classes=10)
    >>> m(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core import (AdapterModule, PeftConfig, PeftMethod, cfg_field, register_method,
                    register_preset)
from ..deq import DEQ, SOLVERS

__all__ = ["LionConfig", "Lion", "LionPrompts", "EquilibriumCell", "ImplicitImagePrompt",
           "ImplicitFeaturePrompt", "BlendGate", "RobustOptimizer", "lion_class"]


@dataclass
class LionConfig(PeftConfig):
    """Hyper-parameters of LION; every choice the paper leaves open is a field here."""

    use_p1: bool = cfg_field(True, help="P1, the implicit prompt on the input image (False: "
                                        "the paper's LION-P1 ablation)")
    use_p2: bool = cfg_field(True, help="P2, the implicit prompt on the pooled features (False: "
                                        "the paper's LION-P2 ablation)")
    p1_width: int = cfg_field(8, ge=1, le=1024, help="channels of P1's equilibrium state")
    p1_stride: int = cfg_field(2, ge=1, le=64, help="P1 solves its equilibrium at 1/stride resolution")
    p2_width: int = cfg_field(64, ge=1, le=4096, help="width of P2's equilibrium state")
    norm_groups: int = cfg_field(4, ge=1, le=1024, help="GroupNorm groups in both cells")
    cell_max_norm: float | None = cfg_field(0.5, gt=0.0, help="cap on ‖W‖_F of the cells' "
                                            "weights, keeping them contractions (None: no cap)")
    identity_prompt: bool = cfg_field(True, help="prompt blocks are residual (P(x) = x + R(x)), "
                                                 "so the model starts as the backbone")
    gate_init: float = cfg_field(0.5, gt=0.0, lt=1.0, help="β of both blends at initialisation")
    solver: str = cfg_field("anderson", choices=tuple(SOLVERS), help="fixed-point solver")
    max_iter: int = cfg_field(20, ge=1, le=1000, help="solver iteration cap in training")
    eval_max_iter: int = cfg_field(40, ge=1, le=1000, help="solver iteration cap in eval mode")
    tol: float = cfg_field(1e-3, ge=0.0, help="relative residual ‖f(z)-z‖/‖z‖ to stop at")
    backward: str = cfg_field("implicit", choices=("implicit", "phantom"),
                              help="implicit differentiation or the phantom gradient")
    backward_max_iter: int = cfg_field(20, ge=1, le=1000, help="iteration cap of the adjoint solve")
    backward_tol: float = cfg_field(1e-3, ge=0.0, help="tolerance of the adjoint solve")
    phantom_steps: int = cfg_field(1, ge=1, le=100, help="steps differentiated by the phantom gradient")
    phantom_damping: float = cfg_field(1.0, gt=0.0, le=1.0, help="λ of the phantom steps")
    anderson_m: int = cfg_field(5, ge=1, le=50, help="Anderson memory (past iterates mixed)")
    robust: bool = cfg_field(True, help="robust training (paper Eq. 7-11; False: LION-R)")
    robust_tau: float = cfg_field(0.4, ge=0.0, lt=1.0, help="fraction of non-crucial elements")
    robust_scope: str = cfg_field("tensor", choices=("tensor", "global"),
                                  help="rank criticality within each tensor or over all")
    robust_shrink: float = cfg_field(1.0, ge=0.0, help="shrink step of non-crucial elements, "
                                                       "as a multiple of the learning rate")

    def validate(self) -> None:
        super().validate()
        if not (self.use_p1 or self.use_p2):
            raise ValueError("LionConfig: use_p1 and use_p2 are both False, which leaves only the "
                             "head; allowed: at least one of them True (or use method 'linear')")
        for name in ("p1_width", "p2_width"):
            if getattr(self, name) % self.norm_groups:
                raise ValueError(f"LionConfig.{name} ({getattr(self, name)}) must be divisible by "
                                 f"norm_groups ({self.norm_groups})")

    def deq_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`timm_peft.deq.DEQ` for both prompt blocks."""
        return dict(solver=self.solver, max_iter=self.max_iter, eval_max_iter=self.eval_max_iter,
                    tol=self.tol, backward=self.backward, backward_max_iter=self.backward_max_iter,
                    backward_tol=self.backward_tol, phantom_steps=self.phantom_steps,
                    phantom_damping=self.phantom_damping, anderson_m=self.anderson_m)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------

class EquilibriumCell(nn.Module):
    """DEQ cell ``f(z, u) = GN(relu(u + W₂·relu(W₁·z)))``: a residual block whose skip carries
    the input injection ``u`` (normalised by the caller).

    ``W₁, W₂`` start at N(0, 0.01²) and are used as ``W·min(1, max_norm/‖W‖_F)``. The GroupNorm
    has no affine, so ``Lip_z(f) ≤ ‖W₂‖·‖W₁‖ / std(relu(u + ·))``: with ``u`` of unit variance per
    group that is about ``1.7·max_norm²`` for linear maps (0.43 at the default 0.5), so the cell
    stays a contraction however far training moves the weights (for 3×3 convolutions the
    Frobenius norm bounds the operator norm less tightly, but the solver is seen to stay fast). The
    DEQ paper's cell (Bai et al. 2019) also normalises ``W₁·z`` and adds ``z`` before the last
    norm; both make the map scale-free in ``W₁`` and measurably expansive, so they are left out.
    ``spatial=True`` uses 3×3 convolutions on ``(B, C, H, W)``, else linear maps on ``(B, C)``.

    Example:
        >>> f = EquilibriumCell(8, groups=4, spatial=False)
        >>> f(torch.zeros(2, 8), torch.randn(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, width: int, groups: int, spatial: bool,
                 max_norm: float | None = 0.5) -> None:
        super().__init__()

        def op() -> nn.Module:
            return (nn.Conv2d(width, width, 3, padding=1, bias=False) if spatial
                    else nn.Linear(width, width, bias=False))

        self.w1, self.w2 = op(), op()
        self.norm = nn.GroupNorm(groups, width, affine=False)
        self.max_norm = max_norm
        for w in (self.w1.weight, self.w2.weight):
            nn.init.normal_(w, std=0.01)

    def extra_repr(self) -> str:
        return f"max_norm={self.max_norm}"

    def _apply_op(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        if self.max_norm is not None:
            w = w * (self.max_norm / w.norm().clamp_min(self.max_norm))
        return F.conv2d(h, w, padding=1) if isinstance(layer, nn.Conv2d) else F.linear(h, w)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.norm(F.relu(u + self._apply_op(self.w2, F.relu(self._apply_op(self.w1, z)))))


class ImplicitImagePrompt(nn.Module):
    """P₁ without its identity path: ``R₁(x)`` = read-out of ``z* = f(z*, inject(x))``.

    Example:
        >>> p = ImplicitImagePrompt(3, width=8, stride=2, groups=4)
        >>> p(torch.randn(2, 3, 15, 16)).shape  # any size: the read-out is cropped to the input
        torch.Size([2, 3, 15, 16])
        >>> float(p(torch.randn(1, 3, 8, 8)).detach().abs().max())  # zero read-out at init
        0.0
    """

    def __init__(self, in_chans: int, width: int, stride: int, groups: int,
                 max_norm: float | None = 0.5, **deq_kwargs: Any) -> None:
        super().__init__()
        self.inject = nn.Sequential(nn.Conv2d(in_chans, width, 3, stride=stride, padding=1),
                                    nn.GroupNorm(groups, width, affine=False))
        self.deq = DEQ(EquilibriumCell(width, groups, spatial=True, max_norm=max_norm),
                       **deq_kwargs)
        self.readout = nn.Conv2d(width, in_chans * stride * stride, 1)
        self.shuffle = nn.PixelShuffle(stride)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.deq(self.inject(x))
        return self.shuffle(self.readout(z))[..., :x.shape[-2], :x.shape[-1]]


class ImplicitFeaturePrompt(nn.Module):
    """P₂ and its projection without the identity path: ``R₂(F) = MLP(z*)``,
    ``z* = f(z*, inject(F))``.

    Example:
        >>> p = ImplicitFeaturePrompt(32, width=16, groups=4)
        >>> p(torch.randn(2, 32)).shape
        torch.Size([2, 32])
    """

    def __init__(self, dim: int, width: int, groups: int, max_norm: float | None = 0.5,
                 **deq_kwargs: Any) -> None:
        super().__init__()
        self.inject = nn.Sequential(nn.Linear(dim, width),
                                    nn.GroupNorm(groups, width, affine=False))
        self.deq = DEQ(EquilibriumCell(width, groups, spatial=False, max_norm=max_norm),
                       **deq_kwargs)
        self.proj = nn.Linear(width, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim != 2:
            raise ValueError(f"LION's P2 reads pooled features (B, C), got shape "
                             f"{tuple(feats.shape)}: build the model with a global pool")
        return self.proj(self.deq(self.inject(feats)))


class BlendGate(nn.Module):
    """``α·a + β·b`` with ``(α, β) = softmax(g_α, g_β)`` (paper Eq. 3); β starts at ``beta``.

    Example:
        >>> g = BlendGate(beta=0.25)
        >>> round(g.beta.item(), 4), g(torch.zeros(1), torch.ones(1)).item()
        (0.25, 0.25)
    """

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.0, math.log(beta / (1 - beta))]))

    @property
    def alpha(self) -> torch.Tensor:
        return self.logits.softmax(0)[0]

    @property
    def beta(self) -> torch.Tensor:
        return self.logits.softmax(0)[1]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.logits.softmax(0).to(a.dtype)
        return alpha * a + beta * b


class LionPrompts(AdapterModule):
    """Everything LION adds to a model, kept as one child (``model.lion``) so that it is all
    adapter state: P₁ with its gate, P₂ with its projection and gate.

    Example:
        >>> lion = LionPrompts(LionConfig(), in_chans=3, feature_dim=16)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.equal(lion.prompt_input(x), x)  # identity at initialisation
        True
    """

    def __init__(self, config: LionConfig, in_chans: int, feature_dim: int) -> None:
        super().__init__()
        self.identity_prompt = config.identity_prompt
        deq_kwargs = config.deq_kwargs()
        self.p1 = self.gate1 = self.p2 = self.gate2 = None
        if config.use_p1:
            self.p1 = ImplicitImagePrompt(in_chans, config.p1_width, config.p1_stride,
                                          config.norm_groups, config.cell_max_norm, **deq_kwargs)
            self.gate1 = BlendGate(config.gate_init)
        if config.use_p2:
            self.p2 = ImplicitFeaturePrompt(feature_dim, config.p2_width, config.norm_groups,
                                            config.cell_max_norm, **deq_kwargs)
            self.gate2 = BlendGate(config.gate_init)

    def _blend(self, gate: BlendGate, base: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if self.identity_prompt:  # α·x + β·(x + R) = x + β·R, exactly x while R = 0
            return base + gate.beta.to(base.dtype) * branch
        return gate(base, branch)

    def prompt_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x̃ = α₁·x + β₁·P₁(x)`` (paper Eq. 1); ``x`` unchanged without P₁."""
        return x if self.p1 is None else self._blend(self.gate1, x, self.p1(x))

    def blend_features(self, feats: torch.Tensor) -> torch.Tensor:
        """``z̃ = α₂·F + β₂·MLP(P₂(F))`` (paper Eq. 2); ``F`` unchanged without P₂."""
        return feats if self.p2 is None else self._blend(self.gate2, feats, self.p2(feats))

    def deqs(self) -> dict[str, DEQ]:
        """The equilibrium layers by prompt name (``"p1"``, ``"p2"``)."""
        return {n: p.deq for n, p in (("p1", self.p1), ("p2", self.p2)) if p is not None}

    def solver_stats(self) -> dict[str, float]:
        """Solver statistics for logging, e.g. ``{"p1/forward_mean_iterations": 7.5, ...}``."""
        return {f"{n}/{k}": v for n, d in self.deqs().items() for k, v in d.stats().items()}

    def reset_solver_stats(self) -> None:
        """Zero the solver counters of both prompts (e.g. at the start of an epoch)."""
        for d in self.deqs().values():
            d.reset_stats()


# ----------------------------------------------------------------------------------------------
# Surgery: a cached subclass of the model's own timm class routes forward through the prompts
# ----------------------------------------------------------------------------------------------

class _LionForward:
    """Put in front of a timm model class: P₁ before ``forward_features``, P₂ and the blend
    between the pooled features and the classifier in ``forward_head``."""

    _lion_base: type

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward_features(self.lion.prompt_input(x), *args, **kwargs)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        z = self.lion.blend_features(super().forward_head(x, pre_logits=True))
        return z if pre_logits else self.get_classifier()(z)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # the backbone sees the prompted image here too, so features_only and feature taps
        # describe the same forward as model(x)
        return super().forward_intermediates(self.lion.prompt_input(x), *args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the generated class is not importable by name: pickle/deepcopy rebuild it from the
        # (importable) timm class instead
        _, _, *rest = super().__reduce_ex__(protocol)
        return (_new_lion_model, (self._lion_base,), *rest)


_LION_CLASSES: dict[type, type] = {}


def lion_class(base: type) -> type:
    """The (cached) subclass of timm model class ``base`` that runs LION's forward.

    Example:
        >>> from timm.models.resnet import ResNet
        >>> issubclass(lion_class(ResNet), ResNet), lion_class(ResNet) is lion_class(ResNet)
        (True, True)
    """
    if base not in _LION_CLASSES:
        _LION_CLASSES[base] = type(f"Lion{base.__name__}", (_LionForward, base),
                                   {"_lion_base": base, "__module__": __name__})
    return _LION_CLASSES[base]


def _new_lion_model(base: type) -> nn.Module:
    cls = lion_class(base)
    return cls.__new__(cls)


def _in_chans(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"LION's P1 needs the image channels, but {type(model).__name__} has no "
                         "Conv2d stem to read them from; use LionConfig(use_p1=False)")
    return conv.in_channels


@register_method
class Lion(PeftMethod):
    """LION: implicit prompt layers at both ends of a frozen backbone + robust training."""

    name = "lion"
    config_cls = LionConfig
    families = None
    description = "LION: deep-equilibrium prompts on the image and the features, robust training"

    def apply(self, model: nn.Module, config: LionConfig) -> nn.Module:
        missing = [a for a in ("forward_features", "forward_head", "get_classifier")
                   if not callable(getattr(model, a, None))]
        if missing:
            raise ValueError(f"LION needs a timm model with forward_features, forward_head and "
                             f"get_classifier; {type(model).__name__} lacks {missing}")
        if not isinstance(model.get_classifier(), nn.Module):
            raise ValueError(f"LION needs a single classifier module; {type(model).__name__}."
                             f"get_classifier() returned {type(model.get_classifier()).__name__} "
                             "(a distilled model?)")
        if hasattr(model, "lion"):
            raise ValueError(f"{type(model).__name__} already has an attribute 'lion'")
        dim = getattr(model, "head_hidden_size", None) or model.num_features
        ref = next(model.parameters())
        model.lion = LionPrompts(config, _in_chans(model) if config.use_p1 else 0, dim).to(
            device=ref.device, dtype=ref.dtype)
        model.__class__ = lion_class(type(model))
        return model

    def unload(self, model: nn.Module) -> nn.Module:
        model.__class__ = model._lion_base
        del model.lion
        return model

    def training_hooks(self, model: nn.Module) -> dict[str, Any]:
        config: LionConfig = model.peft_config
        prompts: LionPrompts = model.lion

        def metrics(reset: bool) -> dict[str, float]:
            # the solver statistics of the epoch: how hard the equilibria were to find
            if reset:
                prompts.reset_solver_stats()
                return {}
            return prompts.solver_stats()

        hooks: dict[str, Any] = {"metrics": metrics}
        if config.robust:
            def wrap(optimizer: torch.optim.Optimizer, model: nn.Module) -> RobustOptimizer:
                return RobustOptimizer(optimizer, tau=config.robust_tau,
                                       scope=config.robust_scope, shrink=config.robust_shrink)
            hooks["optimizer_wrapper"] = wrap
        return hooks


register_preset("lion_no_p1", "lion", use_p1=False)
register_preset("lion_no_p2", "lion", use_p2=False)
register_preset("lion_no_robust", "lion", robust=False)


# ----------------------------------------------------------------------------------------------
# Robust training (paper Eq. 7-11)
# ----------------------------------------------------------------------------------------------

class RobustOptimizer(torch.optim.Optimizer):
    """LION's robust update around any torch optimiser (paper Eq. 7-11).

    Each :meth:`step`, for every parameter element with a gradient: criticality
    ``c = |∂L/∂θ ⊙ θ|`` (Eq. 7); the ``floor(tau·n)`` elements of lowest ``c`` are non-crucial
    (Eq. 9; ``n`` counts the elements of one tensor for ``scope="tensor"``, of all tensors for
    ``scope="global"``; ties are broken by position). Crucial elements get the wrapped optimiser's
    update (Eq. 10, with e.g. Adam in place of SGD as in the paper's experiments); non-crucial ones
    are shrunk toward zero instead, ``θ ← sign(θ)·max(|θ| - η, 0)`` (Eq. 11 without overshooting
    zero), ``η = shrink × the group's learning rate``.

    Optimiser state: the wrapped optimiser sees every element's true gradient, so its state
    (e.g. Adam's moments and step count) keeps tracking all elements; for non-crucial elements
    only its write to the parameter is replaced by the shrink. An element that reaches exactly
    zero has zero criticality and stays there while it is ranked non-crucial (lottery-ticket
    pruning). ``param_groups``, ``state``, ``state_dict`` and ``zero_grad`` are the wrapped
    optimiser's, so LR schedulers and checkpoints work unchanged.

    Example:
        >>> p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        >>> opt = RobustOptimizer(torch.optim.SGD([p], lr=0.1), tau=0.5)
        >>> p.grad = torch.tensor([0.1, 0.1, 0.1, 1.0])  # c = [0.1, 0.2, 0.05, 3.0]
        >>> opt.step(); p.data
        tensor([ 0.9000, -2.0100,  0.4000,  2.9000])
    """

    def __init__(self, optimizer: torch.optim.Optimizer, tau: float = 0.4, scope: str = "tensor",
                 shrink: float = 1.0) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"RobustOptimizer wraps a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if not 0 <= tau < 1:
            raise ValueError(f"RobustOptimizer tau must be in [0, 1), got {tau!r}")
        if scope not in ("tensor", "global"):
            raise ValueError(f"RobustOptimizer scope must be 'tensor' or 'global', got {scope!r}")
        if shrink < 0:
            raise ValueError(f"RobustOptimizer shrink must be >= 0, got {shrink!r}")
        # not Optimizer.__init__: parameters, groups and state all belong to the wrapped optimiser
        self.optimizer = optimizer
        self.tau, self.scope, self.shrink = tau, scope, shrink
        self.defaults = optimizer.defaults
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                      "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                      "_optimizer_load_state_dict_pre_hooks",
                      "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, OrderedDict())
        self._patch_step_function()
        #: fraction of elements treated as non-crucial at the last step
        self.last_noncrucial_fraction = 0.0

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    def __repr__(self) -> str:
        return (f"RobustOptimizer(tau={self.tau}, scope={self.scope!r}, shrink={self.shrink}, "
                f"optimizer={self.optimizer!r})")

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def noncrucial_masks(self, params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Boolean masks of the non-crucial elements of ``params`` (which all have gradients)."""
        params = list(params)
        crit = [(p.grad * p).abs().flatten() for p in params]
        if self.scope == "global" and crit:
            flat = _lowest(torch.cat([c.float() for c in crit]), self.tau)
            masks = list(flat.split([c.numel() for c in crit]))
        else:
            masks = [_lowest(c, self.tau) for c in crit]
        return [m.view_as(p) for m, p in zip(masks, params)]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p, _ in entries):
            raise RuntimeError("RobustOptimizer does not support sparse gradients")
        masks = self.noncrucial_masks(p for p, _ in entries)
        before = [p.detach().clone() for p, _ in entries]
        self.optimizer.step()
        total = noncrucial = 0
        for (p, group), mask, old in zip(entries, masks, before):
            eta = self.shrink * float(group["lr"])
            shrunk = old.sign() * (old.abs() - eta).clamp_min(0)
            p.copy_(torch.where(mask, shrunk, p))
            total += mask.numel()
            noncrucial += int(mask.sum())
        self.last_noncrucial_fraction = noncrucial / total if total else 0.0
        return loss


def _lowest(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the ``floor(fraction·n)`` smallest entries of a 1-D tensor (ties by position)."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    k = math.floor(fraction * values.numel() + 1e-9)  # 0.29·100 is 28.999…
    if k:
        mask[torch.argsort(values, stable=True)[:k]] = True
    return mask
