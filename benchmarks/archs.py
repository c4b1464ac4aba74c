"""The smallest registered arch of every timm model module: what the all-modules sweeps run.

timm keeps one file per model family (``timm.list_modules()``: 98 in timm 1.0.31); a sweep
that covers every family takes the arch of each module with the fewest parameters. Parameters
are counted on the meta device, so no weights are allocated; ranking the whole registry still
runs every arch's ``__init__`` (about 6 minutes on one shared core), so the ranking is kept in
``benchmarks/results/smallest_archs.json`` for the timm version that made it and recomputed
when timm changes (``python -m benchmarks.archs --refresh``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import warnings
from pathlib import Path

import timm
import torch

__all__ = ["smallest_archs", "num_params"]

#: prefix of timm's test archs: tiny configurations of real families, registered in the same
#: modules (``test_vit`` lives in ``vision_transformer``), kept apart from the released archs
TEST_PREFIX = "test_"
#: the ranking of the timm registry that wrote it:
#: ``{"timm": version, "registered": [arch, ...], "archs": [[module, arch, params], ...]}``
CACHE = Path(__file__).resolve().parent / "results" / "smallest_archs.json"


def num_params(arch: str) -> int | None:
    """Parameter count of ``arch`` as timm builds it by default, counted on the meta device
    (None if the arch does not build there).

    Example:
        >>> num_params("resnet18")
        11689512
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(arch, device="meta")
    except Exception:  # noqa: BLE001  (an arch that needs real tensors at init is not ranked)
        return None
    # distinct tensors: a module shared under two names is counted once
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _rank() -> list[tuple[str, str, int]]:
    """``(module, arch, params)`` for every registered arch that builds on the meta device."""
    rows = []
    for module in timm.list_modules():
        for arch in timm.list_models(module=module):
            n = num_params(arch)
            if n is not None:
                rows.append((module, arch, n))
    return rows


@functools.lru_cache(maxsize=None)
def _ranked(refresh: bool = False) -> tuple[tuple[str, str, int], ...]:
    """:func:`_rank`, read from :data:`CACHE` when timm's version and registry match it."""
    registered = set(timm.list_models())
    if not refresh and CACHE.is_file():
        data = json.loads(CACHE.read_text())
        rows = [tuple(r) for r in data.get("archs", [])]
        if data.get("timm") == timm.__version__ and set(data.get("registered", [])) == registered:
            return tuple(rows)
    rows = _rank()
    CACHE.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=CACHE.parent, suffix=".tmp")  # never a half-written cache
    with os.fdopen(fd, "w") as f:
        json.dump(dict(timm=timm.__version__, registered=sorted(registered), archs=rows), f)
    os.replace(tmp, CACHE)
    return tuple(rows)


def smallest_archs(include_test: bool = False) -> dict[str, str]:
    """Map every module of ``timm.list_modules()`` to its arch with the fewest parameters.

    Parameters are counted on the meta device (``timm.create_model(arch, device="meta")``);
    ties go to the arch timm lists first (alphabetical). timm's ``test_*`` archs are left out
    of the ranking: they are not released models. With ``include_test`` they are returned as
    their own section after the modules: each ``test_*`` arch maps to itself (no timm module
    is named ``test_*``, so the keys cannot collide).

    Example:
        >>> archs = smallest_archs()
        >>> archs["resnet"], archs["vision_transformer"]
        ('resnet10t', 'vit_tiny_patch16_224')
        >>> len(archs) == len(timm.list_modules())
        True
        >>> sorted(k for k in smallest_archs(include_test=True) if k.startswith("test_"))[:2]
        ['test_byobnet', 'test_coatnet']
    """
    best: dict[str, tuple[int, str]] = {}
    tests: list[str] = []
    for module, arch, n in _ranked():
        if arch.startswith(TEST_PREFIX):
            tests.append(arch)
        elif module not in best or n < best[module][0]:
            best[module] = (n, arch)
    missing = [m for m in timm.list_modules() if m not in best]
    if missing:
        raise RuntimeError(f"no arch of timm modules {missing} builds on the meta device")
    out = {m: best[m][1] for m in timm.list_modules()}
    if include_test:
        out.update({t: t for t in sorted(tests)})
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refresh", action="store_true", help="recount every arch (no cache)")
    if parser.parse_args().refresh:
        _ranked(refresh=True)
    for key, arch in smallest_archs(include_test=True).items():
        print(f"{key:32s} {arch}")
