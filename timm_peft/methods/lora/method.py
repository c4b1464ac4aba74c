"""LoRA's surgery: a low-rank update on every targeted Linear / 1×1 conv, and its exact merge."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ...core import PeftConfig, PeftMethod, register_method
from ...families import Family, get_family, refuse
from ...layers.swap import is_swapped, restore_class, swap_class
from .config import LoraConfig
from .layers import LoraLayer, LoraWeights

__all__ = ["Lora", "lora_targets"]


def lora_targets(model: nn.Module, config: LoraConfig | None = None) -> list[str]:
    """Names of the layers ``config`` (default: :class:`LoraConfig`'s) adapts in ``model``.

    Example:
        >>> import timm
        >>> lora_targets(timm.create_model("vit_tiny_patch16_224", depth=2))
        ['blocks.0.attn.qkv', 'blocks.1.attn.qkv']
    """
    config = config or LoraConfig()
    return [layer.name for layer in get_family(model).linear_layers(model)
            if config.matches(layer.name)]


def _layers(model: nn.Module) -> Iterator[nn.Module]:
    for m in model.modules():
        if is_swapped(m, LoraLayer):
            yield m


def _check_not_merged(model: nn.Module, action: str) -> None:
    merged = [m for m in _layers(model) if m.lora.merged]
    if merged:
        raise ValueError(f"cannot {action} a merged LoRA model: its base weights hold the update "
                         f"({len(merged)} layers); call timm_peft.unmerge(model) first")


@register_method
class Lora(PeftMethod):
    """LoRA: ``W + s·B·A`` on the targeted layers (default every attention's ``qkv``, r = 8);
    see :mod:`timm_peft.methods.lora`."""

    name = "lora"
    paper = ('Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.')
    citation = r"""@inproceedings{hu2022lora,
  title={{LoRA}: Low-Rank Adaptation of Large Language Models},
  author={Hu, Edward J. and Shen, Yelong and Wallis, Phillip and Allen-Zhu, Zeyuan and Li, Yuanzhi and Wang, Shean and Wang, Lu and Chen, Weizhu},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2022}
}"""
    config_cls = LoraConfig
    description = "LoRA: low-rank updates of chosen Linear / 1x1 conv layers (default qkv) + head; mergeable"

    def supports(self, family: Family) -> bool:
        return "qkv" in family.capabilities

    def apply(self, model: nn.Module, config: LoraConfig) -> nn.Module:
        family = get_family(model)
        layers = family.linear_layers(model)
        targets = [layer for layer in layers if config.matches(layer.name)]
        if not targets:
            names = sorted({layer.name.rpartition(".")[2] for layer in layers})
            raise refuse(self.name, f"Linear or 1×1 conv layers named {list(config.target_modules)} "
                         f"(this model's are named {names[:12]}; set "
                         "peft_cfg=dict(target_modules=[...]))", model, family)
        blocked = [layer for layer in targets if layer.reason is not None]
        if blocked:
            raise ValueError(f"LoRA cannot change {blocked[0].name} ({len(blocked)} targeted "
                             f"layer(s)): {blocked[0].reason}; target other layers")
        ref = next(model.parameters())
        for layer in targets:
            op = layer.op
            conv = isinstance(op, nn.Conv2d)
            cin, cout = (op.in_channels, op.out_channels) if conv else (op.in_features, op.out_features)
            op.lora = LoraWeights(cin, cout, config.r, config.scaling, config.lora_dropout,
                                  config.init_lora_weights, device=ref.device, dtype=ref.dtype)
            swap_class(op, LoraLayer)
            if layer.caller is not None and not is_swapped(*layer.caller):
                swap_class(*layer.caller)
        return model

    def merge(self, model: nn.Module) -> None:
        """``W ← W + s·B·A`` on every adapted layer (exact up to float rounding; a copy of each
        base weight is kept, so :meth:`unmerge` restores the trained model bit for bit)."""
        for m in _layers(model):
            if not m.lora.merged:
                m.merge_lora()

    def unmerge(self, model: nn.Module) -> None:
        for m in _layers(model):
            if m.lora.merged:
                m.unmerge_lora()

    def unload(self, model: nn.Module) -> nn.Module:
        """Remove the updates (merged ones stay in the weights) and the callers' swaps."""
        for m in list(_layers(model)):
            restore_class(m, LoraLayer)
            del m.lora
        for layer in get_family(model).linear_layers(model):
            if layer.caller is not None:
                restore_class(*layer.caller)
        return model

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        _check_not_merged(model, "save the adapter of")
        return super().adapter_state_dict(model)

    def prepare_load(self, model: nn.Module, config: PeftConfig) -> None:
        _check_not_merged(model, "load an adapter into")
