"""Serving many tasks from one backbone: memory, mixed-batch throughput and switching latency.

For each method, one frozen ``vit_small_patch16_224`` carries ``--adapters`` named adapters
(heads of different sizes) and serves a mixed batch in which every adapter has the same number
of samples. Measured in one run, as ratios:

* ``memory_vs_separate``: bytes of the one model (base, every adapter, the base's own copies of
  what adapters train) / bytes of as many separate single-adapter models.
* ``routed_vs_grouped``: throughput of one routed forward (:func:`timm_peft.route`) / throughput
  of the same samples run grouped, one ``set_adapter`` + forward per adapter (goal ≥ 0.9).
* ``routed_vs_sequential``: throughput of the routed forward / running the whole batch once per
  adapter and keeping each sample's own row (what serving without routing or grouping costs).
* ``switch_us``: median ``set_adapter`` latency between two adapters of the method with heads of
  one size (tensors re-pointed, nothing copied); ``switch_other_head_us`` to an adapter with
  another head size and ``switch_other_method_us`` to an adapter of another method (the surgery
  is redone on the same base weights).

Throughputs use the process CPU time (steadier than the wall clock on a shared machine), one
round-robin round calling each variant once, the median of the per-round ratios.

Run: ``python -m benchmarks.serving`` (add ``--quick`` for a smoke run on a tiny ViT;
``--methods lion --update`` re-measures one method's row in the committed report).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import timm
import torch

import timm_peft
from benchmarks.common import RESULTS, median_ratio, round_robin_clocks, write_report

DEFAULT_METHODS = ("ssf", "vpt", "bias", "e2vpt", "lion", "linear")


def _nbytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds: modules, inactive adapters, base copies."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    inner = timm_peft.core.unwrap_features(model)
    for adapter in (inner.__dict__.get("peft_adapters") or {}).values():
        for t in adapter.state.values():
            add(t)
    for t in (inner.__dict__.get("peft_base_state") or {}).values():
        add(t)
    return sum(seen.values())


def _heads(n: int) -> list[int]:
    return [10 + 7 * i for i in range(n)]  # heads of different sizes, as tasks have


def measure(arch: str, method: str, num_adapters: int, per_adapter: int, rounds: int,
            model_kwargs: dict, img: int) -> dict:
    torch.manual_seed(0)
    heads = _heads(num_adapters)
    model = timm.create_model(f"{arch}.{method}", num_classes=heads[0], **model_kwargs).eval()
    names = ["default"] + [f"task{i}" for i in range(1, num_adapters)]
    for name, n in zip(names[1:], heads[1:]):
        timm_peft.add_adapter(model, name, num_classes=n)
    separate = timm.create_model(f"{arch}.{method}", num_classes=heads[0], **model_kwargs)
    mem_ratio = _nbytes(model) / (num_adapters * _nbytes(separate))
    del separate

    order = [names[i % num_adapters] for i in range(num_adapters * per_adapter)]
    x = torch.randn(len(order), 3, img, img)
    groups = {n: [i for i, o in enumerate(order) if o == n] for n in names}

    def routed() -> None:
        with torch.inference_mode(), timm_peft.route(model, order):
            model(x)

    def grouped() -> None:
        with torch.inference_mode():
            for n, idx in groups.items():
                timm_peft.set_adapter(model, n)
                model(x[idx])
        timm_peft.set_adapter(model, "default")

    def sequential() -> None:
        with torch.inference_mode():
            for n in names:
                timm_peft.set_adapter(model, n)
                model(x)
        timm_peft.set_adapter(model, "default")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # functorch's note on the CPU flash-attention fallback
        wall, cpu = round_robin_clocks(dict(routed=routed, grouped=grouped, sequential=sequential),
                                       warmup=1, rounds=rounds)

    def switch_latency(a: str, b: str, reps: int = 50) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            timm_peft.set_adapter(model, b)
            times.append(time.perf_counter() - t0)
            timm_peft.set_adapter(model, a)
        return statistics.median(times) * 1e6

    timm_peft.add_adapter(model, "same_head", num_classes=heads[0])
    same = switch_latency("default", "same_head")
    head = switch_latency("default", names[1], reps=5) if num_adapters > 1 else float("nan")
    other = "bias" if method != "bias" else "ssf"
    timm_peft.add_adapter(model, "other_method", method=other, num_classes=heads[0])
    cross = switch_latency("default", "other_method", reps=5)
    n = len(order)
    return dict(
        arch=arch, method=method, adapters=num_adapters, batch=n,
        adapter_values=sum(t.numel() for t in timm_peft.get_adapters(model)["default"].state.values()),
        memory_vs_separate=mem_ratio,
        routed_ms=statistics.median(cpu["routed"]) * 1e3,
        routed_vs_grouped=median_ratio(cpu, "grouped", "routed"),
        routed_vs_sequential=median_ratio(cpu, "sequential", "routed"),
        routed_vs_grouped_wall=median_ratio(wall, "grouped", "routed"),
        switch_us=same, switch_other_head_us=head, switch_other_method_us=cross,
        imgs_per_s_routed=n / statistics.median(cpu["routed"]),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_small_patch16_224")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--per-adapter", type=int, default=2, help="samples of each adapter in the batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny ViT, for a smoke run")
    p.add_argument("--out", default="serving", help="report name under benchmarks/results/")
    p.add_argument("--update", action="store_true",
                   help="replace only the rows of --methods in the existing report, keeping the "
                        "others; its command line then names both runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kwargs, img = {}, 224
    if args.quick:
        kwargs, img = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2), 32
    rows = []
    t0 = time.time()
    for method in args.methods.split(","):
        row = measure(args.arch, method, args.adapters, args.per_adapter, args.rounds, kwargs, img)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        rows.append(row)
    command = ("python -m benchmarks.serving " + " ".join(argv if argv is not None else
                                                           __import__("sys").argv[1:])).strip()
    update = ""
    if args.update:
        old = json.loads((RESULTS / f"{args.out}.json").read_text())
        new = {r["method"]: r for r in rows}
        measured = ", ".join(new)
        rows = [new.pop(r["method"], r) for r in old["rows"]] + list(new.values())
        update = (f" The {measured} row(s) were re-measured by `{command}` (the total time is "
                  f"that run's); the others are from `{old['command']}`.")
        command = f"{old['command']}; then {command}"
    notes = (
        f"{args.adapters} adapters per method on one frozen `{args.arch}`"
        f"{' (tiny config)' if args.quick else ''}, heads of {_heads(args.adapters)} classes, a "
        f"mixed batch of {args.per_adapter} samples per adapter, {args.threads} CPU thread(s), "
        f"{args.rounds} round-robin rounds. Ratios > 1 mean the routed forward is faster "
        "(`routed_vs_grouped` = grouped CPU time / routed CPU time; goal ≥ 0.9 for SSF, VPT, "
        "bias and LION); `memory_vs_separate` ≤ 0.15 is the goal. `switch_us`: `set_adapter` "
        "between two "
        "adapters of the method with one head size (tensors re-pointed, nothing copied); "
        "`switch_other_head_us` / `switch_other_method_us`: to an adapter with another head size "
        "/ of another method (the method's surgery is redone on the same base tensors). Routed forwards run each sample as "
        "its own batch of one under `torch.func.vmap`: torch has no batching rule for the CPU "
        "flash-attention kernel, so attention falls back to a per-sample loop (it is a small "
        "part of the time). LION's equilibrium solvers run vectorised too, each sample its own "
        "solve, and stop once the batch's slowest sample has converged, as a grouped batch's do. "
        f"Total time {time.time() - t0:.0f} s.{update}")
    md = write_report(args.out, "Many adapters on one backbone: memory, mixed batches, switching",
                      command.strip(), rows, notes)
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
