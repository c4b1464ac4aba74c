"""Config of VPT (Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv:2203.12119)."""
from __future__ import annotations

from dataclasses import dataclass

from ...core import PeftConfig, cfg_field

__all__ = ["VPTConfig"]


@dataclass
class VPTConfig(PeftConfig):
    """Hyper-parameters of VPT (paper Sec. 3.2; defaults from the paper, see the module docstring).

    Example:
        >>> VPTConfig(num_prompts=10, deep=False).num_prompts
        10
    """

    num_prompts: int = cfg_field(50, ge=0, le=1000, help="prompt tokens per layer (the paper's p; T)")
    deep: bool = cfg_field(True, help="VPT-Deep: new prompts before every block; False: "
                                      "VPT-Shallow, prompts enter the first block only")
    dropout: float = cfg_field(0.0, ge=0.0, lt=1.0,
                               help="dropout on the prompts (0.1 in the authors' runs)")
    projection_dim: int | None = cfg_field(
        None, ge=1, le=8192, help="store prompts at this width and map them to the model width with a "
                         "trained linear layer (prompt projection); None: no projection")
    init: str = cfg_field("uniform", choices=("uniform", "normal"),
                          help="uniform: the paper's uniform(-v, v), v = sqrt(6/(3·patch²+d)), "
                               "for tokens and normalised uniform(0, 1) pixels for ConvNets; "
                               "normal: N(0, 0.02) (timm's token init)")
    pad_size: int = cfg_field(5, ge=0, le=256, help="ConvNets: width p of the learnable pixel border; "
                                            "the input grows from H×W to (H+2p)×(W+2p)")
    img_size: int | tuple[int, int] | None = cfg_field(
        None, ge=1, le=4096, help="ConvNets: input size the border is made for (default: the model's "
                         "pretrained_cfg input_size)")
