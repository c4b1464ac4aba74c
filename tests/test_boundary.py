"""The loading boundary: every entry point reads an adapter through one checked path.

timm's own ``local-dir:``/``hf-hub:`` readers, ``training_args.json``, transactional loads (a
failed load changes nothing, per method), and the file/path/value classes of defects: each test
names the class it closes.
"""
import errno
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import timm
import torch

import timm_peft
from timm_peft.io import CONFIG_NAME, TIMM_CONFIG_NAME, WEIGHTS_NAME, AdapterError
from timm_peft.io import format as fmt
from timm_peft.io import load as load_mod

from conftest import TINY_VIT, move_trainable

VIT = "vit_tiny_patch16_224"


def _adapter(tmp_path, method="linear", name="adapter", seed=0, peft_cfg=None, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(f"{VIT}.{method}", num_classes=3, peft_cfg=peft_cfg,
                              **{**TINY_VIT, **kwargs})
    move_trainable(model, seed)
    return model, timm_peft.save_pretrained(model, tmp_path / name, label_names=["a", "b", "c"])


def _edit(path: Path, fn) -> None:
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


# ----------------------------------------------------------------------------------------------
# 1. timm's entry points: a directory holding adapter files is ours, whatever config.json says
# ----------------------------------------------------------------------------------------------

def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _big(path: Path) -> None:
    with open(path, "wb") as fh:  # sparse: 200 MB reported, nothing written
        fh.truncate(200 << 20)


def _deep(path: Path) -> None:
    path.write_text('{"architecture": ' + "[" * 100_000 + "]" * 100_000 + "}")


@pytest.mark.parametrize("damage", [
    _fifo, _big, _deep,
    lambda p: p.write_text("{not json"),
    lambda p: p.write_text("[1, 2]"),
    lambda p: _edit(p, lambda c: c.pop("architecture")),
    lambda p: _edit(p, lambda c: c.update(architecture=5)),
    lambda p: _edit(p, lambda c: c.update(architecture="no_such_arch")),
    lambda p: _edit(p, lambda c: c.update(architecture="resnet18")),
    lambda p: _edit(p, lambda c: c.update(pretrained_cfg="evil")),
    lambda p: _edit(p, lambda c: c.update(model_args=[1])),
    lambda p: _edit(p, lambda c: c["model_args"].update(cache_dir="/tmp/x")),
    lambda p: _edit(p, lambda c: c["model_args"].update(pretrained=True)),
    lambda p: _edit(p, lambda c: c["model_args"].update(pretrained_cfg={"url": "http://x"})),
    lambda p: _edit(p, lambda c: c["model_args"].update(pretrained_cfg_overlay={"file": "/x"})),
    # no timm_peft marker, but an adapter beside it: still ours, and its arguments are refused
    lambda p: _edit(p, lambda c: c.update(model_args={"embed_dim": 10 ** 5, "depth": 200})),
], ids=["fifo", "200MB", "deep", "not_json", "list", "no_arch", "arch_int", "arch_unknown",
        "arch_other", "pretrained_cfg_str", "model_args_list", "kw_cache_dir", "kw_pretrained",
        "kw_pretrained_cfg", "kw_overlay", "no_marker_huge"])
@pytest.mark.parametrize("pretrained", [True, False])
def test_local_dir_with_adapter_files_is_checked_by_timm_peft_first(tmp_path, damage, pretrained):
    _, out = _adapter(tmp_path)
    damage(out / TIMM_CONFIG_NAME)
    with pytest.raises(AdapterError, match=TIMM_CONFIG_NAME):
        timm.create_model(f"local-dir:{out}", pretrained=pretrained)


def test_local_dir_without_config_json_loads_the_adapter(tmp_path):
    model, out = _adapter(tmp_path)
    (out / TIMM_CONFIG_NAME).unlink()  # only a pointer: the adapter's own files suffice
    torch.manual_seed(0)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_local_dir_never_takes_weights_the_adapter_does_not_name(tmp_path, vit_weights):
    _, out = _adapter(tmp_path)
    _edit(out / CONFIG_NAME, lambda c: c.update(base_source={"kind": "file"}))
    with pytest.raises(AdapterError, match="came from a local file"):
        timm.create_model(f"local-dir:{out}", pretrained=True)


def test_base_weights_that_cannot_be_fetched_are_an_adapter_error(tmp_path):
    _, out = _adapter(tmp_path)  # a random base, recorded as timm's weights: offline, uncached
    _edit(out / CONFIG_NAME, lambda c: c.update(base_source={"kind": "timm"}))
    with pytest.raises(AdapterError, match="base weights .* cannot be loaded"):
        timm_peft.from_pretrained(out)


def test_plain_timm_directory_keeps_timms_behaviour(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    plain = timm.create_model(VIT, num_classes=4, **TINY_VIT).eval()
    d = tmp_path / "plain"
    d.mkdir()
    (d / TIMM_CONFIG_NAME).write_text(json.dumps(dict(
        architecture=VIT, num_classes=4, model_args=TINY_VIT,
        pretrained_cfg=dict(input_size=[3, 32, 32]))))
    save_file(plain.state_dict(), str(d / "model.safetensors"))
    loaded = timm.create_model(f"local-dir:{d}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))
    assert not hasattr(loaded, "peft_method")
    # and timm's own errors, unchanged
    (d / TIMM_CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="Config file not found"):
        timm.create_model(f"local-dir:{d}")
    (d / TIMM_CONFIG_NAME).write_text("{}")
    with pytest.raises(KeyError):
        timm.create_model(f"local-dir:{d}")


def test_hub_repo_with_adapter_files_is_checked_first(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from test_hub import _cache_repo, _read_dir
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, out = _adapter(tmp_path)
    files = _read_dir(out)
    pointer = json.loads(files[TIMM_CONFIG_NAME])
    pointer["model_args"] = {"embed_dim": 10 ** 5}  # no marker: timm would build it
    _cache_repo(cache, "org/evil", {**files, TIMM_CONFIG_NAME: json.dumps(pointer).encode()})
    with pytest.raises(AdapterError, match=r"config.json: field 'model_args'"):
        timm.create_model("hf-hub:org/evil", pretrained=True)
    _cache_repo(cache, "org/good", files)
    torch.manual_seed(0)
    assert timm.create_model("hf-hub:org/good", pretrained=True).peft_method == "linear"


# ----------------------------------------------------------------------------------------------
# 2. training_args.json is untrusted; eval's allocations are bounded
# ----------------------------------------------------------------------------------------------

def _with_args(out: Path, **args) -> Path:
    base = dict(model=f"{VIT}.linear", task="shapes", seed=0)
    (out / "training_args.json").write_text(json.dumps({**base, **args}))
    return out


@pytest.mark.parametrize("args, match", [
    (dict(test_size=10 ** 8), "generated images"),
    (dict(data_config=dict(input_size=[3, 8192, 8192], interpolation="bilinear", crop_pct=1.0,
                           mean=[0, 0, 0], std=[1, 1, 1])), r"data_config.input_size"),
    (dict(evil=1), r"unknown field\(s\) \['evil'\]"),
    (dict(batch_size="x"), "batch_size"),
    (dict(classes="abc"), "field 'classes'"),
])
def test_training_args_are_checked(tmp_path, args, match):
    _, out = _adapter(tmp_path)
    with pytest.raises(AdapterError, match=f"training_args.json.*{match}|{match}"):
        load_mod.read_training_args(_with_args(out, **args))
    (out / "training_args.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="training_args.json must hold a JSON object"):
        load_mod.read_training_args(out)


def test_training_args_never_choose_weights_or_urls(tmp_path, vit_weights):
    _, out = _adapter(tmp_path)
    _with_args(out, pretrained_file=str(vit_weights),
               pretrained_cfg={"url": "http://127.0.0.1:9/x", "hf_hub_id": "evil/w"})
    args = load_mod.read_training_args(out)
    assert "pretrained_file" not in args and "pretrained_cfg" not in args
    # eval with no --pretrained-file of its own: the file the adapter named is not used
    from timm_peft.train import evaluate_adapter
    cfg = json.loads((out / CONFIG_NAME).read_text())
    cfg["base_source"] = {"kind": "file"}
    (out / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="came from a local file"):
        evaluate_adapter(out, "test")


def test_info_prints_escape_sequences_escaped(tmp_path, capsys):
    from timm_peft.cli import main
    _, out = _adapter(tmp_path)
    _with_args(out, metrics={"val_acc": 0.5}, classes=["\x1b[31mred", "b", "c"], task=None,
               data_dir="/data/\x1b[2J\x1b[31mred")
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["info", str(out)]) == 0
    text = buf.getvalue()
    assert "\x1b" not in text and "\\x1b[2J\\x1b[31mred" in text


@pytest.mark.parametrize("key, value", [("crop_pct", 1e-6), ("input_size", [3, 4096, 4096])])
def test_data_config_bounds_follow_what_eval_allocates(tmp_path, key, value):
    _, out = _adapter(tmp_path)
    _edit(out / CONFIG_NAME, lambda c: c["data_config"].update({key: value}))
    with pytest.raises(AdapterError, match=f"data_config.{key}"):
        timm_peft.read_adapter_config(out)


# ----------------------------------------------------------------------------------------------
# 3. a failed load changes nothing
# ----------------------------------------------------------------------------------------------

def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.peft_config,
            {n: p.requires_grad for n, p in model.named_parameters()}, dict(model.pretrained_cfg))


def _assert_unchanged(model, snap, x, y):
    state, config, grads, pc = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k
    assert model.peft_config == config
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert dict(model.pretrained_cfg) == pc
    with torch.no_grad():
        assert torch.equal(model(x), y)


_PEFT_CFGS = {"vpt": dict(num_prompts=2), "e2vpt": dict(num_prompts=4, num_kv_prompts=2),
              "lion": dict(p1_width=4, p2_width=8, norm_groups=2)}


@pytest.mark.parametrize("method", ["linear", "bias", "partial", "ssf", "vpt", "e2vpt", "lion",
                                    "full"])
@pytest.mark.filterwarnings("ignore:method 'full' trains every parameter")
def test_failed_load_leaves_the_model_bit_identical(tmp_path, method):
    pc = _PEFT_CFGS.get(method)
    model, _ = _adapter(tmp_path, method, "mine", seed=1, peft_cfg=pc)
    # an adapter of the same method on another base (so it fails last, at the base check)
    theirs_cfg = dict(pc or {})
    if method == "e2vpt":  # pruned: loading it reshapes the prompts before the base check
        theirs_cfg["kept_segments"] = [tuple(range(0, 32, 2))] * 2
    _, theirs = _adapter(tmp_path, method, "theirs", seed=2, peft_cfg=theirs_cfg)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    snap = _snapshot(model)
    if method != "full":  # (the whole model is its adapter: there is no base to differ)
        with pytest.raises(AdapterError, match="base weights differ"):
            timm_peft.load_adapter(model, theirs)
        _assert_unchanged(model, snap, x, y)
        with pytest.raises(AdapterError, match="base weights differ"):
            timm_peft.load_adapter(model, theirs, adapter_name="other")
        assert list(timm_peft.get_adapters(model)) == ["default"]
        _assert_unchanged(model, snap, x, y)
    # and the other failures on the way: a config, a hash, a value
    for edit, match in [(lambda c: c["peft_config"].update(train_head="no"), "train_head"),
                        (lambda c: c.update(weights_sha256="0" * 64), "weights_sha256")]:
        bad = tmp_path / f"bad_{match}"
        import shutil
        shutil.copytree(theirs, bad)
        _edit(bad / CONFIG_NAME, edit)
        with pytest.raises(AdapterError, match=match):
            timm_peft.load_adapter(model, bad, check_base=False)
        _assert_unchanged(model, snap, x, y)


def test_pruned_e2vpt_adapter_is_checked_on_meta_only(tmp_path, monkeypatch):
    kept = [tuple(range(0, 32, 2))] * 2
    _, out = _adapter(tmp_path, "e2vpt", peft_cfg=dict(num_prompts=4, kept_segments=kept))
    built = []
    original = timm.create_model

    def spy(*args, **kwargs):
        m = original(*args, **kwargs)
        built.append(next(m.parameters()).device.type)
        return m
    monkeypatch.setattr(timm, "create_model", spy)
    timm_peft.io.verify_adapter(out)
    assert built == ["meta"]
    # a bad one (another pruned structure than its tensors) fails there, before any real build
    fewer = [tuple(range(0, 32, 4))] * 2
    _edit(out / CONFIG_NAME, lambda c: c["peft_config"].update(kept_segments=fewer))
    built.clear()
    with pytest.raises(AdapterError, match="mis-shaped tensors"):
        timm_peft.from_pretrained(out, check_base=False)
    assert built == ["meta"]


# ----------------------------------------------------------------------------------------------
# 5. files, paths and values
# ----------------------------------------------------------------------------------------------

def test_os_errors_are_adapter_errors_naming_the_file(tmp_path, monkeypatch):
    _, out = _adapter(tmp_path)
    long = tmp_path / ("x" * 300)
    for loader in (timm_peft.from_pretrained, timm_peft.io.verify_adapter,
                   timm_peft.read_adapter_config):
        with pytest.raises(AdapterError, match="too long|does not exist"):
            loader(long)
        with pytest.raises(AdapterError, match="too long|does not exist"):
            loader(out / ("y" * 300))
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).endswith(CONFIG_NAME):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(fmt.os, "open", denied)
    with pytest.raises(AdapterError, match=f"cannot read .*{CONFIG_NAME}: permission denied"):
        timm_peft.from_pretrained(out)


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME, "training_args.json"])
def test_fifo_inside_the_adapter_is_refused_without_hanging(tmp_path, name):
    _, out = _adapter(tmp_path)
    if (out / name).exists():
        (out / name).unlink()
    os.mkfifo(out / name)
    with pytest.raises(AdapterError, match=f"{name}: it is a FIFO"):
        timm_peft.io.verify_adapter(out)
        load_mod.read_training_args(out)


