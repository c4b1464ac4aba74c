"""The Adapter's surgery: a bottleneck after each block's MLP (and attention, Houlsby)."""
from __future__ import annotations

from torch import nn

from ...core import PeftMethod, register_method
from ...families import Family, get_family, refuse
from ...layers.bottleneck import Bottleneck, SequentialAdapter
from ...layers.swap import is_swapped, restore_class, swap_class
from .config import AdapterConfig

__all__ = ["Adapter", "BottleneckMethod", "NOT_MERGEABLE"]

NOT_MERGEABLE = ("a bottleneck's non-linearity cannot be folded into the base weights, so the "
                 "adapter stays in the model at inference; timm_peft.unload(model) removes it "
                 "(discarding it), and lora or ssf merge exactly")


def _factory(model: nn.Module) -> dict:
    ref = next(model.parameters())
    return dict(device=ref.device, dtype=ref.dtype)


class BottleneckMethod(PeftMethod):
    """What the bottleneck methods share: an unmergeable module inserted as ``module.<attr>``
    through ``mixin``; ``unload`` takes every one out again (``adapter``, ``adaptformer``)."""

    mixin: type
    attr: str

    def merge(self, model: nn.Module) -> None:
        raise NotImplementedError(f"method {self.name!r} cannot be merged: {NOT_MERGEABLE}")

    def unmerge(self, model: nn.Module) -> None:
        self.merge(model)

    def unload(self, model: nn.Module) -> nn.Module:
        for module in list(model.modules()):
            if is_swapped(module, self.mixin):
                restore_class(module, self.mixin)
                delattr(module, self.attr)
        return model


@register_method
class Adapter(BottleneckMethod):
    """Bottleneck adapters ``y + up(act(down(y)))`` on each block's MLP output (Pfeiffer), or
    on its attention's and MLP's outputs (Houlsby); see :mod:`timm_peft.methods.adapter`."""

    name = "adapter"
    paper = ('Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019 '
             '(the Adapter baseline of Jia et al., "Visual Prompt Tuning", ECCV 2022, placed '
             'after the MLP as Pfeiffer et al., "AdapterFusion", EACL 2021).')
    citation = r"""@inproceedings{houlsby2019adapter,
  title={Parameter-Efficient Transfer Learning for {NLP}},
  author={Houlsby, Neil and Giurgiu, Andrei and Jastrzebski, Stanislaw and Morrone, Bruna and de Laroussilhe, Quentin and Gesmundo, Andrea and Attariyan, Mona and Gelly, Sylvain},
  booktitle={International Conference on Machine Learning (ICML)},
  year={2019}
}
@inproceedings{pfeiffer2021adapterfusion,
  title={{AdapterFusion}: Non-Destructive Task Composition for Transfer Learning},
  author={Pfeiffer, Jonas and Kamath, Aishwarya and R{\"u}ckl{\'e}, Andreas and Cho, Kyunghyun and Gurevych, Iryna},
  booktitle={Conference of the European Chapter of the Association for Computational Linguistics (EACL)},
  year={2021}
}"""
    config_cls = AdapterConfig
    mixin, attr = SequentialAdapter, "adapter"
    description = "bottleneck adapters after each block's MLP (Houlsby: and attention) + head"

    def supports(self, family: Family) -> bool:
        return "block_mlp" in family.capabilities

    def apply(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        family = get_family(model)
        layers = family.block_layers(model)
        if not layers:
            raise refuse(self.name, "a width-preserving MLP in every block", model, family)
        houlsby = config.placement == "houlsby"
        if houlsby and any(layer.attn is None for layer in layers):
            raise refuse(self.name, "an attention in every block (placement='houlsby'; "
                         "placement='pfeiffer' needs only the MLPs)", model, family)
        dd = _factory(model)
        for layer in layers:
            hidden = config.hidden_dim(layer.dim)
            for module in ((layer.attn, layer.mlp) if houlsby else (layer.mlp,)):
                module.adapter = Bottleneck(layer.dim, hidden, config.act, config.dropout,
                                            channel_axis=layer.channel_axis, **dd)
                swap_class(module, SequentialAdapter)
        return model
