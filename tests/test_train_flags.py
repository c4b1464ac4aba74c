"""timm train.py flags in ``timm-peft train``: each one a few steps, with its effect asserted."""
import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from timm_peft.train import loop as train_loop
from timm_peft.cli import main
from timm_peft.train import (CHECKPOINT_NAME, LOG_NAME, AdapterEma, TrainConfig, build_model,
                             build_transforms, train)

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48)
TINY_ARGS = [f"{k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny_vit.safetensors"
    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _cfg(weights, out, **kw):
    values = dict(model="vit_tiny_patch16_224.bias", model_kwargs=TINY, pretrained_file=str(weights),
                  task="count", train_size=24, test_size=8, epochs=1, batch_size=12, lr=0.05,
                  opt="momentum", workers=0, progress=False, output=str(out))
    values.update(kw)
    return TrainConfig(**values)


def _adapter(result):
    return load_file(str(result.adapter_dir / "adapter_model.safetensors"))


def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(weights):
    grads, calls = [], []
    for flag in (False, True):
        cfg = TrainConfig(model="vit_tiny_patch16_224.bias", model_kwargs=TINY,
                          pretrained_file=str(weights), grad_checkpointing=flag)
        model = build_model(cfg, num_classes=3).train()
        n = []
        model.blocks[0].mlp.fc1.register_forward_hook(lambda *a: n.append(1))
        torch.manual_seed(0)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        calls.append(len(n))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert calls == [1, 2]  # the checkpointed block runs again in the backward pass
    assert grads[0].keys() == grads[1].keys() and any("blocks.0" in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k])


def test_channels_last_reaches_the_forward(weights, tmp_path, monkeypatch):
    seen = []

    def hook(module, args):
        seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    real = train_loop.build_model

    def spy(cfg, num_classes):
        m = real(cfg, num_classes)
        m.patch_embed.proj.register_forward_pre_hook(hook)
        return m
    monkeypatch.setattr(train_loop, "build_model", spy)
    train(_cfg(weights, tmp_path / "cl", channels_last=True))
    assert seen and all(seen)
    seen.clear()
    train(_cfg(weights, tmp_path / "plain"))
    assert seen and not any(seen)


def test_torchcompile_compiles_the_training_model(weights, tmp_path, monkeypatch):
    compiled = []
    real = torch.compile

    def spy(model, **kw):
        compiled.append((type(model).__name__, kw))
        return real(model, **kw)
    monkeypatch.setattr(torch, "compile", spy)
    a = train(_cfg(weights, tmp_path / "c", torchcompile="eager", torchcompile_mode="default"))
    assert compiled == [("VisionTransformer", dict(backend="eager", mode="default"))]
    b = train(_cfg(weights, tmp_path / "e"))
    for k, v in _adapter(a).items():  # the eager backend computes what eager mode computes
        torch.testing.assert_close(v, _adapter(b)[k], rtol=1e-4, atol=1e-6)


def test_model_ema_saves_the_average_not_the_raw_weights(weights, tmp_path):
    res = train(_cfg(weights, tmp_path / "ema", model_ema=True, model_ema_decay=0.5))
    ckpt = torch.load(tmp_path / "ema" / CHECKPOINT_NAME, weights_only=True)
    saved = _adapter(res)
    moved = [k for k in saved if not torch.equal(ckpt["ema"][k], ckpt["adapter"][k])]
    assert moved  # the average lags the raw weights
    for k in saved:
        torch.testing.assert_close(saved[k], ckpt["ema"][k])


def test_adapter_ema_is_timms_average_of_the_trainable_tensors_only():
    model = timm.create_model("vit_tiny_patch16_224.bias", num_classes=2, **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema = AdapterEma(model, decay=0.75)
    assert sorted(ema.state_dict()) == sorted(model.peft_adapter_keys)
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)
        ema.update(model, step=step)
    # timm's schedule: the first update copies, later ones keep 0.75 of the average
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, 0.75 * (before[k] + 1) + 0.25 * (before[k] + 2))
    frozen = [k for k in before if k not in ema.state_dict()]
    assert frozen and all(torch.equal(model.state_dict()[k], before[k]) for k in frozen)


