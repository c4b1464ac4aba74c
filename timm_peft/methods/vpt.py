"""VPT: Visual Prompt Tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv:2203.12119).

A frozen backbone reads ``T`` learnable prompt tokens (the paper's ``p`` prompts ``P``) next to
its own tokens; only the prompts and the head train.

* ``vpt`` (VPT-Deep, the default): a new set of prompts ``P_{i-1}`` enters every block ``L_i``;
  the previous block's prompt outputs are discarded (paper Eq. 3). ``L·T·d`` parameters:
  460,800 for 50 prompts on ViT-B/16.
* ``vpt_shallow`` (VPT-Shallow): prompts enter the first block only and their outputs ``Z_i``
  flow on through the network (paper Eq. 2). ``T·d`` parameters: 38,400 on ViT-B/16.

Per family:

* **ViT** — ``[x, P, E]``: prompts sit right after the prefix tokens (class and register tokens,
  ``num_prefix_tokens``), after the position embedding (they carry none), so ``no_embed_class``,
  ``reg_tokens`` and dynamic image sizes need nothing special. The model stays a
  ``VisionTransformer`` (its class becomes a subclass, :data:`PromptedVisionTransformer`); prompts
  are inserted and overwritten by forward pre-hooks on the blocks, and ``forward_features`` /
  ``forward_intermediates`` drop them again, so the head, every ``global_pool`` (``token``:
  class token; ``avg``/``max``/``avgmax``: image tokens only, as the paper's "Image-pool"; ``map``
  and ``prr``: what they read before), ``features_only`` and intermediates see exactly the base
  layout. timm's ``Attention`` (SDPA) is untouched.
* **Swin** — deep prompts only, one set per block at its stage's width. Within every local window
  the window tokens also attend to the block's prompts (normalised by the block's ``norm1`` and
  projected by its frozen ``qkv``, like any token); the relative-position bias and the shifted-
  window mask are padded with zeros for them, so prompts are visible from every window. The
  prompts' own outputs would be discarded before the next block and before patch merging (the
  paper's reading, Sec. 4.2), so they are never computed: prompts enter as extra keys and values.
  Prompt dropout, if set, draws its mask per window.
  The authors' variant (one prompt set carried through blocks and merging, averaged over
  windows) is not offered, and neither is VPT-Shallow on Swin, whose carried prompt outputs the
  paper leaves undefined across windows.
* **ConvNets** (ResNet, ConvNeXt) — a learnable pixel border of width ``p`` (``pad_size``) around
  the image: the stem sees an ``(H+2p)×(W+2p)`` input (paper Sec. 4.2, "Apply VPT to ConvNets").
  Pixels are stored in the model's normalised input space and initialised as an image drawn from
  uniform(0, 1) and normalised with the model's mean and std (the authors' init).

Defaults follow the paper (and ``shared/notes/methods.md``): uniform(-v, v) init with
``v = sqrt(6 / (3·patch_h·patch_w + d))`` (0.0625 for ViT-B/16), no prompt dropout (the authors
ran with 0.1), no projection. Saved adapters hold the prompts (+ projection) and the head only.

Extension interface (E²VPT and other prompt methods reuse this machinery):

* :class:`VPTConfig` is a dataclass: subclass it to add fields.
* :meth:`VPT.make_prompts` ``(config, num_layers, dim, patch_size) -> VisualPrompts`` is the one
  place that creates a prompt container; it is called once per group of layers of one width
  (ViT: once for all blocks, Swin: once per stage). Override it to return a
  :class:`VisualPrompts` subclass.
* :meth:`VisualPrompts.tokens` ``(layer) -> Tensor[T', d]`` is the one place where a layer's
  prompt tokens are produced (projection included, dropout not); every family reads prompts
  through it. Override it to transform them (e.g. multiply by a token mask ``(T,)`` and a segment
  mask ``(T, R)``). ``T'`` may be smaller than the configured ``num_prompts`` (a pruned export);
  :attr:`VisualPrompts.num_tokens` must then return ``T'``, and all layers must agree on it.
* :meth:`VisualPrompts.attach` registers a hook whose handle the container owns, and
  :meth:`VPT.unload` removes them all; :func:`swap_class` / :func:`restore_classes` give a module
  extra behaviour without changing its state-dict keys or ``isinstance``.
* Swin windows take extra keys and values through ``extra_kv`` (see :class:`ExtraKVWindowAttention`):
  a forward pre-hook on the window attention adds its own with :func:`add_extra_kv`, so several
  sources (visual prompts, key-value prompts) compose.
* The prompt module(s) live at ``model.vpt`` (a :class:`VisualPrompts`, a ``ModuleList`` of one
  per Swin stage, or :class:`PixelPrompts`).

Example:
    >>> import timm, timm_peft
    >>> m = timm.create_model("vit_base_patch16_224.vpt", num_classes=0, device="meta")
    >>> timm_peft.get_nb_trainable_parameters(m)[0]
    460800
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..core import (AdapterModule, PeftConfig, PeftMethod, cfg_field, get_model_family,
                    register_method, register_preset)

__all__ = ["VPTConfig", "VPT", "VisualPrompts", "PixelPrompts", "ExtraKVWindowAttention",
           "PromptedViT", "add_extra_kv", "swap_class", "restore_classes", "prompt_init_bound"]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

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


def prompt_init_bound(patch_size: tuple[int, int], dim: int) -> float:
    """The paper's init bound ``v = sqrt(6 / (3·patch_h·patch_w + d))`` (Xavier-uniform style).

    Example:
        >>> prompt_init_bound((16, 16), 768)
        0.0625
    """
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))


# ----------------------------------------------------------------------------------------------
# Prompt containers
# ----------------------------------------------------------------------------------------------

class _PromptModule(AdapterModule):
    """An adapter module that owns the hooks wiring it into the base model."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_handles: list[RemovableHandle] = []

    def attach(self, module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False) -> None:
        """Register ``hook`` as a forward pre-hook of ``module``; :meth:`detach` removes it."""
        self.hook_handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def detach(self) -> None:
        """Remove every hook registered through :meth:`attach`."""
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles.clear()


