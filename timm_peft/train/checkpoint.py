"""The run directory's files, and the checkpoint a run resumes from (checked like an adapter:
whole, finite, made with this model, config, data and base)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import unwrap_features
from ..io import base_fingerprint
from .config import TrainConfig


TRAINING_ARGS_NAME = "training_args.json"
#: Our checkpoint, not timm's CheckpointSaver files (last.pth.tar, model_best.pth.tar): those
#: hold the whole model's state dict every epoch (the frozen backbone included, hundreds of MB);
#: ours holds the trainable tensors, optimiser, scaler, EMA, best state and the base's
#: fingerprint (a resume on other base weights is refused), written atomically.
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
#: the console log of a run, as a file
LOG_TXT_NAME = "log.txt"
#: timm's per-epoch summary (timm.utils.update_summary): epoch, train_*, eval_*, lr
SUMMARY_CSV_NAME = "summary.csv"
_CHECKPOINT_FORMAT = 1
#: what a run writes in its output directory (what --overwrite deletes)
_RUN_FILES = (CHECKPOINT_NAME, LOG_NAME, LOG_TXT_NAME, SUMMARY_CSV_NAME, "args.json",
              "summary.json", "adapter")


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the adapter's tensors as they sit in the model (for checkpoints and the best
    epoch; the method's ``adapter_state_dict`` export is for the saved adapter only)."""
    inner = unwrap_features(model)
    state = inner.state_dict()
    return {k: state[k].detach().to("cpu", copy=True) for k in inner.peft_adapter_keys}


def _load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    inner = unwrap_features(model)
    expected = set(inner.peft_adapter_keys)
    if set(state) != expected:
        raise ValueError(f"{where} does not fit the model: missing "
                         f"{sorted(expected - set(state))[:8]}, unexpected "
                         f"{sorted(set(state) - expected)[:8]}")
    inner.load_state_dict(state, strict=False)


def _resolve_resume(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a {CHECKPOINT_NAME} file or a "
                                "run directory holding one)")
    return p


#: what a checkpoint holds: key -> the types its value may have
_CHECKPOINT_KEYS: dict[str, tuple[type, ...]] = {
    "format": (int,), "model": (str,), "model_kwargs": (dict,), "peft_config": (dict,),
    "num_classes": (int,), "classes": (list,), "base_fingerprint": (str,), "epoch": (int,),
    "step": (int,), "adapter": (dict,), "optimizer": (dict,), "scaler": (dict, type(None)),
    "ema": (dict, type(None)), "best": (dict,), "history": (list,),
}


def _check_checkpoint(path: Path, ckpt: Any) -> None:
    """Refuse a checkpoint that is not whole (keys, types, finite tensors), naming the file."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a timm_peft checkpoint (format {_CHECKPOINT_FORMAT})")
    for key, types in _CHECKPOINT_KEYS.items():
        if key not in ckpt:
            raise ValueError(f"{path}: checkpoint lacks {key!r}; it is cut short or not one "
                             "timm_peft wrote: start the run over with --overwrite")
        value = ckpt[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise ValueError(f"{path}: checkpoint field {key!r} is a {type(value).__name__}, "
                             f"expected {' or '.join(t.__name__ for t in types)}")
    if min(ckpt["epoch"], ckpt["step"], ckpt["num_classes"]) < 0:
        raise ValueError(f"{path}: checkpoint fields 'epoch', 'step' and 'num_classes' must be "
                         ">= 0")
    best = ckpt["best"]
    if set(best) != {"acc", "epoch", "state"} or not isinstance(best["state"], (dict, type(None))):
        raise ValueError(f"{path}: checkpoint field 'best' must hold acc, epoch and state")
    for field, state in (("adapter", ckpt["adapter"]), ("best.state", best["state"] or {}),
                         ("ema", ckpt["ema"] or {})):
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{path}: checkpoint field {field!r} holds a "
                                 f"{type(t).__name__} for {name!r}, expected a tensor")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: checkpoint tensor {field}[{name!r}] holds NaN or Inf "
                                 "values; resume from an earlier copy or start over")


def _read_checkpoint(path: Path, cfg: TrainConfig, model: nn.Module,
                     classes: list[str]) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable timm_peft checkpoint: {e}") from e
    _check_checkpoint(path, ckpt)
    inner = unwrap_features(model)
    mismatches = []
    if ckpt["model"] != cfg.model:
        mismatches.append(f"model {ckpt['model']!r} (this run: {cfg.model!r})")
    if ckpt["num_classes"] != len(classes):
        mismatches.append(f"num_classes {ckpt['num_classes']} (this run's data: {len(classes)})")
    elif ckpt["classes"] != classes:
        mismatches.append(f"classes {ckpt['classes'][:6]}… (this run: {classes[:6]}…)")
    if ckpt["peft_config"] != inner.peft_config.to_dict():
        mismatches.append(f"method config {ckpt['peft_config']} (this run: "
                          f"{inner.peft_config.to_dict()})")
    if ckpt["model_kwargs"] != cfg.model_kwargs:
        mismatches.append(f"model_kwargs {ckpt['model_kwargs']} (this run: {cfg.model_kwargs})")
    if not mismatches and ckpt["base_fingerprint"] != base_fingerprint(model):
        mismatches.append("base weights (fingerprints differ: another --pretrained-file?)")
    if mismatches:
        raise ValueError(f"cannot resume from {path}: it was made with " + "; ".join(mismatches))
    return ckpt