def test_mixup_and_cutmix_give_soft_targets(weights, tmp_path, monkeypatch):
    from timm.loss import SoftTargetCrossEntropy
    targets = []
    real = SoftTargetCrossEntropy.forward

    def spy(self, x, target):
        targets.append(target.detach().clone())
        return real(self, x, target)
    monkeypatch.setattr(SoftTargetCrossEntropy, "forward", spy)
    train(_cfg(weights, tmp_path / "m", mixup=0.8, cutmix=1.0, smoothing=0.1, epochs=2,
               mixup_off_epoch=1))
    assert len(targets) == 4
    t = torch.cat(targets[:2])
    assert t.shape == (24, 6)
    torch.testing.assert_close(t.sum(1), torch.ones(24))
    assert (t.max(1).values < 0.95).all()  # mixed and smoothed, never one-hot
    off = torch.cat(targets[2:])  # --mixup-off-epoch 1: the second epoch is smoothed only
    assert torch.allclose(off.max(1).values, torch.full((24,), 0.9 + 0.1 / 6))
    with pytest.raises(ValueError, match="--batch-size must be even"):
        train(_cfg(weights, tmp_path / "odd", mixup=0.8, batch_size=5))


def test_grad_accumulation_equals_the_larger_batch(weights, tmp_path):
    big = train(_cfg(weights, tmp_path / "big", batch_size=12))
    acc = train(_cfg(weights, tmp_path / "acc", batch_size=6, grad_accum_steps=2))
    steps = [json.loads(line)["step"] for line in (tmp_path / "acc" / LOG_NAME).read_text().splitlines()]
    assert steps[0] == 2  # 24 images, 4 batches of 6, 2 updates
    a, b = _adapter(big), _adapter(acc)
    assert any(not torch.equal(a[k], load_file(str(weights)).get(k, a[k])) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_drop_path_and_drop_reach_the_model(weights):
    m = build_model(TrainConfig(model="vit_tiny_patch16_224.bias", model_kwargs=TINY,
                                pretrained_file=str(weights), drop_path=0.2, drop=0.1), 3)
    assert m.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)  # timm: linear in depth
    assert m.head_drop.p == 0.1
    with pytest.raises(ValueError, match="may not set 'drop_path_rate'.*--drop-path"):
        TrainConfig(model_kwargs=dict(drop_path_rate=0.1))


def test_augmentation_flags_build_timms_training_transform():
    data_cfg = dict(input_size=[3, 32, 32], interpolation="bicubic", mean=[0.5] * 3,
                    std=[0.5] * 3, crop_pct=1.0)
    tf, eval_tf = build_transforms(data_cfg, TrainConfig(aug=True, aa="rand-m9-mstd0.5",
                                                         reprob=0.25, vflip=0.5))
    names = [type(t).__name__ for t in tf.transforms]
    assert "RandAugment" in names and "RandomErasing" in names and "RandomVerticalFlip" in names
    assert tf is not eval_tf
    plain, _ = build_transforms(data_cfg, TrainConfig())
    assert plain is _  # VTAB-1k: no augmentation
    with pytest.raises(ValueError, match="--aa, --reprob set.*add --aug"):
        TrainConfig(aa="rand-m9", reprob=0.25)


def test_warmup_default_fits_a_one_epoch_run():
    assert TrainConfig(epochs=1).warmup_epochs == 0.0
    assert TrainConfig(epochs=5).warmup_epochs == 1.0


def _cli_args(weights, out, *extra):
    return ["train", "--model", "vit_tiny_patch16_224.bias", "--model-kwargs", *TINY_ARGS,
            "--pretrained-file", str(weights), "--task", "count", "--train-size", "24",
            "--test-size", "8", "--val-split", "0.25", "--batch-size", "6", "--workers", "0",
            "--no-progress", "--output", str(out), *extra]


