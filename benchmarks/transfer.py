"""Transfer benchmark: every method on a small VTAB-style suite of generated tasks, on a CPU.

Protocol (a miniature of VTAB-1k, Zhai et al. 2019, as run by VPT, SSF and E2VPT):

1. For each backbone (a small ViT and a small ResNet at 32x32), a model is trained from scratch
   on the generated ``shapes`` task and saved as a local safetensors file (cached on disk, keyed
   by its settings): it plays the part of the pretrained checkpoint. Linear probes on the same
   architecture with random weights are reported too, so the transfer is visible.
2. Every method in the registry that supports the backbone's family is then built through timm's
   pretrained path on that file and fine-tuned with :func:`timm_peft.train.train` on each
   transfer task (``position``, ``orientation``, ``count``: VTAB's "structured" kind;
   ``texture``: natural-like) from 1000 training images, all with the same budget (epochs,
   batch, optimiser, learning rate), the final-run protocol (no validation split, the last
   epoch counts) and no augmentation. Test accuracy is on 500 separate images.
3. The report gives mean ± std over seeds per task, the mean over tasks, trainable parameters,
   and an SVG plot of accuracy against trainable parameters.

One learning rate for every method is a deliberate simplification (the papers tune it per task
and method); the numbers compare methods at an equal, tiny budget, not at their best.

Run from the repository root (about 12 minutes on 2 idle CPU cores with the defaults, 9 once the
pretrained backbones are cached in ``~/.cache/timm_peft/transfer``)::

    python -m benchmarks.transfer
    python -m benchmarks.transfer --backbones vit --seeds 0 --epochs 2   # a quicker look
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import timm_peft
from timm_peft.core import resolve_method
from timm_peft.data import SyntheticTask, build_splits
from timm_peft.train import TrainConfig, train

from .common import RESULTS, environment
from .efficiency import methods_for


@dataclass(frozen=True)
class Backbone:
    """A small timm model and how its stand-in pretrained weights are made."""

    name: str
    arch: str
    model_kwargs: dict[str, Any]
    pretrain: dict[str, Any] = field(default_factory=dict)


#: how the stand-in weights expect their input, recorded as timm pretrained_cfg entries
WEIGHTS_CFG = dict(input_size=[3, 32, 32], crop_pct=1.0, mean=[0.5] * 3, std=[0.5] * 3)

BACKBONES = {b.name: b for b in (
    # ViT-Ti/4 at 32 px, narrowed to width 96 and 4 blocks: 65 tokens
    Backbone("vit", "vit_tiny_patch16_224",
             dict(img_size=32, patch_size=4, depth=4, embed_dim=96),
             dict(train_size=4000, epochs=8, lr=1e-3, batch_size=64)),
    Backbone("resnet", "resnet10t", {},
             dict(train_size=4000, epochs=4, lr=2e-3, batch_size=64)),
)}
PRETRAIN_TASK = "shapes"
TASKS = ("position", "orientation", "count", "texture")


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "timm_peft" / "transfer"


def pretrained_weights(backbone: Backbone, cache: Path, progress: bool) -> tuple[Path, dict]:
    """The backbone's stand-in pretrained weights (trained on ``shapes`` once, then cached)."""
    recipe = dict(arch=backbone.arch, model_kwargs=backbone.model_kwargs, task=PRETRAIN_TASK,
                  weights_cfg=WEIGHTS_CFG, **backbone.pretrain)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"{backbone.name}-{PRETRAIN_TASK}-{key}.safetensors"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        return path, json.loads(info_path.read_text())
    print(f"pre-training {backbone.name} ({backbone.arch}) on '{PRETRAIN_TASK}' "
          f"({backbone.pretrain['train_size']} images, {backbone.pretrain['epochs']} epochs)",
          flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'full' saves the whole model: the point
        cfg = TrainConfig(model=f"{backbone.arch}.full", model_kwargs=backbone.model_kwargs,
                          pretrained=False, pretrained_cfg=WEIGHTS_CFG, task=PRETRAIN_TASK,
                          test_size=500, warmup_epochs=0.5, weight_decay=0.05, seed=0,
                          workers=0, progress=progress, output=str(Path(tmp) / "run"),
                          **backbone.pretrain)
        result = train(cfg)
        shutil.copyfile(result.adapter_dir / "adapter_model.safetensors", path)
    info = dict(recipe, test_acc=result.metrics["test_acc"], seconds=time.perf_counter() - t0)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return path, info


_SPLITS: dict[str, Any] = {}


def _init_worker() -> None:
    # one thread per worker process: small models use two processes better than two threads
    torch.set_num_threads(1)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one method on one task with one seed; test accuracy and parameter count.

    Runs in a worker process; each worker renders a task's images once and keeps them.
    """
    backbone, a = BACKBONES[job["backbone"]], job["args"]
    task = job["task"]
    if task not in _SPLITS:
        _SPLITS[task] = build_splits(task, train_size=1000, test_size=500, image_size=32, seed=0)
    weights = job["weights"]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cfg = TrainConfig(model=f"{backbone.arch}.{job['method']}",
                          model_kwargs=backbone.model_kwargs, pretrained=weights is not None,
                          pretrained_file=weights, pretrained_cfg=WEIGHTS_CFG,
                          epochs=a["epochs"], warmup_epochs=a["warmup_epochs"],
                          batch_size=a["batch_size"], opt="adamw", lr=a["lr"],
                          weight_decay=a["weight_decay"], seed=job["seed"], workers=0,
                          progress=False, checkpoint=False, output=str(Path(tmp) / "run"))
        t0, c0 = time.perf_counter(), time.process_time()
        result = train(cfg, splits=_SPLITS[task])
    label = job["method"] if weights is not None else "linear (reference: random-init base)"
    return dict(backbone=job["backbone"], method=label, task=task, seed=job["seed"],
                test_acc=result.metrics["test_acc"], trainable=result.metrics["trainable_params"],
                adapter_bytes=result.metrics["adapter_bytes"], seconds=time.perf_counter() - t0,
                cpu_seconds=time.process_time() - c0)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (backbone, method): per-task and overall mean ± std over seeds (in %)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        row = rows.setdefault((r["backbone"], r["method"]), dict(
            backbone=r["backbone"], method=r["method"], sizes=[], per_task={}, per_seed={}))
        row["sizes"].append((r["trainable"], r["adapter_bytes"]))  # the head differs by task
        row["per_task"].setdefault(r["task"], []).append(100 * r["test_acc"])
        row["per_seed"].setdefault(r["seed"], []).append(100 * r["test_acc"])
    out = []
    for row in rows.values():
        row["trainable"] = round(statistics.fmean(t for t, _ in row["sizes"]))
        row["adapter_bytes"] = round(statistics.fmean(b for _, b in row.pop("sizes")))
        row["tasks"] = {t: _mean_std(v) for t, v in row["per_task"].items()}
        # the spread of the task average over seeds
        row["mean"] = _mean_std([statistics.fmean(v) for v in row["per_seed"].values()])
        out.append(row)
    return out


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def svg_plot(rows: list[dict[str, Any]], title: str) -> str:
    """Mean test accuracy (± std over seeds) against trainable parameters, log x axis."""
    W, H, L, R, T, B = 760, 460, 70, 190, 40, 55
    xs = [math.log10(max(r["trainable"], 1)) for r in rows]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    x1 = max(x1, x0 + 1)
    lo = min(r["mean"][0] - r["mean"][1] for r in rows)
    hi = max(r["mean"][0] + r["mean"][1] for r in rows)
    y0, y1 = max(0.0, 10 * math.floor(lo / 10)), min(100.0, 10 * math.ceil(hi / 10))
    y1 = max(y1, y0 + 10)

    def px(x: float) -> float:
        return L + (x - x0) / (x1 - x0) * (W - L - R)

    def py(y: float) -> float:
        return T + (y1 - y) / (y1 - y0) * (H - T - B)

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for e in range(x0, x1 + 1):
        out.append(f'<line x1="{px(e):.1f}" y1="{T}" x2="{px(e):.1f}" y2="{H - B}" stroke="#ddd"/>')
        out.append(f'<text x="{px(e):.1f}" y="{H - B + 16}" text-anchor="middle">10'
                   f'<tspan dy="-5" font-size="8">{e}</tspan></text>')
    for y in range(int(y0), int(y1) + 1, 10):
        out.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" '
               'stroke="black"/>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 15}" text-anchor="middle">trainable '
               'parameters (log scale, head included)</text>')
    out.append(f'<text transform="translate(18,{(T + H - B) / 2}) rotate(-90)" '
               'text-anchor="middle">mean test accuracy over tasks (%)</text>')
    # boxes of the points and of the labels placed so far, which a new label must not cover
    placed = [(px(math.log10(max(r["trainable"], 1))) - 5, py(r["mean"][0]) - 5,
               px(math.log10(max(r["trainable"], 1))) + 5, py(r["mean"][0]) + 5) for r in rows]
    for r in sorted(rows, key=lambda r: (r["trainable"], r["mean"][0])):
        c = colors[backbones.index(r["backbone"]) % len(colors)]
        x, (m, s) = px(math.log10(max(r["trainable"], 1))), r["mean"]
        out.append(f'<line x1="{x:.1f}" y1="{py(m - s):.1f}" x2="{x:.1f}" y2="{py(m + s):.1f}" '
                   f'stroke="{c}"/>')
        hollow = "reference" in r["method"]
        out.append(f'<circle cx="{x:.1f}" cy="{py(m):.1f}" r="4" fill="{"white" if hollow else c}" '
                   f'stroke="{c}"/>')
        label = "linear, random-init base" if hollow else r["method"]
        w = 6.2 * len(label)
        for dx, dy in ((6, -5), (6, 13), (-6 - w, -5), (-6 - w, 13), (6, -17), (6, 25),
                       (-w / 2, -9), (-w / 2, 19), (6, 37), (-6 - w, 25)):
            box = (x + dx, py(m) + dy - 10, x + dx + w, py(m) + dy + 2)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in placed):
                break
        placed.append(box)
        out.append(f'<text x="{box[0]:.1f}" y="{box[3] - 2:.1f}" fill="{c}">{label}</text>')
    for i, b in enumerate(backbones):
        y = T + 15 + 18 * i
        out.append(f'<circle cx="{W - R + 20}" cy="{y}" r="4" fill="{colors[i % len(colors)]}"/>')
        out.append(f'<text x="{W - R + 30}" y="{y + 4}">{b}</text>')
    out.append(f'<text x="{W - R + 14}" y="{T + 15 + 18 * len(backbones)}" font-size="9">hollow: '
               'random-init base</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_report(results: list[dict[str, Any]], pretrain: dict[str, dict], args: argparse.Namespace,
                 command: str, seconds: float) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = summarize(results)
    (RESULTS / "transfer.svg").write_text(svg_plot(rows, "Transfer: accuracy vs trainable parameters"))
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in rows)]
    env = environment()
    lines = [
        "# Transfer benchmark: every method on generated VTAB-style tasks (CPU)", "",
        f"Command: `{command}`", "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
        f"Wall time {seconds / 60:.1f} min with {args.jobs} worker process(es) of one thread "
        f"each (the fine-tuning runs took {sum(r['cpu_seconds'] for r in results) / 60:.1f} "
        f"CPU-minutes in all; pre-training, when not cached: "
        f"{sum(i['seconds'] for i in pretrain.values()) / 60:.1f} min). "
        "Test accuracy (%) on 500 images per task, mean ± "
        f"std over seeds {args.seeds}; `mean` is the task average (± its std over seeds). "
        f"Each run: 1000 training images (VTAB-1k size, final-run protocol: no validation "
        f"split, last epoch), {args.epochs} epochs of batch {args.batch_size}, AdamW lr "
        f"{args.lr} (head too), weight decay {args.weight_decay} (none on 1-D tensors and on what "
        f"a method exempts), cosine schedule with {args.warmup_epochs} warm-up epoch(s), no "
        "augmentation, 32x32 images. One learning rate for all methods: the papers tune it per "
        "task and method, so these are equal-budget numbers, not each method's best.", "",
        "Tasks: " + "; ".join(f"`{t}` ({SyntheticTask(t, num_samples=1).spec.description}, like "
                              f"VTAB {SyntheticTask(t, num_samples=1).spec.analogue})"
                              for t in tasks) + ".", "",
        "Backbones (stand-ins for pretrained checkpoints, trained from scratch on the generated "
        f"`{PRETRAIN_TASK}` task and loaded through timm's pretrained path):", ""]
    for name, info in pretrain.items():
        lines.append(f"- `{name}`: `{info['arch']}` with `{info['model_kwargs']}`, "
                     f"{info['train_size']} images x {info['epochs']} epochs; accuracy on "
                     f"held-out `{PRETRAIN_TASK}` images {100 * info['test_acc']:.1f}%.")
    lines += ["", "![accuracy vs trainable parameters](transfer.svg)", ""]
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        lines += [f"## {backbone}", "", "`trainable` and `adapter` (the saved "
                  "`adapter_model.safetensors`) include the head and are averaged over the tasks "
                  "(6 to 9 classes).", "",
                  "| method | trainable | adapter | " + " | ".join(tasks) + " | mean |",
                  "|---|---:|---:|" + "---:|" * (len(tasks) + 1)]
        for r in sorted((r for r in rows if r["backbone"] == backbone),
                        key=lambda r: (("reference" in r["method"]), r["trainable"])):
            cells = [f"{r['tasks'][t][0]:.1f} ± {r['tasks'][t][1]:.1f}" if t in r["tasks"] else ""
                     for t in tasks]
            lines.append(f"| {r['method']} | {_fmt_params(r['trainable'])} | "
                         f"{r['adapter_bytes'] / 1024:,.0f} KiB | " + " | ".join(cells) +
                         f" | **{r['mean'][0]:.1f} ± {r['mean'][1]:.1f}** |")
        lines.append("")
    lines += ["`linear (reference: random-init base)` is a linear probe on the same architecture "
              "with random weights: the gap to `linear` is what the pre-training transfers.", ""]
    md = RESULTS / "transfer.md"
    md.write_text("\n".join(lines))
    (RESULTS / "transfer.json").write_text(json.dumps(
        dict(env=env, command=command, args=vars(args), seconds=seconds, pretrain=pretrain,
             runs=results,
             summary=[{k: v for k, v in r.items() if k not in ("per_task", "per_seed")}
                      for r in rows]), indent=2) + "\n")
    return md


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def default_methods() -> list[str]:
    """Every registered method under its own name (presets are opt-in with ``--methods``)."""
    return [n for n in timm_peft.list_methods() if resolve_method(n) == (n, {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--methods", default="default",
                        help="comma-separated registry names; 'default': every method (no "
                             "presets); 'all': methods and presets")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warmup-epochs", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--cache-dir", default=str(_cache_dir()))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes (one thread each) for the fine-tuning runs")
    parser.add_argument("--progress", action="store_true", help="progress bars of pre-training")
    parser.add_argument("--replot", action="store_true",
                        help="only rewrite the report and plot from results/transfer.json")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((RESULTS / "transfer.json").read_text())
        md = write_report(saved["runs"], saved["pretrain"], argparse.Namespace(**saved["args"]),
                          saved["command"], saved["seconds"])
        print(md.read_text())
        return
    names = {"default": default_methods(), "all": timm_peft.list_methods()}.get(
        args.methods, args.methods.split(","))
    for n in names:
        resolve_method(n)
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = args.tasks.split(",")
    for t in tasks:
        SyntheticTask(t, num_samples=1)  # unknown tasks fail now, with the list of tasks
    args.seeds = seeds
    start = time.perf_counter()
    from tqdm.auto import tqdm

    plan, pretrain = [], {}
    hyper = {k: getattr(args, k) for k in ("epochs", "warmup_epochs", "batch_size", "lr",
                                            "weight_decay")}
    for bname in args.backbones.split(","):
        if bname not in BACKBONES:
            raise SystemExit(f"unknown backbone {bname!r}; known: {sorted(BACKBONES)}")
        backbone = BACKBONES[bname]
        weights, info = pretrained_weights(backbone, Path(args.cache_dir), args.progress)
        pretrain[bname] = info
        jobs = [(m, str(weights)) for m in methods_for(backbone.arch, names)] + [("linear", None)]
        plan += [dict(backbone=bname, method=m, weights=w, task=t, seed=s, args=hyper)
                 for m, w in jobs for t in tasks for s in seeds]
    results = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker) as pool:
        futures = [pool.submit(run_one, job) for job in plan]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="transfer runs",
                        unit="run", dynamic_ncols=True):
            results.append(fut.result())
    order = {(j["backbone"], j["method"], j["task"], j["seed"]): i for i, j in enumerate(plan)}
    results.sort(key=lambda r: order.get((r["backbone"], r["method"].split(" ")[0], r["task"],
                                          r["seed"]), 0))
    command = "python -m benchmarks.transfer" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("seeds", "progress", "cache_dir", "jobs", "replot")
        and v != parser.get_default(k))
    if seeds != [int(s) for s in parser.get_default("seeds").split(",")]:
        command += f" --seeds {','.join(map(str, seeds))}"
    md = write_report(results, pretrain, args, command, time.perf_counter() - start)
    print(md.read_text())


if __name__ == "__main__":
    main()
