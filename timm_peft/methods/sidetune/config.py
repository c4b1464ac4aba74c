"""Config of Sidetune (Zhang et al., "Side-Tuning: A Baseline for Network Adaptation via Additive
Side Networks", ECCV 2020; the "Sidetune" baseline of Jia et al., "Visual Prompt Tuning", 2022)."""
from __future__ import annotations

from dataclasses import dataclass

from ...core import PeftConfig, cfg_field

__all__ = ["SidetuneConfig", "ALEXNET_CHANNELS"]

#: output channels of AlexNet's five convolutions (Krizhevsky et al. 2012, torchvision's widths)
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)


@dataclass
class SidetuneConfig(PeftConfig):
    """Hyper-parameters of Sidetune: the side network's shape and the blend weight α.

    The head reads ``α·F + (1 - α)·S(x)`` (``F``: the frozen backbone's pooled features,
    ``S``: the side network on the image).

    Example:
        >>> SidetuneConfig(alpha=1.0, learn_alpha=False).alpha
        1.0
    """

    side_channels: tuple[int, ...] = cfg_field(
        ALEXNET_CHANNELS, ge=1, le=1024,
        help="output channels of the side network's convolutions, 1 to 8 of them (default: "
             "AlexNet's five, VPT's side network)")
    side_pool: int = cfg_field(6, ge=1, le=8, help="the side maps are average-pooled to "
                                                   "side_pool × side_pool (AlexNet's 6) before "
                                                   "the projection to the feature width")
    alpha: float = cfg_field(0.5, ge=0.0, le=1.0, help="α at initialisation, the weight of the "
                                                       "backbone's features (1: backbone only, "
                                                       "0: side network only)")
    learn_alpha: bool = cfg_field(True, help="train α (kept as sigmoid of a trained logit, so it "
                                             "stays in (0, 1)); False: α stays fixed")

    def validate(self) -> None:
        super().validate()
        if not 1 <= len(self.side_channels) <= 8:
            raise ValueError(f"SidetuneConfig.side_channels must hold 1 to 8 widths, got "
                             f"{len(self.side_channels)}")
        if self.learn_alpha and not 0.0 < self.alpha < 1.0:
            raise ValueError(f"SidetuneConfig.alpha must be in (0, 1) when learn_alpha=True (a "
                             f"trained α is sigmoid(logit)), got {self.alpha}; use "
                             "learn_alpha=False for a fixed α of 0 or 1")
