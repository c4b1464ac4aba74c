"""What a method that changes the classifiers' input needs to know about them (MLP-k, Sidetune).

A timm classifier reads the pooled features: ``(B, C)`` for a Linear, ``(B, C, 1, 1)`` for a 1×1
convolution (BiT, DLA, DPN), tokens ``(B, N, C)`` for an auxiliary token head (VOLO). A method
that transforms what a classifier reads does it per classifier-input width (CrossViT has one
classifier per branch, of two widths) on the classifier's channel axis, and gives
``forward_head(pre_logits=True)`` the same transform (a concatenation of several widths is
transformed part by part).

Example:
    >>> import torch
    >>> from torch import nn
    >>> on_channels(lambda t: t * 2, torch.ones(1, 3, 1, 1), nn.Conv2d(3, 4, 1)).shape
    torch.Size([1, 3, 1, 1])
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .swap import original_class

__all__ = ["pooled_classifiers", "classifier_width", "on_channels", "per_width"]


def pooled_classifiers(method: str, model: nn.Module, reads: str) -> list[nn.Module]:
    """The classifiers a head method (MLP-k, Sidetune) feeds, each listed once, after refusing a
    model without them or ``forward_head``, and one that does not pool (its classifier never
    runs); ``reads`` says in the error what the method does with the pooled features."""
    from ..families import get_family, refuse
    family = get_family(model)
    heads = list(dict.fromkeys(family.classifiers(model)))  # a head listed twice counts once
    if not heads or not callable(getattr(model, "forward_head", None)):
        raise refuse(method, "classifier module(s) (get_classifier) and forward_head", model,
                     family)
    if family.pooled(model) is False:
        raise ValueError(f"{reads} pooled features, but this {type(model).__name__} does not "
                         "pool (global_pool='', or a features_only backbone), so its classifier "
                         "never runs; build it with a global pool (the default)")
    return heads


def classifier_width(model: nn.Module, head: nn.Module) -> int:
    """The feature width ``head`` reads: its first layer's input width; for an ``Identity``
    (``num_classes=0``) the model's ``head_hidden_size`` or ``num_features``."""
    for m in head.modules():
        for attr in ("in_features", "in_channels"):
            width = getattr(m, attr, None)
            if isinstance(width, int):
                return width
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not isinstance(width, int):
        raise ValueError(f"cannot tell the input width of {type(model).__name__}'s classifier "
                         f"{type(head).__name__} (no in_features / in_channels, no num_features)")
    return width


def on_channels(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                head: nn.Module) -> torch.Tensor:
    """``fn`` (acting on the last axis) applied on the channel axis ``head`` reads: axis 1 for a
    convolution, the last axis otherwise (Linear, Identity)."""
    if issubclass(original_class(head), nn.modules.conv._ConvNd) and x.ndim > 2:
        return fn(x.movedim(1, -1)).movedim(-1, 1)
    return fn(x)


def per_width(fn: Callable[[torch.Tensor, int], torch.Tensor], feats: torch.Tensor,
              dims: list[int], what: str) -> torch.Tensor:
    """``fn(feats, width)`` for pre-logits ``(B, C)`` of one of ``dims``, or part by part where
    they concatenate the inputs of classifiers of several widths (CrossViT)."""
    width = feats.shape[-1]
    if width in dims:
        return fn(feats, width)
    if feats.ndim == 2 and len(dims) > 1 and width == sum(dims):
        return torch.cat([fn(p, d) for p, d in zip(feats.split(dims, dim=-1), dims)], dim=-1)
    raise ValueError(f"{what} serves classifier inputs of width {dims} (or their "
                     f"concatenation), got features of shape {tuple(feats.shape)}")