def test_cli_logs_header_and_epochs_resumes_from_the_directory_alone(weights, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli_args(weights, out, "--epochs", "1", "--label-smoothing", "0.1")) == 0
    err = capsys.readouterr().err
    assert f"run {out}: model=vit_tiny_patch16_224.bias" in err  # --no-progress keeps the log
    assert "train epoch 1/1: train_loss=" in err and " lr=" in err and "time=" in err
    logfile = (out / "log.txt").read_text()
    assert "train epoch 1/1" in logfile and "run " in logfile
    csv = (out / "summary.csv").read_text().splitlines()
    assert csv[0] == "epoch,train_loss,train_acc,eval_loss,eval_acc,lr" and len(csv) == 2
    assert json.loads((out / "args.json").read_text())["smoothing"] == 0.1

    # continue to 3 epochs with nothing but the directory and the new length
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 0
    log = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in log if r["phase"] == "train"] == [1, 2, 3]
    args = json.loads((out / "args.json").read_text())
    assert args["smoothing"] == 0.1 and args["epochs"] == 3 and args["task"] == "count"
    assert len((out / "summary.csv").read_text().splitlines()) == 4
    capsys.readouterr()
    (tmp_path / "nothing").mkdir()
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no args.json" in capsys.readouterr().err


def test_full_warning_names_the_users_flag(weights, tmp_path, capsys, recwarn):
    args = _cli_args(weights, tmp_path / "full", "--epochs", "1")
    args[args.index("vit_tiny_patch16_224.bias")] = "vit_tiny_patch16_224.full"
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "--model vit_tiny_patch16_224.full: this method trains every parameter" in err
    assert not [w for w in recwarn if "trains every parameter" in str(w.message)]


def test_dataset_folder_through_timm_create_dataset(weights, tmp_path):
    _folder_dataset(tmp_path / "d")
    res = train(_cfg(weights, tmp_path / "run", task=None, dataset="folder",
                     data_dir=str(tmp_path / "d"), val_split_name="validation", batch_size=4))
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["classes"] == ["ant", "bee"]
    assert (args["run"]["train_images"], args["run"]["val_images"], args["run"]["test_images"]) == (12, 4, 4)
    assert "val_acc" in res.metrics
    with pytest.raises(ValueError, match="has no nope/ folder"):
        train(_cfg(weights, tmp_path / "r2", task=None, dataset="folder",
                   data_dir=str(tmp_path / "d"), train_split="nope"))
    with pytest.raises(ValueError, match="streaming"):
        TrainConfig(dataset="wds/x", data_dir="d")


def test_dataset_hfds_from_a_local_hugging_face_dataset(weights, tmp_path):
    datasets = pytest.importorskip("datasets", reason="Hugging Face `datasets` is not installed")
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=["ant", "bee"])})
    for split in ("train", "test"):
        rows = dict(image=[Image.new("RGB", (16, 16), (60 * i, 0, 0)) for i in range(8)],
                    label=[i % 2 for i in range(8)])
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(
            str(tmp_path / "hf" / f"{split}.parquet"))
    res = train(_cfg(weights, tmp_path / "run", task=None, dataset=f"hfds/{tmp_path / 'hf'}",
                     batch_size=4))
    assert json.loads((tmp_path / "run" / "args.json").read_text())["classes"] == ["ant", "bee"]
    assert "test_acc" in res.metrics


def test_clip_grad_goes_through_timms_dispatch_with_the_mode(weights, tmp_path, monkeypatch):
    import timm.utils
    seen = []
    real = timm.utils.dispatch_clip_grad

    def spy(parameters, value, mode="norm", **kw):
        parameters = list(parameters)
        real(parameters, value, mode=mode, **kw)
        seen.append((value, mode, max(p.grad.abs().max().item() for p in parameters)))
    monkeypatch.setattr(timm.utils, "dispatch_clip_grad", spy)
    train(_cfg(weights, tmp_path / "clip", clip_grad=1e-3, clip_mode="value"))
    assert len(seen) == 2 and all(v == 1e-3 and m == "value" and g <= 1e-3 * (1 + 1e-6)
                                  for v, m, g in seen)


