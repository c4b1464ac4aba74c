"""Efficiency of every registered method against its peers and its limit, in one run.

For each arch, every method and preset of the registry that builds on it (a method that refuses
the arch raises ``ValueError`` at build time and is left out; presets identical to another entry
are measured once) is built on the same base and measured next to:

* ``full``: full fine-tuning, the reference of training cost;
* the **frozen-backbone limit**: the plain model with every weight frozen except the head and the
  input requiring grad, so backward computes every activation gradient and no weight gradient:
  what any method that trains something early in the network pays at least;
* **HF peft LoRA** r=8 on ``qkv``, and on every linear of the blocks (``qkv, proj, fc1, fc2``),
  head trained (``modules_to_save``), where the arch has those modules and ``peft`` is installed;
* **variants** of methods with a non-default config (:data:`VARIANTS`): VPT with E²VPT's
  number of visual prompts (the reference of E²VPT's memory), LION's masked solver loop forced in
  eager (no host sync, the full iteration cap: what the default ``solver_loop="auto"`` runs
  under ``torch.compile``).

A preset whose method prunes during training (``e2vpt_prune``) is measured pruned
(:data:`PRUNE`): what it trains after pruning and what it serves.

Measured: trainable parameters, saved adapter bytes, one training step (forward, backward, and
the step of the optimiser the training loop builds, so a method's optimiser hook is included),
inference (eval, no grad; also after ``merge_and_unload`` where it merges), and the peak extra
memory of both. Wall and CPU times are medians over rounds that call every model once each
(interleaved, so load from other processes hits all alike); ratios are medians of the per-round
ratios to full fine-tuning and to the limit (training) or to the plain model (inference).

Devices and modes: on CPU memory is the peak of live tensor storage (``PeakMemory``); on CUDA the
allocator's peak, and times come from CUDA events. ``--amp bf16`` runs forward under autocast;
``--modes eager,compiled`` measures each model eagerly and ``torch.compile``-d (memory of
compiled models is reported on CUDA only: inductor's buffers bypass the CPU tracker), with
``--compile-mode`` (e.g. ``reduce-overhead``: CUDA graphs) and at most ``--compile-timeout``
seconds for an entry's first calls (where it compiles), ``--compile-budget`` for those of all
entries but the references: an entry that takes longer is left out and reported, so a
compiled run cannot hang on one model and ends in a known time (``benchmarks/gpu_check.sh``).

Archs: ``--archs`` takes timm names and the sets of :data:`ARCH_SETS` (``families``: one arch
of each family the report tracks beyond ViT-S and ResNet-50; ``report``: all of them).

Run from the repository root::

    python -m benchmarks.efficiency                              # CPU: vit_small + resnet50
    python -m benchmarks.efficiency --device cuda --amp bf16 --modes eager,compiled \\
        --batch-size 64 --name efficiency_cuda                  # the same table on a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import signal
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

import timm_peft
from timm_peft.io import WEIGHTS_NAME
from timm_peft.train import TrainConfig, create_optimizer

from .common import RESULTS, median_ratio, peak_memory, round_robin_clocks, write_report

NUM_CLASSES = 100
LR = 1e-4
LORA_TARGETS = {"HF peft LoRA r=8 (qkv)": ["qkv"],
                "HF peft LoRA r=8 (qkv, proj, fc1, fc2)": ["qkv", "proj", "fc1", "fc2"]}
LIMIT = "frozen-backbone limit"
#: named sets of archs for ``--archs``
ARCH_SETS: dict[str, tuple[str, ...]] = {
    "default": ("vit_small_patch16_224", "resnet50"),
    "families": ("swin_tiny_patch4_window7_224", "convnext_tiny", "beit_base_patch16_224",
                 "efficientnet_b0", "mobilenetv3_large_100"),
}
ARCH_SETS["report"] = ARCH_SETS["default"] + ARCH_SETS["families"]


def expand_archs(spec: str) -> list[str]:
    """Comma-separated timm archs and :data:`ARCH_SETS` names, in order, without repeats.

    Example:
        >>> expand_archs("resnet50,families")[:3]
        ['resnet50', 'swin_tiny_patch4_window7_224', 'convnext_tiny']
    """
    names = [a for item in spec.split(",") if item for a in ARCH_SETS.get(item, (item,))]
    return list(dict.fromkeys(names))


@dataclass
class Entry:
    """One model to measure and how to train it."""

    model: nn.Module
    kind: str  # "method", "variant", "reference" or "peer"
    optimizer: torch.optim.Optimizer | None = None
    input_grad: bool = False
    adapter_bytes: int | None = None
    merged: nn.Module | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

def _build(arch: str, method: str | None, kwargs: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    name = arch if method is None else f"{arch}.{method}"
    return timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)


def _config_key(name: str, model: nn.Module) -> str:
    """What makes two registry names the same model (``mlp3`` is ``mlp``, ``partial_1`` is
    ``partial``): the method and its config; ``bias``, ``linear`` and ``full`` share a config."""
    cfg = getattr(model, "peft_config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return name
    return json.dumps([model.peft_method, type(cfg).__name__, cfg.to_dict()], sort_keys=True,
                      default=str)


def _timm_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """What the training loop would build for a model it did not adapt: timm's AdamW over the
    trainable parameters (no weight decay on 1-D tensors), the same lr and weight decay."""
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(model, opt="adamw", lr=LR,
                               weight_decay=TrainConfig().weight_decay)


def build_limit(arch: str, kwargs: dict[str, Any]) -> Entry:
    model = _build(arch, None, kwargs)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    return Entry(model, "reference", _timm_optimizer(model), input_grad=True)


def build_lora(arch: str, kwargs: dict[str, Any], targets: list[str],
               skipped: list[str]) -> Entry | None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        skipped.append("HF peft LoRA rows: peft is not installed (pip install peft)")
        return None
    model = _build(arch, None, kwargs)
    head = [n for n, m in model.named_modules() if m is model.get_classifier()]
    size = resolve_data_config(model=model)["input_size"]
    config = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=head)
    try:
        model = get_peft_model(model, config)
    except ValueError as e:  # peft's "target modules not found" is a ValueError
        skipped.append(f"{arch} LoRA on {targets}: {str(e).splitlines()[0][:120]}")
        return None
    idle = _never_called(model, size, [n for n, m in model.named_modules()
                                       if type(m).__module__.startswith("peft.tuners.lora")
                                       and hasattr(m, "lora_A")])
    if idle:  # e.g. timm's BEiT attention calls F.linear on qkv.weight itself
        skipped.append(f"{arch} LoRA on {targets}: peft's LoRA layers never run in the forward "
                       f"({len(idle)}, e.g. {idle[0]}: the model uses their weights directly), so "
                       "the row would measure the plain model")
        return None
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        size = sum(f.stat().st_size for f in Path(d).rglob("*.safetensors"))
    return Entry(model, "peer", _timm_optimizer(model), adapter_bytes=size)


def _never_called(model: nn.Module, input_size: tuple[int, ...], names: list[str]) -> list[str]:
    """Those of the modules ``names`` that one eval forward of a single input does not call."""
    called: set[str] = set()
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: called.add(n)) for n in names]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return [n for n in names if n not in called]


#: label -> (registry name, peft_cfg): methods measured with another config next to their default
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vpt (num_prompts=10)": ("vpt", dict(num_prompts=10)),
    "lion (solver_loop=masked)": ("lion", dict(solver_loop="masked")),
    # ours on HF peft's second setting, so the two LoRAs meet on both
    "lora (qkv, proj, fc1, fc2)": ("lora", dict(target_modules=("qkv", "proj", "fc1", "fc2"))),
}


def prune_e2vpt(model: nn.Module) -> None:
    """Prune with random importance scores at the config's ratios, then compact: the cost of a
    pruned model depends on how many tokens and segments survive, not on which."""
    from timm_peft.methods.e2vpt import E2VPTPrompts, compact, prune
    groups = [m for m in model.modules() if isinstance(m, E2VPTPrompts)]
    g = torch.Generator().manual_seed(0)
    prune(model, [dict(token=torch.rand(p.token_mask.shape, generator=g),
                       segment=torch.rand(p.segment_mask.shape, generator=g)) for p in groups])
    compact(model)


#: registry name -> what makes it the model it is after its training-time pruning
PRUNE: dict[str, Callable[[nn.Module], None]] = {"e2vpt_prune": prune_e2vpt}


def _adapter_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'full' warns that it saves everything
        return (timm_peft.save_pretrained(model, d) / WEIGHTS_NAME).stat().st_size


def _method_entry(name: str, model: nn.Module, with_merged: bool) -> Entry:
    if name in PRUNE:
        PRUNE[name](model)
    entry = Entry(model, "variant" if name in VARIANTS else "method",
                  create_optimizer(model, TrainConfig(opt="adamw", lr=LR)),
                  adapter_bytes=_adapter_bytes(model))
    if with_merged:
        try:
            entry.merged = timm_peft.merge_and_unload(copy.deepcopy(model))
        except (NotImplementedError, ValueError):
            pass
    return entry


def iter_entries(arch: str, names: list[str], kwargs: dict[str, Any], skipped: list[str],
                 with_merged: bool = True) -> Iterator[tuple[str, Entry]]:
    """Every registry name of ``names`` that builds on ``arch`` (one per config; refusals are
    ValueErrors, noted in ``skipped``), ``full``, the :data:`VARIANTS`, the limit and the HF peft
    LoRA peers, built one at a time as they are asked for: a caller that measures an entry and
    drops it holds one model at a time (every entry of BEiT-B at once is about 8 GB of weights)."""
    seen, built = set(), set()
    for name in list(names) + [n for n in ("full",) if n not in names]:
        try:
            model = _build(arch, name, kwargs)
        except ValueError as e:
            skipped.append(f"{arch}.{name}: refused ({str(e).splitlines()[0][:120]})")
            continue
        key = _config_key(name, model)
        if key not in seen:
            seen.add(key)
            built.add(name)
            yield name, _method_entry(name, model, with_merged)
        del model  # not kept alive while the next one is built
    for label, (method, cfg) in VARIANTS.items():
        if method in built:
            yield label, _method_entry(label, _build(arch, method, dict(kwargs, peft_cfg=cfg)),
                                       with_merged)
    yield LIMIT, build_limit(arch, kwargs)
    for label, targets in LORA_TARGETS.items():
        lora = build_lora(arch, kwargs, targets, skipped)
        if lora is not None:
            yield label, lora


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------

def _autocast(device: torch.device, amp: str | None) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _train_step(entry: Entry, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                y: torch.Tensor, device: torch.device, amp: str | None) -> Callable[[], None]:
    model, opt = entry.model, entry.optimizer

    def step() -> None:
        model.train()
        xi = x.detach().requires_grad_() if entry.input_grad else x
        with _autocast(device, amp):
            loss = F.cross_entropy(forward(xi).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _infer(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
           device: torch.device, amp: str | None) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad(), _autocast(device, amp):
            forward(x)
    return run


def _forward(model: nn.Module, mode: str,
             compile_mode: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.compile(model, mode=compile_mode) if mode == "compiled" else model


@contextlib.contextmanager
def _deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Raise ``TimeoutError`` in the block after ``seconds`` (SIGALRM; no cap without it, or
    off the main thread, or for ``None``/0)."""
    usable = (seconds and hasattr(signal, "SIGALRM")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(*_: Any) -> None:
        raise TimeoutError(f"{what} took more than {seconds:g} s (--compile-timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _drop_failing(arch: str, mode: str, entries: dict[str, Entry],
                  train_fns: dict[str, Callable[[], None]],
                  infer_fns: dict[str, Callable[[], None]], skipped: list[str],
                  timeout: float | None = None, budget: float | None = None) -> None:
    """Run every call once; an entry whose training step or inference raises, or whose first
    calls together take more than ``timeout`` seconds (compiled mode: the compilation), is left
    out of the timing and reported (with the error) among the left-out rows, so one failure on a
    device does not cost the whole table. The references run first (each within ``timeout``);
    ``budget`` then caps the seconds of all other entries' first calls together, and entries
    left when it is spent are left out. A failing reference (full, the limit, the plain model)
    raises."""
    start = None

    def cap(reference: bool) -> float | None:
        nonlocal start
        if reference or not budget:
            return timeout or None
        start = time.perf_counter() if start is None else start
        left = budget - (time.perf_counter() - start)
        return left if not timeout else min(timeout, left)

    with _deadline(cap(True), f"{arch}: the plain model's first call"):
        infer_fns["plain"]()
    for k in sorted(entries, key=lambda k: k not in ("full", LIMIT)):  # references first
        fns = (train_fns[k], infer_fns[k], infer_fns.get(f"{k} (merged)"))
        try:
            seconds = cap(k in ("full", LIMIT))
            if seconds is not None and seconds <= 0:
                raise TimeoutError(f"not tried: the --compile-budget of {budget:g} s is spent")
            with _deadline(seconds, f"{arch}.{k}: the first calls"):
                for fn in fns:
                    if fn is not None:
                        fn()
        except Exception as err:  # noqa: BLE001 - reported in the table's notes
            if k in ("full", LIMIT):
                raise
            first = (str(err).splitlines() or [""])[0][:200]
            skipped.append(f"{arch}.{k} [{mode}] FAILED: {type(err).__name__}: {first}")
            del entries[k], train_fns[k], infer_fns[k]
            infer_fns.pop(f"{k} (merged)", None)


def saved_activation_bytes(entry: Entry, x: torch.Tensor, y: torch.Tensor,
                           device: torch.device, amp: str | None) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward of
    ``entry`` (``saved_tensors_hooks``; the model's parameters and buffers, the input and the
    labels are not activations and are left out). Deterministic: the same on a loaded machine
    as on a quiet one.
    """
    model = entry.model
    skip = {t.untyped_storage().data_ptr()
            for t in (*model.parameters(), *model.buffers(), x, y)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        # not ``t`` itself: a saved output would hold its own grad_fn, a cycle no collector
        # frees (every call leaked what it saved); the detached view keeps the same storage
        return t.detach()
    model.train()
    xi = x.detach().requires_grad_() if entry.input_grad else x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(device, amp):
        loss = F.cross_entropy(model(xi).float(), y)
    del loss  # the graph, and what it saved, go with it
    return sum(saved.values())


def measure_saved(arch: str, names: list[str], args: argparse.Namespace,
                  skipped: list[str]) -> list[dict[str, Any]]:
    """``--saved-bytes``: one row per entry with its saved-activation bytes
    (:func:`saved_activation_bytes`) and their ratio to the limit's; no timing."""
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = y = None
    kinds, saved = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, e in iter_entries(arch, names, args.model_kwargs, skipped, with_merged=False):
            if x is None:  # every entry is the same arch: one input for all
                size = resolve_data_config(model=e.model)["input_size"]
                if args.input_size:
                    size = (size[0], args.input_size, args.input_size)
                x = torch.randn(args.batch_size, *size, generator=g).to(device)
                y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g).to(device)
            e.model.to(device)
            kinds[k], saved[k] = e.kind, saved_activation_bytes(e, x, y, device, args.amp)
            del e  # the next one is built only now
    return [dict(arch=arch, method=k, kind=kinds[k], saved_MiB=v / 2 ** 20,
                 saved_vs_limit=v / saved[LIMIT], saved_vs_full=v / saved["full"])
            for k, v in saved.items()]


