"""What a newcomer runs into first (issue 26): errors that say how to go on, and no long waits."""
import re

import pytest
import timm
import torch

import timm_peft
from timm_peft.cli import main
from timm_peft.io import AdapterError

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
