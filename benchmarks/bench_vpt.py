"""VPT cost on a ViT: inference time vs the base model and training step vs full fine-tuning.

VPT-Deep with T prompts lengthens every block's sequence from N to N+T tokens, so its FLOPs grow
by about (N+T)/N (a bit more in attention, which is quadratic). The report sets the measured
inference-time ratio next to that ratio and next to FLOPs counted by ``torch.utils.flop_counter``,
and the training-step time (forward, backward, SGD step) next to full fine-tuning's. Models are
timed in alternating rounds so that load from other processes hits every model alike.

Run from the repository root::

    python -m benchmarks.bench_vpt            # vit_small_patch16_224, 224², batch 8
"""
from __future__ import annotations

import argparse
import os

import timm
import torch
import torch.nn.functional as F

import timm_peft

from .common import count_flops, inference, peak_memory, round_robin_medians, write_report


def _build(arch: str, method: str | None, num_prompts: int, img_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=100, img_size=img_size)
    if method is not None:
        cfg = dict(num_prompts=num_prompts) if method.startswith("vpt") else None
        timm_peft.apply_method(model, method, cfg)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 100, (args.batch_size,))

    # inference
    base = _build(args.model, None, 0, args.img_size).eval()
    n = base.patch_embed.num_patches + base.num_prefix_tokens
    models = {"base": base}
    models.update({f"vpt T={t}": _build(args.model, "vpt", t, args.img_size).eval()
                   for t in args.prompts})

    times = round_robin_medians({k: inference(m, x) for k, m in models.items()}, args.warmup, args.reps)
    base_flops = count_flops(base, x)
    rows: list[dict] = []
    for t in [0] + list(args.prompts):
        key = "base" if t == 0 else f"vpt T={t}"
        rows.append(dict(
            measure="inference", model=key, tokens=n + t,
            time_ms=1e3 * times[key],
            time_ratio=times[key] / times["base"],
            flop_ratio_N_plus_T_over_N=(n + t) / n,
            counted_flop_ratio=count_flops(models[key], x) / base_flops,
        ))
    del models

    # training step: forward, backward, SGD step (the authors' optimiser)
    trainers = {"full": _build(args.model, "full", 0, args.img_size).train()}
    trainers.update({f"vpt T={t}": _build(args.model, "vpt", t, args.img_size).train()
                     for t in args.prompts})
    steps = {}
    for key, m in trainers.items():
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

        def step(m: torch.nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
        steps[key] = step
    times = round_robin_medians(steps, max(1, args.warmup - 1), args.reps)
    for key, m in trainers.items():
        rows.append(dict(
            measure="train step", model=key,
            trainable=timm_peft.get_nb_trainable_parameters(m)[0],
            time_ms=1e3 * times[key], time_ratio=times[key] / times["full"],
            peak_extra_MiB=peak_memory(steps[key]) / 2**20,
        ))

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    notes = (f"{args.model} at {args.img_size}², batch {args.batch_size}, {args.reps} alternating "
             f"rounds (median). N = {n} tokens (patches + class token). Inference: "
             "`time_ratio` is VPT-Deep time / base time, next to the FLOP-implied (N+T)/N and the "
             "FLOPs counted by torch's FlopCounterMode. Training: forward + backward + SGD step "
             "(momentum 0.9); `time_ratio` is / full fine-tuning (same model, every parameter "
             "trainable); `peak_extra_MiB` is the step's peak live tensor memory beyond the "
             "weights and inputs (gradients, optimiser state, activations). Load average at the "
             f"end of the run: {load} on {os.cpu_count()} CPUs; a load above the CPU count means "
             "other processes slowed every model alike (absolute times are inflated, ratios less).")
    path = write_report("bench_vpt", "VPT-Deep: inference and training cost on a ViT",
                        "python -m benchmarks.bench_vpt", rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
