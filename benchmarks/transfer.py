"""Transfer benchmark: every method on a small VTAB-style suite of generated tasks, on a CPU.

Protocol (a miniature of VTAB-1k, Zhai et al. 2019, as run by VPT, SSF and E2VPT):

1. For each backbone a model is trained from scratch on the generated ``shapes`` task and saved
   as a local safetensors file, cached on disk and keyed by its recipe: it plays the part of the
   pretrained checkpoint and every method loads it through timm's pretrained path
   (``pretrained_cfg_overlay=dict(file=..., custom_load=False)``). The default ``vit`` is a
   R+ViT-Ti hybrid (convolutional stem, average-pooled tokens) that reaches over 80% on its
   pre-training task; a linear probe on the same architecture with random weights is reported
   too, so the transfer is visible.
2. Every method (and the ablations :data:`ABLATIONS`) is fine-tuned with
   :func:`timm_peft.train.train` on each transfer task (``position``, ``orientation``, ``count``:
   VTAB's "structured" kind; ``texture``: natural-like) from 1000 images split 800 train /
   200 validation, as VTAB-1k tunes. The learning rate is chosen per method and task from a
   small grid (:func:`lr_grid`) by validation accuracy with the first seed; the other seeds run
   at the chosen rate. Each run keeps its best validation epoch; test accuracy is on 500
   separate images.
3. The report gives test accuracy mean ± std over seeds per task, the task average, trainable
   parameters, the chosen learning rates, paired differences for the papers' claims and
   ablations (:data:`CLAIMS`) with a verdict each, and an SVG plot of accuracy against
   trainable parameters.

Run from the repository root (a single command regenerates ``results/transfer.{md,json,svg}``;
about 25 CPU-minutes for its 204 runs, i.e. 13 minutes on 2 cores, plus about 15 CPU-minutes
of pre-training the first time, cached in ``~/.cache/timm_peft/transfer``)::

    python -m benchmarks.transfer
    python -m benchmarks.transfer --full      # + resnet, partial, vpt_shallow, 3 seeds, 10 epochs
    python -m benchmarks.transfer --methods linear,ssf --tasks count --seeds 0   # a quick look
    python -m benchmarks.transfer --merge --methods adapter,lora   # add methods to the report

``--merge`` adds methods to the saved runs of ``results/transfer.json`` instead of running every
method again: the settings must be the saved ones, and one saved run must reproduce exactly
(:func:`_check_reproduces`) before a new run counts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch

import timm_peft
from timm_peft.core import resolve_method
from timm_peft.data import SyntheticTask, build_splits
from timm_peft.train import TrainConfig, train

from .common import RESULTS, environment


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
    # R+ViT-Ti hybrid at 32 px: a ResNet-v2 stem (7x7 conv, stride 4) under 2x2 patches gives
    # 16 tokens to 4 blocks of width 96, average-pooled (no class token). The stem is what lets a
    # ViT this small learn the pre-training task from scratch on a CPU (a plain ViT-Ti/4 with a
    # class token reached 34%, too weak for any method to differ from linear probing).
    Backbone("vit", "vit_tiny_r_s16_p8_224",
             dict(img_size=32, patch_size=2, embed_dim=96, depth=4, num_heads=3,
                  global_pool="avg", class_token=False),
             dict(train_size=20000, epochs=12, lr=2e-3, batch_size=64)),
    Backbone("resnet", "resnet10t", {},
             dict(train_size=4000, epochs=4, lr=2e-3, batch_size=64)),
)}
PRETRAIN_TASK = "shapes"
#: in the order they run; ``position`` (with average pooling, near chance for every method so
#: far) only with ``--full``
TASKS = ("orientation", "count", "texture", "position")
#: the papers' ablations, run by default next to every method under its own name
ABLATIONS = ("lion_no_p1", "lion_no_p2", "lion_no_robust", "e2vpt_prune")
#: methods added by ``--full`` (see :data:`MODES`)
FULL_EXTRA = ("partial", "vpt_shallow")
#: a method whose default config is a paper's named variant runs under that name (VPT's Mlp-3)
PAPER_NAMES = {"mlp": "mlp3"}
#: validation split of the 1000 training images (VTAB-1k: 800 train + 200 val)
VAL_SPLIT = 0.2
#: learning-rate grids (AdamW): methods that update backbone weights need a lower rate than
#: prompts, scales and heads, as in every paper's own grid. With 4 epochs every method chose
#: the top of (1e-3, 3e-3, 1e-2) / (3e-4, 1e-3, 3e-3) on `orientation`: hence one step up.
LR_GRID = (3e-3, 1e-2, 3e-2)
LR_GRID_BACKBONE = (1e-3, 3e-3, 1e-2)
BACKBONE_TUNING = ("full", "partial")


@dataclass(frozen=True)
class Claim:
    """A paper's claim as a comparison of two registry names' task-averaged test accuracy.

    ``kind`` ``">"``: ``a`` beats ``b``; ``">="``: ``a`` is no worse than ``b`` (within
    :data:`MARGIN` points).
    """

    paper: str
    text: str
    a: str
    b: str
    kind: str = ">"


CLAIMS = (
    Claim("VPT (Jia et al. 2022)", "VPT-deep beats linear probing", "vpt", "linear"),
    Claim("VPT (Jia et al. 2022)", "VPT-deep beats full fine-tuning on VTAB-1k", "vpt", "full"),
    Claim("SSF (Lian et al. 2022)", "SSF beats bias tuning (BitFit)", "ssf", "bias"),
    Claim("SSF (Lian et al. 2022)", "SSF beats VPT-deep on VTAB-1k", "ssf", "vpt"),
    Claim("SSF (Lian et al. 2022)", "SSF beats full fine-tuning on VTAB-1k", "ssf", "full"),
    Claim("E2VPT (Han et al. 2023)", "E2VPT beats VPT-deep", "e2vpt", "vpt"),
    Claim("E2VPT (Han et al. 2023)", "E2VPT beats full fine-tuning on VTAB-1k", "e2vpt", "full"),
    Claim("E2VPT (Han et al. 2023)", "pruning and rewinding keep accuracy (Table 4: +0.9)",
          "e2vpt_prune", "e2vpt", ">="),
    Claim("LION (Wang et al. 2024)", "LION beats VPT-deep", "lion", "vpt"),
    Claim("LION (Wang et al. 2024)", "ablation: removing P1 lowers accuracy", "lion",
          "lion_no_p1"),
    Claim("LION (Wang et al. 2024)", "ablation: removing P2 lowers accuracy (much)", "lion",
          "lion_no_p2"),
    Claim("LION (Wang et al. 2024)", "ablation: the robust rule helps (+2 points)", "lion",
          "lion_no_robust"),
    # the baselines of their tables (issue 23); VPT Sec. 4.2: "VPT-Deep outperforms all the
    # other parameter-efficient tuning protocols (Tab. 1(b,c)) across all task groups"
    Claim("VPT (Jia et al. 2022)", "VPT-deep beats Adapter (Table 1)", "vpt", "adapter"),
    Claim("VPT (Jia et al. 2022)", "VPT-deep beats Mlp-3 (Table 1)", "vpt", "mlp3"),
    Claim("VPT (Jia et al. 2022)", "VPT-deep beats Sidetune (Table 1)", "vpt", "sidetune"),
    Claim("SSF (Lian et al. 2022)", "SSF beats Adapter (Tables 3-4)", "ssf", "adapter"),
    Claim("E2VPT (Han et al. 2023)", "E2VPT beats Adapter (Table 1)", "e2vpt", "adapter"),
    Claim("LION (Wang et al. 2024)", "LION beats Adapter (Tables 1-2)", "lion", "adapter"),
)
#: points within which ">=" counts as "no worse"; also the least difference called a win
MARGIN = 1.0


def methods_for(arch: str, names: list[str], model_kwargs: dict[str, Any]) -> list[str]:
    """Registry names that build on ``arch`` (a refusal is a ValueError), one per distinct config."""
    out, seen = [], set()
    for name in names:
        try:
            model = timm.create_model(f"{arch}.{name}", pretrained=False, device="meta",
                                      **model_kwargs)
        except ValueError:
            continue
        key = json.dumps([model.peft_method, model.peft_config.to_dict()], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out

def lr_grid(method: str) -> tuple[float, ...]:
    """The learning rates tried for registry name ``method`` (presets use their method's)."""
    return LR_GRID_BACKBONE if resolve_method(method)[0] in BACKBONE_TUNING else LR_GRID


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "timm_peft" / "transfer"


def pretrained_weights(backbone: Backbone, cache: Path, progress: bool) -> tuple[Path, dict]:
    """The backbone's stand-in pretrained weights (trained on ``shapes`` once, then cached).

    Returns the safetensors file and its record: recipe, held-out accuracy on the pre-training
    task (``test_acc``), wall and CPU seconds of the pre-training.
    """
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
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'full' saves the whole model: the point
        cfg = TrainConfig(model=f"{backbone.arch}.full", model_kwargs=backbone.model_kwargs,
                          pretrained=False, pretrained_cfg=WEIGHTS_CFG, task=PRETRAIN_TASK,
                          test_size=500, warmup_epochs=0.5, weight_decay=0.05, seed=0,
                          workers=0, progress=progress, output=str(Path(tmp) / "run"),
                          **backbone.pretrain)
        result = train(cfg)
        # weights first, record last: a record always describes a complete file
        shutil.copyfile(result.adapter_dir / "adapter_model.safetensors", path)
    info = dict(recipe, test_acc=result.metrics["test_acc"], seconds=time.perf_counter() - t0,
                cpu_seconds=time.process_time() - c0)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return path, info


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------

_SPLITS: dict[tuple, Any] = {}


def _init_worker() -> None:
    # one thread per worker process: small models use two processes better than two threads
    torch.set_num_threads(1)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one method on one task with one seed and learning rate.

    ``job`` carries everything the run needs (it runs in a worker process); each worker renders
    a task's images once and keeps them. Returns validation and test accuracy, parameter count,
    adapter bytes, wall and CPU seconds.
    """
    h = job["hyper"]
    key = (job["task"], h["train_size"], h["test_size"])
    if key not in _SPLITS:
        _SPLITS[key] = build_splits(job["task"], train_size=h["train_size"],
                                    test_size=h["test_size"], val_split=VAL_SPLIT,
                                    image_size=WEIGHTS_CFG["input_size"][-1], seed=0)
    weights = job["weights"]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cfg = TrainConfig(model=f"{job['arch']}.{job['method']}",
                          model_kwargs=job["model_kwargs"], pretrained=weights is not None,
                          pretrained_file=weights, pretrained_cfg=WEIGHTS_CFG,
                          epochs=h["epochs"], warmup_epochs=h["warmup_epochs"],
                          batch_size=h["batch_size"], opt="adamw", lr=job["lr"],
                          weight_decay=h["weight_decay"], seed=job["seed"], workers=0,
                          progress=False, checkpoint=False, output=str(Path(tmp) / "run"))
        t0, c0 = time.perf_counter(), time.process_time()
        result = train(cfg, splits=_SPLITS[key])
    m = result.metrics
    return dict(group=job["group"], backbone=job["backbone"], method=job["label"], task=job["task"],
                seed=job["seed"], lr=job["lr"], stage=job["stage"], val_acc=m["val_acc"],
                val_loss=m["val_loss"], test_acc=m["test_acc"], best_epoch=m["best_epoch"],
                trainable=m["trainable_params"], adapter_bytes=m["adapter_bytes"],
                seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)


def select_lr(runs: list[dict[str, Any]]) -> float:
    """The learning rate of the run with the best validation accuracy (then the lowest
    validation loss): the test split never takes part in the choice.

    Example:
        >>> select_lr([dict(lr=1e-3, val_acc=0.5, val_loss=1.0),
        ...            dict(lr=1e-2, val_acc=0.5, val_loss=0.9)])
        0.01
    """
    return max(runs, key=lambda r: (r["val_acc"], -r["val_loss"]))["lr"]


class _Inline(Executor):
    """Runs each submitted call at once in this process (``--jobs 1``: no worker start-up)."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


def run_plan(groups: list[dict[str, Any]], seeds: list[int], jobs: int, progress: bool = True,
             on_result: Callable[[list[dict], dict[str, float]], None] | None = None,
             ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run every group (one backbone, method and task): its learning-rate grid with the first
    seed, then the other seeds at the rate that won on validation.

    At most ``jobs`` runs are in flight, taken in the order of ``groups`` with a group's seed
    runs first once it has chosen its rate, so whole tasks finish one after another and a run
    cut short still holds complete tasks. ``on_result(runs, chosen)`` is called after each run.
    Returns all runs and the chosen rate of each group, keyed by the group's ``group`` name.
    """
    import heapq
    from tqdm.auto import tqdm
    total = sum(len(g["grid"]) + len(seeds) - 1 for g in groups)
    results: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    grid_runs: dict[str, list[dict]] = defaultdict(list)
    by_key = {g["group"]: (i, g) for i, g in enumerate(groups)}
    # (group index, 0 for seed runs / 1 for grid runs, tie-break) -> job
    ready = [((i, 1, n), dict(g, seed=seeds[0], lr=lr, stage="select"))
             for i, g in enumerate(groups) for n, lr in enumerate(g["grid"])]
    heapq.heapify(ready)
    if jobs > 1:
        pool: Executor = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker)
    else:
        pool = _Inline()
    with pool, tqdm(total=total, desc="transfer runs", unit="run", dynamic_ncols=True,
                    disable=not progress) as bar:
        pending: dict[Future, dict] = {}
        while ready or pending:
            while ready and len(pending) < max(jobs, 1):
                _, job = heapq.heappop(ready)
                pending[pool.submit(run_one, {k: v for k, v in job.items() if k != "grid"})] = job
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                r = fut.result()
                results.append(r)
                bar.update()
                if job["stage"] == "select":
                    key = r["group"]
                    grid_runs[key].append(r)
                    i, g = by_key[key]
                    if len(grid_runs[key]) == len(g["grid"]):
                        chosen[key] = select_lr(grid_runs[key])
                        for n, s in enumerate(seeds[1:]):
                            heapq.heappush(ready, ((i, 0, n), dict(g, seed=s, lr=chosen[key],
                                                                  stage="seed")))
                if on_result is not None:
                    on_result(results, chosen)
    return results, chosen


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def reported_runs(results: list[dict[str, Any]], chosen: dict[str, float]) -> list[dict]:
    """The runs at each group's chosen learning rate (one per seed); the rest only chose it.

    A group still searching its grid (a run cut short) has no chosen rate and no reported run.
    """
    return [r for r in results if r["group"] in chosen and r["lr"] == chosen[r["group"]]]


def complete_tasks(runs: list[dict[str, Any]], groups: list[dict[str, str]],
                   num_seeds: int) -> list[dict[str, Any]]:
    """The runs of the (backbone, task) pairs whose planned ``groups`` all finished every seed:
    a task average over different tasks per method would compare nothing."""
    count: dict[str, int] = defaultdict(int)
    for r in runs:
        count[r["group"]] += 1
    todo = {(g["backbone"], g["task"]) for g in groups if count[g["group"]] < num_seeds}
    return [r for r in runs if (r["backbone"], r["task"]) not in todo]


def summarize(runs: list[dict[str, Any]], chosen: dict[str, float]) -> list[dict[str, Any]]:
    """One row per (backbone, method) from :func:`reported_runs`: per-task and task-average
    test accuracy, mean ± std over seeds (in %), and the chosen learning rate per task."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in runs:
        row = rows.setdefault((r["backbone"], r["method"]), dict(
            backbone=r["backbone"], method=r["method"], sizes=[], per_task={}, per_seed={},
            lrs={}))
        row["sizes"].append((r["trainable"], r["adapter_bytes"]))  # the head differs by task
        row["per_task"].setdefault(r["task"], []).append(100 * r["test_acc"])
        row["per_seed"].setdefault(r["seed"], {})[r["task"]] = 100 * r["test_acc"]
        row["lrs"][r["task"]] = chosen[r["group"]]
    out = []
    for row in rows.values():
        row["trainable"] = round(statistics.fmean(t for t, _ in row["sizes"]))
        row["adapter_bytes"] = round(statistics.fmean(b for _, b in row.pop("sizes")))
        row["tasks"] = {t: _mean_std(v) for t, v in row["per_task"].items()}
        # the task average of each seed, then its spread over seeds
        row["seed_means"] = {s: statistics.fmean(v.values()) for s, v in row["per_seed"].items()}
        row["mean"] = _mean_std(list(row["seed_means"].values()))
        out.append(row)
    return out


def verdict(claim: Claim, a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Paired test of ``claim`` from two rows' per-seed task averages (seed -> accuracy in %).

    The difference ``a - b`` is taken seed by seed (same data, same seed); with ``d`` its mean
    and ``se`` its standard error over seeds, a ``">"`` claim is *confirmed* when
    ``d - 2 se > 0`` and ``d >= MARGIN``, *contradicted* when ``d + 2 se < 0`` and
    ``d <= -MARGIN``; a ``">="`` claim is confirmed when ``d - 2 se > -MARGIN`` and contradicted
    when ``d + 2 se < -MARGIN``. Anything else, and any claim seen with one seed, is *not
    resolved*.

    Example:
        >>> c = Claim("P", "a beats b", "a", "b")
        >>> verdict(c, {0: 60.0, 1: 62.0}, {0: 50.0, 1: 51.0})["verdict"]
        'confirmed'
    """
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    d, sd = _mean_std(diffs)
    se = sd / math.sqrt(len(diffs))
    if len(diffs) < 2:  # one seed has no spread to compare a difference with
        ok = bad = False
    elif claim.kind == ">":
        ok, bad = d - 2 * se > 0 and d >= MARGIN, d + 2 * se < 0 and d <= -MARGIN
    elif claim.kind == ">=":
        ok, bad = d - 2 * se > -MARGIN, d + 2 * se < -MARGIN
    else:
        raise ValueError(f"unknown claim kind {claim.kind!r}; allowed: '>', '>='")
    return dict(diff=d, std=sd, seeds=len(diffs),
                verdict="confirmed" if ok else "contradicted" if bad else "not resolved")
def svg_plot(rows: list[dict[str, Any]], title: str) -> str:
    """Mean test accuracy (± std over seeds) against trainable parameters, log x axis."""
    W, H, L, R, T, B = 760, 460, 70, 190, 40, 55
    if not rows:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="60" '
                f'font-family="sans-serif"><text x="10" y="30">{title}: no complete task '
                'yet</text></svg>\n')
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




def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _at_grid_edge(runs: list[dict[str, Any]], chosen: dict[str, float],
                  backbone: str) -> list[str]:
    """``method/task`` of the groups of ``backbone`` whose chosen rate is an end of their grid."""
    grids: dict[str, set[float]] = defaultdict(set)
    for r in runs:
        if r["stage"] == "select" and r["backbone"] == backbone:
            grids[r["group"]].add(r["lr"])
    return [g.split("/", 1)[1] for g, lr in chosen.items()
            if g in grids and len(grids[g]) > 2 and lr in (min(grids[g]), max(grids[g]))]


def _grids_text(runs: list[dict[str, Any]]) -> str:
    """The learning-rate grids the runs tried, each with the methods that used it."""
    grids: dict[str, set[float]] = defaultdict(set)
    for r in runs:
        if r["stage"] == "select":
            grids[r["method"]].add(r["lr"])
    users: dict[tuple[float, ...], list[str]] = defaultdict(list)
    for m, g in grids.items():
        users[tuple(sorted(g))].append(m)
    return "; ".join(", ".join(_fmt_lr(x) for x in g) + ": " + ", ".join(f"`{m}`" for m in ms)
                     for g, ms in sorted(users.items(), key=lambda kv: -len(kv[1])))


def write_report(data: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    """Write ``transfer.md``, ``transfer.svg`` and ``transfer.json`` to ``out_dir`` from the
    record :func:`main` builds (runs, chosen rates, timings, pre-training records)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    a = argparse.Namespace(**data["args"])
    runs = complete_tasks(reported_runs(data["runs"], data["chosen"]), data["groups"],
                          len(a.seeds))
    rows = summarize(runs, data["chosen"])
    (out_dir / "transfer.svg").write_text(svg_plot(rows, "Transfer: accuracy vs trainable parameters"))
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in rows)]
    t = data["timing"]
    pre = data["pretrain"]
    lines = ["# Transfer benchmark: every method on generated VTAB-style tasks (CPU)", ""]
    if a.note:
        lines += [f"**{a.note}**", ""]
    if not data.get("complete", True):
        lines += [f"**Partial run: it was stopped after {len(data['runs'])} of "
                  f"{data['planned']} runs. Only tasks that every method finished with every "
                  f"seed are reported ({', '.join(tasks) or 'none'} of {', '.join(a.tasks.split(','))}); "
                  "the times below are those of the part that ran.**", ""]
    lines += [
        f"Command: `{data['command']}` (timm_peft at `{data['commit']}`)", "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in data["env"].items()), "",
        f"Time: {t['wall'] / 60:.1f} min wall, "
        + (f"{t['cpu'] / 60:.1f} CPU-minutes in all ({t['runs_cpu'] / 60:.1f} of them inside "
           f"the {len(data['runs'])} fine-tuning runs), " if data.get("complete", True) else
           f"{t['runs_cpu'] / 60:.1f} CPU-minutes inside the {len(data['runs'])} finished "
           "fine-tuning runs (the workers' own total is only known once they exit), ") +
        f"{a.jobs} worker process(es) of one thread; load average {t['load'][0]:.1f} at the "
        f"start, {t['load'][1]:.1f} at the end on {os.cpu_count()} cores (a shared machine "
        "stretches wall time; CPU time is what the run costs). Pre-training "
        + "; ".join(f"`{n}`: {i['seconds'] / 60:.1f} min wall, "
                    + (f"{i['cpu_seconds'] / 60:.1f} CPU-min" if "cpu_seconds" in i else
                       "CPU time not recorded")
                    + (" (cached from an earlier run)" if n in t["cached"] else "")
                    for n, i in pre.items()) + ".", "",
        "## Protocol", "",
        f"Each task has {a.train_size} training images split {1 - VAL_SPLIT:.0%} train / "
        f"{VAL_SPLIT:.0%} validation (as VTAB-1k tunes: 800/200) and {a.test_size} separate "
        f"test images, 32x32, no augmentation. Every run: {a.epochs} epochs of batch "
        f"{a.batch_size}, AdamW, weight decay {a.weight_decay} (none on 1-D tensors and on "
        f"what a method exempts), cosine schedule with {a.warmup_epochs} warm-up epoch(s); "
        "the epoch with the best validation accuracy is kept. The learning rate (head "
        "included) is chosen per method and task by validation accuracy with seed "
        f"{a.seeds[0]} from a grid ({_grids_text(data['runs'])}); seeds "
        f"{', '.join(map(str, a.seeds[1:])) or '(none)'} then run at the chosen rate. Test "
        f"accuracy (%) is the mean ± std over seeds {a.seeds}; `mean` is the task average "
        "(± its std over seeds). The papers train 100 epochs on 224 px ViT-B/16 with a wider "
        "grid: this is the same protocol at a CPU's scale.", "",
        "Tasks: " + "; ".join(f"`{t}` ({SyntheticTask(t, num_samples=1).spec.description}, "
                              f"like VTAB {SyntheticTask(t, num_samples=1).spec.analogue})"
                              for t in tasks) + ".", "",
        "Backbones (stand-ins for pretrained checkpoints, trained from scratch on the generated "
        f"`{PRETRAIN_TASK}` task, cached, and loaded by every method through timm's pretrained "
        "path):", ""]
    for name, info in pre.items():
        lines.append(f"- `{name}`: `{info['arch']}` with `{info['model_kwargs']}`, "
                     f"{info['train_size']} images x {info['epochs']} epochs; upstream accuracy "
                     f"(held-out `{PRETRAIN_TASK}` images) **{100 * info['test_acc']:.1f}%**.")
    lines += ["", "![accuracy vs trainable parameters](transfer.svg)", ""]
    claims_out = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        mine = {r["method"]: r for r in rows if r["backbone"] == backbone}
        lines += [f"## {backbone}", "", "`trainable` and `adapter` (the saved "
                  "`adapter_model.safetensors`) include the head and are averaged over the tasks "
                  "(6 to 9 classes); `lr`: the chosen rate per task, in the order of the columns.",
                  "", "| method | trainable | adapter | " + " | ".join(tasks) + " | mean | lr |",
                  "|---|---:|---:|" + "---:|" * (len(tasks) + 1) + "---|"]
        for r in sorted(mine.values(), key=lambda r: (("reference" in r["method"]),
                                                      r["trainable"])):
            cells = [f"{r['tasks'][t][0]:.1f} ± {r['tasks'][t][1]:.1f}" if t in r["tasks"] else ""
                     for t in tasks]
            lrs = " ".join(_fmt_lr(r["lrs"][t]) for t in tasks if t in r["lrs"])
            lines.append(f"| {r['method']} | {_fmt_params(r['trainable'])} | "
                         f"{r['adapter_bytes'] / 1024:,.0f} KiB | " + " | ".join(cells) +
                         f" | **{r['mean'][0]:.1f} ± {r['mean'][1]:.1f}** | {lrs} |")
        shown = {r["group"]: data["chosen"][r["group"]] for r in runs
                 if r["backbone"] == backbone}
        edge = _at_grid_edge(data["runs"], shown, backbone)
        if edge:
            lines += ["", f"The chosen rate is the grid's largest or smallest in {len(edge)} of "
                      f"{len(shown)} method-task "
                      "pairs (" + ", ".join(f"`{g}`" for g in edge) + "): there the grid may not "
                      "hold the best rate."]
        lines += ["", "`linear (reference: random-init base)` is a linear probe on the same "
                  "architecture with random weights: the gap to `linear` is what the "
                  "pre-training transfers.", ""]
        found = [(c, verdict(c, mine[c.a]["seed_means"], mine[c.b]["seed_means"]))
                 for c in CLAIMS if c.a in mine and c.b in mine]
        if not found:
            continue
        lines += [f"### Paper claims and ablations on `{backbone}`", "",
                  "Paired difference of the task average, `a - b` in points, mean ± std over "
                  f"seeds. Rule: a claim that `a` beats `b` is *confirmed* when the difference "
                  f"exceeds twice its standard error and {MARGIN:g} point, *contradicted* when the "
                  f"same holds the other way; a claim that `a` is no worse than `b` is "
                  f"confirmed when the difference's lower bound (mean - 2 s.e.) is above "
                  f"-{MARGIN:g} point. Anything else is *not resolved* at this scale. With "
                  f"{len(a.seeds)} seeds this is a coarse screen, not a significance test.", "",
                  "| paper | claim | a | b | a - b | verdict |", "|---|---|---|---|---:|---|"]
        for c, v in found:
            lines.append(f"| {c.paper} | {c.text} | `{c.a}` | `{c.b}` | "
                         f"{v['diff']:+.1f} ± {v['std']:.1f} | **{v['verdict']}** |")
            claims_out.append(dict(backbone=backbone, paper=c.paper, claim=c.text, a=c.a, b=c.b,
                                   kind=c.kind, **v))
        lines.append("")
        for word in ("confirmed", "contradicted", "not resolved"):
            these = [c.text + f" ({c.paper.split(' ')[0]})" for c, v in found
                     if v["verdict"] == word]
            lines.append(f"- **{word.capitalize()}** on `{backbone}` "
                         f"({', '.join(t for t in tasks if any(t in r['tasks'] for r in mine.values()))}): "
                         + ("; ".join(these) if these else "none") + ".")
        lines.append("")
    md = out_dir / "transfer.md"
    md.write_text("\n".join(lines))
    (out_dir / "transfer.json").write_text(json.dumps(dict(
        data, claims=claims_out,
        summary=[{k: v for k, v in r.items() if k not in ("per_task", "per_seed")}
                 for r in rows]), indent=2) + "\n")
    return md


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def default_methods() -> list[str]:
    """Every registered method under its own name (or its :data:`PAPER_NAMES` name) except
    :data:`FULL_EXTRA`, then :data:`ABLATIONS`."""
    own = [n for n in timm_peft.list_methods() if resolve_method(n) == (n, {})]
    return [PAPER_NAMES.get(n, n) for n in own if n not in FULL_EXTRA] + list(ABLATIONS)


#: what ``--full`` changes; the defaults fit 20 minutes on 2 idle cores
MODES = dict(
    default=dict(backbones="vit", extra_methods=(), seeds="0,1", epochs=4,
                 tasks=",".join(TASKS[:3])),
    full=dict(backbones="vit,resnet", extra_methods=FULL_EXTRA, seeds="0,1,2", epochs=10,
              tasks=",".join(TASKS)),
)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a report is never left half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _commit() -> str:
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "timm_peft"], cwd=root,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with local changes to timm_peft/" if dirty else "")


