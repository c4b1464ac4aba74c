"""Deep-equilibrium layers: fixed-point solvers and implicit differentiation.

A deep-equilibrium (DEQ) layer (Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019)
outputs the fixed point ``z* = f(z*, u)`` of a small cell ``f`` driven by an input injection
``u``. :class:`DEQ` finds ``z*`` with a solver run *without* autograd, so training memory does
not depend on how many iterations the solver takes, and gets gradients by implicit
differentiation (LION, Wang et al. AAAI 2024, Eq. 5-6): for an upstream gradient ``y = dL/dz*``
the adjoint ``g = (I - J)^-T y``, ``J = ∂f/∂z`` at ``z*``, is itself the fixed point of
``g = Jᵀg + y``; it is solved iteratively with vector-Jacobian products of one re-evaluated
``f`` step, and ``dL/d(u, θ) = (∂f/∂(u, θ))ᵀ g``. A cheaper "phantom" gradient (Geng et al.,
"On Training Implicit Models", NeurIPS 2021) back-propagates through ``k`` damped steps
``z ← (1-λ)z + λf(z, u)`` taken from the detached ``z*`` instead.

Choices made here (all exposed as arguments):

* Convergence is measured per sample: the relative residual ``‖f(z)-z‖ / ‖z‖`` of each batch
  element, and the solver stops when the *largest* one is below ``tol``. Each sample keeps its
  best iterate (lowest residual), so a late oscillation never makes the answer worse.
* Anderson acceleration (Walker & Ni 2011) mixes the last ``m`` iterates per sample; its small
  least-squares system is regularised relative to its own scale and solved in float64.
* Non-convergence is never silent: every forward and backward solve is recorded in
  :class:`SolverStats`, counted in :attr:`DEQ.counters`, and the first non-converged solve of a
  layer issues a :class:`DEQConvergenceWarning`; a non-finite result raises
  ``FloatingPointError``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["DEQ", "SolverStats", "DEQCounters", "DEQConvergenceWarning", "anderson",
           "fixed_point_iteration", "SOLVERS", "relative_residual"]

Solver = Callable[..., tuple[torch.Tensor, "SolverStats"]]


class DEQConvergenceWarning(RuntimeWarning):
    """A fixed-point solve stopped at its iteration cap before reaching its tolerance."""


@dataclass(frozen=True)
class SolverStats:
    """Outcome of one solve: iterations (evaluations of the map), the largest per-sample
    relative residual of the returned point, and whether it is below the tolerance."""

    iterations: int
    residual: float
    converged: bool


@dataclass
class DEQCounters:
    """Running totals for logging; :meth:`reset` them e.g. once per epoch.

    Example:
        >>> c = DEQCounters(); c.add(SolverStats(7, 1e-4, True)); c.mean_iterations
        7.0
    """

    solves: int = 0
    iterations: int = 0
    nonconverged: int = 0
    last: SolverStats | None = field(default=None)

    def add(self, stats: SolverStats) -> None:
        self.solves += 1
        self.iterations += stats.iterations
        self.nonconverged += not stats.converged
        self.last = stats

    @property
    def mean_iterations(self) -> float:
        return self.iterations / self.solves if self.solves else 0.0

    def reset(self) -> None:
        self.solves = self.iterations = self.nonconverged = 0
        self.last = None


def relative_residual(fz: torch.Tensor, z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Per-sample ``‖f(z) - z‖ / ‖z‖`` of batched tensors ``(B, ...)``, shape ``(B,)``.

    Example:
        >>> relative_residual(torch.ones(2, 4) * 1.1, torch.ones(2, 4))
        tensor([0.1000, 0.1000])
    """
    fz, z = fz.reshape(fz.shape[0], -1).float(), z.reshape(z.shape[0], -1).float()
    return (fz - z).norm(dim=1) / (z.norm(dim=1) + eps)


class _Best:
    """Per-sample best iterate seen so far (lowest relative residual)."""

    def __init__(self, z0: torch.Tensor) -> None:
        self.z = z0.clone()
        self.res = torch.full((z0.shape[0],), math.inf, device=z0.device)

    def update(self, z: torch.Tensor, res: torch.Tensor) -> float:
        better = res < self.res
        self.res = torch.where(better, res, self.res)
        self.z[better] = z[better]
        return float(self.res.max())


