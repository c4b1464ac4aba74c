"""Config of LION (Wang et al., AAAI 2024, arXiv:2303.09992): every choice the paper leaves open."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...core import PeftConfig, cfg_field
from ...deq import LOOPS, SOLVERS

__all__ = ["LionConfig"]


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
    solver_loop: str = cfg_field("auto", choices=LOOPS,
                                 help="auto: masked while torch.compile/torch.export traces, "
                                      "early_exit in eager; early_exit: stop once converged (host "
                                      "sync each iteration); masked: always run the cap with "
                                      "converged updates masked off, same result, no host sync, "
                                      "compiles whole (torch.compile fullgraph, torch.export)")
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
    robust_targets: str = cfg_field("prompts", choices=("prompts", "all"),
                                    help="tensors under the rule: prompts (default: P1, P2, the "
                                         "projection and the gates, the paper's 'we prune the "
                                         "parameters in these two layers'; the head gets the "
                                         "plain update) or all (the head too)")
    robust_criterion: str = cfg_field("floored", choices=("floored", "paper"),
                                      help="criticality: |g|·max(|θ|, shrink step) (default; "
                                           "zeros are ranked by their gradient) or the paper's "
                                           "literal |g·θ| (zeros stay pinned)")

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
                    phantom_damping=self.phantom_damping, anderson_m=self.anderson_m,
                    loop=self.solver_loop)
