"""LION's robust training rule (paper Eq. 7-11) around any torch optimiser."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch

__all__ = ["RobustOptimizer", "CRITERIA"]

#: criticality scores :class:`RobustOptimizer` offers (see its docstring)
CRITERIA = ("floored", "paper")


class RobustOptimizer(torch.optim.Optimizer):
    """LION's robust update around any torch optimiser (paper Eq. 7-11).

    Each :meth:`step`, for every element with a gradient of the tensors the rule covers
    (``params``; default: every tensor of the wrapped optimiser), a criticality score ranks the
    elements; the ``floor(tau·n)`` of lowest score are non-crucial (Eq. 9; ``n`` counts the elements
    of one tensor for ``scope="tensor"``, of all tensors for ``scope="global"``). Crucial elements
    get the wrapped optimiser's update (Eq. 10, with e.g. Adam in place of SGD as in the paper's
    experiments); non-crucial ones are shrunk toward zero instead, ``θ ← sign(θ)·max(|θ| - η, 0)``
    (Eq. 11 without overshooting zero), ``η = shrink × the group's learning rate``. Tensors
    outside ``params`` get the wrapped optimiser's update unchanged (LION covers only its prompt
    blocks, not the classifier: see :attr:`~timm_peft.methods.lion.LionConfig.robust_targets`).

    Criticality (``criterion``):

    * ``"floored"`` (default): ``c = |∂L/∂θ| ⊙ max(|θ|, η)``. The paper's Eq. 7 with the value
      floored at one shrink step. Why: with the literal ``|∂L/∂θ ⊙ θ|`` an element at exactly zero
      has zero criticality whatever its gradient, so it is non-crucial at every step and can never
      leave zero. LION starts its read-outs, projection and head bias at zero (so the prompted
      model starts as the backbone), which makes every element of those tensors tie at step 1: the
      first ``tau`` of them by position were shrunk to zero and pinned there for good (e.g. P1 never
      changed its first colour channel). The floor ranks an element at zero by its gradient, as if
      it sat one step away, and leaves every element with ``|θ| ≥ η`` ranked exactly as Eq. 7 ranks
      it. It also keeps the paper's "we do not eliminate the non-crucial parameters": a zero whose
      gradient grows becomes crucial again.
    * ``"paper"``: ``c = |∂L/∂θ ⊙ θ|`` literally (zeros stay pinned; ties broken by position).

    Optimiser state: the wrapped optimiser sees every element's true gradient, so its state
    (e.g. Adam's moments and step count) keeps tracking all elements; for non-crucial elements
    only its write to the parameter is replaced by the shrink. ``param_groups``, ``state``,
    ``state_dict`` and ``zero_grad`` are the wrapped optimiser's, so LR schedulers and checkpoints
    work unchanged.

    Example:
        >>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        >>> opt = RobustOptimizer(torch.optim.SGD([p], lr=0.1), tau=0.5)
        >>> p.grad = torch.tensor([0.1, 0.1, 0.1, 1.0])  # c = [0.1, 0.2, 0.05, 3.0]
        >>> opt.step(); p.data
        tensor([ 0.9000, -2.0100,  0.4000,  2.9000])
    """

    def __init__(self, optimizer: torch.optim.Optimizer, tau: float = 0.4, scope: str = "tensor",
                 shrink: float = 1.0, criterion: str = "floored",
                 params: Iterable[torch.Tensor] | None = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"RobustOptimizer wraps a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if not 0 <= tau < 1:
            raise ValueError(f"RobustOptimizer tau must be in [0, 1), got {tau!r}")
        if scope not in ("tensor", "global"):
            raise ValueError(f"RobustOptimizer scope must be 'tensor' or 'global', got {scope!r}")
        if shrink < 0:
            raise ValueError(f"RobustOptimizer shrink must be >= 0, got {shrink!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"RobustOptimizer criterion must be one of {list(CRITERIA)}, got "
                             f"{criterion!r}")
        # not Optimizer.__init__: parameters, groups and state all belong to the wrapped optimiser
        self.optimizer = optimizer
        #: ids of the tensors the rule covers (None: all of the wrapped optimiser's)
        self.covered: set[int] | None = None
        if params is not None:
            params = list(params)
            known = {id(q) for g in optimizer.param_groups for q in g["params"]}
            stray = [i for i, q in enumerate(params) if id(q) not in known]
            if stray:
                raise ValueError(f"RobustOptimizer params must be tensors of the wrapped "
                                 f"optimiser; params {stray} are not in its param_groups")
            self.covered = {id(q) for q in params}
        self.tau, self.scope, self.shrink, self.criterion = tau, scope, shrink, criterion
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
        covered = "all" if self.covered is None else len(self.covered)
        return (f"RobustOptimizer(tau={self.tau}, scope={self.scope!r}, shrink={self.shrink}, "
                f"criterion={self.criterion!r}, params={covered}, optimizer={self.optimizer!r})")

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def criticality(self, p: torch.Tensor, lr: float) -> torch.Tensor:
        """Criticality of every element of ``p`` (which has a gradient) under ``self.criterion``."""
        if self.criterion == "paper":
            return (p.grad * p).abs()
        floor = (self.shrink or 1.0) * lr  # one shrink step (one lr step when shrink is 0)
        return p.grad.abs() * p.detach().abs().clamp_min(floor)

    def noncrucial_masks(self, params: Iterable[torch.Tensor],
                         lrs: Iterable[float] | None = None) -> list[torch.Tensor]:
        """Boolean masks of the non-crucial elements of ``params`` (which all have gradients).

        ``lrs`` are the learning rates of the params' groups (default: each one's group's).
        """
        params = list(params)
        if lrs is None:
            group_lr = {id(q): float(g["lr"]) for g in self.param_groups for q in g["params"]}
            lrs = [group_lr[id(p)] for p in params]
        crit = [self.criticality(p, lr).flatten() for p, lr in zip(params, lrs)]
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
        entries = [(p, g) for g in self.param_groups for p in g["params"]
                   if p.grad is not None and (self.covered is None or id(p) in self.covered)]
        if any(p.grad.is_sparse for p, _ in entries):
            raise RuntimeError("RobustOptimizer does not support sparse gradients")
        masks = self.noncrucial_masks([p for p, _ in entries], [float(g["lr"]) for _, g in entries])
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
