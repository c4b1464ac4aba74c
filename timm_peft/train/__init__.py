"""Fine-tuning: timm data pipeline, optimiser and schedule, DDP, checkpoints and adapters.

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

The package keeps timm's seams apart: :mod:`.config` (:class:`TrainConfig`, the recipes),
:mod:`.factory` (model, data, optimiser, schedule), :mod:`.loop` (:func:`train`),
:mod:`.checkpoint` (the run directory and resume), :mod:`.distributed` and :mod:`.evaluation`.

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

from .checkpoint import (CHECKPOINT_NAME, LOG_NAME, LOG_TXT_NAME, SUMMARY_CSV_NAME,
                         TRAINING_ARGS_NAME)
from .config import RECIPES, Recipe, TrainConfig, get_recipe, list_recipes
from .evaluation import evaluate, evaluate_adapter
from .factory import (build_model, build_transforms, create_optimizer, create_scheduler,
                      pretrained_overlay)
from .loop import AdapterEma, StageContext, TrainingInterrupted, TrainResult, train

__all__ = ["TrainConfig", "Recipe", "RECIPES", "list_recipes", "get_recipe", "train",
           "TrainResult", "TrainingInterrupted", "StageContext", "create_optimizer",
           "create_scheduler", "build_model", "build_transforms", "evaluate", "evaluate_adapter",
           "pretrained_overlay", "TRAINING_ARGS_NAME", "AdapterEma", "CHECKPOINT_NAME",
           "LOG_NAME", "LOG_TXT_NAME", "SUMMARY_CSV_NAME"]
