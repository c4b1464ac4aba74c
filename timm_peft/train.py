"""Fine-tuning loop: timm data pipeline, optimiser and schedule, DDP, checkpoints and adapters.

One loop serves every method. What a method needs beyond a plain optimiser step it brings through
:meth:`timm_peft.core.PeftMethod.training_hooks` (an optimiser wrapper, parameters exempt from
weight decay, stages run after training); nothing here looks at a method's name.

The loop follows the papers' protocol (VPT, Jia et al. 2022, Sec. 4; SSF, Lian et al. 2022,
Sec. 4.1): timm's ``resolve_data_config``/``create_transform`` for the data, timm's optimiser
factory and a cosine schedule with linear warm-up stepped per update, no weight decay on 1-D
tensors, a separate head learning rate, optional AMP and gradient clipping. The best epoch on the
validation set (the last one when there is none) is saved with :func:`timm_peft.save_pretrained`.

timm ``train.py``'s options keep their names and meaning (grad checkpointing, channels-last,
``torch.compile``, an EMA of the trainable tensors, drop path, gradient accumulation, mixup /
cutmix, label smoothing, RandAugment, random erasing ...), and timm's utilities do the work
(``NativeScaler``, ``dispatch_clip_grad``, ``ModelEmaV3``, ``init_distributed_device``,
``update_summary``). Progress goes through :mod:`logging` to the console and ``log.txt``.

Under ``torchrun`` the same code runs data-parallel: each process builds the same frozen base from
the same weights, and ``DistributedDataParallel`` all-reduces the gradients of the trainable
tensors only (the adapter and the head) - the backbone is never communicated.

Example:
    >>> from timm_peft.train import TrainConfig, train
    >>> cfg = TrainConfig(model="vit_tiny_patch16_224.linear", task="count",
    ...                   model_kwargs=dict(img_size=32, depth=2), pretrained=False,
    ...                   epochs=1, train_size=64, test_size=32, batch_size=16,
    ...                   output="runs/doc", progress=False)
    >>> result = train(cfg)  # doctest: +SKIP
    >>> result.adapter_dir  # doctest: +SKIP
    PosixPath('runs/doc/adapter')
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import shutil
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .core import PeftConfig, cfg_field, get_method, get_nb_trainable_parameters, unwrap_features
from .data import TASKS, DataSplits, TransformDataset, build_splits, list_tasks
from .io import WEIGHTS_NAME, atomic_write, base_fingerprint, save_pretrained

__all__ = ["TrainConfig", "Recipe", "RECIPES", "list_recipes", "get_recipe", "train",
           "TrainResult", "StageContext", "create_optimizer", "create_scheduler", "build_model",
           "build_transforms", "evaluate", "evaluate_adapter", "pretrained_overlay",
           "TRAINING_ARGS_NAME", "AdapterEma",
           "CHECKPOINT_NAME", "LOG_NAME", "LOG_TXT_NAME", "SUMMARY_CSV_NAME"]

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
logger = logging.getLogger(__name__)
#: training-hook keys this loop understands (see PeftMethod.training_hooks)
_HOOK_KEYS = ("optimizer_wrapper", "no_weight_decay", "stages", "metrics")


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; the ``timm-peft train`` flags map one to one.

    Values are checked on construction (types, ranges, choices), like a method's config.

    Example:
        >>> TrainConfig(model="resnet18.bias", task="texture", lr=0.01).lr
        0.01
    """

    # --- model
    model: str = cfg_field("", help="<arch>[.<weight tag>].<method>, e.g. vit_base_patch16_224.ssf")
    peft_cfg: dict = cfg_field(default_factory=dict, help="the method's config fields")
    model_kwargs: dict = cfg_field(default_factory=dict,
                                   help="extra timm.create_model arguments, e.g. img_size=32")
    pretrained: bool = cfg_field(True, help="start from pretrained weights (timm's path)")
    pretrained_file: str | None = cfg_field(None, help="local weights file for the base "
                                            "(timm pretrained_cfg_overlay file=...)")
    pretrained_cfg: dict = cfg_field(default_factory=dict, help="pretrained_cfg entries "
                                     "describing the weights, e.g. input_size=[3,32,32]")
    drop_path: float | None = cfg_field(None, ge=0.0, lt=1.0, help="stochastic depth rate of the "
                                        "backbone (timm's drop_path_rate)")
    drop: float | None = cfg_field(None, ge=0.0, lt=1.0, help="dropout rate (timm's drop_rate)")
    grad_checkpointing: bool = cfg_field(False, help="recompute the backbone's activations in "
                                         "the backward pass (less memory, more compute)")
    channels_last: bool = cfg_field(False, help="channels-last memory format for model and input")
    torchcompile: str | None = cfg_field(None, help="torch.compile the model with this backend "
                                         "(flag alone: inductor)")
    torchcompile_mode: str | None = cfg_field(None, choices=(
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode")
    model_ema: bool = cfg_field(False, help="keep an exponential moving average of the trainable "
                                "tensors; validate and save the averaged adapter")
    model_ema_decay: float = cfg_field(0.9998, gt=0.0, lt=1.0, help="EMA decay per update")
    model_ema_warmup: bool = cfg_field(False, help="EMA decay warm-up (timm ModelEmaV3)")
    # --- data
    task: str | None = cfg_field(None, choices=list_tasks(), help="built-in generated task")
    data_dir: str | None = cfg_field(None, help="data root: an ImageFolder tree with train/ [val/] "
                                     "[test/], or the root for --dataset")
    dataset: str | None = cfg_field(None, help="timm dataset (timm.data.create_dataset): folder, "
                                    "torch/<name>, hfds/<name>; or vtab1k/<task>, fgvc/<name>")
    train_split: str = cfg_field("train", help="--dataset split to train on (VTAB-1k: train800, "
                                 "train800val200)")
    val_split_name: str | None = cfg_field(None, help="--dataset split to validate on (timm's "
                                           "--val-split; ours takes a fraction), e.g. val200")
    test_split: str | None = cfg_field("test", help="--dataset split to test on (none: no test)")
    dataset_download: bool = cfg_field(False, help="let torchvision download torch/ datasets")
    train_size: int | None = cfg_field(None, ge=1, help="generated task: training images (1000)")
    val_size: int = cfg_field(0, ge=0, help="generated task: separate validation images")
    test_size: int | None = cfg_field(None, ge=1, help="generated task: test images (500)")
    task_image_size: int | None = cfg_field(None, ge=8, help="generated task: rendered size "
                                            "(default: the model's input size)")
    val_split: float = cfg_field(0.0, ge=0.0, lt=1.0, help="fraction of train held out for "
                                 "validation (VTAB-1k 0.2, FGVC 0.1); 0 uses val/ if present")
    input_size: tuple[int, int, int] | None = cfg_field(None, ge=1, help="model input C H W")
    interpolation: str | None = cfg_field(None, choices=("bilinear", "bicubic", "nearest",
                                                         "lanczos", "random"))
    crop_pct: float | None = cfg_field(None, gt=0.0, le=1.0, help="eval center-crop fraction")
    mean: tuple[float, ...] | None = cfg_field(None)
    std: tuple[float, ...] | None = cfg_field(None, gt=0.0)
    aug: bool = cfg_field(False, help="timm's training transform: random resized crop, flip "
                          "and the options below (FGVC); off: the eval transform (VTAB-1k)")
    scale: tuple[float, float] | None = cfg_field(None, gt=0.0, help="random resized crop scale "
                                                  "range (timm default 0.08 1.0)")
    ratio: tuple[float, float] | None = cfg_field(None, gt=0.0, help="random resized crop aspect "
                                                  "ratio range (timm default 3/4 4/3)")
    hflip: float = cfg_field(0.5, ge=0.0, le=1.0, help="horizontal flip probability (with --aug)")
    vflip: float = cfg_field(0.0, ge=0.0, le=1.0, help="vertical flip probability (with --aug)")
    color_jitter: float = cfg_field(0.0, ge=0.0, help="color jitter strength (with --aug)")
    aa: str | None = cfg_field(None, help="AutoAugment policy, e.g. rand-m9-mstd0.5-inc1, "
                               "augmix-m5, v0 (with --aug)")
    reprob: float = cfg_field(0.0, ge=0.0, le=1.0, help="random erasing probability (with --aug)")
    remode: str = cfg_field("pixel", choices=("const", "rand", "pixel"), help="random erasing mode")
    recount: int = cfg_field(1, ge=1, help="random erasing count")
    mixup: float = cfg_field(0.0, ge=0.0, help="mixup alpha (active when > 0)")
    cutmix: float = cfg_field(0.0, ge=0.0, help="cutmix alpha (active when > 0)")
    cutmix_minmax: tuple[float, float] | None = cfg_field(None, ge=0.0, le=1.0, help="cutmix "
                                                          "min/max box ratio (overrides alpha)")
    mixup_prob: float = cfg_field(1.0, ge=0.0, le=1.0, help="probability of mixup or cutmix per batch")
    mixup_switch_prob: float = cfg_field(0.5, ge=0.0, le=1.0, help="probability of cutmix "
                                         "instead of mixup when both are on")
    mixup_mode: str = cfg_field("batch", choices=("batch", "pair", "elem"))
    mixup_off_epoch: int = cfg_field(0, ge=0, help="turn mixup/cutmix off from this epoch (0: never)")
    smoothing: float = cfg_field(0.0, ge=0.0, lt=1.0, help="label smoothing (alias "
                                 "--label-smoothing)")
    # --- optimisation
    epochs: int = cfg_field(10, ge=1)
    warmup_epochs: float | None = cfg_field(None, ge=0.0, help="linear warm-up epochs (default: "
                                            "1, none in a 1-epoch run)")
    batch_size: int = cfg_field(64, ge=1, help="per process; the global batch is x world size")
    opt: str = cfg_field("adamw", help="timm optimiser name (sgd, momentum, adam, adamw, ...)")
    lr: float | None = cfg_field(None, gt=0.0, help="learning rate; default lr_base scaled")
    lr_base: float = cfg_field(1e-3, gt=0.0, help="lr at a global batch of lr_base_size")
    lr_base_size: int | None = cfg_field(None, ge=1, help="scale lr_base by global batch / this "
                                         "(VPT: 256); None: no scaling")
    head_lr: float | None = cfg_field(None, gt=0.0, help="head learning rate (default: lr)")
    weight_decay: float = cfg_field(1e-4, ge=0.0)
    momentum: float = cfg_field(0.9, ge=0.0, lt=1.0)
    sched: str = cfg_field("cosine", choices=("cosine", "constant", "none"))
    min_lr: float = cfg_field(0.0, ge=0.0)
    warmup_lr: float = cfg_field(1e-6, ge=0.0)
    clip_grad: float | None = cfg_field(None, gt=0.0, help="gradient clipping threshold")
    clip_mode: str = cfg_field("norm", choices=("norm", "value", "agc"), help="timm's "
                               "dispatch_clip_grad mode")
    grad_accum_steps: int = cfg_field(1, ge=1, help="batches per optimiser update (gradients "
                                      "accumulated, loss averaged)")
    amp: bool | None = cfg_field(None, help="mixed precision (default: on for CUDA)")
    amp_dtype: str = cfg_field("bfloat16", choices=("bfloat16", "float16"))
    # --- run
    seed: int = cfg_field(0, ge=0)
    workers: int | None = cfg_field(None, ge=0, help="loader workers (default: by CPU count)")
    device: str | None = cfg_field(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    output: str | None = cfg_field(None, help="run directory (default runs/<time>-<model>-<data>)")
    resume: str | None = cfg_field(None, help="checkpoint file or run directory to continue")
    overwrite: bool = cfg_field(False, help="start over in an --output that holds a run, "
                                "deleting that run's files")
    checkpoint: bool = cfg_field(True, help="write checkpoint.pt after every epoch (for resume)")
    progress: bool = cfg_field(True, help="tqdm progress bars (the run header and epoch "
                               "summaries are logged either way)")
    recipes: tuple[str, ...] = cfg_field((), help="recipes applied, in order")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # JSON and argparse give lists where tuples are meant
            value = getattr(self, f.name)
            if isinstance(value, list) and "tuple" in str(hints[f.name]):
                setattr(self, f.name, tuple(value))
        # same field checks as a method's config: one validation rule for every config
        PeftConfig.validate(self)  # type: ignore[arg-type]
        from timm.optim import list_optimizers
        if self.opt.lower() not in list_optimizers():
            raise ValueError(f"unknown optimiser {self.opt!r}; timm's optimisers: "
                             f"{list_optimizers()}")
        if self.task is not None and (self.data_dir is not None or self.dataset is not None):
            raise ValueError("give either task or data_dir/dataset, not both")
        if self.dataset is not None:
            from .data import check_dataset_name
            check_dataset_name(self.dataset, self.data_dir)
            if self.val_split and self.val_split_name:
                raise ValueError("give either val_split (a fraction held out of the training "
                                 "split) or val_split_name (a split of the dataset), not both")
        elif (self.val_split_name is not None or self.train_split != "train"
              or self.test_split != "test"):
            raise ValueError("train_split, val_split_name and test_split name splits of a "
                             "--dataset; give one (e.g. --dataset vtab1k/cifar)")
        if self.overwrite and self.resume:
            raise ValueError("give either resume (continue a run) or overwrite (start it over), "
                             "not both")
        if self.warmup_epochs is None:  # one epoch, but a 1-epoch run has no room for it
            self.warmup_epochs = 1.0 if self.epochs > 1 else 0.0
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be less than epochs "
                             f"({self.epochs}); pass --warmup-epochs 0 for no warm-up")
        for key, why in (("num_classes", "from the data"), ("pretrained", "its own option"),
                         ("peft", "its own option"), ("peft_cfg", "its own option"),
                         ("pretrained_cfg_overlay", "its own option"),
                         ("drop_path_rate", "--drop-path"), ("drop_rate", "--drop")):
            if key in self.model_kwargs:
                raise ValueError(f"model_kwargs may not set {key!r}: it is set by the run ({why})")
        if not self.aug:  # options of timm's training transform do nothing without it
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            given = [k for k in ("scale", "ratio", "hflip", "vflip", "color_jitter", "aa",
                                 "reprob") if getattr(self, k) != defaults[k]]
            if given:
                flags = ", ".join("--" + k.replace("_", "-") for k in given)
                raise ValueError(f"{flags} set(s) timm's training augmentation, which is off "
                                 "(the VTAB-1k recipe resizes only); add --aug")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_recipes(cls, recipes: list[str] | tuple[str, ...] = (), **overrides: Any) -> "TrainConfig":
        """Defaults, then each recipe's settings in order, then ``overrides``.

        Example:
            >>> cfg = TrainConfig.from_recipes(["vtab1k", "vpt"], model="vit_base_patch16_224.vpt")
            >>> cfg.val_split, cfg.opt, cfg.epochs
            (0.2, 'momentum', 100)
        """
        values: dict[str, Any] = {}
        for name in recipes:
            values.update(get_recipe(name).settings)
        values.update(overrides)
        values["recipes"] = tuple(recipes)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**values)

    def resolved_lr(self, world_size: int = 1) -> float:
        """``lr``, or ``lr_base`` scaled linearly by the global batch when ``lr_base_size`` is set."""
        if self.lr is not None:
            return self.lr
        if self.lr_base_size is None:
            return self.lr_base
        return self.lr_base * self.batch_size * world_size / self.lr_base_size


@dataclass(frozen=True)
class Recipe:
    """Published training settings, applied as :class:`TrainConfig` defaults (``--recipe``)."""

    name: str
    summary: str
    source: str
    settings: dict[str, Any]
    notes: str = ""


_VPT_GRID = ("the authors grid-search lr_base in {50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05} "
             "(x global batch / 256) and weight decay in {0.01, 0.001, 0.0001, 0} on the "
             "validation split of each task; lr_base 1.0 and weight decay 1e-4 are our defaults "
             "from the middle of that grid")

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("vtab1k", "VTAB-1k protocol: 1000 training images, tune on 800/200, no augmentation",
           "Zhai et al. 2019; as run by VPT (Jia et al. 2022), SSF (Lian et al. 2022), E2VPT",
           dict(val_split=0.2, aug=False, crop_pct=1.0),
           "tuning run: train on 800, select on 200; final run: add --val-split 0 to train on "
           "all 1000 and report test accuracy of the last epoch; images are resized to the "
           "model's input size (crop_pct 1.0)"),
    Recipe("fgvc", "FGVC protocol: 90/10 train/val split, random resized crop + flip",
           "VPT (Jia et al. 2022), SSF (Lian et al. 2022)",
           dict(val_split=0.1, aug=True),
           "final run: --val-split 0 with the chosen settings"),
    Recipe("vpt", "VPT authors: SGD momentum 0.9, cosine, 100 epochs incl. 10 warm-up, batch 64",
           "Jia et al. 2022, Visual Prompt Tuning, Sec. 4 and supplementary",
           dict(opt="momentum", momentum=0.9, sched="cosine", epochs=100, warmup_epochs=10,
                batch_size=64, lr_base=1.0, lr_base_size=256, weight_decay=1e-4),
           _VPT_GRID),
    Recipe("e2vpt", "E2VPT authors: as VPT (SGD, cosine, 100 epochs incl. 10 warm-up, batch 64)",
           "Han et al. 2023, E2VPT, Sec. 4.1 'Training'",
           dict(opt="momentum", momentum=0.9, sched="cosine", epochs=100, warmup_epochs=10,
                batch_size=64, lr_base=1.0, lr_base_size=256, weight_decay=1e-4),
           _VPT_GRID + "; batch 80 for Swin-B; pruning ratio and rewinding are method config"),
    Recipe("ssf", "SSF authors: AdamW, cosine, 100 epochs with 10 warm-up",
           "Lian et al. 2022, Scaling & Shifting Your Features, Sec. 4.1",
           dict(opt="adamw", sched="cosine", epochs=100, warmup_epochs=10, batch_size=64,
                lr=1e-2, lr_base_size=None, weight_decay=1e-4),
           "VTAB learning rates span 1e-3 to 5e-2 per task (lr 1e-2 is our default); batch size "
           "and weight decay are not stated in the paper (ours: 64 and 1e-4)"),
    Recipe("lion", "LION authors: Adam (beta1 0.9), lr 1e-5, batch 64",
           "Wang et al. 2024, LION (AAAI), 'Implementation Details'",
           dict(opt="adam", momentum=0.9, lr=1e-5, batch_size=64, epochs=100, warmup_epochs=10,
                sched="cosine", weight_decay=0.0),
           "epochs, schedule and weight decay are not stated (ours: 100 cosine, 10 warm-up, 0); "
           "the robust update rule comes with the method, not the recipe"),
)}