def test_reads_stop_at_the_limit_whatever_size_is_reported(tmp_path):
    proc = Path("/proc/self/maps")  # reports size 0, holds more than 100 bytes
    with pytest.raises(AdapterError, match="larger than 100 bytes"):
        fmt.read_bytes(proc, 100, "a test file")
    _, out = _adapter(tmp_path)
    (out / CONFIG_NAME).unlink()
    (out / CONFIG_NAME).symlink_to(proc)
    old = fmt.LIMITS["config_bytes"]
    fmt.LIMITS["config_bytes"] = 100
    try:
        with pytest.raises(AdapterError, match="larger than 100 bytes"):
            timm_peft.read_adapter_config(out)
    finally:
        fmt.LIMITS["config_bytes"] = old


@pytest.mark.parametrize("text, match", [
    ('{"label_names": ["a"], "label_names": ["b"]}', "'label_names' appears twice"),
    ('{"x": {"weights_sha256": 1, "weights_sha256": 2}}', "'weights_sha256' appears twice"),
    ('{"label_names": ["\\ud800"]}', "lone surrogate"),
    ('{"tol": 1e400}', "out of range; only finite"),
    ('{"n": ' + "9" * 30 + "}", "integers must fit in 64 bits"),
])
def test_json_values_every_adapter_file_refuses(tmp_path, text, match):
    _, out = _adapter(tmp_path)
    for name in (CONFIG_NAME, TIMM_CONFIG_NAME, "training_args.json"):
        (out / name).write_text(text)
        with pytest.raises(AdapterError, match=match):
            fmt.read_json(out / name, "a test file")
    (out / CONFIG_NAME).write_text(text)
    with pytest.raises(AdapterError, match=match):
        timm_peft.from_pretrained(out)


