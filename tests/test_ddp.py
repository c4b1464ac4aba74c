"""Data-parallel training under torchrun (2 processes, gloo, CPU) equals one process.

The same ``timm-peft train`` command runs under ``torchrun``; with the per-process batch a quarter
and two batches accumulated per update, each update sees the same global batch, so the adapter
after N updates must be the single-process adapter (up to float rounding of the all-reduce).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from timm_peft.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48)


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "base.safetensors"
    base = timm.create_model("vit_tiny_patch16_224", **TINY)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    common = dict(model="vit_tiny_patch16_224.bias", model_kwargs=TINY, pretrained_file=str(weights),
                  task="texture", train_size=32, test_size=11, epochs=2, warmup_epochs=0.5,
                  opt="momentum", lr=0.05, seed=3, workers=0, progress=False)

    single = train(TrainConfig(**common, batch_size=8, output=str(tmp_path / "single")))

    flags = ["--model", common["model"], "--model-kwargs", *[f"{k}={v}" for k, v in TINY.items()],
             "--pretrained-file", str(weights), "--task", "texture", "--train-size", "32",
             "--test-size", "11", "--epochs", "2", "--warmup-epochs", "0.5", "--opt", "momentum",
             "--lr", "0.05", "--seed", "3", "--workers", "0", "--no-progress",
             # 2 processes x 2 accumulated batches of 2: the gradient all-reduce runs only on
             # the update's last batch (DDP no_sync before it), and the global batch is still 8
             "--batch-size", "2", "--grad-accum-steps", "2", "--output", str(tmp_path / "ddp")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "timm_peft", "train", *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Saved the adapter") == 1  # only rank 0 reports

    ddp_dir = tmp_path / "ddp"
    run = json.loads((ddp_dir / "args.json").read_text())["run"]
    assert (run["world_size"], run["global_batch"]) == (2, 8)
    steps = [json.loads(line)["step"] for line in (ddp_dir / "log.jsonl").read_text().splitlines()]
    assert steps[:2] == [4, 8]  # 32 images / global batch 8, two epochs

    a = load_file(str(single.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(ddp_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 2  # every bias of the ViT, not just the head
    start = base.state_dict()
    for k in a:
        if k in start and start[k].shape == a[k].shape:  # the adapter did move away from the base
            assert not torch.equal(a[k], start[k]) or "head" in k
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    ddp_metrics = json.loads((ddp_dir / "summary.json").read_text())["metrics"]
    assert ddp_metrics["test_acc"] == single.metrics["test_acc"]  # sharded eval counts all 11
