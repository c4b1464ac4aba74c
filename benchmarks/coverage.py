"""Family × method coverage: one tiny model per timm family, every method, what works.

For every cell the model is built with the method (``timm.create_model("<arch>.<method>")``)
and checked: forward + backward, every trainable parameter gets a gradient, ``save_pretrained``
→ ``load_adapter`` into a fresh build gives bit-identical outputs, and ``pickle`` /
``torch.save`` of the whole model round-trips. A method that refuses the model at build time
is recorded with its reason; anything else that goes wrong is a failure.

Run: ``python -m benchmarks.coverage`` (CPU, a few minutes); writes
``benchmarks/results/coverage.md`` and ``coverage.json``.
"""
from __future__ import annotations

import argparse
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
from timm_peft.families import FamilyCapabilityError, get_family

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("ssf", "vpt", "vpt_shallow", "e2vpt", "partial", "lion", "bias", "linear")
NUM_CLASSES = 3

#: (label, arch, create_model kwargs, input size): the smallest member of each timm family,
#: shrunk where its entrypoint takes size arguments
TINY_VIT = dict(img_size=32, depth=2, embed_dim=32, num_heads=2)
MODELS: list[tuple[str, str, dict[str, Any], int]] = [
    ("vit", "vit_tiny_patch16_224", TINY_VIT, 32),
    ("vit (reg tokens, avg pool)", "vit_tiny_patch16_224",
     dict(TINY_VIT, reg_tokens=2, class_token=False, global_pool="avg"), 32),
    ("vit (parallel blocks)", "vit_small_patch16_18x2_224", dict(TINY_VIT), 32),
    ("vit (parallel scaling blocks)", "vit_base_patch16_xp_224", dict(TINY_VIT), 32),
    ("deit (distilled)", "deit_tiny_distilled_patch16_224", dict(TINY_VIT), 32),
    ("deit3", "deit3_small_patch16_224", dict(TINY_VIT), 32),
    ("vit_hybrid", "vit_tiny_r_s16_p8_224", dict(img_size=64, depth=1), 64),
    ("eva02", "eva02_tiny_patch14_224", dict(img_size=28, depth=2), 28),
    ("beitv2", "beitv2_base_patch16_224", dict(img_size=32, depth=2, embed_dim=32, num_heads=2), 32),
    ("cait", "cait_xxs24_224", dict(img_size=32, depth=2), 32),
    ("xcit", "xcit_nano_12_p16_224", dict(img_size=32, depth=2), 32),
    ("swin", "swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=16, depths=(1, 1),
                                                  num_heads=(2, 4), window_size=4), 32),
    ("swinv2", "swinv2_tiny_window8_256", dict(img_size=32, embed_dim=16, depths=(1, 1),
                                               num_heads=(2, 4), window_size=4), 32),
    ("maxvit", "maxvit_nano_rw_256", dict(img_size=64), 64),
    ("coatnet", "coatnet_nano_rw_224", dict(img_size=64), 64),
    ("pvt_v2", "pvt_v2_b0", {}, 64),
    ("davit", "davit_tiny", dict(depths=(1, 1, 1, 1)), 64),
    ("focalnet", "focalnet_tiny_srf", {}, 64),
    ("hiera", "hiera_tiny_224", dict(img_size=64), 64),
    ("fastvit", "fastvit_t8", {}, 64),
    ("edgenext", "edgenext_xx_small", {}, 64),
    ("levit", "levit_128s", dict(img_size=64), 64),
    ("efficientformer", "efficientformer_l1", {}, 224),  # attention biases fixed to 224 px
    ("volo", "volo_d1_224", dict(img_size=64), 64),
    ("crossvit", "crossvit_tiny_240", dict(img_size=240), 240),
    ("mlp_mixer", "mixer_s32_224", dict(img_size=64), 64),
    ("convnext", "convnext_atto", {}, 64),
    ("convnextv2", "convnextv2_atto", {}, 64),
    ("resnet", "resnet10t", {}, 64),
    ("resnetv2 (BiT)", "resnetv2_50x1_bit", {}, 64),
    ("efficientnet", "efficientnet_b0", {}, 64),
    ("mobilenetv3", "mobilenetv3_small_050", {}, 64),
    ("mobilenetv4", "mobilenetv4_conv_small", {}, 64),
    ("regnet", "regnetx_002", {}, 64),
    ("dla", "dla34", {}, 64),
    ("tresnet", "tresnet_m", {}, 64),
    ("dpn", "dpn48b", {}, 64),
    ("densenet", "densenet121", {}, 64),
    ("ghostnet", "ghostnet_050", {}, 64),
    ("rexnet", "rexnet_100", {}, 64),
    ("vgg", "vgg11", {}, 64),
    ("cspnet", "cspresnet50", {}, 64),
    ("nfnet", "nf_resnet26", {}, 64),
]


