"""Hostile and broken adapters: every one ends in an AdapterError naming what is wrong, fast,
without allocating; and a mutation fuzzer finds no other exception and no hang.

The cases live in ``tests/adapter_cases.py``; they run in a fresh Python process so that its
peak memory (``ru_maxrss``) measures what loading the bad adapters allocated.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "adapter_cases.py"), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("loader", ["from_pretrained", "verify"])
def test_crafted_bad_adapters_fail_clearly_fast_and_without_allocating(loader):
    res = _run("crafted", "--loader", loader)
    cases = res["cases"]
    assert len(cases) >= 100
    wrong = [f"{c['name']}: {c['outcome']} {c['message'][:200]!r} (wanted /{c['pattern']}/)"
             for c in cases if c["outcome"] != "adapter_error" or not c["matched"]]
    assert not wrong, "\n".join(wrong)
    slow = [f"{c['name']}: {c['seconds']} s" for c in cases if c["seconds"] >= 1.0]
    assert not slow, slow
    assert res["peak_rss_growth_mb"] < 100


def test_fuzzer_small_run_finds_only_adapter_errors():
    res = _run("fuzz", "--seed", "0", "--cases", "64")
    assert res["cases"] == 64 and sum(res["counts"].values()) == 64
    assert res["other_exceptions"] == 0 and res["hangs"] == 0, res["failures"]
    assert res["counts"].get("adapter_error", 0) >= 30  # the mutations do damage
    # live controls: every entry point loaded every unmutated template, before and after
    assert res["controls"] > 0 and res["controls_failed"] == []
    assert all(sum(v.values()) == 8 for v in res["by_loader"].values()), res["by_loader"]
    assert res["peak_rss_growth_mb"] < 100


def test_fuzzer_fails_when_an_entry_point_refuses_everything(tmp_path, monkeypatch):
    sys.path.insert(0, str(HERE))
    import adapter_cases

    def refuses(d, t):
        raise adapter_cases.AdapterError("refused")
    templates = adapter_cases.make_templates(tmp_path / "templates")
    monkeypatch.setitem(adapter_cases.LOADERS, "refuses_all", refuses)
    failed = [c for c in adapter_cases.run_controls(templates, 10.0) if c["outcome"] != "loaded"]
    assert {c["loader"] for c in failed} == {"refuses_all"}
    assert len(failed) == len(templates)
