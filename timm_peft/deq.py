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
* Two ways to run the iterations: the early-exit loop stops as soon as every sample has
  converged, reading the residual on the host each iteration; the masked loop always runs the
  cap with every update masked off from the iteration at which the early-exit loop stops, so the
  result and the statistics are the same but there is no data-dependent Python control flow and
  no host synchronisation: ``torch.compile(fullgraph=True)`` and ``torch.export`` take the
  whole layer. ``loop="auto"`` (the default) picks per call: the masked loop while
  ``torch.compile`` or ``torch.export`` traces (:func:`torch.compiler.is_compiling`), the
  early-exit loop in eager, where the masked one would pay the cap's evaluations.
* Under :func:`torch.func.vmap` (per-sample routing, :meth:`DEQ.vmap_context`) each sample is
  its own solve, so the masked loop runs, but it still stops early in eager: once every sample
  of the whole vectorised batch has stopped, read through :func:`_any_over_batch`, a custom op
  whose batching rule reduces over the vectorised dimension. Each sample's result is the one it
  gets alone.
* Non-convergence is never silent: every forward and backward solve is recorded in
  :class:`SolverStats`, counted in :attr:`DEQ.counters`, and the first non-converged solve of a
  layer issues a :class:`DEQConvergenceWarning`; a non-finite result raises
  ``FloatingPointError``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn

__all__ = ["DEQ", "SolverStats", "SolveResult", "DEQCounters", "DEQConvergenceWarning", "anderson",
           "fixed_point_iteration", "SOLVERS", "LOOPS", "relative_residual"]

Solver = Callable[..., tuple[torch.Tensor, "SolverStats"]]


class DEQConvergenceWarning(RuntimeWarning):
    """A fixed-point solve stopped at its iteration cap before reaching its tolerance."""


@dataclass(frozen=True)
class SolverStats:
    """Outcome of one solve: iterations (evaluations of the map), the largest per-sample
    relative residual of the returned point, whether it is below the tolerance, and per sample
    the iteration at which its residual first fell below the tolerance (the total if never)."""

    iterations: int
    residual: float
    converged: bool
    sample_iterations: tuple[int, ...] = ()


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
    nonfinite: int = 0

    def add(self, stats: SolverStats) -> None:
        self.solves += 1
        self.iterations += stats.iterations
        self.nonconverged += not stats.converged
        self.last = stats

    @property
    def mean_iterations(self) -> float:
        return self.iterations / self.solves if self.solves else 0.0

    def reset(self) -> None:
        self.solves = self.iterations = self.nonconverged = self.nonfinite = 0
        self.last = None


