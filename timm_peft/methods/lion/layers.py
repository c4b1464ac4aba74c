"""LION's layers: the equilibrium cell, the two implicit prompts and their blend gates."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...deq import DEQ
from ...layers.swap import AdapterModule
from .config import LionConfig

__all__ = ["EquilibriumCell", "ImplicitImagePrompt", "ImplicitFeaturePrompt", "BlendGate",
           "LionPrompts"]


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

    A model whose classifiers read features of several widths (CrossViT: one head per branch)
    gets one P₂ and gate per further width in ``p2_extra`` / ``gate2_extra`` (keyed by width);
    ``p2``/``gate2`` serve ``feature_dim``.

    Example:
        >>> lion = LionPrompts(LionConfig(), in_chans=3, feature_dim=16)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.equal(lion.prompt_input(x), x)  # identity at initialisation
        True
    """

    def __init__(self, config: LionConfig, in_chans: int, feature_dim: int,
                 extra_dims: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.identity_prompt = config.identity_prompt
        deq_kwargs = config.deq_kwargs()
        self.p1 = self.gate1 = self.p2 = self.gate2 = None
        self.p2_extra = self.gate2_extra = None
        if config.use_p1:
            self.p1 = ImplicitImagePrompt(in_chans, config.p1_width, config.p1_stride,
                                          config.norm_groups, config.cell_max_norm, **deq_kwargs)
            self.gate1 = BlendGate(config.gate_init)
        if config.use_p2:
            def p2(dim: int) -> ImplicitFeaturePrompt:
                return ImplicitFeaturePrompt(dim, config.p2_width, config.norm_groups,
                                             config.cell_max_norm, **deq_kwargs)
            self.p2, self.gate2 = p2(feature_dim), BlendGate(config.gate_init)
            extra = [d for d in dict.fromkeys(extra_dims) if d != feature_dim]  # classifier order
            if extra:
                self.p2_extra = nn.ModuleDict({str(d): p2(d) for d in extra})
                self.gate2_extra = nn.ModuleDict({str(d): BlendGate(config.gate_init)
                                                  for d in extra})

    def _blend(self, gate: BlendGate, base: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if self.identity_prompt:  # α·x + β·(x + R) = x + β·R, exactly x while R = 0
            return base + gate.beta.to(base.dtype) * branch
        return gate(base, branch)

    def prompt_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x̃ = α₁·x + β₁·P₁(x)`` (paper Eq. 1); ``x`` unchanged without P₁."""
        return x if self.p1 is None else self._blend(self.gate1, x, self.p1(x))

    def feature_dims(self) -> list[int]:
        """The feature widths P₂ serves (empty without P₂)."""
        if self.p2 is None:
            return []
        extra = [int(d) for d in self.p2_extra] if self.p2_extra is not None else []
        return [self.p2.proj.out_features, *extra]

    def blend_features(self, feats: torch.Tensor) -> torch.Tensor:
        """``z̃ = α₂·F + β₂·MLP(P₂(F))`` (paper Eq. 2) for pooled features ``(B, C)``, with the
        P₂ of width ``C``; ``F`` unchanged without P₂."""
        if self.p2 is None:
            return feats
        width = feats.shape[-1]
        if width == self.p2.proj.out_features:
            return self._blend(self.gate2, feats, self.p2(feats))
        if self.p2_extra is not None and str(width) in self.p2_extra:
            key = str(width)
            return self._blend(self.gate2_extra[key], feats, self.p2_extra[key](feats))
        raise ValueError(f"LION's P2 serves features of width {self.feature_dims()}, got "
                         f"shape {tuple(feats.shape)}")

    def blend_classifier_input(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`blend_features` for what a classifier reads: pooled ``(B, C)``, a 1×1 map
        ``(B, C, 1, 1)`` (1×1-conv classifiers: BiT, DLA, DPN) or tokens ``(B, N, C)`` (auxiliary
        token heads such as VOLO's, where P₂ acts on every token)."""
        if x.ndim == 2:
            return self.blend_features(x)
        if x.ndim == 4 and x.shape[-2:] == (1, 1):
            return self.blend_features(x.flatten(1)).view(x.shape)
        if x.ndim == 3:
            return self.blend_features(x.reshape(-1, x.shape[-1])).view(x.shape)
        raise ValueError(f"LION's P2 reads pooled features (B, C), got shape {tuple(x.shape)}: "
                         "build the model with a global pool")

    def blend_pre_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The pre-logits ``forward_head(pre_logits=True)`` returns with LION: blended with the P₂
        of their width, or, where they concatenate the inputs of classifiers of several widths
        (CrossViT), each part with its own."""
        dims = self.feature_dims()
        if feats.ndim != 2 or len(dims) < 2 or feats.shape[-1] in dims:
            return self.blend_classifier_input(feats)
        parts = feats.split(dims, dim=-1) if feats.shape[-1] == sum(dims) else None
        if parts is None:
            raise ValueError(f"LION's P2 serves features of width {dims} (or their "
                             f"concatenation), got shape {tuple(feats.shape)}")
        return torch.cat([self.blend_features(p) for p in parts], dim=-1)

    def deqs(self) -> dict[str, DEQ]:
        """The equilibrium layers by prompt name (``"p1"``, ``"p2"``, ``"p2_<width>"``)."""
        out = {n: p.deq for n, p in (("p1", self.p1), ("p2", self.p2)) if p is not None}
        if self.p2_extra is not None:
            out.update({f"p2_{d}": p.deq for d, p in self.p2_extra.items()})
        return out

    def solver_stats(self) -> dict[str, float]:
        """Solver statistics for logging, e.g. ``{"p1/forward_mean_iterations": 7.5, ...}``."""
        return {f"{n}/{k}": v for n, d in self.deqs().items() for k, v in d.stats().items()}

    def reset_solver_stats(self) -> None:
        """Zero the solver counters of both prompts (e.g. at the start of an epoch)."""
        for d in self.deqs().values():
            d.reset_stats()
