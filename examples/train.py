"""Training a PEFT model from Python: a hand-written timm loop, then the same with ``train()``.

Part 1 is what the README's "# ... train ..." stands for: the model is a plain timm model with a
frozen base, so timm's data pipeline, optimiser factory (it skips frozen parameters) and scheduler
apply unchanged, and the adapter is saved and reloaded with peft's names.

Part 2 runs the library's loop (what ``timm-peft train`` runs) with timm ``train.py`` options:
gradient accumulation, an EMA of the adapter, mixup, label smoothing, channels-last.

Runs offline on a CPU in under half a minute: no pretrained weights can be downloaded here, so the base
is randomly initialised (``--no-pretrained``, chance-level accuracy is expected); give
``--pretrained-file`` a local timm checkpoint, or drop both with internet access::

    python examples/train.py --out runs/example
    python examples/train.py --model vit_base_patch16_224.augreg2_in21k_ft_in1k --pretrained
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

import timm_peft
from timm_peft.data import SyntheticTask
from timm_peft.train import TrainConfig, evaluate, train


def hand_written_loop(args: argparse.Namespace) -> None:
    # 1. any timm model name + a method suffix: frozen base, SSF scales and shifts, a new head
    model = timm.create_model(f"{args.model}.ssf", pretrained=args.pretrained, num_classes=6,
                              **_size_kwargs(args))
    timm_peft.print_trainable_parameters(model)

    # 2. timm's data pipeline, from the model's own pretrained_cfg
    data_cfg = resolve_data_config(dict(input_size=(3, args.img_size, args.img_size)),
                                   model=model)
    train_tf = create_transform(**data_cfg, is_training=True, hflip=0.0)
    eval_tf = create_transform(**data_cfg)
    size = data_cfg["input_size"][-1]
    train_ds = SyntheticTask("texture", "train", 256, image_size=size, transform=train_tf)
    test_ds = SyntheticTask("texture", "test", 128, image_size=size, transform=eval_tf)
    loader = DataLoader(train_ds, batch_size=32, shuffle=True, drop_last=True)

    # 3. timm's optimiser and schedule; only the trainable tensors reach the optimiser
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=1e-4)
    sched, epochs = create_scheduler_v2(opt, sched="cosine", num_epochs=args.epochs,
                                        warmup_epochs=1, step_on_epochs=False,
                                        updates_per_epoch=len(loader))
    loss_fn = torch.nn.CrossEntropyLoss()
    step = 0
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
            sched.step_update(step)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}")

    # 4. save the adapter (a few KB) and rebuild base + adapter from it
    out = Path(args.out) / "loop-adapter"
    timm_peft.save_pretrained(model, out)
    torch.manual_seed(0)  # a random base is rebuilt from its seed; a pretrained one from its weights
    reloaded = timm_peft.from_pretrained(out, pretrained=args.pretrained)
    test = DataLoader(test_ds, batch_size=64)
    print(f"saved {out} ({(out / 'adapter_model.safetensors').stat().st_size:,d} bytes); test "
          f"accuracy {evaluate(model, test)['acc']:.3f}, reloaded {evaluate(reloaded, test)['acc']:.3f}")


def library_loop(args: argparse.Namespace) -> None:
    cfg = TrainConfig(
        model=f"{args.model}.ssf", pretrained=args.pretrained, model_kwargs=_size_kwargs(args),
        input_size=(3, args.img_size, args.img_size),
        task="texture", train_size=256, test_size=128, val_split=0.25,
        epochs=args.epochs, batch_size=16, grad_accum_steps=2,   # global batch 32
        opt="adamw", lr=1e-2, model_ema=True, model_ema_decay=0.9,  # validate/save the EMA
        mixup=0.2, smoothing=0.1, channels_last=True,
        output=str(Path(args.out) / "train-run"), overwrite=True, progress=False)
    result = train(cfg)
    print(f"train(): best epoch {result.metrics['best_epoch']}, test accuracy "
          f"{result.metrics['test_acc']:.3f}; adapter in {result.adapter_dir}")
    torch.manual_seed(cfg.seed)  # train() built the base from this seed
    reloaded = timm_peft.from_pretrained(result.adapter_dir, pretrained=args.pretrained)
    print(f"reloaded: {type(reloaded).__name__}, {reloaded.num_classes} classes, preprocessing "
          f"{reloaded.pretrained_cfg.get('input_size')}")


def _size_kwargs(args: argparse.Namespace) -> dict:
    return dict(img_size=args.img_size) if args.model.startswith("vit") else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet10t", help="timm architecture[.weight tag]")
    parser.add_argument("--pretrained", action="store_true", help="timm's pretrained weights "
                        "(needs internet or a local Hub cache)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=64, help="64 keeps it quick on a CPU; "
                        "use the weights' size (224) with pretrained weights")
    parser.add_argument("--out", default="runs/example")
    args = parser.parse_args()
    torch.manual_seed(0)
    hand_written_loop(args)
    library_loop(args)


if __name__ == "__main__":
    main()