def list_recipes() -> list[str]:
    """Names of the built-in recipes.

    Example:
        >>> list_recipes()
        ['e2vpt', 'fgvc', 'lion', 'ssf', 'vpt', 'vtab1k']
    """
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The :class:`Recipe` called ``name``; unknown names list the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {list_recipes()}")
    return RECIPES[name]


# ----------------------------------------------------------------------------------------------
# distributed helpers
# ----------------------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes in place (identity on one process)."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _setup_distributed(device: str | None) -> _Dist:
    """timm's ``init_distributed_device`` under torchrun (backend by device, env:// rendezvous);
    a process group someone else started (a test harness, a larger program) is joined, not
    re-initialised, and not destroyed at the end."""
    from timm.utils.distributed import init_distributed_device_so, is_distributed_env
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not is_distributed_env() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist(device=torch.device(device))
    if dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local_rank) if device.startswith("cuda") else torch.device(device)
        return _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev)
    info = init_distributed_device_so(device=device.split(":")[0])
    return _Dist(rank=info["global_rank"], world_size=info["world_size"],
                 device=torch.device(info["device"]), owns_group=True)


class _ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, no padding: evaluation counts each image once.

    timm's ``OrderedDistributedSampler`` pads the last shard with repeated images so that every
    process gets as many; the repeats then count twice in the accuracy. Our evaluation sums
    correct predictions and counts over processes, so shards of unequal length are fine and the
    accuracy is exact (the papers' numbers differ by tenths of a point).
    """

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------------------------
# model, data, optimiser
# ----------------------------------------------------------------------------------------------

def _split_model_name(name: str) -> tuple[str, str]:
    """``(arch, method)`` of ``<arch>[.<tag>].<method>``, with clear errors."""
    import timm

    from .core import list_methods
    from .integration import split_method
    if not name:
        raise ValueError("no model given: pass <arch>[.<weight tag>].<method>, e.g. "
                         "vit_base_patch16_224.augreg2_in21k_ft_in1k.ssf")
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r} in {name!r} (see timm.list_models())")
    _, method = split_method(arch, tag or None)
    if method is None:
        which = f" ({tag!r} is not one)" if tag else ""
        raise ValueError(f"model {name!r} names no PEFT method{which}: use "
                         f"<arch>[.<weight tag>].<method> with a method from {list_methods()}, "
                         f"e.g. '{arch}.linear'")
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
    args = {k: getattr(cfg, k) for k in ("input_size", "interpolation", "crop_pct", "mean", "std")}
    args["img_size"] = cfg.model_kwargs.get("img_size")
    if not isinstance(args["img_size"], int):
        args["img_size"] = None
    data_cfg = resolve_data_config(args, model=model)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()}


def build_transforms(data_cfg: dict[str, Any], aug: bool | TrainConfig
                     ) -> tuple[Callable, Callable]:
    """``(train, eval)`` transforms from timm's ``create_transform``.

    Without augmentation the training images get the evaluation transform (resize and center
    crop by ``crop_pct``; VTAB: resize only). With it (``aug=True`` or a :class:`TrainConfig`
    with ``aug``): timm's training transform, random resized crop and horizontal flip, plus the
    config's ``scale``, ``ratio``, ``vflip``, ``color_jitter``, ``aa`` and random erasing.

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
    train_tf = create_transform(
        **common, is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
        vflip=cfg.vflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa, re_prob=cfg.reprob,
        re_mode=cfg.remode, re_count=cfg.recount)
    return train_tf, eval_tf


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
    """timm scheduler stepped per update: a linear warm-up, then cosine decay (or constant).

    ``epochs`` include the warm-up, as in "100 epochs including 10 warm-up" (VPT, E2VPT): the
    cosine runs from the end of the warm-up to the last update. A stage of another length keeps
    the run's warm-up share.

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
    warmup = cfg.warmup_epochs * epochs / cfg.epochs  # same share in later stages
    sched, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=epochs - warmup, warmup_epochs=warmup,
        warmup_prefix=True, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch)
    return sched


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------

@dataclass
class StageContext:
    """What a method's post-training ``"stages"`` receive (see ``PeftMethod.training_hooks``).

    ``fit(model, epochs, desc)`` re-runs the standard loop with a fresh optimiser and schedule
    over the parameters trainable at that moment and returns its final metrics.
    ``all_reduce(t)`` sums a tensor over processes (identity on one process), for statistics
    such as importance scores gathered over the training data. Batches from the loaders are on
    the CPU; move them to ``device``. ``progress`` is the run's ``--no-progress`` choice, for
    stages that show progress bars of their own.
    """

    train_loader: DataLoader
    val_loader: DataLoader | None
    loss_fn: nn.Module
    device: torch.device
    epochs: int
    fit: Callable[[nn.Module, int, str], dict[str, float]]
    all_reduce: Callable[[torch.Tensor], torch.Tensor]
    autocast: Callable[[], ContextManager]
    rank: int = 0
    world_size: int = 1
    progress: bool = True


@dataclass
class TrainResult:
    """Where a run put its outputs and what it measured."""

    output_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    #: the process's rank under torchrun; only rank 0 writes the run directory
    rank: int = 0


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


class AdapterEma:
    """Exponential moving average of a model's trainable tensors (``--model-ema``).

    The averaging is timm's :class:`~timm.utils.ModelEmaV3` (decay, optional warm-up, foreach
    lerp), run over a view that holds only the adapter's tensors: ``ModelEmaV3`` on the whole
    model would deep-copy the frozen backbone (twice the model's memory) and average millions of
    values that never change.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.bias", num_classes=2)
        >>> ema = AdapterEma(m, decay=0.5)
        >>> sorted(ema.state_dict()) == sorted(m.peft_adapter_keys)
        True
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        from timm.utils import ModelEmaV3
        self.keys = list(unwrap_features(model).peft_adapter_keys)
        self.ema = ModelEmaV3(self._view(model), decay=decay, use_warmup=warmup)

    def _view(self, model: nn.Module) -> nn.Module:
        live = unwrap_features(model).state_dict(keep_vars=True)
        view = nn.Module()
        for i, key in enumerate(self.keys):  # the model's own tensors, not copies
            t = live[key].detach()
            if t.is_floating_point():  # ModelEmaV3 reads its device from the parameters
                view.register_parameter(f"t{i}", nn.Parameter(t, requires_grad=False))
            else:
                view.register_buffer(f"t{i}", t)
        return view

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        self.ema.update(self._view(model), step=step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors under the model's state-dict keys (on the CPU)."""
        avg = self.ema.module.state_dict()
        return {k: avg[f"t{i}"].detach().to("cpu", copy=True) for i, k in enumerate(self.keys)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        avg = self.ema.module.state_dict()
        for i, k in enumerate(self.keys):
            avg[f"t{i}"].copy_(state[k])


class _Trainer:
    """One run: loaders, model, DDP wrapping, epochs, checkpoints, logging."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, splits: DataSplits,
                 data_cfg: dict[str, Any], dctx: _Dist, out: Path) -> None:
        self.cfg, self.model, self.splits, self.dctx, self.out = cfg, model, splits, dctx, out
        self.device = dctx.device
        self.model.to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        train_tf, eval_tf = build_transforms(data_cfg, cfg)
        # stages and evaluation get hard labels; the training loss may see mixed soft targets
        self.hard_loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
        self.loss_fn: nn.Module = self.hard_loss_fn
        self.mixup_fn = None
        if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy
            if cfg.batch_size % 2:
                raise ValueError(f"--mixup/--cutmix mix pairs of images: --batch-size must be "
                                 f"even, got {cfg.batch_size}")
            self.mixup_fn = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                label_smoothing=cfg.smoothing, num_classes=len(splits.classes))
            self.loss_fn = SoftTargetCrossEntropy()
        global_batch = cfg.batch_size * dctx.world_size
        if len(splits.train) < global_batch:
            raise ValueError(f"the training set has {len(splits.train)} images, fewer than one "
                             f"global batch ({cfg.batch_size} x {dctx.world_size} processes); "
                             "lower --batch-size")
        workers = cfg.workers if cfg.workers is not None else (
            0 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 1) // 2))
        common = dict(num_workers=workers, pin_memory=self.device.type == "cuda",
                      persistent_workers=workers > 0)
        # the same sampler on one process as on many: the global batch is identical either way
        self.train_sampler = DistributedSampler(splits.train, num_replicas=dctx.world_size,
                                                rank=dctx.rank, shuffle=True, seed=cfg.seed)
        self.train_loader = DataLoader(TransformDataset(splits.train, train_tf),
                                       batch_size=cfg.batch_size, sampler=self.train_sampler,
                                       drop_last=True, **common)
        self.eval_loaders = {
            name: DataLoader(TransformDataset(ds, eval_tf), batch_size=cfg.batch_size,
                             sampler=_ShardSampler(len(ds), dctx.rank, dctx.world_size), **common)
            for name, ds in (("val", splits.val), ("test", splits.test)) if ds is not None}
        amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        self.amp_dtype = getattr(torch, cfg.amp_dtype)
        self.amp = amp
        # as timm's train.py: a loss scaler only for float16 (bfloat16 has float32's range)
        self.scaler = None
        if amp and self.amp_dtype == torch.float16:
            from timm.utils import NativeScaler
            self.scaler = NativeScaler(device=self.device.type)
        self.history: list[dict[str, Any]] = []
        self.global_step = 0
        self.ema: AdapterEma | None = None
        self._forward: nn.Module | None = None  # the DDP-wrapped and/or compiled model

    # --- helpers -------------------------------------------------------------------------------
    def autocast(self) -> ContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _eval_model(self) -> nn.Module:
        return self._forward if self._forward is not None else self.model

    def evaluate(self, split: str) -> dict[str, float] | None:
        loader = self.eval_loaders.get(split)
        if loader is None:
            return None
        return evaluate(self._eval_model(), loader, self.device, self.autocast,
                        self.dctx.all_reduce, memory_format=self.memory_format)

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.dctx.is_main:
            with open(self.out / LOG_NAME, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        """``(forward module, DDP module or None)``: DDP over the trainable tensors, then
        ``torch.compile`` (timm's order)."""
        ddp = None
        if self.dctx.enabled:
            ddp = self._ddp(model)
            model = ddp
        if self.cfg.torchcompile:
            model = torch.compile(model, backend=self.cfg.torchcompile,
                                  mode=self.cfg.torchcompile_mode)
        return model, ddp

    def _ddp(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP
        inner = unwrap_features(model)
        # Each process loaded the same frozen base itself; check that instead of sending it.
        prints = [None] * self.dctx.world_size
        dist.all_gather_object(prints, base_fingerprint(model))
        if len(set(prints)) != 1:
            raise RuntimeError("the processes built different frozen bases (fingerprints "
                               f"{sorted({p[:19] for p in prints})}); give every process the "
                               "same weights")
        state = inner.state_dict()
        for key in inner.peft_adapter_keys:  # only the adapter starts from rank 0's values
            dist.broadcast(state[key], src=0)
        # No broadcast of the module's states at construction (init_sync) and none before each
        # forward (the frozen base's buffers never change). Older torch names the latter
        # broadcast_buffers and may lack init_sync (then the base is sent once, at start).
        accepted = inspect.signature(DDP.__init__).parameters
        kwargs = {"forward_sync_buffers" if "forward_sync_buffers" in accepted
                  else "broadcast_buffers": False}
        if "init_sync" in accepted:
            kwargs["init_sync"] = False
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   **kwargs)

    def _sync_adapter_buffers(self) -> None:
        """Give every process rank 0's adapter buffers (e.g. BatchNorm statistics that train)."""
        if not self.dctx.enabled:
            return
        inner = unwrap_features(self.model)
        params = {n for n, _ in inner.named_parameters()}
        state = inner.state_dict()
        for key in inner.peft_adapter_keys:
            if key not in params:
                dist.broadcast(state[key], src=0)

    @contextlib.contextmanager
    def _ema_weights(self) -> Iterator[None]:
        """The EMA's tensors in the model for the duration (a no-op without ``--model-ema``)."""
        if self.ema is None:
            yield
            return
        raw = _trainable_state(self.model)
        _load_trainable_state(self.model, self.ema.state_dict(), "the EMA state")
        try:
            yield
        finally:
            _load_trainable_state(self.model, raw, "the raw state")

    # --- epochs ---------------------------------------------------------------------------------
    def fit_stage(self, model: nn.Module, epochs: int, desc: str) -> dict[str, Any]:
        """``StageContext.fit``: the standard loop again, fresh optimiser, same model."""
        if model is not self.model and model is not unwrap_features(self.model):
            raise ValueError("StageContext.fit trains the run's own model; pass the model the "
                             "stage received")
        return self.run_epochs(epochs, desc)

    def updates_per_epoch(self) -> int:
        return -(-len(self.train_loader) // self.cfg.grad_accum_steps)

    def run_epochs(self, epochs: int, phase: str, start_epoch: int = 0,
                   resume_state: dict[str, Any] | None = None,
                   checkpoint: Callable[[int, Any, dict[str, Any]], None] | None = None,
                   ) -> dict[str, Any]:
        """Train ``epochs`` epochs with a fresh optimiser; keep the best validation state."""
        from timm.utils import dispatch_clip_grad
        from tqdm.auto import tqdm
        cfg, dctx = self.cfg, self.dctx
        optimizer = create_optimizer(self.model, cfg, dctx.world_size)
        batches, accum = len(self.train_loader), cfg.grad_accum_steps
        updates = self.updates_per_epoch()
        scheduler = create_scheduler(optimizer, cfg, epochs, updates)
        self.ema = AdapterEma(self.model, cfg.model_ema_decay, cfg.model_ema_warmup) \
            if cfg.model_ema else None
        best: dict[str, Any] = dict(acc=-1.0, epoch=-1, state=None)
        if resume_state is not None:
            fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            try:
                optimizer.load_state_dict(resume_state["optimizer"])
            except ValueError as e:
                raise ValueError(f"the checkpoint's optimiser state does not fit this run ({e}); "
                                 "resume with the same method, config and --opt") from e
            for group, hyper in zip(optimizer.param_groups, fresh):
                group.update(hyper)  # this run's lr / weight decay win over the saved ones
            if self.scaler is not None and resume_state.get("scaler"):
                self.scaler.load_state_dict(resume_state["scaler"])
            if self.ema is not None:
                if not resume_state.get("ema"):
                    raise ValueError("the checkpoint holds no EMA state: resume without "
                                     "--model-ema, as the run was started")
                self.ema.load_state_dict(resume_state["ema"])
            best = resume_state["best"]
        if scheduler is not None and start_epoch:
            scheduler.step_update(start_epoch * updates)
        forward, ddp = self._wrap(self.model)
        self._forward = forward
        params = [p for p in self.model.parameters() if p.requires_grad]
        method_metrics = _training_hooks(self.model).get("metrics")
        prefix = unwrap_features(self.model).peft_method
        val_loader = self.eval_loaders.get("val")
        for epoch in range(start_epoch, epochs):
            # one seed per (epoch, process): a resumed run draws the same numbers
            torch.manual_seed(cfg.seed + 1_000_003 * (epoch + 1) + dctx.rank)
            self.train_sampler.set_epoch(epoch)
            if self.mixup_fn is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
                self.mixup_fn.mixup_enabled = False
            self.model.train()
            if method_metrics is not None:
                method_metrics(reset=True)
            stats = torch.zeros(3, dtype=torch.float64, device=self.device)
            t0 = time.perf_counter()
            bar = tqdm(self.train_loader, total=batches, desc=f"{phase} {epoch + 1}/{epochs}",
                       unit="step", disable=not (cfg.progress and dctx.is_main), leave=True,
                       dynamic_ncols=True)
            for step, (x, y) in enumerate(bar):
                x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                y = y.to(self.device, non_blocking=True)
                target = y
                if self.mixup_fn is not None:
                    x, target = self.mixup_fn(x, y)
                update_idx = step // accum
                need_update = (step + 1) % accum == 0 or step + 1 == batches
                # the last update of an epoch may gather fewer batches (as in timm's train.py)
                in_update = accum if update_idx < batches // accum else batches % accum
                sync = ddp.no_sync() if ddp is not None and not need_update \
                    else contextlib.nullcontext()
                with sync:
                    with self.autocast():
                        logits = forward(x)
                        loss = self.loss_fn(logits, target)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at {phase} epoch "
                                                 f"{epoch + 1} step {step + 1}; lower the "
                                                 "learning rate")
                    scaled = loss / in_update if in_update > 1 else loss
                    if self.scaler is not None:
                        self.scaler(scaled, optimizer, clip_grad=cfg.clip_grad,
                                    clip_mode=cfg.clip_mode, parameters=params,
                                    need_update=need_update)
                    else:
                        scaled.backward()
                        if need_update:
                            if cfg.clip_grad is not None:
                                dispatch_clip_grad(params, cfg.clip_grad, mode=cfg.clip_mode)
                            optimizer.step()
                if need_update:
                    optimizer.zero_grad(set_to_none=True)
                    self.global_step += 1
                    if self.ema is not None:
                        self.ema.update(self.model, step=self.global_step)
                    if scheduler is not None:
                        scheduler.step_update(epoch * updates + update_idx + 1)
                stats[0] += loss.detach().float() * y.numel()
                stats[1] += (logits.detach().argmax(-1) == y).sum()
                stats[2] += y.numel()
                if not bar.disable:
                    n = stats[2].item()
                    bar.set_postfix(loss=f"{stats[0].item() / n:.3f}",
                                    acc=f"{stats[1].item() / n:.3f}",
                                    img_s=f"{n * dctx.world_size / (time.perf_counter() - t0):.0f}",
                                    refresh=False)
            bar.close()
            elapsed = time.perf_counter() - t0
            dctx.all_reduce(stats)
            self._sync_adapter_buffers()
            record: dict[str, Any] = dict(
                phase=phase, epoch=epoch + 1, epochs=epochs, step=self.global_step,
                lr=optimizer.param_groups[0]["lr"], train_loss=stats[0].item() / stats[2].item(),
                train_acc=stats[1].item() / stats[2].item(), epoch_time_s=round(elapsed, 3),
                img_per_s=round(stats[2].item() / elapsed, 1))
            if method_metrics is not None:  # this process's view (rank 0's under torchrun)
                record.update({f"{prefix}/{k}": v for k, v in method_metrics(reset=False).items()})
            if val_loader is not None:
                if self.ema is not None:  # timm's choice: the EMA is what gets selected
                    record["val_acc_raw"] = self.evaluate("val")["acc"]
                with self._ema_weights():
                    val = self.evaluate("val")
                    record.update(val_loss=val["loss"], val_acc=val["acc"])
                    if val["acc"] > best["acc"]:
                        best = dict(acc=val["acc"], epoch=epoch + 1,
                                    state=_trainable_state(self.model))
                record["best_val_acc"] = best["acc"]
            self.log(record)
            if dctx.is_main:
                _log_epoch(record, self.out if phase == "train" else None)
            if checkpoint is not None:
                checkpoint(epoch + 1, optimizer, best)
        if best["state"] is not None:
            _load_trainable_state(self.model, best["state"], "the best epoch's state")
        elif self.ema is not None:  # no validation: the last average is the result
            _load_trainable_state(self.model, self.ema.state_dict(), "the EMA state")
        result = dict(best_val_acc=best["acc"] if best["state"] is not None else None,
                      best_epoch=best["epoch"] if best["state"] is not None else epochs)
        return result


def _log_epoch(record: dict[str, Any], summary_dir: Path | None) -> None:
    """One console/log-file line per epoch; main-phase epochs also go to timm's summary.csv."""
    shown = [f"{k}={record[k]:.4f}" for k in ("train_loss", "train_acc", "val_loss", "val_acc")
             if k in record]
    logger.info(f"{record['phase']} epoch {record['epoch']}/{record['epochs']}: "
                + " ".join(shown) + f" lr={record['lr']:.3g} time={record['epoch_time_s']:.1f}s")
    if summary_dir is not None:
        from timm.utils import update_summary
        train_m = dict(loss=record["train_loss"], acc=record["train_acc"])
        eval_m = {k[4:]: record[k] for k in ("val_loss", "val_acc") if k in record}
        update_summary(record["epoch"], train_m, eval_m, str(summary_dir / SUMMARY_CSV_NAME),
                       lr=record["lr"])


class _TqdmHandler(logging.StreamHandler):
    """Console log lines that do not tear tqdm's progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's contract: never raise from a handler
            self.handleError(record)


@contextlib.contextmanager
def _run_logging(is_main: bool) -> Iterator[Callable[[Path], None]]:
    """For the duration of a run, log ``timm_peft`` messages to the console (unless the
    application configured logging itself) and, once the run directory exists, to its
    ``log.txt``: the context yields ``attach(out)`` for that."""
    pkg = logging.getLogger("timm_peft")
    added: list[logging.Handler] = []

    def attach(out: Path) -> None:
        if is_main:
            added.append(logging.FileHandler(out / LOG_TXT_NAME))
            added[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            pkg.addHandler(added[-1])

    if is_main and not pkg.handlers and not logging.getLogger().handlers:
        added.append(_TqdmHandler(sys.stderr))
        added[-1].setFormatter(logging.Formatter("%(message)s"))
        pkg.addHandler(added[-1])
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    try:
        yield attach
    finally:
        for h in added:
            pkg.removeHandler(h)
            h.close()
        pkg.setLevel(old_level)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------

def _default_output(cfg: TrainConfig) -> Path:
    data = cfg.task or (cfg.dataset or "").replace("/", "-") or Path(cfg.data_dir or "data").name
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{data}"


def _make_splits(cfg: TrainConfig, image_size: int | None) -> DataSplits:
    return build_splits(cfg.task, cfg.data_dir, val_split=cfg.val_split, seed=cfg.seed,
                        image_size=cfg.task_image_size or image_size or 32,
                        train_size=cfg.train_size, val_size=cfg.val_size, test_size=cfg.test_size,
                        dataset=cfg.dataset, train_split=cfg.train_split,
                        val_split_name=cfg.val_split_name, test_split=cfg.test_split,
                        download=cfg.dataset_download)


def train(cfg: TrainConfig, splits: DataSplits | None = None, *,
          distributed: bool = True) -> TrainResult:
    """Fine-tune ``cfg.model`` on the configured data and save the best adapter.

    Writes to the run directory: ``adapter/`` (:func:`timm_peft.save_pretrained` output plus
    ``training_args.json``), ``checkpoint.pt`` (last epoch, for ``resume``), ``log.jsonl`` (one
    JSON record per epoch) and ``summary.json``. ``splits`` replaces the data named in ``cfg``
    (e.g. datasets built once and shared by many runs). Under ``torchrun`` every process calls
    this; only rank 0 writes. ``distributed=False`` trains on this process alone even under
    ``torchrun`` (one run per process, as ``timm-peft reproduce`` spreads its runs).
    Progress goes to the ``timm_peft`` logger, and to ``log.txt`` in the run directory.

    Example:
        >>> cfg = TrainConfig(model="resnet18.bias", task="texture", pretrained=False,
        ...                   epochs=1, train_size=64, test_size=64, batch_size=32)
        >>> train(cfg).metrics["test_acc"]  # doctest: +SKIP
        0.23
    """
    if cfg.task is None and cfg.data_dir is None and cfg.dataset is None and splits is None:
        raise ValueError(f"no data: give a built-in task ({list_tasks()}), a data directory or "
                         "a dataset")
    dctx = _setup_distributed(cfg.device) if distributed else _Dist(
        device=torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    try:
        return _train(cfg, splits, dctx)
    finally:
        if dctx.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, splits: DataSplits | None, dctx: _Dist) -> TrainResult:
    resume_path = _resolve_resume(cfg.resume) if cfg.resume else None
    out = Path(cfg.output) if cfg.output else (resume_path.parent if resume_path else None)
    if out is None:
        out = _default_output(cfg)
        if dctx.enabled:  # every process must agree on a name made from the clock
            names = [str(out)]
            dist.broadcast_object_list(names, src=0)
            out = Path(names[0])
    held = [n for n in _RUN_FILES if os.path.lexists(out / n)]
    # resuming continues the run in its own directory, or in an empty --output the user names
    continuing = resume_path is not None and out.resolve() == resume_path.parent.resolve()
    if resume_path is None and held:
        if not cfg.overwrite:
            hint = f"continue it with --resume {out}, " if CHECKPOINT_NAME in held else ""
            raise ValueError(f"{out} already holds a run ({', '.join(held)}); {hint}start it over "
                             "with --overwrite or choose another --output")
    elif resume_path is not None and not continuing and held:
        raise ValueError(f"--output {out} already holds a run ({', '.join(held)}); resuming "
                         f"{resume_path} writes the continued run where --output points: give a "
                         f"new --output, or none to continue in {resume_path.parent}")

    with _run_logging(dctx.is_main) as attach_log:
        if continuing:
            attach_log(out)
        return _train_logged(cfg, splits, dctx, out, resume_path, held, attach_log)


def _train_logged(cfg: TrainConfig, splits: DataSplits | None, dctx: _Dist, out: Path,
                  resume_path: Path | None, held: list[str],
                  attach_log: Callable[[Path], None]) -> TrainResult:
    # a generated task is rendered at the model's input size, so the model comes first; its
    # class count is known without rendering anything
    if splits is None and cfg.task is None:
        splits = _make_splits(cfg, None)
    classes = splits.classes if splits is not None else list(TASKS[cfg.task].classes)
    model = build_model(cfg, num_classes=len(classes))
    data_cfg = _data_config(cfg, model)
    if splits is None:
        splits = _make_splits(cfg, data_cfg["input_size"][-1])
    trainer = _Trainer(cfg, model, splits, data_cfg, dctx, out)

    start_epoch, resume_state = 0, None
    if resume_path is not None:
        ckpt = _read_checkpoint(resume_path, cfg, model, splits.classes)
        _load_trainable_state(model, ckpt["adapter"], f"checkpoint {resume_path}")
        start_epoch, trainer.global_step = ckpt["epoch"], ckpt["step"]
        resume_state = ckpt
        trainer.history = list(ckpt.get("history", []))
        if dctx.is_main:
            logger.info(f"resuming {resume_path} at epoch {start_epoch + 1}/{cfg.epochs}, "
                        f"step {trainer.global_step}")
    fingerprint = base_fingerprint(model)
    trainable, total = get_nb_trainable_parameters(model)
    inner = unwrap_features(model)
    run_info = dict(model=cfg.model, method=inner.peft_method, data=splits.source,
                    num_classes=len(splits.classes), train_images=len(splits.train),
                    val_images=len(splits.val) if splits.val is not None else 0,
                    test_images=len(splits.test) if splits.test is not None else 0,
                    trainable_params=trainable, total_params=total, world_size=dctx.world_size,
                    global_batch=cfg.batch_size * dctx.world_size * cfg.grad_accum_steps,
                    lr=cfg.resolved_lr(dctx.world_size), device=str(dctx.device),
                    updates_per_epoch=trainer.updates_per_epoch())
    if dctx.is_main:
        # only now that model and data are ready: a run that fails to start leaves no trace
        if resume_path is None or out.resolve() != resume_path.parent.resolve():
            for name in held:  # --overwrite (a resume into another --output holds none)
                (shutil.rmtree if (out / name).is_dir() else os.remove)(out / name)
            out.mkdir(parents=True, exist_ok=True)
            attach_log(out)
        logger.info(f"run {out}: " + ", ".join(f"{k}={v}" for k, v in run_info.items()))
        if getattr(get_method(inner.peft_method), "saves_whole_model", False):
            logger.warning(f"--model {cfg.model}: this method trains every parameter; the saved "
                           f"adapter will be the whole model ({trainable:,d} values), not a "
                           "small file. For a parameter-efficient run pick another method "
                           "suffix (timm-peft info lists them).")
        args = dict(cfg.to_dict(), classes=splits.classes, data_config=data_cfg, run=run_info)
        # atomically: a resume reads it, and a kill must not leave half of it
        atomic_write(out / "args.json", (json.dumps(args, indent=2) + "\n").encode())

    def checkpoint(epoch: int, optimizer: torch.optim.Optimizer, best: dict[str, Any]) -> None:
        if not dctx.is_main:
            return
        atomic_write(out / CHECKPOINT_NAME, lambda fh: torch.save(dict(
            format=_CHECKPOINT_FORMAT, model=cfg.model, model_kwargs=cfg.model_kwargs,
            peft_config=inner.peft_config.to_dict(), num_classes=len(splits.classes),
            classes=splits.classes, base_fingerprint=fingerprint, epoch=epoch,
            step=trainer.global_step, adapter=_trainable_state(model),
            optimizer=optimizer.state_dict(),
            scaler=trainer.scaler.state_dict() if trainer.scaler is not None else None,
            ema=trainer.ema.state_dict() if trainer.ema is not None else None,
            best=best, history=trainer.history), fh))

    main = trainer.run_epochs(cfg.epochs, "train", start_epoch=start_epoch,
                              resume_state=resume_state,
                              checkpoint=checkpoint if cfg.checkpoint else None)
    if resume_state is not None and start_epoch >= cfg.epochs and resume_state["best"]["state"]:
        _load_trainable_state(model, resume_state["best"]["state"], "the checkpoint's best state")

    hooks = _training_hooks(model)
    ctx = StageContext(
        train_loader=trainer.train_loader, val_loader=trainer.eval_loaders.get("val"),
        loss_fn=trainer.hard_loss_fn, device=dctx.device, epochs=cfg.epochs,
        fit=trainer.fit_stage,
        all_reduce=dctx.all_reduce, autocast=trainer.autocast, rank=dctx.rank,
        world_size=dctx.world_size, progress=cfg.progress)
    stages = []
    for name, stage in hooks.get("stages", ()):
        if dctx.is_main:
            logger.info(f"stage {name!r} of method {inner.peft_method!r}")
        result = stage(inner, ctx)
        stages.append(dict(stage=name, **(result if isinstance(result, dict) else {})))
        trainer.log(dict(phase=name, stage_done=True, step=trainer.global_step))

    trainer._sync_adapter_buffers()
    metrics: dict[str, Any] = dict(best_epoch=main["best_epoch"])
    for split in ("val", "test"):
        res = trainer.evaluate(split)
        if res is not None:
            metrics[f"{split}_acc"], metrics[f"{split}_loss"] = res["acc"], res["loss"]
    trainable, _ = get_nb_trainable_parameters(model)
    metrics.update(trainable_params=trainable, stages=stages)
    adapter_dir = out / "adapter"
    if dctx.is_main:
        # the adapter records the data config it was trained with, and its class names
        inner.pretrained_cfg = {**(inner.pretrained_cfg or {}), **{
            k: tuple(v) if isinstance(v, list) else v for k, v in data_cfg.items()}}
        with warnings.catch_warnings():  # said at the start, against the user's --model
            warnings.filterwarnings("ignore", message=".*trains every parameter")
            save_pretrained(model, adapter_dir, label_names=list(splits.classes),
                            dataset=splits.source, metrics=metrics)
        training_args = dict(cfg.to_dict(), classes=splits.classes, data_config=data_cfg,
                             metrics=metrics)
        for key in ("pretrained_file", "data_dir"):  # usable from any working directory
            if training_args.get(key):
                training_args[key] = str(Path(training_args[key]).resolve())
        atomic_write(adapter_dir / TRAINING_ARGS_NAME,
                     (json.dumps(training_args, indent=2) + "\n").encode())
        metrics["adapter_bytes"] = (adapter_dir / WEIGHTS_NAME).stat().st_size
        trainer.log(dict(phase="final", step=trainer.global_step, **metrics))
        (out / "summary.json").write_text(json.dumps(dict(run=run_info, metrics=metrics),
                                                     indent=2) + "\n")
        logger.info(f"saved the adapter to {adapter_dir} ("
                    + ", ".join(f"{k}={metrics[k]:.4f}" for k in ("val_acc", "test_acc")
                                if k in metrics) + ")")
    dctx.barrier()
    return TrainResult(output_dir=out, adapter_dir=adapter_dir, metrics=metrics,
                       history=trainer.history, rank=dctx.rank)


# ----------------------------------------------------------------------------------------------
# evaluating a saved adapter
# ----------------------------------------------------------------------------------------------

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
    from .io import AdapterError, from_pretrained, read_training_args
    from .io.load import open_adapter
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

