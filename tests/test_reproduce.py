"""``timm-peft reproduce`` end to end on tiny generated stand-ins of the VTAB-1k and FGVC layouts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from timm_peft.cli import main
from timm_peft.data import build_splits
from timm_peft.reproduce import estimate, paper_results, plan, reproduce
from timm_peft.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
#: a few steps per run: 1 epoch, batch 4
QUICK = dict(epochs=1, warmup_epochs=0, batch_size=4, workers=0, pretrained=False,
             model_kwargs=TINY)


def _image(path, label, rng, size=(16, 16)):
    """A ``size`` (w, h) image whose mean colour encodes the label (learnable in a few steps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = np.full((size[1], size[0], 3), 40 + 60 * label, np.uint8)
    noise = rng.integers(0, 30, size=base.shape, dtype=np.uint8)
    Image.fromarray(base + noise).save(path)


def make_fake_vtab(root, tasks=("dtd", "clevr_count"), classes=3, sizes=(8, 4, 6),
                   image_size=(16, 16)):
    """``<root>/<task>/{train800,val200,train800val200,test}.txt`` over a few generated images."""
    rng = np.random.default_rng(0)
    for task in tasks:
        lines = {}
        for split, n in zip(("train800", "val200", "test"), sizes):
            lines[split] = []
            for i in range(n):
                rel = f"images/{split}_{i}.png"
                _image(root / task / rel, i % classes, rng, image_size)
                lines[split].append(f"{rel} {i % classes}")
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, items in lines.items():
            (root / task / f"{split}.txt").write_text("\n".join(items) + "\n")
    return root


def make_fake_fgvc(root, names=("cub", "flowers"), sizes=(8, 4, 6)):
    """VPT's FGVC layout: ``<root>/<name>/{train,val,test}.json`` and the images in the
    dataset's image folder, labels as in the originals (CUB counts from 1)."""
    from timm_peft.data import FGVC_DATASETS
    rng = np.random.default_rng(1)
    for name in names:
        image_dir = root / name / FGVC_DATASETS[name][0]
        for split, n in zip(("train", "val", "test"), sizes):
            anno = {}
            for i in range(n):
                rel = f"{i % 2:03d}.class/{split}_{i}.jpg"
                _image(image_dir / rel, i % 2, rng)
                anno[rel] = i % 2 + 1
            (root / name / f"{split}.json").write_text(json.dumps(anno))
    return root


class Counting:
    """``train`` that records the runs it was asked for."""

    def __init__(self):
        self.runs = []

    def __call__(self, cfg, **kw):
        self.runs.append(cfg)
        return train(cfg, **kw)


def test_vtab1k_reproduction_runs_the_protocol_resumes_and_tabulates(tmp_path):
    data = make_fake_vtab(tmp_path / "vtab-1k")
    out = tmp_path / "out"
    spy = Counting()
    kw = dict(output=out, grid={"lr": [0.05, 0.001]}, seeds=2, train_args=QUICK, run=spy)
    res = reproduce("bias", "vtab1k", data, "vit_tiny_patch16_224", tasks=["dtd", "clevr_count"],
                    **kw)
    # 2 tasks x (2 grid points on train800/val200 + 2 seeds on train800val200)
    assert len(spy.runs) == 8
    tune = [c for c in spy.runs if c.val_split_name == "val200"]
    assert {(c.dataset, c.train_split, c.lr) for c in tune} == {
        (f"vtab1k/{t}", "train800", lr) for t in ("dtd", "clevr_count") for lr in (0.05, 0.001)}
    final = [c for c in spy.runs if c.val_split_name is None]
    assert {(c.train_split, c.seed) for c in final} == {("train800val200", 0), ("train800val200", 1)}
    # the recipes' settings, the method's suffix and the overrides
    assert all(c.model == "vit_tiny_patch16_224.bias" and c.opt == "momentum" and not c.aug
               and c.crop_pct == 1.0 and c.crop_mode == "squash" for c in spy.runs)
    assert {c.test_split for c in tune} == {None} and {c.test_split for c in final} == {"test"}

    rows = {r["task"]: r for r in res.rows}
    for task in ("dtd", "clevr_count"):
        # the chosen point is the one with the best validation accuracy
        vals = {lr: json.loads((out / "bias/vtab1k" / task / "tune" / f"lr={lr}" / "summary.json")
                               .read_text())["metrics"]["val_acc"] for lr in (0.05, 0.001)}
        best = max(vals.values())  # 1 epoch: the last epoch is the best; ties: the smaller lr
        assert rows[task]["chosen"] == {"lr": min(lr for lr, v in vals.items() if v == best)}
        # ours = mean test accuracy of the seeds, as the runs measured it on the 6 test images
        accs = [json.loads((out / "bias/vtab1k" / task / "final" / f"seed{s}" / "summary.json")
                           .read_text())["metrics"]["test_acc"] * 100 for s in (0, 1)]
        assert rows[task]["ours"] == pytest.approx(sum(accs) / 2, abs=0.01)
        paper = paper_results()["bias"]["vtab1k"]["per_task"][task]
        assert rows[task]["paper"] == paper
        assert rows[task]["diff"] == pytest.approx(rows[task]["ours"] - paper, abs=0.02)
    groups = {g["group"]: g for g in res.groups}
    assert groups["natural"]["tasks"] == "1/7" and groups["natural"]["diff"] is None  # incomplete
    assert groups["natural"]["paper"] == 73.30  # VPT Table 1's own group mean
    table = res.table_md.read_text()
    assert "| dtd | natural |" in table and "ssf-neurips2022.txt Table 4" in table

    # the same command again: nothing to run, same table
    spy.runs.clear()
    again = reproduce("bias", "vtab1k", data, "vit_tiny_patch16_224", tasks=["dtd", "clevr_count"],
                      **kw)
    assert spy.runs == [] and again.rows == res.rows
    # a run lost (interrupted before it finished): only that run again
    (out / "bias/vtab1k/dtd/final/seed1/summary.json").unlink()
    reproduce("bias", "vtab1k", data, "vit_tiny_patch16_224", tasks=["dtd", "clevr_count"], **kw)
    assert [(c.dataset, c.seed) for c in spy.runs] == [("vtab1k/dtd", 1)]


def test_fgvc_reproduction_through_the_cli(tmp_path, capsys):
    data = make_fake_fgvc(tmp_path / "fgvc")
    out = tmp_path / "out"
    argv = ["reproduce", "--method", "ssf", "--benchmark", "fgvc", "--data-root", str(data),
            "--model", "vit_tiny_patch16_224", "--tasks", "cub", "flowers", "--output", str(out),
            "--seeds", "1", "--grid", "lr=0.01", "--epochs", "1", "--batch-size", "4",
            "--no-pretrained", "--model-kwargs", *[f"{k}={v}" for k, v in TINY.items()],
            "--train-args", "workers=0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| cub | fgvc |" in printed and "| flowers | fgvc |" in printed
    report = json.loads((out / "ssf-fgvc.json").read_text())
    assert [r["task"] for r in report["rows"]] == ["cub", "flowers"]
    assert report["rows"][0]["paper"] == 89.5  # SSF Table 3
    # one grid point: no tuning runs; the final run trains on train (VPT's code), with flips
    args = json.loads((out / "ssf/fgvc/cub/final/seed0/args.json").read_text())
    assert args["run"]["train_images"] == 8 and args["run"]["test_images"] == 6
    assert args["aug"] and args["opt"] == "adamw" and args["classes"] == ["1", "2"]
    assert not (out / "ssf/fgvc/cub/tune").exists()


def test_vtab1k_and_fgvc_splits_read_the_layouts(tmp_path):
    vtab = make_fake_vtab(tmp_path / "v", tasks=("eurosat",))
    s = build_splits(dataset="vtab1k/eurosat", data_dir=vtab, train_split="train800",
                     val_split_name="val200")
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (8, 4, 6, 10)
    img, label = s.train[1]
    assert img.size == (16, 16) and label == 1
    (vtab / "eurosat" / "val200.txt").write_text("images/a.png x\n")
    with pytest.raises(ValueError, match=r"val200.txt:1: expected 'relative/path label'"):
        build_splits(dataset="vtab1k/eurosat", data_dir=vtab, train_split="train800",
                     val_split_name="val200")
    with pytest.raises(ValueError, match="has no split 'train1000'"):
        build_splits(dataset="vtab1k/eurosat", data_dir=vtab, train_split="train1000")
    with pytest.raises(ValueError, match="unknown VTAB-1k task 'eurosatt'"):
        build_splits(dataset="vtab1k/eurosatt", data_dir=vtab)
    fgvc = make_fake_fgvc(tmp_path / "f", names=("dogs",))
    s = build_splits(dataset="fgvc/dogs", data_dir=fgvc, train_split="train+val")
    assert (len(s.train), s.val, len(s.test), s.classes) == (12, None, 6, ["1", "2"])
    assert (fgvc / "dogs" / "Images").is_dir()  # VPT's image folder for Stanford Dogs


def test_plan_and_estimate():
    p = plan("vpt", "vtab1k", "o")
    assert [len(s) for s in p.stages] == [56, 6] and len(p.final_jobs()) == 19 * 3
    first = p.tune_jobs(0, {t: {} for t in p.tasks})
    assert len(first) == 19 * 56
    # a stage's runs carry the winners of the stages before it
    second = p.tune_jobs(1, {t: {"lr_base": 0.5, "weight_decay": 0.0} for t in p.tasks})
    assert second[0].overrides == {"lr_base": 0.5, "weight_decay": 0.0, "peft_cfg.num_prompts": 1}
    assert second[0].output == Path("o/vpt/vtab1k/cifar/tune/lr_base=0.5-weight_decay=0.0-"
                                    "num_prompts=1")
    # E2VPT: four stages, and its unpruned row gets its own final runs
    e = plan("e2vpt", "vtab1k", "o", tasks=["dtd"], seeds=2)
    assert [len(s) for s in e.stages] == [40, 20, 9, 9] and e.variants == {"unpruned": 2}
    assert [j.output.parent.name for j in e.final_jobs()] == ["final"] * 2 + ["final-unpruned"] * 2
    with pytest.raises(ValueError, match="unknown vtab1k task"):
        plan("vpt", "vtab1k", "o", tasks=["cifar10"])
    with pytest.raises(ValueError, match="no reproduction protocol for method 'nope'"):
        plan("nope", "vtab1k", "o")
    with pytest.raises(ValueError, match="at least one value per key"):
        plan("vpt", "vtab1k", "o", grid={"lr": []})


def test_gpu_estimate_counts_step_ratios_evaluation_and_rewinding():
    from timm_peft.reproduce import EVAL_COST, PROTOCOLS
    # LION on one task, one seed: no search; 1000 images x 100 epochs at LION's step ratio,
    # then the 1,880 test images of DTD (SSF Table 8) once at its inference ratio
    est = estimate("lion", "vtab1k", tasks=["dtd"], seeds=1, img_per_s=100.0)
    train, infer, _ = PROTOCOLS["lion"].step_ratios
    want = (1000 * 100 * train + 1880 * EVAL_COST * infer) / 100.0 / 3600
    assert est["gpu_hours"] == pytest.approx(want) and est["runs"] == 1
    # a method without a measured ratio counts as the limit
    assert estimate("mlp3", "vtab1k", tasks=["dtd"], seeds=1, grid={"lr": [0.1]},
                    img_per_s=100.0)["gpu_hours"] == pytest.approx(
        (1000 * 100 + 1880 * EVAL_COST) / 100.0 / 3600)
    # tuning runs: 800 training images and 200 validated ones per epoch, no test
    one = estimate("mlp3", "vtab1k", tasks=["dtd"], seeds=1, grid={"lr": [0.1, 0.2]},
                   img_per_s=100.0)
    assert one["tune_runs"] == 2
    assert one["gpu_hours"] == pytest.approx(
        (2 * 100 * (800 + 200 * EVAL_COST) + 1000 * 100 + 1880 * EVAL_COST) / 100.0 / 3600)
    # E2VPT: the 18 runs of the two pruning stages and the pruned final runs train twice
    e = estimate("e2vpt", "vtab1k", tasks=["dtd"], seeds=1)
    assert (e["tune_runs"], e["final_runs"]) == (40 + 20 + 9 + 9, 2)
    assert e["training_images"] == 100 * (800 * (60 + 2 * 18) + 1000 * 2 + 1000)


def test_step_ratios_are_the_measured_ones():
    """The ratios of the GPU estimate are efficiency_cuda.json's (not typed in by hand)."""
    from timm_peft.reproduce import EVAL_COST, PROTOCOLS
    rows = json.loads((REPO / "benchmarks/results/efficiency_cuda.json").read_text())["rows"]
    vit = {r["method"]: r for r in rows if r["arch"] == "vit_small_patch16_224"
           and r["mode"] == "eager"}
    measured = 0
    for method, proto in PROTOCOLS.items():
        if proto.step_ratios is None:
            assert method not in vit or vit[method]["train_vs_limit"] == "-", method
            continue
        train, infer, row = proto.step_ratios
        assert (train, infer) == (vit[row]["train_vs_limit"], vit[row]["infer_vs_plain"]), method
        measured += 1
    assert measured == 7
    assert EVAL_COST == vit["plain timm model"]["infer_ms"] / vit["frozen-backbone limit"][
        "train_ms"]


def test_paper_numbers_name_their_tables():
    papers = Path("/work/shared/papers")
    for method, benches in paper_results().items():
        if method.startswith("_"):
            continue
        for bench, entry in benches.items():
            if bench == "reported":
                continue
            for key in ("per_task_source", "group_means_source"):
                if key in entry:
                    file = entry[key].split()[0]
                    assert file.endswith(".txt"), entry[key]
                    if papers.is_dir():
                        assert (papers / file).is_file(), file
    # spot checks against the papers' tables
    assert paper_results()["ssf"]["vtab1k"]["per_task"]["smallnorb_ele"] == 37.9
    assert paper_results()["vpt"]["vtab1k"]["group_means"]["structured"] == 54.98
    # full fine-tuning's 19-task mean (SSF abstract, Sec. 4.2, Table 4) is the 'all tasks' group
    assert paper_results()["full"]["vtab1k"]["group_means"]["all tasks"] == 65.57
    if papers.is_dir():
        assert "73.10% vs. 65.57%" in (papers / "ssf-neurips2022.txt").read_text()


def test_lion_gets_no_paper_numbers_on_benchmarks_it_did_not_run():
    from timm_peft.reproduce import format_table
    lion = paper_results()["lion"]
    assert set(lion) == {"reported"}  # neither vtab1k nor fgvc
    assert "5-species" in lion["reported"] and "Oxford Flowers-102" in lion["reported"]
    header = dict(method="lion", benchmark="fgvc", model="m", data_root="d", seeds=1,
                  stages=[[{}]], variants=[], train_args={})
    row = dict(task="flowers", group="fgvc", ours=50.0, seeds=[50.0], paper=None, diff=None,
               chosen={}, diverged=[], val_acc=None, variants={})
    table = format_table(header, [row], [])
    assert "| flowers | fgvc | 50.00 | — | — |" in table
    assert "none published for this method" in table and lion["reported"] in table
    assert "**not** the authors'" in table  # the header names the authors' checkpoint


def test_reproduce_spreads_runs_over_torchrun_processes(tmp_path):
    data = make_fake_vtab(tmp_path / "vtab-1k", tasks=("dtd",))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "timm_peft", "reproduce", "--method", "linear", "--benchmark", "vtab1k",
         "--data-root", str(data), "--model", "vit_tiny_patch16_224", "--tasks", "dtd",
         "--output", str(out), "--seeds", "2", "--grid", "lr=0.1,0.01", "--epochs", "1",
         "--batch-size", "4", "--no-pretrained", "--model-kwargs",
         *[f"{k}={v}" for k, v in TINY.items()], "--train-args", "workers=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    # each process ran one tuning and one final run
    for rank in (0, 1):
        assert log.count(f"[rank {rank}] tune dtd") == 1, log[-2000:]
        assert log.count(f"[rank {rank}] final dtd") == 1
    assert proc.stdout.count("| dtd | natural |") == 1  # rank 0 writes the table
    report = json.loads((out / "linear-vtab1k.json").read_text())
    assert len(report["rows"][0]["seeds"]) == 2


# the papers' baselines (issue 23): the protocol each runs, the recipe it brings, its paper number
BASELINES = {
    # method: (recipe optimiser, grid keys, paper number of dtd or natural group mean)
    "adapter": ("momentum", {"lr_base", "weight_decay"}, ("per_task", "dtd", 63.2)),
    "mlp3": ("momentum", {"lr_base", "weight_decay"}, ("group_means", "natural", 67.80)),
    "sidetune": ("momentum", {"lr_base", "weight_decay"}, ("group_means", "natural", 58.21)),
    "lora": ("adamw", {"lr"}, None),
    "adaptformer": ("adamw", {"lr"}, None),
}


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_baseline_reproductions_run_their_protocol(tmp_path, method):
    from timm_peft.reproduce import PROTOCOLS
    opt, keys, paper = BASELINES[method]
    assert set(PROTOCOLS[method].stages[0]) == keys and PROTOCOLS[method].seeds == 3
    data = make_fake_vtab(tmp_path / "vtab-1k", tasks=("dtd",))
    spy = Counting()
    point = {"lr_base": [0.5], "weight_decay": [0.001]} if "lr_base" in keys else {"lr": [0.01]}
    res = reproduce(method, "vtab1k", data, "vit_tiny_patch16_224", tasks=["dtd"],
                    output=tmp_path / "out", grid=point, seeds=1, train_args=QUICK, run=spy)
    assert len(spy.runs) == 1  # one grid point: no tuning, one final run
    cfg = spy.runs[0]
    assert cfg.model == f"vit_tiny_patch16_224.{method}" and cfg.opt == opt
    assert cfg.train_split == "train800val200" and cfg.test_split == "test"
    summary = json.loads((tmp_path / "out" / method / "vtab1k" / "dtd" / "final" / "seed0" /
                          "summary.json").read_text())
    assert summary["metrics"]["trainable_params"] > 0
    row = res.rows[0]
    assert row["ours"] == pytest.approx(summary["metrics"]["test_acc"] * 100, abs=0.01)
    table = res.table_md.read_text()
    if paper is None:
        assert row["paper"] is None and "none published for this method" in table
    else:
        kind, key, value = paper
        assert paper_results()[method]["vtab1k"][kind][key] == value
        natural = next(g for g in res.groups if g["group"] == "natural")
        assert (row["paper"] if kind == "per_task" else natural["paper"]) == value
        assert "vpt-eccv2022.txt Table 1" in table


def test_mlp3_fgvc_reproduction_through_the_cli(tmp_path, capsys):
    data = make_fake_fgvc(tmp_path / "fgvc", names=("cub",))
    out = tmp_path / "out"
    argv = ["reproduce", "--method", "mlp3", "--benchmark", "fgvc", "--data-root", str(data),
            "--model", "vit_tiny_patch16_224", "--tasks", "cub", "--output", str(out),
            "--seeds", "1", "--grid", "lr_base=0.5", "--epochs", "1", "--batch-size", "4",
            "--no-pretrained", "--model-kwargs", *[f"{k}={v}" for k, v in TINY.items()],
            "--train-args", "workers=0"]
    assert main(argv) == 0
    assert "| cub | fgvc |" in capsys.readouterr().out
    report = json.loads((out / "mlp3-fgvc.json").read_text())
    assert report["groups"][0]["paper"] == 79.80  # VPT Table 1, Mlp-3, FGVC


def test_ctrl_c_in_a_reproduction_says_the_same_command_continues(tmp_path, capsys,
                                                                 monkeypatch):
    from timm_peft.train import loop
    data = make_fake_fgvc(tmp_path / "fgvc", names=("cub",))
    argv = ["reproduce", "--method", "linear", "--benchmark", "fgvc", "--data-root", str(data),
            "--model", "vit_tiny_patch16_224", "--tasks", "cub", "--output", str(tmp_path / "o"),
            "--seeds", "1", "--grid", "lr_base=0.5", "--epochs", "2", "--batch-size", "4",
            "--no-pretrained", "--model-kwargs", *[f"{k}={v}" for k, v in TINY.items()],
            "--train-args", "workers=0"]
    original = loop._Trainer.log

    def interrupt_in_epoch_2(self, record):
        if record.get("epoch") == 2:
            raise KeyboardInterrupt
        return original(self, record)
    monkeypatch.setattr(loop._Trainer, "log", interrupt_in_epoch_2)
    assert main(argv) == 130
    run = tmp_path / "o" / "linear" / "fgvc" / "cub" / "final" / "seed0"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"timm-peft reproduce: interrupted in {run}: the same command continues (finished runs "
        "are kept, an interrupted one resumes from its last checkpoint)")
    monkeypatch.setattr(loop._Trainer, "log", original)
    assert main(argv) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["phase"] == "train"] == [1, 2]  # resumed, not redone


