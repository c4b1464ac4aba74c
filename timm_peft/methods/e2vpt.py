"""E²VPT: Effective and Efficient Visual Prompt Tuning (Han et al., ICCV 2023, arXiv:2307.13770).

E²VPT adds two things to VPT-Deep (:mod:`timm_peft.methods.vpt`, whose machinery it reuses):

* **Key-value prompts** (Sec. 3.2, Eq. 4-5): in every block a tensor ``P_K`` of shape
  (heads, T_kv, head_dim) is concatenated in front of the projected keys and ``P_V`` in front of
  the values; queries are unchanged, so attention is N × (T_kv + N). ``share_kv=True`` (the
  paper's choice) uses one tensor for both. ViT: timm's ``Attention`` becomes
  :class:`KVPromptAttention` (same state-dict keys, same arguments ``attn_mask`` / ``is_causal``,
  masks padded for the prompt keys, always ``F.scaled_dot_product_attention``); prompts are
  concatenated after ``k_norm``. Swin: the prompts join VPT's ``extra_kv`` of every window
  (relative-position bias and shift mask padded with zeros). Init: kaiming-uniform,
  ``U(-b, b)``, ``b = sqrt(6 / (T_kv·head_dim))`` (the authors' "He" init, Table 5b);
  ``kv_init="trunc_normal"`` gives the paper's alternative. ViT-B/16 with 10 visual and 5
  key-value prompts: 12·768·10 + 12·768·5 = 138,240 parameters without the head.
* **Pruning and rewinding** (Sec. 3.3): every layer's visual prompts are multiplied by a token
  mask ρ (T) and a segment mask (T, R) that splits each token into R segments (``num_segments``:
  the paper's 8; the authors' code used 16, strided: ``segment_layout="strided"``). One pass over
  the training data scores every mask entry by ``E|∂L/∂ρ|`` (Eq. 6; the expectation is the mean
  over batches of the batch gradient's magnitude, as in Michel et al. 2019). Per layer the
  ``floor(token_prune_ratio·T)`` lowest tokens are pruned (at least one kept), then in every
  surviving token its ``floor(segment_prune_ratio·R)`` lowest segments (at least one kept): all
  layers of a group keep the same number of tokens and segments, so a pruned adapter is a dense
  tensor. ``importance="signed"`` (the authors' code uses a signed mean) scores by ``-E[∂L/∂ρ]``,
  the first-order estimate of how much the loss rises when the part is removed.
  A caveat we measured: a deep prompt reaches the other tokens only through the block's
  ``norm1``, and LayerNorm is scale-invariant, so ``∂L/∂ρ`` of a whole token is nearly zero (only
  LayerNorm's ε breaks the invariance; about 1000x smaller than segment gradients on a random
  ViT) and token scores carry little signal. ``token_importance="segments"`` scores a token by
  the sum of its segments' scores instead (not in the paper). Rewinding
  retrains the survivors from their initial values (lottery-ticket rewinding;
  ``rewind="random"`` re-initialises them as the authors' code does) with the masks frozen and
  pruned values held at exactly zero; the key-value prompts and the head continue from their
  trained values. On Swin only the stages in ``swin_prune_stages`` are pruned (the paper prunes
  the first stage only, Sec. 4.2).

A pruned token is *removed from the sequence*, not left as a zero token (a zero token still
attends and is attended through the LayerNorm bias), so the masked model, the saved adapter and
the reloaded model compute the same function and inference runs on fewer tokens. The surviving
segments are recorded in the config (``kept_segments``), which is all :meth:`E2VPT.apply` needs
to build the compact model; the saved tensors hold only surviving segments.

The cycle train → score → prune → rewind is one call, :func:`train_prune_rewind`, and runs from
the training CLI through :meth:`E2VPT.training_hooks` when a prune ratio is set (preset
``e2vpt_prune``: token ratio 0.5, segment ratio 0.25, i.e. 62.5% of the visual prompt values, the
rate of the paper's Table 4 SVHN row).

Example:
    >>> import timm, timm_peft
    >>> m = timm.create_model("vit_base_patch16_224.e2vpt", num_classes=0, device="meta")
    >>> timm_peft.get_nb_trainable_parameters(m)[0]
    138240
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..core import (AdapterModule, cfg_field, get_blocks, get_model_family, register_method,
                    register_preset, unwrap_features)
from .vpt import VPT, ExtraKVWindowAttention, VisualPrompts, VPTConfig, add_extra_kv, swap_class

__all__ = ["E2VPTConfig", "E2VPT", "E2VPTPrompts", "KVPrompt", "KVPromptAttention",
           "add_kv_prompt", "remove_kv_prompt", "pad_attn_mask", "compute_importance",
           "prune", "rewind", "compact", "train_prune_rewind", "select_tokens", "select_segments",
           "segment_dims"]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclass
class E2VPTConfig(VPTConfig):
    """Hyper-parameters of E²VPT (defaults from the paper; see the module docstring).

    ``kept_segments`` is written by :func:`prune`: per layer (all prompt groups in forward order),
    the flat indices ``token·R + segment`` of the visual-prompt segments that survived.

    Example:
        >>> E2VPTConfig(num_prompts=10, num_kv_prompts=5).num_segments
        8
    """

    num_prompts: int = cfg_field(10, ge=0, le=1000, help="visual prompt tokens per layer (T; paper: 1-50)")
    num_kv_prompts: int = cfg_field(5, ge=0, le=1000, help="key-value prompt tokens per layer (T_kv)")
    share_kv: bool = cfg_field(True, help="one tensor serves as key and value prompts (paper)")
    kv_init: str = cfg_field("kaiming_uniform", choices=("kaiming_uniform", "trunc_normal"),
                             help="key-value prompt init: He (paper default) or N(0, 0.02) "
                                  "truncated at ±2σ (Table 5b)")
    num_segments: int = cfg_field(8, ge=1, le=1024, help="segments R per prompt token (paper 8, code 16)")
    segment_layout: str = cfg_field("contiguous", choices=("contiguous", "strided"),
                                    help="segment r holds channels [r·d/R, (r+1)·d/R) "
                                         "(contiguous, paper) or j with j mod R = r (code)")
    token_prune_ratio: float = cfg_field(0.0, ge=0.0, lt=1.0,
                                         help="fraction of tokens pruned per layer")
    segment_prune_ratio: float = cfg_field(0.0, ge=0.0, lt=1.0,
                                           help="fraction of segments pruned per surviving token")
    importance: str = cfg_field("abs", choices=("abs", "signed"),
                                help="abs: E|dL/dmask| (paper Eq. 6); signed: -E[dL/dmask]")
    token_importance: str = cfg_field("mask", choices=("mask", "segments"),
                                      help="score a token by its mask's gradient (paper) or by "
                                           "the sum of its segments' scores")
    importance_batches: int | None = cfg_field(None, ge=1, le=100_000,
                                               help="batches in the importance pass (None: all)")
    rewind: str = cfg_field("initial", choices=("initial", "random"),
                            help="survivors restart from their initial values or a fresh init")
    rewind_epochs: int | None = cfg_field(None, ge=1, le=10_000, help="epochs of the rewinding stage "
                                                            "(None: as many as the main training)")
    swin_prune_stages: tuple[int, ...] = cfg_field((0,), ge=0, le=16,
                                                   help="Swin stages whose prompts are pruned")
    kept_segments: tuple[tuple[int, ...], ...] | None = cfg_field(
        None, ge=0, help="set by pruning: per layer, surviving token·R + segment indices")

    def __post_init__(self) -> None:
        # JSON gives nested lists; the declared type is a tuple of tuples
        if isinstance(self.kept_segments, (list, tuple)):
            self.kept_segments = tuple(tuple(v) if isinstance(v, list) else v
                                       for v in self.kept_segments)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.kept_segments is None:
            return
        total = self.num_prompts * self.num_segments
        for i, layer in enumerate(self.kept_segments):
            if not layer or any(not 0 <= v < total for v in layer) or len(set(layer)) != len(layer):
                raise ValueError(f"E2VPTConfig.kept_segments[{i}] must be distinct indices in "
                                 f"[0, num_prompts·num_segments = {total}), at least one; "
                                 f"got {list(layer)}")

    @property
    def pruned(self) -> bool:
        """True once pruning has recorded which segments survive."""
        return self.kept_segments is not None


# ----------------------------------------------------------------------------------------------
# Key-value prompts
# ----------------------------------------------------------------------------------------------

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
        self.hook_handle: RemovableHandle | None = None
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


class KVPromptAttention:
    """Mixin for timm's ``Attention``: keys and values prefixed by ``self.kv_prompt``.

    Applied with VPT's ``swap_class`` by :func:`add_kv_prompt`, so the base weights keep their
    state-dict keys and ``isinstance(attn, Attention)`` holds. Takes timm's arguments
    (``attn_mask``, ``is_causal``) and always runs ``F.scaled_dot_product_attention``.
    """

    prefix = "KVPrompted"
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


def _window_kv_hook(prompt: KVPrompt, attn: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    pk, pv = prompt.prompts()
    return args, add_extra_kv(kwargs, pk.unsqueeze(0), pv.unsqueeze(0))


def add_kv_prompt(attn: nn.Module, num_tokens: int, share_kv: bool = True,
                  init: str = "kaiming_uniform") -> KVPrompt:
    """Give a timm ``Attention`` or Swin ``WindowAttention`` key-value prompts, in place.

    The prompt is attached as ``attn.kv_prompt``; the base weights keep their names.
    ``Attention`` is switched to :class:`KVPromptAttention`; ``WindowAttention`` to VPT's
    :class:`~timm_peft.methods.vpt.ExtraKVWindowAttention`, whose ``extra_kv`` receives the prompts
    from a forward pre-hook (so they compose with VPT's visual prompts). Only these exact timm
    classes are accepted: a subclass may compute attention differently.
    :func:`remove_kv_prompt` undoes it.

    Example:
        >>> from timm.layers import Attention
        >>> attn = Attention(64, num_heads=4)
        >>> add_kv_prompt(attn, num_tokens=5).key.shape
        torch.Size([4, 5, 16])
    """
    restore_target = plain = type(attn)
    if issubclass(plain, ExtraKVWindowAttention):  # VPT already gave it extra keys: see past that
        plain = plain.__bases__[-1]
    if plain not in (Attention, WindowAttention):
        raise TypeError(f"key-value prompts support timm Attention and Swin WindowAttention "
                        f"modules exactly, got {restore_target.__name__}")
    num_heads = attn.num_heads
    head_dim = attn.qkv.out_features // (3 * num_heads)
    ref = attn.qkv.weight
    prompt = KVPrompt(num_heads, num_tokens, head_dim, share_kv=share_kv, init=init,
                      device=ref.device, dtype=ref.dtype)
    attn.kv_prompt = prompt
    if plain is Attention:
        swap_class(attn, KVPromptAttention)
    else:
        swap_class(attn, ExtraKVWindowAttention)
        prompt.hook_handle = attn.register_forward_pre_hook(
            functools.partial(_window_kv_hook, prompt), with_kwargs=True)
    prompt.restore_class = restore_target
    return prompt


def remove_kv_prompt(attn: nn.Module) -> None:
    """Undo :func:`add_kv_prompt`: prompt and hook removed, the module's class as before."""
    prompt = attn.kv_prompt
    if prompt.hook_handle is not None:
        prompt.hook_handle.remove()
    del attn.kv_prompt
    attn.__class__ = prompt.restore_class


# ----------------------------------------------------------------------------------------------
# Visual prompts with token and segment masks
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
        raise ValueError(f"E2VPTConfig.num_segments must divide the prompt width {dim}, "
                         f"got {num_segments}")
    j = torch.arange(dim)
    return j // (dim // num_segments) if layout == "contiguous" else j % num_segments


class E2VPTPrompts(VisualPrompts):
    """VPT's prompt tokens with E²VPT's token mask ρ (L, T) and segment mask (L, T, R).

    Two storage forms compute the same tokens:

    * *dense* (training): ``embeddings`` (L, T, d) as in VPT; ``tokens(i)`` multiplies layer
      ``i`` by its masks and, once pruned, keeps only the surviving tokens. The initial values
      are kept (``initial``, not saved) for rewinding.
    * *compact* (:meth:`to_compact`, or built from a pruned config): ``embeddings``
      (L, T', S', d/R) holds only the surviving segments of the surviving tokens and
      ``tokens(i)`` scatters them into zeros.

    Once pruned, the group's state dict holds the compact form in both cases (and a dense group
    loads it back), so checkpoints and saved adapters never carry pruned values. Masks are
    buffers: never trained, never saved (the config's ``kept_segments`` records them).

    Example:
        >>> p = E2VPTPrompts(2, 4, 16, num_segments=4)
        >>> p.set_masks(torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]]).bool(), torch.ones(2, 4, 4).bool())
        >>> p.tokens(0).shape, p.num_tokens, p.state_dict()["embeddings"].shape
        (torch.Size([3, 16]), 3, torch.Size([2, 3, 4, 4]))
    """

    def __init__(self, num_layers: int, num_tokens: int, dim: int, num_segments: int = 8,
                 segment_layout: str = "contiguous", **kwargs: Any) -> None:
        super().__init__(num_layers, num_tokens, dim, **kwargs)
        width = self.embeddings.shape[-1]
        self.num_segments, self.segment_layout = num_segments, segment_layout
        self.register_buffer("segment_of_dim", segment_dims(width, num_segments, segment_layout),
                             persistent=False)
        self.register_buffer("token_mask", torch.ones(num_layers, num_tokens), persistent=False)
        self.register_buffer("segment_mask", torch.ones(num_layers, num_tokens, num_segments),
                             persistent=False)
        self.register_buffer("initial", self.embeddings.detach().clone(), persistent=False)
        # once pruned: surviving token indices (L, T') and their segment indices (L, T', S')
        self.register_buffer("token_index", None, persistent=False)
        self.register_buffer("segment_index", None, persistent=False)
        self.compact = False

    # --- shape -----------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.token_mask.shape[1] if self.token_index is None else self.token_index.shape[1]

    @property
    def pruned(self) -> bool:
        return self.token_index is not None

    @property
    def width(self) -> int:
        """d: the prompt tokens' width."""
        return self.segment_of_dim.numel()

    @property
    def segment_width(self) -> int:
        return self.width // self.num_segments

    # --- layouts ---------------------------------------------------------------------------
    def _segments_to_channels(self, x: torch.Tensor) -> torch.Tensor:
        """(..., R, d/R) segments -> (..., d) channels in the configured layout."""
        if self.segment_layout == "strided":
            x = x.transpose(-1, -2)
        return x.flatten(-2)

    def _channels_to_segments(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) channels -> (..., R, d/R) segments."""
        if self.segment_layout == "strided":
            return x.unflatten(-1, (self.segment_width, self.num_segments)).transpose(-1, -2)
        return x.unflatten(-1, (self.num_segments, self.segment_width))

    def _expand(self, values: torch.Tensor, segment_index: torch.Tensor) -> torch.Tensor:
        """Surviving segment values (..., T', S', w) -> tokens (..., T', d), zeros elsewhere."""
        full = values.new_zeros(*values.shape[:-2], self.num_segments, values.shape[-1])
        index = segment_index.unsqueeze(-1).expand_as(values)
        return self._segments_to_channels(full.scatter(-2, index, values))

    def _compress(self, dense: torch.Tensor) -> torch.Tensor:
        """Dense (L, T, d) -> surviving segment values (L, T', S', w)."""
        segs = self._channels_to_segments(dense)  # (L, T, R, w)
        index = self.token_index[..., None, None].expand(-1, -1, *segs.shape[2:])
        segs = torch.gather(segs, 1, index)
        index = self.segment_index.unsqueeze(-1).expand(-1, -1, -1, segs.shape[-1])
        return torch.gather(segs, 2, index)

    def _decompress(self, values: torch.Tensor) -> torch.Tensor:
        """Surviving segment values (L, T', S', w) -> dense (L, T, d), zeros where pruned."""
        tokens = self._expand(values, self.segment_index)  # (L, T', d)
        dense = values.new_zeros(self.token_mask.shape[0], self.token_mask.shape[1], self.width)
        return dense.scatter(1, self.token_index.unsqueeze(-1).expand_as(tokens), tokens)

    # --- forward ---------------------------------------------------------------------------
    def tokens(self, layer: int) -> torch.Tensor:
        if self.compact:
            return self.proj(self._expand(self.embeddings[layer], self.segment_index[layer]))
        mask = self.token_mask[layer].unsqueeze(-1) * self.segment_mask[layer][:, self.segment_of_dim]
        e = self.embeddings[layer] * mask.to(self.embeddings.dtype)
        if self.token_index is not None:
            e = e[self.token_index[layer]]
        return self.proj(e)

    # --- state: compact once pruned --------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.pruned and not self.compact:
            values = self._compress(self.embeddings)
            destination[prefix + "embeddings"] = values if keep_vars else values.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "embeddings"
        if self.pruned and not self.compact and key in state_dict:
            values = state_dict[key]
            expected = (*self.segment_index.shape, self.segment_width)
            if tuple(values.shape) == expected:
                with torch.no_grad():
                    dense = self._decompress(values.to(self.embeddings.device, self.embeddings.dtype))
                state_dict = {**state_dict, key: dense}
        super()._load_from_state_dict(state_dict, prefix, *args)

    # --- pruning ---------------------------------------------------------------------------
    def _require_dense(self, what: str) -> None:
        if self.compact:
            raise RuntimeError(f"cannot {what} a compact (exported) E²VPT prompt group: it no "
                               "longer holds the pruned values; prune and rewind before export")

    def set_masks(self, keep_tokens: torch.Tensor, keep_segments: torch.Tensor) -> None:
        """Freeze the masks to boolean keep masks (L, T) and (L, T, R); zero the pruned values.

        Every layer must keep the same number of tokens, and every kept token the same number
        of segments (so the compact form is one dense tensor).
        """
        self._require_dense("prune")
        keep_tokens = keep_tokens.to(torch.bool).cpu()
        keep_segments = keep_segments.to(torch.bool).cpu() & keep_tokens.unsqueeze(-1)
        counts = keep_tokens.sum(1)
        seg_counts = keep_segments.sum(-1)[keep_tokens]
        if counts.unique().numel() != 1 or counts[0] == 0 or seg_counts.unique().numel() > 1 \
                or (seg_counts == 0).any():
            raise ValueError("E²VPT pruning must keep the same number (>= 1) of tokens in every "
                             "layer of a prompt group and the same number (>= 1) of segments in "
                             f"every kept token; got tokens per layer {counts.tolist()}, segments "
                             f"per kept token {sorted(set(seg_counts.tolist()))}")
        L, T, R = keep_segments.shape
        dev = self.token_mask.device
        token_index = torch.arange(T).expand(L, T)[keep_tokens].view(L, -1)
        kept = torch.gather(keep_segments, 1, token_index.unsqueeze(-1).expand(-1, -1, R))
        with torch.no_grad():
            self.token_mask.copy_(keep_tokens.to(dev))
            self.segment_mask.copy_(keep_segments.to(dev))
            self.embeddings.mul_(self._dense_mask())
        self.token_index = token_index.to(dev)
        self.segment_index = torch.arange(R).expand(L, token_index.shape[1], R)[kept] \
            .view(L, token_index.shape[1], -1).to(dev)

    def _dense_mask(self) -> torch.Tensor:
        """(L, T, d) 0/1 mask of the values that survive."""
        mask = self.token_mask.unsqueeze(-1) * self.segment_mask[..., self.segment_of_dim]
        return mask.to(self.embeddings.dtype)

    def kept_segments(self) -> list[tuple[int, ...]]:
        """Per layer, the flat ``token·R + segment`` indices of the surviving segments."""
        if not self.pruned:
            return [tuple(range(self.token_mask.shape[1] * self.num_segments))] * self.num_layers
        flat = self.token_index.unsqueeze(-1) * self.num_segments + self.segment_index
        return [tuple(sorted(int(i) for i in f.flatten())) for f in flat]

    def set_kept_segments(self, kept: Iterable[Iterable[int]] | None) -> None:
        """Give the group the structure of per-layer flat ``token·R + segment`` indices (None:
        unpruned). A compact group stays compact; its values restart at zero."""
        was_compact = self.compact
        if was_compact:
            L, T, _ = self.segment_mask.shape
            self.embeddings = nn.Parameter(self.embeddings.new_zeros(L, T, self.width),
                                           requires_grad=self.embeddings.requires_grad)
            self.compact = False
        if kept is None:
            self.token_mask.fill_(1.0)
            self.segment_mask.fill_(1.0)
            self.token_index = self.segment_index = None
            return
        L, T, R = self.segment_mask.shape
        keep = torch.zeros(L, T * R, dtype=torch.bool)
        for layer, idx in enumerate(kept):
            keep[layer, list(idx)] = True
        keep = keep.view(L, T, R)
        self.set_masks(keep.any(-1), keep)
        if was_compact:
            self.to_compact()

    @torch.no_grad()
    def rewind(self, mode: str = "initial") -> None:
        """Restart the survivors from their initial values (or a fresh init); pruned stay 0."""
        self._require_dense("rewind")
        if mode == "initial":
            self.embeddings.copy_(self.initial)
        else:
            VisualPrompts.reset_parameters(self)
        self.embeddings.mul_(self._dense_mask())

    @torch.no_grad()
    def to_compact(self) -> None:
        """Keep only the surviving values: ``embeddings`` becomes (L, T', S', d/R)."""
        if self.compact:
            return
        if not self.pruned:
            raise RuntimeError("only a pruned E²VPT prompt group can be made compact")
        values = self._compress(self.embeddings).clone()
        self.embeddings = nn.Parameter(values, requires_grad=self.embeddings.requires_grad)
        self.initial = None
        self.compact = True

    def extra_repr(self) -> str:
        state = "compact" if self.compact else ("pruned" if self.pruned else "dense")
        return f"{super().extra_repr()}, segments={self.num_segments}, {state}"


# ----------------------------------------------------------------------------------------------
# Selection rules
# ----------------------------------------------------------------------------------------------

def select_tokens(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Token-wise pruning: per layer, drop the ``floor(ratio·T)`` lowest-scoring tokens.

    ``scores`` is (L, T); returns the (L, T) boolean keep mask. At least one token per layer is
    kept. Ties go to the earlier token (stable sort).

    Example:
        >>> select_tokens(torch.tensor([[3., 1., 2., 0.]]), 0.5).tolist()
        [[True, False, True, False]]
    """
    L, T = scores.shape
    n_prune = max(0, min(int(ratio * T), T - 1))
    keep = torch.ones(L, T, dtype=torch.bool)
    order = torch.argsort(scores.detach().cpu(), dim=1, stable=True)
    keep.scatter_(1, order[:, :n_prune], False)
    return keep


def select_segments(scores: torch.Tensor, keep_tokens: torch.Tensor, ratio: float) -> torch.Tensor:
    """Segment-wise pruning: in every kept token drop its ``floor(ratio·R)`` lowest segments.

    ``scores`` is (L, T, R); returns the (L, T, R) boolean keep mask, all False for pruned
    tokens. At least one segment per kept token is kept.

    Example:
        >>> s = torch.tensor([[[4., 1.], [2., 3.]]])
        >>> select_segments(s, torch.tensor([[True, False]]), 0.5).tolist()
        [[[True, False], [False, False]]]
    """
    L, T, R = scores.shape
    n_prune = max(0, min(int(ratio * R), R - 1))
    keep = torch.ones(L, T, R, dtype=torch.bool)
    order = torch.argsort(scores.detach().cpu(), dim=2, stable=True)
    keep.scatter_(2, order[..., :n_prune], False)
    return keep & keep_tokens.cpu().unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------

def _groups(model: nn.Module) -> list[E2VPTPrompts]:
    """The model's E²VPT prompt groups in forward order (ViT: one, Swin: one per stage)."""
    inner = unwrap_features(model)
    vpt = getattr(inner, "vpt", None)
    groups = [m for m in vpt.modules() if isinstance(m, E2VPTPrompts)] if vpt is not None else []
    if not groups or getattr(inner, "peft_method", None) != E2VPT.name:
        raise ValueError(f"{type(inner).__name__} carries no E²VPT prompts: build it with the "
                         "'.e2vpt' suffix or timm_peft.apply_method(model, 'e2vpt')")
    return groups


def _split_kept(groups: list[E2VPTPrompts], kept: tuple[tuple[int, ...], ...]) -> list[tuple]:
    total = sum(g.num_layers for g in groups)
    if len(kept) != total:
        raise ValueError(f"E2VPTConfig.kept_segments has {len(kept)} layers, the model's prompts "
                         f"have {total}")
    out, start = [], 0
    for g in groups:
        out.append(kept[start:start + g.num_layers])
        start += g.num_layers
    return out


def _set_config(model: nn.Module, config: E2VPTConfig) -> None:
    for m in {id(model): model, id(unwrap_features(model)): unwrap_features(model)}.values():
        m.peft_config = config


@register_method
class E2VPT(VPT):
    """E²VPT on ViT and Swin: VPT-Deep prompts with masks plus key-value prompts (see module)."""

    name = "e2vpt"
    config_cls = E2VPTConfig
    families = ("vit", "swin")
    description = ("E²VPT: visual and key-value prompts, token/segment pruning with rewinding; "
                   "prompts and the head train")

    def make_prompts(self, config: E2VPTConfig, num_layers: int, dim: int,
                     patch_size: tuple[int, int]) -> E2VPTPrompts:
        return E2VPTPrompts(num_layers, config.num_prompts, dim, num_segments=config.num_segments,
                            segment_layout=config.segment_layout, dropout=config.dropout,
                            init=config.init, patch_size=patch_size)

    def apply(self, model: nn.Module, config: E2VPTConfig) -> nn.Module:
        if config.projection_dim is not None:
            raise ValueError("E2VPTConfig.projection_dim must be None: E²VPT prunes the prompt "
                             "values themselves, without a prompt projection")
        super().apply(model, config)
        if config.num_kv_prompts:
            for block in get_blocks(model):
                add_kv_prompt(block.attn, config.num_kv_prompts, share_kv=config.share_kv,
                              init=config.kv_init)
        if config.pruned:  # a pruned adapter: build the compact groups it was saved from
            groups = [m for m in model.vpt.modules() if isinstance(m, E2VPTPrompts)]
            for g, kept in zip(groups, _split_kept(groups, config.kept_segments)):
                g.set_kept_segments(kept)
                g.to_compact()
        return model

    def unload(self, model: nn.Module) -> nn.Module:
        for m in list(model.modules()):
            if isinstance(getattr(m, "kv_prompt", None), KVPrompt):
                remove_kv_prompt(m)
        return super().unload(model)

    def prepare_load(self, model: nn.Module, config: E2VPTConfig) -> None:
        """Give the prompt groups the saved adapter's structure (which segments survived)."""
        groups = _groups(model)
        kept = _split_kept(groups, config.kept_segments) if config.pruned else [None] * len(groups)
        for g, k in zip(groups, kept):
            if g.pruned != (k is not None) or (k is not None and g.kept_segments() != list(k)):
                g.set_kept_segments(k)
        _set_config(model, model.peft_config.replace(kept_segments=config.kept_segments))

    def training_hooks(self, model: nn.Module) -> dict[str, Any]:
        """With a prune ratio set and the model not pruned yet: stages score → prune → rewind."""
        hooks = dict(super().training_hooks(model))
        config: E2VPTConfig = model.peft_config
        if config.pruned or not (config.token_prune_ratio or config.segment_prune_ratio):
            return hooks
        scores: list[dict[str, torch.Tensor]] = []

        def score(m: nn.Module, ctx: Any) -> dict[str, Any]:
            autocast = getattr(ctx, "autocast", contextlib.nullcontext)
            with autocast():
                scores[:] = compute_importance(
                    m, ctx.train_loader, loss_fn=ctx.loss_fn, device=getattr(ctx, "device", None),
                    all_reduce=getattr(ctx, "all_reduce", None),
                    progress=getattr(ctx, "rank", 0) == 0)
            return {}

        def prune_stage(m: nn.Module, ctx: Any) -> dict[str, Any]:
            prune(m, scores)
            return dict(prompt_tokens=[g.num_tokens for g in _groups(m)],
                        prompt_values_kept=sum(g.state_dict()["embeddings"].numel()
                                               for g in _groups(m)))

        def rewind_stage(m: nn.Module, ctx: Any) -> dict[str, Any]:
            rewind(m)
            epochs = config.rewind_epochs or getattr(ctx, "epochs", None)
            if not epochs:
                raise ValueError("E2VPTConfig.rewind_epochs is None and the training loop does not "
                                 "say how many epochs it ran: set rewind_epochs")
            result = ctx.fit(m, epochs, "rewind")
            return dict(result) if isinstance(result, dict) else {}

        hooks["stages"] = [("score", score), ("prune", prune_stage), ("rewind", rewind_stage)]
        return hooks


register_preset("e2vpt_prune", "e2vpt", token_prune_ratio=0.5, segment_prune_ratio=0.25)


# ----------------------------------------------------------------------------------------------
# Importance, pruning, rewinding, export
# ----------------------------------------------------------------------------------------------

def _progress(iterable: Iterable[Any], desc: str, total: int | None, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


def compute_importance(
        model: nn.Module,
        loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        mode: str | None = None,
        max_batches: int | None = None,
        device: torch.device | str | None = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        progress: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Importance of every token and segment mask entry (paper Eq. 6), per prompt group.

    For each batch of ``loader`` the gradient of the batch loss w.r.t. the masks is taken at the
    current masks (all ones before pruning); ``mode="abs"`` averages its magnitude over batches,
    ``"signed"`` averages ``-gradient`` (default: the config's ``importance``); with the config's
    ``token_importance="segments"`` a token's score is the sum of its segments'. The model runs in
    eval mode (no dropout) and no parameter's ``.grad`` is touched. Under data parallelism pass
    ``all_reduce`` (sums a tensor over processes) so every process prunes alike. Returns one
    ``{"token": (L, T), "segment": (L, T, R)}`` per group.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("vit_tiny_patch16_224.e2vpt", img_size=32, depth=2, num_classes=3)
        >>> data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
        >>> s = compute_importance(m, data, progress=False)
        >>> s[0]["token"].shape, s[0]["segment"].shape
        (torch.Size([2, 10]), torch.Size([2, 10, 8]))
    """
    groups = _groups(model)
    for g in groups:
        g._require_dense("score")
    config: E2VPTConfig = unwrap_features(model).peft_config
    mode = mode or config.importance
    if mode not in ("abs", "signed"):
        raise ValueError(f"importance mode must be 'abs' or 'signed', got {mode!r}")
    max_batches = max_batches or config.importance_batches
    masks = [t for g in groups for t in (g.token_mask, g.segment_mask)]
    totals = [torch.zeros_like(t) for t in masks]
    was_training = model.training
    model.eval()
    n = 0
    try:
        for t in masks:
            t.requires_grad_(True)
        total = max_batches if max_batches else (len(loader) if hasattr(loader, "__len__") else None)
        for x, y in _progress(loader, "E²VPT importance", total, progress):
            if max_batches and n >= max_batches:
                break
            if device is not None:
                x, y = x.to(device), y.to(device)
            grads = torch.autograd.grad(loss_fn(model(x), y), masks)
            for acc, g in zip(totals, grads):
                acc.add_(g.abs() if mode == "abs" else -g)
            n += 1
    finally:
        for t in masks:
            t.requires_grad_(False)
        model.train(was_training)
    count = torch.tensor(float(n), device=totals[0].device)
    if all_reduce is not None:
        totals = [all_reduce(t) for t in totals]
        count = all_reduce(count)
    if count.item() == 0:
        raise ValueError("the importance pass got no batches from the data loader")
    out = [(t / count).detach() for t in totals]
    tokens, segments = out[0::2], out[1::2]
    if config.token_importance == "segments":
        tokens = [s.sum(-1) for s in segments]
    return [{"token": t, "segment": s} for t, s in zip(tokens, segments)]


def prune(
        model: nn.Module,
        scores: list[dict[str, torch.Tensor]],
        token_ratio: float | None = None,
        segment_ratio: float | None = None,
) -> E2VPTConfig:
    """Prune the lowest tokens, then segments, from :func:`compute_importance` scores.

    Ratios default to the config's. The masks are frozen, pruned values set to zero and the
    surviving segments recorded in ``model.peft_config.kept_segments`` (returned), so a saved
    adapter is compact. On Swin only ``swin_prune_stages`` are pruned. Pruned tokens leave the
    sequence at once: the model computes exactly what the exported adapter will.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("vit_tiny_patch16_224.e2vpt", img_size=32, depth=2)
        >>> s = [{"token": torch.rand(2, 10), "segment": torch.rand(2, 10, 8)}]
        >>> cfg = prune(m, s, token_ratio=0.5, segment_ratio=0.25)
        >>> len(cfg.kept_segments), len(cfg.kept_segments[0])  # 2 layers, 5 tokens x 6 segments
        (2, 30)
        >>> m.vpt.num_tokens
        5
    """
    groups = _groups(model)
    inner = unwrap_features(model)
    config: E2VPTConfig = inner.peft_config
    if config.pruned:
        raise ValueError("the model's E²VPT prompts are already pruned (peft_config.kept_segments "
                         "is set); prune a model once")
    token_ratio = config.token_prune_ratio if token_ratio is None else token_ratio
    segment_ratio = config.segment_prune_ratio if segment_ratio is None else segment_ratio
    for name, r in (("token_ratio", token_ratio), ("segment_ratio", segment_ratio)):
        if not 0 <= r < 1:
            raise ValueError(f"{name} must be in [0, 1), got {r}")
    if len(scores) != len(groups):
        raise ValueError(f"scores hold {len(scores)} prompt groups, the model has {len(groups)}")
    prunable = range(len(groups))
    if get_model_family(inner) == "swin":
        prunable = [i for i in config.swin_prune_stages if i < len(groups)]
    kept: list[tuple[int, ...]] = []
    for i, (g, s) in enumerate(zip(groups, scores)):
        t_ratio, s_ratio = (token_ratio, segment_ratio) if i in prunable else (0.0, 0.0)
        keep_t = select_tokens(s["token"], t_ratio)
        g.set_masks(keep_t, select_segments(s["segment"], keep_t, s_ratio))
        kept.extend(g.kept_segments())
    new = config.replace(kept_segments=tuple(kept), token_prune_ratio=token_ratio,
                         segment_prune_ratio=segment_ratio)
    _set_config(model, new)
    return new


def rewind(model: nn.Module, mode: str | None = None) -> None:
    """Reset the surviving visual prompts for retraining (default: the config's ``rewind``).

    ``"initial"``: their values at initialisation (lottery-ticket rewinding); ``"random"``: a
    fresh draw from the same init. Pruned values stay exactly zero and receive zero gradient;
    key-value prompts and the head keep their trained values.
    """
    mode = mode or unwrap_features(model).peft_config.rewind
    if mode not in ("initial", "random"):
        raise ValueError(f"rewind mode must be 'initial' or 'random', got {mode!r}")
    for g in _groups(model):
        if not g.pruned:
            raise ValueError("rewind needs a pruned model: call prune first")
        g.rewind(mode)


def compact(model: nn.Module) -> nn.Module:
    """Drop the pruned values from memory: the model becomes what loading its adapter builds."""
    for g in _groups(model):
        g.to_compact()
    return model


def _adamw_fit(loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               lr: float, weight_decay: float, device: torch.device | str | None,
               progress: bool) -> Callable[[nn.Module, int, str], None]:
    """A plain AdamW + cosine loop with the training CLI's ``fit(model, epochs, desc)`` signature."""
    def fit(model: nn.Module, epochs: int, desc: str) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        steps = epochs * len(loader)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        model.train()
        bar = _progress(range(steps), desc, steps, progress)
        it = iter(())
        for _ in bar:
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                x, y = next(it)
            if device is not None:
                x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return fit


def train_prune_rewind(
        model: nn.Module,
        train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
        epochs: int,
        rewind_epochs: int | None = None,
        token_ratio: float | None = None,
        segment_ratio: float | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        fit: Callable[[nn.Module, int, str], None] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        device: torch.device | str | None = None,
        progress: bool = True,
) -> E2VPTConfig:
    """The whole E²VPT cycle: train → score → prune → rewind (retrain), a progress bar per stage.

    ``fit(model, epochs, desc)`` runs a training stage (the training CLI passes its own loop);
    by default a plain AdamW + cosine loop with ``lr`` and ``weight_decay``. Ratios, rewind mode
    and ``rewind_epochs`` default to the config's (``rewind_epochs`` then to ``epochs``). Returns
    the pruned config; ``timm_peft.save_pretrained(model, dir)`` then writes the compact adapter.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("vit_tiny_patch16_224.e2vpt", img_size=32, depth=2, num_classes=3)
        >>> data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
        >>> cfg = train_prune_rewind(m, data, epochs=1, token_ratio=0.5, progress=False)
        >>> m.vpt.num_tokens
        5
    """
    fit = fit or _adamw_fit(train_loader, loss_fn, lr, weight_decay, device, progress)
    fit(model, epochs, "E²VPT train")
    scores = compute_importance(model, train_loader, loss_fn=loss_fn, device=device,
                                progress=progress)
    config = prune(model, scores, token_ratio, segment_ratio)
    rewind(model)
    fit(model, rewind_epochs or config.rewind_epochs or epochs, "E²VPT rewind")
    return config
