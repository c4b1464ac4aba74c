"""``timm-peft reproduce``: the papers' protocol on VTAB-1k or FGVC, and a table against their numbers.

For one method and one benchmark this runs what the method's authors ran (VPT, Jia et al. 2022;
E2VPT, Han et al. 2023; SSF, Lian et al. 2022; LION, Wang et al. 2024; where their text is
silent, their released code as issue 27's audit states it, and where neither says, ours, marked
as such). :func:`protocol_table` lists, per method and item, what runs and whose choice it is.

1. *tuning*: the method's search stages (e.g. learning rate × weight decay, then the prompt
   lengths, then E2VPT's pruning ratios), each stage's points trained on the tuning split
   (VTAB-1k: ``train800``, FGVC: VPT's 90 % ``train``) and scored on the validation split
   (``val200``, VPT's 10 % ``val``), the winner of a stage fixed for the next ones; a point whose
   loss turns non-finite is recorded as diverged and the search goes on without it;
2. *final*: the chosen point is trained again on the final split (VTAB-1k ``train800val200``,
   FGVC ``train``) once per seed and tested on ``test``; a protocol's extra rows (E2VPT without
   pruning) get their own final runs;
3. *table*: the mean test accuracy over the seeds per task, beside the paper's published number
   (``paper_results.json``, each number with its table reference), with group means
   (VTAB-1k: natural / specialized / structured) and the differences.

Every run is an ordinary :func:`timm_peft.train.train` run in its own directory under
``--output``; a run whose ``summary.json`` (or ``diverged.json``) exists is not run again and an
interrupted one resumes from its checkpoint, so the same command continues an interrupted
reproduction. Under ``torchrun`` the runs of each stage are spread over the processes (one whole
run per GPU), with a barrier between stages; the output directory must be shared by the processes.

Example:
    $ timm-peft reproduce --method ssf --benchmark vtab1k --data-root /data/vtab-1k \\
          --output runs/reproduce
    $ torchrun --nproc_per_node 8 -m timm_peft reproduce --method vpt --benchmark fgvc ...
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .data import FGVC_DATASETS, VTAB1K_TASKS

__all__ = ["Benchmark", "Protocol", "BENCHMARKS", "PROTOCOLS", "ITEMS", "paper_results", "plan",
           "Plan", "Job", "reproduce", "ReproduceResult", "format_table", "estimate",
           "protocol_items", "protocol_table", "gpu_table", "job_config", "DIVERGED_NAME"]

logger = logging.getLogger(__name__)
PAPER_RESULTS = Path(__file__).with_name("paper_results.json")
#: what a tuning or final run whose training loss turned non-finite leaves in its directory
DIVERGED_NAME = "diverged.json"


@dataclass(frozen=True)
class Benchmark:
    """A collection of tasks in one data layout, and the splits of its protocol."""

    name: str
    groups: dict[str, str]  # task -> group
    tune_train: str
    tune_val: str
    test: str
    recipe: str
    #: images per task and split (SSF Table 8), for the --dry-run estimate
    images: dict[str, dict[str, int]]

    @property
    def tasks(self) -> list[str]:
        return list(self.groups)


_VTAB_TEST = dict(  # ssf-neurips2022.txt Table 8, column Test
    cifar=10_000, caltech101=6_084, dtd=1_880, oxford_flowers102=6_149, oxford_iiit_pet=3_669,
    svhn=26_032, sun397=21_750, patch_camelyon=32_768, eurosat=5_400, resisc45=6_300,
    diabetic_retinopathy=42_670, clevr_count=15_000, clevr_dist=15_000, dmlab=22_735, kitti=711,
    dsprites_loc=73_728, dsprites_ori=73_728, smallnorb_azi=12_150, smallnorb_ele=12_150)
_FGVC_SIZES = dict(  # ssf-neurips2022.txt Table 8: VPT's train / val split, official test
    cub=(5_394, 600, 5_794), nabirds=(21_536, 2_393, 24_633), flowers=(1_020, 1_020, 6_149),
    dogs=(10_800, 1_200, 8_580), cars=(7_329, 815, 8_041))

BENCHMARKS: dict[str, Benchmark] = {
    "vtab1k": Benchmark("vtab1k", {t: g for t, (g, _) in VTAB1K_TASKS.items()},
                        "train800", "val200", "test", "vtab1k",
                        {t: dict(train800=800, val200=200, train800val200=1000, test=_VTAB_TEST[t])
                         for t in VTAB1K_TASKS}),
    "fgvc": Benchmark("fgvc", {n: "fgvc" for n in FGVC_DATASETS}, "train", "val", "test", "fgvc",
                      {n: {"train": a, "val": b, "train+val": a + b, "test": c}
                       for n, (a, b, c) in _FGVC_SIZES.items()}),
}

#: the items every protocol states, each with the paper line or code it follows
ITEMS = ("backbone", "preprocessing", "optimiser", "lr / wd grid", "prompt-length grid",
         "other search", "epochs", "warm-up", "batch", "selection", "final training split",
         "seeds")

_VPT_LR = [50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05]
_VPT_WD = [0.01, 0.001, 0.0001, 0.0]
_VPT_GRID = {"lr_base": _VPT_LR, "weight_decay": _VPT_WD}
_SSF_LR = [5e-2, 2e-2, 1e-2, 5e-3, 2e-3, 1e-3]
_RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
_IN21K = "vit_base_patch16_224.orig_in21k"
_AUGREG = "vit_base_patch16_224.augreg_in21k"
_AUDIT = "issue 27's audit of the released code"

# citations shared by several protocols
_S_STAGES = ("; the stages are searched one after the other, each with the earlier winners "
             "fixed (ours: the papers do not say how they combined the searches)")
_S_VPT_BACKBONE = ("VPT Sec. 4.1 'Pre-trained Backbones' and Table 1 (ViT-B/16, supervised "
                   "ImageNet-21k): the original Google checkpoint")
_S_VPT_PRE = (f"VTAB-1k: SSF Sec. 4.1 'Implementation Details' ('directly resize the image to "
              f"224x224'), VPT's code squashes too ({_AUDIT}); FGVC: VPT's code, resize 256 + "
              f"random crop 224 + flip ({_AUDIT}), evaluated as its resize 256 + center crop 224 "
              f"(VPT's src/data/transforms.py); mean/std: ImageNet's, as VPT's code ({_AUDIT})")
#: VPT's code's FGVC crops: both sides to 256, then a random (train) or center (eval) 224 crop
_VPT_FGVC = {"fgvc": dict(train_crop_mode="squash", crop_mode="squash", crop_pct=224 / 256)}
_S_VPT_SCHED = "VPT Sec. 4.1 and supplementary, via its recipe (`timm-peft info --recipe vpt`)"
_S_VPT_SELECT = (f"VPT's code: the last epoch's validation accuracy, ties to the smaller "
                 f"learning rate ({_AUDIT})")
_S_VPT_SPLIT = ("VTAB-1k: VPT Sec. 4.1 ('run the final evaluation using the full training "
                f"data'); FGVC: VPT's code trains on train only ({_AUDIT}; neither VPT nor "
                "E2VPT states train+val)")
_S_VPT_SEEDS = "VPT Sec. 4.1 ('average accuracy score on test set within three runs')"
_S_NONE = "—"


@dataclass(frozen=True)
class Protocol:
    """How a method's authors trained, chose hyper-parameters and averaged, item by item.

    ``stages`` are searched one after the other (each stage's winner is fixed for the next);
    ``settings`` are, per benchmark, :class:`~timm_peft.train.TrainConfig` fields on top of
    the recipes (VPT's code's FGVC crops);
    ``sources`` names, per item of :data:`ITEMS`, the paper line or code each choice follows.

    Example:
        >>> PROTOCOLS["e2vpt"].stages[1]["peft_cfg.num_kv_prompts"]
        [1, 5, 10, 50]
    """

    method: str
    recipe: str
    stages: tuple[dict[str, list[Any]], ...]
    seeds: int
    backbone: str
    sources: dict[str, str]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: final training split per benchmark
    final_split: dict[str, str] = field(default_factory=lambda: dict(
        vtab1k="train800val200", fgvc="train"))
    #: "last": the last epoch's validation accuracy (VPT's code); "best": the best epoch's
    select: str = "last"
    #: extra final rows: name -> how many leading stages choose its point (E2VPT unpruned)
    variants: dict[str, int] = field(default_factory=dict)
    #: a search key whose non-zero value makes a run train twice (E2VPT's rewinding stage)
    second_pass_key: str | None = None
    #: (train step vs the frozen-backbone limit, inference vs plain, efficiency_cuda row); None:
    #: not measured, 1.0 assumed
    step_ratios: tuple[float, float, str] | None = None


#: ratios of benchmarks/results/efficiency_cuda.json (H200, vit_small_patch16_224, batch 64,
#: bf16): the frozen-backbone limit's training step and the plain model's inference, per image
#: (EVAL_COST: an evaluated image costs this many limit-training images)
EVAL_COST = 7.133855819702148 / 23.900320053100586


def _vpt_baseline(method: str, extra_stage: dict[str, list[Any]] | None = None,
                  other: str = _S_NONE, ratios: tuple[float, float, str] | None = None
                  ) -> Protocol:
    return Protocol(
        method, "vpt", (_VPT_GRID,) + ((extra_stage,) if extra_stage else ()), 3, _IN21K, dict(
            backbone=_S_VPT_BACKBONE, preprocessing=_S_VPT_PRE, optimiser=_S_VPT_SCHED,
            **{"lr / wd grid": "VPT Sec. 4.1: the baselines get VPT's protocol and grid "
               "(supplementary, as E2VPT Sec. 4.1 'Training' quotes it)",
               "prompt-length grid": _S_NONE, "other search": other,
               "selection": _S_VPT_SELECT, "final training split": _S_VPT_SPLIT},
            epochs=_S_VPT_SCHED, **{"warm-up": _S_VPT_SCHED}, batch=_S_VPT_SCHED,
            seeds=_S_VPT_SEEDS), settings=_VPT_FGVC, step_ratios=ratios)


PROTOCOLS: dict[str, Protocol] = {p.method: p for p in (
    Protocol("vpt", "vpt", (
        {"lr_base": [1000.0, 500.0, 250.0, 100.0] + _VPT_LR, "weight_decay": _VPT_WD},
        {"peft_cfg.num_prompts": [1, 5, 10, 50, 100, 200]}), 3, _IN21K, dict(
        backbone=_S_VPT_BACKBONE, preprocessing=_S_VPT_PRE, optimiser=_S_VPT_SCHED,
        **{"lr / wd grid": "VPT supplementary grid (quoted by E2VPT Sec. 4.1 'Training'), with "
           f"VPT's code's extra large learning rates {{100, 250, 500, 1000}} ({_AUDIT}; E2VPT "
           "Sec. 4.1 notes VPT's 'specific-designed large learning rate')",
           "prompt-length grid": "VPT Sec. 4.3 'Prompt Length' and Fig. 6-7 (the length is "
           "tuned per task on val); the lengths: Fig. 6's axis, 1 to 200 as SSF Sec. 1 quotes "
           "('200 prompts on Clevr/count vs. 1 prompt on Flowers102')" + _S_STAGES,
           "other search": _S_NONE, "selection": _S_VPT_SELECT,
           "final training split": _S_VPT_SPLIT},
        epochs=_S_VPT_SCHED, **{"warm-up": _S_VPT_SCHED}, batch=_S_VPT_SCHED,
        seeds=_S_VPT_SEEDS), settings=_VPT_FGVC,
        step_ratios=(1.2121659144335717, 1.0146017345533807, "vpt")),
    Protocol("e2vpt", "e2vpt", (
        _VPT_GRID,
        {"peft_cfg.num_prompts": [5, 10, 20, 30, 50], "peft_cfg.num_kv_prompts": [1, 5, 10, 50]},
        {"peft_cfg.token_prune_ratio": _RATIOS},
        {"peft_cfg.segment_prune_ratio": _RATIOS}), 3, _IN21K, dict(
        backbone="E2VPT Sec. 4.1 (ViT-B/16 pre-trained on ImageNet-21k, following VPT [34]): "
                 "VPT's checkpoint",
        preprocessing=_S_VPT_PRE.replace("VPT's code", "VPT's code (which E2VPT's builds on)", 1),
        optimiser="E2VPT Sec. 4.1 'Training' (VPT's optimiser and schedule, [34])",
        **{"lr / wd grid": "E2VPT Sec. 4.1 'Training' ([50, ..., 0.05] x [0.01, ..., 0.0])",
           "prompt-length grid": "E2VPT Sec. 4.3 'Prompt Length' (visual [5, 10, 20, 30, 50], "
           "key-value [1, 5, 10, 50]: 'the only hyper-parameter needed to tune')" + _S_STAGES,
           "other search": "E2VPT Sec. 4.1 'Training' (pruning percentages 10 % to 90 % in 10 % "
           "steps, 8 segments per token, one rewinding stage) and Sec. 3.3; token then segment "
           "ratio (ours); the rewinding trains as many epochs as the first pass (ours: not "
           "stated); the unpruned winner of the first two stages is an extra row",
           "selection": _S_VPT_SELECT + "; E2VPT Sec. 4.1 follows VPT [34]",
           "final training split": _S_VPT_SPLIT},
        epochs="E2VPT Sec. 4.1 'Training' (100 epochs)",
        **{"warm-up": "E2VPT Sec. 4.1 'Training' (10 warm-up epochs)"},
        batch="E2VPT Sec. 4.1 'Training' (64 for ViT-B/16, as [34])",
        seeds="E2VPT Sec. 4.2 ('for three runs in Table 1')"),
        settings=_VPT_FGVC, variants={"unpruned": 2},
        second_pass_key="peft_cfg.token_prune_ratio",
        step_ratios=(1.4685966605081047, 1.4842326817666407, "e2vpt")),
    Protocol("ssf", "ssf", (
        {"lr": _SSF_LR + [5e-4, 2.5e-4, 2e-4], "weight_decay": [5e-2, 5e-5]},
        {"drop_path": [0.0, 0.1, 0.2], "model_ema": [False, True]}), 3, _AUGREG, dict(
        backbone=f"SSF's code loads timm's AugReg in21k ViT-B/16 ({_AUDIT}); SSF Sec. 4.1 "
                 "'Models' says only 'ViT-B/16 pre-trained on ImageNet-21K'",
        preprocessing="SSF Sec. 4.1 'Implementation Details' (FGVC: random resize crop to 224 "
                      "+ random horizontal flip; VTAB-1k: 'directly resize the image to "
                      "224x224'); mean/std: the checkpoint's (not stated)",
        optimiser="SSF Sec. 4.1 'Implementation Details' (AdamW, cosine decay)",
        **{"lr / wd grid": "SSF's text gives no grid; its released scripts use per-task lr from "
           f"2e-4 (NABirds) and 2.5e-4 (Dogs) up to 5e-2 and weight decay 5e-5 or 5e-2 "
           f"({_AUDIT}): the grid contains them (ours)",
           "prompt-length grid": _S_NONE,
           "other search": f"SSF's released scripts: drop-path 0.1/0.2 on 12 tasks, model EMA on "
           f"FGVC ({_AUDIT}): searched (ours, the scripts' per-task values are not in the "
           f"audit)" + _S_STAGES,
           "selection": "not stated; ours: the best epoch's validation accuracy, ties to the "
           "smaller learning rate",
           "final training split": "VTAB-1k: VPT's protocol, which SSF follows (Sec. 4.1, "
           "Table 8); FGVC: not stated, VPT's code's (train only)"},
        epochs="SSF Sec. 4.1 states 100 epochs for CIFAR-100 only; ours: the same",
        **{"warm-up": "SSF Sec. 4.1 states 10 warm-up epochs for CIFAR-100 only; ours: the same"},
        batch="not stated; ours: 64",
        seeds="not stated; ours: VPT's three"), select="best"),
    Protocol("lion", "lion", ({"lr": [1e-5]},), 3, _IN21K, dict(
        backbone="LION 'Implementation Details' says only 'pre-trained on ImageNet'; ours: VPT's "
                 "checkpoint",
        preprocessing="not stated; ours: the benchmark's (VTAB-1k squash, FGVC random resized "
                      "crop + flip), the checkpoint's mean/std",
        optimiser="LION 'Implementation Details' (Adam, momentum 0.9); schedule not stated, "
                  "ours: cosine",
        **{"lr / wd grid": "LION 'Implementation Details' (learning rate 1e-5, no search "
           "described); weight decay not stated, ours: 0",
           "prompt-length grid": _S_NONE, "other search": _S_NONE,
           "selection": "no search",
           "final training split": "LION runs neither benchmark (its own splits); ours: VPT's"},
        epochs="not stated; ours: 100", **{"warm-up": "not stated; ours: 10"},
        batch="LION 'Implementation Details' (batch size 64)", seeds="not stated; ours: 3"),
        select="best", step_ratios=(2.1261841528324323, 1.9495337569729612, "lion")),
    Protocol("full", "full", ({"lr": [5e-3, 1e-3, 5e-4, 1e-4], "weight_decay": _VPT_WD},), 3,
             _IN21K, dict(
        backbone=_S_VPT_BACKBONE, preprocessing=_S_VPT_PRE,
        optimiser=f"VPT's code for full fine-tuning (AdamW, cosine; {_AUDIT})",
        **{"lr / wd grid": f"VPT's code: lr {{1e-3, 5e-4, 1e-4, 5e-3}} ({_AUDIT}); weight decay: "
           "VPT's grid", "prompt-length grid": _S_NONE, "other search": _S_NONE,
           "selection": _S_VPT_SELECT, "final training split": _S_VPT_SPLIT},
        epochs=_S_VPT_SCHED, **{"warm-up": f"VPT's code: 5 warm-up epochs ({_AUDIT})"},
        batch=_S_VPT_SCHED, seeds=_S_VPT_SEEDS), settings=_VPT_FGVC,
        step_ratios=(1.4191099887787155, 1.0602687981779761, "full")),
    _vpt_baseline("linear", ratios=(1.0, 0.9166475945772881, "frozen-backbone limit")),
    _vpt_baseline("bias", ratios=(1.1618870400268908, 0.9548623256470956, "bias")),
    _vpt_baseline("partial_1", ratios=(0.6940238779294069, 0.8350760455003013, "partial")),
    _vpt_baseline("mlp3"),
    _vpt_baseline("sidetune"),
    _vpt_baseline("adapter", {"peft_cfg.reduction_factor": [8, 64, 256]},
                  "VPT Sec. 4.3 'Prompt Length' and Fig. 6 (Adapter's reduction rate, tuned as "
                  "its additional hyper-parameter)" + _S_STAGES),
    *(Protocol(m, "ssf", ({"lr": _SSF_LR},), 3, _AUGREG, dict(
        backbone="none of the four papers runs it; ours: SSF's checkpoint",
        preprocessing="ours: SSF's (see `ssf`)", optimiser="ours: SSF's recipe",
        **{"lr / wd grid": "ours: SSF's learning-rate range, weight decay 1e-4",
           "prompt-length grid": _S_NONE, "other search": _S_NONE,
           "selection": "ours: the best epoch's validation accuracy, ties to the smaller "
           "learning rate", "final training split": "ours: VPT's protocol"},
        epochs="ours: SSF's recipe", **{"warm-up": "ours: SSF's recipe"},
        batch="ours: SSF's recipe", seeds="ours: VPT's three"), select="best")
      for m in ("lora", "adaptformer")),
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
    """The search stages and final runs of a reproduction. A stage's points are combined with
    the winners of the stages before it, so its runs are known once those have run; a search
    of one point in all has no tuning runs."""

    tasks: list[str]
    stages: list[list[dict[str, Any]]]
    seeds: int
    variants: dict[str, int]
    root: Path

    @property
    def tuned(self) -> bool:
        return any(len(points) > 1 for points in self.stages)

    def tune_jobs(self, stage: int, fixed: dict[str, dict[str, Any]]) -> list[Job]:
        """The runs of ``stage`` given each task's winners so far (``fixed``)."""
        points = self.stages[stage]
        if len(points) == 1:
            return []
        return [Job(t, "tune", _point_name(p), p, self.root / t / "tune" / _point_name(p))
                for t in self.tasks for p in (dict(fixed[t], **q) for q in points)]

    def final_jobs(self) -> list[Job]:
        """Per task, variant and seed: the final runs (their point is chosen by the search)."""
        return [Job(t, "final" if not v else f"final-{v}", f"seed{s}", dict(seed=s),
                    self.root / t / ("final" if not v else f"final-{v}") / f"seed{s}")
                for t in self.tasks for v in ["", *self.variants] for s in range(self.seeds)]


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
         tasks: Sequence[str] | None = None,
         grid: dict[str, list[Any]] | Sequence[dict[str, list[Any]]] | None = None,
         seeds: int | None = None) -> Plan:
    """The search stages and final runs of a reproduction. ``grid`` replaces the protocol's
    search: one stage (a dict) or several (a list of dicts).

    Example:
        >>> p = plan("ssf", "vtab1k", "out", tasks=["dtd"])
        >>> [len(s) for s in p.stages], len(p.final_jobs()), p.final_jobs()[0].output
        ([18, 6], 3, PosixPath('out/ssf/vtab1k/dtd/final/seed0'))
    """
    bench, proto = _lookup(method, benchmark)
    tasks = list(tasks) if tasks else bench.tasks
    unknown = [t for t in tasks if t not in bench.groups]
    if unknown:
        raise ValueError(f"unknown {benchmark} task(s) {unknown}; tasks: {bench.tasks}")
    stages = list(proto.stages) if grid is None else [grid] if isinstance(grid, dict) else \
        list(grid)
    for stage in stages:
        empty = [k for k, v in stage.items() if not v]
        if empty or not stage:
            raise ValueError(f"a search stage needs at least one value per key; got {stage}")
    seeds = proto.seeds if seeds is None else seeds
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    # the extra rows name leading stages: they hold while the stages are the protocol's in number
    variants = dict(proto.variants) if len(stages) == len(proto.stages) else {}
    return Plan(tasks, [_grid_points(s) for s in stages], seeds, variants,
                Path(output) / method / benchmark)


