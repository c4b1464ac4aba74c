"""Config of E²VPT (Han et al., ICCV 2023, arXiv:2307.13770)."""
from __future__ import annotations

from dataclasses import dataclass

from ...core import cfg_field
from ..vpt.config import VPTConfig

__all__ = ["E2VPTConfig"]


@dataclass
class E2VPTConfig(VPTConfig):
    """Hyper-parameters of E²VPT (defaults from the paper; see the module docstring).

    Token importance. The paper scores a token by the gradient of a mask that scales the whole
    token (Eq. 6, ``token_importance="mask"``). In VPT-deep a prompt token reaches the other
    tokens only through its block's LayerNorm, which ignores a token's scale, so that gradient
    is the LayerNorm epsilon's trace (~1e-7, against ~1e-2 for a segment mask) and which tokens
    are pruned is decided by round-off and prompt norms. The default ``"segments"`` scores a
    token by the sum of its segments' scores: a segment mask changes the token's direction, not
    only its scale, so LayerNorm passes it on; pruning the lowest-scored tokens by it hurts the
    loss less than random or highest-scored ones (``tests/test_e2vpt.py``). The literal score
    stays available for reproducing the paper.

    Mask layout. The authors' code keeps ONE token mask and ONE segment mask shared by every
    layer (``mask_layout="shared"``: the gradients of all layers add up in one score, and the same
    tokens and segments are pruned in every layer); the default ``"per_layer"`` scores and prunes
    each layer on its own, as the paper's per-layer notation reads.

    ``kept_segments`` is written by :func:`prune`: per layer (all prompt groups in forward order),
    the flat indices ``token·R + segment`` of the visual-prompt segments that survived.

    Example:
        >>> E2VPTConfig(num_prompts=10, num_kv_prompts=5).num_segments
        8
    """

    num_prompts: int = cfg_field(10, ge=0, le=1000, help="visual prompt tokens per layer (T; paper: 1-50)")
    num_kv_prompts: int = cfg_field(5, ge=0, le=1000, help="key-value prompt tokens per layer (T_kv)")
    share_kv: bool = cfg_field(True, help="one tensor serves as key and value prompts (paper)")
    kv_init: str = cfg_field("kaiming_uniform", choices=("kaiming_uniform", "trunc_normal"),
                             help="key-value prompt init: He (paper default) or N(0, 0.02) "
                                  "truncated at ±2σ (Table 5b)")
    num_segments: int = cfg_field(8, ge=1, le=1024, help="segments R per prompt token (paper 8, code 16)")
    segment_layout: str = cfg_field("contiguous", choices=("contiguous", "strided"),
                                    help="segment r holds channels [r·d/R, (r+1)·d/R) "
                                         "(contiguous, paper) or j with j mod R = r (code)")
    token_prune_ratio: float = cfg_field(0.0, ge=0.0, lt=1.0,
                                         help="fraction of tokens pruned per layer")
    segment_prune_ratio: float = cfg_field(0.0, ge=0.0, lt=1.0,
                                           help="fraction of segments pruned per surviving token")
    importance: str = cfg_field("abs", choices=("abs", "signed"),
                                help="abs: E|dL/dmask| (paper Eq. 6); signed: -E[dL/dmask]")
    token_importance: str = cfg_field(
        "segments", choices=("segments", "mask"),
        help="score a token by the sum of its segments' scores (default: it ranks tokens) or by "
             "the gradient of its token mask (paper Eq. 6, literal: ~0 after LayerNorm)")
    mask_layout: str = cfg_field(
        "per_layer", choices=("per_layer", "shared"),
        help="per_layer: every layer's tokens and segments are scored and pruned on their own; "
             "shared: one token mask and one segment mask for all layers of a prompt group, as "
             "in the authors' code (the same tokens and segments pruned in every layer)")
    importance_batches: int | None = cfg_field(None, ge=1, le=100_000,
                                               help="batches in the importance pass (None: all)")
    rewind: str = cfg_field("initial", choices=("initial", "random"),
                            help="survivors restart from their initial values or a fresh init")
    rewind_epochs: int | None = cfg_field(None, ge=1, le=10_000, help="epochs of the rewinding stage "
                                                            "(None: as many as the main training)")
    swin_prune_stages: tuple[int, ...] = cfg_field(
        (0,), ge=0, le=16, help="models with one prompt group per stage (Swin): the stages whose "
                         "prompts are pruned")
    kept_segments: tuple[tuple[int, ...], ...] | None = cfg_field(
        None, ge=0, help="set by pruning: per layer, surviving token·R + segment indices")

    def validate(self) -> None:
        super().validate()
        if self.kept_segments is None:
            return
        total = self.num_prompts * self.num_segments
        for i, layer in enumerate(self.kept_segments):
            if not layer or any(not 0 <= v < total for v in layer) or len(set(layer)) != len(layer):
                raise ValueError(f"E2VPTConfig.kept_segments[{i}] must be distinct indices in "
                                 f"[0, num_prompts·num_segments = {total}), at least one; "
                                 f"got {list(layer)}")

    @property
    def pruned(self) -> bool:
        """True once pruning has recorded which segments survive."""
        return self.kept_segments is not None
