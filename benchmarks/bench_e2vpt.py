"""E²VPT pruned vs unpruned: inference time, sequence length, FLOPs and adapter bytes on a ViT.

For each visual prompt length T an E²VPT model (T visual + 5 key-value prompts per block) is
pruned by the library's own pipeline (importance pass over a few synthetic batches, token then
segment pruning at the ``e2vpt_prune`` ratios, rewinding), saved with ``save_pretrained`` and
rebuilt from the adapter directory; the rebuilt (compact) model is what is timed. A pruned token
leaves the sequence, so every block runs on fewer tokens; pruned segments only shrink the file.
Models are timed in alternating rounds so that load from other processes hits every model alike.

Run from the repository root::

    python -m benchmarks.bench_e2vpt            # vit_small_patch16_224, 224², batch 4
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import timm_peft
from timm_peft.io import WEIGHTS_NAME
from timm_peft.methods.e2vpt import compute_importance, prune, rewind

from .common import count_flops, inference, round_robin_medians, write_report


def _prompt_values(model: torch.nn.Module) -> int:
    return sum(v.numel() for k, v in model.state_dict().items()
               if k.startswith("vpt.") or ".kv_prompt." in k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompts", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--kv-prompts", type=int, default=5)
    parser.add_argument("--token-ratio", type=float, default=0.5)
    parser.add_argument("--segment-ratio", type=float, default=0.25)
    parser.add_argument("--score-batches", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    kw = dict(num_classes=100, img_size=args.img_size)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    data = [(torch.randn(args.batch_size, 3, args.img_size, args.img_size),
             torch.randint(0, 100, (args.batch_size,))) for _ in range(args.score_batches)]
    work = Path(tempfile.mkdtemp(prefix="bench_e2vpt_"))
    base = timm.create_model(args.model, **kw).eval()
    weights = work / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    load = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), custom_load=False))
    n = base.patch_embed.num_patches + base.num_prefix_tokens

    models: dict[str, torch.nn.Module] = {"base": base}
    info: dict[str, dict] = {"base": dict(visual_tokens=0, seq_len=n, adapter_bytes=0,
                                          prompt_values=0)}
    for t in args.prompts:
        cfg = dict(num_prompts=t, num_kv_prompts=args.kv_prompts)
        model = timm.create_model(f"{args.model}.e2vpt", peft_cfg=cfg, **load, **kw)
        dense_dir = timm_peft.save_pretrained(model, work / f"dense_{t}")
        scores = compute_importance(model, data, progress=False)
        prune(model, scores, args.token_ratio, args.segment_ratio)
        rewind(model)
        pruned_dir = timm_peft.save_pretrained(model, work / f"pruned_{t}")
        for label, d in ((f"E²VPT T={t}", dense_dir), (f"E²VPT T={t} pruned", pruned_dir)):
            m = timm_peft.from_pretrained(d, **load).eval()
            models[label] = m
            tokens = m.vpt.num_tokens
            info[label] = dict(visual_tokens=tokens, seq_len=n + tokens,
                               adapter_bytes=os.path.getsize(d / WEIGHTS_NAME),
                               prompt_values=_prompt_values(m))

    times = round_robin_medians({k: inference(m, x) for k, m in models.items()}, args.warmup, args.reps)
    flops = {k: count_flops(m, x) for k, m in models.items()}
    rows = []
    for label, m in models.items():
        row = dict(model=label, **info[label], infer_ms=1e3 * times[label],
                   infer_vs_base=times[label] / times["base"], gflops=flops[label] / 1e9,
                   flops_vs_base=flops[label] / flops["base"])
        if label.endswith("pruned"):
            dense = label.removesuffix(" pruned")
            ratio = {k: info[label][k] / info[dense][k] for k in ("adapter_bytes", "prompt_values")}
            row.update(infer_vs_unpruned=times[label] / times[dense],
                       flops_vs_unpruned=flops[label] / flops[dense],
                       bytes_vs_unpruned=ratio["adapter_bytes"],
                       prompt_values_vs_unpruned=ratio["prompt_values"])
        rows.append(row)
    notes = (f"{args.model} at {args.img_size}², batch {args.batch_size}, 100-class head, "
             f"{args.kv_prompts} key-value prompts per block; pruning: token ratio "
             f"{args.token_ratio}, segment ratio {args.segment_ratio} (preset `e2vpt_prune`), "
             f"importance over {args.score_batches} synthetic batches. Pruned models are rebuilt "
             "from their saved adapter (compact). `adapter_bytes`: the safetensors file (prompts "
             "+ head); `prompt_values`: visual + key-value prompt values (key-value prompts are "
             "never pruned). `seq_len`: tokens each block sees (class + visual prompts + patches; "
             "key-value prompts add keys, not queries). Times are medians of round-robin rounds "
             f"({args.reps} reps after {args.warmup} warm-up); compare ratios, not absolute times.")
    cmd = "python -m benchmarks.bench_e2vpt"
    path = write_report("bench_e2vpt", "E²VPT: pruned vs unpruned inference and adapter size",
                        cmd, rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
