"""Attention with extra keys and values: key-value prompts (E²VPT) and prompts shared by every
window of a windowed attention (VPT and E²VPT on Swin).

Han et al., "E²VPT: An Effective and Efficient Approach for Visual Prompt Tuning", ICCV 2023
(arXiv:2307.13770), Sec. 3.2, Eq. 4-5.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import prompted_qkv
from .swap import AdapterModule, Swappable, original_class

__all__ = ["KVPrompt", "KVPromptAttention", "KVPromptEvaAttention", "KVPromptBeitAttention",
           "KVPromptTalkingHeadAttention",
           "ExtraKVWindowAttention", "ExtraKVWindowAttentionV2",
           "extra_kv_mixin", "add_extra_kv", "pad_attn_mask"]


class KVPrompt(AdapterModule):
    """Key-value prompts of one attention layer (E²VPT, Eq. 5).

    ``P_K`` of shape (heads, T_kv, head_dim) goes in front of the projected keys and ``P_V`` in
    front of the values along the sequence axis: ``K' = [P_K; K]``, ``V' = [P_V; V]``. With
    ``share_kv`` one tensor serves as both (Sec. 3.2), halving the parameters.

    Example:
        >>> p = KVPrompt(num_heads=3, num_tokens=5, head_dim=64)
        >>> k = v = torch.zeros(2, 3, 10, 64)
        >>> [t.shape[2] for t in p(k, v)]
        [15, 15]
    """

    def __init__(self, num_heads: int, num_tokens: int, head_dim: int, share_kv: bool = True,
                 init: str = "kaiming_uniform", device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.init = init
        self.key = nn.Parameter(torch.empty(num_heads, num_tokens, head_dim, device=device,
                                            dtype=dtype))
        self.value = None if share_kv else nn.Parameter(torch.empty_like(self.key))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He: ``U(-b, b)``, ``b = sqrt(6 / (T_kv·head_dim))``; or truncated N(0, 0.02)."""
        bound = math.sqrt(6.0 / max(1, self.key.shape[1] * self.key.shape[2]))
        for p in (self.key, self.value):
            if p is None:
                continue
            if self.init == "kaiming_uniform":
                nn.init.uniform_(p, -bound, bound)
            else:
                nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)

    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_K, P_V)``, each (heads, T_kv, head_dim)."""
        return self.key, self.key if self.value is None else self.value

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([P_K; K], [P_V; V])`` for keys and values of shape (B, heads, N, head_dim)."""
        pk, pv = (p.to(k.dtype).unsqueeze(0).expand(k.shape[0], -1, -1, -1) for p in self.prompts())
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)

    def extra_repr(self) -> str:
        return f"heads={self.key.shape[0]}, tokens={self.num_tokens}, " \
               f"head_dim={self.key.shape[2]}, " \
               f"share_kv={self.value is None}"


def pad_attn_mask(attn_mask: Optional[torch.Tensor], is_causal: bool, num_prompts: int,
                  num_queries: int, device: torch.device) -> Optional[torch.Tensor]:
    """Extend a mask over keys K to keys [P; K]: every query sees the ``num_prompts`` prompt keys.

    ``is_causal`` becomes an explicit mask (SDPA's ``is_causal`` aligns a non-square mask at the
    top-left, which would hide image keys from the queries); as in timm's ``Attention`` it takes
    precedence over ``attn_mask``. Boolean masks are padded with True (attend), additive ones with
    0. A mask that broadcasts over keys (last dim 1) is returned unchanged.

    Example:
        >>> pad_attn_mask(None, True, 2, 3, torch.device("cpu")).int().tolist()
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    """
    if is_causal:
        attn_mask = torch.ones(num_queries, num_queries, dtype=torch.bool, device=device).tril()
    if attn_mask is None or num_prompts == 0 or attn_mask.shape[-1] == 1:
        return attn_mask
    fill = True if attn_mask.dtype == torch.bool else 0.0
    pad = attn_mask.new_full((*attn_mask.shape[:-1], num_prompts), fill)
    return torch.cat([pad, attn_mask], dim=-1)