def test_e2vpt_reproduction_diverges_prunes_and_squashes(tmp_path):
    """E2VPT's four stages on a wide-image task: one learning rate diverges (recorded, the search
    goes on), the pruning stage runs in the published (pruned) final runs and not in the
    unpruned row, and every run squashes the 48x12 images whole."""
    from timm_peft.reproduce import DIVERGED_NAME
    from timm_peft.train import build_transforms
    data = make_fake_vtab(tmp_path / "vtab-1k", tasks=("kitti",), image_size=(48, 12))
    out = tmp_path / "out"
    spy = Counting()
    stages = [{"lr_base": [1e40, 0.5], "weight_decay": [0.0]},
              {"peft_cfg.num_prompts": [2], "peft_cfg.num_kv_prompts": [1]},
              {"peft_cfg.token_prune_ratio": [0.5]}, {"peft_cfg.segment_prune_ratio": [0.5]}]
    kw = dict(tasks=["kitti"], output=out, grid=stages, seeds=1, train_args=QUICK, run=spy)
    res = reproduce("e2vpt", "vtab1k", data, "vit_tiny_patch16_224", **kw)
    root = out / "e2vpt/vtab1k/kitti"
    # 2 tuning runs of stage 1 (the one-point stages need none) + pruned and unpruned final
    assert len(spy.runs) == 4
    lost = root / "tune" / "lr_base=1e+40-weight_decay=0.0"
    assert "loss is" in json.loads((lost / DIVERGED_NAME).read_text())["diverged"]
    assert not (lost / "summary.json").exists()
    row = res.rows[0]
    assert row["diverged"] == ["lr_base=1e+40-weight_decay=0.0"]
    assert row["chosen"] == {"lr_base": 0.5, "weight_decay": 0.0, "peft_cfg.num_prompts": 2,
                             "peft_cfg.num_kv_prompts": 1, "peft_cfg.token_prune_ratio": 0.5,
                             "peft_cfg.segment_prune_ratio": 0.5}
    assert row["variants"]["unpruned"]["chosen"] == {
        "lr_base": 0.5, "weight_decay": 0.0, "peft_cfg.num_prompts": 2,
        "peft_cfg.num_kv_prompts": 1}
    pruned = json.loads((root / "final/seed0/summary.json").read_text())["metrics"]
    unpruned = json.loads((root / "final-unpruned/seed0/summary.json").read_text())["metrics"]
    assert [s["stage"] for s in pruned["stages"]] == ["score", "prune", "rewind"]
    assert unpruned["stages"] == []
    assert pruned["adapter_bytes"] < unpruned["adapter_bytes"]  # pruned prompts are not saved
    assert row["ours"] == pytest.approx(pruned["test_acc"] * 100, abs=0.01)
    assert row["variants"]["unpruned"]["ours"] == pytest.approx(unpruned["test_acc"] * 100,
                                                                abs=0.01)
    table = res.table_md.read_text()
    assert "| ours unpruned |" in table and "lr_base=1e+40-weight_decay=0.0 |" in table
    assert res.groups[0]["variants"]["unpruned"] == row["variants"]["unpruned"]["ours"]
    # the squash resize: every run's data config, and its transform keeps the image's whole width
    for cfg in spy.runs:
        assert cfg.crop_mode == "squash"
    data_cfg = json.loads((root / "final/seed0/args.json").read_text())["data_config"]
    assert data_cfg["crop_mode"] == "squash"
    _, eval_tf = build_transforms(data_cfg, False)
    wide = np.zeros((12, 48, 3), np.uint8)
    wide[:, :4] = (255, 0, 0)  # a red left edge and a blue right edge, 4 px of 48
    wide[:, -4:] = (0, 0, 255)
    x = eval_tf(Image.fromarray(wide))
    assert x.shape[-2:] == (32, 32)
    left, right = x[:, :, 0].mean(1), x[:, :, -1].mean(1)  # RGB of the outer columns
    assert left[0] > left[2] and right[2] > right[0]  # centre-cropping would have cut both
    # again: the diverged point is not run again, nothing is
    spy.runs.clear()
    reproduce("e2vpt", "vtab1k", data, "vit_tiny_patch16_224", **kw)
    assert spy.runs == []


