"""Config of MLP-k (the "Mlp-k" baseline of Jia et al., "Visual Prompt Tuning", ECCV 2022)."""
from __future__ import annotations

from dataclasses import dataclass

from ...core import PeftConfig, cfg_field

__all__ = ["MlpConfig"]


@dataclass
class MlpConfig(PeftConfig):
    """Hyper-parameters of MLP-k: a ``k``-layer MLP head on the frozen, pooled features.

    Example:
        >>> MlpConfig(num_layers=2).num_layers
        2
    """

    num_layers: int = cfg_field(3, ge=2, le=16, help="k: Linear layers of the head, the model's "
                                                     "classifier included (Mlp-3: two hidden "
                                                     "layers, then the classifier)")
    hidden_dim: int | None = cfg_field(None, ge=1, le=8192,
                                       help="width inside the MLP (k >= 3); None: the classifier's "
                                            "input width d, as VPT's Mlp-k (2·(d²+d) parameters "
                                            "for Mlp-3)")
    act: str = cfg_field("relu", choices=("relu", "gelu"), help="activation after each hidden layer")
    dropout: float = cfg_field(0.0, ge=0.0, lt=1.0, help="dropout after each hidden activation")

    def validate(self) -> None:
        super().validate()
        if self.hidden_dim is not None and self.num_layers < 3:
            raise ValueError(f"MlpConfig.hidden_dim sets the width between hidden layers, which "
                             f"num_layers={self.num_layers} does not have (its one hidden layer "
                             "maps d to d); use num_layers >= 3 or hidden_dim=None")