class KVPromptAttention(Swappable):
    """Mixin for timm's ``Attention``: keys and values prefixed by its ``kv_prompt`` child.

    The base weights keep their state-dict keys and ``isinstance(attn, Attention)`` holds. Takes
    timm's arguments (``attn_mask``, ``is_causal``) and always runs
    ``F.scaled_dot_product_attention``.
    """

    prefix = "KVPrompted"
    method = "e2vpt"
    kv_prompt: KVPrompt

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        if isinstance(self.k_norm, nn.Identity):
            # one concatenation onto the packed qkv: q, k and v are views of one saved buffer
            q, k, v = prompted_qkv(self.qkv(x), self.num_heads, *self.kv_prompt.prompts())
            q = self.q_norm(q)
        else:  # k is normalised before the prompts go in front of it
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            k, v = self.kv_prompt(k, v)
        attn_mask = pad_attn_mask(attn_mask, is_causal, self.kv_prompt.num_tokens, N, x.device)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = getattr(self, "norm", nn.Identity())(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def add_extra_kv(extra: tuple[torch.Tensor, torch.Tensor] | None, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``extra`` keys and values with ``(k, v)`` (each ``(1 or B_, heads, T, head_dim)``) after them."""
    if extra is None:
        return k, v
    b = max(extra[0].shape[0], k.shape[0])
    return (torch.cat([extra[0].expand(b, -1, -1, -1), k.expand(b, -1, -1, -1)], dim=2),
            torch.cat([extra[1].expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)], dim=2))


class ExtraKVWindowAttention(Swappable):
    """Mixin for timm's Swin ``WindowAttention``: every window's queries also attend to extra keys
    and values in front of the window's own; relative-position bias and the shifted-window mask
    are zero for them.

    The extra keys and values come, in this order, from the ``extra_kv`` argument (each
    ``(1 or B_, heads, T, head_dim)``), from the block's visual prompts (reference
    ``window_prompts = (prompts, layer, norm)``: the prompts are normalised by the block's
    ``norm1`` and projected by the frozen ``qkv``, like any token; dropout, if set, per window)
    and from a ``kv_prompt`` child (E²VPT). Without any this is timm's own forward.
    """

    prefix = "Prompted"
    method = "vpt"
    refs = ("window_prompts",)

    def _extra_kv(self, x: torch.Tensor, extra: tuple[torch.Tensor, torch.Tensor] | None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
        source = self.__dict__.get("window_prompts")
        if source is not None and source[0].num_tokens:
            prompts, layer, norm = source
            p = norm(prompts(layer, x.shape[0]).to(x.dtype))
            b, t, _ = p.shape
            _, k, v = self._project(p).reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            extra = add_extra_kv(extra, k, v)
        kv_prompt = self._modules.get("kv_prompt")
        if kv_prompt is not None:
            pk, pv = kv_prompt.prompts()
            extra = add_extra_kv(extra, pk.unsqueeze(0), pv.unsqueeze(0))
        return extra

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The attention's own ``qkv`` projection of ``x`` (window tokens or prompts)."""
        return self.qkv(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        extra_kv = self._extra_kv(x, extra_kv)
        if extra_kv is None or extra_kv[0].shape[-2] == 0:
            return super().forward(x, mask=mask)
        b_, n, c = x.shape
        t = extra_kv[0].shape[-2]
        q, k, v = self._project(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
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


class ExtraKVWindowAttentionV2(ExtraKVWindowAttention):
    """:class:`ExtraKVWindowAttention` for timm's Swin-V2 ``WindowAttention`` (Liu et al., "Swin
    Transformer V2", CVPR 2022, Sec. 3.2): scaled cosine attention and a continuous position
    bias. The extra keys are normalised like the window's own (cosine similarity needs no
    special case) and get no position bias, as in Swin; the projection applies V2's separate
    query and value biases to prompts too.
    """

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return _biased_qkv(self, x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        extra_kv = self._extra_kv(x, extra_kv)
        if extra_kv is None or extra_kv[0].shape[-2] == 0:
            return super(ExtraKVWindowAttention, self).forward(x, mask=mask)  # timm's own
        b_, n, c = x.shape
        t = extra_kv[0].shape[-2]
        q, k, v = self._project(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        k = torch.cat([extra_kv[0].to(k.dtype).expand(b_, -1, -1, -1), k], dim=2)
        v = torch.cat([extra_kv[1].to(v.dtype).expand(b_, -1, -1, -1), v], dim=2)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = attn + F.pad(16 * torch.sigmoid(bias), (t, 0)).unsqueeze(0)  # (1, heads, N, T+N)
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, n, t + n) + \
                F.pad(mask, (t, 0)).unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, t + n)
        x = (self.attn_drop(self.softmax(attn)) @ v).transpose(1, 2).reshape(b_, n, c)
        return self.proj_drop(self.proj(x))


def _biased_qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The packed ``qkv`` of an attention with separate q/k/v biases (EVA, BEiT, Swin-V2)."""
    if getattr(attn, "q_bias", None) is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if attn.qkv_bias_separate:
        return attn.qkv(x) + bias
    return F.linear(x, attn.qkv.weight, bias)


class KVPromptEvaAttention(Swappable):
    """Mixin for timm's rotary attentions, ``EvaAttention`` (EVA, EVA-02, DINOv3) and
    ``AttentionRope`` (ROPE-ViT, PE, Sapiens2): keys and values prefixed by its ``kv_prompt``
    child, after the query/key norms, the rotary embedding (prompts get none, as the prefix
    tokens) and the grouped-query expansion of keys and values; an attention mask is padded so
    every query sees the prompts."""

    prefix = "KVPrompted"
    method = "e2vpt"
    kv_prompt: KVPrompt

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        from timm.layers import apply_rot_embed_cat
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        kv_heads = getattr(self, "num_kv_heads", self.num_heads)
        if self.qkv is not None:
            q, k, v = _biased_qkv(self, x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k, v = (p(x).reshape(B, N, kv_heads, -1).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        groups = getattr(self, "num_kv_groups", 1)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        k, v = self.kv_prompt(k, v)
        attn_mask = pad_attn_mask(attn_mask, is_causal, self.kv_prompt.num_tokens, N, x.device)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class KVPromptBeitAttention(Swappable):
    """Mixin for timm's BEiT ``Attention``: keys and values prefixed by its ``kv_prompt`` child;
    the relative position bias (its own and the shared one) is zero for the prompt keys."""

    prefix = "KVPrompted"
    method = "e2vpt"
    kv_prompt: KVPrompt

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        B, N, C = x.shape
        # one concatenation onto the packed qkv (q, k and v views of one saved buffer), as in
        # KVPromptAttention: prompts concatenated to k and to v separately would be saved next
        # to the qkv output that q keeps alive (2/3 of it again, in every block)
        q, k, v = prompted_qkv(_biased_qkv(self, x), self.num_heads, *self.kv_prompt.prompts())
        bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        if bias is not None:
            bias = F.pad(bias, (self.kv_prompt.num_tokens, 0))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


class KVPromptTalkingHeadAttention(Swappable):
    """Mixin for timm's CaiT ``TalkingHeadAttn`` (Touvron et al., ICCV 2021, Sec. 3): keys and
    values prefixed by its ``kv_prompt`` child; the talking-heads projections mix the heads of
    every (query, key) pair, prompt keys included, as they do for the patches' keys."""

    prefix = "KVPrompted"
    method = "e2vpt"
    kv_prompt: KVPrompt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = self.kv_prompt(k, v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
        attn = self.attn_drop(self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))


@functools.lru_cache(maxsize=None)
def _attention_mixins() -> dict[type, type]:
    from timm.layers import Attention
    from timm.layers.attention import AttentionRope
    from timm.models.beit import Attention as BeitAttention
    from timm.models.cait import TalkingHeadAttn
    from timm.models.eva import EvaAttention
    from timm.models.swin_transformer import WindowAttention
    from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
    return {Attention: KVPromptAttention, EvaAttention: KVPromptEvaAttention,
            AttentionRope: KVPromptEvaAttention,
            BeitAttention: KVPromptBeitAttention, TalkingHeadAttn: KVPromptTalkingHeadAttention,
            WindowAttention: ExtraKVWindowAttention,
            WindowAttentionV2: ExtraKVWindowAttentionV2}


def extra_kv_mixin(attn: nn.Module) -> type | None:
    """The mixin that gives ``attn`` extra keys and values, for the exact timm attention classes
    whose computation it reproduces (a subclass may compute attention differently); else None.

    Example:
        >>> from timm.layers import Attention
        >>> extra_kv_mixin(Attention(64)).__name__
        'KVPromptAttention'
    """
    return _attention_mixins().get(original_class(attn))