def relative_residual(fz: torch.Tensor, z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Per-sample ``‖f(z) - z‖ / ‖z‖`` of batched tensors ``(B, ...)``, shape ``(B,)``.

    Example:
        >>> relative_residual(torch.ones(2, 4) * 1.1, torch.ones(2, 4))
        tensor([0.1000, 0.1000])
    """
    fz, z = fz.reshape(fz.shape[0], -1).float(), z.reshape(z.shape[0], -1).float()
    return (fz - z).norm(dim=1) / (z.norm(dim=1) + eps)


@torch.library.custom_op("timm_peft::any_over_batch", mutates_args=())
def _any_over_batch(flags: torch.Tensor) -> torch.Tensor:
    """Whether any element of ``flags`` is True, and under :func:`torch.func.vmap` whether any
    element of *any sample* is: the batching rule reduces over the vectorised dimension and
    returns an unbatched scalar, which the host may read inside ``vmap`` (a batched one it may
    not). The vectorised masked loop uses it to stop once every sample has stopped
    (``tests/test_deq.py``).
    """
    return flags.any()


@_any_over_batch.register_fake
def _(flags: torch.Tensor) -> torch.Tensor:
    return flags.new_empty((), dtype=torch.bool)


def _any_over_batch_vmap(info: Any, in_dims: tuple[int | None], flags: torch.Tensor
                         ) -> tuple[torch.Tensor, None]:
    return flags.any(), None  # every sample's elements at once; the result is not batched


_any_over_batch.register_vmap(_any_over_batch_vmap)


class _Best:
    """Per-sample best iterate seen so far (lowest relative residual) and, per sample, the
    iteration at which its best residual first fell below ``tol`` (0 while it has not).

    Only tensor operations (``torch.where``, no boolean indexing), so the masked loop has no
    data-dependent shapes; the early-exit loop uses the same arithmetic, hence the same results.
    """

    def __init__(self, z0: torch.Tensor, tol: float) -> None:
        self.z = z0.clone()
        self.res = torch.full((z0.shape[0],), math.inf, device=z0.device)
        self.first = torch.zeros(z0.shape[0], dtype=torch.long, device=z0.device)
        self.tol = tol

    def update(self, z: torch.Tensor, res: torch.Tensor, k: int,
               running: torch.Tensor | None) -> torch.Tensor:
        """Take ``z`` where it is better (and, masked, while ``running``); the worst best residual."""
        better = res < self.res
        if running is not None:
            better = better & running
        self.res = torch.where(better, res, self.res)
        self.z = torch.where(better.view(-1, *(1,) * (z.ndim - 1)), z, self.z)
        self.first = torch.where((self.first == 0) & (self.res < self.tol), k, self.first)
        return self.res.max()


class SolveResult(NamedTuple):
    """What a solver loop returns, all tensors (no host sync): the point, the number of map
    evaluations, the largest per-sample residual of the point, and per sample the iteration at
    which its residual first fell below the tolerance (the total if it never did)."""

    z: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    sample_iterations: torch.Tensor


class _Loop:
    """The two ways of running ``max_iter`` iterations with the same arithmetic.

    ``masked=False`` (early exit): a Python loop that stops once every sample's best residual is
    below ``tol``, reading that maximum on the host each iteration. ``masked=True``: always
    ``max_iter`` evaluations, but from the iteration at which the early-exit loop would stop
    nothing changes any more (``running`` turns False and gates every update), so the point and
    the statistics are those of the early-exit loop, without data-dependent Python control flow
    or host synchronisation: the loop compiles whole (``torch.compile(fullgraph=True)``) and
    exports (``torch.export``). ``exit_early=True`` (masked, in eager under ``vmap``) also stops
    once no sample of the vectorised batch is running any more, which changes no result.
    """

    def __init__(self, z0: torch.Tensor, tol: float, masked: bool,
                 exit_early: bool = False) -> None:
        self.best = _Best(z0, tol)
        self.tol, self.masked, self.exit_early = tol, masked, exit_early
        self.running = torch.ones((), dtype=torch.bool, device=z0.device) if masked else None
        self.iterations: torch.Tensor | int = (torch.zeros((), dtype=torch.long, device=z0.device)
                                               if masked else 0)

    def step(self, x: torch.Tensor, fx: torch.Tensor, k: int) -> bool:
        """Record iteration ``k`` (``fx = f(x)``); False when the early-exit loop stops here."""
        worst = self.best.update(x, relative_residual(fx, x), k, self.running)
        if not self.masked:
            self.iterations = k
            return not float(worst) < self.tol
        self.iterations = self.iterations + self.running.long()
        self.running = self.running & ~(worst < self.tol)  # NaN never counts as converged
        return not self.exit_early or bool(_any_over_batch(self.running))

    def keep(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``new`` while running, else ``old`` (masked); plainly ``new`` in the early-exit loop."""
        return new if self.running is None else torch.where(self.running, new, old)

    def result(self) -> SolveResult:
        best = self.best
        iterations = torch.as_tensor(self.iterations, device=best.z.device)
        return SolveResult(best.z, iterations, best.res.max(),
                           torch.where(best.first == 0, iterations, best.first))


def _stats(result: SolveResult, tol: float) -> SolverStats:
    worst = float(result.residual)
    return SolverStats(iterations=int(result.iterations), residual=worst, converged=worst < tol,
                       sample_iterations=tuple(result.sample_iterations.tolist()))


@torch.no_grad()
def _fixed_point(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
                 max_iter: int = 50, tol: float = 1e-3, masked: bool = False,
                 exit_early: bool = False) -> SolveResult:
    loop, z = _Loop(z0, tol, masked, exit_early), z0
    for k in range(1, max_iter + 1):
        fz = f(z)
        if not loop.step(z, fz, k):
            break
        z = loop.keep(fz, z)
    return loop.result()


@torch.no_grad()
def fixed_point_iteration(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
                          max_iter: int = 50, tol: float = 1e-3, masked: bool = False
                          ) -> tuple[torch.Tensor, SolverStats]:
    """Plain iteration ``z ← f(z)`` from ``z0`` (batched, first dim is the batch).

    Returns the iterate with the lowest residual per sample and its :class:`SolverStats`.
    ``masked=True`` runs the same iteration without early exit (see :class:`DEQ` ``loop``);
    the result is the same.

    Example:
        >>> z, s = fixed_point_iteration(lambda z: 0.5 * z + 1, torch.zeros(1, 3), tol=1e-6)
        >>> torch.allclose(z, torch.full((1, 3), 2.0), atol=1e-5), s.converged
        (True, True)
    """
    result = _fixed_point(f, z0, max_iter=max_iter, tol=tol, masked=masked)
    return result.z, _stats(result, tol)


@torch.no_grad()
def _anderson(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
              max_iter: int = 50, tol: float = 1e-3, m: int = 5, lam: float = 1e-4,
              beta: float = 1.0, masked: bool = False, exit_early: bool = False) -> SolveResult:
    bsz, shape, dtype = z0.shape[0], z0.shape, z0.dtype
    # the history and the mixing stay in (at least) float32, also under autocast
    x0 = z0.reshape(bsz, -1).to(torch.promote_types(dtype, torch.float32))
    # ring buffers of f(xᵢ) and of the residuals f(xᵢ) - xᵢ (xᵢ = f(xᵢ) - residual): allocated
    # once, and nothing below allocates more than a few z per iteration
    fs = x0.new_zeros(bsz, m, x0.shape[1])
    rs = torch.zeros_like(fs)
    loop, x = _Loop(x0, tol, masked, exit_early), x0
    for k in range(1, max_iter + 1):
        i = k - 1
        if i == 1:
            x = loop.keep(fs[:, 0].clone(), x)
        elif i > 1:
            with torch.autocast(x0.device.type, enabled=False):
                x = loop.keep(_anderson_mix(fs, rs, min(i, m), lam, beta, masked), x)
        slot = i % m
        fx = f(x.view(shape).to(dtype)).reshape(bsz, -1).to(fs.dtype)
        fs[:, slot] = loop.keep(fx, fs[:, slot])
        rs[:, slot] = loop.keep(fx - x, rs[:, slot])
        if not loop.step(x, fx, k):
            break
    result = loop.result()
    return result._replace(z=result.z.view(shape).to(dtype))


@torch.no_grad()
def anderson(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
             max_iter: int = 50, tol: float = 1e-3, m: int = 5, lam: float = 1e-4,
             beta: float = 1.0, masked: bool = False) -> tuple[torch.Tensor, SolverStats]:
    """Anderson acceleration of ``z ← f(z)`` with memory ``m``, per sample of the batch.

    Each step takes the combination ``Σ αᵢ f(xᵢ)`` (damped by ``beta``) of the last ``m``
    iterates whose residuals ``f(xᵢ) - xᵢ`` combine to the least norm under ``Σ αᵢ = 1``; the
    normal equations get ``lam`` times their mean diagonal as ridge. The history is allocated once
    (``2·m`` copies of ``z``) and each step allocates at most a few more ``z``, so memory does not
    depend on ``max_iter``. ``masked=True`` runs the same iteration without early exit (see
    :class:`DEQ` ``loop``); the result is the same.

    Example:
        >>> A = torch.tensor([[0.9, 0.3], [-0.3, 0.9]])
        >>> z, s = anderson(lambda z: z @ A.T + 1, torch.zeros(4, 2), tol=1e-6)
        >>> s.converged, s.iterations < 20
        (True, True)
    """
    result = _anderson(f, z0, max_iter=max_iter, tol=tol, m=m, lam=lam, beta=beta, masked=masked)
    return result.z, _stats(result, tol)


def _anderson_mix(fs: torch.Tensor, rs: torch.Tensor, n: int, lam: float, beta: float,
                  masked: bool = False) -> torch.Tensor:
    """Next Anderson iterate from the first ``n`` slots of ``fs`` (f(xᵢ)) and ``rs`` (residuals)."""
    bsz = fs.shape[0]
    gram = (rs[:, :n] @ rs[:, :n].transpose(1, 2)).double()
    ridge = lam * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
    gram = gram + ridge[:, None, None] * torch.eye(n, dtype=gram.dtype, device=gram.device)
    # min ‖Σ αᵢ rᵢ‖ s.t. Σ αᵢ = 1  ⇔  α ∝ gram⁻¹·1
    ones = torch.ones(bsz, n, 1, dtype=gram.dtype, device=gram.device)
    # the masked loop must not check for singular systems on the host (solve_ex: same LU solve,
    # no check); it only mixes while running, where the early-exit loop's check passed
    alpha = torch.linalg.solve_ex(gram, ones)[0] if masked else torch.linalg.solve(gram, ones)
    alpha = (alpha / alpha.sum(1, keepdim=True)).to(fs.dtype).transpose(1, 2)  # (B, 1, n)
    # β·Σαf(x) + (1-β)·Σαx  =  Σαf(x) - (1-β)·Σα(f(x) - x)
    x = (alpha @ fs[:, :n])[:, 0]
    return x if beta == 1.0 else x - (1 - beta) * (alpha @ rs[:, :n])[:, 0]


#: solvers selectable by name in :class:`DEQ` (``solver=``)
SOLVERS: dict[str, Solver] = {"anderson": anderson, "fixed_point": fixed_point_iteration}
_SOLVER_LOOPS: dict[str, Callable[..., SolveResult]] = {"anderson": _anderson,
                                                         "fixed_point": _fixed_point}
#: ways of running a solver's iterations (:class:`DEQ` ``loop=``)
LOOPS = ("auto", "early_exit", "masked")


class _ImplicitFixedPoint(torch.autograd.Function):
    """``z* = f(z*, u)``: forward solves without autograd, backward solves the adjoint.

    Returns ``(z*, iterations, residual)``; the last two (the forward solve's statistics) are not
    differentiable and are recorded by the caller, outside the function, so that a compiled graph
    has no side effect inside it.
    """

    @staticmethod
    def forward(ctx, deq: "DEQ", u: torch.Tensor, z0: torch.Tensor,  # noqa: ANN001
                *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        masked = deq._masked()
        result = deq._run(lambda v: deq.f(v, u), z0, backward=False, masked=masked)
        ctx.deq, ctx.masked = deq, masked
        # backward re-evaluates f: under the forward's autocast state, or the cell would see
        # low-precision activations next to float32 weights
        dev = u.device.type
        ctx.amp = dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
        ctx.save_for_backward(result.z, u, *params)
        ctx.mark_non_differentiable(result.iterations, result.residual)
        return result.z, result.iterations, result.residual

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor, *_: torch.Tensor):  # noqa: ANN001, ANN205
        deq: DEQ = ctx.deq
        z_star, u, *params = ctx.saved_tensors
        dev, amp, amp_dtype = ctx.amp
        if ctx.masked:
            with torch.autocast(dev, dtype=amp_dtype, enabled=amp):
                return (None, *_masked_adjoint(deq, grad, z_star, u, params,
                                               ctx.needs_input_grad))
        wants_u, wants_p = ctx.needs_input_grad[1], ctx.needs_input_grad[3:]
        with torch.enable_grad(), torch.autocast(dev, dtype=amp_dtype, enabled=amp):
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


def _masked_adjoint(deq: "DEQ", grad: torch.Tensor, z_star: torch.Tensor, u: torch.Tensor,
                    params: list[torch.Tensor], needs: tuple[bool, ...]) -> list[Any]:
    """The adjoint solve of the masked loop, with ``torch.func.vjp`` of one re-evaluated ``f``
    step (``torch.autograd.grad`` cannot be traced by ``torch.compile``); the adjoint's
    statistics are recorded only outside compiled code (a compiled backward has no side effect)."""
    names = [n for n, _ in deq.f.named_parameters()]

    def step(z: torch.Tensor, u_: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(deq.f, dict(zip(names, ps)), (z, u_))

    _, vjp = torch.func.vjp(step, z_star, u, *params)
    result = deq._run(lambda g: vjp(g)[0] + grad, grad, backward=True, masked=True)
    if not torch.compiler.is_compiling() and deq.__dict__.get("_record_stats", True):
        deq._record("backward", result, deq.backward_tol)
    _, grad_u, *grad_params = vjp(result.z)
    return [grad_u if needs[1] else None, None,
            *(g if w else None for g, w in zip(grad_params, needs[3:]))]


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
        loop: how the solver's iterations run (an attribute, may be changed at any time).
            ``"early_exit"``: a Python loop that stops as soon as every sample has converged;
            it reads the residual on the host every iteration, so ``torch.compile`` breaks the
            graph there. ``"masked"``: always the full cap, but from the iteration at which the
            early-exit loop stops every update is masked off, so the equilibrium, the iteration
            count and the residual are the same (the same arithmetic, bit for bit in eager), with
            no data-dependent Python control flow and no host synchronisation: the layer
            compiles whole (``torch.compile(fullgraph=True)``, inference and training) and
            exports (``torch.export``). It costs the cap's worth of ``f`` evaluations per solve
            in eager (``benchmarks/results/efficiency.md`` has the measured ratio). ``"auto"``
            (default): the masked loop while ``torch.compile``/``torch.export`` traces the
            layer (:func:`torch.compiler.is_compiling`), the early-exit loop in eager, so the
            default compiles whole and loses nothing in eager.

    After every forward, :attr:`forward_stats` / :attr:`backward_stats` count the solves
    (:class:`DEQCounters`, with the ``last`` :class:`SolverStats`); :meth:`stats` flattens them.
    Solves of the masked loop are counted in tensors (non-persistent buffers) and read only
    when asked for; a non-converged solve is then warned about when the counters are read, and a
    non-finite one is counted (``*_nonfinite``) rather than raised, since raising needs the host.
    Under ``torch.compile`` the adjoint (backward) solves of the masked loop are not counted.
    With ``"auto"`` the counters add up both kinds of solve (``last`` is the last eager one, or
    the last traced one if no solve ran in eager).

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
        >>> deq.loop = "masked"  # the loop "auto" traces: torch.compile(deq, fullgraph=True)
        >>> torch.equal(deq(u), z)
        True
    """

    def __init__(self, f: nn.Module, *, solver: str = "anderson", max_iter: int = 30,
                 eval_max_iter: int | None = None, tol: float = 1e-3, backward: str = "implicit",
                 backward_max_iter: int = 30, backward_tol: float = 1e-3, phantom_steps: int = 1,
                 phantom_damping: float = 1.0, anderson_m: int = 5, anderson_lam: float = 1e-4,
                 anderson_beta: float = 1.0, loop: str = "auto") -> None:
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
        self.loop = loop
        self._check_loop()
        self.max_iter, self.eval_max_iter = max_iter, eval_max_iter or max_iter
        self.tol, self.backward = tol, backward
        self.backward_max_iter, self.backward_tol = backward_max_iter, backward_tol
        self.phantom_steps, self.phantom_damping = phantom_steps, phantom_damping
        self.anderson_kwargs = dict(m=anderson_m, lam=anderson_lam, beta=anderson_beta)
        self._counters = {"forward": DEQCounters(), "backward": DEQCounters()}
        # the masked loop's counters: [solves, iterations, nonconverged, nonfinite,
        # last iterations] and the last residual, per direction; never saved with the model
        for which in ("forward", "backward"):
            self.register_buffer(f"_{which}_counts", torch.zeros(5, dtype=torch.long),
                                 persistent=False)
            self.register_buffer(f"_{which}_last_residual", torch.zeros(1), persistent=False)
        self._warned = False

    @contextlib.contextmanager
    def vmap_context(self) -> Iterator[None]:
        """Make the forward safe for :func:`torch.func.vmap` inside the block.

        Per-sample routing (:func:`timm_peft.route`) vectorises the model's forward over the
        batch. The early-exit loop reads a batched residual on the host (``.item()``), which
        ``vmap`` cannot do, so the block uses the masked loop (same iterates, every sample stops
        at its own tolerance), which in eager still stops once every sample of the whole batch
        has stopped (:func:`_any_over_batch`): a routed batch pays its slowest sample's
        iterations, as a batch of one adapter does, not the cap. The statistics counters are
        left alone (they are updated in place, and a vectorised solve has one set of statistics
        per sample).
        """
        vmapped = self.__dict__.get("_vmapped", False)
        record = self.__dict__.get("_record_stats", True)
        self._vmapped, self._record_stats = True, False
        try:
            yield
        finally:
            self._vmapped, self._record_stats = vmapped, record

    def extra_repr(self) -> str:
        return (f"solver={self.solver}, max_iter={self.max_iter}, eval_max_iter="
                f"{self.eval_max_iter}, tol={self.tol}, backward={self.backward}, loop={self.loop}")

    def _check_loop(self) -> None:
        if self.loop not in LOOPS:
            raise ValueError(f"DEQ loop must be one of {list(LOOPS)}, got {self.loop!r}")

    def _cap_tol(self, backward: bool) -> tuple[int, float]:
        if backward:
            return self.backward_max_iter, self.backward_tol
        return (self.max_iter if self.training else self.eval_max_iter), self.tol

    def _masked(self) -> bool:
        """Whether this call runs the masked loop: asked for, vectorised (:meth:`vmap_context`),
        or ``"auto"`` while ``torch.compile``/``torch.export`` traces."""
        return (self.loop == "masked" or self.__dict__.get("_vmapped", False)
                or (self.loop == "auto" and torch.compiler.is_compiling()))

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor,
             backward: bool, masked: bool) -> SolveResult:
        """One solve; the early-exit loop also records it (and warns / raises) here."""
        if not masked:
            return SolveResult(self._solve(fn, z0, backward), *(torch.empty(()),) * 3)
        cap, tol = self._cap_tol(backward)
        kwargs = self.anderson_kwargs if self.solver == "anderson" else {}
        # vectorised in eager: stop once no sample runs (the host may read that flag here)
        exit_early = self.__dict__.get("_vmapped", False) and not torch.compiler.is_compiling()
        return _SOLVER_LOOPS[self.solver](fn, z0, max_iter=cap, tol=tol, masked=True,
                                          exit_early=exit_early, **kwargs)

    def _solve(self, fn: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor,
               backward: bool) -> torch.Tensor:
        cap, tol = self._cap_tol(backward)
        kwargs = self.anderson_kwargs if self.solver == "anderson" else {}
        z, stats = SOLVERS[self.solver](fn, z0, max_iter=cap, tol=tol, **kwargs)
        what = "adjoint (backward)" if backward else "forward"
        if not math.isfinite(stats.residual):
            raise FloatingPointError(
                f"DEQ {what} solve produced non-finite values (solver={self.solver}, "
                f"{stats.iterations} iterations): the cell is not a contraction at this input; "
                "lower the learning rate or check the input for NaN/inf")
        self._counters["backward" if backward else "forward"].add(stats)
        if not stats.converged:
            self._warn(what, f"relative residual {stats.residual:.2e} > tol {tol:g} after "
                             f"{stats.iterations} iterations")
        return z

    def _warn(self, what: str, detail: str) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"DEQ {what} solve did not converge: {detail} (solver={self.solver}); further "
            "non-converged solves are only counted in forward_stats/backward_stats.nonconverged",
            DEQConvergenceWarning, stacklevel=4)

    def _record(self, which: str, result: SolveResult, tol: float) -> None:
        """Add a masked solve to the tensor counters (in place: no host sync, compiles)."""
        counts: torch.Tensor = getattr(self, f"_{which}_counts")
        it = result.iterations.to(counts)
        one = torch.ones_like(it)
        bad = (~(result.residual < tol)).to(counts)
        nonfinite = (~torch.isfinite(result.residual)).to(counts)
        counts.add_(torch.stack([one, it, bad, nonfinite, it - counts[4]]))
        getattr(self, f"_{which}_last_residual").copy_(result.residual.reshape(1))

    def _counters_of(self, which: str) -> DEQCounters:
        eager = self._counters[which]
        if self.loop == "early_exit":
            return eager
        traced = self._masked_counters(which)
        if self.loop == "masked" or not eager.solves:
            return traced
        if not traced.solves:
            return eager
        return DEQCounters(solves=eager.solves + traced.solves,
                           iterations=eager.iterations + traced.iterations,
                           nonconverged=eager.nonconverged + traced.nonconverged,
                           last=eager.last, nonfinite=eager.nonfinite + traced.nonfinite)

    def _masked_counters(self, which: str) -> DEQCounters:
        solves, iterations, bad, nonfinite, last_it = getattr(self, f"_{which}_counts").tolist()
        residual = float(getattr(self, f"_{which}_last_residual"))
        tol = self.backward_tol if which == "backward" else self.tol
        last = (SolverStats(last_it, residual, residual < tol) if solves else None)
        if bad:
            self._warn(which, f"{bad} of {solves} masked solves ended above the tolerance"
                              + (f", {nonfinite} non-finite" if nonfinite else ""))
        return DEQCounters(solves=solves, iterations=iterations, nonconverged=bad, last=last,
                           nonfinite=nonfinite)

    @property
    def forward_stats(self) -> DEQCounters:
        """Counters of the forward solves."""
        return self._counters_of("forward")

    @property
    def backward_stats(self) -> DEQCounters:
        """Counters of the adjoint (backward) solves."""
        return self._counters_of("backward")

    def forward(self, u: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        """The equilibrium for injection ``u``, started from ``z0`` (default zeros like ``u``)."""
        self._check_loop()
        z0 = torch.zeros_like(u) if z0 is None else z0.detach()
        params = [p for p in self.f.parameters()]
        needs_grad = torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad
                                                                         for p in params))
        masked = self._masked()
        if needs_grad and self.backward == "implicit":
            result = SolveResult(*_ImplicitFixedPoint.apply(self, u, z0, *params), None)
        else:
            with torch.no_grad():
                result = self._run(lambda v: self.f(v, u), z0, backward=False, masked=masked)
        if masked and self.__dict__.get("_record_stats", True):
            self._record("forward", result, self.tol)
        z = result.z
        if needs_grad and self.backward == "phantom":
            lam = self.phantom_damping
            for _ in range(self.phantom_steps):
                z = self.f(z, u) if lam == 1.0 else (1 - lam) * z + lam * self.f(z, u)
        return z

    def stats(self) -> dict[str, float]:
        """Flat dict of the solver statistics, ready for a logger.

        Example:
            >>> sorted(DEQ(nn.Identity()).stats())[:3]
            ['backward_mean_iterations', 'backward_nonconverged', 'backward_nonfinite']
        """
        out: dict[str, float] = {}
        for name in ("forward", "backward"):
            c = self._counters_of(name)
            out[f"{name}_solves"] = c.solves
            out[f"{name}_mean_iterations"] = c.mean_iterations
            out[f"{name}_nonconverged"] = c.nonconverged
            out[f"{name}_nonfinite"] = c.nonfinite
            if c.last is not None:
                out[f"{name}_last_iterations"] = c.last.iterations
                out[f"{name}_last_residual"] = c.last.residual
        return out

    def reset_stats(self) -> None:
        """Zero :attr:`forward_stats` and :attr:`backward_stats` (e.g. at each epoch)."""
        for which in ("forward", "backward"):
            self._counters[which].reset()
            getattr(self, f"_{which}_counts").zero_()
            getattr(self, f"_{which}_last_residual").zero_()
