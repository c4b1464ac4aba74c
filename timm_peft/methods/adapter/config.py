"""Config of the bottleneck Adapter (Houlsby et al. 2019; Pfeiffer et al. 2020; VPT's baseline)."""
from __future__ import annotations

from dataclasses import dataclass

from ...core import PeftConfig, cfg_field
from ...layers.bottleneck import ACTIVATIONS

__all__ = ["AdapterConfig"]


@dataclass
class AdapterConfig(PeftConfig):
    """Config of ``adapter``: where the bottlenecks go and how wide they are.

    Example:
        >>> AdapterConfig(reduction_factor=8).hidden_dim(768)
        96
    """

    reduction_factor: int = cfg_field(
        64, ge=1, le=4096, help="bottleneck width d' = max(1, d // reduction_factor) for a block "
                                "of width d (VPT's grid: 8, 64, 256; 64 gives the SSF paper's "
                                "Adapter counts)")
    bottleneck: int | None = cfg_field(None, ge=1, le=8192,
                                       help="bottleneck width d' for every block (overrides "
                                            "reduction_factor)")
    placement: str = cfg_field(
        "pfeiffer", choices=("pfeiffer", "houlsby"),
        help="'pfeiffer': one adapter after each block's MLP (VPT's Adapter baseline); "
             "'houlsby': after the attention and after the MLP")
    act: str = cfg_field("relu", choices=tuple(ACTIVATIONS), help="the bottleneck's non-linearity")
    dropout: float = cfg_field(0.0, ge=0.0, lt=1.0, help="dropout after the non-linearity")

    def hidden_dim(self, dim: int) -> int:
        """The bottleneck width for a block of ``dim`` channels."""
        return self.bottleneck if self.bottleneck is not None else max(1, dim // self.reduction_factor)
