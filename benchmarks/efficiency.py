"""Efficiency of every registered method: parameters, adapter bytes, step time, inference, memory.

For each arch, every method and preset in the registry whose families include the arch's (presets
identical to another entry are measured once) is built on the same base and measured in one run:

* trainable parameters and the bytes of the saved adapter (``save_pretrained``);
* one training step (forward, backward and the step of the optimiser the training loop builds,
  so a method's optimiser hook such as LION's robust update is included);
* inference (eval mode, no grad), and after ``merge_and_unload`` for methods that merge;
* peak extra memory of a training step and of inference (live tensor storage created during
  the call, :class:`benchmarks.common.PeakMemory`).

Times are medians over rounds that call every model once each (round-robin, so load from other
processes hits all alike), after warm-up; ratios are medians of the per-round ratios, to the plain
timm model (inference) and to full fine-tuning (training). Absolute times depend on the machine.

Run from the repository root::

    python -m benchmarks.efficiency                      # vit_small + resnet50 at 224, batch 4
    python -m benchmarks.efficiency --archs convnext_tiny --batch-size 4
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config

import timm_peft
from timm_peft.core import get_method, get_model_family, resolve_method
from timm_peft.io import WEIGHTS_NAME
from timm_peft.train import TrainConfig, create_optimizer

from .common import median_ratio, peak_memory, round_robin, write_report

NUM_CLASSES = 100


def methods_for(arch: str, names: list[str]) -> list[str]:
    """Registry names applicable to ``arch``'s family, one per distinct (method, config)."""
    family = get_model_family(timm.create_model(arch, pretrained=False, device="meta"))
    out, seen = [], set()
    for name in names:
        impl = get_method(name)
        if impl.families is not None and family not in impl.families:
            continue
        method, overrides = resolve_method(name)
        key = json.dumps([method, impl.config_cls(**overrides).to_dict()], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out


def _build(arch: str, method: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    if method is None:
        return timm.create_model(arch, num_classes=NUM_CLASSES)
    return timm.create_model(f"{arch}.{method}", num_classes=NUM_CLASSES)


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = create_optimizer(model, TrainConfig(opt="adamw", lr=1e-4))

    def step() -> None:
        model.train()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _infer(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(x)
    return run


def _adapter_bytes(model: torch.nn.Module) -> int:
    import warnings
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'full' warns that it saves everything
        return (timm_peft.save_pretrained(model, d) / WEIGHTS_NAME).stat().st_size


def measure_arch(arch: str, names: list[str], batch_size: int, warmup: int,
                 reps: int) -> list[dict[str, Any]]:
    """One row per method (and one for the plain model) on ``arch``."""
    plain = _build(arch, None)
    input_size = resolve_data_config(model=plain)["input_size"]
    x = torch.randn(batch_size, *input_size)
    y = torch.randint(0, NUM_CLASSES, (batch_size,))
    models = {name: _build(arch, name) for name in methods_for(arch, names)}
    if "full" not in models:
        models["full"] = _build(arch, "full")

    train_fns = {k: _train_step(m, x, y) for k, m in models.items()}
    infer_fns = {"plain": _infer(plain, x), **{k: _infer(m, x) for k, m in models.items()}}
    merged = {}
    for k, m in models.items():
        try:
            merged[k] = timm_peft.merge_and_unload(copy.deepcopy(m))
        except NotImplementedError:
            continue
    infer_fns.update({f"{k} (merged)": _infer(m, x) for k, m in merged.items()})
    print(f"{arch}: timing {len(train_fns)} training steps and {len(infer_fns)} inferences "
          f"(batch {batch_size}, {tuple(input_size)}, {reps} rounds)", flush=True)
    t_train = round_robin(train_fns, warmup, reps)
    t_infer = round_robin(infer_fns, warmup, reps)
    mem_train = {k: peak_memory(fn) for k, fn in train_fns.items()}
    mem_infer = {k: peak_memory(fn) for k, fn in infer_fns.items() if "(merged)" not in k}

    total = sum(p.numel() for p in plain.parameters())
    full_bytes = _adapter_bytes(models["full"])
    rows = [dict(arch=arch, method="plain timm model", trainable=total, **{
        "trainable_%": 100.0, "adapter_KiB": "-", "adapter_vs_full": "-", "train_ms": "-",
        "train_vs_full": "-", "train_MiB": "-", "train_mem_vs_full": "-",
        "infer_ms": 1e3 * statistics.median(t_infer["plain"]),
        "infer_vs_plain": 1.0, "merged_infer_vs_plain": "-",
        "infer_MiB": mem_infer["plain"] / 2 ** 20, "infer_mem_vs_plain": 1.0})]
    for k, m in models.items():
        trainable, _ = timm_peft.get_nb_trainable_parameters(m)
        row = dict(arch=arch, method=k, trainable=trainable, **{
            "trainable_%": 100 * trainable / total,
            "adapter_KiB": _adapter_bytes(m) / 1024,
            "adapter_vs_full": _adapter_bytes(m) / full_bytes,
            "train_ms": 1e3 * statistics.median(t_train[k]),
            "train_vs_full": median_ratio(t_train, k, "full"),
            "train_MiB": mem_train[k] / 2 ** 20,
            "train_mem_vs_full": mem_train[k] / mem_train["full"],
            "infer_ms": 1e3 * statistics.median(t_infer[k]),
            "infer_vs_plain": median_ratio(t_infer, k, "plain"),
            "merged_infer_vs_plain": (median_ratio(t_infer, f"{k} (merged)", "plain")
                                      if f"{k} (merged)" in t_infer else "-"),
            "infer_MiB": mem_infer[k] / 2 ** 20,
            "infer_mem_vs_plain": mem_infer[k] / mem_infer["plain"]})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vit_small_patch16_224,resnet50",
                        help="comma-separated timm archs (each at its default input size)")
    parser.add_argument("--methods", default="all",
                        help="comma-separated registry names; 'all': every method and preset")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--name", default="efficiency", help="report name under results/")
    args = parser.parse_args()
    names = timm_peft.list_methods() if args.methods == "all" else args.methods.split(",")
    for name in names:
        resolve_method(name)  # unknown names fail before any measuring
    start = time.perf_counter()
    rows = []
    for arch in args.archs.split(","):
        rows += measure_arch(arch, names, args.batch_size, args.warmup, args.reps)
    command = "python -m benchmarks.efficiency" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v != parser.get_default(k))
    notes = (f"{NUM_CLASSES}-class head, batch {args.batch_size}, random inputs at each arch's "
             f"default input size; {args.reps} rounds that call every model once, after "
             f"{args.warmup} warm-up call(s): times are medians, ratios the median of the ratios "
             "within a round (robust to load from other processes). `train_*`: forward + backward "
             "+ AdamW step of the optimiser the training loop builds (with the method's "
             "optimiser hook), ratio to full fine-tuning. "
             "`infer_*`: eval-mode forward without grad, ratio to the plain timm model; "
             "`merged_infer_vs_plain` after `merge_and_unload` ('-': the method does not merge). "
             "`*_MiB`: peak live tensor memory created during the call (activations, gradients, "
             "temporaries; the weights and the optimiser state exist before and are not counted). "
             "`adapter_KiB`: size of `adapter_model.safetensors` (for `full`: the whole model), "
             "`adapter_vs_full` its ratio to full fine-tuning's. The plain model's training step "
             "is full fine-tuning and full fine-tuning's inference is the plain model's, so each "
             "measure has one reference that stands for both. "
             "On a shared machine single ratios are noisy: methods whose inference is the plain "
             "model's forward (`linear`, `bias`, `partial`, `full`, and any merged model) show "
             "the noise level of the run. "
             f"Presets equal to another entry are measured once. Total time "
             f"{time.perf_counter() - start:.0f} s.")
    path = write_report(args.name, "Efficiency of every registered method", command, rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