def _finish(best: _Best, iterations: int, tol: float) -> tuple[torch.Tensor, SolverStats]:
    worst = float(best.res.max())
    return best.z, SolverStats(iterations=iterations, residual=worst, converged=worst < tol)


@torch.no_grad()
def fixed_point_iteration(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
                          max_iter: int = 50, tol: float = 1e-3
                          ) -> tuple[torch.Tensor, SolverStats]:
    """Plain iteration ``z ← f(z)`` from ``z0`` (batched, first dim is the batch).

    Returns the iterate with the lowest residual per sample and its :class:`SolverStats`.

    Example:
        >>> z, s = fixed_point_iteration(lambda z: 0.5 * z + 1, torch.zeros(1, 3), tol=1e-6)
        >>> torch.allclose(z, torch.full((1, 3), 2.0), atol=1e-5), s.converged
        (True, True)
    """
    best, z, k = _Best(z0), z0, 0
    for k in range(1, max_iter + 1):
        fz = f(z)
        if best.update(z, relative_residual(fz, z)) < tol:
            break
        z = fz
    return _finish(best, k, tol)


@torch.no_grad()
def anderson(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
             max_iter: int = 50, tol: float = 1e-3, m: int = 5, lam: float = 1e-4,
             beta: float = 1.0) -> tuple[torch.Tensor, SolverStats]:
    """Anderson acceleration of ``z ← f(z)`` with memory ``m``, per sample of the batch.

    Each step takes the combination ``Σ αᵢ f(xᵢ)`` (damped by ``beta``) of the last ``m``
    iterates whose residuals ``f(xᵢ) - xᵢ`` combine to the least norm under ``Σ αᵢ = 1``; the
    normal equations get ``lam`` times their mean diagonal as ridge. The history is allocated once
    (``2·m`` copies of ``z``) and each step allocates at most a few more ``z``, so memory does not
    depend on ``max_iter``.

    Example:
        >>> A = torch.tensor([[0.9, 0.3], [-0.3, 0.9]])
        >>> z, s = anderson(lambda z: z @ A.T + 1, torch.zeros(4, 2), tol=1e-6)
        >>> s.converged, s.iterations < 20
        (True, True)
    """
    bsz, shape, dtype = z0.shape[0], z0.shape, z0.dtype
    # the history and the mixing stay in (at least) float32, also under autocast
    x0 = z0.reshape(bsz, -1).to(torch.promote_types(dtype, torch.float32))
    # ring buffers of f(xᵢ) and of the residuals f(xᵢ) - xᵢ (xᵢ = f(xᵢ) - residual): allocated
    # once, and nothing below allocates more than one z per iteration
    fs = x0.new_zeros(bsz, m, x0.shape[1])
    rs = torch.zeros_like(fs)
    best, k = _Best(x0), 0
    for k in range(1, max_iter + 1):
        i = k - 1
        if i == 0:
            x = x0
        elif i == 1:
            x = fs[:, 0].clone()
        else:
            with torch.autocast(x0.device.type, enabled=False):
                x = _anderson_mix(fs, rs, min(i, m), lam, beta)
        slot = i % m
        fx = f(x.view(shape).to(dtype)).reshape(bsz, -1).to(fs.dtype)
        fs[:, slot] = fx
        rs[:, slot] = fx - x
        if best.update(x, relative_residual(fx, x)) < tol:
            break
    z, stats = _finish(best, k, tol)
    return z.view(shape).to(dtype), stats


def _anderson_mix(fs: torch.Tensor, rs: torch.Tensor, n: int, lam: float, beta: float
                  ) -> torch.Tensor:
    """Next Anderson iterate from the first ``n`` slots of ``fs`` (f(xᵢ)) and ``rs`` (residuals)."""
    bsz = fs.shape[0]
    gram = (rs[:, :n] @ rs[:, :n].transpose(1, 2)).double()
    ridge = lam * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
    gram = gram + ridge[:, None, None] * torch.eye(n, dtype=gram.dtype, device=gram.device)
    # min ‖Σ αᵢ rᵢ‖ s.t. Σ αᵢ = 1  ⇔  α ∝ gram⁻¹·1
    alpha = torch.linalg.solve(gram, torch.ones(bsz, n, 1, dtype=gram.dtype, device=gram.device))
    alpha = (alpha / alpha.sum(1, keepdim=True)).to(fs.dtype).transpose(1, 2)  # (B, 1, n)
    # β·Σαf(x) + (1-β)·Σαx  =  Σαf(x) - (1-β)·Σα(f(x) - x)
    x = (alpha @ fs[:, :n])[:, 0]
    return x if beta == 1.0 else x - (1 - beta) * (alpha @ rs[:, :n])[:, 0]