def _folder_dataset(root):
    """train/validation/test ImageFolder splits of two classes (timm's `folder` dataset)."""
    for split, n in (("train", 6), ("validation", 2), ("test", 2)):
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (200 if c == "bee" else 0, 0, i)).save(
                    root / split / c / f"{i}.png")
    return root


def test_timm_train_py_spellings_mean_what_they_mean_in_timm(weights, tmp_path, capsys):
    data = _folder_dataset(tmp_path / "d")
    out = tmp_path / "run"
    argv = ["train", "--model", "vit_tiny_patch16_224.bias", "--model-kwargs", *TINY_ARGS,
            "--pretrained-path", str(weights), "--dataset", "folder", "--data-dir", str(data),
            "--val-split", "validation", "-b", "4", "-j", "0", "--img-size", "32",
            "--num-classes", "2", "--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5",
            "--epochs", "3", "--warmup-epochs", "0", "--opt", "sgd", "--lr", "0.1",
            "--no-progress", "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    args = json.loads((out / "args.json").read_text())
    assert (args["batch_size"], args["workers"], args["img_size"], args["num_classes"]) == (4, 0, 32, 2)
    assert args["val_split_name"] == "validation" and args["val_split"] == 0.0  # timm's meaning
    assert args["pretrained_file"] == str(weights) and args["run"]["val_images"] == 4
    # timm's step schedule, stepped per update: lr x 0.5 after each epoch
    lrs = [r["lr"] for r in map(json.loads, (out / LOG_NAME).read_text().splitlines())
           if r["phase"] == "train"]
    assert lrs == pytest.approx([0.1 * 0.5 ** k for k in (1, 2, 3)])
    # a named split replaces a recipe's held-out fraction (vtab1k's 0.2), as the flag wins
    capsys.readouterr()
    assert main(argv + ["--recipe", "vtab1k", "--overwrite", "--epochs", "1"]) == 0, \
        capsys.readouterr().err
    assert json.loads((out / "args.json").read_text())["val_split"] == 0.0
    # our meaning of --val-split (a fraction) still holds, and a count that is not the data's
    capsys.readouterr()
    bad = argv[:argv.index("--val-split")] + ["--val-split", "0.25"] + argv[argv.index("-b"):]
    bad[bad.index("--num-classes") + 1] = "3"
    assert main(bad + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "num_classes is 3 but the data has 2 classes (ant, bee)" in err


def test_img_size_and_timm_schedulers_follow_timm():
    from timm_peft.train.factory import _data_config
    cfg = TrainConfig(model="resnet18.bias", pretrained=False, img_size=40)
    assert _data_config(cfg, build_model(cfg, num_classes=2))["input_size"] == [3, 40, 40]
    with pytest.raises(ValueError, match="either img_size .* or input_size"):
        TrainConfig(img_size=40, input_size=(3, 40, 40))
    from timm_peft.train import create_scheduler
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    cfg = TrainConfig(sched="multistep", decay_milestones=(1, 3), decay_rate=0.1, lr=1.0,
                      epochs=4, warmup_epochs=0)
    sched = create_scheduler(opt, cfg, cfg.epochs, 10)
    seen = []
    for step in (5, 10, 25, 30):
        sched.step_update(step)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_ctrl_c_says_what_was_saved_and_how_to_resume(weights, tmp_path, capsys, monkeypatch):
    original_log = train_loop._Trainer.log

    def interrupt_in(epoch):
        def log(self, record):
            if record.get("phase") == "train" and record.get("epoch") == epoch:
                raise KeyboardInterrupt
            return original_log(self, record)
        return log

    # before the first checkpoint: nothing is left that blocks the same command
    out = tmp_path / "run"
    argv = _cli_args(weights, out, "--epochs", "3")
    monkeypatch.setattr(train_loop._Trainer, "log", interrupt_in(1))
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("timm-peft train: interrupted before any checkpoint was saved")
    assert not out.exists()

    # in epoch 2: one line naming the checkpoint and the exact command that continues the run
    monkeypatch.setattr(train_loop._Trainer, "log", interrupt_in(2))
    assert main(argv) == 130  # the same command, no --overwrite needed
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"timm-peft train: interrupted: the last checkpoint is {out / CHECKPOINT_NAME} "
                    f"(epoch 1); continue with: timm-peft train --resume {out}")
    monkeypatch.setattr(train_loop._Trainer, "log", original_log)
    assert main(last.split("continue with: timm-peft ")[1].split()) == 0
    log = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in log if r["phase"] == "train"] == [1, 2, 3]

    # Python callers get the same message on a KeyboardInterrupt subclass
    from timm_peft.train import TrainingInterrupted
    monkeypatch.setattr(train_loop._Trainer, "log", interrupt_in(1))
    with pytest.raises(TrainingInterrupted, match="before any checkpoint") as info:
        train(_cfg(weights, tmp_path / "py", epochs=2))
    assert info.value.checkpoint is None and not (tmp_path / "py").exists()

    # after the adapter is saved (no checkpoints asked for), nothing of the finished run is lost
    def interrupt_at_the_end(self, record):
        if record.get("phase") == "final":
            raise KeyboardInterrupt
        return original_log(self, record)
    monkeypatch.setattr(train_loop._Trainer, "log", interrupt_at_the_end)
    with pytest.raises(TrainingInterrupted, match="after the adapter was saved"):
        train(_cfg(weights, tmp_path / "done", checkpoint=False))
    assert (tmp_path / "done" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_of_a_path_that_does_not_exist_names_it(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert f"--resume {tmp_path / 'nope'}: no such run directory" in capsys.readouterr().err


def test_train_crop_mode_squash_is_a_random_window_of_the_squashed_image():
    """VPT's code's FGVC crop: both sides to input / crop_pct, then a random input-size window
    (and a flip); checked against timm's own squash resize of the whole image."""
    import numpy as np
    data_cfg = dict(input_size=[3, 32, 32], interpolation="bilinear", mean=[0.5] * 3,
                    std=[0.5] * 3, crop_pct=0.8, crop_mode="squash")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 48, 3), np.uint8))
    # timm: the whole image squashed to 40 x 40 (32 / 0.8), no crop
    _, whole = build_transforms(dict(data_cfg, input_size=[3, 40, 40], crop_pct=1.0), False)
    ref = whole(img)
    windows = {(i, j) for i in range(9) for j in range(9)}
    train_tf, eval_tf = build_transforms(data_cfg, TrainConfig(aug=True, train_crop_mode="squash",
                                                               hflip=0.0))
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x = train_tf(img)
        hits = {(i, j) for i, j in windows
                if torch.allclose(x, ref[:, i:i + 32, j:j + 32], atol=1e-6)}
        assert len(hits) == 1, hits
        seen |= hits
    assert len(seen) > 3  # the window moves
    torch.testing.assert_close(eval_tf(img), ref[:, 4:36, 4:36])  # eval: the centre window
    flip_tf, _ = build_transforms(data_cfg, TrainConfig(aug=True, train_crop_mode="squash",
                                                        hflip=1.0))
    torch.manual_seed(0)
    flipped = flip_tf(img)
    torch.manual_seed(0)
    torch.testing.assert_close(flipped, train_tf(img).flip(-1))
    # timm's own train crop modes reach timm's transform
    tf, _ = build_transforms(data_cfg, TrainConfig(aug=True, train_crop_mode="rkrc"))
    assert "ResizeKeepRatio" in [type(t).__name__ for t in tf.transforms]
    with pytest.raises(ValueError, match="does not apply --reprob"):
        TrainConfig(aug=True, train_crop_mode="squash", reprob=0.25)
    with pytest.raises(ValueError, match="--train-crop-mode set.*add --aug"):
        TrainConfig(train_crop_mode="squash")
