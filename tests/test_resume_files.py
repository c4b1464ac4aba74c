"""``timm-peft train --resume``: a resumed run writes where the user points, and a corrupt
checkpoint or ``args.json`` ends in one line naming the file."""
from __future__ import annotations

import hashlib
import re
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file

from timm_peft.cli import main

TINY = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=48"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch run (its checkpoint says epoch 2)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                              embed_dim=48)
    root = tmp_path_factory.mktemp("resume")
    weights = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = root / "A"
    assert main(["train", "--model", "vit_tiny_patch16_224.linear", "--model-kwargs", *TINY,
                 "--pretrained-file", str(weights), "--task", "orientation", "--train-size",
                 "16", "--test-size", "8", "--batch-size", "8", "--epochs", "2",
                 "--warmup-epochs", "0", "--workers", "0", "--no-progress",
                 "--output", str(out)]) == 0
    return out


def _digest(d) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _error(argv, capsys) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_resume_of_a_copy_writes_into_the_copy(run, tmp_path):
    before = _digest(run)
    copy = tmp_path / "COPY"
    shutil.copytree(run, copy)
    assert main(["train", "--resume", str(copy), "--epochs", "3", "--no-progress"]) == 0
    assert _digest(run) == before  # run A is untouched
    ckpt = torch.load(copy / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and len(ckpt["history"]) == 3
    assert (copy / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_into_another_output_needs_an_empty_one(run, tmp_path, capsys):
    before = _digest(run)
    busy = tmp_path / "busy"
    shutil.copytree(run, busy)
    err = _error(["train", "--resume", str(run), "--epochs", "3", "--output", str(busy)], capsys)
    assert f"--output {busy} already holds a run" in err and f"continue in {run}" in err
    new = tmp_path / "new"
    assert main(["train", "--resume", str(run), "--epochs", "3", "--output", str(new),
                 "--no-progress"]) == 0
    assert _digest(run) == before
    assert torch.load(new / "checkpoint.pt", weights_only=True)["epoch"] == 3


@pytest.mark.parametrize("content,match", [
    ("[1, 2]", "must hold a JSON object of the run's settings, got a list"),
    ("{not json", "is not valid JSON"),
    ('{"task": "orientation"}', "lacks the run's 'model' setting"),
    ('{"model": "vit_tiny_patch16_224.linear"}', "lacks the run's 'data' setting"),
    ('{"model": "vit_tiny_patch16_224.linear", "task": "orientation", "epochs": "many"}',
     "do not make a run: .*epochs"),
    ('{"model": "vit_tiny_patch16_224.linear", "task": "orientation", "recipes": "vtab1k"}',
     "field 'recipes' must be a list"),
])
def test_a_corrupt_args_json_is_named(run, tmp_path, capsys, content, match):
    copy = tmp_path / "COPY"
    shutil.copytree(run, copy)
    (copy / "args.json").write_text(content)
    err = _error(["train", "--resume", str(copy)], capsys)
    assert str(copy / "args.json") in err and len(err.splitlines()) == 1
    assert re.search(match, err), err


def _corrupt(ckpt: dict, how: str) -> object:
    if how == "list":
        return [ckpt]
    if how == "missing":
        return {k: v for k, v in ckpt.items() if k != "optimizer"}
    if how == "wrong type":
        return {**ckpt, "epoch": "2"}
    if how == "nan":
        adapter = {k: torch.full_like(v, float("nan")) for k, v in ckpt["adapter"].items()}
        return {**ckpt, "adapter": adapter}
    if how == "not a tensor":
        return {**ckpt, "adapter": {k: 1.0 for k in ckpt["adapter"]}}
    raise AssertionError(how)


@pytest.mark.parametrize("how,match", [
    ("list", "is not a timm_peft checkpoint"),
    ("missing", "checkpoint lacks 'optimizer'"),
    ("wrong type", "field 'epoch' is a str, expected int"),
    ("nan", "tensor adapter\\[.*\\] holds NaN or Inf"),
    ("not a tensor", "holds a float for .*expected a tensor"),
])
def test_a_corrupt_checkpoint_is_named(run, tmp_path, capsys, how, match):
    copy = tmp_path / "COPY"
    shutil.copytree(run, copy)
    ckpt = torch.load(copy / "checkpoint.pt", weights_only=True)
    torch.save(_corrupt(ckpt, how), copy / "checkpoint.pt")
    before = _digest(copy)
    err = _error(["train", "--resume", str(copy), "--epochs", "3"], capsys)
    assert str(copy / "checkpoint.pt") in err and len(err.splitlines()) == 1
    assert re.search(match, err), err
    assert _digest(copy) == before  # a run that fails to resume changes nothing
