"""``timm-peft reproduce``: the papers' protocol on VTAB-1k or FGVC, and a table against their numbers.

For one method and one benchmark this runs what the papers ran (VPT, Jia et al. 2022, Sec. 4.1;
SSF, Lian et al. 2022, Sec. 4.1; E2VPT, Han et al. 2023, Sec. 4.1):

1. *tuning*: every point of the method's hyper-parameter grid is trained on the tuning split
   (VTAB-1k: ``train800``, FGVC: VPT's 90 % ``train``) and scored on the validation split
   (``val200``, VPT's 10 % ``val``);
2. *final*: the best point is trained again on all training data (``train800val200``,
   ``train+val``) once per seed, and tested on ``test``;
3. *table*: the mean test accuracy over the seeds per task, beside the paper's published number
   (``paper_results.json``, each number with its table reference), with group means
   (VTAB-1k: natural / specialized / structured) and the differences.

Every run is an ordinary :func:`timm_peft.train.train` run in its own directory under
``--output``; a run whose ``summary.json`` exists is not run again and an interrupted one resumes
from its checkpoint, so the same command continues an interrupted reproduction. Under
``torchrun`` the runs of each phase are spread over the processes (one whole run per GPU), with
a barrier between tuning and final runs; the output directory must be shared by the processes.

Example:
    $ timm-peft reproduce --method ssf --benchmark vtab1k --data-root /data/vtab-1k \\
          --model vit_base_patch16_224.orig_in21k --output runs/reproduce
    $ torchrun --nproc_per_node 8 -m timm_peft reproduce --method vpt --benchmark fgvc ...
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .data import FGVC_DATASETS, VTAB1K_TASKS

__all__ = ["Benchmark", "Protocol", "BENCHMARKS", "PROTOCOLS", "paper_results", "plan", "Plan",
           "Job", "reproduce", "ReproduceResult", "format_table", "estimate"]

logger = logging.getLogger(__name__)
PAPER_RESULTS = Path(__file__).with_name("paper_results.json")


@dataclass(frozen=True)
class Benchmark:
    """A collection of tasks in one data layout, and the splits of its protocol."""

    name: str
    groups: dict[str, str]  # task -> group
    tune_train: str
    tune_val: str
    final_train: str
    test: str
    recipe: str
    #: training images per task in the final runs (SSF Table 8), for --dry-run estimates
    train_images: dict[str, int]

    @property
    def tasks(self) -> list[str]:
        return list(self.groups)


BENCHMARKS: dict[str, Benchmark] = {
    "vtab1k": Benchmark("vtab1k", {t: g for t, (g, _) in VTAB1K_TASKS.items()},
                        "train800", "val200", "train800val200", "test", "vtab1k",
                        {t: 1000 for t in VTAB1K_TASKS}),
    "fgvc": Benchmark("fgvc", {n: "fgvc" for n in FGVC_DATASETS}, "train", "val", "train+val",
                      "test", "fgvc",
                      dict(cub=5994, nabirds=23929, flowers=2040, dogs=12000, cars=8144)),
}

_VPT_GRID = {"lr_base": [50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05],
             "weight_decay": [0.01, 0.001, 0.0001, 0.0]}
_SSF_LR_GRID = {"lr": [5e-2, 2e-2, 1e-2, 5e-3, 2e-3, 1e-3]}


@dataclass(frozen=True)
class Protocol:
    """How a method's authors chose hyper-parameters and how many runs they averaged."""

    method: str
    recipe: str
    grid: dict[str, list[Any]]
    seeds: int
    source: str