def test_lone_surrogate_label_refused_at_load(tmp_path):
    _, out = _adapter(tmp_path)
    text = (out / CONFIG_NAME).read_text().replace('"a"', '"\\udc80"')
    (out / CONFIG_NAME).write_text(text)
    with pytest.raises(AdapterError, match="lone surrogate"):
        timm_peft.from_pretrained(out)


def test_lion_float_fields_out_of_range_refused_at_load(tmp_path):
    _, out = _adapter(tmp_path, "lion", peft_cfg=_PEFT_CFGS["lion"])
    for field in ("tol", "cell_max_norm", "robust_shrink"):
        text = json.loads((out / CONFIG_NAME).read_text())
        raw = json.dumps(text).replace(f'"{field}": ', f'"{field}": 1e400, "_{field}": ', 1)
        (out / CONFIG_NAME).write_text(raw)
        with pytest.raises(AdapterError, match="out of range"):
            timm_peft.from_pretrained(out, check_base=False)
        (out / CONFIG_NAME).write_text(json.dumps(text))


def test_vpt_img_size_smaller_than_the_patch_refused_at_load(tmp_path):
    _, out = _adapter(tmp_path, "vpt", peft_cfg=dict(num_prompts=2))
    _edit(out / CONFIG_NAME, lambda c: (c["model_args"].update(img_size=8),
                                        c["data_config"].update(input_size=[3, 8, 8],
                                                                crop_pct=1.0)))
    _edit(out / TIMM_CONFIG_NAME, lambda c: c["model_args"].update(img_size=8))
    with pytest.raises(AdapterError, match="does not run on its field 'data_config.input_size'"):
        timm_peft.io.verify_adapter(out)


