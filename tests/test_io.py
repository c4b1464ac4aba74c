"""Adapter save / load / rebuild: round trips, contents, atomic writes and every load error."""
import json

import pytest
import timm
import torch
from safetensors import safe_open

import timm_peft
from timm_peft.io import CONFIG_NAME, WEIGHTS_NAME, AdapterError

from conftest import TINY_VIT, local_overlay

NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def _build(vit_weights, method="partial", **kwargs):
    kwargs = {**TINY_VIT, "num_classes": 5, **kwargs}
    return timm.create_model(f"{NAME}.{method}", pretrained=True,
                             pretrained_cfg_overlay=local_overlay(vit_weights), **kwargs)


def _train_a_step(model):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return model.eval()


@pytest.fixture
def saved(vit_weights, tmp_path):
    model = _train_a_step(_build(vit_weights))
    out = timm_peft.save_pretrained(model, tmp_path / "adapter")
    return model, out


def test_round_trip_bit_identical(vit_weights, saved):
    model, out = saved
    x = torch.randn(2, 3, 32, 32)
    rebuilt = timm_peft.from_pretrained(out, pretrained=True,
                                        pretrained_cfg_overlay=local_overlay(vit_weights)).eval()
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert rebuilt.peft_config == model.peft_config
    for k, v in model.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k]), k
    # load_adapter onto a freshly built model gives the same
    fresh = timm_peft.load_adapter(_build(vit_weights).eval(), out)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_files_hold_only_adapter_and_full_config(saved):
    model, out = saved
    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.peft_adapter_keys)
    assert all(k.startswith(("blocks.1.", "norm.", "head.")) for k in keys)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "partial" and cfg["peft_config"] == {"train_head": True, "num_blocks": 1}
    assert cfg["architecture"] == "vit_tiny_patch16_224"
    assert cfg["pretrained_tag"] == "augreg_in21k_ft_in1k"
    # the base came from a local file: its name does not claim timm's weights
    assert cfg["base_model_name_or_path"] == "vit_tiny_patch16_224"
    assert cfg["base_source"] == {"kind": "file"}
    assert cfg["model_args"] == {"num_classes": 5, **TINY_VIT}
    assert cfg["num_trainable_parameters"] == timm_peft.get_nb_trainable_parameters(model)[0]
    assert cfg["format_version"] == 2 and cfg["base_fingerprint"].startswith("sha256:")
    for key in ("timm_version", "timm_peft_version", "weights_sha256"):
        assert cfg[key]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_vit_base_linear_adapter_is_small(tmp_path):
    model = timm.create_model("vit_base_patch16_224.linear", num_classes=100)
    out = timm_peft.save_pretrained(model, tmp_path / "a")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [WEIGHTS_NAME]
    assert (out / WEIGHTS_NAME).stat().st_size <= 400_000
    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        assert set(f.keys()) == {"head.weight", "head.bias"}


def test_full_method_warns_that_it_saves_the_whole_model(tmp_path):
    model = timm.create_model("resnet10t.full", num_classes=3)
    with pytest.warns(UserWarning, match="the saved adapter is the whole model"):
        out = timm_peft.save_pretrained(model, tmp_path / "a")
    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())


@pytest.mark.parametrize("crash_at", ["writing", "swapping"])
def test_interrupted_save_leaves_previous_adapter_loadable(saved, monkeypatch, crash_at):
    from timm_peft.io import save_load
    model, out = saved
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if crash_at == "writing":  # killed half-way through writing the new files
        calls = []

        def fsync(fd):
            calls.append(fd)
            if len(calls) == 2:
                raise KeyboardInterrupt("simulated crash")
        monkeypatch.setattr(save_load.os, "fsync", fsync)
    else:  # killed just before the new adapter replaces the old one
        def exchange(a, b):
            raise KeyboardInterrupt("simulated crash")
        monkeypatch.setattr(save_load, "_exchange", exchange)
    with torch.no_grad():
        model.head.bias.add_(1.0)  # a different adapter, so the weights file changes
    with pytest.raises(KeyboardInterrupt):
        timm_peft.save_pretrained(model, out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    timm_peft.load_adapter(_build_like(model), out, check_base=False)
    # the next save completes and replaces the old adapter as a whole
    timm_peft.save_pretrained(model, out)
    reloaded = timm_peft.load_adapter(_build_like(model), out, check_base=False)
    assert torch.equal(reloaded.head.bias, model.head.bias)


def _build_like(model):
    return timm.create_model(f"{NAME}.partial", num_classes=5, **TINY_VIT)


def test_stale_temporaries_are_removed_and_other_files_kept(saved):
    model, out = saved
    stale = out.parent / ".adapter.tmp-killed"  # a save killed with SIGKILL leaves this
    stale.mkdir()
    (stale / WEIGHTS_NAME).write_bytes(b"x" * 1000)
    orphan = out / f".{WEIGHTS_NAME}.abc.tmp"  # an orphan of the old per-file writes
    orphan.write_bytes(b"x" * 1000)
    (out / "training_args.json").write_text("{}")
    timm_peft.save_pretrained(model, out)
    assert not stale.exists() and not orphan.exists()
    assert (out / "training_args.json").read_text() == "{}"


def test_save_refuses_a_directory_that_is_not_an_adapter(saved, tmp_path):
    model, _ = saved
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError, match="holds other files .*and no adapter"):
        timm_peft.save_pretrained(model, tmp_path / "project")
    assert (tmp_path / "project" / "notes.txt").read_text() == "mine"


