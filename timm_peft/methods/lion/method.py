"""LION's surgery: a swapped model class routes forward through the implicit prompts."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core import PeftMethod, register_method, register_preset
from ...families import get_family, refuse
from ...layers.swap import Swappable, _make, restore_class, swap_class
from .config import LionConfig
from .layers import LionPrompts
from .robust import RobustOptimizer

__all__ = ["Lion", "LionForward", "lion_class"]


class LionForward(Swappable):
    """Mixin for a timm model class: P₁ before ``forward_features``, P₂ and the blend between
    the pooled features and the classifier in ``forward_head``."""

    prefix = "Lion"
    method = "lion"

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward_features(self.lion.prompt_input(x), *args, **kwargs)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        feats = super().forward_head(x, pre_logits=True)
        # pooled features may come as (B, C, 1, 1) (BiT's pre-logits)
        pooled_4d = feats.ndim == 4 and feats.shape[-2:] == (1, 1)
        z = self.lion.blend_features(feats.flatten(1) if pooled_4d else feats).view(feats.shape)
        if pre_logits:
            return z
        head = self.get_classifier()
        if isinstance(head, nn.modules.conv._ConvNd):  # a 1x1-conv classifier (BiT, DLA, DPN)
            return head(z.view(z.shape[0], -1, 1, 1)).flatten(1)
        return head(z)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # the backbone sees the prompted image here too, so features_only and feature taps
        # describe the same forward as model(x)
        return super().forward_intermediates(self.lion.prompt_input(x), *args, **kwargs)


def lion_class(base: type) -> type:
    """The (cached) subclass of timm model class ``base`` that runs LION's forward.

    Example:
        >>> from timm.models.resnet import ResNet
        >>> issubclass(lion_class(ResNet), ResNet), lion_class(ResNet) is lion_class(ResNet)
        (True, True)
    """
    return _make((LionForward,), base)


@register_method
class Lion(PeftMethod):
    """LION: implicit prompt layers at both ends of a frozen backbone + robust training."""

    name = "lion"
    paper = 'Wang et al., "LION: Implicit Vision Prompt Tuning", AAAI 2024.'
    citation = """@inproceedings{wang2024lion,
  title={LION: Implicit Vision Prompt Tuning},
  author={Wang, Haixin and Chang, Jianlong and Zhai, Yihang and Luo, Xiao and Sun, Jinan and Lin, Zhouchen and Tian, Qi},
  booktitle={AAAI Conference on Artificial Intelligence},
  year={2024}
}"""
    config_cls = LionConfig
    description = "LION: deep-equilibrium prompts on the image and the features, robust training"

    def apply(self, model: nn.Module, config: LionConfig) -> nn.Module:
        missing = [a for a in ("forward_features", "forward_head", "get_classifier")
                   if not callable(getattr(model, a, None))]
        if missing:
            raise ValueError(f"LION needs a timm model with forward_features, forward_head and "
                             f"get_classifier; {type(model).__name__} lacks {missing}")
        if not isinstance(model.get_classifier(), nn.Module):
            raise ValueError(f"LION needs a single classifier module; {type(model).__name__}."
                             f"get_classifier() returned {type(model.get_classifier()).__name__} "
                             "(a distilled model?)")
        if hasattr(model, "lion"):
            raise ValueError(f"{type(model).__name__} already has an attribute 'lion'")
        dim = getattr(model, "head_hidden_size", None) or model.num_features
        ref = next(model.parameters())
        in_chans = 0
        if config.use_p1:
            family = get_family(model)
            in_chans = family.in_chans(model)
            if in_chans is None:
                raise refuse(self.name, "the image channels (pretrained_cfg['first_conv'] naming "
                             "the first conv) for P1; use LionConfig(use_p1=False)", model, family)
        model.lion = LionPrompts(config, in_chans, dim).to(device=ref.device, dtype=ref.dtype)
        swap_class(model, LionForward)
        return model

    def unload(self, model: nn.Module) -> nn.Module:
        restore_class(model, LionForward)
        del model.lion
        return model

    def training_hooks(self, model: nn.Module) -> dict[str, Any]:
        config: LionConfig = model.peft_config
        prompts: LionPrompts = model.lion

        def metrics(reset: bool) -> dict[str, float]:
            # the solver statistics of the epoch: how hard the equilibria were to find
            if reset:
                prompts.reset_solver_stats()
                return {}
            return prompts.solver_stats()

        hooks: dict[str, Any] = {"metrics": metrics}
        if config.robust:
            def wrap(optimizer: torch.optim.Optimizer, model: nn.Module) -> RobustOptimizer:
                targets = None if config.robust_targets == "all" else [
                    p for p in model.lion.parameters() if p.requires_grad]
                return RobustOptimizer(optimizer, tau=config.robust_tau,
                                       scope=config.robust_scope, shrink=config.robust_shrink,
                                       criterion=config.robust_criterion, params=targets)
            hooks["optimizer_wrapper"] = wrap
        return hooks


register_preset("lion_no_p1", "lion", use_p1=False)
register_preset("lion_no_p2", "lion", use_p2=False)
register_preset("lion_no_robust", "lion", robust=False)
