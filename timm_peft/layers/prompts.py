"""Prompt layers: learnable tokens (VPT, E²VPT) and a learnable pixel border (VPT on ConvNets).

Jia et al., "Visual Prompt Tuning", ECCV 2022 (arXiv:2203.12119), Eq. 1-3 and Sec. 4.2.

* :class:`VisualPrompts` holds the prompt tokens of a group of layers of one width.
* :class:`PromptedBlock` (a :func:`~timm_peft.layers.swap_class` mixin for a token model's block)
  puts its layer's prompts after the prefix tokens before the block runs: it inserts them (first
  prompted block) or overwrites the previous block's prompt outputs (VPT-Deep, paper Eq. 3).
* :class:`PromptedViT` (a mixin for the model) hides the prompts from callers: they are dropped
  after the last block and from every intermediate, so heads, pooling, ``features_only`` and
  ``forward_intermediates`` see exactly the base layout.
* :class:`PixelPrompts` and :class:`PixelPromptedModel`: a border around the image before the
  model's ``forward_features`` / ``forward_intermediates``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .swap import AdapterModule, Swappable, refuse_fx

__all__ = ["VisualPrompts", "PixelPrompts", "PromptedBlock", "PromptedViT", "PromptsAsPrefix",
           "PromptPaddedRelPos", "PromptPaddedBias", "pad_for_prompts",
           "PixelPromptedModel", "prompt_init_bound"]


def prompt_init_bound(patch_size: tuple[int, int], dim: int) -> float:
    """The paper's init bound ``v = sqrt(6 / (3·patch_h·patch_w + d))`` (Xavier-uniform style).

    Example:
        >>> prompt_init_bound((16, 16), 768)
        0.0625
    """
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))


class VisualPrompts(AdapterModule):
    """Prompt tokens of ``num_layers`` layers of width ``d``: ``P ∈ R^{L×T×d_p}`` (paper Eq. 1-3).

    ``embeddings[i]`` are layer ``i``'s prompts; with ``prompt_dim`` set they are stored at width
    ``d_p`` and mapped to ``d`` by a shared, trained linear projection. Dropout acts per sample.

    Example:
        >>> p = VisualPrompts(num_layers=12, num_tokens=50, dim=768)
        >>> p.tokens(3).shape, p(3, batch_size=8).shape
        (torch.Size([50, 768]), torch.Size([1, 50, 768]))
    """

    def __init__(self, num_layers: int, num_tokens: int, dim: int, prompt_dim: int | None = None,
                 dropout: float = 0.0, init: str = "uniform",
                 patch_size: tuple[int, int] = (16, 16)) -> None:
        super().__init__()
        self.dim = dim
        self.init = init
        self.patch_size = tuple(patch_size)
        self.embeddings = nn.Parameter(torch.empty(num_layers, num_tokens, prompt_dim or dim))
        self.proj = nn.Linear(prompt_dim, dim) if prompt_dim else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as configured (``uniform``: the paper's bound for the stored width)."""
        if self.init == "uniform":
            v = prompt_init_bound(self.patch_size, self.embeddings.shape[-1])
            nn.init.uniform_(self.embeddings, -v, v)
        else:
            nn.init.normal_(self.embeddings, std=0.02)
        if isinstance(self.proj, nn.Linear):
            nn.init.kaiming_normal_(self.proj.weight, mode="fan_out")
            nn.init.zeros_(self.proj.bias)

    @property
    def num_layers(self) -> int:
        return self.embeddings.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens each layer's prompts occupy in the sequence (``tokens(i).shape[0]``)."""
        return self.embeddings.shape[1]

    def tokens(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s prompt tokens, ``(T, d)``, before dropout (the override point)."""
        # a copy, not a view: a parameter's view made under no_grad requires grad but has no
        # grad_fn, which torch's module tracker (FlopCounterMode) fails on
        return self.proj(self.embeddings[layer].clone())

    def forward(self, layer: int, batch_size: int) -> torch.Tensor:
        """Layer ``layer``'s prompts for a batch: ``(B, T, d)`` with active dropout, else ``(1, T, d)``."""
        p = self.tokens(layer).unsqueeze(0)
        if self.training and self.dropout.p > 0:
            p = self.dropout(p.expand(batch_size, -1, -1))
        return p

    def extra_repr(self) -> str:
        return f"layers={self.num_layers}, tokens={self.num_tokens}, dim={self.dim}"


class PromptedBlock(Swappable):
    """A token model's block that reads ``[prefix, prompts of its layer, patches]``.

    References (set by :func:`~timm_peft.layers.swap_class`): ``vpt_prompts`` (the
    :class:`VisualPrompts`), ``vpt_layer``, ``vpt_insert`` (True: the sequence has no prompt slots
    yet, insert; False: overwrite the previous block's) and ``vpt_num_prefix``.
    """

    prefix = "Prompted"
    method = "vpt"
    refs = ("vpt_prompts", "vpt_layer", "vpt_insert", "vpt_num_prefix")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        n = self.vpt_num_prefix
        p = self.vpt_prompts(self.vpt_layer, x.shape[0]).to(x.dtype).expand(x.shape[0], -1, -1)
        rest = x[:, n:] if self.vpt_insert else x[:, n + p.shape[1]:]
        return super().forward(torch.cat([x[:, :n], p, rest], dim=1), *args, **kwargs)


def _refuse_attn_mask(kwargs: dict[str, Any]) -> None:
    if kwargs.get("attn_mask") is not None:
        raise ValueError("VPT adds prompt tokens to the sequence, so an attn_mask sized for the "
                         "base sequence does not fit; call without attn_mask")


class PromptedViT(Swappable):
    """Mixin for a ViT-style timm model: blocks see ``[prefix, prompts, patches]``, callers see the
    base layout (prompts dropped after the last block and from every intermediate)."""

    prefix = "Prompted"
    method = "vpt"
    vpt: VisualPrompts

    def _drop_prompts(self, x: torch.Tensor) -> torch.Tensor:
        n, t = self.num_prefix_tokens, self.vpt.num_tokens
        return torch.cat([x[:, :n], x[:, n + t:]], dim=1) if n else x[:, t:]

    def forward_features(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        refuse_fx(self)
        _refuse_attn_mask(kwargs)
        return self._drop_prompts(super().forward_features(x, **kwargs))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False,
                              **kwargs: Any) -> Any:
        """timm's ``forward_intermediates`` with the same outputs as the base (no prompt tokens)."""
        refuse_fx(self)
        _refuse_attn_mask(kwargs)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        # timm splits off the prefix tokens itself; what follows them is [prompts, patches]
        if return_prefix_tokens:  # only then: not every family's method takes the keyword
            kwargs["return_prefix_tokens"] = True
        out = super().forward_intermediates(
            x, indices, norm=norm, stop_early=stop_early, output_fmt="NLC",
            intermediates_only=intermediates_only, **kwargs)
        features, inter = (None, out) if intermediates_only else out
        prefix = None
        if return_prefix_tokens and inter and isinstance(inter[0], tuple):
            prefix, inter = [p for _, p in inter], [y for y, _ in inter]
        t = self.vpt.num_tokens
        maps = [y[:, t:] for y in inter]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
            maps = [y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for y in maps]
        if features is not None:
            features = self._drop_prompts(features)
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": maps}
            if prefix is not None:
                result["image_intermediates_prefix"] = prefix
            if features is not None:
                result["image_features"] = features
            return result
        if prefix is not None:
            maps = list(zip(maps, prefix))
        return maps if intermediates_only else (features, maps)


class PromptsAsPrefix(Swappable):
    """An attention layer that treats its first ``num_prefix_tokens`` tokens apart (e.g. leaves
    them out of rotary embeddings, as EVA's does): prompts sit right after the prefix, so they
    join it for the call and get no rotary position (they have no position).

    Reference: ``vpt_prompts`` (the :class:`VisualPrompts`, for the current number of tokens).
    """

    prefix = "PromptPrefix"
    method = "vpt"
    refs = ("vpt_prompts",)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        base = self.num_prefix_tokens
        self.num_prefix_tokens = base + self.vpt_prompts.num_tokens
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.num_prefix_tokens = base


def pad_for_prompts(bias: torch.Tensor, num_prefix: int, num_prompts: int) -> torch.Tensor:
    """A bias over ``[prefix, patches]`` (last two dims) made for ``[prefix, prompts, patches]``:
    zero for every pair that involves a prompt (prompts have no relative position).

    Example:
        >>> pad_for_prompts(torch.ones(1, 3, 3), 1, 2)[0].int().tolist()
        [[1, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 1, 1], [1, 0, 0, 1, 1]]
    """
    if not num_prompts:
        return bias
    n = num_prefix
    cols = bias.new_zeros(*bias.shape[:-1], num_prompts)
    bias = torch.cat([bias[..., :n], cols, bias[..., n:]], dim=-1)
    rows = bias.new_zeros(*bias.shape[:-2], num_prompts, bias.shape[-1])
    return torch.cat([bias[..., :n, :], rows, bias[..., n:, :]], dim=-2)


class PromptPaddedRelPos(Swappable):
    """An attention layer whose relative-position bias (``_get_rel_pos_bias``, BEiT's) is padded
    with zeros for the prompts after its prefix token(s).

    References: ``vpt_prompts`` and ``vpt_num_prefix``.
    """

    prefix = "PromptPadded"
    method = "vpt"
    refs = ("vpt_prompts", "vpt_num_prefix")

    def _get_rel_pos_bias(self) -> torch.Tensor:
        return pad_for_prompts(super()._get_rel_pos_bias(), self.vpt_num_prefix,
                               self.vpt_prompts.num_tokens)


class PromptPaddedBias(Swappable):
    """A module whose output is a relative-position bias over the sequence (BEiT's shared one),
    padded with zeros for the prompts. References as :class:`PromptPaddedRelPos`."""

    prefix = "PromptPadded"
    method = "vpt"
    refs = ("vpt_prompts", "vpt_num_prefix")

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return pad_for_prompts(super().forward(*args, **kwargs), self.vpt_num_prefix,
                               self.vpt_prompts.num_tokens)


class PixelPrompts(AdapterModule):
    """A learnable border of width ``p`` around ``H×W`` images (paper Sec. 4.2, ConvNets).

    Stored in the model's normalised input space: ``top_bottom`` is ``(2, C, p, W+2p)`` and
    ``left_right`` ``(2, C, H, p)``, i.e. ``2pC(H+W+2p)`` values.

    Example:
        >>> pp = PixelPrompts(3, (32, 32), pad=2, mean=(0.5,) * 3, std=(0.5,) * 3)
        >>> pp(torch.zeros(4, 3, 32, 32)).shape
        torch.Size([4, 3, 36, 36])
    """

    def __init__(self, channels: int, img_size: tuple[int, int], pad: int,
                 mean: tuple[float, ...], std: tuple[float, ...], init: str = "uniform",
                 dropout: float = 0.0) -> None:
        super().__init__()
        (h, w), self.pad, self.init = img_size, pad, init
        self.img_size = (h, w)
        self.top_bottom = nn.Parameter(torch.empty(2, channels, pad, w + 2 * pad))
        self.left_right = nn.Parameter(torch.empty(2, channels, h, pad))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters(mean, std)

    @torch.no_grad()
    def reset_parameters(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """``uniform``: pixels uniform in [0, 1], normalised like the image; ``normal``: N(0, 0.02)."""
        for p in (self.top_bottom, self.left_right):
            if self.init == "uniform":
                m = torch.tensor(mean, dtype=p.dtype).view(1, -1, 1, 1)
                s = torch.tensor(std, dtype=p.dtype).view(1, -1, 1, 1)
                p.copy_((torch.rand_like(p) - m) / s)
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad ``(B, C, H, W)`` images with the border: ``(B, C, H+2p, W+2p)``."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"VPT pixel prompts are made for {self.img_size[0]}×{self.img_size[1]} "
                             f"inputs, got {x.shape[-2]}×{x.shape[-1]}; build the model with "
                             "VPTConfig.img_size set to the input size")
        b = x.shape[0]
        top_bottom = self.top_bottom.to(x.dtype).unsqueeze(1).expand(-1, b, -1, -1, -1)
        left_right = self.left_right.to(x.dtype).unsqueeze(1).expand(-1, b, -1, -1, -1)
        if self.training and self.dropout.p > 0:
            top_bottom, left_right = self.dropout(top_bottom), self.dropout(left_right)
        (top, bottom), (left, right) = top_bottom, left_right
        return torch.cat([top, torch.cat([left, x, right], dim=-1), bottom], dim=-2)

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, pad={self.pad}"


class PixelPromptedModel(Swappable):
    """Mixin for a ConvNet: ``forward_features`` and ``forward_intermediates`` (so
    ``features_only`` too) run on the image with the model's ``vpt`` border around it."""

    prefix = "PixelPrompted"
    method = "vpt"

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        refuse_fx(self)
        return super().forward_features(self.vpt(x), *args, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return super().forward_intermediates(self.vpt(x), *args, **kwargs)
