"""E²VPT's pruning (paper Sec. 3.3): importance scores, token and segment pruning, rewinding."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...core import unwrap_features
from .config import E2VPTConfig
from .prompts import E2VPTPrompts

__all__ = ["compute_importance", "prune", "rewind", "compact", "train_prune_rewind",
           "select_tokens", "select_segments"]


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
# Prompt groups of a model
# ----------------------------------------------------------------------------------------------

def _groups(model: nn.Module) -> list[E2VPTPrompts]:
    """The model's E²VPT prompt groups in forward order (ViT: one, Swin: one per stage)."""
    inner = unwrap_features(model)
    vpt = getattr(inner, "vpt", None)
    groups = [m for m in vpt.modules() if isinstance(m, E2VPTPrompts)] if vpt is not None else []
    if not groups or getattr(inner, "peft_method", None) != "e2vpt":
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
    ``"signed"`` averages ``-gradient`` (default: the config's ``importance``). With the config's
    ``token_importance="segments"`` (default) a token's score is the sum of its segments'; with
    ``"mask"`` the gradient of its token mask (the paper's literal score, ~0 behind LayerNorm: see
    :class:`E2VPTConfig`). With ``mask_layout="shared"`` (the authors' code) one mask serves every
    layer of a group: each batch's gradients are summed over the layers before the magnitude is
    taken, and every layer gets that score, so every layer prunes the same tokens and segments. The model runs in
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
            if config.mask_layout == "shared":  # one mask for all layers: its gradient is the sum
                grads = [g.sum(0, keepdim=True).expand_as(g) for g in grads]
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
    if len(groups) > 1:  # one group per stage: prune the configured stages only
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


def train_prune_rewind(
        model: nn.Module,
        train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
        epochs: int,
        *,
        fit: Callable[[nn.Module, int, str], Any],
        rewind_epochs: int | None = None,
        token_ratio: float | None = None,
        segment_ratio: float | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        device: torch.device | str | None = None,
        progress: bool = True,
) -> E2VPTConfig:
    """The whole E²VPT cycle: train → score → prune → rewind (retrain), a progress bar per stage.

    ``fit(model, epochs, desc)`` runs a training stage with the caller's loop: timm_peft's
    training loop runs this cycle itself (``E2VPT.training_hooks`` stages, with
    :class:`timm_peft.train.StageContext`'s ``fit``), so there is one way to train. Ratios, rewind
    mode and ``rewind_epochs`` default to the config's (``rewind_epochs`` then to ``epochs``).
    Returns the pruned config; ``timm_peft.save_pretrained(model, dir)`` then writes the compact
    adapter.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("vit_tiny_patch16_224.e2vpt", img_size=32, depth=2, num_classes=3)
        >>> data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
        >>> cfg = train_prune_rewind(m, data, epochs=1, token_ratio=0.5, progress=False,
        ...                          fit=lambda model, epochs, desc: None)
        >>> m.vpt.num_tokens
        5
    """
    if not callable(fit):
        raise TypeError(f"fit must be callable(model, epochs, desc), got {type(fit).__name__}")
    fit(model, epochs, "E²VPT train")
    scores = compute_importance(model, train_loader, loss_fn=loss_fn, device=device,
                                progress=progress)
    config = prune(model, scores, token_ratio, segment_ratio)
    rewind(model)
    fit(model, rewind_epochs or config.rewind_epochs or epochs, "E²VPT rewind")
    return config
