"""SSF's surgery: a scale-shift after every site, and the exact merge (paper Eq. 5)."""
from __future__ import annotations

import itertools
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from ...core import PeftConfig, PeftMethod, register_method, unwrap_features
from ...families import Family, get_family, refuse
from ...layers.scale_shift import (CHANNEL_AXIS, ResidualIntoBranch, ScaleShift,
                                   attach_scale_shift, detach_scale_shift, num_channels,
                                   unfoldable)
from ...layers.swap import original_class, restore_class, restore_classes, swap_class
from .config import SSFConfig

__all__ = ["SSF", "ssf_sites"]


def ssf_sites(model: nn.Module, skipped: bool = False) -> list[str]:
    """Names of the operations SSF follows in ``model`` (a plain timm model), in forward order.

    On an average-pooled ViT the last site follows the model's ``SSFConfig.pooled_norm_site``
    (the default's on a plain model). With ``skipped=True``: ``(name, reason)`` of the operations SSF skips because it cannot fold
    into them exactly (reported as a warning when the method is applied).

    Example:
        >>> import timm
        >>> ssf_sites(timm.create_model("vit_tiny_patch16_224", depth=1))[:4]
        ['patch_embed.proj', 'blocks.0.norm1', 'blocks.0.attn.qkv', 'blocks.0.attn.proj']
    """
    inner = unwrap_features(model)
    config = getattr(inner, "peft_config", None)
    placement = (config if isinstance(config, SSFConfig) else SSFConfig()).pooled_norm_site
    sites = [s for s in get_family(model).ssf_sites(inner)
             if s.placement is None or s.placement == placement]
    if skipped:
        return [(s.name, s.reason) for s in sites if s.reason is not None]
    return [s.name for s in sites if s.reason is None]


def _factory_kwargs(op: nn.Module, model: nn.Module) -> dict[str, Any]:
    """Device and float dtype of the operation's own tensors, else (an Identity standing for a
    norm, a non-affine norm) of the model's first parameter."""
    ref = next(itertools.chain(op.parameters(recurse=False), op.buffers(recurse=False),
                               model.parameters()), None)
    if ref is None:
        return {}
    return dict(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)


def _attached(model: nn.Module) -> Iterator[tuple[str, nn.Module, ScaleShift]]:
    for name, op in model.named_modules():
        ss = op._modules.get("ssf")
        if isinstance(ss, ScaleShift):
            yield name, op, ss


# ----------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------

def _fold(op: nn.Module, ss: ScaleShift) -> None:
    weight, bias = op.weight, op.bias
    ss.register_buffer("base_weight", weight.detach().clone(), persistent=False)
    ss.register_buffer("base_bias", None if bias is None else bias.detach().clone(),
                       persistent=False)
    acc = torch.promote_types(weight.dtype, torch.float32)
    gamma = ss.scale.detach().to(acc)
    beta = None if ss.shift is None else ss.shift.detach().to(acc)
    with torch.no_grad():
        # the channel is axis 0 of every site's weight: Linear (out, in), Conv (out, in/g, k...),
        # norms (C,)
        weight.copy_(weight.to(acc) * gamma.view((-1,) + (1,) * (weight.ndim - 1)))
        if bias is None and beta is not None:
            op.bias = nn.Parameter(beta.to(weight.dtype), requires_grad=False)
            ss.added_bias = True
        elif bias is not None:
            bias.copy_(bias.to(acc) * gamma if beta is None
                       else torch.addcmul(beta, bias.to(acc), gamma))
    ss.merged = True


def _unfold(op: nn.Module, ss: ScaleShift) -> None:
    with torch.no_grad():
        op.weight.copy_(ss.base_weight)
        if ss.added_bias:
            op.bias = None
        elif op.bias is not None:
            op.bias.copy_(ss.base_bias)
    del ss.base_weight, ss.base_bias
    ss.merged = ss.added_bias = False


def _check_not_merged(model: nn.Module, action: str) -> None:
    merged = [name for name, _, ss in _attached(model) if ss.merged]
    if merged:
        raise ValueError(f"cannot {action} a merged SSF model: its base weights hold the folded "
                         f"scales and shifts ({len(merged)} sites, e.g. {merged[0]!r}); call "
                         "timm_peft.unmerge(model) first")


# ----------------------------------------------------------------------------------------------
# Method
# ----------------------------------------------------------------------------------------------