def _build(arch: str, method: str, kwargs: dict[str, Any], size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    # pixel prompts are made for one input size: the sweep's (token prompts ignore it)
    cfg = dict(img_size=size) if method in ("vpt", "vpt_shallow") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(f"{arch}.{method}", num_classes=NUM_CLASSES, peft_cfg=cfg,
                                 **kwargs)


def check(arch: str, method: str, kwargs: dict[str, Any], size: int) -> tuple[str, str]:
    """``("works" | "refused" | "FAILS", detail)`` for one cell."""
    try:
        model = _build(arch, method, kwargs, size)
    except (FamilyCapabilityError, ValueError, TypeError, NotImplementedError) as e:
        return "refused", str(e).split("; see timm_peft.list_models")[0]
    stage = "forward/backward"
    try:
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        model.train()
        out = model(x)
        F.cross_entropy(out, torch.arange(2) % NUM_CLASSES).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            return "FAILS", f"no gradient for {missing[:3]}"
        model.eval()
        with torch.no_grad():
            ref = model(x)
        stage = "save/load"
        with tempfile.TemporaryDirectory() as tmp:
            timm_peft.save_pretrained(model, Path(tmp) / "a")
            fresh = _build(arch, method, kwargs, size)
            timm_peft.load_adapter(fresh, Path(tmp) / "a")
            with torch.no_grad():
                if not torch.equal(fresh.eval()(x), ref):
                    return "FAILS", "reloaded adapter differs"
        stage = "pickle"
        for clone in (pickle.loads(pickle.dumps(model)), _torch_roundtrip(model)):
            with torch.no_grad():
                if not torch.equal(clone.eval()(x), ref):
                    return "FAILS", "pickled model differs"
    except Exception as e:  # noqa: BLE001  (a sweep records every failure)
        msg = re.sub(r"/tmp/[^/\s]+/", "<tmp>/", str(e).splitlines()[0])  # one note per cause
        return "FAILS", f"{stage}: {type(e).__name__}: {msg[:200]}"
    return "works", ""


def _torch_roundtrip(model: torch.nn.Module) -> torch.nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


#: per method, the archs timm_peft.list_models lists (a cell records whether its arch is one)
LISTED = {m: {n.rsplit(".", 1)[0] for n in timm_peft.list_models(method=m)} for m in METHODS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="labels to run (default: all)")
    parser.add_argument("--rewrite", action="store_true",
                        help="rewrite coverage.md from coverage.json (no sweep)")
    args = parser.parse_args()
    if args.rewrite:
        data = json.loads((RESULTS / "coverage.json").read_text())
        for r in data["rows"]:
            for m, cell in r["cells"].items():
                cell[1] = re.sub(r"/tmp/[^/\s]+/", "<tmp>/", cell[1])
        write(data["rows"], len(MODELS), data["seconds"])
        return
    rows = []
    t0 = time.time()
    for label, arch, kwargs, size in MODELS:
        if args.only and label not in args.only:
            continue
        try:
            family = get_family(timm.create_model(arch, device="meta", **kwargs)).name
        except Exception as e:  # noqa: BLE001
            rows.append(dict(label=label, arch=arch, family="?", cells={
                m: ("FAILS", f"base does not build: {e}", arch in LISTED[m]) for m in METHODS}))
            continue
        cells = {m: check(arch, m, kwargs, size) for m in METHODS}
        cells = {m: (*c, arch in LISTED[m]) for m, c in cells.items()}
        rows.append(dict(label=label, arch=arch, family=family, cells=cells))
        print(label, {m: c[0] for m, c in cells.items()}, flush=True)
        bad = [m for m, c in cells.items() if c[2] and c[0] != "works"]
        if bad:
            print(f"  LISTED BUT NOT WORKING: {bad}", flush=True)
        if args.only:  # a partial rerun replaces its rows in the last full sweep
            old = json.loads((RESULTS / "coverage.json").read_text())["rows"]
            done = {r["label"]: r for r in rows}
            write([done.get(r["label"], r) for r in old], len(MODELS), time.time() - t0)
        else:
            write(rows, len(MODELS), time.time() - t0)  # after every row: an interrupted sweep says so


def write(rows: list[dict[str, Any]], total: int, seconds: float) -> None:
    """Write coverage.json and coverage.md for the rows swept so far."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coverage.json").write_text(json.dumps(dict(
        timm=timm.__version__, torch=torch.__version__, seconds=round(seconds),
        rows=rows), indent=1))
    lines = ["# Family × method coverage", "",
             "Generated by `python -m benchmarks.coverage` (timm " + timm.__version__ + "). One "
             "tiny model per timm family; a cell *works* when the model builds, forward + backward "
             "give every trainable parameter a gradient, a saved adapter reloads bit-identical "
             "and the whole model survives `pickle` and `torch.save`. *refused* is a build-time "
             "error (reason below); *FAILS* is anything else. A cell marked · is an arch "
             "`timm_peft.list_models(method=...)` does not list (its family does not promise the "
             "method; the build may still work); every listed cell must work.", "",
             f"Families swept: {len(rows)} of {total}"
             + ("" if len(rows) == total else " (an interrupted sweep: rerun for the rest)")
             + ".", "",
             "| family (arch) | timm_peft family | " + " | ".join(METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    notes: dict[str, int] = {}
    for r in rows:
        cells = []
        for m in METHODS:
            status, detail, listed = r["cells"][m]
            mark = "" if listed else " ·"
            if status == "works":
                cells.append("works" + mark)
            else:
                key = f"{status}: {detail}"
                n = notes.setdefault(key, len(notes) + 1)
                cells.append(f"{'refused' if status == 'refused' else '**FAILS**'} [{n}]{mark}")
        lines.append(f"| {r['label']} (`{r['arch']}`) | {r['family']} | " + " | ".join(cells) + " |")
    lines += ["", "Reasons:", ""] + [f"{n}. {k}" for k, n in notes.items()]
    (RESULTS / "coverage.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
