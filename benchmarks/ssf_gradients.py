"""SSF's fused training paths against plain autograd, on the smallest arch of every timm module.

SSF trains through memory-saving paths (:mod:`timm_peft.ops`: outputs saved instead of inputs,
γ and β folded into a Linear's matmul, residual adds moved into a branch's last Linear, saved
outputs kept safe from in-place writes by :class:`~timm_peft.ops.SavedOutput`). This sweep
checks that they compute what plain autograd computes, whatever code follows a site: for every
module of ``timm.list_modules()`` (its smallest arch, :func:`benchmarks.archs.smallest_archs`)
that builds with SSF, one training-mode forward and backward of the SSF model against a copy
whose every scale-shift is the plain formula ``x * γ + β`` (:meth:`ScaleShift.vmap_context`'s
path) and whose blocks and attentions run timm's own forward (no moved residual adds, no
attention from the saved ``qkv``), from the same seed: the logits and the gradient of every trainable tensor must agree.

Run: ``nice python -m benchmarks.ssf_gradients`` (all modules, ~20 min on one core); writes
``benchmarks/results/ssf_gradients.md`` and ``.json``. ``tests/test_ssf_gradients.py`` runs
:func:`compare` on a fast subset of shrunk models.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from typing import Any

import timm
import torch
from torch import nn

import timm_peft
from timm_peft.layers.scale_shift import ResidualIntoBranch, ScaleShift
from timm_peft.families import get_family
from timm_peft.layers.swap import restore_class, restore_classes

from .common import RESULTS, write_report

NUM_CLASSES = 3
#: tolerance of the gradient comparison, relative to the largest entry of each gradient:
#: float32 reductions in another order (the fused backward sums γ's gradient in one kernel)
RTOL = 2e-3
#: the same in float64, the arbiter when float32 disagrees: a deep random-init network (BatchNorm
#: at its init statistics, no trained scale) amplifies float32 rounding past RTOL; in float64
#: the fused and plain paths agree to ~1e-10 unless one of them is wrong
RTOL_FLOAT64 = 1e-7
#: smallest scale a gradient is compared at, relative to the model's largest gradient entry
FLOOR = 1e-3


def plain_reference(model: nn.Module) -> nn.Module:
    """A copy of an SSF ``model`` computing the same function with plain autograd: every
    scale-shift ``x * γ + β`` (its ``vmap_context`` path, γ not folded into a Linear) and every
    block and attention its timm forward (:class:`ResidualIntoBranch` and the family's
    ``ssf_attention`` mixins taken out)."""
    ref = copy.deepcopy(model)
    restore_classes(ref, ResidualIntoBranch)
    for attn, mixin in get_family(ref).ssf_attention(ref):
        restore_class(attn, mixin)
    for m in ref.modules():
        if isinstance(m, ScaleShift):
            m.__dict__["_plain"] = True
    return ref


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """γ, β away from 1, 0 (the identity init would hide a wrong γ gradient's ``x`` term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ScaleShift):
                m.scale.copy_(1 + 0.2 * torch.randn(m.scale.shape, generator=g))
                if m.shift is not None:
                    m.shift.copy_(0.2 * torch.randn(m.shift.shape, generator=g))


def _step(model: nn.Module, x: torch.Tensor, probe: torch.Tensor
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    torch.manual_seed(1)  # the same dropout / drop-path draws in both models
    out = model(x)
    if isinstance(out, (tuple, list)):  # distilled models in training: (logits, dist logits)
        out = sum(o.float() for o in out)
    (out.float() * probe).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def compare(arch: str, input_size: int | None = None, batch_size: int = 2,
            dtype: torch.dtype = torch.float32, **kwargs: Any) -> dict[str, Any]:
    """Build ``arch.ssf`` (random weights), run one training step of it and of its
    :func:`plain_reference`, and return the largest deviations: ``out_err`` (logits) and
    ``grad_err`` (over every trainable tensor, relative to that gradient's largest entry or
    :data:`FLOOR` of the model's largest, whichever is larger), the
    number of sites and trainable tensors, and ``missing``: trainable tensors that got no
    gradient in one model but one in the other. Raises what the build raises."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(f"{arch}.ssf", num_classes=NUM_CLASSES, **kwargs)
    _randomise(model)
    model.to(dtype)
    ref = plain_reference(model)
    size = input_size or timm.data.resolve_data_config(model=model)["input_size"][-1]
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(2)).to(dtype)
    probe = torch.randn(batch_size, NUM_CLASSES, generator=torch.Generator().manual_seed(3)).to(dtype)
    out, grads = _step(model, x, probe)
    out_ref, grads_ref = _step(ref, x, probe)
    missing = sorted(set(n for n, g in grads.items() if g is not None)
                     ^ set(n for n, g in grads_ref.items() if g is not None))
    # relative to each gradient's largest entry, floored at FLOOR of the model's largest one:
    # a gradient that is zero in exact arithmetic (a shift before a softmax, which ignores
    # constants) is rounding noise in both
    top = max((r.abs().max().item() for r in grads_ref.values() if r is not None), default=0.0)
    grad_err = 0.0
    for n, g in grads.items():
        r = grads_ref.get(n)
        if g is None or r is None:
            continue
        denom = max(r.abs().max().item(), FLOOR * top, 1e-30)
        grad_err = max(grad_err, (g - r).abs().max().item() / denom)
    scale = out_ref.abs().max().clamp_min(1e-12)
    return dict(arch=arch, sites=sum(isinstance(m, ScaleShift) for m in model.modules()),
                trainable=len(grads), out_err=((out - out_ref).abs().max() / scale).item(),
                grad_err=grad_err, missing=missing)


def main() -> None:
    from .archs import smallest_archs
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default="all", help="comma-separated timm modules")
    parser.add_argument("--name", default="ssf_gradients")
    args = parser.parse_args()
    archs = smallest_archs()
    if args.modules != "all":
        archs = {m: archs[m] for m in args.modules.split(",")}
    rows, start = [], time.perf_counter()
    done = RESULTS / f"{args.name}.json"
    if args.modules != "all" and done.exists():  # a subset rerun replaces its rows in the report
        rows = [r for r in json.loads(done.read_text())["rows"] if r["module"] not in archs]
    for module, arch in archs.items():
        t0 = time.perf_counter()
        row: dict[str, Any] = dict(module=module, arch=arch)
        try:
            res = compare(arch)
        except (ValueError, NotImplementedError) as e:  # refused at build time
            row.update(result="refused", detail=str(e).splitlines()[0][:140])
        except Exception as e:  # noqa: BLE001 - a failure of a fused path is what we look for
            row.update(result="FAILED", detail=f"{type(e).__name__}: "
                                              f"{(str(e).splitlines() or [''])[0][:200]}")
        else:
            ok = res["grad_err"] <= RTOL and res["out_err"] <= RTOL and not res["missing"]
            row.update(result="ok" if ok else "MISMATCH", sites=res["sites"],
                       trainable=res["trainable"], out_err=f"{res['out_err']:.1e}",
                       grad_err=f"{res['grad_err']:.1e}",
                       detail=", ".join(res["missing"][:3]))
            if not ok and not res["missing"]:  # rounding or a wrong path: float64 tells
                r64 = compare(arch, dtype=torch.float64)
                if max(r64["grad_err"], r64["out_err"]) <= RTOL_FLOAT64 and not r64["missing"]:
                    row.update(result="ok", detail=(
                        f"float32 rounding: in float64 out_err {r64['out_err']:.0e}, grad_err "
                        f"{r64['grad_err']:.0e}"))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(row, flush=True)
        report(args, rows, time.perf_counter() - start,
               partial=len(rows) < len(smallest_archs()))
    print(report(args, rows, time.perf_counter() - start, partial=False).read_text())


def report(args: argparse.Namespace, rows: list[dict[str, Any]], seconds: float,
           partial: bool) -> Any:
    """Write ``results/<name>.md``/``.json`` for the modules checked so far."""
    counts = {k: sum(r["result"] == k for r in rows) for k in ("ok", "refused", "MISMATCH",
                                                                 "FAILED")}
    notes = (f"{len(rows)} timm modules (timm {timm.__version__}), the smallest arch of each, "
             f"random weights, batch 2 at its default input size, training mode. Fused SSF "
             f"against plain autograd (every scale-shift `x * γ + β`, timm's block forwards): "
             f"`out_err` and `grad_err` are the largest deviations of the logits and of any "
             f"trainable tensor's gradient, relative to its largest entry (at least {FLOOR:g} of "
             f"the model's largest gradient entry); ok when both are "
             f"≤ {RTOL:g} and the same tensors get gradients, or where float32 disagrees, when "
             f"the same comparison in float64 agrees to {RTOL_FLOAT64:g} (the detail says so: "
             f"float32 rounding amplified by a deep random-init network, not a wrong path). "
             + ", ".join(f"{v} {k}" for k, v in counts.items())
             + f". Total {seconds:.0f} s.")
    return write_report(args.name, "SSF's fused training paths against plain autograd, every "
                        "timm module", "python -m benchmarks.ssf_gradients"
                        + ("" if args.modules == "all" else f" --modules {args.modules} (the "
                                                              "other rows: an earlier full run)"),
                        rows, ("**Partial: the run is still going (or was stopped).** "
                               if partial else "") + notes)


if __name__ == "__main__":
    main()