def measure(arch: str, names: list[str], args: argparse.Namespace, mode: str,
            skipped: list[str]) -> list[dict[str, Any]]:
    """One row per entry (and one for the plain model) on ``arch`` in ``mode``."""
    device = torch.device(args.device)
    kwargs = args.model_kwargs
    plain = _build(arch, None, kwargs).to(device)
    entries = dict(iter_entries(arch, names, kwargs, skipped))
    for e in entries.values():
        e.model.to(device)
        if e.merged is not None:
            e.merged.to(device)
    input_size = resolve_data_config(model=plain)["input_size"]
    if args.input_size:
        input_size = (input_size[0], args.input_size, args.input_size)
    x = torch.randn(args.batch_size, *input_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)

    cmode = args.compile_mode
    train_fns = {k: _train_step(e, _forward(e.model, mode, cmode), x, y, device, args.amp)
                 for k, e in entries.items()}
    infer_fns = {"plain": _infer(plain, _forward(plain, mode, cmode), x, device, args.amp)}
    infer_fns.update({k: _infer(e.model, _forward(e.model, mode, cmode), x, device, args.amp)
                      for k, e in entries.items()})
    infer_fns.update({f"{k} (merged)": _infer(e.merged, _forward(e.merged, mode, cmode), x,
                                              device, args.amp)
                      for k, e in entries.items() if e.merged is not None})
    compiled = mode == "compiled"
    _drop_failing(arch, mode, entries, train_fns, infer_fns, skipped,
                  timeout=args.compile_timeout if compiled else None,
                  budget=args.compile_budget if compiled else None)
    print(f"{arch} [{mode}]: timing {len(train_fns)} training steps and {len(infer_fns)} "
          f"inferences (batch {args.batch_size}, {tuple(input_size)}, {args.reps} rounds)",
          flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. DEQ convergence warnings of random weights
        tw_train, tc_train = round_robin_clocks(train_fns, args.warmup, args.reps, device)
        tw_infer, tc_infer = round_robin_clocks(infer_fns, args.warmup, args.reps, device)
        track = device.type == "cuda" or mode == "eager"
        mem_train = {k: peak_memory(fn, device) if track else None for k, fn in train_fns.items()}
        mem_infer = {k: peak_memory(fn, device) if track else None for k, fn in infer_fns.items()
                     if "(merged)" not in k}

    def mib(v: int | None) -> Any:
        return "-" if v is None else v / 2 ** 20

    def mem_ratio(a: int | None, b: int | None) -> Any:
        return "-" if a is None or not b else a / b

    total = sum(p.numel() for p in plain.parameters())
    full_bytes = entries["full"].adapter_bytes
    base = dict(arch=arch, mode=mode)
    rows = [dict(base, method="plain timm model", kind="reference", trainable=total, **{
        "trainable_%": 100.0, "adapter_KiB": "-", "adapter_vs_full": "-",
        # its training step is full fine-tuning's (the next rows): one reference for each
        **dict.fromkeys(["train_ms", "train_vs_full", "train_cpu_vs_full", "train_vs_limit",
                         "train_cpu_vs_limit", "train_MiB", "train_mem_vs_full",
                         "train_mem_vs_limit"], "-"),
        "infer_ms": 1e3 * statistics.median(tw_infer["plain"]), "infer_vs_plain": 1.0,
        "infer_cpu_vs_plain": 1.0, "merged_infer_vs_plain": "-",
        "infer_MiB": mib(mem_infer["plain"]), "infer_mem_vs_plain": 1.0})]
    for k, e in entries.items():
        trainable = sum(p.numel() for p in e.model.parameters() if p.requires_grad)
        row = dict(base, method=k, kind=e.kind, trainable=trainable, **{
            "trainable_%": 100 * trainable / total,
            "adapter_KiB": "-" if e.adapter_bytes is None else e.adapter_bytes / 1024,
            "adapter_vs_full": "-" if e.adapter_bytes is None else e.adapter_bytes / full_bytes,
            "train_ms": 1e3 * statistics.median(tw_train[k]),
            "train_vs_full": median_ratio(tw_train, k, "full"),
            "train_cpu_vs_full": median_ratio(tc_train, k, "full"),
            "train_vs_limit": median_ratio(tw_train, k, LIMIT),
            "train_cpu_vs_limit": median_ratio(tc_train, k, LIMIT),
            "train_MiB": mib(mem_train[k]),
            "train_mem_vs_full": mem_ratio(mem_train[k], mem_train["full"]),
            "train_mem_vs_limit": mem_ratio(mem_train[k], mem_train[LIMIT]),
            "infer_ms": 1e3 * statistics.median(tw_infer[k]),
            "infer_vs_plain": median_ratio(tw_infer, k, "plain"),
            "infer_cpu_vs_plain": median_ratio(tc_infer, k, "plain"),
            "merged_infer_vs_plain": (median_ratio(tw_infer, f"{k} (merged)", "plain")
                                      if f"{k} (merged)" in tw_infer else "-"),
            "infer_MiB": mib(mem_infer[k]),
            "infer_mem_vs_plain": mem_ratio(mem_infer[k], mem_infer["plain"])})
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Training step time vs peak training memory, both relative to full fine-tuning, one panel
    per (arch, mode); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = list(dict.fromkeys((r["arch"], r["mode"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
    markers = {"method": "o", "reference": "s", "peer": "^", "variant": "D"}
    for ax, (arch, mode) in zip(axes[0], panels):
        for r in rows:
            if (r["arch"], r["mode"]) != (arch, mode) or not isinstance(
                    r.get("train_mem_vs_full"), float):
                continue
            ax.scatter(r["train_mem_vs_full"], r["train_cpu_vs_full"],
                       marker=markers.get(r["kind"], "o"), s=40)
            ax.annotate(r["method"], (r["train_mem_vs_full"], r["train_cpu_vs_full"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("peak training memory / full fine-tuning")
        ax.set_ylabel("training step CPU time / full fine-tuning")
        ax.set_title(f"{arch} ({mode}); ■ references, ▲ HF peft, ◆ variants", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vit_small_patch16_224,resnet50",
                        help="comma-separated timm archs (each at its default input size) and "
                             f"sets of them: {', '.join(ARCH_SETS)}")
    parser.add_argument("--methods", default="all",
                        help="comma-separated registry names; 'all': every method and preset")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='JSON kwargs of create_model, e.g. \'{"img_size": 32, "depth": 2}\'')
    parser.add_argument("--input-size", type=int, default=None,
                        help="square input size (default: each arch's pretrained_cfg)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                        help="forward under torch.autocast with this dtype")
    parser.add_argument("--modes", default="eager", help="comma-separated: eager, compiled")
    parser.add_argument("--compile-mode", default=None,
                        choices=("default", "reduce-overhead", "max-autotune"),
                        help="torch.compile mode of --modes compiled (reduce-overhead: CUDA "
                             "graphs)")
    parser.add_argument("--compile-timeout", type=float, default=300.0,
                        help="seconds an entry's first calls may take in compiled mode (where "
                             "it compiles); a slower entry is left out and reported (0: no cap)")
    parser.add_argument("--compile-budget", type=float, default=0.0,
                        help="seconds the first calls of one arch's entries other than the "
                             "references may take together in compiled mode; entries left when "
                             "it is spent are left out and reported (0: no cap)")
    parser.add_argument("--name", default="efficiency", help="report name under results/")
    parser.add_argument("--saved-bytes", action="store_true",
                        help="measure only the exact saved-activation bytes of one training "
                             "forward (saved_tensors_hooks, distinct storages), no timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    if not set(modes) <= {"eager", "compiled"}:
        parser.error(f"--modes must be eager and/or compiled, got {args.modes}")
    names = timm_peft.list_methods() if args.methods == "all" else args.methods.split(",")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    runs = [(arch, mode) for arch in expand_archs(args.archs) for mode in modes]
    for i, (arch, mode) in enumerate(runs):
        if args.saved_bytes:
            if mode != modes[0]:
                continue
            rows += measure_saved(arch, names, args, skipped)
            path = write_report(args.name, "Saved-activation bytes per training step",
                                _command(parser, args), rows,
                                ("**Partial.** " if i + 1 < len(runs) else "")
                                + f"Batch {args.batch_size}; exact bytes of the distinct "
                                "storages autograd saves in one training forward "
                                "(saved_tensors_hooks; parameters, buffers and the input left "
                                "out), as ratios to the frozen-backbone limit and to full "
                                "fine-tuning. " + (f"Left out: {'; '.join(skipped)}." if skipped
                                                   else ""))
            continue
        rows += measure(arch, names, args, mode, skipped)
        # written after every arch, so a long run that is stopped keeps what it measured
        path = report(parser, args, modes, rows, skipped, time.perf_counter() - start,
                      partial=i + 1 < len(runs))
    print(path.read_text())


def _command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    return "python -m benchmarks.efficiency" + "".join(
        f" --{k.replace('_', '-')}" + ("" if v is True else
                                        f" {repr(json.dumps(v)) if isinstance(v, dict) else v}")
        for k, v in vars(args).items()
        if v != parser.get_default(k))


def report(parser: argparse.ArgumentParser, args: argparse.Namespace, modes: list[str],
           rows: list[dict[str, Any]], skipped: list[str], seconds: float,
           partial: bool) -> Path:
    """Write ``results/<name>.md``/``.json`` (and the plot) for the rows measured so far."""
    command = _command(parser, args)
    figure = plot(rows, RESULTS / f"{args.name}.svg")
    device = torch.device(args.device)
    notes = (
        ("**Partial: the run is still going (or was stopped); the archs measured so far.** "
         if partial else "")
        + f"Device {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", modes {', '.join(modes)}, autocast {args.amp or 'off'}, "
        f"{torch.get_num_threads()} CPU thread(s). "
        f"{NUM_CLASSES}-class head, batch {args.batch_size}, random inputs at "
        + (f"{args.input_size}x{args.input_size}" if args.input_size
           else "each arch's default input size")
        + (f", models built with {json.dumps(args.model_kwargs)}" if args.model_kwargs else "")
        + "; "
        f"{args.reps} rounds that call every model once, after {args.warmup} warm-up call(s): "
        "times are medians, ratios the median of the ratios within a round. `*_cpu_*` ratios use "
        "the process CPU time (all threads of this process, none of the others): on a machine "
        "shared with other processes they are steadier than the wall-clock ratios next to them. "
        "`train_*`: forward + backward + AdamW step (for methods, of the optimiser the training "
        "loop builds, with the method's optimiser hook; for the limit and LoRA, timm's AdamW over "
        "the trainable parameters, same lr and weight decay), as ratios to full fine-tuning "
        f"(`_vs_full`) and to the **{LIMIT}** (`_vs_limit`: the plain model, every weight frozen "
        "except the head, the input requiring grad, so backward computes all activation "
        "gradients and no weight gradient). `infer_*`: eval-mode forward without grad, ratio to "
        "the plain timm model; `merged_infer_vs_plain` after `merge_and_unload`. `*_MiB`: peak "
        "extra memory of the call (CPU: live tensor storage created during it; CUDA: the "
        "allocator's peak; weights and optimiser state exist before and are not counted; "
        "'-': compiled on CPU, not tracked). `adapter_KiB`: `adapter_model.safetensors` (for "
        "`full` the whole model; LoRA: peft's `save_pretrained`). `kind`: `variant` rows are "
        "methods built with a non-default `peft_cfg` (the label says which); `e2vpt_prune` is "
        "measured after pruning (random scores at its ratios, compacted). Methods whose inference is the "
        "plain model's (`linear`, `bias`, `partial`, `full`, merged models) show the noise level. "
        + (f"Left out: {'; '.join(skipped)}. " if skipped else "")
        + (f"Plot: `{figure.name}` (training CPU time vs memory, relative to full). "
           if figure else "Plot skipped: matplotlib is not installed. ")
        + f"Total time {seconds:.0f} s.")
    return write_report(args.name, "Efficiency of every registered method, its peers and its "
                        "limit", command, rows, notes)


if __name__ == "__main__":
    main()
