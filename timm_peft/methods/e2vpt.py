"""E²VPT: visual and key-value prompts with token- and segment-wise pruning (draft: KV part)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

from ..core import AdapterModule


class KVPrompt(AdapterModule):
    """Key-value prompts of one attention layer (E²VPT, Han et al., ICCV 2023, Eq. 5).

    ``P_K`` of shape (heads, T_kv, head_dim) goes in front of the projected keys and ``P_V`` in
    front of the values along the sequence axis: ``K' = [P_K; K]``, ``V' = [P_V; V]``; queries are
    unchanged, so attention is N x (T_kv + N). With ``share_kv`` (the paper's choice, Sec. 3.2) one
    tensor serves as both ``P_K`` and ``P_V``, halving the parameters.

    Example:
        >>> p = KVPrompt(num_heads=3, num_tokens=5, head_dim=64)
        >>> k = v = torch.zeros(2, 3, 10, 64)
        >>> [t.shape[2] for t in p(k, v)]
        [15, 15]
    """

    def __init__(self, num_heads: int, num_tokens: int, head_dim: int, share_kv: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_tokens = num_tokens
        self.key = nn.Parameter(torch.empty(num_heads, num_tokens, head_dim, **dd))
        self.value = None if share_kv else nn.Parameter(torch.empty_like(self.key))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform over the (T_kv, head_dim) fan: U(-b, b), b = sqrt(6 / (T_kv·head_dim))."""
        bound = math.sqrt(6.0 / max(1, self.key.shape[1] * self.key.shape[2]))
        for p in (self.key, self.value):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([P_K; K], [P_V; V])`` for keys and values of shape (B, heads, N, head_dim)."""
        batch = k.shape[0]
        pk = self.key.to(k.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        pv = pk if self.value is None else self.value.to(v.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


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


class KVPromptAttention(Attention):
    """timm ``Attention`` whose keys and values are prefixed by its ``kv_prompt`` (a :class:`KVPrompt`).

    Not built directly: :func:`add_kv_prompt` switches an existing ``Attention`` to this class and
    attaches the prompt as a child, so the base weights keep their state-dict keys and
    :func:`remove_kv_prompt` restores the plain module. The forward takes timm's arguments
    (``attn_mask``, ``is_causal``) and always runs ``F.scaled_dot_product_attention``. Prompts
    are concatenated after ``k_norm``: they are keys as attention sees them.
    """

    kv_prompt: KVPrompt

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
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


class KVPromptWindowAttention(WindowAttention):
    """Swin ``WindowAttention`` with key-value prompts in every window.

    Each window's keys and values are prefixed by the same ``kv_prompt``; the relative-position
    bias and the shifted-window mask get zero columns for the prompt keys (prompts have no
    position and belong to every window). Always runs ``F.scaled_dot_product_attention``.
    """

    kv_prompt: KVPrompt

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        k, v = self.kv_prompt(k, v)
        bias = self._get_rel_pos_bias()  # (1, heads, N, N)
        if mask is not None:
            num_win = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.view(1, num_win, 1, N, N).to(bias.dtype))
            bias = bias.expand(B_ // num_win, -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
        bias = F.pad(bias, (self.kv_prompt.num_tokens, 0)).to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


_PROMPTED_ATTENTION: dict[type, type] = {Attention: KVPromptAttention,
                                         WindowAttention: KVPromptWindowAttention}


def add_kv_prompt(attn: nn.Module, num_tokens: int, share_kv: bool = True) -> KVPrompt:
    """Give a timm ``Attention`` or Swin ``WindowAttention`` key-value prompts, in place.

    The module's class is switched to its prompt-aware subclass and the prompt is attached as
    ``attn.kv_prompt``; the base weights keep their names. :func:`remove_kv_prompt` undoes it.

    Example:
        >>> from timm.layers import Attention
        >>> attn = Attention(64, num_heads=4)
        >>> add_kv_prompt(attn, num_tokens=5).key.shape
        torch.Size([4, 5, 16])
    """
    cls = _PROMPTED_ATTENTION.get(type(attn))
    if cls is None:
        raise TypeError(f"key-value prompts support timm {[c.__name__ for c in _PROMPTED_ATTENTION]} "
                        f"modules exactly, got {type(attn).__name__}")
    head_dim = attn.head_dim if isinstance(attn, Attention) else attn.qkv.out_features // (3 * attn.num_heads)
    ref = attn.qkv.weight
    prompt = KVPrompt(attn.num_heads, num_tokens, head_dim, share_kv=share_kv,
                      device=ref.device, dtype=ref.dtype)
    attn.__class__ = cls
    attn.kv_prompt = prompt
    return prompt


def remove_kv_prompt(attn: nn.Module) -> None:
    """Undo :func:`add_kv_prompt`: the plain timm module again, prompt discarded."""
    for base, cls in _PROMPTED_ATTENTION.items():
        if type(attn) is cls:
            del attn.kv_prompt
            attn.__class__ = base
            return


# ----------------------------------------------------------------------------------------------
# Pruning (Sec. 3.3)
# ----------------------------------------------------------------------------------------------

def segment_dims(dim: int, num_segments: int, layout: str) -> torch.Tensor:
    """Segment index of each of the ``dim`` channels of a prompt token.

    ``contiguous`` (the paper: each token "equally divided into R parts") gives channels
    ``[r·d/R, (r+1)·d/R)`` to segment r; ``strided`` (the authors' code) gives channel j to
    segment ``j mod R``.

    Example:
        >>> segment_dims(6, 3, "contiguous").tolist(), segment_dims(6, 3, "strided").tolist()
        ([0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2])
    """
    if dim % num_segments:
        raise ValueError(f"num_segments must divide the prompt width {dim}, got {num_segments}")
    j = torch.arange(dim)
    return j // (dim // num_segments) if layout == "contiguous" else j % num_segments


def select_tokens(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Token-wise pruning: per layer, drop the ``floor(ratio·T)`` lowest-scoring tokens.

    ``scores`` is (L, T); returns the (L, T) boolean keep mask. At least one token per layer is
    kept. Ties go to the earlier token (stable sort).

    Example:
        >>> select_tokens(torch.tensor([[3., 1., 2., 0.]]), 0.5).tolist()
        [[True, False, True, False]]
    """
    L, T = scores.shape
    n_prune = min(int(ratio * T), T - 1)
    keep = torch.ones(L, T, dtype=torch.bool)
    order = torch.argsort(scores.detach().cpu(), dim=1, stable=True)
    keep.scatter_(1, order[:, :n_prune], False)
    return keep


def select_segments(scores: torch.Tensor, keep_tokens: torch.Tensor, ratio: float) -> torch.Tensor:
    """Segment-wise pruning among the surviving tokens' segments, per layer.

    ``scores`` is (L, T, R); of each layer's ``n`` segments belonging to kept tokens the
    ``floor(ratio·n)`` lowest-scoring are dropped (at least one kept). Returns the (L, T, R)
    boolean keep mask, False for every segment of a pruned token.

    Example:
        >>> s = torch.tensor([[[4., 1.], [2., 3.]]])
        >>> select_segments(s, torch.tensor([[True, True]]), 0.5).tolist()
        [[[True, False], [False, True]]]
    """
    L, T, R = scores.shape
    keep = keep_tokens.unsqueeze(-1).expand(L, T, R).clone()
    s = scores.detach().cpu().reshape(L, T * R).masked_fill(~keep.reshape(L, T * R), float("inf"))
    order = torch.argsort(s, dim=1, stable=True)
    for layer in range(L):
        n = int(keep[layer].sum())
        n_prune = min(int(ratio * n), n - 1)
        keep[layer].view(-1)[order[layer, :n_prune]] = False
    return keep