def test_concurrent_saves_are_serialised(saved):
    import threading
    model, out = saved
    other = _build_like(model)
    with torch.no_grad():
        other.head.bias.fill_(3.0)
    errors = []

    def save(m):
        try:
            for _ in range(4):
                timm_peft.save_pretrained(m, out)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=save, args=(m,)) for m in (model, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    loaded = timm_peft.load_adapter(_build_like(model), out, check_base=False)
    assert any(torch.equal(loaded.head.bias, m.head.bias) for m in (model, other))
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def _edit_config(out, **changes):
    cfg = json.loads((out / CONFIG_NAME).read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (out / CONFIG_NAME).write_text(json.dumps(cfg))


def test_errors_for_other_method_arch_and_tensors(vit_weights, saved, tmp_path):
    _, out = saved
    with pytest.raises(AdapterError, match="is for method 'partial', the model carries 'bias'"):
        timm_peft.load_adapter(_build(vit_weights, "bias"), out)
    with pytest.raises(AdapterError, match="is for arch 'vit_tiny_patch16_224', the model is "
                                           "'resnet10t'"):
        timm_peft.load_adapter(timm.create_model("resnet10t.partial"), out, check_base=False)
    with pytest.raises(AdapterError, match=r"field 'peft_config' differs .*num_blocks: adapter 1, "
                                           r"model 2"):
        timm_peft.load_adapter(_build(vit_weights, peft_cfg=dict(num_blocks=2)), out)
    with pytest.raises(AdapterError, match=r"num_blocks: adapter 2, model 1"):
        two = timm_peft.save_pretrained(_build(vit_weights, peft_cfg=dict(num_blocks=2)),
                                        tmp_path / "two")
        timm_peft.load_adapter(_build(vit_weights), two)
    with pytest.raises(AdapterError, match=r"mis-shaped tensors .*head.weight: saved \(5, 192\), "
                                           r"model \(7, 192\)"):
        timm_peft.load_adapter(_build(vit_weights, num_classes=7), out)


def test_error_for_another_base(saved):
    model, out = saved
    other = timm.create_model("vit_tiny_patch16_224.partial", num_classes=5, **TINY_VIT)
    with pytest.raises(AdapterError, match="base weights differ"):
        timm_peft.load_adapter(other, out)
    timm_peft.load_adapter(other, out, check_base=False)  # explicitly allowed
    assert torch.equal(other.head.weight, model.head.weight)


def test_errors_for_damaged_files(saved):
    model, out = saved
    blob = (out / WEIGHTS_NAME).read_bytes()
    (out / WEIGHTS_NAME).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(AdapterError, match="truncated, corrupted or from another save"):
        timm_peft.load_adapter(model, out)
    # a damaged file whose hash was also rewritten still fails in the safetensors reader
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}"
    (out / WEIGHTS_NAME).write_bytes(garbage)
    import hashlib
    _edit_config(out, weights_sha256=hashlib.sha256(garbage).hexdigest())
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        timm_peft.load_adapter(model, out)
    (out / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=f"no {WEIGHTS_NAME} in"):
        timm_peft.load_adapter(model, out)


@pytest.mark.parametrize("change, message", [
    (dict(format_version=3), "format_version 3, newer than this timm_peft reads .2.; upgrade"),
    (dict(format_version="1"), "format_version must be a positive integer"),
    (dict(peft_type="dora"), "unknown PEFT method 'dora'"),
    (dict(architecture=None), r"incomplete: missing \['architecture'\]"),
    (dict(peft_config={"num_blocks": 0}), "bad peft_config: PartialConfig.num_blocks must be >= 1"),
    (dict(peft_config={"blocks": 1}), r"bad peft_config: unknown PartialConfig field\(s\) \['blocks'\]"),
    (dict(model_args=[1]), "model_args and peft_config must be JSON objects"),
])
def test_errors_for_bad_config(saved, change, message):
    model, out = saved
    _edit_config(out, **change)
    with pytest.raises(AdapterError, match=message):
        timm_peft.load_adapter(model, out)


def test_errors_for_malformed_or_missing_config(saved, tmp_path):
    model, out = saved
    (out / CONFIG_NAME).write_text('{"format_version": 1, "peft_type": ')
    with pytest.raises(AdapterError, match="is not valid JSON"):
        timm_peft.load_adapter(model, out)
    (out / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(AdapterError, match="must hold a JSON object"):
        timm_peft.read_adapter_config(out)
    with pytest.raises(AdapterError, match="not an adapter directory"):
        timm_peft.load_adapter(model, tmp_path)


def test_save_needs_a_peft_model_and_json_model_args(tmp_path):
    with pytest.raises(ValueError, match="carries no PEFT method"):
        timm_peft.save_pretrained(timm.create_model("resnet10t"), tmp_path)
    model = timm.create_model("resnet10t.linear", act_layer=torch.nn.ReLU)
    with pytest.raises(AdapterError, match="cannot be written as JSON"):
        timm_peft.save_pretrained(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_apply_method_on_user_built_model_records_base(tmp_path):
    model = timm_peft.apply_method(timm.create_model("resnet10t", num_classes=3), "bias")
    out = timm_peft.save_pretrained(model, tmp_path / "a")
    cfg = timm_peft.read_adapter_config(out)
    assert cfg["architecture"] == "resnet10t" and cfg["model_args"]["num_classes"] == 3
    rebuilt = timm_peft.from_pretrained(out, pretrained=False, check_base=False)
    assert rebuilt.peft_method == "bias" and rebuilt.num_classes == 3


def test_saving_twice_gives_identical_files(saved, tmp_path):
    model, out = saved
    again = timm_peft.save_pretrained(model, tmp_path / "again")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_cli_info_verifies_weights_and_exits_non_zero(saved, capsys):
    from timm_peft.cli import main
    from safetensors.torch import load, save
    import hashlib
    model, out = saved
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base_origin"] == "file" and info["data_config"]["input_size"] == [3, 32, 32]
    tensors = load((out / WEIGHTS_NAME).read_bytes())
    tensors["head.bias"][0] = float("nan")
    blob = save(tensors, metadata={"format": "pt"})
    (out / WEIGHTS_NAME).write_bytes(blob)
    _edit_config(out, weights_sha256=hashlib.sha256(blob).hexdigest())  # a forged hash
    assert main(["info", str(out)]) == 2
    assert "tensor 'head.bias' holds NaN" in capsys.readouterr().err
    _edit_config(out, weights_sha256=hashlib.sha256(blob).hexdigest()[::-1])
    assert main(["info", str(out)]) == 2
    assert "'weights_sha256' differs" in capsys.readouterr().err


def test_load_adapter_names_what_is_wrong_for_bad_arguments(saved):
    model, _ = saved
    with pytest.raises(AdapterError, match="an adapter is a directory"):
        timm_peft.load_adapter(model, None)


def test_load_adapter_refuses_another_method_config(tmp_path):
    # the same tensors, another behaviour: LION's identity_prompt (output differs by 0.89)
    kw = dict(num_classes=3, **TINY_VIT)
    small = dict(p1_width=4, p2_width=8, norm_groups=2)
    model = timm.create_model("vit_tiny_patch16_224.lion", peft_cfg=dict(small, identity_prompt=True), **kw)
    out = timm_peft.save_pretrained(model, tmp_path / "a")
    other = timm.create_model("vit_tiny_patch16_224.lion", peft_cfg=dict(small, identity_prompt=False), **kw)
    with pytest.raises(AdapterError, match="identity_prompt: adapter True, model False"):
        timm_peft.load_adapter(other, out, check_base=False)


@pytest.mark.parametrize("method, key, title", [
    ("vpt", "jia2022vpt", "Visual Prompt Tuning"),
    ("ssf", "lian2022ssf", "Scaling \\& Shifting Your Features"),
    ("bias", "zaken2022bitfit", "BitFit"),
])
def test_card_cites_the_method_paper(tmp_path, method, key, title):
    model = timm.create_model(f"vit_tiny_patch16_224.{method}", num_classes=3, **TINY_VIT)
    card = (timm_peft.save_pretrained(model, tmp_path / method) / "README.md").read_text()
    assert f"```bibtex\n@inproceedings{{{key}," in card and title in card
    linear = timm.create_model("vit_tiny_patch16_224.linear", num_classes=3, **TINY_VIT)
    assert "bibtex" not in (timm_peft.save_pretrained(linear, tmp_path / "l") / "README.md").read_text()


def test_subclass_with_star_kwargs_saves_and_loads(tmp_path):
    # VisionTransformerDistilled takes (*args, **kwargs): its architecture arguments are its
    # base class's, and a saved adapter must name them (was: 'num_classes' refused)
    kw = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=3)
    model = timm.create_model("deit_tiny_distilled_patch16_224.linear", **kw).eval()
    d = timm_peft.save_pretrained(model, tmp_path / "a")
    loaded = timm_peft.from_pretrained(d, pretrained=False, check_base=False).eval()
    loaded.load_state_dict({**loaded.state_dict(), **{k: v for k, v in model.state_dict().items()}})
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x)) and loaded.num_classes == 3