class VisualPrompts(_PromptModule):
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


class PixelPrompts(_PromptModule):
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


# ----------------------------------------------------------------------------------------------
# Class swapping: new behaviour, same state-dict keys and isinstance
# ----------------------------------------------------------------------------------------------

_SWAPPED: dict[tuple[type, type], type] = {}
_BASE_OF: dict[type, type] = {}


def swap_class(module: nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of ``(mixin, type(module))``: ``mixin``'s methods win, keys stay.

    The generated class is cached and named ``mixin.prefix + base name`` (e.g.
    ``PromptedVisionTransformer``); :func:`restore_classes` undoes the swap.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> class Loud:
        ...     prefix = "Loud"
        >>> swap_class(lin, Loud); type(lin).__name__, isinstance(lin, nn.Linear)
        ('LoudLinear', True)
        >>> restore_classes(lin); type(lin).__name__
        'Linear'
    """
    base = type(module)
    if issubclass(base, mixin):
        return
    if (mixin, base) not in _SWAPPED:
        name = getattr(mixin, "prefix", mixin.__name__) + base.__name__
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        _SWAPPED[(mixin, base)] = cls
        _BASE_OF[cls] = base
    module.__class__ = _SWAPPED[(mixin, base)]


def restore_classes(model: nn.Module) -> None:
    """Give every module in ``model`` whose class :func:`swap_class` changed its original class."""
    for m in model.modules():
        while type(m) in _BASE_OF:
            m.__class__ = _BASE_OF[type(m)]


# ----------------------------------------------------------------------------------------------
# ViT: prompts between the prefix and patch tokens, only inside the blocks
# ----------------------------------------------------------------------------------------------

def _vit_block_hook(prompts: VisualPrompts, layer: int, insert: bool, num_prefix: int,
                    block: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Insert layer ``layer``'s prompts after the prefix tokens, or overwrite the prompt slots."""
    x = args[0]
    p = prompts(layer, x.shape[0]).to(x.dtype).expand(x.shape[0], -1, -1)
    rest = x[:, num_prefix:] if insert else x[:, num_prefix + p.shape[1]:]
    return (torch.cat([x[:, :num_prefix], p, rest], dim=1), *args[1:])


def _refuse_attn_mask(kwargs: dict[str, Any]) -> None:
    if kwargs.get("attn_mask") is not None:
        raise ValueError("VPT adds prompt tokens to the sequence, so an attn_mask sized for the "
                         "base sequence does not fit; call without attn_mask")


class PromptedViT:
    """Mixin for timm's ``VisionTransformer``: blocks see ``[prefix, prompts, patches]``, callers
    see the base layout (prompts dropped after the last block and from every intermediate)."""

    prefix = "Prompted"
    vpt: VisualPrompts

    def _drop_prompts(self, x: torch.Tensor) -> torch.Tensor:
        n, t = self.num_prefix_tokens, self.vpt.num_tokens
        return torch.cat([x[:, :n], x[:, n + t:]], dim=1) if n else x[:, t:]

    def forward_features(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        _refuse_attn_mask(kwargs)
        return self._drop_prompts(super().forward_features(x, **kwargs))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False,
                              **kwargs: Any) -> Any:
        """timm's ``forward_intermediates`` with the same outputs as the base (no prompt tokens)."""
        _refuse_attn_mask(kwargs)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        # timm splits off the prefix tokens itself; what follows them is [prompts, patches]
        out = super().forward_intermediates(
            x, indices, return_prefix_tokens=return_prefix_tokens, norm=norm,
            stop_early=stop_early, output_fmt="NLC", intermediates_only=intermediates_only,
            output_dict=True, **kwargs)
        t = self.vpt.num_tokens
        maps = [y[:, t:] for y in out["image_intermediates"]]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
            maps = [y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for y in maps]
        prefix = out.get("image_intermediates_prefix")
        features = self._drop_prompts(out["image_features"]) if not intermediates_only else None
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


# ----------------------------------------------------------------------------------------------
# Swin: window attention with extra keys and values shared by every window
# ----------------------------------------------------------------------------------------------

def add_extra_kv(kwargs: dict[str, Any], k: torch.Tensor, v: torch.Tensor) -> dict[str, Any]:
    """``kwargs`` with ``(k, v)`` (each ``(1 or B_, heads, T, head_dim)``) added to ``extra_kv``.

    For forward pre-hooks (``with_kwargs=True``) on an :class:`ExtraKVWindowAttention`; sources
    already present keep their place in front.
    """
    old = kwargs.get("extra_kv")
    if old is not None:
        b = max(old[0].shape[0], k.shape[0])
        k = torch.cat([old[0].expand(b, -1, -1, -1), k.expand(b, -1, -1, -1)], dim=2)
        v = torch.cat([old[1].expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)], dim=2)
    return {**kwargs, "extra_kv": (k, v)}