def _lookup(method: str, benchmark: str) -> tuple[Benchmark, Protocol]:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; benchmarks: {sorted(BENCHMARKS)}")
    if method not in PROTOCOLS:
        raise ValueError(f"no reproduction protocol for method {method!r}; methods: "
                         f"{sorted(PROTOCOLS)}")
    return BENCHMARKS[benchmark], PROTOCOLS[method]


def _base_values(method: str, benchmark: str, data_root: str | os.PathLike, model: str | None,
                 train_args: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields every run of the reproduction shares."""
    from .train import TrainConfig
    bench, proto = _lookup(method, benchmark)
    recipes = [bench.recipe, proto.recipe]
    defaults = dict(TrainConfig.from_recipes(recipes).to_dict(),
                    **proto.settings.get(benchmark, {}))
    extra = dict(train_args)
    if "epochs" in extra and "warmup_epochs" not in extra:  # keep the recipe's warm-up share
        extra["warmup_epochs"] = defaults["warmup_epochs"] * extra["epochs"] / defaults["epochs"]
    return dict(defaults, **extra, model=f"{model or proto.backbone}.{method}", recipes=recipes,
                val_split=0.0, task=None, data_dir=str(data_root))


def job_config(base: dict[str, Any], benchmark: str, job: Job, point: dict[str, Any],
               final_split: str) -> dict[str, Any]:
    """The TrainConfig fields of one run: the shared ones, the grid point and the splits.

    Example:
        >>> base = _base_values("vpt", "vtab1k", "/data", None, {})
        >>> job = plan("vpt", "vtab1k", "o", tasks=["dtd"]).final_jobs()[0]
        >>> v = job_config(base, "vtab1k", job, {"lr_base": 0.5}, "train800val200")
        >>> v["train_split"], v["test_split"], v["crop_mode"], v["lr_base"], v["seed"]
        ('train800val200', 'test', 'squash', 0.5, 0)
    """
    bench = BENCHMARKS[benchmark]
    tune = job.phase == "tune"
    v = _apply_point(base, point if tune else {**point, **job.overrides})
    v.update(dataset=f"{benchmark}/{job.task}",
             train_split=bench.tune_train if tune else final_split,
             val_split_name=bench.tune_val if tune else None,
             test_split=None if tune else bench.test)  # the search never looks at test
    return v


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------

def _outcome(job_dir: Path) -> dict[str, Any] | None:
    """A finished run's metrics, ``{"diverged": message}`` for a diverged one, else None."""
    path = job_dir / "summary.json"
    if path.is_file():
        return json.loads(path.read_text())["metrics"]
    path = job_dir / DIVERGED_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _run_job(job: Job, cfg_values: dict[str, Any], run: Callable[..., Any],
             rank: int = 0) -> dict[str, Any]:
    from .io.format import atomic_write
    from .train import CHECKPOINT_NAME, TrainConfig
    done = _outcome(job.output)
    if done is not None:
        return done
    values = dict(cfg_values, output=str(job.output), progress=False)
    if (job.output / CHECKPOINT_NAME).is_file():
        values["resume"] = str(job.output)
    elif job.output.exists():
        values["overwrite"] = True  # a run that died before its first checkpoint
    logger.info(f"[rank {rank}] {job.phase} {job.task} {job.name} -> {job.output}")
    try:
        run(TrainConfig(**values), distributed=False)
    except FloatingPointError as e:  # a non-finite loss: this point diverged, the search goes on
        logger.warning(f"[rank {rank}] {job.phase} {job.task} {job.name} diverged: {e}")
        atomic_write(job.output / DIVERGED_NAME, (json.dumps(dict(diverged=str(e))) + "\n")
                     .encode())
    return _outcome(job.output) or {}


@dataclass
class ReproduceResult:
    """What a reproduction measured, per task, and where its table went."""

    rows: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    table_md: Path | None
    table_json: Path | None


def reproduce(method: str, benchmark: str, data_root: str | os.PathLike, model: str | None = None,
              *, output: str | os.PathLike = "runs/reproduce",
              tasks: Sequence[str] | None = None,
              grid: dict[str, list[Any]] | Sequence[dict[str, list[Any]]] | None = None,
              seeds: int | None = None, train_args: dict[str, Any] | None = None,
              run: Callable[..., Any] | None = None) -> ReproduceResult:
    """Run the authors' protocol for ``method`` on ``benchmark`` and tabulate ours vs theirs.

    ``model`` is the backbone ``<arch>[.<weight tag>]`` (default: the one the method's authors
    used, :attr:`Protocol.backbone`; the method suffix is added); ``train_args`` are
    :class:`~timm_peft.train.TrainConfig` fields that override the recipes (e.g.
    ``pretrained_file``, ``epochs`` for a quick check, ``device``). Under ``torchrun`` every
    process calls this; runs are spread over the processes and rank 0 writes the table.

    Example:
        >>> res = reproduce("ssf", "vtab1k", "/data/vtab-1k")  # doctest: +SKIP
        >>> res.table_md  # doctest: +SKIP
        PosixPath('runs/reproduce/ssf-vtab1k.md')
    """
    from .train import train
    run = run or train
    bench, proto = _lookup(method, benchmark)
    if not Path(data_root).is_dir():
        raise FileNotFoundError(f"data root {data_root} does not exist")
    jobs = plan(method, benchmark, output, tasks=tasks, grid=grid, seeds=seeds)
    extra = dict(train_args or {})
    for key in ("output", "resume", "overwrite", "dataset", "train_split", "val_split_name",
                "test_split"):
        if key in extra:
            raise ValueError(f"train_args may not set {key!r}: reproduce sets it per run")
    rank, world, device, owns = _process_group()
    try:
        if device is not None and "device" not in extra:
            extra["device"] = device
        base = _base_values(method, benchmark, data_root, model, extra)
        split = proto.final_split[benchmark]

        def config(job: Job, point: dict[str, Any]) -> dict[str, Any]:
            return job_config(base, benchmark, job, point, split)

        fixed: dict[str, dict[str, Any]] = {t: {} for t in jobs.tasks}
        val_acc: dict[str, float | None] = {t: None for t in jobs.tasks}
        after: list[dict[str, dict[str, Any]]] = []  # each task's point after each stage
        diverged: dict[str, list[str]] = {t: [] for t in jobs.tasks}
        for stage in range(len(jobs.stages)):
            stage_jobs = jobs.tune_jobs(stage, fixed)
            for job in stage_jobs[rank::world]:
                _run_job(job, config(job, job.overrides), run, rank)
            _barrier(world)
            for t in jobs.tasks:
                if len(jobs.stages[stage]) == 1:
                    fixed[t] = dict(fixed[t], **jobs.stages[stage][0])
                    continue
                fixed[t], val_acc[t], lost = _choose([j for j in stage_jobs if j.task == t],
                                                     proto.select)
                diverged[t] += [n for n in lost if n not in diverged[t]]
            after.append({t: dict(p) for t, p in fixed.items()})
        points = {"": fixed, **{v: after[n - 1] for v, n in jobs.variants.items()}}
        finals = jobs.final_jobs()
        for job in finals[rank::world]:
            variant = job.phase.partition("-")[2]
            _run_job(job, config(job, points[variant][job.task]), run, rank)
        _barrier(world)
        if rank != 0:
            return ReproduceResult([], [], None, None)
        rows, groups = _collect(method, benchmark, jobs, points, val_acc, diverged)
        out = Path(output)
        md, js = out / f"{method}-{benchmark}.md", out / f"{method}-{benchmark}.json"
        header = dict(method=method, benchmark=benchmark, model=model or proto.backbone,
                      data_root=str(data_root), seeds=jobs.seeds,
                      grid=[p for s in jobs.stages for p in s], stages=jobs.stages,
                      variants=list(jobs.variants), train_args=extra)
        js.write_text(json.dumps(dict(header, rows=rows, groups=groups), indent=1) + "\n")
        md.write_text(format_table(header, rows, groups))
        logger.info(f"wrote {md} and {js}")
        return ReproduceResult(rows, groups, md, js)
    finally:
        if owns:
            torch.distributed.destroy_process_group()


def _last_val_acc(job_dir: Path) -> float | None:
    """The validation accuracy of the run's last epoch (its log), not of its best one."""
    from .train import LOG_NAME
    last = None
    for line in (job_dir / LOG_NAME).read_text().splitlines():
        record = json.loads(line)
        if "epoch" in record and "val_acc" in record:
            last = record["val_acc"]
    return last


def _choose(stage_jobs: list[Job], select: str
            ) -> tuple[dict[str, Any], float, list[str]]:
    """The stage's winner for one task, its validation accuracy and the diverged points.

    ``select`` "last" scores a run by its last epoch's validation accuracy (VPT's code), "best"
    by its best epoch's (the summary's); ties go to the smaller learning rate, then to the
    earlier point.
    """
    scored, lost = [], []
    for i, j in enumerate(stage_jobs):
        m = _outcome(j.output)
        if m is None or (m.get("val_acc") is None and "diverged" not in m):
            raise RuntimeError(f"tuning run {j.output} has no result; run the command again")
        if "diverged" in m:
            lost.append(j.name)
            continue
        acc = _last_val_acc(j.output) if select == "last" else m["val_acc"]
        lr = j.overrides.get("lr", j.overrides.get("lr_base", 0.0))
        scored.append((-acc, lr, i, j))
    if not scored:
        raise RuntimeError(f"every point of this search stage diverged for task "
                           f"{stage_jobs[0].task} ({', '.join(lost)}): lower its learning "
                           "rates with --grid")
    acc, _, _, best = min(scored, key=lambda s: s[:3])
    return best.overrides, -acc, lost


def _collect(method: str, benchmark: str, jobs: Plan, points: dict[str, dict[str, dict]],
             val_acc: dict[str, float | None], diverged: dict[str, list[str]]
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    bench = BENCHMARKS[benchmark]
    paper = paper_results().get(method, {}).get(benchmark, {})
    per_task = paper.get("per_task", {})
    finals = jobs.final_jobs()

    def seeds_of(task: str, phase: str) -> list[float | None]:
        out = []
        for j in finals:
            if j.task == task and j.phase == phase:
                m = _outcome(j.output) or {}
                out.append(None if "diverged" in m else round(m["test_acc"] * 100, 2))
        return out

    def mean(values: list[float | None]) -> float | None:
        done = [v for v in values if v is not None]
        return round(sum(done) / len(done), 2) if done else None

    rows = []
    for task in jobs.tasks:
        accs = seeds_of(task, "final")
        ours, theirs = mean(accs), per_task.get(task)
        rows.append(dict(task=task, group=bench.groups[task], ours=ours, seeds=accs,
                         paper=theirs,
                         diff=None if theirs is None or ours is None else round(ours - theirs, 2),
                         chosen=points[""][task], diverged=diverged[task],
                         val_acc=None if val_acc[task] is None else round(val_acc[task] * 100, 2),
                         variants={v: dict(ours=mean(vs), seeds=vs, chosen=points[v][task])
                                   for v, vs in ((v, seeds_of(task, f"final-{v}"))
                                                 for v in jobs.variants)}))
    groups = []
    paper_means = paper.get("group_means", {})
    names = list(dict.fromkeys(bench.groups.values()))
    for group in names + ["all tasks"]:
        members = [t for t, g in bench.groups.items() if g == group or group == "all tasks"]
        ran = [r for r in rows if r["task"] in members and r["ours"] is not None]
        if not ran or (group == "all tasks" and len(names) == 1):
            continue
        ours = sum(r["ours"] for r in ran) / len(ran)
        theirs = paper_means.get(group)
        if theirs is None and per_task and all(t in per_task for t in members):
            theirs = sum(per_task[t] for t in members) / len(members)
        complete = len(ran) == len(members)
        variant_means = {v: mean([r["variants"][v]["ours"] for r in ran]) for v in jobs.variants}
        groups.append(dict(group=group, tasks=f"{len(ran)}/{len(members)}", ours=round(ours, 2),
                           paper=None if theirs is None else round(theirs, 2),
                           diff=None if theirs is None or not complete else round(ours - theirs, 2),
                           variants=variant_means))
    return rows, groups


def format_table(header: dict[str, Any], rows: list[dict[str, Any]],
                 groups: list[dict[str, Any]]) -> str:
    """The Markdown report: per-task and group accuracies, ours beside the paper's."""
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    sign = lambda v: "—" if v is None else f"{v:+.2f}"  # noqa: E731
    method, benchmark = header["method"], header["benchmark"]
    proto = PROTOCOLS[method]
    published = paper_results().get(method, {})
    paper = published.get(benchmark, {})
    variants = header.get("variants", [])
    authors = (f"the authors': `{proto.backbone}`" if header["model"] == proto.backbone else
               f"**not** the authors' `{proto.backbone}`")
    lines = [f"# {method} on {benchmark}: ours vs the paper", "",
             f"Backbone `{header['model']}` ({authors}: {proto.sources['backbone']}), data "
             f"`{header['data_root']}`, mean test accuracy (%) over {header['seeds']} seed(s); "
             f"hyper-parameters chosen on the validation split in {len(header['stages'])} "
             f"search stage(s) of {', '.join(str(len(s)) for s in header['stages'])} point(s). "
             f"Protocol: see the README's protocol table (`timm_peft.reproduce.protocol_table`).",
             "", "| task | group | ours | paper | diff | chosen | val acc | "
             + "".join(f"ours {v} | " for v in variants) + "diverged |",
             "|---|---|---:|---:|---:|---|---:|" + "---:|" * len(variants) + "---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['group']} | {fmt(r['ours'])} | {fmt(r['paper'])} | "
                     f"{sign(r['diff'])} | {_point_name(r['chosen'])} | {fmt(r['val_acc'])} | "
                     + "".join(f"{fmt(r['variants'][v]['ours'])} | " for v in variants)
                     + (", ".join(r["diverged"]) or "—") + " |")
    lines += ["", "| group | tasks | ours | paper | diff | "
              + "".join(f"ours {v} | " for v in variants),
              "|---|---:|---:|---:|---:|" + "---:|" * len(variants)]
    for g in groups:
        lines.append(f"| {g['group']} | {g['tasks']} | {fmt(g['ours'])} | {fmt(g['paper'])} | "
                     f"{sign(g['diff'])} | "
                     + "".join(f"{fmt(g['variants'][v])} | " for v in variants))
    lost = sum(1 for r in rows for a in r["seeds"] if a is None)
    if lost:
        lines += ["", f"{lost} final run(s) diverged: their task's mean is over the others."]
    sources = [paper[k] for k in ("per_task_source", "group_means_source", "model") if k in paper]
    lines += ["", "Paper numbers: " + ("; ".join(sources) if sources else
                                       "none published for this method and benchmark") + "."]
    if "reported" in published:
        lines.append(f"What the authors did report: {published['reported']}")
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


# ----------------------------------------------------------------------------------------------
# the protocol, item by item, and what it costs
# ----------------------------------------------------------------------------------------------

def _values(values: list[Any]) -> str:
    return "{" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + "}"


def protocol_items(method: str, benchmark: str) -> dict[str, str]:
    """What the reproduction runs, per item of :data:`ITEMS`, read off the TrainConfig of its
    runs (recipes, protocol settings and search stages), as ``--dry-run`` prints it.

    Example:
        >>> protocol_items("full", "vtab1k")["warm-up"]
        '5 epochs'
    """
    bench, proto = _lookup(method, benchmark)
    jobs = plan(method, benchmark, "x", tasks=bench.tasks[:1])
    base = _base_values(method, benchmark, "x", None, {})
    # the TrainConfig fields of the search's first run, and of a final run on every stage's
    # first point
    first = Job(jobs.tasks[0], "tune", "", jobs.stages[0][0], Path("x"))
    cfg = job_config(base, benchmark, first, first.overrides, "")
    chosen = {k: v for points in jobs.stages for k, v in points[0].items()}
    final = job_config(base, benchmark, jobs.final_jobs()[0], chosen, proto.final_split[benchmark])
    searched = {k: v for s in proto.stages for k, v in s.items()}

    def setting(key: str, label: str) -> str:
        return f"{label} {_values(searched[key])}" if key in searched else \
            f"{label} {cfg[key]:g}"

    side = 224  # the protocols' input size (ViT-B/16)
    if cfg["aug"] and cfg["train_crop_mode"] == "squash":
        train_tf = (f"resize to {int(side / cfg['crop_pct'])}² + random crop {side} + flip "
                    f"{cfg['hflip']:g}")
    elif cfg["aug"]:
        lo, hi = cfg["scale"] or (0.08, 1.0)
        train_tf = f"RandomResizedCrop ({lo:g}–{hi:g}) + flip {cfg['hflip']:g}"
    else:
        train_tf = "as eval, no augmentation"
    crop = "center (checkpoint's crop_pct) resize" if cfg["crop_mode"] is None else \
        "squash resize" if cfg["crop_pct"] == 1.0 else \
        f"resize to {int(side / cfg['crop_pct'])}² + center crop {side}"
    norm = "ImageNet mean/std" if cfg["mean"] == [0.485, 0.456, 0.406] else \
        "the checkpoint's mean/std" if cfg["mean"] is None else f"mean/std {cfg['mean']}"
    lr_key = "lr" if "lr" in searched or cfg["lr"] is not None else "lr_base"
    lr = setting(lr_key, "lr" if lr_key == "lr" else "lr_base")
    if lr_key == "lr_base":
        lr += f" × batch/{cfg['lr_base_size']}"
    opt = {"momentum": f"SGD, momentum {cfg['momentum']:g}", "adamw": "AdamW",
           "adam": f"Adam, beta1 {cfg['momentum']:g}"}.get(cfg["opt"], cfg["opt"])
    lengths = [k for k in searched if k.startswith("peft_cfg.num_")]
    other = [k for k in searched if k not in lengths and k not in ("lr", "lr_base",
                                                                  "weight_decay")]
    epochs = f"{cfg['epochs']}"
    if proto.second_pass_key is not None:
        epochs += " (+ as many in the rewinding stage of a pruned run)"
    stages = " → ".join("×".join(k.replace("peft_cfg.", "") for k in s) for s in proto.stages)
    return {
        "backbone": f"`{proto.backbone}`",
        "preprocessing": f"train: {train_tf}; eval: {crop}; {norm}",
        "optimiser": f"{opt}, {cfg['sched']} schedule",
        "lr / wd grid": f"{lr}; {setting('weight_decay', 'wd')}",
        "prompt-length grid": "; ".join(f"{k.replace('peft_cfg.', '')} {_values(searched[k])}"
                                        for k in lengths) or "—",
        "other search": "; ".join(f"{k.replace('peft_cfg.', '')} {_values(searched[k])}"
                                  for k in other) or "—",
        "epochs": epochs,
        "warm-up": f"{cfg['warmup_epochs']:g} epochs",
        "batch": f"{cfg['batch_size']}",
        "selection": ("no search" if not jobs.tuned else
                      f"{'last' if proto.select == 'last' else 'best'} epoch's val accuracy, "
                      f"ties to the smaller lr; stages {stages}"),
        "final training split": f"{final['train_split']} → {final['test_split']}"
                                + (f" (+ {', '.join(proto.variants)} row)" if proto.variants
                                   else ""),
        "seeds": f"{jobs.seeds}",
    }


def protocol_table() -> str:
    """The README's protocol table: per method (methods with the same protocol share a row
    group) and item, what runs on VTAB-1k and FGVC, and whose choice it is.

    Example:
        >>> rows = protocol_table().splitlines()
        >>> rows[0]
        '| method | item | VTAB-1k | FGVC | follows |'
        >>> rows[52].split(" | ")[1:4]  # `full`'s optimiser: VPT's code's
        ['optimiser', 'AdamW, cosine schedule', 'same']
    """
    groups: dict[str, list[str]] = {}
    rendered: dict[str, list[tuple[str, str, str, str]]] = {}
    for method, proto in PROTOCOLS.items():
        items = {b: protocol_items(method, b) for b in BENCHMARKS}
        rows = [(item, items["vtab1k"][item], items["fgvc"][item], proto.sources[item])
                for item in ITEMS]
        key = json.dumps(rows)
        groups.setdefault(key, []).append(method)
        rendered[key] = rows
    lines = ["| method | item | VTAB-1k | FGVC | follows |", "|---|---|---|---|---|"]
    for key, methods in groups.items():
        for i, (item, vtab, fgvc, source) in enumerate(rendered[key]):
            names = ", ".join(f"`{m}`" for m in methods) if i == 0 else ""
            lines.append(f"| {names} | {item} | {vtab} | {fgvc if fgvc != vtab else 'same'} | "
                         f"{source} |")
    return "\n".join(lines) + "\n"


def estimate(method: str, benchmark: str, *, tasks: Sequence[str] | None = None,
             grid: dict[str, list[Any]] | Sequence[dict[str, list[Any]]] | None = None,
             seeds: int | None = None,
             epochs: int | None = None, img_per_s: float = 800.0) -> dict[str, Any]:
    """Runs, images and GPU hours of a reproduction, for planning (``--dry-run``).

    ``img_per_s`` is the training throughput of the frozen-backbone limit (every weight frozen
    but the head) on the GPU; a method's training image costs its measured step ratio to that
    limit, an evaluated image ``EVAL_COST`` times the method's inference ratio
    (:attr:`Protocol.step_ratios`, benchmarks/results/efficiency_cuda.md). Tuning runs evaluate
    the validation split every epoch, final runs the test split once; a pruned E2VPT run trains
    twice. Every stage's runs are counted, E2VPT's unpruned row included.

    Example:
        >>> estimate("ssf", "vtab1k")["runs"]
        513
    """
    from .train import TrainConfig
    bench, proto = _lookup(method, benchmark)
    jobs = plan(method, benchmark, "x", tasks=tasks, grid=grid, seeds=seeds)
    epochs = epochs or TrainConfig.from_recipes([bench.recipe, proto.recipe]).epochs
    train_ratio, infer_ratio, _ = proto.step_ratios or (1.0, 1.0, None)
    t_train, t_eval = train_ratio / img_per_s, EVAL_COST * infer_ratio / img_per_s
    key = proto.second_pass_key
    split = proto.final_split[benchmark]
    seconds, images, tune_runs = 0.0, 0, 0
    for t in jobs.tasks:
        size = bench.images[t]
        pruned = False  # a stage searching only non-zero values of ``key``: every later run rewinds
        after = []  # whether the runs after each stage rewind
        for points in jobs.stages:
            for p in points if jobs.tuned and len(points) > 1 else []:
                passes = 2 if key is not None and (pruned or p.get(key, 0)) else 1
                tune_runs += 1
                images += size[bench.tune_train] * epochs * passes
                seconds += epochs * passes * (size[bench.tune_train] * t_train
                                              + size[bench.tune_val] * t_eval)
            if key is not None and key in points[0]:
                pruned = all(p[key] for p in points)
            after.append(pruned)
        for n in [len(jobs.stages), *jobs.variants.values()]:
            passes = 2 if after[n - 1] else 1
            images += jobs.seeds * size[split] * epochs * passes
            seconds += jobs.seeds * (epochs * passes * size[split] * t_train
                                     + size[bench.test] * t_eval)
    final_runs = len(jobs.final_jobs())
    return dict(runs=tune_runs + final_runs, tune_runs=tune_runs, final_runs=final_runs,
                epochs=epochs, training_images=int(images), gpu_hours=seconds / 3600,
                step_ratios=proto.step_ratios, img_per_s=img_per_s)


def gpu_table(img_per_s: float = 800.0) -> str:
    """The README's GPU-time table: runs and estimated GPU hours per method and benchmark.

    Example:
        >>> gpu_table().splitlines()[0]
        '| method | step ratios (train, eval) | VTAB-1k (19 tasks) | FGVC (5 datasets) |'
    """
    lines = ["| method | step ratios (train, eval) | VTAB-1k (19 tasks) | FGVC (5 datasets) |",
             "|---|---|---|---|"]
    for method, proto in PROTOCOLS.items():
        ratios = ("not measured: 1.0, 1.0 assumed" if proto.step_ratios is None else
                  f"{proto.step_ratios[0]:.2f}, {proto.step_ratios[1]:.2f} "
                  f"(`{proto.step_ratios[2]}`)")
        cells = []
        for benchmark in BENCHMARKS:
            est = estimate(method, benchmark, img_per_s=img_per_s)
            cells.append(f"{est['runs']} runs, ≈ {est['gpu_hours']:.0f} GPU h")
        lines.append(f"| `{method}` | {ratios} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"
