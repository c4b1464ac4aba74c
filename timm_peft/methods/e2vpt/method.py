"""E²VPT's surgery: VPT's prompts with masks plus key-value prompts in every attention layer."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ...core import register_method, register_preset
from ...families import Family, get_family, refuse
from ...layers.kv_attention import KVPrompt, KVPromptAttention, extra_kv_mixin
from ...layers.swap import is_swapped, original_class, restore_class, swap_class
from ..vpt.method import VPT
from .config import E2VPTConfig
from .prompts import E2VPTPrompts
from .pruning import (_groups, _set_config, _split_kept, compute_importance, prune, rewind)

__all__ = ["E2VPT", "add_kv_prompt", "remove_kv_prompt"]


def add_kv_prompt(attn: nn.Module, num_tokens: int, share_kv: bool = True,
                  init: str = "kaiming_uniform") -> KVPrompt:
    """Give a timm ``Attention`` or Swin / Swin-V2 ``WindowAttention`` key-value prompts, in place.

    The prompt is attached as ``attn.kv_prompt``; the base weights keep their names. The module
    is swapped to the mixin :func:`~timm_peft.layers.kv_attention.extra_kv_mixin` names for its
    exact class (:class:`~timm_peft.layers.KVPromptAttention` for ``Attention``; the window
    mixins read the prompts after any visual prompts of the window); a subclass may compute
    attention differently and is refused. :func:`remove_kv_prompt` undoes it.

    Example:
        >>> from timm.layers import Attention
        >>> attn = Attention(64, num_heads=4)
        >>> add_kv_prompt(attn, num_tokens=5).key.shape
        torch.Size([4, 5, 16])
    """
    mixin = extra_kv_mixin(attn)
    if mixin is None:
        raise TypeError(f"key-value prompts support timm Attention and Swin / Swin-V2 "
                        f"WindowAttention modules exactly, got {original_class(attn).__name__}")
    num_heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * num_heads)
    ref = next(attn.parameters())
    prompt = KVPrompt(num_heads, num_tokens, head_dim, share_kv=share_kv, init=init,
                      device=ref.device, dtype=ref.dtype)
    attn.kv_prompt = prompt
    if not is_swapped(attn, mixin):
        # it computes the whole attention: innermost, so mixins of visual prompts (e.g. the
        # prompts joining EVA's prefix) still wrap it
        swap_class(attn, mixin, innermost=True)
    return prompt


def remove_kv_prompt(attn: nn.Module) -> None:
    """Undo :func:`add_kv_prompt`: the prompt removed, the module's class as before."""
    del attn.kv_prompt
    mixin = extra_kv_mixin(attn)
    # a window mixin stays while the window still has visual prompts (VPT on the same model)
    if mixin is KVPromptAttention or not attn.__dict__.get("window_prompts"):
        restore_class(attn, mixin)


@register_method
class E2VPT(VPT):
    """E²VPT on ViT and Swin: VPT-Deep prompts with masks plus key-value prompts (see module)."""

    name = "e2vpt"
    paper = 'Han et al., "E^2VPT: An Effective and Efficient Approach for Visual Prompt Tuning", ICCV 2023.'
    citation = """@inproceedings{han2023e2vpt,
  title={E^2VPT: An Effective and Efficient Approach for Visual Prompt Tuning},
  author={Han, Cheng and Wang, Qifan and Cui, Yiming and Cao, Zhiwen and Wang, Wenguan and Qi, Siyuan and Liu, Dongfang},
  booktitle={International Conference on Computer Vision (ICCV)},
  year={2023}
}"""
    config_cls = E2VPTConfig
    description = ("E²VPT: visual and key-value prompts, token/segment pruning with rewinding; "
                   "prompts and the head train")

    def make_prompts(self, config: E2VPTConfig, num_layers: int, dim: int,
                     patch_size: tuple[int, int]) -> E2VPTPrompts:
        return E2VPTPrompts(num_layers, config.num_prompts, dim, num_segments=config.num_segments,
                            segment_layout=config.segment_layout, dropout=config.dropout,
                            init=config.init, patch_size=patch_size)

    def supports(self, family: Family) -> bool:
        caps = family.capabilities
        return "windows" in caps or {"tokens", "kv_attention"} <= caps

    def _attention_layers(self, model: nn.Module, family: Family) -> list[nn.Module]:
        """One attention layer per prompted block, in forward order; refuses before any change."""
        if family.token_sequence(model) is not None:
            attns = family.kv_attention(model)
            what = "attention layers that take key-value prompts (one per block)"
        elif family.window_attention(model) is not None:
            attns = [layer.attn for stage in family.window_attention(model) for layer in stage]
            what = "windowed attention layers"
        else:
            raise refuse(self.name, "a token sequence or windowed attention", model, family)
        if attns is None:
            raise refuse(self.name, what, model, family)
        other = sorted({original_class(a).__name__ for a in attns if extra_kv_mixin(a) is None})
        if other:
            raise refuse(self.name, f"timm Attention or WindowAttention layers (found {other})",
                         model, family)
        return attns

    def apply(self, model: nn.Module, config: E2VPTConfig) -> nn.Module:
        if config.projection_dim is not None:
            raise ValueError("E2VPTConfig.projection_dim must be None: E²VPT prunes the prompt "
                             "values themselves, without a prompt projection")
        attns = self._attention_layers(model, get_family(model))
        super().apply(model, config)
        if config.num_kv_prompts:
            for attn in attns:
                add_kv_prompt(attn, config.num_kv_prompts, share_kv=config.share_kv,
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
        # the same recorded structure needs no look at the indices (a meta-device model has none)
        same = model.peft_config.kept_segments == config.kept_segments
        for g, k in zip(groups, kept):
            if g.pruned != (k is not None) or (
                    k is not None and not same and g.kept_segments() != list(k)):
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
                    progress=bool(getattr(ctx, "progress", True)) and getattr(ctx, "rank", 0) == 0)
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
