"""The ``timm-peft`` command line: train / eval / info end to end, and clear errors."""
import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from timm_peft.cli import main

TINY = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=48"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48)
    path = tmp_path_factory.mktemp("w") / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _train_args(weights, out, *extra):
    return ["train", "--model", "vit_tiny_patch16_224.linear", "--model-kwargs", *TINY,
            "--pretrained-file", str(weights), "--task", "orientation", "--train-size", "32",
            "--test-size", "16", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "0",
            "--workers", "0", "--no-progress", "--output", str(out), *extra]


def test_train_eval_info(weights, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(weights, out, "--recipe", "vtab1k", "--lr", "0.01")) == 0
    printed = capsys.readouterr().out
    adapter = out / "adapter"
    assert f"Saved the adapter to {adapter}/" in printed
    assert f"timm_peft.from_pretrained('{adapter}'" in printed and "pretrained_cfg_overlay" in printed
    args = json.loads((out / "args.json").read_text())
    assert args["recipes"] == ["vtab1k"] and args["val_split"] == 0.2 and args["lr"] == 0.01
    assert args["run"]["train_images"] == 26 and args["run"]["val_images"] == 6  # 32 * 0.8 / 0.2

    summary = json.loads((out / "summary.json").read_text())["metrics"]
    for split in ("val", "test"):
        # the base weights come from the caller, never from the adapter's training_args.json
        assert main(["eval", str(adapter), "--split", split, "--json",
                     "--pretrained-file", str(weights)]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["acc"] == summary[f"{split}_acc"]

    assert main(["info", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "linear" and info["trained_on"] == "orientation"
    assert info["trainable_params"] == 48 * 8 + 8
    assert info["adapter_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size


def test_info_lists_methods_recipes_and_tasks(capsys):
    assert main(["info", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"linear", "bias", "partial", "full"} <= set(listing["methods"])
    assert {"vtab1k", "fgvc", "vpt", "ssf", "e2vpt", "lion"} <= set(listing["recipes"])
    assert set(listing["tasks"]) == {"position", "orientation", "count", "texture", "shapes"}
    assert main(["info", "--recipe", "fgvc"]) == 0
    assert "--val-split 0.1" in capsys.readouterr().out


def _error(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_bad_input_gives_one_clear_line(weights, tmp_path, capsys):
    base = ["train", "--model-kwargs", *TINY, "--no-progress", "--output", str(tmp_path / "o")]
    err = _error(base + ["--model", "vit_tiny_patch16_224.nope.x", "--task", "count"], capsys)
    assert "unknown PEFT method suffix 'x'" in err and "'linear'" in err
    err = _error(base + ["--model", "vit_tiny_patch16_224.linear", "--data-dir",
                         str(tmp_path / "missing")], capsys)
    assert err.startswith("timm-peft train: error: data directory") and "does not exist" in err
    for split, classes in (("train", ["a", "b"]), ("test", ["a"])):
        for c in classes:
            (tmp_path / "d" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "d" / split / c / "0.png")
    err = _error(base + ["--model", "vit_tiny_patch16_224.linear", "--data-dir", str(tmp_path / "d")],
                 capsys)
    assert "class folders differ" in err and "missing in test/: ['b']" in err
    err = _error(base + ["--model", "vit_tiny_patch16_224.linear", "--task", "count",
                         "--peft-cfg", "nonsense"], capsys)
    assert "--peft-cfg takes KEY=VALUE" in err
    err = _error(["eval", str(tmp_path / "nothing")], capsys)
    assert "adapter_config.json" in err or "does not exist" in err
    with pytest.raises(SystemExit) as e:
        main(["train", "--recipe", "vtab2k"])
    assert e.value.code == 2 and "invalid choice: 'vtab2k'" in capsys.readouterr().err


def test_random_base_run_is_rebuilt_by_eval_and_resume_checks_the_task(weights, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _train_args(weights, out, "--epochs", "1", "--no-pretrained")
    i = argv.index("--pretrained-file")
    assert main(argv[:i] + argv[i + 2:]) == 0
    assert "torch.manual_seed(0)" in capsys.readouterr().out
    assert main(["eval", str(out / "adapter"), "--json"]) == 0  # the seeded base is rebuilt
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    assert json.loads(capsys.readouterr().out)["acc"] == summary["test_acc"]
    argv = [a if a != "orientation" else "count" for a in _train_args(weights, out)]
    argv = argv[:i] + argv[i + 2:-2] + ["--no-pretrained", "--resume", str(out)]
    err = _error(argv, capsys)
    assert "cannot resume" in err and "num_classes 8 (this run's data: 6)" in err

