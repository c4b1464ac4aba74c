"""What a run is built from: the model (timm's pretrained path), its data config and transforms,
the data splits, the optimiser and the schedule - timm's factories, asked as the method wants."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core import get_method, unwrap_features
from ..data import DataSplits, build_splits
from .config import TrainConfig


#: training-hook keys this loop understands (see PeftMethod.training_hooks)
_HOOK_KEYS = ("optimizer_wrapper", "no_weight_decay", "stages", "metrics")


def _split_model_name(name: str) -> tuple[str, str]:
    """``(arch, method)`` of ``<arch>[.<tag>].<method>``, with clear errors."""
    import timm

    from ..integration import model_name_help, split_method
    if not name:
        raise ValueError("no model given: pass <arch>[.<weight tag>].<method>, e.g. "
                         "vit_base_patch16_224.augreg2_in21k_ft_in1k.ssf")
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r} in {name!r} (see timm.list_models())")
    _, method = split_method(arch, tag or None)  # a suffix neither tag nor method: its error
    if method is None:
        raise ValueError(f"model {name!r} names no PEFT method: {model_name_help(arch)}")
    return arch, method


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The frozen base with the method applied, built through timm's own pretrained path.

    The random initialisation is seeded with ``cfg.seed`` so every process (and a later
    ``eval``) builds the same adapter initialisation and, without pretrained weights, the same
    base.

    Example:
        >>> m = build_model(TrainConfig(model="resnet18.bias", pretrained=False), num_classes=4)
        >>> m.peft_method, m.num_classes
        ('bias', 4)
    """
    import timm
    _split_model_name(cfg.model)
    if cfg.pretrained_file is not None and not cfg.pretrained:
        raise ValueError("pretrained_file was given with pretrained=False; drop one of them")
    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    overlay = pretrained_overlay(cfg.pretrained_cfg, cfg.pretrained_file)
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.drop is not None:
        kwargs["drop_rate"] = cfg.drop
    torch.manual_seed(cfg.seed)
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes,
                                  peft_cfg=cfg.peft_cfg or None, **kwargs)
    except (OSError, RuntimeError) as e:
        if cfg.pretrained and cfg.pretrained_file is None:
            raise RuntimeError(f"could not load pretrained weights for {cfg.model!r} ({e}); "
                               "pass a local weights file (--pretrained-file) or "
                               "--no-pretrained") from e
        raise
    except TypeError as e:
        if cfg.drop_path is not None or cfg.drop is not None:
            raise ValueError(f"{cfg.model!r} does not take --drop-path/--drop ({e})") from e
        raise
    if cfg.grad_checkpointing:
        inner = unwrap_features(model)
        if not hasattr(inner, "set_grad_checkpointing"):
            raise ValueError(f"{type(inner).__name__} has no set_grad_checkpointing(): drop "
                             "--grad-checkpointing")
        inner.set_grad_checkpointing(True)
    return model


def pretrained_overlay(pretrained_cfg: dict[str, Any] | None,
                       pretrained_file: str | os.PathLike | None) -> dict[str, Any]:
    """timm's ``pretrained_cfg_overlay`` for local weights and their description.

    Example:
        >>> pretrained_overlay({"input_size": [3, 32, 32]}, None)
        {'input_size': (3, 32, 32)}
    """
    overlay = {k: tuple(v) if isinstance(v, list) else v for k, v in (pretrained_cfg or {}).items()}
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained file {path} does not exist")
        # custom_load=False: timm < 1.0.30 would hand the file to an npz loader otherwise
        overlay.update(file=str(path.resolve()), custom_load=False)
    return overlay


def _data_config(cfg: TrainConfig, model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config
    args = {k: getattr(cfg, k) for k in ("input_size", "interpolation", "crop_pct", "crop_mode",
                                         "mean", "std")}
    # timm's --img-size, else a model built at another size (model_kwargs img_size=N)
    args["img_size"] = cfg.img_size or cfg.model_kwargs.get("img_size")
    if not isinstance(args["img_size"], int):
        args["img_size"] = None
    data_cfg = resolve_data_config(args, model=model)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()}


def build_transforms(data_cfg: dict[str, Any], aug: bool | TrainConfig
                     ) -> tuple[Callable, Callable]:
    """``(train, eval)`` transforms from timm's ``create_transform``.

    Without augmentation the training images get the evaluation transform (resize and center
    crop by ``crop_pct``, or by ``crop_mode``: VTAB-1k squashes the whole image to the input
    size). With it (``aug=True`` or a :class:`TrainConfig`
    with ``aug``): timm's training transform, random resized crop and horizontal flip, plus the
    config's ``scale``, ``ratio``, ``vflip``, ``color_jitter``, ``aa``, random erasing and
    ``train_crop_mode`` (timm's crops, or VPT's code's ``squash``: resize, random crop, flip).

    Example:
        >>> tf, _ = build_transforms(dict(input_size=[3, 32, 32], interpolation="bicubic",
        ...     mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0), TrainConfig(aug=True, reprob=0.25))
        >>> type(tf.transforms[-1]).__name__
        'RandomErasing'
    """
    from timm.data import create_transform
    common = dict(input_size=tuple(data_cfg["input_size"]), interpolation=data_cfg["interpolation"],
                  mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]))
    eval_tf = create_transform(**common, crop_pct=data_cfg["crop_pct"],
                               crop_mode=data_cfg.get("crop_mode"))
    cfg = aug if isinstance(aug, TrainConfig) else TrainConfig(aug=bool(aug))
    if not cfg.aug:
        return eval_tf, eval_tf
    if cfg.train_crop_mode == "squash":
        return _squash_random_crop(data_cfg, cfg.hflip), eval_tf
    train_tf = create_transform(
        **common, is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
        vflip=cfg.vflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa, re_prob=cfg.reprob,
        re_mode=cfg.remode, re_count=cfg.recount, train_crop_mode=cfg.train_crop_mode)
    return train_tf, eval_tf


