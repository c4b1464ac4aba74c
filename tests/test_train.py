"""The training loop: adapters it saves, resume, schedule, optimiser groups, method hooks."""
import json
import math
import os
from dataclasses import dataclass

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import timm_peft
from timm_peft import core
from timm_peft.data import DataError
from timm_peft.train import (LOG_NAME, TrainConfig, create_optimizer, create_scheduler,
                             evaluate_adapter, get_recipe, train)
from timm_peft.train.loop import _Trainer

#: a ViT small enough for a training step in milliseconds (17 tokens of width 48)
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A local 'pretrained' base, loaded through timm's own pretrained path."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny_vit.safetensors"
    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _cfg(weights, out, **kw):
    values = dict(model="vit_tiny_patch16_224.bias", model_kwargs=TINY,
                  pretrained_file=str(weights), task="count", train_size=48, test_size=24,
                  val_split=0.25, epochs=2, warmup_epochs=0.5, batch_size=12, lr=3e-3,
                  workers=0, progress=False, output=str(out))
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def run(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    return _cfg(weights, out), train(_cfg(weights, out))


def _log(out):
    return [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]


def test_train_writes_a_loadable_adapter_whose_accuracy_matches_the_log(run, weights):
    cfg, result = run
    log = _log(result.output_dir)
    epochs = [r for r in log if r["phase"] == "train"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert [r["step"] for r in epochs] == [3, 6]  # 36 training images / batch 12
    assert {"train_loss", "train_acc", "val_acc", "lr", "img_per_s"} <= set(epochs[0])
    final = log[-1]
    assert final["phase"] == "final" and final["val_acc"] == max(r["val_acc"] for r in epochs)
    # reloaded from disk through the public API, on the same data
    for split in ("val", "test"):
        res = evaluate_adapter(result.adapter_dir, split, pretrained_file=str(weights))
        assert res["acc"] == final[f"{split}_acc"] and res["n"] == (12 if split == "val" else 24)
    model = timm_peft.from_pretrained(result.adapter_dir, pretrained_cfg_overlay=dict(
        file=str(weights), custom_load=False))
    assert model.peft_method == "bias" and model.num_classes == 6
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["metrics"]["test_acc"] == final["test_acc"]


def test_resume_continues_from_the_saved_step(run, weights, tmp_path, monkeypatch):
    """Interrupted in epoch 2, resumed: the same adapter as the uninterrupted run."""
    _, reference = run
    out = tmp_path / "run"
    original_log = _Trainer.log

    def crash_in_epoch_2(self, record):
        if record.get("epoch") == 2:
            raise KeyboardInterrupt
        original_log(self, record)

    monkeypatch.setattr(_Trainer, "log", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(weights, out))
    monkeypatch.setattr(_Trainer, "log", original_log)
    assert not (out / "adapter").exists()
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(_cfg(weights, out))

    resumed = train(_cfg(weights, out, output=None, resume=str(out)))
    steps = [(r["epoch"], r["step"]) for r in _log(out) if r["phase"] == "train"]
    assert steps == [(1, 3), (2, 6)]
    # the last epoch's state (the checkpoint) and the best one (the adapter) both match
    last = [torch.load(r.output_dir / "checkpoint.pt", weights_only=True)["adapter"]
            for r in (resumed, reference)]
    best = [load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (resumed, reference)]
    for a, b in (last, best):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert not torch.equal(last[1]["head.weight"], best[1]["head.weight"]) or \
        reference.metrics["best_epoch"] == 2
    assert resumed.metrics["test_acc"] == reference.metrics["test_acc"]


def test_overwrite_starts_a_finished_run_over(run, weights, tmp_path):
    """A finished run without a checkpoint is still a run; --overwrite replaces it whole."""
    out = tmp_path / "run"
    first = train(_cfg(weights, out, epochs=1, warmup_epochs=0, checkpoint=False))
    (first.adapter_dir / "stale.txt").write_text("from the first run")
    with pytest.raises(ValueError, match=r"already holds a run \(log.jsonl, log.txt, summary.csv, args.json, "
                                         r"summary.json, adapter\); start it over with --overwrite"):
        train(_cfg(weights, out))
    with pytest.raises(ValueError, match="either resume .* or overwrite"):
        _cfg(weights, out, overwrite=True, resume=str(out))
    with pytest.raises(ValueError, match="'nope' is neither one of its weight tags nor a PEFT "
                                         "method"):  # fails before deleting
        train(_cfg(weights, out, overwrite=True, model="vit_tiny_patch16_224.nope"))
    assert (first.adapter_dir / "stale.txt").exists() and (out / "log.jsonl").exists()
    second = train(_cfg(weights, out, overwrite=True))
    assert [r["epoch"] for r in _log(out) if r["phase"] == "train"] == [1, 2]  # no stale lines
    assert not (second.adapter_dir / "stale.txt").exists()
    assert second.metrics["test_acc"] == run[1].metrics["test_acc"]  # same as a fresh directory
    umask = os.umask(0)
    os.umask(umask)
    for f in second.adapter_dir.iterdir():  # as open() would make them, not mkstemp's 0600
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_resume_rejects_another_model_or_class_count(run, weights):
    _, result = run
    with pytest.raises(ValueError, match=r"num_classes 6 \(this run's data: 8\)"):
        train(_cfg(weights, None, output=None, resume=str(result.output_dir), task="orientation"))
    with pytest.raises(ValueError, match="model 'vit_tiny_patch16_224.bias'.*linear"):
        train(_cfg(weights, None, output=None, resume=str(result.output_dir),
                   model="vit_tiny_patch16_224.linear"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_cfg(weights, None, output=None, resume=str(result.adapter_dir)))


def test_train_on_an_image_folder(tmp_path, weights):
    colors = {"blue": (20, 40, 220), "red": (220, 30, 20)}
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        for name, rgb in colors.items():
            d = tmp_path / "data" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + i, 20), tuple(max(0, c - 15 * i) for c in rgb)).save(d / f"{i}.png")
    cfg = _cfg(weights, tmp_path / "out", task=None, data_dir=str(tmp_path / "data"), val_split=0.0,
               epochs=3, warmup_epochs=0, batch_size=4, lr=0.05, model="vit_tiny_patch16_224.linear",
               pretrained_cfg=dict(mean=[0.4] * 3, std=[0.3] * 3))
    result = train(cfg)
    final = _log(result.output_dir)[-1]
    ev = dict(pretrained_file=str(weights))  # the caller's weights, never the adapter's
    assert final["test_acc"] == evaluate_adapter(result.adapter_dir, "test", **ev)["acc"]
    assert final["val_acc"] == evaluate_adapter(result.adapter_dir, "val", **ev)["acc"] == 1.0
    args = json.loads((result.adapter_dir / "training_args.json").read_text())
    assert args["classes"] == ["blue", "red"]
    # the weights' description reaches timm's pretrained_cfg and so the data pipeline
    assert args["data_config"]["mean"] == [0.4] * 3 and args["data_config"]["std"] == [0.3] * 3


def test_bad_data_is_a_clear_error(tmp_path, weights):
    with pytest.raises(DataError, match="does not exist"):
        train(_cfg(weights, tmp_path / "o", task=None, data_dir=str(tmp_path / "nope")))
    for split, classes in (("train", ["a", "b"]), ("val", ["a", "c"])):
        for c in classes:
            (tmp_path / "d" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "d" / split / c / "0.png")
    with pytest.raises(DataError, match=r"class folders differ.*missing in val/: \['b'\]"):
        train(_cfg(weights, tmp_path / "o", task=None, data_dir=str(tmp_path / "d")))


def test_bad_model_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="'nope' is neither one of its weight tags nor a PEFT "
                                         "method.*'a1_in1k'.*'linear'"):
        train(TrainConfig(model="resnet18.nope", task="count", progress=False, output=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown PEFT method suffix 'nope'.*'linear'"):
        train(TrainConfig(model="resnet18.a1_in1k.nope", task="count", output=str(tmp_path)))
    with pytest.raises(ValueError, match="names no PEFT method.*'resnet18.linear'"):
        train(TrainConfig(model="resnet18", task="count", progress=False, output=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown timm architecture 'resnet_nope'"):
        train(TrainConfig(model="resnet_nope.linear", task="count", output=str(tmp_path)))


def test_config_validation_and_recipes():
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown optimiser 'sgdd'.*'adamw'"):
        TrainConfig(opt="sgdd")
    with pytest.raises(ValueError, match="either task or data_dir"):
        TrainConfig(task="count", data_dir="x")
    with pytest.raises(ValueError, match="may not set 'num_classes'"):
        TrainConfig(model_kwargs=dict(num_classes=3))
    with pytest.raises(ValueError, match="warmup_epochs .* less than epochs"):
        TrainConfig(epochs=2, warmup_epochs=2)
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*vtab1k"):
        TrainConfig.from_recipes(["nope"])
    cfg = TrainConfig.from_recipes(["vtab1k", "vpt"], lr_base=0.5, batch_size=32)
    assert (cfg.val_split, cfg.aug, cfg.crop_pct) == (0.2, False, 1.0)  # vtab1k
    assert (cfg.opt, cfg.epochs, cfg.warmup_epochs) == ("momentum", 100, 10)  # vpt
    assert cfg.resolved_lr(world_size=2) == 0.5 * 64 / 256  # scaled by the global batch
    assert get_recipe("fgvc").settings["val_split"] == 0.1


def test_schedule_is_warmup_then_cosine():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([dict(params=[p], lr=0.1), dict(params=[nn.Parameter(torch.zeros(1))], lr=0.4)])
    cfg = TrainConfig(lr=0.1, epochs=5, warmup_epochs=1, warmup_lr=0.0, min_lr=0.001)
    sched = create_scheduler(opt, cfg, epochs=5, steps_per_epoch=4)
    W, T = 4, 20
    for t in range(T + 1):
        sched.step_update(t)
        for group, base in zip(opt.param_groups, (0.1, 0.4)):
            want = base * t / W if t < W else \
                0.001 + 0.5 * (base - 0.001) * (1 + math.cos(math.pi * (t - W) / (T - W)))
            assert group["lr"] == pytest.approx(want), t


@dataclass
class _HookedConfig(core.PeftConfig):
    pass


class _Hooked(core.PeftMethod):
    """A test method using every training hook."""

    name = "hooked_test_method"
    config_cls = _HookedConfig
    calls: list = []

    def apply(self, model, config):
        fc = model.blocks[-1].mlp
        fc.fc1.requires_grad_(True)
        fc.fc2.weight.requires_grad_(True)
        return model

    def training_hooks(self, model):
        calls = self.calls

        class Wrapped:  # forwards everything to the optimiser, records that it wrapped it
            def __init__(self, opt):
                self.__dict__["opt"] = opt

            def __getattr__(self, item):
                return getattr(self.opt, item)

            def step(self, *a, **k):
                calls.append("step")
                return self.opt.step(*a, **k)

        def stage(m, ctx):
            calls.append(("stage", ctx.epochs, ctx.device.type, ctx.val_loader is not None))
            m.blocks[-1].mlp.fc1.requires_grad_(False)
            return ctx.fit(m, 1, "extra")

        def metrics(reset):
            steps = calls.count("step")
            if reset:
                calls.append(("reset", steps))
                return {}
            return {"steps_since_reset": steps - [c for c in calls if c[0] == "reset"][-1][1]}

        return {"optimizer_wrapper": lambda opt, m: Wrapped(opt),
                "no_weight_decay": {"blocks.1.mlp.fc2.weight"},
                "stages": [("extra", stage)], "metrics": metrics}


@pytest.fixture
def hooked():
    core.register_method(_Hooked)
    _Hooked.calls.clear()
    yield _Hooked
    core._METHODS.pop(_Hooked.name)
    core._PRESETS.pop(_Hooked.name)


def test_optimizer_groups_follow_the_rules_and_the_hooks(hooked):
    model = timm.create_model(f"vit_tiny_patch16_224.{hooked.name}", num_classes=3, **TINY)
    opt = create_optimizer(model, TrainConfig(opt="adamw", lr=0.01, head_lr=0.1, weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert got == {
        "blocks.1.mlp.fc1.weight": (0.01, 0.05),
        "blocks.1.mlp.fc1.bias": (0.01, 0.0),   # 1-D
        "blocks.1.mlp.fc2.weight": (0.01, 0.0),  # the method's no_weight_decay hook
        "head.weight": (0.1, 0.05),              # head learning rate
        "head.bias": (0.1, 0.0),
    }
    assert type(opt).__name__ == "Wrapped"


def test_hooks_drive_the_loop(hooked, weights, tmp_path):
    result = train(_cfg(weights, tmp_path / "run", model=f"vit_tiny_patch16_224.{hooked.name}",
                        epochs=2, warmup_epochs=0))
    assert hooked.calls.count("step") == 6 + 3  # 2 epochs, then the 1-epoch stage
    assert ("stage", 2, "cpu", True) in hooked.calls
    phases = [(r["phase"], r.get("epoch")) for r in _log(result.output_dir)]
    assert phases[:3] == [("train", 1), ("train", 2), ("extra", 1)]
    assert phases[-2:] == [("extra", None), ("final", None)]  # stage done, then the adapter
    # the method's metrics: reset before each epoch, logged after it under the method's name
    per_epoch = [r.get(f"{hooked.name}/steps_since_reset") for r in _log(result.output_dir)][:3]
    assert per_epoch == [3, 3, 3]
