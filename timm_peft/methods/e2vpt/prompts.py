"""E²VPT's visual prompts: VPT's tokens with a token mask and a segment mask (paper Sec. 3.3)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ...layers.prompts import VisualPrompts

__all__ = ["E2VPTPrompts", "segment_dims"]


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
        token_index = torch.arange(T, device="cpu").expand(L, T)[keep_tokens].view(L, -1)
        kept = torch.gather(keep_segments, 1, token_index.unsqueeze(-1).expand(-1, -1, R))
        with torch.no_grad():
            self.token_mask.copy_(keep_tokens.to(dev))
            self.segment_mask.copy_(keep_segments.to(dev))
            self.embeddings.mul_(self._dense_mask())
        self.token_index = token_index.to(dev)
        self.segment_index = torch.arange(R, device="cpu").expand(L, token_index.shape[1], R)[kept] \
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
        # index bookkeeping on the CPU, also while a model is built on the meta device
        keep = torch.zeros(L, T * R, dtype=torch.bool, device="cpu")
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