PROTOCOLS: dict[str, Protocol] = {p.method: p for p in (
    Protocol("vpt", "vpt", _VPT_GRID, 3,
             "VPT Sec. 4.1 (tune on 800/200, final on 1000, mean of three runs); the lr/wd grid "
             "is from VPT's supplementary (see `timm-peft info --recipe vpt`). VPT also tunes the "
             "prompt length per task: add it with --grid peft_cfg.num_prompts=..."),
    Protocol("e2vpt", "e2vpt", _VPT_GRID, 3,
             "E2VPT Sec. 4.1 and Table 1 ('three runs', VPT's protocol and grid)"),
    Protocol("ssf", "ssf", _SSF_LR_GRID, 3,
             "SSF Sec. 4.1 (AdamW, cosine, 100 epochs with 10 warm-up); its per-task learning "
             "rates span 1e-3 to 5e-2, searched here on the validation split; seeds: VPT's three"),
    Protocol("lion", "lion", {"lr": [1e-5]}, 3,
             "LION 'Implementation Details' (Adam, lr 1e-5, batch 64); no search is described"),
    Protocol("linear", "vpt", _VPT_GRID, 3, "VPT Sec. 4.1: baselines with VPT's protocol"),
    Protocol("bias", "vpt", _VPT_GRID, 3, "VPT Sec. 4.1: baselines with VPT's protocol"),
    Protocol("full", "vpt", _VPT_GRID, 3, "VPT Sec. 4.1: baselines with VPT's protocol"),
    Protocol("partial_1", "vpt", _VPT_GRID, 3, "VPT Sec. 4.1: baselines with VPT's protocol"),
    Protocol("mlp3", "vpt", _VPT_GRID, 3,
             "VPT Sec. 4.1 and Table 1: the Mlp-3 baseline with VPT's protocol and grid"),
    Protocol("sidetune", "vpt", _VPT_GRID, 3,
             "VPT Sec. 4.1 and Table 1: the Sidetune baseline with VPT's protocol and grid (the "
             "side network starts from random weights here, see timm_peft.methods.sidetune)"),
    Protocol("adapter", "vpt", _VPT_GRID, 3,
             "VPT Sec. 4.1 and Table 1: the Adapter baseline with VPT's protocol and grid; VPT "
             "also varies the reduction rate (Fig. 6): add it with "
             "--grid peft_cfg.reduction_factor=8,64,256"),
    Protocol("lora", "ssf", _SSF_LR_GRID, 3,
             "none of the four papers states a LoRA protocol or publishes its VTAB-1k/FGVC "
             "numbers; ours: SSF's AdamW recipe and learning-rate search (r = 8 on qkv, the "
             "setting of the SSF-era tables), VPT's three seeds"),
    Protocol("adaptformer", "ssf", _SSF_LR_GRID, 3,
             "none of the four papers states an AdaptFormer protocol or publishes its "
             "VTAB-1k/FGVC numbers; ours: SSF's AdamW recipe and learning-rate search "
             "(bottleneck 64, scale 0.1 as the AdaptFormer paper), VPT's three seeds"),
)}


def paper_results() -> dict[str, Any]:
    """The papers' published accuracies (``paper_results.json``), with table references.

    Example:
        >>> paper_results()["ssf"]["vtab1k"]["per_task"]["dtd"]
        75.1
    """
    return json.loads(PAPER_RESULTS.read_text())


