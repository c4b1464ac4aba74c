"""What a newcomer runs into first (issue 26): errors that say how to go on, and no long waits."""
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

import timm_peft
from timm_peft.cli import main
from timm_peft.io import AdapterError
from test_hub import fake_hub  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48)


def _train_random_base(out, seed, capsys):
    """``timm-peft train --no-pretrained`` (what an offline user runs); what it printed."""
    argv = ["train", "--model", "vit_tiny_patch16_224.linear", "--no-pretrained",
            "--model-kwargs", *(f"{k}={v}" for k, v in TINY.items()), "--task", "count",
            "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--epochs", "1",
            "--warmup-epochs", "0", "--workers", "0", "--no-progress", "--seed", str(seed),
            "--output", str(out)]
    assert main(argv) == 0
    return capsys.readouterr().out


def test_random_base_mismatch_says_how_to_rebuild_it(tmp_path, capsys):
    printed = _train_random_base(tmp_path / "run", 3, capsys)
    adapter = tmp_path / "run" / "adapter"
    torch.manual_seed(123)  # another random base than the run's
    with pytest.raises(AdapterError, match="base weights differ") as info:
        timm_peft.from_pretrained(adapter)
    code = re.search(r"`([^`]+)`", str(info.value)).group(1)
    assert "torch.manual_seed(3)" in code  # the seed the run recorded, not the default 0
    # the CLI printed the same lines after training (one builder for both)
    assert "\n".join("  " + line for line in code.split("; ")) in printed
    # a base built by hand meets the same error
    torch.manual_seed(123)
    other = timm.create_model("vit_tiny_patch16_224.linear", num_classes=timm_peft.from_pretrained(
        adapter, check_base=False).num_classes, **TINY)
    with pytest.raises(AdapterError, match=re.escape(code)):
        timm_peft.load_adapter(other, adapter)
    # and what it says works: the trained base, checked against its recorded fingerprint
    torch.manual_seed(123)
    namespace = {}
    exec(code, namespace)
    model = namespace["model"]
    assert timm_peft.base_fingerprint(model) == timm_peft.read_adapter_config(adapter)[
        "base_fingerprint"]


def test_file_base_mismatch_asks_for_the_file(tmp_path, vit_weights):
    from conftest import TINY_VIT, local_overlay
    model = timm.create_model("vit_tiny_patch16_224.linear", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=local_overlay(vit_weights), **TINY_VIT)
    d = timm_peft.save_pretrained(model, tmp_path / "a")
    torch.manual_seed(5)
    with pytest.raises(AdapterError, match=re.escape(
            "pretrained_cfg_overlay=dict(file='<the base weights file>', custom_load=False)")):
        timm_peft.load_adapter(timm.create_model("vit_tiny_patch16_224.linear", num_classes=3,
                                                 **TINY_VIT), d)


# ----------------------------------------------------------------------------------------------
# an unreachable Hub: one probe, then offline (item 7); never a request off this machine
# ----------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: a connection to it is refused at once


def _run_cli(args, endpoint, tmp_path, limit):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.pop("HF_HUB_CACHE", None)
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(ROOT))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "timm_peft", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=limit)
    return proc, time.monotonic() - start


#: what the two commands of the issue take without network before their error (28 s, 52 s),
#: with python's and torch's start-up (3-6 s here) and a loaded machine's slack
_FAST_S = 20

_COMMANDS = {
    "info": (["info", "hf-hub:org/adapter"], "cannot load Hub adapter 'hf-hub:org/adapter'"),
    "train": (["train", "--model", "resnet10t.linear", "--task", "count", "--train-size", "16",
               "--batch-size", "8", "--epochs", "1", "--no-progress", "--output", "run"],
              "could not load pretrained weights for 'resnet10t.linear'"),
}


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_refused_hub_fails_fast_with_how_to_work_offline(command, tmp_path):
    args, error = _COMMANDS[command]
    endpoint = f"http://127.0.0.1:{_free_port()}"
    proc, took = _run_cli(args, endpoint, tmp_path, limit=60)
    assert proc.returncode == 2, proc.stderr
    assert f"timm-peft {command}: error: {error}" in proc.stderr
    warning = f"the Hugging Face Hub ({endpoint}) cannot be reached (ConnectError"
    assert proc.stderr.count(warning) == 1 + (command == "info"), proc.stderr  # + the error
    assert "set HF_HUB_OFFLINE=1" in proc.stderr and "--pretrained-file" in proc.stderr
    assert "Retrying" not in proc.stderr  # huggingface_hub's back-off never started
    assert took < _FAST_S, (took, proc.stderr)


def test_silent_hub_fails_after_one_probe_timeout(tmp_path):
    # a port that accepts connections (the kernel's backlog) and never answers: what a
    # firewall dropping packets looks like to the client, on this machine only
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        proc, took = _run_cli(_COMMANDS["info"][0], endpoint, tmp_path, limit=60)
    assert proc.returncode == 2, proc.stderr
    assert f"the Hugging Face Hub ({endpoint}) cannot be reached (ReadTimeout" in proc.stderr
    assert "set HF_HUB_OFFLINE=1 to skip this 3 s check" in proc.stderr
    assert took < _FAST_S, (took, proc.stderr)


def test_reachable_hub_is_probed_once_and_stays_online(fake_hub, capsys):
    from huggingface_hub import constants
    assert not constants.HF_HUB_OFFLINE
    for _ in range(2):
        assert main(["info", "hf-hub:org/missing"]) == 2
        assert "no such model repo" in capsys.readouterr().err  # the Hub's own answer
    # each command: one probe of the front page before its first request, then the Hub as usual
    assert fake_hub.paths() == [("HEAD", "/"),
                                ("HEAD", "/org/missing/resolve/main/adapter_config.json")] * 2
    assert not constants.HF_HUB_OFFLINE
