"""A run's settings: :class:`TrainConfig` (one field per ``timm-peft train`` flag) and the
published :class:`Recipe` s applied as its defaults."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

from ..core import PeftConfig, cfg_field
from ..data import list_tasks


#: timm's training crops (``create_transform(train_crop_mode=...)``), and "squash": VPT's code's
#: resize of both sides to input / crop_pct followed by a random crop (``build_transforms``)
TRAIN_CROP_MODES = ("rrc", "rkrc", "rkrr", "squash")
#: timm's schedulers (``timm.scheduler.create_scheduler_v2``) a run may use; "plateau" is left
#: out (deprecated in timm, and it steps on a validation metric, not per update)
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "constant", "none")


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
    img_size: int | None = cfg_field(None, ge=1, help="input image side (timm's --img-size: "
                                     "the data config's input size is 3 x N x N; a model built "
                                     "for one size, e.g. a ViT, also needs --model-kwargs "
                                     "img_size=N)")
    num_classes: int | None = cfg_field(None, ge=1, help="timm's --num-classes: the head is sized "
                                        "from the data; if given, it must match the data")
    interpolation: str | None = cfg_field(None, choices=("bilinear", "bicubic", "nearest",
                                                         "lanczos", "random"))
    crop_pct: float | None = cfg_field(None, gt=0.0, le=1.0, help="eval center-crop fraction")
    crop_mode: str | None = cfg_field(None, choices=("center", "squash", "border"), help="eval "
                                      "resize (timm's --crop-mode): center keeps the aspect and "
                                      "crops, squash resizes both sides to the input size (a "
                                      "non-square image keeps all of it), border pads")
    mean: tuple[float, ...] | None = cfg_field(None)
    std: tuple[float, ...] | None = cfg_field(None, gt=0.0)
    aug: bool = cfg_field(False, help="timm's training transform: random resized crop, flip "
                          "and the options below (FGVC); off: the eval transform (VTAB-1k)")
    scale: tuple[float, float] | None = cfg_field(None, gt=0.0, help="random resized crop scale "
                                                  "range (timm default 0.08 1.0)")
    ratio: tuple[float, float] | None = cfg_field(None, gt=0.0, help="random resized crop aspect "
                                                  "ratio range (timm default 3/4 4/3)")
    train_crop_mode: str | None = cfg_field(None, choices=TRAIN_CROP_MODES, help="training crop "
                                            "with --aug (timm's --train-crop-mode): rrc random "
                                            "resized crop (default), rkrc/rkrr timm's keep-ratio "
                                            "crops; squash (ours): both sides resized to "
                                            "input / crop_pct, then a random crop and a flip "
                                            "(VPT's code: 256 then 224)")
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
    sched: str = cfg_field("cosine", choices=SCHEDULERS, help="timm's scheduler "
                           "(create_scheduler_v2), stepped per update after the warm-up")
    decay_epochs: float = cfg_field(90.0, gt=0.0, help="step: decay the lr every this many "
                                    "epochs (timm's default 90)")
    decay_milestones: tuple[int, ...] = cfg_field((90, 180, 270), ge=1, help="multistep: "
                                                  "epochs to decay the lr at")
    decay_rate: float = cfg_field(0.1, gt=0.0, help="step/multistep: lr factor per decay; poly: "
                                  "the power")
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
            from ..data import check_dataset_name
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
        if self.img_size is not None and self.input_size is not None:
            raise ValueError("give either img_size (N: input 3 x N x N, timm's --img-size) or "
                             "input_size (C H W), not both")
        for key, why in (("num_classes", "from the data; --num-classes checks it"),
                         ("pretrained", "its own option"),
                         ("peft", "its own option"), ("peft_cfg", "its own option"),
                         ("pretrained_cfg_overlay", "its own option"),
                         ("drop_path_rate", "--drop-path"), ("drop_rate", "--drop")):
            if key in self.model_kwargs:
                raise ValueError(f"model_kwargs may not set {key!r}: it is set by the run ({why})")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        given = [k for k in ("scale", "ratio", "hflip", "vflip", "color_jitter", "aa", "reprob",
                             "train_crop_mode") if getattr(self, k) != defaults[k]]
        if not self.aug and given:  # options of timm's training transform do nothing without it
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{flags} set(s) timm's training augmentation, which is off "
                             "(the VTAB-1k recipe resizes only); add --aug")
        unused = [k for k in given if k not in ("hflip", "train_crop_mode")]
        if self.train_crop_mode == "squash" and unused:  # VPT's code's crop + flip, nothing else
            flags = ", ".join("--" + k.replace("_", "-") for k in unused)
            raise ValueError(f"--train-crop-mode squash is VPT's code's resize, random crop and "
                             f"flip (--hflip); it does not apply {flags}: drop them or use "
                             "timm's rrc mode")

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
#: VPT's code normalises with ImageNet's mean/std, not the 0.5/0.5 of the in21k checkpoint's
#: pretrained_cfg (issue 27's audit of the released code)
_IMAGENET_NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
#: VPT's schedule and optimiser, which E2VPT trains with too
_VPT_SETTINGS = dict(opt="momentum", momentum=0.9, sched="cosine", epochs=100, warmup_epochs=10,
                     batch_size=64, lr_base=1.0, lr_base_size=256, weight_decay=1e-4,
                     **_IMAGENET_NORM)

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("vtab1k", "VTAB-1k protocol: 1000 training images, tune on 800/200, no augmentation, "
           "images squashed to the input size",
           "Zhai et al. 2019; as run by VPT (Jia et al. 2022), SSF (Lian et al. 2022), E2VPT",
           dict(val_split=0.2, aug=False, crop_pct=1.0, crop_mode="squash"),
           "tuning run: train on 800, select on 200; final run: add --val-split 0 to train on "
           "all 1000 and report test accuracy of the last epoch; images are resized directly to "
           "the model's input size, both sides (crop_mode squash: SSF Sec. 4.1 'directly resize "
           "the image to 224x224', as VPT's and SSF's code do), so a 1242x375 KITTI image keeps "
           "its whole width"),
    Recipe("fgvc", "FGVC protocol: 90/10 train/val split, random resized crop + flip",
           "VPT (Jia et al. 2022), SSF (Lian et al. 2022)",
           dict(val_split=0.1, aug=True),
           "final run: --val-split 0 with the chosen settings"),
    Recipe("vpt", "VPT authors: SGD momentum 0.9, cosine, 100 epochs incl. 10 warm-up, batch 64",
           "Jia et al. 2022, Visual Prompt Tuning, Sec. 4 and supplementary; normalisation: "
           "VPT's released code",
           _VPT_SETTINGS,
           _VPT_GRID + "; images normalised with ImageNet's mean/std as VPT's code does"),
    Recipe("e2vpt", "E2VPT authors: as VPT (SGD, cosine, 100 epochs incl. 10 warm-up, batch 64)",
           "Han et al. 2023, E2VPT, Sec. 4.1 'Training'; normalisation: VPT's code, which "
           "E2VPT's builds on",
           _VPT_SETTINGS,
           _VPT_GRID + "; batch 80 for Swin-B; pruning ratio and rewinding are method config"),
    Recipe("full", "VPT's code for full fine-tuning: AdamW, cosine, 100 epochs incl. 5 warm-up, "
           "batch 64",
           "VPT's released code (its full fine-tuning configs, as issue 27's audit states them)",
           dict(opt="adamw", sched="cosine", epochs=100, warmup_epochs=5, batch_size=64,
                lr=1e-3, lr_base_size=None, weight_decay=1e-4, **_IMAGENET_NORM),
           "the code searches lr in {5e-3, 1e-3, 5e-4, 1e-4} (unscaled; 1e-3 is our default); "
           "the prompt recipe's SGD learning rates (up to 12.5 after scaling) diverge when every "
           "weight trains"),
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
        ['e2vpt', 'fgvc', 'full', 'lion', 'ssf', 'vpt', 'vtab1k']
    """
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The :class:`Recipe` called ``name``; unknown names list the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {list_recipes()}")
    return RECIPES[name]