#: solvers selectable by name in :class:`DEQ` (``solver=``)
SOLVERS: dict[str, Solver] = {"anderson": anderson, "fixed_point": fixed_point_iteration}


class _ImplicitFixedPoint(torch.autograd.Function):
    """``z* = f(z*, u)``: forward solves without autograd, backward solves the adjoint."""

    @staticmethod
    def forward(ctx, deq: "DEQ", u: torch.Tensor, z0: torch.Tensor,  # noqa: ANN001
                *params: torch.Tensor) -> torch.Tensor:
        z = deq._solve(lambda v: deq.f(v, u), z0, backward=False)
        ctx.deq = deq
        ctx.save_for_backward(z, u)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        deq: DEQ = ctx.deq
        z_star, u = ctx.saved_tensors
        params = [p for p in deq.f.parameters()]
        wants_u, wants_p = ctx.needs_input_grad[1], ctx.needs_input_grad[3:]
        with torch.enable_grad():
            z = z_star.detach().requires_grad_()
            u_ = u.detach().requires_grad_(wants_u)
            fz = deq.f(z, u_)  # the one f step whose vector-Jacobian products solve the adjoint

            def adjoint_step(g: torch.Tensor) -> torch.Tensor:
                return torch.autograd.grad(fz, z, g, retain_graph=True)[0] + grad

            g = deq._solve(adjoint_step, grad, backward=True)
            targets = ([u_] if wants_u else []) + [p for p, w in zip(params, wants_p) if w]
            grads = list(torch.autograd.grad(fz, targets, g, allow_unused=True)) if targets else []
        grad_u = grads.pop(0) if wants_u else None
        grad_params = [grads.pop(0) if w else None for w in wants_p]
        return (None, grad_u, None, *grad_params)