class ExtraKVWindowAttention:
    """Mixin for timm's Swin ``WindowAttention``: ``forward(x, mask=None, extra_kv=None)``.

    ``extra_kv = (k, v)``, each ``(1 or B_, heads, T, head_dim)``, are keys and values every
    window's queries attend to in front of the window's own: relative-position bias and the
    shifted-window mask are zero for them. Without ``extra_kv`` this is timm's own forward.
    """

    prefix = "Prompted"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if extra_kv is None or extra_kv[0].shape[-2] == 0:
            return super().forward(x, mask=mask)
        b_, n, c = x.shape
        t = extra_kv[0].shape[-2]
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        k = torch.cat([extra_kv[0].to(k.dtype).expand(b_, -1, -1, -1), k], dim=2)
        v = torch.cat([extra_kv[1].to(v.dtype).expand(b_, -1, -1, -1), v], dim=2)
        bias = F.pad(self._get_rel_pos_bias(), (t, 0))  # (1, heads, N, T+N)
        if mask is not None:
            num_win = mask.shape[0]
            mask = F.pad(mask, (t, 0)).to(bias.dtype)  # (nW, N, T+N)
        if self.fused_attn:
            if mask is not None:
                mask = mask.view(1, num_win, 1, n, t + n).expand(b_ // num_win, -1, self.num_heads, -1, -1)
                bias = bias + mask.reshape(-1, self.num_heads, n, t + n)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            if mask is not None:
                attn = attn.view(-1, num_win, self.num_heads, n, t + n) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, n, t + n)
            x = self.attn_drop(self.softmax(attn)) @ v
        x = x.transpose(1, 2).reshape(b_, n, -1)
        return self.proj_drop(self.proj(x))


