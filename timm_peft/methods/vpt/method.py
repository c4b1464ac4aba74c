"""VPT's surgery: which prompts go where, decided by what the model's family provides."""
from __future__ import annotations

import torch
from torch import nn

from ...core import PeftMethod, register_method, register_preset
from ...families import Family, get_family, refuse
from ...layers.kv_attention import extra_kv_mixin
from ...layers.prompts import (PixelPromptedModel, PixelPrompts, PromptedBlock, PromptsAsPrefix,
                               VisualPrompts)
from ...layers.swap import restore_classes, swap_class
from .config import VPTConfig

__all__ = ["VPT"]


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _place(module: nn.Module, model: nn.Module) -> nn.Module:
    ref = next(model.parameters())
    return module.to(device=ref.device, dtype=ref.dtype)


def _check_padded_input(model: nn.Module, in_chans: int, size: tuple[int, int], pad: int) -> None:
    """Refuse at build time a ConvNet that cannot run on the padded image (e.g. DLA, whose
    upsampled and skip maps must agree in size): one forward on the meta device, no memory."""
    meta = {n: torch.empty_like(t, device="meta")
            for n, t in (*model.named_parameters(), *model.named_buffers())}
    x = torch.empty(1, in_chans, *size, device="meta")
    try:
        with torch.no_grad():
            torch.func.functional_call(model, meta, (x,), strict=False)
    except NotImplementedError:  # an operation without a meta kernel: nothing to conclude
        return
    except (RuntimeError, AssertionError) as e:  # timm asserts some feature sizes
        h, w = size[0] + 2 * pad, size[1] + 2 * pad
        why = (str(e).splitlines() or ["a size check failed"])[0]
        raise ValueError(
            f"VPT pixel prompts make the {size[0]}×{size[1]} input {h}×{w} (pad_size={pad}), "
            f"which {type(model).__name__} cannot take: {why}; choose "
            "VPTConfig.pad_size (or img_size) so that the padded size suits the model (e.g. a "
            "multiple of its total stride)") from None


@register_method
class VPT(PeftMethod):
    """Visual prompt tuning on token models, windowed-attention models and ConvNets.

    Token prompts where the family provides a token sequence, window prompts where it provides
    windowed attention, a pixel border where it provides a ConvNet's image input (see
    :mod:`timm_peft.methods.vpt`).
    """

    name = "vpt"
    paper = 'Jia et al., "Visual Prompt Tuning", ECCV 2022.'
    citation = """@inproceedings{jia2022vpt,
  title={Visual Prompt Tuning},
  author={Jia, Menglin and Tang, Luming and Chen, Bor-Chun and Cardie, Claire and Belongie, Serge and Hariharan, Bharath and Lim, Ser-Nam},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2022}
}"""
    config_cls = VPTConfig
    description = "visual prompt tuning: learnable prompt tokens (every block if deep) and the head train"

    def supports(self, family: Family) -> bool:
        return bool(family.capabilities & {"tokens", "windows", "pixels"})

    def make_prompts(self, config: VPTConfig, num_layers: int, dim: int,
                     patch_size: tuple[int, int]) -> VisualPrompts:
        """The prompt container of ``num_layers`` layers of width ``dim`` (override point)."""
        return VisualPrompts(num_layers, config.num_prompts, dim, prompt_dim=config.projection_dim,
                             dropout=config.dropout, init=config.init, patch_size=patch_size)

    def apply(self, model: nn.Module, config: VPTConfig) -> nn.Module:
        family = get_family(model)
        if family.token_sequence(model) is not None:
            return self._apply_tokens(model, config, family)
        if family.window_attention(model) is not None:
            return self._apply_windows(model, config, family)
        if family.pixel_input(model) is not None:
            return self._apply_pixels(model, config, family)
        raise refuse(self.name, "a token sequence, windowed attention or a ConvNet's image input",
                     model, family)

    def _apply_tokens(self, model: nn.Module, config: VPTConfig, family: Family) -> nn.Module:
        seq = family.token_sequence(model)
        prompts = _place(self.make_prompts(config, len(seq.blocks) if config.deep else 1,
                                           seq.dim, seq.patch_size), model)
        model.vpt = prompts
        for i, block in enumerate(seq.blocks if config.deep else seq.blocks[:1]):
            swap_class(block, PromptedBlock, vpt_prompts=prompts, vpt_layer=i, vpt_insert=i == 0,
                       vpt_num_prefix=seq.num_prefix_tokens)
        for attn in seq.prefix_attention:
            swap_class(attn, PromptsAsPrefix, vpt_prompts=prompts)
        for module, mixin in seq.prompt_adapters:
            swap_class(module, mixin, vpt_prompts=prompts, vpt_num_prefix=seq.num_prefix_tokens)
        swap_class(model, family.prompted_model_mixin(model))
        return model

    def _apply_windows(self, model: nn.Module, config: VPTConfig, family: Family) -> nn.Module:
        # Prompts in windowed attention are extra keys and values shared by every window of a
        # block; they produce no outputs to carry on. VPT-Deep gives every block its own;
        # VPT-Shallow (deep=False) gives them to the first block only, the one that reads the
        # patch embedding, as VPT-Shallow's prompts enter at the first layer.
        patch = _pair(model.patch_embed.patch_size)
        stages = nn.ModuleList()
        for layers in family.window_attention(model)[:None if config.deep else 1]:
            layers = layers if config.deep else layers[:1]
            prompts = _place(self.make_prompts(config, len(layers), layers[0].dim, patch), model)
            stages.append(prompts)
            for j, layer in enumerate(layers):
                swap_class(layer.attn, extra_kv_mixin(layer.attn),
                           window_prompts=(prompts, j, layer.norm))
        model.vpt = stages
        return model

    def _apply_pixels(self, model: nn.Module, config: VPTConfig, family: Family) -> nn.Module:
        if config.projection_dim is not None:
            raise ValueError("VPTConfig.projection_dim applies to prompt tokens; ConvNet prompts "
                             "are pixels: leave projection_dim=None")
        pixel = family.pixel_input(model)
        size = _pair(config.img_size) if config.img_size is not None else pixel.img_size
        prompts = PixelPrompts(pixel.in_chans, size, config.pad_size, mean=pixel.mean,
                               std=pixel.std, init=config.init, dropout=config.dropout)
        model.vpt = _place(prompts, model)
        swap_class(model, PixelPromptedModel)
        _check_padded_input(model, pixel.in_chans, size, config.pad_size)
        return model

    def unload(self, model: nn.Module) -> nn.Module:
        del model.vpt
        restore_classes(model)
        return model


register_preset("vpt_shallow", "vpt", deep=False)