def test_many_unknown_fields_give_a_short_message(tmp_path):
    _, out = _adapter(tmp_path)
    _edit(out / CONFIG_NAME, lambda c: c.update({f"f{i}": i for i in range(60_000)}))
    with pytest.raises(AdapterError, match=r"and 59,99\d more") as e:
        timm_peft.read_adapter_config(out)
    assert len(str(e.value)) <= AdapterError.MAX_CHARS
    # any message is bounded, and terminal escapes in it are shown escaped
    long = AdapterError("\x1b[2J" + "y" * 100_000)
    assert len(str(long)) <= AdapterError.MAX_CHARS and "\x1b" not in str(long)


# ----------------------------------------------------------------------------------------------
# shape: one loading path
# ----------------------------------------------------------------------------------------------

def test_one_loading_module_and_no_import_cycle():
    root = Path(timm_peft.__file__).parent / "io"
    for name in ("save_load.py", "hub.py", "format.py", "card.py"):
        text = (root / name).read_text()
        assert "def load_adapter" not in text and "def from_pretrained" not in text, name
    assert "from .load" not in (root / "save_load.py").read_text()
    assert "from .hub" not in (root / "load.py").read_text()
    code = ("import timm_peft.io.load, timm_peft.io.save_load, timm_peft.io.hub; "
            "from timm.models import _factory; "
            "assert hasattr(_factory.load_model_config_from_path, '__timm_peft_original__'); "
            "assert hasattr(_factory.load_model_config_from_hf, '__timm_peft_original__')")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": str(root.parent.parent)})
