"""Shared measuring tools for the benchmark scripts (never used by timed tests).

Times are medians over repeated runs after warm-up; every report states ratios measured in the
same run (PEFT model vs. plain model) because absolute CPU times vary between machines.
Peak memory is measured without relying on an allocator: :class:`PeakMemory` follows every
tensor storage created by torch operations (a ``TorchDispatchMode``) and records the largest
number of live bytes, which works the same on CPU and GPU.
"""
from __future__ import annotations

import gc
import json
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

RESULTS = Path(__file__).resolve().parent / "results"


def round_robin(fns: dict[str, Callable[[], Any]], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of every call of each fn, one call of each per round, the order rotating by round.

    Interleaving makes load from other processes hit every model alike, so the ratios of two
    models' times measured in one run stay meaningful on a shared machine.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


class Clock:
    """Wall and process CPU seconds of one call; on a CUDA device the wall time comes from CUDA
    events around the call (the device's own time), after a synchronisation.

    CPU time counts every thread of this process and nothing of the others, so on a machine
    shared with other processes the ratio of two CPU times is steadier than the ratio of two wall
    times (the wall clock also counts the time other processes held the cores).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, float]:
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            torch.cuda.synchronize()
            c0 = time.process_time()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0


def round_robin_clocks(fns: dict[str, Callable[[], Any]], warmup: int, rounds: int,
                       device: torch.device | str = "cpu"
                       ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """:func:`round_robin`, timing each call with :class:`Clock`: ``(wall, cpu)`` seconds."""
    clock = Clock(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            w, c = clock(fns[k])
            wall[k].append(w)
            cpu[k].append(c)
    return wall, cpu


def median_ratio(times: dict[str, list[float]], key: str, ref: str) -> float:
    """Median over :func:`round_robin` rounds of ``key``'s time / ``ref``'s in the same round.

    A ratio taken within a round sees the same machine load on both sides, so it stays
    meaningful when the load drifts during a run.
    """
    return statistics.median(a / b for a, b in zip(times[key], times[ref]))


def round_robin_medians(fns: dict[str, Callable[[], Any]], warmup: int,
                        rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn, timed with :func:`round_robin`."""
    return {k: statistics.median(v) for k, v in round_robin(fns, warmup, rounds).items()}


def inference(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A no-argument function running one inference-mode forward of ``model`` on ``x``."""
    def run() -> None:
        with torch.inference_mode():
            model(x)
    return run


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def median_time(fn: Callable[[], Any], warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the context and still alive.

    Storages that existed before entering (weights, inputs) are not counted, so the number is the
    extra memory a forward/backward needs: activations, saved tensors, gradients, temporaries.

    Example:
        >>> with PeakMemory() as pm:
        ...     y = torch.ones(1000) * 2
        >>> pm.peak >= 4000
        True
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        # views and in-place ops return an input's storage: it is not new memory
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in self.live or key in seen:
                continue
            nbytes = st.nbytes()
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._release, key)
        return out


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak extra bytes of live tensor storage while running ``fn()``.

    On CPU by :class:`PeakMemory`; on a CUDA device from the caching allocator's statistics
    (``max_memory_allocated`` over the call, less what was allocated before it).
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with PeakMemory() as pm:
        fn()
    return pm.peak


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import timm

    import timm_peft
    return dict(python=sys.version.split()[0], torch=torch.__version__, timm=timm.__version__,
                timm_peft=timm_peft.__version__, machine=platform.machine(),
                processor=platform.processor() or platform.machine(),
                threads=torch.get_num_threads())


def write_report(name: str, title: str, command: str, rows: list[dict[str, Any]],
                 notes: str = "") -> Path:
    """Write ``results/<name>.md`` (a Markdown table) and ``results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = environment()
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,d}"
        return str(v)

    lines = [f"# {title}", "", f"Command: `{command}`", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(dict(env=env, command=command, rows=rows),
                                                     indent=2) + "\n")
    return md
