"""Config of LoRA (Hu et al., ICLR 2022), with the names of peft's ``LoraConfig``."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ...core import PeftConfig, cfg_field

__all__ = ["LoraConfig"]

_TARGET = re.compile(r"[A-Za-z_]\w*(\.\w+)*")


@dataclass
class LoraConfig(PeftConfig):
    """Config of ``lora``: rank, scaling, dropout and which layers (peft's field names).

    Example:
        >>> LoraConfig(r=4, lora_alpha=8).scaling
        2.0
    """

    r: int = cfg_field(8, ge=1, le=4096, help="rank of the update B·A")
    lora_alpha: float = cfg_field(8.0, gt=0.0, le=65536.0,
                                  help="the update is scaled by lora_alpha / r (peft's default 8)")
    lora_dropout: float = cfg_field(0.0, ge=0.0, lt=1.0, help="dropout on the update's input")
    target_modules: tuple[str, ...] = cfg_field(
        ("qkv",), help="layers to adapt, by name or name suffix (peft's rule: 'qkv' matches "
                       "'blocks.0.attn.qkv'); Linear or 1×1 conv layers outside the classifier")
    use_rslora: bool = cfg_field(False, help="scale by lora_alpha / sqrt(r) (rank-stabilised LoRA)")
    init_lora_weights: str = cfg_field(
        "kaiming", choices=("kaiming", "gaussian"),
        help="A's init (B is zero either way, so a fresh model is the base model): 'kaiming': "
             "Kaiming-uniform (peft's default); 'gaussian': N(0, 1/r)")

    def validate(self) -> None:
        super().validate()
        targets = self.target_modules
        if not 1 <= len(targets) <= 64:
            raise ValueError(f"LoraConfig.target_modules must name 1 to 64 layers, got {len(targets)}")
        for t in targets:
            if len(t) > 256 or not _TARGET.fullmatch(t):
                raise ValueError(f"LoraConfig.target_modules: {t[:60]!r} is not a module name "
                                 "or dotted name suffix (e.g. 'qkv', 'mlp.fc1')")

    @property
    def scaling(self) -> float:
        """The factor ``s`` of ``W + s·B·A``."""
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    def matches(self, name: str) -> bool:
        """Whether a module name is targeted (peft's rule: equal, or ends with ``'.' + target``)."""
        return any(name == t or name.endswith("." + t) for t in self.target_modules)
