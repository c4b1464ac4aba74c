"""Module × method coverage: the smallest arch of every timm model module, every method, what works.

Rows, in three sections:

* **modules**: one per module of ``timm.list_modules()`` (98 in timm 1.0.31), its smallest arch
  (:func:`benchmarks.archs.smallest_archs`), shrunk where the entrypoint takes size arguments;
* **test archs**: timm's own ``test_*`` archs (tiny configurations of real families);
* **variants**: configurations of a family that take other code paths (register tokens,
  parallel blocks, distillation tokens, ...).

Columns: every registered method (``timm_peft.list_methods()`` without presets, so a method
added later appears by itself; ``full`` and other methods that save the whole model are left
out), plus the presets in :data:`PRESETS`.

For every cell the model is built with the method (``timm.create_model("<arch>.<method>")``)
and checked: forward + backward give every trainable parameter a gradient, one optimiser step,
``save_pretrained`` → ``load_adapter`` into the model as built (a copy taken before training:
same base, the adapter's initial values; a second build would cost as much again) gives
bit-identical outputs, and
``pickle`` / ``torch.save`` of the whole model round-trips. A method that refuses the model at
build time is recorded with its reason (the build is tried on the meta device first, so a refusal
costs no real build); anything else that goes wrong is a failure. ``timm_peft.list_models`` must
list exactly the cells that work: the report flags a listed cell that does not work and a working
cell that is not listed.

Run: ``nice -n 10 python -m benchmarks.coverage`` (CPU; the full sweep takes long, see
``coverage.md``); writes ``benchmarks/results/coverage.md`` and ``coverage.json`` after every
row. ``--methods`` / ``--modules`` rerun a subset and merge it into the existing
``coverage.json`` (e.g. the cells of a new method: ``--methods lora``).
"""
from __future__ import annotations

import argparse
import ast
import copy
import functools
import inspect
import io
import json
import pickle
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

import timm_peft
from benchmarks.archs import _ranked, smallest_archs
from timm_peft.core import get_method, resolve_method
from timm_peft.families import FamilyCapabilityError, get_family

RESULTS = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 3
#: presets swept as columns of their own: they change what the surgery inserts
PRESETS = ("vpt_shallow",)
#: input sizes tried, smallest first, for a model the table below does not size
SIZES = (64, 96, 128, 160, 224)

TINY_VIT = dict(img_size=32, depth=2, embed_dim=32, num_heads=2)
#: per arch, (create_model kwargs, input size): shrunk by hand where the automatic shrink
#: (``depth``/``depths`` from the entrypoint's source) does not reach or is not small enough
SHRINK: dict[str, tuple[dict[str, Any], int]] = {
    "vit_tiny_patch16_224": (TINY_VIT, 32),
    "deit_tiny_patch16_224": (TINY_VIT, 32),
    "vit_tiny_r_s16_p8_224": (dict(img_size=64, depth=1), 64),
    "eva02_tiny_patch14_224": (dict(img_size=28, depth=2), 28),
    "vit_tiny_patch16_dinov3_qkvb": (dict(img_size=32, depth=2), 32),
    "beit_base_patch16_224": (TINY_VIT, 32),
    "cait_xxs24_224": (dict(img_size=32, depth=2), 32),
    "xcit_nano_12_p8_224": (dict(img_size=32, depth=2), 32),
    "swin_tiny_patch4_window7_224": (dict(img_size=32, embed_dim=16, depths=(1, 1),
                                          num_heads=(2, 4), window_size=4), 32),
    "swinv2_tiny_window8_256": (dict(img_size=32, embed_dim=16, depths=(1, 1),
                                     num_heads=(2, 4), window_size=4), 32),
    "swinv2_cr_tiny_224": (dict(img_size=(64, 64), embed_dim=16, depths=(1, 1),
                                num_heads=(2, 4), window_size=4), 64),
    "maxvit_pico_rw_256": (dict(img_size=64), 64),
    "davit_tiny": (dict(depths=(1, 1, 1, 1)), 64),
    "hiera_tiny_224": (dict(img_size=64), 64),
    "levit_128s": (dict(img_size=64), 64),
    "efficientformer_l1": ({}, 224),  # attention biases fixed to 224 px
    "volo_d1_224": (dict(img_size=64), 64),
    "crossvit_tiny_240": (dict(img_size=240), 240),
    "gemma4_vit_167m": (dict(depth=2, embed_dim=64, num_heads=2), 64),
    "deepseek_vit_412m": (dict(depth=2, embed_dim=64, num_heads=2), 56),  # 14 px patches
    "qwen3_vit_88m": (dict(depth=2, embed_dim=64, num_heads=2), 64),
    "naflexvit_base_patch16_parfac_gap": (dict(depth=2, embed_dim=64, num_heads=2), 64),
    "vgg11": (dict(mlp_ratio=1 / 64), 64),  # the 7×7×512→4096 pre-logits conv is 100M
    "samvit_base_patch16_224": (dict(img_size=64, depth=2, embed_dim=64, num_heads=2,
                                     global_attn_indexes=(1,), window_size=4), 64),
}
#: (label, arch, kwargs, size): configurations that take other code paths than the module's row
VARIANTS: list[tuple[str, str, dict[str, Any], int]] = [
    ("vit (reg tokens, avg pool)", "vit_tiny_patch16_224",
     dict(TINY_VIT, reg_tokens=2, class_token=False, global_pool="avg"), 32),
    ("vit (parallel blocks)", "vit_small_patch16_18x2_224", dict(TINY_VIT), 32),
    ("vit (parallel scaling blocks)", "vit_base_patch16_xp_224", dict(TINY_VIT), 32),
    ("deit (distilled)", "deit_tiny_distilled_patch16_224", dict(TINY_VIT), 32),
    ("deit3", "deit3_small_patch16_224", dict(TINY_VIT), 32),
    ("eva02", "eva02_tiny_patch14_224", dict(img_size=28, depth=2), 28),
    ("beitv2", "beitv2_base_patch16_224", dict(TINY_VIT), 32),
    ("coatnet", "coatnet_nano_rw_224", dict(img_size=64), 64),
    ("convnext (atto)", "convnext_atto", {}, 64),
    ("convnextv2", "convnextv2_atto", {}, 64),
    ("resnetv2 (BiT)", "resnetv2_50x1_bit", {}, 64),
    ("efficientnet (B0)", "efficientnet_b0", {}, 64),
    ("mobilenetv4", "mobilenetv4_conv_small", {}, 64),
    ("dla (DLA-34)", "dla34", {}, 64),
    ("nfnet (NF-ResNet)", "nf_resnet26", {}, 64),
]


