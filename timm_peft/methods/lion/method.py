"""LION's surgery: a swapped model class routes forward through the implicit prompts."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core import PeftMethod, register_method, register_preset
from ...families import Family, get_family, refuse
from ...layers.swap import (Swappable, _make, refuse_fx, restore_class, restore_classes,
                            swap_class)
from .config import LionConfig
from .layers import LionPrompts
from .robust import RobustOptimizer

__all__ = ["Lion", "LionForward", "LionClassifier", "lion_class"]


class LionForward(Swappable):
    """Mixin for a timm model class: P₁ before ``forward_features``; ``forward_head`` runs the
    model's own head, whose classifier(s) read the blend with P₂ (:class:`LionClassifier`);
    ``pre_logits=True`` returns the blended features."""

    prefix = "Lion"
    method = "lion"

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        refuse_fx(self)
        return super().forward_features(self.lion.prompt_input(x), *args, **kwargs)

    def forward_head(self, x: Any, pre_logits: bool = False, **kwargs: Any) -> Any:
        # kwargs: what a model's own forward passes its head (Gemma 4's patch_valid mask)
        if pre_logits:
            return self.lion.blend_pre_logits(super().forward_head(x, pre_logits=True, **kwargs))
        return super().forward_head(x, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # the backbone sees the prompted image here too, so features_only and feature taps
        # describe the same forward as model(x)
        return super().forward_intermediates(self.lion.prompt_input(x), *args, **kwargs)


class LionClassifier(Swappable):
    """Mixin for a classifier module: it reads ``z̃ = α₂·F + β₂·MLP(P₂(F))`` instead of ``F``.

    Every classifier the family names gets it, so a model with two heads (distilled DeiT, LeViT,
    EfficientFormer), one head per branch (CrossViT) or an auxiliary token head (VOLO) runs all
    of them on blended features, and the model's own ``forward_head`` still combines them.
    Reference: ``lion`` (the model's :class:`LionPrompts`).
    """

    prefix = "Lion"
    method = "lion"
    refs = ("lion",)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(self.lion.blend_classifier_input(x), *args, **kwargs)


def _in_width(module: nn.Module) -> int | None:
    """The feature width a classifier module reads (its first layer's input width)."""
    for m in module.modules():
        for attr in ("in_features", "in_channels", "num_features"):
            width = getattr(m, attr, None)
            if isinstance(width, int):
                return width
    return None


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

    def supports(self, family: Family) -> bool:
        return "classifier" in family.capabilities

    def apply(self, model: nn.Module, config: LionConfig) -> nn.Module:
        family = get_family(model)
        missing = [a for a in ("forward_features", "forward_head", "get_classifier")
                   if not callable(getattr(model, a, None))]
        if missing:
            raise ValueError(f"LION needs a timm model with forward_features, forward_head and "
                             f"get_classifier; {type(model).__name__} lacks {missing}")
        if hasattr(model, "lion"):
            raise ValueError(f"{type(model).__name__} already has an attribute 'lion'")
        if config.use_p2 and family.pooled(model) is False:
            # a features_only backbone is pruned the same way: no head ever runs there
            raise ValueError(f"LION's P2 reads pooled features, but this {type(model).__name__} "
                             "does not pool (global_pool='', or a features_only backbone), so P2 "
                             "would never run; build it with a global pool (the default "
                             "global_pool) or use LionConfig(use_p2=False) (preset 'lion_no_p2')")
        heads = family.classifiers(model)
        if config.use_p2 and not heads:
            raise refuse(self.name, "classifier module(s) (get_classifier)", model, family)
        dims = [_in_width(h) if not isinstance(h, nn.Identity) else None for h in heads]
        default = getattr(model, "head_hidden_size", None) or model.num_features
        dims = [d if d is not None else default for d in dims] or [default]
        ref = next(model.parameters())
        in_chans = 0
        if config.use_p1:
            in_chans = family.in_chans(model)
            if in_chans is None:
                raise refuse(self.name, "the image channels (pretrained_cfg['first_conv'] naming "
                             "the first conv) for P1; use LionConfig(use_p1=False)", model, family)
        model.lion = LionPrompts(config, in_chans, dims[0], tuple(dims[1:])).to(
            device=ref.device, dtype=ref.dtype)
        if config.use_p2:
            for head in dict.fromkeys(heads):  # a head listed twice is swapped once
                swap_class(head, LionClassifier, lion=model.lion)
        swap_class(model, LionForward)
        return model

    def unload(self, model: nn.Module) -> nn.Module:
        restore_classes(model, LionClassifier)
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