def _swin_attn_hook(prompts: VisualPrompts, layer: int, norm: nn.Module, attn: nn.Module,
                    args: tuple[Any, ...], kwargs: dict[str, Any],
                    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Give every window of block ``layer`` its prompts' keys and values (as tokens: ``norm1``, ``qkv``)."""
    if prompts.num_tokens == 0:
        return None
    p = norm(prompts(layer, args[0].shape[0]).to(args[0].dtype))  # dropout, if any, per window
    b, t, _ = p.shape
    _, k, v = attn.qkv(p).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return args, add_extra_kv(kwargs, k, v)


# ----------------------------------------------------------------------------------------------
# ConvNets: a pixel border in front of the stem
# ----------------------------------------------------------------------------------------------

def _pixel_hook(prompts: PixelPrompts, stem: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (prompts(args[0]), *args[1:])


_CONV_STEMS = {"resnet": "conv1", "convnext": "stem"}


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------

def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@register_method
class VPT(PeftMethod):
    """Visual prompt tuning on ViT, Swin and ConvNets (see the module docstring)."""

    name = "vpt"
    config_cls = VPTConfig
    families = ("vit", "swin", "convnext", "resnet")
    description = "visual prompt tuning: learnable prompt tokens (every block if deep) and the head train"

    def make_prompts(self, config: VPTConfig, num_layers: int, dim: int,
                     patch_size: tuple[int, int]) -> VisualPrompts:
        """The prompt container of ``num_layers`` layers of width ``dim`` (override point)."""
        return VisualPrompts(num_layers, config.num_prompts, dim, prompt_dim=config.projection_dim,
                             dropout=config.dropout, init=config.init, patch_size=patch_size)

    def apply(self, model: nn.Module, config: VPTConfig) -> nn.Module:
        family = get_model_family(model)
        if family in _CONV_STEMS:
            return self._apply_convnet(model, config, _CONV_STEMS[family])
        return {"vit": self._apply_vit, "swin": self._apply_swin}[family](model, config)

    @staticmethod
    def _place(module: nn.Module, model: nn.Module) -> nn.Module:
        ref = next(model.parameters())
        return module.to(device=ref.device, dtype=ref.dtype)

    def _apply_vit(self, model: nn.Module, config: VPTConfig) -> nn.Module:
        blocks = list(model.blocks)
        patch = _pair(getattr(model.patch_embed, "patch_size", 16))
        prompts = self._place(self.make_prompts(config, len(blocks) if config.deep else 1,
                                                model.embed_dim, patch), model)
        model.vpt = prompts
        for i, block in enumerate(blocks if config.deep else blocks[:1]):
            prompts.attach(block, functools.partial(_vit_block_hook, prompts, i, i == 0,
                                                    model.num_prefix_tokens))
        swap_class(model, PromptedViT)
        return model

    def _apply_swin(self, model: nn.Module, config: VPTConfig) -> nn.Module:
        if not config.deep:
            raise ValueError("VPTConfig.deep=False (VPT-Shallow) is not supported on Swin: prompt "
                             "outputs carried across local windows are not defined by the paper; "
                             "allowed on Swin: deep=True (preset 'vpt')")
        patch = _pair(model.patch_embed.patch_size)
        stages = nn.ModuleList()
        for stage in model.layers:
            blocks = list(stage.blocks)
            prompts = self._place(self.make_prompts(config, len(blocks), blocks[0].dim, patch), model)
            stages.append(prompts)
            for j, block in enumerate(blocks):
                swap_class(block.attn, ExtraKVWindowAttention)
                prompts.attach(block.attn, functools.partial(_swin_attn_hook, prompts, j, block.norm1),
                               with_kwargs=True)
        model.vpt = stages
        return model

    def _apply_convnet(self, model: nn.Module, config: VPTConfig, stem_name: str) -> nn.Module:
        if config.projection_dim is not None:
            raise ValueError("VPTConfig.projection_dim applies to prompt tokens; ConvNet prompts "
                             "are pixels: leave projection_dim=None")
        pc = getattr(model, "pretrained_cfg", None) or {}
        size = _pair(config.img_size) if config.img_size is not None else _pair(
            tuple(pc.get("input_size", (3, 224, 224))[-2:]))
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        prompts = PixelPrompts(conv.in_channels, size, config.pad_size,
                               mean=tuple(pc.get("mean", IMAGENET_DEFAULT_MEAN)),
                               std=tuple(pc.get("std", IMAGENET_DEFAULT_STD)),
                               init=config.init, dropout=config.dropout)
        model.vpt = self._place(prompts, model)
        model.vpt.attach(getattr(model, stem_name), functools.partial(_pixel_hook, model.vpt))
        return model

    def unload(self, model: nn.Module) -> nn.Module:
        for m in model.vpt.modules():
            if isinstance(m, _PromptModule):
                m.detach()
        del model.vpt
        restore_classes(model)
        return model


register_preset("vpt_shallow", "vpt", deep=False)