def test_a_stage_where_every_point_diverges_says_so(tmp_path):
    data = make_fake_vtab(tmp_path / "vtab-1k", tasks=("dtd",))
    with pytest.raises(RuntimeError, match="every point of this search stage diverged for task "
                                           "dtd"):
        reproduce("linear", "vtab1k", data, "vit_tiny_patch16_224", tasks=["dtd"],
                  output=tmp_path / "out", grid={"lr_base": [1e40, 5e39]}, seeds=1,
                  train_args=QUICK)


def _readme_block(name):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = f"<!-- {name}: generated by timm_peft.reproduce."
    block = text.split(start, 1)[1].split("\n", 1)[1]
    return block.split(f"<!-- end of {name} -->", 1)[0]


def test_readme_tables_are_the_generated_ones():
    from timm_peft.reproduce import gpu_table, protocol_table
    assert _readme_block("protocol table") == protocol_table()
    assert _readme_block("GPU table") == gpu_table()


@pytest.mark.parametrize("benchmark", ["vtab1k", "fgvc"])
def test_dry_run_prints_the_readme_protocol_of_each_method(benchmark, capsys):
    """``--dry-run``'s protocol lines for every method are the README table's rows."""
    from timm_peft.reproduce import ITEMS, PROTOCOLS
    rows = {}
    current = None
    for line in _readme_block("protocol table").splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if cells[0]:
            current = [m.strip("`") for m in cells[0].split(", ")]
        for method in current:
            rows.setdefault(method, {})[cells[1]] = cells[2:]
    assert set(rows) == set(PROTOCOLS)
    for method in PROTOCOLS:
        assert main(["reproduce", "--method", method, "--benchmark", benchmark, "--data-root",
                     "x", "--dry-run"]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert printed[0] == f"{method} on {benchmark}: the protocol"
        for item, line in zip(ITEMS, printed[1:]):
            vtab, fgvc, source = rows[method][item]
            want = vtab if benchmark == "vtab1k" or fgvc == "same" else fgvc
            assert line == f"  {item}: {want}  [{source}]", (method, item)
        assert "GPU hours" in printed[len(ITEMS) + 1]


#: what issue 27 and the papers say each protocol runs, checked on the runs' own TrainConfigs
#: (independent of the table's renderer)
def test_runs_follow_the_papers_protocols():
    from timm_peft.reproduce import PROTOCOLS, _base_values, job_config
    from timm_peft.train import TrainConfig

    def configs(method, benchmark):
        proto = PROTOCOLS[method]
        p = plan(method, benchmark, "o", tasks=[BENCH_TASK[benchmark]])
        base = _base_values(method, benchmark, "/data", None, {})
        fixed, tune = {}, []
        for points in p.stages:
            for point in points:
                tune.append(TrainConfig(**job_config(
                    base, benchmark, _job(p, "tune"), dict(fixed, **point), "")))
            fixed = dict(fixed, **points[0])
        final = TrainConfig(**job_config(base, benchmark, p.final_jobs()[0], fixed,
                                         proto.final_split[benchmark]))
        return tune, final

    for benchmark in ("vtab1k", "fgvc"):
        for method in PROTOCOLS:
            tune, final = configs(method, benchmark)
            assert all(c.val_split_name and c.test_split is None for c in tune)
            assert final.val_split_name is None and final.test_split == "test"
            # VTAB-1k squashes (issue 27 item 1); FGVC's final runs train on train (item 7)
            if benchmark == "vtab1k":
                assert {c.crop_mode for c in tune + [final]} == {"squash"}, method
                assert final.train_split == "train800val200"
            else:
                assert final.train_split == "train" and final.aug
                # VPT's code's crops for the methods run with its code, timm's RRC for SSF's
                vpt_code = PROTOCOLS[method].recipe in ("vpt", "e2vpt", "full")
                assert {(c.train_crop_mode, c.crop_mode, c.crop_pct) for c in tune + [final]} \
                    == ({("squash", "squash", 224 / 256)} if vpt_code else {(None, None, None)})
        # item 3: full fine-tuning is VPT's code's AdamW with 5 warm-up epochs
        tune, final = configs("full", benchmark)
        assert {c.opt for c in tune} == {"adamw"} and final.warmup_epochs == 5
        assert {c.lr for c in tune} == {1e-3, 5e-4, 1e-4, 5e-3}
        # item 2: the prompt lengths of the papers
        tune, _ = configs("vpt", benchmark)
        assert {c.peft_cfg.get("num_prompts") for c in tune} >= {1, 5, 10, 50, 100, 200}
        tune, final = configs("e2vpt", benchmark)
        assert {c.peft_cfg.get("num_prompts") for c in tune} >= {5, 10, 20, 30, 50}
        assert {c.peft_cfg.get("num_kv_prompts") for c in tune} >= {1, 5, 10, 50}
        # item 4: pruning ratios 10 % to 90 %, and the published final run prunes
        assert {c.peft_cfg.get("token_prune_ratio") for c in tune} >= {
            r / 10 for r in range(1, 10)}
        assert final.peft_cfg["token_prune_ratio"] > 0
        # item 6: SSF's scripts' learning rates, weight decays, drop-path and EMA are searched
        tune, _ = configs("ssf", benchmark)
        assert {2e-4, 2.5e-4, 5e-2} <= {c.lr for c in tune}
        assert {5e-5, 5e-2} <= {c.weight_decay for c in tune}
        assert {0.1, 0.2} <= {c.drop_path for c in tune} and True in {c.model_ema for c in tune}
        # item 7: VPT's code normalises with ImageNet's mean/std
        _, final = configs("vpt", benchmark)
        assert final.mean == (0.485, 0.456, 0.406) and final.std == (0.229, 0.224, 0.225)
    # item 5: one checkpoint per method, as its authors used
    assert PROTOCOLS["ssf"].backbone == "vit_base_patch16_224.augreg_in21k"
    assert PROTOCOLS["vpt"].backbone == PROTOCOLS["e2vpt"].backbone == \
        "vit_base_patch16_224.orig_in21k"
    assert "orig_in21k, the original checkpoint these papers used" not in \
        paper_results()["_about"]


BENCH_TASK = {"vtab1k": "kitti", "fgvc": "cub"}


def _job(p, phase):
    from timm_peft.reproduce import Job
    return Job(p.tasks[0], phase, "x", {}, Path("o"))


def test_selection_last_or_best_epoch_ties_to_the_smaller_lr(tmp_path):
    """VPT's code scores a point by its last epoch's validation accuracy, ties to the smaller
    learning rate; "best" takes the best epoch's (the run's summary)."""
    from timm_peft.reproduce import DIVERGED_NAME, Job, _choose
    jobs = []
    for lr, best, last in ((0.1, 0.9, 0.5), (0.01, 0.6, 0.6), (0.001, 0.6, 0.6), (1.0, 0, 0)):
        d = tmp_path / f"lr={lr}"
        d.mkdir()
        if lr == 1.0:
            (d / DIVERGED_NAME).write_text(json.dumps(dict(diverged="loss is nan")))
        else:
            (d / "summary.json").write_text(json.dumps(dict(metrics=dict(val_acc=best))))
            (d / "log.jsonl").write_text("\n".join(json.dumps(r) for r in (
                dict(phase="train", epoch=1, val_acc=best), dict(phase="train", epoch=2,
                                                                 val_acc=last),
                dict(phase="final", val_acc=best))) + "\n")
        jobs.append(Job("dtd", "tune", d.name, {"lr": lr}, d))
    assert _choose(jobs, "last") == ({"lr": 0.001}, 0.6, ["lr=1.0"])
    assert _choose(jobs, "best") == ({"lr": 0.1}, 0.9, ["lr=1.0"])
