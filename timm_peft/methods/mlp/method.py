"""MLP-k's surgery: every classifier reads ``MLP(features)`` instead of the pooled features."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core import PeftMethod, register_method, register_preset
from ...families import Family
from ...layers.head import classifier_width, on_channels, per_width, pooled_classifiers
from ...layers.swap import AdapterModule, Swappable, restore_class, restore_classes, swap_class
from .config import MlpConfig

__all__ = ["Mlp", "MlpHead", "MlpClassifier", "MlpForward"]


class MlpHead(AdapterModule):
    """The hidden layers of MLP-k, one stack per classifier-input width ``d``:
    ``k - 1`` blocks ``Linear → act → dropout`` of widths ``d → h → … → h → d``, so the model's own
    classifier (``d → classes``) is the k-th layer.

    Example:
        >>> head = MlpHead(MlpConfig(), dims=[8])
        >>> head(torch.randn(2, 8), 8).shape, sum(p.numel() for p in head.parameters())
        (torch.Size([2, 8]), 144)
    """

    def __init__(self, config: MlpConfig, dims: list[int]) -> None:
        super().__init__()
        act = {"relu": nn.ReLU, "gelu": nn.GELU}[config.act]

        def stack(d: int) -> nn.Sequential:
            h = config.hidden_dim or d
            widths = [d, *[h] * (config.num_layers - 2), d]
            layers: list[nn.Module] = []
            for w_in, w_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(w_in, w_out), act(), nn.Dropout(config.dropout)]
            return nn.Sequential(*layers)

        self.layers = nn.ModuleDict({str(d): stack(d) for d in dict.fromkeys(dims)})

    @property
    def dims(self) -> list[int]:
        return [int(d) for d in self.layers]

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        return self.layers[str(width)](x)


class MlpClassifier(Swappable):
    """Mixin for a classifier module: it reads ``MLP(x)`` (on its channel axis) instead of ``x``.
    References: ``mlp_head`` (the model's :class:`MlpHead`), ``mlp_width`` (its input width)."""

    prefix = "Mlp"
    method = "mlp"
    refs = ("mlp_head", "mlp_width")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(on_channels(lambda t: self.mlp_head(t, self.mlp_width), x, self),
                               *args, **kwargs)


class MlpForward(Swappable):
    """Mixin for the model: ``forward_head(pre_logits=True)`` returns what the classifiers read."""

    prefix = "Mlp"
    method = "mlp"

    def forward_head(self, x: Any, pre_logits: bool = False, **kwargs: Any) -> Any:
        # kwargs: what a model's own forward passes its head (Gemma 4's patch_valid mask)
        if pre_logits:
            head = self.mlp_head
            return per_width(head, super().forward_head(x, pre_logits=True, **kwargs), head.dims, "MLP-k")
        return super().forward_head(x, **kwargs)


@register_method
class Mlp(PeftMethod):
    """MLP-k: a k-layer MLP head on the frozen backbone (VPT's "Mlp-k" baseline)."""

    name = "mlp"
    paper = ('Jia et al., "Visual Prompt Tuning", ECCV 2022 (the "Mlp-k" baseline, Sec. 4.1 and '
             'Table 1).')
    citation = """@inproceedings{jia2022vpt,
  title={Visual Prompt Tuning},
  author={Jia, Menglin and Tang, Luming and Chen, Bor-Chun and Cardie, Claire and Belongie, Serge and Hariharan, Bharath and Lim, Ser-Nam},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2022}
}"""
    config_cls = MlpConfig
    description = "MLP-k: a k-layer MLP head (the model's classifier last) on the frozen features"

    def supports(self, family: Family) -> bool:
        return "classifier" in family.capabilities

    def apply(self, model: nn.Module, config: MlpConfig) -> nn.Module:
        heads = pooled_classifiers(self.name, model, "MLP-k reads")
        if not config.train_head:
            raise ValueError("MLP-k trains its head: train_head=False would leave the classifier "
                             "(the MLP's last layer) frozen; allowed: train_head=True")
        if "mlp_head" in model.__dict__ or "mlp_head" in model._modules:
            raise ValueError(f"{type(model).__name__} already has an attribute 'mlp_head'")
        widths = [classifier_width(model, h) for h in heads]
        ref = next(model.parameters())
        model.mlp_head = MlpHead(config, widths).to(device=ref.device, dtype=ref.dtype)
        for head, width in zip(heads, widths):
            swap_class(head, MlpClassifier, mlp_head=model.mlp_head, mlp_width=width)
        swap_class(model, MlpForward)
        return model

    def unload(self, model: nn.Module) -> nn.Module:
        restore_classes(model, MlpClassifier)
        restore_class(model, MlpForward)
        del model.mlp_head
        return model


register_preset("mlp3", "mlp", num_layers=3)