class DEQ(nn.Module):
    """A deep-equilibrium layer: ``forward(u)`` returns ``z* = f(z*, u)``.

    Args:
        f: the cell, called as ``f(z, u)``; it must return a tensor shaped like ``z`` and should be
            a contraction in ``z`` (e.g. end in a normalisation, start with small weights).
        solver: ``"anderson"`` (default) or ``"fixed_point"`` (plain iteration); used for both the
            forward solve and the adjoint solve.
        max_iter / eval_max_iter: iteration caps in training / eval mode (eval defaults to
            ``max_iter``).
        tol: stop when every sample's relative residual ``‖f(z)-z‖/‖z‖`` is below it.
        backward: ``"implicit"`` (exact gradient at ``z*``, the adjoint solved with
            ``backward_max_iter`` / ``backward_tol``) or ``"phantom"`` (back-propagate through
            ``phantom_steps`` steps ``z ← (1-λ)z + λf(z, u)``, ``λ = phantom_damping``).
        anderson_m / anderson_lam / anderson_beta: Anderson memory, relative ridge and damping.

    After every forward, :attr:`forward_stats` / :attr:`backward_stats` count the solves
    (:class:`DEQCounters`, with the ``last`` :class:`SolverStats`); :meth:`stats` flattens them.

    Example:
        >>> class Cell(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.lin = nn.Linear(4, 4)
        ...     def forward(self, z, u):
        ...         return torch.tanh(0.5 * self.lin(z) + u)
        >>> deq = DEQ(Cell(), tol=1e-5)
        >>> u = torch.randn(3, 4, requires_grad=True)
        >>> z = deq(u); z.sum().backward()
        >>> deq.forward_stats.last.converged and u.grad is not None
        True
    """

    def __init__(self, f: nn.Module, *, solver: str = "anderson", max_iter: int = 30,
                 eval_max_iter: int | None = None, tol: float = 1e-3, backward: str = "implicit",
                 backward_max_iter: int = 30, backward_tol: float = 1e-3, phantom_steps: int = 1,
                 phantom_damping: float = 1.0, anderson_m: int = 5, anderson_lam: float = 1e-4,
                 anderson_beta: float = 1.0) -> None:
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"DEQ solver must be one of {sorted(SOLVERS)}, got {solver!r}")
        if backward not in ("implicit", "phantom"):
            raise ValueError(f"DEQ backward must be 'implicit' or 'phantom', got {backward!r}")
        for name, v in (("max_iter", max_iter), ("backward_max_iter", backward_max_iter),
                        ("phantom_steps", phantom_steps), ("anderson_m", anderson_m),
                        ("eval_max_iter", max_iter if eval_max_iter is None else eval_max_iter)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DEQ {name} must be an integer >= 1, got {v!r}")
        if not 0 < phantom_damping <= 1:
            raise ValueError(f"DEQ phantom_damping must be in (0, 1], got {phantom_damping!r}")
        self.f = f
        self.solver = solver
        self.max_iter, self.eval_max_iter = max_iter, eval_max_iter or max_iter
        self.tol, self.backward = tol, backward
        self.backward_max_iter, self.backward_tol = backward_max_iter, backward_tol
        self.phantom_steps, self.phantom_damping = phantom_steps, phantom_damping
        self.anderson_kwargs = dict(m=anderson_m, lam=anderson_lam, beta=anderson_beta)
        self.forward_stats = DEQCounters()
        self.backward_stats = DEQCounters()
        self._warned = False

    def extra_repr(self) -> str:
        return (f"solver={self.solver}, max_iter={self.max_iter}, eval_max_iter="
                f"{self.eval_max_iter}, tol={self.tol}, backward={self.backward}")

    def _solve(self, fn: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor,
               backward: bool) -> torch.Tensor:
        if backward:
            cap, tol = self.backward_max_iter, self.backward_tol
        else:
            cap, tol = (self.max_iter if self.training else self.eval_max_iter), self.tol
        kwargs = self.anderson_kwargs if self.solver == "anderson" else {}
        z, stats = SOLVERS[self.solver](fn, z0, max_iter=cap, tol=tol, **kwargs)
        what = "adjoint (backward)" if backward else "forward"
        if not math.isfinite(stats.residual):
            raise FloatingPointError(
                f"DEQ {what} solve produced non-finite values (solver={self.solver}, "
                f"{stats.iterations} iterations): the cell is not a contraction at this input; "
                "lower the learning rate or check the input for NaN/inf")
        (self.backward_stats if backward else self.forward_stats).add(stats)
        if not stats.converged and not self._warned:
            self._warned = True
            warnings.warn(
                f"DEQ {what} solve did not converge: relative residual {stats.residual:.2e} > "
                f"tol {tol:g} after {stats.iterations} iterations (solver={self.solver}); further "
                "non-converged solves are only counted in forward_stats/backward_stats."
                "nonconverged", DEQConvergenceWarning, stacklevel=3)
        return z

    def forward(self, u: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        """The equilibrium for injection ``u``, started from ``z0`` (default zeros like ``u``)."""
        z0 = torch.zeros_like(u) if z0 is None else z0.detach()
        params = [p for p in self.f.parameters()]
        needs_grad = torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad
                                                                         for p in params))
        if not needs_grad:
            with torch.no_grad():
                return self._solve(lambda v: self.f(v, u), z0, backward=False)
        if self.backward == "implicit":
            return _ImplicitFixedPoint.apply(self, u, z0, *params)
        with torch.no_grad():
            z = self._solve(lambda v: self.f(v, u), z0, backward=False)
        lam = self.phantom_damping
        for _ in range(self.phantom_steps):
            z = self.f(z, u) if lam == 1.0 else (1 - lam) * z + lam * self.f(z, u)
        return z

    def stats(self) -> dict[str, float]:
        """Flat dict of the solver statistics, ready for a logger.

        Example:
            >>> sorted(DEQ(nn.Identity()).stats())[:3]
            ['backward_mean_iterations', 'backward_nonconverged', 'backward_solves']
        """
        out: dict[str, float] = {}
        for name, c in (("forward", self.forward_stats), ("backward", self.backward_stats)):
            out[f"{name}_solves"] = c.solves
            out[f"{name}_mean_iterations"] = c.mean_iterations
            out[f"{name}_nonconverged"] = c.nonconverged
            if c.last is not None:
                out[f"{name}_last_iterations"] = c.last.iterations
                out[f"{name}_last_residual"] = c.last.residual
        return out

    def reset_stats(self) -> None:
        """Zero :attr:`forward_stats` and :attr:`backward_stats` (e.g. at each epoch)."""
        self.forward_stats.reset()
        self.backward_stats.reset()