#: what must agree between saved runs and the runs merged into them
MERGE_KEYS = ("backbones", "tasks", "seeds", "epochs", "warmup_epochs", "batch_size",
              "weight_decay", "train_size", "test_size")


def _mergeable(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The saved record ``--merge`` adds to, once its settings are checked to be ``args``'."""
    if args.methods in ("default", "all"):
        raise SystemExit("--merge runs only the methods it adds: name them with --methods")
    if not path.is_file():
        raise SystemExit(f"--merge: no saved runs at {path}")
    previous = json.loads(path.read_text())
    if not previous.get("complete", False):
        raise SystemExit(f"--merge: {path} holds a run cut short; finish or redo it first "
                         "(a merge cut short leaves a complete record)")
    old = argparse.Namespace(**previous["args"])
    differ = [k for k in MERGE_KEYS if getattr(old, k) != getattr(args, k)]
    if differ:
        raise SystemExit("--merge: the saved runs used other settings: " + ", ".join(
            f"{k}={getattr(old, k)!r} (now {getattr(args, k)!r})" for k in differ))
    return previous


def _check_reproduces(previous: dict[str, Any], backbone: Backbone, weights: Path,
                      hyper: dict[str, Any]) -> None:
    """Run the cheapest saved run of ``backbone`` again (one thread, as the workers run) and
    refuse the merge unless it gives the saved accuracies exactly: same weights, same code."""
    saved = [r for r in previous["runs"] if r["backbone"] == backbone.name
             and "reference" not in r["method"]]
    r = min(saved, key=lambda r: r["cpu_seconds"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = run_one(dict(group=r["group"], backbone=r["backbone"], arch=backbone.arch,
                             model_kwargs=backbone.model_kwargs, method=r["method"],
                             label=r["method"], weights=str(weights), task=r["task"],
                             hyper=hyper, seed=r["seed"], lr=r["lr"], stage=r["stage"]))
    finally:
        torch.set_num_threads(threads)
    if (again["val_acc"], again["test_acc"]) != (r["val_acc"], r["test_acc"]):
        raise SystemExit(
            f"--merge: the saved run {r['group']} (seed {r['seed']}, lr {r['lr']}) gives "
            f"val/test accuracy {again['val_acc']}/{again['test_acc']} now, "
            f"{r['val_acc']}/{r['test_acc']} when saved: the weights or the code differ, so new "
            "runs would not compare with the saved ones; run without --merge")


def merge_records(previous: dict[str, Any], new: dict[str, Any], num_seeds: int) -> dict[str, Any]:
    """``previous`` (a complete record) with the methods of ``new`` (a ``--merge`` run, maybe
    still going) that finished every task and seed: such a method replaces its old runs, if any.
    The result is always a complete record, so a merge cut short keeps the methods it finished
    and another ``--merge`` adds the rest. Times add up; each part's command and commit are kept
    under ``merges``.

    Example:
        >>> old = dict(groups=[dict(group="b/a/t")], runs=[dict(group="b/a/t", cpu_seconds=1.0)],
        ...            chosen={"b/a/t": 0.1}, planned=1, command="c0", commit="h0",
        ...            complete=True, timing=dict(wall=1.0, cpu=1.0, runs_cpu=1.0, load=[1, 1],
        ...                                       cached=[]))
        >>> new = dict(groups=[dict(group="b/m/t"), dict(group="b/n/t")],
        ...            runs=[dict(group="b/m/t", cpu_seconds=2.0, stage="select", lr=0.1)],
        ...            chosen={"b/m/t": 0.1}, planned=2, command="c1", commit="h1",
        ...            complete=False, env={}, timing=dict(wall=2.0, cpu=2.0, runs_cpu=2.0,
        ...                                                load=[2, 2], cached=[]))
        >>> m = merge_records(old, new, num_seeds=1)  # b/n has not run yet: not merged
        >>> [g["group"] for g in m["groups"]], m["timing"]["wall"], m["planned"], m["complete"]
        (['b/a/t', 'b/m/t'], 3.0, 2, True)
    """
    count: dict[str, int] = defaultdict(int)
    for r in new["runs"]:
        if r.get("stage") != "select" or r["lr"] == new["chosen"].get(r["group"]):
            count[r["group"]] += 1
    method_of = {g["group"]: g["group"].rsplit("/", 1)[0] for g in new["groups"]}
    unfinished = {method_of[g] for g in method_of if g not in new["chosen"] or count[g] < num_seeds}
    done = {g for g in method_of if method_of[g] not in unfinished}
    added = [r for r in new["runs"] if r["group"] in done]
    runs = [r for r in previous["runs"] if r["group"] not in done] + added
    merges = previous.get("merges", [dict(command=previous["command"], commit=previous["commit"],
                                          runs=len(previous["runs"]))])
    t0, t1 = previous["timing"], new["timing"]
    return dict(
        previous, env=new["env"], complete=previous["complete"],
        command=" && ".join([previous["command"], new["command"]]),
        commit=", then ".join(dict.fromkeys([previous["commit"], new["commit"]])),
        merges=[*merges, dict(command=new["command"], commit=new["commit"], runs=len(added),
                              methods=sorted({m.split("/", 1)[1] for m in set(method_of.values())
                                              - unfinished}))],
        groups=[g for g in previous["groups"] if g["group"] not in done]
        + [g for g in new["groups"] if g["group"] in done],
        planned=previous["planned"] - sum(1 for r in previous["runs"] if r["group"] in done)
        + len(added),
        chosen={**{k: v for k, v in previous["chosen"].items() if k not in done},
                **{k: v for k, v in new["chosen"].items() if k in done}},
        runs=runs,
        timing=dict(wall=t0["wall"] + t1["wall"], cpu=t0["cpu"] + t1["cpu"],
                    runs_cpu=sum(r["cpu_seconds"] for r in runs), load=t1["load"],
                    cached=t1["cached"]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the longer run: " + ", ".join(
        f"{k}={v}" for k, v in MODES["full"].items()))
    p.add_argument("--backbones", help=f"comma-separated, from {sorted(BACKBONES)}")
    p.add_argument("--methods", default="default",
                   help="comma-separated registry names; 'default': every method under its own "
                        "name except partial, plus the ablations " + ",".join(ABLATIONS))
    p.add_argument("--tasks", help=f"comma-separated, from {list(TASKS)}")
    p.add_argument("--seeds", help="comma-separated; the first one chooses the learning rate")
    p.add_argument("--epochs", type=int)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--train-size", type=int, default=1000,
                   help="training images per task, before the validation split")
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--cache-dir", default=str(_cache_dir()))
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="worker processes (one thread each) for the fine-tuning runs")
    p.add_argument("--note", default="", help="a line printed at the top of the report")
    p.add_argument("--progress", action="store_true", help="progress bars of pre-training")
    p.add_argument("--replot", action="store_true",
                   help="only rewrite the report and plot from <out-dir>/transfer.json")
    p.add_argument("--merge", action="store_true",
                   help="run only --methods and add their runs to <out-dir>/transfer.json, "
                        "keeping its other runs (the settings and stand-in weights must be the "
                        "saved runs', checked by running one saved run again); a method is "
                        "added once it finished every task and seed, replacing its old runs")
    return p


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.replot:
        md = write_report(json.loads((out_dir / "transfer.json").read_text()), out_dir)
        print(md.read_text())
        return md
    mode = MODES["full" if args.full else "default"]
    args.backbones = args.backbones or mode["backbones"]
    args.seeds = [int(s) for s in (args.seeds or mode["seeds"]).split(",")]
    args.epochs = args.epochs or mode["epochs"]
    names = {"default": default_methods() + list(mode["extra_methods"]),
             "all": timm_peft.list_methods()}.get(args.methods, args.methods.split(","))
    for n in names:
        resolve_method(n)  # unknown names fail now, with the list of names
    args.tasks = args.tasks or mode["tasks"]
    tasks = args.tasks.split(",")
    for t in tasks:
        SyntheticTask(t, num_samples=1)  # unknown tasks fail now, with the list of tasks
    unknown = [b for b in args.backbones.split(",") if b not in BACKBONES]
    if unknown:
        raise SystemExit(f"unknown backbone(s) {unknown}; known: {sorted(BACKBONES)}")
    command = "python -m benchmarks.transfer" + (" --full" if args.full else "") + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("full", "backbones", "seeds", "epochs", "tasks", "progress", "cache_dir", "out_dir",
                     "jobs", "replot", "note") and v != parser.get_default(k))
    for k in ("backbones", "seeds", "epochs", "tasks"):
        v = getattr(args, k)
        v = ",".join(map(str, v)) if isinstance(v, list) else str(v)
        if v != str(mode[k]):
            command += f" --{k} {v}"

    previous = _mergeable(out_dir / "transfer.json", args) if args.merge else None
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    hyper = {k: getattr(args, k) for k in ("epochs", "warmup_epochs", "batch_size",
                                            "weight_decay", "train_size", "test_size")}
    groups, pretrain, cached = [], {}, []
    for bname in args.backbones.split(","):
        backbone = BACKBONES[bname]
        t0 = time.perf_counter()
        weights, info = pretrained_weights(backbone, Path(args.cache_dir), args.progress)
        if time.perf_counter() - t0 < 0.5 * info["seconds"]:
            cached.append(bname)
        pretrain[bname] = info
        if previous is not None and previous["pretrain"][bname]["test_acc"] != info["test_acc"]:
            raise SystemExit(
                f"--merge: the cached stand-in weights of {bname!r} are not those of the saved "
                f"runs (upstream test_acc {info['test_acc']} vs {previous['pretrain'][bname]['test_acc']}):"
                " their runs would not compare; run without --merge")
        if previous is not None:
            _check_reproduces(previous, backbone, weights, hyper)
        jobs = [(m, m, str(weights)) for m in methods_for(backbone.arch, names, backbone.model_kwargs)]
        if previous is None:
            jobs.append(("linear", "linear (reference: random-init base)", None))
        new = [dict(group=f"{bname}/{label}/{t}", backbone=bname, arch=backbone.arch,
                    model_kwargs=backbone.model_kwargs, method=m, label=label, weights=w,
                    task=t, hyper=hyper, grid=lr_grid(m))
               for t in tasks for m, label, w in jobs]
        # task by task, so that a run cut short still holds whole tasks; a merge goes method by
        # method instead, so that one cut short adds whole methods
        groups += sorted(new, key=lambda g: list(dict.fromkeys(x["label"] for x in new)).index(
            g["label"])) if previous is not None else new
    out_dir.mkdir(parents=True, exist_ok=True)
    record = dict(env=environment(), command=command, commit=_commit(), args=vars(args),
                  pretrain=pretrain,
                  groups=[{k: g[k] for k in ("group", "backbone", "task")} for g in groups],
                  planned=sum(len(g["grid"]) + len(args.seeds) - 1
                                                 for g in groups))

    def timing(runs: list[dict]) -> dict[str, Any]:
        usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return dict(wall=time.perf_counter() - start,
                    # worker processes' CPU counts once they have exited: complete at the end
                    cpu=sum(u.ru_utime + u.ru_stime for u in usage),
                    runs_cpu=sum(r["cpu_seconds"] for r in runs),
                    load=[load0, os.getloadavg()[0]], cached=cached)

    def save(runs: list[dict], chosen: dict[str, float], complete: bool = False) -> None:
        # saved after every run: one cut short leaves its finished runs for --replot to draw
        data = dict(record, complete=complete, timing=timing(runs), chosen=chosen, runs=runs)
        if previous is not None:
            data = merge_records(previous, data, len(args.seeds))
        atomic_write_text(out_dir / "transfer.json", json.dumps(data, indent=2) + "\n")

    results, chosen = run_plan(groups, args.seeds, args.jobs, on_result=save)
    order = {g["group"]: i for i, g in enumerate(groups)}
    results.sort(key=lambda r: (order[r["group"]], r["seed"], r["lr"]))
    save(results, chosen, complete=True)
    md = write_report(json.loads((out_dir / "transfer.json").read_text()), out_dir)
    print(md.read_text())
    return md


if __name__ == "__main__":
    main()
