"""Accuracy of a model over a loader (summed over processes), and of a saved adapter on its data."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, ContextManager

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import TransformDataset, list_tasks
from .checkpoint import TRAINING_ARGS_NAME
from .config import TrainConfig
from .factory import _data_config, _make_splits, build_transforms, pretrained_overlay


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
             autocast: Callable[[], ContextManager] = contextlib.nullcontext,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, float]:
    """Mean loss and top-1 accuracy of ``model`` over ``loader`` (summed over processes).

    Example:
        >>> import timm, timm_peft, torch
        >>> m = timm.create_model("resnet18.linear", num_classes=2)
        >>> data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))]
        >>> sorted(evaluate(m, data))
        ['acc', 'loss', 'n']
    """
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = x.contiguous(memory_format=memory_format)
        with autocast():
            logits = model(x)
        stats[0] += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        stats[1] += (logits.argmax(-1) == y).sum()
        stats[2] += y.numel()
    all_reduce(stats)
    model.train(was_training)
    n = stats[2].item()
    return dict(loss=stats[0].item() / max(n, 1), acc=stats[1].item() / max(n, 1), n=int(n))



def evaluate_adapter(adapter_dir: str | os.PathLike, split: str = "test", *,
                     task: str | None = None, data_dir: str | None = None,
                     pretrained_file: str | None = None, batch_size: int | None = None,
                     device: str | None = None, workers: int = 0) -> dict[str, Any]:
    """Accuracy of a saved adapter on a split of its data (or of other data).

    Data, data config, weights file and seed default to those in the adapter's
    ``training_args.json``, so ``evaluate_adapter(run / "adapter")`` re-measures the logged
    accuracy of a run.

    Example:
        >>> evaluate_adapter("runs/quickstart/adapter", "test")["acc"]  # doctest: +SKIP
        0.91
    """
    from ..io import AdapterError, from_pretrained, read_training_args
    from ..io.load import open_adapter
    src = open_adapter(adapter_dir)  # a directory or hf-hub:<org>/<name>, checked
    adapter_dir = src.dir
    # checked like every adapter file; never a source of base weights, URLs or outputs
    saved = read_training_args(adapter_dir)
    saved.setdefault("classes", src.cfg.get("label_names"))
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; allowed: ['train', 'val', 'test']")
    from_file = task is None and data_dir is None
    if from_file:
        task, data_dir = saved.get("task"), saved.get("data_dir")
    if task is None and data_dir is None:
        raise AdapterError(f"{adapter_dir} has no {TRAINING_ARGS_NAME} naming its data: give a "
                           f"task ({list_tasks()}) or a data directory")
    # the base weights come from the caller (pretrained_file) or timm, never from the adapter
    pretrained = saved.get("pretrained") or (True if pretrained_file is not None else None)
    overrides: dict[str, Any] = {}
    overlay = pretrained_overlay(None, pretrained_file)
    if overlay:
        overrides["pretrained_cfg_overlay"] = overlay
    torch.manual_seed(saved.get("seed", 0))  # a base without weights is rebuilt as in training
    model = from_pretrained(src, pretrained=pretrained, **overrides)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    # the adapter's own, checked to run on its model; training_args.json's only for old adapters
    data_cfg = src.cfg.get("data_config") or saved.get("data_config") or \
        _data_config(TrainConfig(), model)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in fields},
                             "task": task, "data_dir": data_dir, "resume": None, "output": None})
        splits = _make_splits(cfg, data_cfg["input_size"][-1])
        if saved.get("classes") and splits.classes != saved["classes"]:
            raise ValueError(f"the data's classes {splits.classes[:6]}… differ from the "
                             f"adapter's {saved['classes'][:6]}…")
        if model.num_classes != splits.num_classes:
            raise ValueError(f"the adapter has {model.num_classes} classes, the data "
                             f"{splits.num_classes}")
        ds = getattr(splits, split)
        if ds is None:
            raise ValueError(f"the data has no {split!r} split")
    except (ValueError, OSError, RuntimeError) as e:
        if not from_file or isinstance(e, AdapterError):
            raise
        # the data was named by the adapter's own file: say which
        raise AdapterError(f"{adapter_dir / TRAINING_ARGS_NAME}: the data its fields 'task'/"
                           f"'data_dir'/'dataset' name does not evaluate this adapter: {e}") from e
    _, eval_tf = build_transforms(data_cfg, aug=False)
    loader = DataLoader(TransformDataset(ds, eval_tf), batch_size=batch_size or cfg.batch_size,
                        num_workers=workers)
    try:
        res = evaluate(model, loader, dev)
    except (AssertionError, RuntimeError, ValueError) as e:
        if src.cfg.get("data_config") or not saved.get("data_config"):
            raise
        raise AdapterError(f"{adapter_dir / TRAINING_ARGS_NAME}: field 'data_config' does not fit "
                           f"the adapter's model: {type(e).__name__}: {e}") from e
    return dict(res, split=split, adapter=str(adapter_dir), data=splits.source)
