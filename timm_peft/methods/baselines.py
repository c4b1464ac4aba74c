"""Baselines the PEFT papers compare against: linear probe, bias tuning, partial and full tuning.

* ``linear`` — head only (VPT paper, "Linear"; SSF paper, "Linear probing").
* ``bias`` — every bias plus the head (BitFit, Zaken et al. 2021; "Bias" in VPT and SSF tables).
* ``partial`` — the last ``num_blocks`` residual blocks, the final norm and the head
  ("Partial-k" in VPT, Jia et al. 2022, Sec. 4.1). The blocks come from the model's family; by
  default from timm's own ``group_matcher`` (the groups its ``blocks`` patterns number, and every
  later group but the classifier as the final norms), so it works on any timm model that has one.
* ``full`` — everything trains; the saved "adapter" is then the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core import (PeftConfig, PeftMethod, cfg_field, register_method, register_preset,
                    unfreeze, unwrap_features)
from ..families import Family, get_family, refuse


class _NoModules(PeftMethod):
    """Baselines insert nothing, so merging is a no-op and the model is already plain timm."""

    def merge(self, model: nn.Module) -> None:
        pass

    def unmerge(self, model: nn.Module) -> None:
        pass


@register_method
class Linear(_NoModules):
    """Linear probing: the frozen backbone with a trained classifier head."""

    name = "linear"
    description = "linear probe: only the classifier head trains"

    def apply(self, model: nn.Module, config: PeftConfig) -> nn.Module:
        if not config.train_head:
            raise ValueError("linear with train_head=False trains nothing; allowed: train_head=True")
        return model


@register_method
class Bias(_NoModules):
    """Bias tuning (BitFit): every bias term and the head train, all weights stay frozen."""

    name = "bias"
    paper = 'Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models", ACL 2022.'
    citation = """@inproceedings{zaken2022bitfit,
  title={BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models},
  author={Ben Zaken, Elad and Goldberg, Yoav and Ravfogel, Shauli},
  booktitle={Annual Meeting of the Association for Computational Linguistics (ACL)},
  year={2022}
}"""
    description = "bias tuning: all biases and the head train"

    def apply(self, model: nn.Module, config: PeftConfig) -> nn.Module:
        for mod in model.modules():
            bias = getattr(mod, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
        return model


@dataclass
class PartialConfig(PeftConfig):
    """Config of ``partial``: how many of the last residual blocks train."""

    num_blocks: int = cfg_field(1, ge=1, le=1024, help="number of last residual blocks to train (Partial-k)")


@register_method
class Partial(_NoModules):
    """Partial-k: the last k residual blocks, the final norm and the head train."""

    name = "partial"
    config_cls = PartialConfig
    description = "partial tuning: the last k blocks and the head train"

    def supports(self, family: Family) -> bool:
        return "layer_groups" in family.capabilities

    def apply(self, model: nn.Module, config: PartialConfig) -> nn.Module:
        family = get_family(model)
        groups = family.layer_groups(model)
        if groups is None:
            raise refuse(self.name, "its residual blocks (a group_matcher that numbers them)",
                         model, family)
        if config.num_blocks > len(groups.blocks):
            raise ValueError(f"PartialConfig.num_blocks must be <= {len(groups.blocks)} (the "
                             f"model's blocks), got {config.num_blocks}")
        for group in groups.blocks[-config.num_blocks:]:
            for module in group:
                unfreeze(module)
        for module in groups.tail:
            unfreeze(module)
        return model


register_preset("partial_1", "partial", num_blocks=1)


@register_method
class Full(_NoModules):
    """Full fine-tuning: every parameter trains. Its saved adapter is the whole model."""

    name = "full"
    description = "full fine-tuning: every parameter trains (the adapter is the whole model)"
    saves_whole_model = True

    def apply(self, model: nn.Module, config: PeftConfig) -> nn.Module:
        unfreeze(unwrap_features(model))
        return model