# ----------------------------------------------------------------------------------------------
# rows: archs, their shrink and input size (decided on the meta device)
# ----------------------------------------------------------------------------------------------

def _quiet_create(name: str, **kwargs: Any) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, **kwargs)


def _meta_runs(arch: str, kwargs: dict[str, Any], size: int) -> bool:
    """Whether ``arch`` builds with ``kwargs`` and runs a ``size`` px input on the meta device."""
    try:
        model = _quiet_create(arch, device="meta", num_classes=NUM_CLASSES, **kwargs).eval()
        with torch.no_grad():
            model(torch.empty(2, 3, size, size, device="meta"))
        return True
    except Exception:  # noqa: BLE001  (a candidate that does not run is not taken)
        return False


def _entrypoint_depths(arch: str) -> dict[str, Any]:
    """``depth=2`` / ``depths=(1, …)`` where the entrypoint's source sets them (timm's model
    args pattern ``dict(depths=(2, 2, 6, 2), ...)``): the automatic shrink."""
    from timm.models import _registry
    fn = _registry._model_entrypoints[arch]
    fn = getattr(fn, "__timm_peft_original__", fn)
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return {}
    out: dict[str, Any] = {}
    if re.search(r"\bdepth=\d+", src):
        out["depth"] = 2
    hit = re.search(r"\bdepths=[(\[]([\d,\s]+)[)\]]", src)
    if hit:
        out["depths"] = tuple(1 for v in hit.group(1).split(",") if v.strip())
    return out


def plan(arch: str) -> tuple[dict[str, Any], int]:
    """``(kwargs, input size)`` for ``arch``: :data:`SHRINK`'s, else the entrypoint's depths
    shrunk and the smallest of :data:`SIZES` the model runs on the meta device (with
    ``img_size`` where the model takes it), else its pretrained input size."""
    if arch in SHRINK and _meta_runs(arch, *SHRINK[arch]):
        return SHRINK[arch]
    shrink = _entrypoint_depths(arch)
    default = _quiet_create(arch, device="meta").pretrained_cfg.get("input_size", (3, 224, 224))
    for kwargs in ([shrink, {}] if shrink else [{}]):
        for size in SIZES:
            for sized in (dict(kwargs, img_size=size), kwargs):
                if _meta_runs(arch, sized, size):
                    return sized, size
        if _meta_runs(arch, kwargs, default[-1]):
            return kwargs, default[-1]
    return {}, default[-1]


