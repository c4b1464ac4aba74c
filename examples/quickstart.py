"""Quick start: fine-tune a PEFT method on a generated task, save the adapter, load it back.

Runs offline on a CPU in about a minute (2 idle cores):

1. No pretrained weights can be downloaded here, so a small ResNet (timm's ``resnet10t`` at
   32 px) is first trained from scratch on the generated ``shapes`` task and saved as a local
   safetensors file: a stand-in for a timm checkpoint (kept for the next run).
2. The PEFT model is built through timm's own pretrained path
   (``timm.create_model("resnet10t.ssf", pretrained=True, pretrained_cfg_overlay=dict(file=...))``):
   frozen base + SSF's scales and shifts + a new head.
3. ``timm_peft.train.train`` fine-tunes it on another task (``orientation``, like VTAB's
   dSprites/orientation) with 1000 training images and saves the adapter with
   ``timm_peft.save_pretrained``.
4. ``timm_peft.from_pretrained`` rebuilds base + adapter from the adapter directory, and the test
   accuracy before and after fine-tuning is printed.

The same fine-tuning from the command line::

    timm-peft train --model resnet10t.ssf --task orientation --epochs 5 --lr 0.01 \\
        --pretrained-file runs/quickstart/backbone/adapter/adapter_model.safetensors \\
        --pretrained-cfg input_size=[3,32,32] crop_pct=1.0 mean=[0.5,0.5,0.5] std=[0.5,0.5,0.5]
"""
from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

import timm_peft
from timm_peft.data import TASKS, SyntheticTask, TransformDataset, list_tasks
from timm_peft.train import TrainConfig, build_transforms, evaluate, train

#: a ResNet-10 with a deep stem: learns from scratch in under a minute on a CPU at 32 px
ARCH = "resnet10t"
#: how the local weights expect their input (timm's pretrained_cfg entries)
WEIGHTS_CFG = dict(input_size=[3, 32, 32], crop_pct=1.0, mean=[0.5] * 3, std=[0.5] * 3)


def pretrain_backbone(root: Path) -> Path:
    """Train the stand-in 'pretrained' backbone on ``shapes`` (skipped when already on disk)."""
    weights = root / "backbone" / "adapter" / "adapter_model.safetensors"
    if weights.is_file():
        print(f"[1/4] using the backbone trained earlier: {weights}")
        return weights
    print(f"[1/4] no download possible: pre-training {ARCH} on the generated 'shapes' task")
    shutil.rmtree(root / "backbone", ignore_errors=True)
    cfg = TrainConfig(model=f"{ARCH}.full", pretrained=False, pretrained_cfg=WEIGHTS_CFG,
                      task="shapes", train_size=3000, test_size=300, epochs=4, warmup_epochs=0.5,
                      batch_size=64, lr=2e-3, weight_decay=0.05, seed=1,
                      output=str(root / "backbone"))
    with warnings.catch_warnings():  # 'full' saves the whole model: here that is the point
        warnings.simplefilter("ignore", UserWarning)
        result = train(cfg)
    print(f"      backbone accuracy on held-out 'shapes' images: {result.metrics['test_acc']:.3f}")
    return weights


def test_loader(model: torch.nn.Module, cfg: TrainConfig) -> DataLoader:
    """The task's test split through the model's own timm eval transform."""
    from timm.data import resolve_data_config
    _, eval_tf = build_transforms(resolve_data_config(model=model), aug=False)
    ds = SyntheticTask(cfg.task, "test", cfg.test_size, image_size=WEIGHTS_CFG["input_size"][-1],
                       seed=cfg.seed)
    return DataLoader(TransformDataset(ds, eval_tf), batch_size=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="ssf" if "ssf" in timm_peft.list_methods() else "bias",
                        choices=timm_peft.list_methods())
    parser.add_argument("--task", default="orientation", choices=list_tasks())
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--output", default="runs/quickstart")
    args = parser.parse_args()
    start = time.perf_counter()
    root = Path(args.output)
    weights = pretrain_backbone(root)

    run_dir = root / f"{args.method}-{args.task}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = TrainConfig(model=f"{ARCH}.{args.method}", pretrained_file=str(weights),
                      pretrained_cfg=WEIGHTS_CFG, task=args.task,
                      train_size=1000, test_size=500, epochs=args.epochs, warmup_epochs=0.5,
                      batch_size=32, lr=1e-2, output=str(run_dir))
    overlay = dict(file=str(weights.resolve()), custom_load=False, **WEIGHTS_CFG)

    print(f"[2/4] {ARCH}.{args.method} from the local weights, through timm's pretrained path")
    torch.manual_seed(cfg.seed)  # the same start as train() below, which seeds the same way
    model = timm.create_model(f"{ARCH}.{args.method}", pretrained=True,
                              num_classes=len(TASKS[args.task].classes),
                              pretrained_cfg_overlay=overlay)
    timm_peft.print_trainable_parameters(model)
    loader = test_loader(model, cfg)
    before = evaluate(model, loader)

    print(f"[3/4] fine-tuning on '{args.task}' (1000 images, {args.epochs} epochs)")
    result = train(cfg)

    print("[4/4] reloading the saved adapter with timm_peft.from_pretrained")
    reloaded = timm_peft.from_pretrained(result.adapter_dir, pretrained_cfg_overlay=overlay)
    after = evaluate(reloaded, loader)
    size = (result.adapter_dir / "adapter_model.safetensors").stat().st_size
    print(f"\ntest accuracy on '{args.task}' ({after['n']} images, "
          f"{len(TASKS[args.task].classes)} classes): before fine-tuning {before['acc']:.3f} "
          f"-> after {after['acc']:.3f}")
    print(f"adapter: {result.adapter_dir}/ ({size / 1024:.1f} KiB; the frozen base is not in it)")
    print("load it with:\n"
          "    import timm_peft\n"
          f"    model = timm_peft.from_pretrained({str(result.adapter_dir)!r},\n"
          f"        pretrained_cfg_overlay={overlay!r})\n"
          f"or: timm-peft eval {result.adapter_dir} --split test")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
