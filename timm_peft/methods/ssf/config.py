"""Config of SSF (Lian et al., NeurIPS 2022)."""
from __future__ import annotations

from dataclasses import dataclass

from ...core import PeftConfig, cfg_field

__all__ = ["SSFConfig"]


@dataclass
class SSFConfig(PeftConfig):
    """Config of ``ssf``: how the scales γ and shifts β start, and what happens at bias-free ops.

    Example:
        >>> SSFConfig(init="identity").init
        'identity'
    """

    init: str = cfg_field("normal", choices=("normal", "identity"),
                          help="'normal': γ ~ N(1, init_std), β ~ N(0, init_std) (paper); "
                               "'identity': γ = 1, β = 0 (output equals the base model's)")
    init_std: float = cfg_field(0.02, ge=0.0, help="standard deviation of the 'normal' init")
    pooled_norm_site: str = cfg_field(
        "before_pool", choices=("before_pool", "after_fc_norm"),
        help="average-pooled ViTs (norm is Identity, fc_norm after pooling): 'before_pool' puts "
             "the last scale-shift on the tokens before pooling, fc_norm(γ ⊙ mean(x) + β), as "
             "the authors' code (not mergeable: merge refuses it); 'after_fc_norm' puts it after "
             "fc_norm, γ ⊙ fc_norm(mean(x)) + β (mergeable exactly)")
    bias_free: str = cfg_field(
        "add_bias", choices=("add_bias", "scale_only"),
        help="after an operation without a bias (CLIP's patch embedding, qkv_bias=False): "
             "'add_bias' learns γ and β and merging adds a bias there (paper Eq. 5; the merged "
             "state dict gains that key); 'scale_only' learns only γ there, so the merged model "
             "has exactly the base architecture's keys")
