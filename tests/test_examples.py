"""Every script in ``examples/`` runs as a reader runs it (``python examples/<name>.py`` from a
fresh working directory, offline, as written) and prints what its docstring promises.

A new example must be listed in ``CLAIMS`` with the line that shows it worked
(``test_every_example_is_run`` fails otherwise), so no example can rot unnoticed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))

#: example -> a pattern its output must match: the claim the example makes about itself
CLAIMS = {
    # fine-tuning moves the test accuracy far above the frozen base with a new head
    "quickstart.py": r"before fine-tuning (?P<before>[\d.]+) -> after (?P<after>[\d.]+)",
    # part 1 (timm loop) and part 2 (train()) both save, and the reloaded adapter keeps the
    # preprocessing it was trained with
    "train.py": r"train\(\): best epoch \d+, test accuracy [\d.]+; adapter in .*\n"
                r"reloaded: ResNet, 6 classes, preprocessing \(3, 64, 64\)",
    # routing = each adapter alone, disable = plain model, reload = the same outputs
    "many_tasks.py": r"saved and reloaded: every adapter computes what it did",
    # over HTTP, every answer equals the adapter alone, and the mixed burst shares passes
    "serve_zoo.py": r"12 requests for 3 adapters answered as each adapter alone, in [1-6] "
                    r"backbone passes",
}


def test_every_example_is_run():
    assert EXAMPLES == sorted(CLAIMS), "list each example of examples/ in CLAIMS"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_and_keeps_its_claim(name, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(CLAIMS[name], out.stdout)
    assert found, out.stdout[-3000:]
    if "after" in found.groupdict():
        assert float(found["after"]) >= float(found["before"]) + 0.5, found.group(0)