@register_method
class SSF(PeftMethod):
    """SSF: a learnt per-channel scale γ and shift β after every site of the frozen backbone.

    Its sites come from the model's family (:meth:`timm_peft.families.Family.ssf_sites`: by
    operation type everywhere but the classifier, narrowed where a family knows better). See the
    module docstring for the init and the exact merge.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("vit_base_patch16_224.ssf", num_classes=100)
        >>> timm_peft.get_nb_trainable_parameters(m)[0]
        282724
        >>> plain = timm_peft.merge_and_unload(m)  # a plain timm ViT-B/16 with SSF folded in
    """

    name = "ssf"
    paper = 'Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", NeurIPS 2022.'
    citation = r"""@inproceedings{lian2022ssf,
  title={Scaling \& Shifting Your Features: A New Baseline for Efficient Model Tuning},
  author={Lian, Dongze and Zhou, Daquan and Feng, Jiashi and Wang, Xinchao},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2022}
}"""
    config_cls = SSFConfig
    description = "SSF: per-channel scale and shift after every operation, mergeable"

    def supports(self, family: Family) -> bool:
        return "ssf" in family.capabilities

    def apply(self, model: nn.Module, config: SSFConfig) -> nn.Module:
        family = get_family(model)
        sites = [s for s in family.ssf_sites(model)
                 if s.placement is None or s.placement == config.pooled_norm_site]
        skipped = [s for s in sites if s.reason is not None]
        sites = [s for s in sites if s.reason is None]
        if not sites:
            raise refuse(self.name, "operations SSF can follow and fold into (Linear, Conv, affine "
                         "norms)", model, family)
        if skipped:
            warnings.warn(f"SSF skips {len(skipped)} operation(s) it cannot fold exactly: "
                          + "; ".join(f"{s.name} ({type(s.op).__name__}: {s.reason})"
                                      for s in skipped[:8])
                          + ("; ..." if len(skipped) > 8 else "")
                          + " (timm_peft.methods.ssf.ssf_sites(model, skipped=True) lists them)",
                          stacklevel=4)
        for site in sites:
            name, op = site.name, site.op
            if hasattr(op, "ssf"):
                raise ValueError(f"{name} already has an attribute 'ssf'; SSF cannot be applied")
            # a non-affine norm keeps β: it is not mergeable either way (see merge)
            shift = not (config.bias_free == "scale_only" and getattr(op, "bias", None) is None
                         and getattr(op, "weight", None) is not None)
            ss = ScaleShift(site.channels or num_channels(op),
                            CHANNEL_AXIS.get(original_class(op), -1), shift=shift,
                            **_factory_kwargs(op, model))
            ss.reset_parameters(config.init, config.init_std)
            if site.merge_reason is not None:
                ss.merge_reason = site.merge_reason
            op.ssf = ss
            attach_scale_shift(op)
        for block, branches in family.residual_branches(model):
            # innermost: it replaces timm's forward, so other methods' mixins still wrap it
            swap_class(block, ResidualIntoBranch, innermost=True, residual_branches=branches)
        for attn, mixin in family.ssf_attention(model):
            swap_class(attn, mixin, innermost=True)
        return model

    def merge(self, model: nn.Module) -> None:
        """Fold every γ, β into its operation (Eq. 5); a no-op on an already merged model.

        Raises ``ValueError`` naming every site that cannot be folded exactly, before any change.
        """
        todo = [(name, op, ss) for name, op, ss in _attached(model) if not ss.merged]
        problems = [f"{name} ({type(op).__name__}): {why}" for name, op, ss in todo
                    if (why := getattr(ss, "merge_reason", None) or unfoldable(op)) is not None]
        if problems:
            raise ValueError("SSF cannot be merged exactly into these operations: "
                             + "; ".join(problems) + ". Keep the model unmerged (it computes "
                             "the same function) or build the base with affine norms")
        added = [f"{name}.bias" for name, op, ss in todo
                 if op.bias is None and ss.shift is not None]
        for _, op, ss in todo:
            detach_scale_shift(op)
            _fold(op, ss)
        if added:
            warnings.warn(f"SSF merge added a bias to {len(added)} bias-free operation(s) "
                          f"({', '.join(added[:4])}{', ...' if len(added) > 4 else ''}): the "
                          "merged state dict has these keys on top of the base architecture's "
                          "(SSFConfig(bias_free='scale_only') avoids them)", stacklevel=3)

    def unmerge(self, model: nn.Module) -> None:
        """Restore the base tensors saved by :meth:`merge` and the SSF wiring (bit-exact)."""
        for _, op, ss in _attached(model):
            if ss.merged:
                _unfold(op, ss)
                attach_scale_shift(op)

    def unload(self, model: nn.Module) -> nn.Module:
        """Remove the SSF wiring and ``ssf`` children; the operations keep their current weights."""
        for _, op, _ in list(_attached(model)):
            detach_scale_shift(op)
            del op.ssf
        restore_classes(model, ResidualIntoBranch)
        for attn, mixin in get_family(model).ssf_attention(model):
            restore_class(attn, mixin)
        return model

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        _check_not_merged(model, "save the adapter of")
        return super().adapter_state_dict(model)

    def prepare_load(self, model: nn.Module, config: PeftConfig) -> None:
        _check_not_merged(model, "load an adapter into")