def _squash_random_crop(data_cfg: dict[str, Any], hflip: float) -> Callable:
    """VPT's code's FGVC training transform (``train_crop_mode="squash"``): both sides resized to
    ``input / crop_pct`` (256 for 224 at crop_pct 0.875), a random crop of the input size, a
    horizontal flip; the training twin of timm's ``crop_mode="squash"`` evaluation transform."""
    import math

    from timm.data.transforms import str_to_interp_mode
    from torchvision import transforms as T
    if data_cfg["interpolation"] == "random":
        raise ValueError("train_crop_mode 'squash' resizes with one interpolation; give "
                         "--interpolation (e.g. bicubic), not 'random'")
    size = tuple(data_cfg["input_size"][-2:])
    resized = tuple(math.floor(s / data_cfg["crop_pct"]) for s in size)
    return T.Compose([
        T.Resize(resized, interpolation=str_to_interp_mode(data_cfg["interpolation"])),
        T.RandomCrop(size), T.RandomHorizontalFlip(hflip), T.ToTensor(),
        T.Normalize(data_cfg["mean"], data_cfg["std"])])


def _param_groups(model: nn.Module, lr: float, head_lr: float, weight_decay: float,
                  no_weight_decay: set[str]) -> list[dict[str, Any]]:
    inner = unwrap_features(model)
    head_ids = ({id(p) for p in inner.get_classifier().parameters()}
                if hasattr(inner, "get_classifier") else set())
    timm_no_wd = inner.no_weight_decay() if hasattr(inner, "no_weight_decay") else set()
    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in no_weight_decay and name not in timm_no_wd
        is_head = id(p) in head_ids
        key = (is_head, decay)
        if key not in groups:
            groups[key] = dict(params=[], lr=head_lr if is_head else lr,
                               weight_decay=weight_decay if decay else 0.0)
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError(f"{type(inner).__name__} has no trainable parameter: nothing to train")
    return [groups[k] for k in sorted(groups)]


def _training_hooks(model: nn.Module) -> dict[str, Any]:
    inner = unwrap_features(model)
    hooks = dict(get_method(inner.peft_method).training_hooks(inner) or {})
    unknown = sorted(set(hooks) - set(_HOOK_KEYS))
    if unknown:
        raise ValueError(f"method {inner.peft_method!r} returned unknown training hook(s) "
                         f"{unknown}; the loop understands {list(_HOOK_KEYS)}")
    return hooks


def create_optimizer(model: nn.Module, cfg: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    """timm optimiser over the trainable parameters, as the method asks for it.

    Weight decay is off for 1-D tensors (biases, norms, SSF's scales and shifts), for timm's own
    ``no_weight_decay()`` names and for the names in the method's ``"no_weight_decay"`` hook
    (prompts). The head gets ``cfg.head_lr``. The method's ``"optimizer_wrapper"`` hook (e.g.
    LION's robust update) wraps the result.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.bias", num_classes=3)
        >>> opt = create_optimizer(m, TrainConfig(opt="sgd", lr=0.1, head_lr=0.5))
        >>> sorted({g["lr"] for g in opt.param_groups})
        [0.1, 0.5]
    """
    from timm.optim import create_optimizer_v2
    hooks = _training_hooks(model)
    lr = cfg.resolved_lr(world_size)
    groups = _param_groups(model, lr, cfg.head_lr if cfg.head_lr is not None else lr,
                           cfg.weight_decay, set(hooks.get("no_weight_decay", ())))
    opt = create_optimizer_v2(groups, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                              momentum=cfg.momentum)
    wrapper = hooks.get("optimizer_wrapper")
    return wrapper(opt, unwrap_features(model)) if wrapper is not None else opt


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epochs: int,
                     steps_per_epoch: int):  # noqa: ANN201  (a timm Scheduler or None)
    """timm scheduler stepped per update: a linear warm-up, then ``cfg.sched`` (cosine decay by
    default; any of :data:`~timm_peft.train.config.SCHEDULERS`, as timm's ``--sched``).

    ``epochs`` include the warm-up, as in "100 epochs including 10 warm-up" (VPT, E2VPT): the
    cosine runs from the end of the warm-up to the last update, and step / multistep count their
    ``decay_epochs`` / ``decay_milestones`` from there. A stage of another length keeps the run's
    shares.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> s = create_scheduler(opt, TrainConfig(lr=0.1, epochs=4, warmup_epochs=1), 4, 10)
        >>> s.step_update(10); round(opt.param_groups[0]["lr"], 4)
        0.1
    """
    from timm.scheduler import create_scheduler_v2
    if cfg.sched == "none":
        return None
    share = epochs / cfg.epochs  # a stage of another length keeps the run's shares
    warmup = cfg.warmup_epochs * share
    sched, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=epochs - warmup, warmup_epochs=warmup,
        warmup_prefix=True, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch, decay_epochs=cfg.decay_epochs * share,
        decay_milestones=[round(m * share) for m in cfg.decay_milestones],
        decay_rate=cfg.decay_rate)
    return sched


def _make_splits(cfg: TrainConfig, image_size: int | None) -> DataSplits:
    return build_splits(cfg.task, cfg.data_dir, val_split=cfg.val_split, seed=cfg.seed,
                        image_size=cfg.task_image_size or image_size or 32,
                        train_size=cfg.train_size, val_size=cfg.val_size, test_size=cfg.test_size,
                        dataset=cfg.dataset, train_split=cfg.train_split,
                        val_split_name=cfg.val_split_name, test_split=cfg.test_split,
                        download=cfg.dataset_download)