# ----------------------------------------------------------------------------------------------
# the plan: which runs, in which directories
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One training run of the protocol."""

    task: str
    phase: str  # "tune" or "final"
    name: str   # grid point or seed
    overrides: dict[str, Any]
    output: Path


@dataclass(frozen=True)
class Plan:
    """The runs of a reproduction: tuning runs (one per task and grid point; none for a
    one-point grid) and final runs (one per task and seed, their point chosen later)."""

    tune: list[Job]
    final: list[Job]
    points: list[dict[str, Any]]


def _grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _point_name(point: dict[str, Any]) -> str:
    return "-".join(f"{k.replace('peft_cfg.', '')}={v}" for k, v in point.items()) or "default"


def _apply_point(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    out = dict(base, peft_cfg=dict(base.get("peft_cfg") or {}))
    for key, value in point.items():
        if key.startswith("peft_cfg."):
            out["peft_cfg"][key.split(".", 1)[1]] = value
        else:
            out[key] = value
    return out


def plan(method: str, benchmark: str, output: str | os.PathLike, *,
         tasks: Sequence[str] | None = None, grid: dict[str, list[Any]] | None = None,
         seeds: int | None = None) -> Plan:
    """The tuning and final runs of a reproduction and their directories.

    Example:
        >>> p = plan("ssf", "vtab1k", "out", tasks=["dtd"])
        >>> len(p.tune), len(p.final), p.final[0].output
        (6, 3, PosixPath('out/ssf/vtab1k/dtd/final/seed0'))
    """
    bench, proto = _lookup(method, benchmark)
    tasks = list(tasks) if tasks else bench.tasks
    unknown = [t for t in tasks if t not in bench.groups]
    if unknown:
        raise ValueError(f"unknown {benchmark} task(s) {unknown}; tasks: {bench.tasks}")
    points = _grid_points(grid if grid is not None else proto.grid)
    seeds = proto.seeds if seeds is None else seeds
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    root = Path(output) / method / benchmark
    tune = [] if len(points) == 1 else [
        Job(t, "tune", _point_name(p), p, root / t / "tune" / _point_name(p))
        for t in tasks for p in points]
    final = [Job(t, "final", f"seed{s}", dict(seed=s), root / t / "final" / f"seed{s}")
             for t in tasks for s in range(seeds)]
    return Plan(tune, final, points)


def _lookup(method: str, benchmark: str) -> tuple[Benchmark, Protocol]:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; benchmarks: {sorted(BENCHMARKS)}")
    if method not in PROTOCOLS:
        raise ValueError(f"no reproduction protocol for method {method!r}; methods: "
                         f"{sorted(PROTOCOLS)}")
    return BENCHMARKS[benchmark], PROTOCOLS[method]


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------

def _summary(job_dir: Path) -> dict[str, Any] | None:
    path = job_dir / "summary.json"
    return json.loads(path.read_text())["metrics"] if path.is_file() else None


def _run_job(job: Job, cfg_values: dict[str, Any], run: Callable[..., Any],
             rank: int = 0) -> dict[str, Any]:
    from .train import CHECKPOINT_NAME, TrainConfig
    done = _summary(job.output)
    if done is not None:
        return done
    values = dict(cfg_values, output=str(job.output), progress=False)
    if (job.output / CHECKPOINT_NAME).is_file():
        values["resume"] = str(job.output)
    elif job.output.exists():
        values["overwrite"] = True  # a run that died before its first checkpoint
    logger.info(f"[rank {rank}] {job.phase} {job.task} {job.name} -> {job.output}")
    run(TrainConfig(**values), distributed=False)
    return _summary(job.output) or {}


@dataclass
class ReproduceResult:
    """What a reproduction measured, per task, and where its table went."""

    rows: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    table_md: Path | None
    table_json: Path | None


def reproduce(method: str, benchmark: str, data_root: str | os.PathLike, model: str, *,
              output: str | os.PathLike = "runs/reproduce", tasks: Sequence[str] | None = None,
              grid: dict[str, list[Any]] | None = None, seeds: int | None = None,
              train_args: dict[str, Any] | None = None,
              run: Callable[..., Any] | None = None) -> ReproduceResult:
    """Run the authors' protocol for ``method`` on ``benchmark`` and tabulate ours vs theirs.

    ``model`` is the backbone ``<arch>[.<weight tag>]`` (the method suffix is added);
    ``train_args`` are :class:`~timm_peft.train.TrainConfig` fields that override the recipes
    (e.g. ``pretrained_file``, ``epochs`` for a quick check, ``device``). Under ``torchrun``
    every process calls this; runs are spread over the processes and rank 0 writes the table.

    Example:
        >>> res = reproduce("ssf", "vtab1k", "/data/vtab-1k",
        ...                 "vit_base_patch16_224.orig_in21k")  # doctest: +SKIP
        >>> res.table_md  # doctest: +SKIP
        PosixPath('runs/reproduce/ssf-vtab1k.md')
    """
    from .train import TrainConfig, train
    run = run or train
    bench, proto = _lookup(method, benchmark)
    if not Path(data_root).is_dir():
        raise FileNotFoundError(f"data root {data_root} does not exist")
    jobs = plan(method, benchmark, output, tasks=tasks, grid=grid, seeds=seeds)
    extra = dict(train_args or {})
    for key in ("output", "resume", "overwrite", "dataset", "train_split", "val_split_name"):
        if key in extra:
            raise ValueError(f"train_args may not set {key!r}: reproduce sets it per run")
    rank, world, device, owns = _process_group()
    try:
        if device is not None and "device" not in extra:
            extra["device"] = device
        recipes = [bench.recipe, proto.recipe]
        defaults = TrainConfig.from_recipes(recipes).to_dict()
        if "epochs" in extra and "warmup_epochs" not in extra:  # keep the recipe's warm-up share
            extra["warmup_epochs"] = defaults["warmup_epochs"] * extra["epochs"] / defaults["epochs"]
        base = dict(defaults, **extra, model=f"{model}.{method}", recipes=recipes,
                    val_split=0.0, task=None, data_dir=str(data_root), test_split=bench.test)

        def values(job: Job, point: dict[str, Any]) -> dict[str, Any]:
            tune = job.phase == "tune"
            v = _apply_point(base, point if tune else {**point, **job.overrides})
            v.update(dataset=f"{benchmark}/{job.task}",
                     train_split=bench.tune_train if tune else bench.final_train,
                     val_split_name=bench.tune_val if tune else None)
            return v

        for job in jobs.tune[rank::world]:
            _run_job(job, values(job, job.overrides), run, rank)
        _barrier(world)
        chosen = {t: _choose(jobs, t) for t in dict.fromkeys(j.task for j in jobs.final)}
        for job in jobs.final[rank::world]:
            _run_job(job, values(job, chosen[job.task][0]), run, rank)
        _barrier(world)
        if rank != 0:
            return ReproduceResult([], [], None, None)
        rows, groups = _collect(method, benchmark, jobs, chosen)
        out = Path(output)
        md, js = out / f"{method}-{benchmark}.md", out / f"{method}-{benchmark}.json"
        header = dict(method=method, benchmark=benchmark, model=model, data_root=str(data_root),
                      seeds=len({j.name for j in jobs.final}), grid=jobs.points,
                      protocol=proto.source, train_args=extra)
        js.write_text(json.dumps(dict(header, rows=rows, groups=groups), indent=1) + "\n")
        md.write_text(format_table(header, rows, groups))
        logger.info(f"wrote {md} and {js}")
        return ReproduceResult(rows, groups, md, js)
    finally:
        if owns:
            torch.distributed.destroy_process_group()


def _choose(jobs: Plan, task: str) -> tuple[dict[str, Any], float | None]:
    """The grid point with the best validation accuracy (the first on ties)."""
    tune = [j for j in jobs.tune if j.task == task]
    if not tune:
        return jobs.points[0], None
    scored = []
    for j in tune:
        m = _summary(j.output)
        if m is None or m.get("val_acc") is None:
            raise RuntimeError(f"tuning run {j.output} has no result; run the command again")
        scored.append((m["val_acc"], j))
    best_acc = max(a for a, _ in scored)
    best = next(j for a, j in scored if a == best_acc)
    return best.overrides, best_acc


def _collect(method: str, benchmark: str, jobs: Plan,
             chosen: dict[str, tuple[dict[str, Any], float | None]]
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    bench = BENCHMARKS[benchmark]
    paper = paper_results().get(method, {}).get(benchmark, {})
    per_task = paper.get("per_task", {})
    rows = []
    for task, (point, val_acc) in chosen.items():
        accs = [_summary(j.output)["test_acc"] * 100 for j in jobs.final if j.task == task]
        ours = sum(accs) / len(accs)
        theirs = per_task.get(task)
        rows.append(dict(task=task, group=bench.groups[task], ours=round(ours, 2),
                         seeds=[round(a, 2) for a in accs], paper=theirs,
                         diff=None if theirs is None else round(ours - theirs, 2),
                         chosen=point, val_acc=None if val_acc is None else round(val_acc * 100, 2)))
    groups = []
    paper_means = paper.get("group_means", {})
    names = list(dict.fromkeys(bench.groups.values()))
    for group in names + ["all tasks"]:
        members = [t for t, g in bench.groups.items() if g == group or group == "all tasks"]
        ran = [r for r in rows if r["task"] in members]
        if not ran or (group == "all tasks" and len(names) == 1):
            continue
        ours = sum(r["ours"] for r in ran) / len(ran)
        theirs = paper_means.get(group)
        if theirs is None and per_task and all(t in per_task for t in members):
            theirs = sum(per_task[t] for t in members) / len(members)
        complete = len(ran) == len(members)
        groups.append(dict(group=group, tasks=f"{len(ran)}/{len(members)}", ours=round(ours, 2),
                           paper=None if theirs is None else round(theirs, 2),
                           diff=None if theirs is None or not complete else round(ours - theirs, 2)))
    return rows, groups


def format_table(header: dict[str, Any], rows: list[dict[str, Any]],
                 groups: list[dict[str, Any]]) -> str:
    """The Markdown report: per-task and group accuracies, ours beside the paper's."""
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    sign = lambda v: "—" if v is None else f"{v:+.2f}"  # noqa: E731
    paper = paper_results().get(header["method"], {}).get(header["benchmark"], {})
    lines = [f"# {header['method']} on {header['benchmark']}: ours vs the paper", "",
             f"Backbone `{header['model']}`, data `{header['data_root']}`, mean test accuracy (%) "
             f"over {header['seeds']} seed(s); hyper-parameters chosen on the validation split "
             f"from {len(header['grid'])} grid point(s). Protocol: {header['protocol']}", "",
             "| task | group | ours | paper | diff | chosen | val acc |",
             "|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['group']} | {fmt(r['ours'])} | {fmt(r['paper'])} | "
                     f"{sign(r['diff'])} | {_point_name(r['chosen'])} | {fmt(r['val_acc'])} |")
    lines += ["", "| group | tasks | ours | paper | diff |", "|---|---:|---:|---:|---:|"]
    for g in groups:
        lines.append(f"| {g['group']} | {g['tasks']} | {fmt(g['ours'])} | {fmt(g['paper'])} | "
                     f"{sign(g['diff'])} |")
    sources = [paper[k] for k in ("per_task_source", "group_means_source", "model") if k in paper]
    lines += ["", "Paper numbers: " + ("; ".join(sources) if sources else
                                       "none published for this method and benchmark") + "."]
    if header.get("train_args"):
        lines.append(f"Overrides of the recipes: `{header['train_args']}`.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# torchrun: one whole run per process
# ----------------------------------------------------------------------------------------------

def _process_group() -> tuple[int, int, str | None, bool]:
    """``(rank, world size, this process's device, whether we started the group)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None, False
    import torch.distributed as dist
    owns = not dist.is_initialized()
    if owns:  # gloo: the group only carries barriers; each run trains on its own device
        dist.init_process_group(backend="gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if torch.cuda.is_available() else None
    return dist.get_rank(), dist.get_world_size(), device, owns


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def estimate(method: str, benchmark: str, *, tasks: Sequence[str] | None = None,
             grid: dict[str, list[Any]] | None = None, seeds: int | None = None,
             epochs: int | None = None) -> dict[str, Any]:
    """Runs and training images of a reproduction, for planning GPU time (``--dry-run``).

    Example:
        >>> estimate("ssf", "vtab1k")["runs"]
        171
    """
    from .train import TrainConfig
    bench, proto = _lookup(method, benchmark)
    jobs = plan(method, benchmark, "x", tasks=tasks, grid=grid, seeds=seeds)
    epochs = epochs or TrainConfig.from_recipes([bench.recipe, proto.recipe]).epochs
    tune_frac = 0.8 if benchmark == "vtab1k" else 0.9
    images = sum(bench.train_images[j.task] * tune_frac for j in jobs.tune) + sum(
        bench.train_images[j.task] for j in jobs.final)
    return dict(runs=len(jobs.tune) + len(jobs.final), tune_runs=len(jobs.tune),
                final_runs=len(jobs.final), epochs=epochs,
                training_images=int(images * epochs))

