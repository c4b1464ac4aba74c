"""Sidetune's surgery: a side network reads the image, every classifier reads the blend."""
from __future__ import annotations

import math
import threading
from typing import Any

import torch
from torch import nn

from ...core import PeftMethod, register_method
from ...families import Family, get_family, refuse
from ...layers.head import classifier_width, on_channels, per_width, pooled_classifiers
from ...layers.swap import (AdapterModule, Swappable, refuse_fx, restore_class, restore_classes,
                            swap_class)
from .config import SidetuneConfig

__all__ = ["Sidetune", "SideNetwork", "SideTuning", "SidetuneClassifier", "SidetuneForward"]


class SideNetwork(nn.Sequential):
    """AlexNet's convolutional features (Krizhevsky et al. 2012) at any width, average-pooled to
    ``pool × pool`` and flattened: ``(B, C_in, H, W) → (B, channels[-1]·pool²)``.

    Layer ``i``: a convolution (11×11 stride 4 for the first, 5×5 for the second, 3×3 after),
    ReLU, and AlexNet's 3×3 stride-2 max pool after the first, second and last. The pools pad by
    one (AlexNet's do not), so any image of at least 7 px runs (a 32 px one too); on 224 px
    images the maps are 28, 14 and 7 px instead of 27, 13 and 6, with the same parameters.

    Example:
        >>> SideNetwork(3, (8, 16), pool=2)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 64])
    """

    def __init__(self, in_chans: int, channels: tuple[int, ...], pool: int) -> None:
        layers: list[nn.Module] = []
        c_in = in_chans
        for i, c in enumerate(channels):
            k, s, p = (11, 4, 2) if i == 0 else (5, 1, 2) if i == 1 else (3, 1, 1)
            layers += [nn.Conv2d(c_in, c, k, stride=s, padding=p), nn.ReLU()]
            if i in (0, 1) or i == len(channels) - 1:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(pool), nn.Flatten(1)]
        super().__init__(*layers)


class SideTuning(AdapterModule):
    """Everything Sidetune adds (``model.sidetune``): the side network, one bias-free projection
    to each classifier-input width, and the blend weight α.

    During ``model(x)`` the side network's output for ``x`` waits here, per thread, until the
    classifiers read it (:meth:`blend`); outside a forward there is none.

    Example:
        >>> st = SideTuning(SidetuneConfig(alpha=1.0, learn_alpha=False), 3, dims=[8])
        >>> x, f = torch.randn(2, 3, 32, 32), torch.randn(2, 8)
        >>> with st.reading(x):
        ...     torch.equal(st.blend(f, 8), f)  # α = 1: the backbone's features alone
        True
    """

    def __init__(self, config: SidetuneConfig, in_chans: int, dims: list[int]) -> None:
        super().__init__()
        self.side = SideNetwork(in_chans, config.side_channels, config.side_pool)
        side_dim = config.side_channels[-1] * config.side_pool ** 2
        self.proj = nn.ModuleDict({str(d): nn.Linear(side_dim, d, bias=False)
                                   for d in dict.fromkeys(dims)})
        if config.learn_alpha:
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(config.alpha / (1 - config.alpha))))
        else:
            self.register_buffer("alpha_fixed", torch.tensor(float(config.alpha)))

    @property
    def dims(self) -> list[int]:
        return [int(d) for d in self.proj]

    @property
    def alpha(self) -> torch.Tensor:
        """α, the weight of the backbone's features."""
        logit = self._parameters.get("alpha_logit")
        return torch.sigmoid(logit) if logit is not None else self._buffers["alpha_fixed"]

    @staticmethod
    def _key() -> int:
        # per thread, so that two threads running one model never read each other's images;
        # one key while torch.compile / torch.export trace (a trace is one call)
        return 0 if torch.compiler.is_compiling() else threading.get_ident()

    def reading(self, x: torch.Tensor) -> "_Reading":
        """Context in which :meth:`blend` uses the side network's output for images ``x``."""
        return _Reading(self, x)

    def blend(self, feats: torch.Tensor, width: int) -> torch.Tensor:
        """``α·F + (1 - α)·P_width(S(x))`` for pooled features ``F`` ``(B, width)`` (tokens
        ``(B, N, width)`` or a channels-last map ``(B, 1, 1, width)`` get the sample's side
        vector at every position)."""
        side = self.__dict__.get("_peft_side", {}).get(self._key())
        if side is None:
            raise RuntimeError(
                "Sidetune's head reads the side network's features of the image, which only "
                "model(x) computes; forward_head(features) alone has no image: call model(x) "
                "(or timm_peft.disable_adapter(model) for the frozen backbone's head)")
        s = self.proj[str(width)](side).to(feats.dtype)
        # one side vector per sample, over every token or position the classifier reads
        s = s.view(s.shape[0], *[1] * (feats.ndim - 2), s.shape[-1])
        alpha = self.alpha.to(feats.dtype)
        return alpha * feats + (1 - alpha) * s


