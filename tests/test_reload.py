"""A reloaded adapter is the trained model, preprocessing and class names included.

Train a few steps at a non-default input size with non-default mean/std/interpolation, reload
through every path (``from_pretrained``, ``local-dir:``, ``hf-hub:`` from a Hub cache) and
evaluate with timm's own ``resolve_data_config(model=model)`` + ``create_transform`` only: the
accuracy is the one the run logged.
"""
import hashlib
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

import timm_peft
from timm_peft.io import TIMM_CONFIG_NAME
from timm_peft.train import TrainConfig, train
from timm_peft.train.factory import _make_splits

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
SETUPS = {
    # a fixed-size ViT: the input size follows img_size
    "vit": ("vit_tiny_patch16_224.augreg_in21k_ft_in1k.bias",
            dict(img_size=32, patch_size=8, depth=2, embed_dim=48), None),
    # a ConvNet: the input size is chosen for training (timm's default is 224/176)
    "resnet": ("resnet10t.c3_in1k.bias", {}, (3, 40, 40)),
}


def _weights(model_name, kwargs, path):
    torch.manual_seed(0)
    base = timm.create_model(model_name.rsplit(".", 1)[0], **kwargs)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    return path


def _timm_accuracy(model, dataset):
    """Top-1 accuracy with timm's transform for this model, nothing else."""
    tf = create_transform(**resolve_data_config(model=model))
    x = torch.stack([tf(img) for img, _ in dataset])
    y = torch.tensor([int(label) for _, label in dataset])
    with torch.no_grad():
        return (model.eval()(x).argmax(-1) == y).float().mean().item()


def _hub_cache(tmp_path, monkeypatch, adapter_dir, repo_id):
    from huggingface_hub import constants
    cache = tmp_path / "hub_cache"
    files = {p.name: p.read_bytes() for p in adapter_dir.iterdir() if p.is_file()}
    sha = hashlib.sha1(b"".join(files[k] for k in sorted(files))).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / sha).mkdir(parents=True)
    for name, data in files.items():
        (repo / "snapshots" / sha / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("arch", sorted(SETUPS))
def test_every_reload_path_reproduces_training_time_evaluation(arch, tmp_path, monkeypatch):
    model_name, kwargs, input_size = SETUPS[arch]
    weights = _weights(model_name, kwargs, tmp_path / "base.safetensors")
    cfg = TrainConfig(model=model_name, model_kwargs=kwargs, pretrained_file=str(weights),
                      task="count", train_size=32, test_size=24, val_split=0.25, epochs=1,
                      warmup_epochs=0, batch_size=8, lr=3e-3, workers=0, progress=False,
                      input_size=input_size, mean=MEAN, std=STD, interpolation="bilinear",
                      crop_pct=1.0, output=str(tmp_path / "run"))
    result = train(cfg)
    logged = result.metrics["test_acc"]
    size = input_size or (3, 32, 32)
    splits = _make_splits(cfg, size[-1])
    overlay = dict(pretrained_cfg_overlay=dict(file=str(weights), custom_load=False))
    adapter = result.adapter_dir
    (adapter / "training_args.json").unlink()  # as pulled from the Hub: only the adapter
    _hub_cache(tmp_path, monkeypatch, adapter, "me/adapter")
    loaded = {
        "from_pretrained": timm_peft.from_pretrained(adapter, **overlay),
        "local-dir": timm.create_model(f"local-dir:{adapter}", pretrained=True, **overlay),
        "hf-hub": timm.create_model("hf-hub:me/adapter", pretrained=True, **overlay),
    }
    for path, model in loaded.items():
        dc = resolve_data_config(model=model)
        assert dc["input_size"] == size and dc["mean"] == MEAN and dc["std"] == STD, path
        assert dc["interpolation"] == "bilinear" and dc["crop_pct"] == 1.0, path
        assert list(model.pretrained_cfg["label_names"]) == list(splits.classes), path
        assert _timm_accuracy(model, splits.test) == pytest.approx(logged, abs=1e-6), path
    # timm's config.json describes the trained input, not the base's 224
    import json
    tc = json.loads((adapter / TIMM_CONFIG_NAME).read_text())
    assert tuple(tc["pretrained_cfg"]["input_size"]) == size
    assert tc["label_names"] == list(splits.classes)
    # `timm-peft eval` from another directory, with no training_args.json: same accuracy
    monkeypatch.chdir(tmp_path.parent)
    from timm_peft.train import evaluate_adapter
    res = evaluate_adapter(adapter, "test", task="count", pretrained_file=str(weights))
    default_test = _make_splits(TrainConfig(task="count"), size[-1]).test  # no args: defaults
    assert res["n"] == len(default_test)
    assert res["acc"] == pytest.approx(_timm_accuracy(loaded["hf-hub"], default_test), abs=1e-6)
    shutil.rmtree(tmp_path / "run")
