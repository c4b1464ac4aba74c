"""SSF cost on a ViT: merged inference vs the base model, training step vs full FT and linear probe.

SSF adds one per-channel ``γ ⊙ x + β`` after every site while training; ``merge_and_unload``
folds them into the weights, so the merged model *is* the base architecture and should run at
the base model's speed (target ratio 1.00). Training freezes the backbone, so backward computes
activation gradients but no weight gradients, and the optimiser steps only over γ, β and the
head (target: at most 0.75 of a full fine-tuning step).

Models are timed in alternating rounds (one call of each per round, in rotating order) and every
ratio is the median over rounds of the ratio *within* a round, so that load from other processes
hits the compared models alike. Peak memory is the live tensor memory a call allocates beyond the weights and inputs
(:func:`benchmarks.common.peak_memory`).

Run from the repository root::

    python -m benchmarks.bench_ssf            # vit_small_patch16_224, 224², batch 8, AdamW
"""
from __future__ import annotations

import argparse
import copy
import statistics
from typing import Iterable

import timm
import torch
import torch.nn.functional as F

import timm_peft

from .common import inference, median_ratio, peak_memory, round_robin, write_report

NUM_CLASSES = 100


def _mib(tensors: Iterable[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _weights_mib(model: torch.nn.Module) -> float:
    return _mib(list(model.parameters()) + list(model.buffers()))


def _build(arch: str, method: str | None, img_size: int) -> torch.nn.Module:
    torch.manual_seed(0)  # the same random "pretrained" base for every model
    name = arch if method is None else f"{arch}.{method}"
    return timm.create_model(name, num_classes=NUM_CLASSES, img_size=img_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,))
    rows: list[dict] = []

    # ---- inference: base, SSF as trained (hooks), SSF merged into a plain timm model ----
    base = _build(args.model, None, args.img_size).eval()
    ssf = _build(args.model, "ssf", args.img_size).eval()  # γ ~ N(1, 0.02), β ~ N(0, 0.02)
    merged = timm_peft.merge_and_unload(copy.deepcopy(ssf))
    with torch.inference_mode():
        err = (merged(x) - ssf(x)).abs().max().item()
    models = {"base (plain timm)": base, "SSF, unmerged": ssf, "SSF, merged": merged}

    times = round_robin({k: inference(m, x) for k, m in models.items()}, args.warmup, args.rounds)
    for key, m in models.items():
        peak = peak_memory(inference(m, x)) / 2**20
        rows.append(dict(
            measure="inference", model=key,
            params=sum(p.numel() for p in m.parameters()),
            time_ms=1e3 * statistics.median(times[key]),
            ratio_vs_base=median_ratio(times, key, "base (plain timm)"),
            peak_extra_MiB=peak,
            total_MiB=_weights_mib(m) + peak,
        ))
    del models, base, ssf, merged

    # ---- training step: forward, backward, AdamW step (the SSF authors' optimiser) ----
    trainers = {key: _build(args.model, method, args.img_size).train()
                for key, method in (("full fine-tuning", "full"), ("linear probe", "linear"),
                                    ("bias tuning", "bias"), ("SSF", "ssf"))}
    steps, opts = {}, {}
    for key, m in trainers.items():
        opt = opts[key] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])

        def step(m: torch.nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
        steps[key] = step
    times = round_robin(steps, max(1, args.warmup - 1), args.rounds)
    for key, m in trainers.items():
        peak = peak_memory(steps[key]) / 2**20
        state = _mib(t for s in opts[key].state.values() for t in s.values()
                     if isinstance(t, torch.Tensor))
        rows.append(dict(
            measure="train step", model=key,
            params=timm_peft.get_nb_trainable_parameters(m)[0],
            time_ms=1e3 * statistics.median(times[key]),
            ratio_vs_full=median_ratio(times, key, "full fine-tuning"),
            ratio_vs_linear=median_ratio(times, key, "linear probe"),
            peak_extra_MiB=peak,
            optimizer_state_MiB=state,
            total_MiB=_weights_mib(m) + state + peak,
        ))

    notes = (
        f"{args.model} (random init) at {args.img_size}², {NUM_CLASSES} classes, batch "
        f"{args.batch_size}, {args.rounds} alternating rounds (rotating order), "
        f"{torch.get_num_threads()} threads. "
        "`time_ms` is the median time of a call; each ratio is the median over rounds of the "
        "ratio within a round. Inference runs under `torch.inference_mode`; `params` counts "
        "every parameter; 'SSF, merged' is `timm_peft.merge_and_unload` of the SSF model, the "
        "very architecture of the base (so its ratio shows the timing noise; max |merged − "
        f"unmerged| logit difference: {err:.1e}). Training: forward + backward + AdamW step; "
        "`params` counts the trainable ones. `peak_extra_MiB` is a call's peak live tensor "
        "memory beyond the weights and inputs (for a train step: activations kept for backward "
        "and gradients), `optimizer_state_MiB` is AdamW's state kept between steps, and "
        "`total_MiB` = weights + optimizer state + peak extra. 'bias tuning' back-propagates "
        "through the same frozen backbone with no operation added, so its ratio is the floor "
        "for SSF here: the difference between the two is the cost of SSF's γ ⊙ x + β passes "
        "(memory-bound on a CPU).")
    path = write_report("bench_ssf", "SSF: merged inference and training cost on a ViT",
                        "python -m benchmarks.bench_ssf", rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