class _Reading:
    def __init__(self, owner: SideTuning, x: torch.Tensor) -> None:
        self.owner, self.x = owner, x

    def __enter__(self) -> None:
        stash = self.owner.__dict__.setdefault("_peft_side", {})
        key = self.owner._key()
        if key in stash:
            raise RuntimeError("Sidetune's model(x) was re-entered from inside its own forward")
        stash[key] = self.owner.side(self.x)

    def __exit__(self, *exc: Any) -> None:
        self.owner.__dict__["_peft_side"].pop(self.owner._key(), None)


class SidetuneClassifier(Swappable):
    """Mixin for a classifier module: it reads ``α·x + (1 - α)·S(image)`` on its channel axis.
    References: ``sidetune`` (the model's :class:`SideTuning`), ``sidetune_width``."""

    prefix = "Sidetune"
    method = "sidetune"
    refs = ("sidetune", "sidetune_width")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(
            on_channels(lambda t: self.sidetune.blend(t, self.sidetune_width), x, self),
            *args, **kwargs)


class SidetuneForward(Swappable):
    """Mixin for the model: ``forward`` runs the side network on the image for the head;
    ``forward_features`` and ``forward_intermediates`` stay the frozen backbone's."""

    prefix = "Sidetune"
    method = "sidetune"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        refuse_fx(self)
        with self.sidetune.reading(x):
            return super().forward(x, *args, **kwargs)

    def forward_head(self, x: Any, pre_logits: bool = False, **kwargs: Any) -> Any:
        # kwargs: what a model's own forward passes its head (Gemma 4's patch_valid mask)
        if pre_logits:
            st = self.sidetune
            return per_width(st.blend, super().forward_head(x, pre_logits=True, **kwargs), st.dims,
                             "Sidetune")
        return super().forward_head(x, **kwargs)


@register_method
class Sidetune(PeftMethod):
    """Sidetune: a side network on the image, blended with the frozen features before the head."""

    name = "sidetune"
    paper = ('Zhang et al., "Side-Tuning: A Baseline for Network Adaptation via Additive Side '
             'Networks", ECCV 2020 (as the "Sidetune" baseline of Jia et al., "Visual Prompt '
             'Tuning", ECCV 2022).')
    citation = """@inproceedings{zhang2020sidetuning,
  title={Side-Tuning: A Baseline for Network Adaptation via Additive Side Networks},
  author={Zhang, Jeffrey O. and Sax, Alexander and Zamir, Amir and Guibas, Leonidas and Malik, Jitendra},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2020}
}"""
    config_cls = SidetuneConfig
    description = "Sidetune: a side network on the image, alpha-blended with the frozen features"

    def supports(self, family: Family) -> bool:
        return "classifier" in family.capabilities

    def apply(self, model: nn.Module, config: SidetuneConfig) -> nn.Module:
        heads = pooled_classifiers(self.name, model, "Sidetune blends")
        family = get_family(model)
        in_chans = family.in_chans(model)
        if in_chans is None:
            raise refuse(self.name, "the image channels (pretrained_cfg['first_conv'] naming the "
                         "first conv) for its side network", model, family)
        if "sidetune" in model.__dict__ or "sidetune" in model._modules:
            raise ValueError(f"{type(model).__name__} already has an attribute 'sidetune'")
        widths = [classifier_width(model, h) for h in heads]
        ref = next(model.parameters())
        model.sidetune = SideTuning(config, in_chans, widths).to(device=ref.device,
                                                                 dtype=ref.dtype)
        for head, width in zip(heads, widths):
            swap_class(head, SidetuneClassifier, sidetune=model.sidetune, sidetune_width=width)
        swap_class(model, SidetuneForward)
        return model

    def unload(self, model: nn.Module) -> nn.Module:
        restore_classes(model, SidetuneClassifier)
        restore_class(model, SidetuneForward)
        del model.sidetune
        return model