def rows(sections: tuple[str, ...] = ("modules", "test archs", "variants")) \
        -> list[tuple[str, str, str, dict[str, Any], int | None]]:
    """``(section, label, arch, kwargs, size)`` of every row (size None: decided when run)."""
    out = []
    archs = smallest_archs(include_test=True)
    for key, arch in archs.items():
        section = "test archs" if key == arch and arch.startswith("test_") else "modules"
        if section in sections:
            out.append((section, key, arch, {}, None))
    if "variants" in sections:
        out += [("variants", label, arch, kw, size) for label, arch, kw, size in VARIANTS]
    return out


# ----------------------------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------------------------

def sweep_methods() -> list[str]:
    """Every registered method (not its presets) but those that save the whole model, then
    :data:`PRESETS`."""
    names = [n for n in timm_peft.list_methods() if resolve_method(n)[0] == n
             and not get_method(n).saves_whole_model]
    return names + [p for p in PRESETS if p in timm_peft.list_methods()]


#: build-time refusals: a method or family says no (anything else raised at build is a failure)
REFUSALS = (FamilyCapabilityError, ValueError, TypeError, NotImplementedError)


def _build(arch: str, method: str, kwargs: dict[str, Any], size: int,
           device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    # pixel prompts are made for one input size: the sweep's (token prompts ignore it)
    cfg = dict(img_size=size) if resolve_method(method)[0] == "vpt" else None
    return _quiet_create(f"{arch}.{method}", num_classes=NUM_CLASSES, peft_cfg=cfg,
                         device=device, **kwargs)


def _clean(msg: str) -> str:
    return re.sub(r"/tmp/[^/\s]+/", "<tmp>/", msg.split("; see timm_peft.list_models")[0])


def check(arch: str, method: str, kwargs: dict[str, Any], size: int,
          listed: bool = False) -> tuple[str, str]:
    """``("works" | "refused" | "FAILS", detail)`` for one cell (``listed``: expected to work,
    so no meta-device build is tried first)."""
    try:
        if not listed:
            _build(arch, method, kwargs, size, device="meta")  # a refusal costs no real build
    except REFUSALS as e:
        return "refused", _clean(str(e))
    except Exception:  # noqa: BLE001  (the meta device is not enough: the real build decides)
        pass
    try:
        model = _build(arch, method, kwargs, size)
    except REFUSALS as e:
        return "refused", _clean(str(e))
    except Exception as e:  # noqa: BLE001
        return "FAILS", f"build: {type(e).__name__}: {_clean(str(e).splitlines()[0])[:200]}"
    stage = "forward/backward"
    try:
        fresh = copy.deepcopy(model)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        out = model(x)
        F.cross_entropy(out, torch.arange(2) % NUM_CLASSES).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            return "FAILS", f"no gradient for {missing[:3]}"
        stage = "optimiser step"
        # the saved adapter is a trained one (a small step: a random head and a large one
        # overflow some models, e.g. MobileOne, and NaN equals nothing)
        torch.optim.SGD(trainable, lr=1e-3).step()
        model.eval()
        with torch.no_grad():
            ref = model(x)
        stage = "save/load"
        with tempfile.TemporaryDirectory() as tmp:
            timm_peft.save_pretrained(model, Path(tmp) / "a")
            timm_peft.load_adapter(fresh, Path(tmp) / "a")
            with torch.no_grad():
                if not _same(fresh.eval()(x), ref):
                    return "FAILS", "reloaded adapter differs"
        del fresh
        stage = "pickle"
        for clone in (pickle.loads(pickle.dumps(model)), _torch_roundtrip(model)):
            with torch.no_grad():
                if not _same(clone.eval()(x), ref):
                    return "FAILS", "pickled model differs"
    except Exception as e:  # noqa: BLE001  (a sweep records every failure)
        return "FAILS", f"{stage}: {type(e).__name__}: {_clean(str(e).splitlines()[0])[:200]}"
    return "works", ""


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaNs where the other has them included."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _torch_roundtrip(model: torch.nn.Module) -> torch.nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def listed_archs(methods: list[str]) -> dict[str, set[str]]:
    """Per method, the archs ``timm_peft.list_models(method=...)`` lists."""
    return {m: _listed(m) for m in methods if m in timm_peft.list_methods()}


@functools.lru_cache(maxsize=None)
def _listed(method: str) -> frozenset[str]:
    return frozenset(n.rsplit(".", 1)[0] for n in timm_peft.list_models(method=method))


def mismatches(data: dict[str, Any]) -> dict[str, list[str]]:
    """Cells where ``list_models`` (now) and the sweep disagree: ``listed_failing`` (listed, does
    not work) and ``working_unlisted`` (works, not listed), as ``"label.method"``."""
    methods = sorted({m for r in data["rows"] for m in r["cells"]})
    listed = listed_archs(methods)
    out: dict[str, list[str]] = {"listed_failing": [], "working_unlisted": []}
    for r in data["rows"]:
        for m, (status, _, _) in r["cells"].items():
            is_listed = r["arch"] in listed.get(m, ())
            if is_listed and status != "works":
                out["listed_failing"].append(f"{r['label']}.{m}")
            elif status == "works" and not is_listed:
                out["working_unlisted"].append(f"{r['label']}.{m}")
    return out


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", help="methods to (re)run (default: all); "
                        "merged into the existing coverage.json")
    parser.add_argument("--modules", nargs="*", help="row labels to (re)run: module names, "
                        "test archs, variant labels (default: all); merged likewise")
    parser.add_argument("--sections", nargs="*", default=["modules", "test archs", "variants"],
                        help="sections to run (default: all)")
    parser.add_argument("--missing", action="store_true", help="run only the cells coverage.json "
                        "does not have yet (an interrupted sweep, a new method); merged")
    parser.add_argument("--shard", help="I/N: run every N-th row from the I-th (two processes "
                        "on two cores: --shard 0/2 and --shard 1/2, then --combine); writes "
                        "coverage.shardI.json")
    parser.add_argument("--largest-first", action="store_true", help="run the largest models "
                        "first (a second process meeting a small-first one halfway)")
    parser.add_argument("--combine", action="store_true", help="merge the coverage.shard*.json "
                        "files into coverage.json (and delete them), rewrite coverage.md")
    parser.add_argument("--rewrite", action="store_true",
                        help="rewrite coverage.md from coverage.json (no sweep)")
    args = parser.parse_args()
    path = RESULTS / "coverage.json"
    merge = bool(args.methods or args.modules or args.rewrite or args.combine or args.missing
                 or set(args.sections) != {"modules", "test archs", "variants"})
    data = json.loads(path.read_text()) if merge and path.is_file() else dict(rows=[], seconds={})
    if args.combine:
        shards = sorted(RESULTS.glob("coverage.shard*.json"))
        by_label = {r["label"]: r for r in data["rows"]}
        for shard in shards:
            for r in json.loads(shard.read_text())["rows"]:
                old = by_label.setdefault(r["label"], r)
                if old is not r:
                    old.update({k: v for k, v in r.items() if k != "cells"})
                    old["cells"].update(r["cells"])
        data["rows"] = list(by_label.values())
    if args.rewrite or args.combine:
        for r in data["rows"]:  # the family each row's model has now
            r["family"] = get_family(_quiet_create(r["arch"], device="meta",
                                                   **ast.literal_eval(r["kwargs"]))).name
        write(data)
        for shard in shards if args.combine else ():
            shard.unlink()
        return
    shard = None
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        shard = RESULTS / f"coverage.shard{i}.json"
        data = json.loads(shard.read_text()) if merge and shard.is_file() else dict(rows=[])
    methods = args.methods or sweep_methods()
    unknown = [m for m in methods if m not in timm_peft.list_methods()]
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {timm_peft.list_methods()}")
    todo = [r for r in rows(tuple(args.sections)) if not args.modules or r[1] in args.modules]
    if args.modules and len(todo) != len(set(args.modules)):
        parser.error(f"unknown rows {sorted(set(args.modules) - {r[1] for r in todo})}")
    if args.missing:
        have = {r["label"]: set(r["cells"]) for r in data["rows"]}
        todo = [r for r in todo if not set(methods) <= have.get(r[1], set())]
        methods_of = {r[1]: [m for m in methods if m not in have.get(r[1], set())] for r in todo}
    size_of = {arch: n for _, arch, n in _ranked()}
    todo.sort(key=lambda r: size_of.get(r[2], 0),  # small models first: early rows come fast
              reverse=args.largest_first)
    if shard is not None:
        todo = todo[i::n]
    listed = listed_archs(methods)
    by_label = {r["label"]: r for r in data["rows"]}
    for section, label, arch, kwargs, size in todo:
        t0 = time.time()
        if size is None:
            kwargs, size = plan(arch)
        row = by_label.setdefault(label, dict(section=section, label=label, arch=arch, cells={}))
        row.update(section=section, arch=arch, kwargs=repr(kwargs), size=size)
        try:
            row["family"] = get_family(_quiet_create(arch, device="meta", **kwargs)).name
        except Exception as e:  # noqa: BLE001
            row["family"] = "?"
            row["cells"].update({m: ("FAILS", f"base does not build: {e}", arch in listed[m])
                                 for m in methods})
        else:
            for m in (methods_of[label] if args.missing else methods):
                is_listed = arch in listed[m]
                row["cells"][m] = (*check(arch, m, kwargs, size, is_listed), is_listed)
        row["seconds"] = round(time.time() - t0, 1) + (row.get("seconds", 0) if merge else 0)
        if label not in [r["label"] for r in data["rows"]]:
            data["rows"].append(row)
        print(f"{label} ({arch}, {time.time() - t0:.0f}s)",
              {m: row["cells"][m][0] for m in methods}, flush=True)
        bad = [m for m in methods if row["cells"][m][2] != (row["cells"][m][0] == "works")]
        if bad:
            print(f"  LISTED ≠ WORKS: {bad}", flush=True)
        if shard is not None:
            shard.write_text(json.dumps(data, indent=1))
        else:
            write(data)  # after every row: an interrupted sweep says so


def write(data: dict[str, Any]) -> None:
    """Write coverage.json and coverage.md for the rows swept so far."""
    order = {"modules": 0, "test archs": 1, "variants": 2}
    data["rows"].sort(key=lambda r: (order[r["section"]], r["label"] if r["section"] != "variants"
                                     else ""))
    data.update(timm=timm.__version__, torch=torch.__version__,
                seconds=round(sum(r.get("seconds", 0) for r in data["rows"])))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coverage.json").write_text(json.dumps(data, indent=1))
    methods = [m for m in sweep_methods() if any(m in r["cells"] for r in data["rows"])]
    methods += sorted({m for r in data["rows"] for m in r["cells"]} - set(methods))
    n_modules = sum(r["section"] == "modules" for r in data["rows"])
    bad = mismatches(data)
    listed = listed_archs(methods)
    lines = [
        "# Module × method coverage", "",
        f"Generated by `nice -n 10 python -m benchmarks.coverage` (timm {timm.__version__}, "
        f"{data['seconds'] // 60} min wall-clock summed over rows). **Every** timm model module "
        f"(`timm.list_modules()`: {len(timm.list_modules())}) is a row, with its smallest arch "
        "by parameter count (`benchmarks/archs.py`), shrunk where its entrypoint takes depth "
        "arguments and run at a small input size; timm's `test_*` archs follow as a section of "
        "their own, then variants that take other code paths. Columns are every registered "
        "method (the presets that change the surgery included; `full` left out). A cell "
        "*works* when the model builds, forward + backward give every trainable parameter a "
        "gradient, after one optimiser step a saved adapter reloads bit-identical, and the "
        "whole model survives `pickle` and `torch.save`. *refused* is a build-time error "
        "(reason below); *FAILS* is anything else. A cell marked · is an arch "
        "`timm_peft.list_models(method=...)` does not list: every listed cell works and every "
        "working cell is listed (`tests/test_family_coverage.py` checks this file against "
        "`list_models`). Cells of a method added later: `python -m benchmarks.coverage "
        "--methods <name>` (merged into this report); — is a cell not swept yet (`--missing` sweeps exactly those).", "",
        f"Modules swept: {n_modules} of {len(timm.list_modules())}"
        + ("" if n_modules == len(timm.list_modules()) else " (an interrupted sweep: rerun)")
        + f". Listed but not working: {len(bad['listed_failing'])}"
        + (f" ({', '.join(bad['listed_failing'][:10])})" if bad["listed_failing"] else "")
        + f". Working but not listed: {len(bad['working_unlisted'])}"
        + (f" ({', '.join(bad['working_unlisted'][:10])})" if bad["working_unlisted"] else "")
        + "."]
    notes: dict[str, int] = {}
    section = None
    for r in data["rows"]:
        if r["section"] != section:
            section = r["section"]
            lines += ["", f"## {section}", "",
                      "| row (arch) | timm_peft family | " + " | ".join(methods) + " |",
                      "|---|---|" + "---|" * len(methods)]
        cells = []
        for m in methods:
            if m not in r["cells"]:
                cells.append("—")
                continue
            status, detail, _ = r["cells"][m]
            mark = "" if r["arch"] in listed.get(m, ()) else " ·"  # listed now
            if status == "works":
                cells.append("works" + mark)
            else:
                n = notes.setdefault(f"{status}: {detail}", len(notes) + 1)
                cells.append(f"{'refused' if status == 'refused' else '**FAILS**'} [{n}]{mark}")
        lines.append(f"| {r['label']} (`{r['arch']}`) | {r['family']} | " + " | ".join(cells)
                     + " |")
    lines += ["", "Reasons:", ""] + [f"{n}. {k}" for k, n in notes.items()]
    (RESULTS / "coverage.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
