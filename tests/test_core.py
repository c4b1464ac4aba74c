"""Registry, config validation, model families, freezing and parameter accounting."""
from dataclasses import dataclass

import pytest
import timm
import torch
from torch import nn

import timm_peft
from timm_peft.core import (PeftConfig, PeftMethod, cfg_field, get_blocks, get_model_family,
                            register_method, register_preset, resolve_method)

from conftest import TINY_VIT


def test_list_methods_has_baselines_and_presets():
    methods = timm_peft.list_methods()
    for name in ("linear", "bias", "partial", "full", "partial_1"):
        assert name in methods
    assert resolve_method("partial_1") == ("partial", {"num_blocks": 1})


@dataclass
class _Cfg(PeftConfig):
    k: int = cfg_field(3, ge=1, le=10)
    rate: float = cfg_field(0.1, ge=0.0, lt=1.0)
    mode: str = cfg_field("a", choices=("a", "b"))
    sizes: tuple[int, ...] = cfg_field((1, 2), ge=0)
    name: str | None = cfg_field(None)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(k="3"), TypeError, ["_Cfg.k", "int", "'3'"]),
    (dict(k=True), TypeError, ["_Cfg.k", "int"]),
    (dict(k=0), ValueError, ["_Cfg.k", ">= 1", "0"]),
    (dict(k=11), ValueError, ["_Cfg.k", "<= 10"]),
    (dict(rate=1.0), ValueError, ["_Cfg.rate", "< 1.0"]),
    (dict(mode="c"), ValueError, ["_Cfg.mode", "['a', 'b']", "'c'"]),
    (dict(sizes=(1, -1)), ValueError, ["_Cfg.sizes", ">= 0"]),
    (dict(sizes=(1, "x")), TypeError, ["_Cfg.sizes"]),
    (dict(name=3), TypeError, ["_Cfg.name"]),
    (dict(train_head="yes"), TypeError, ["_Cfg.train_head", "bool"]),
])
def test_config_validation_names_field_and_allowed(kwargs, error, words):
    with pytest.raises(error) as e:
        _Cfg(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_config_accepts_valid_values_and_round_trips_json():
    cfg = _Cfg(k=10, rate=0, mode="b", sizes=[4, 5], name="x")
    assert cfg.sizes == (4, 5)  # JSON lists become the declared tuple
    assert cfg.to_dict()["sizes"] == [4, 5]
    assert _Cfg.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown _Cfg field\(s\) \['kk'\]; allowed: .*'k'"):
        _Cfg.from_dict({"kk": 1})
    with pytest.raises(ValueError, match="_Cfg.k"):
        cfg.replace(k=0)


def test_register_method_and_preset_rules():
    with pytest.raises(ValueError, match="identifier"):
        register_method(type("Bad", (PeftMethod,), {"name": "not-valid"}))
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        register_preset("x", "nope")
    with pytest.raises(ValueError, match="PartialConfig.num_blocks"):
        register_preset("partial_0", "partial", num_blocks=0)
    with pytest.raises(ValueError, match="is a method"):
        register_preset("linear", "partial")
    with pytest.raises(ValueError, match=r"unknown PEFT method 'zzz'; registered methods: \["):
        resolve_method("zzz")


def test_families_and_blocks():
    vit = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1)
    res = timm.create_model("resnet10t")
    cnx = timm.create_model("convnext_atto")
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=2,
                             depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1))
    mnv3 = timm.create_model("mobilenetv3_small_050")
    mixer = timm.create_model("mixer_s32_224", device="meta")
    assert [get_model_family(m) for m in (vit, deit, res, cnx, swin, mnv3, mixer)] == \
        ["vit", "vit", "resnet", "convnext", "swin", "convnets", "mixers"]
    assert get_blocks(vit) == list(vit.blocks)
    assert len(get_blocks(res)) == 4 and get_blocks(res)[-1] is res.layer4[-1]
    assert len(get_blocks(swin)) == 4
    # the generic answer comes from timm's group_matcher: MobileNetV3's numbered blocks
    assert get_blocks(mnv3) == [b for stage in mnv3.blocks for b in stage]
    assert get_blocks(mixer) == list(mixer.blocks)
    with pytest.raises(ValueError, match="cannot locate the blocks"):
        get_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_generic_layer_groups_follow_group_matcher():
    from timm_peft.families import GENERIC
    mnv3 = timm.create_model("mobilenetv3_small_050")
    groups = GENERIC.layer_groups(mnv3)
    # tail: everything after the last block but the classifier (conv_head, its norm, ...)
    tail_names = {n for n, m in mnv3.named_modules() if any(m is t for t in groups.tail)}
    assert tail_names == {"conv_head"}
    assert all(m is not mnv3.classifier for m in groups.tail)


def test_family_registry_rules():
    from timm_peft.families import Family, family_of_arch, get_family, list_families, register_family
    assert {"vit", "swin", "convnext", "resnet", "convnets"} <= set(list_families())
    assert family_of_arch("efficientnet_b0").name == "convnets"
    assert family_of_arch("mixer_s32_224").name == "mixers"
    assert family_of_arch("tnt_s_patch16_224").name == "mixers"
    # every timm model module belongs to a family (issue 24); a name timm does not know, none
    assert [m for m in timm.list_modules()
            if family_of_arch(timm.list_models(module=m)[0]).name == "generic"] == []
    assert family_of_arch("no_such_arch").name == "generic"
    assert get_family("vit").name == "vit"
    with pytest.raises(KeyError, match="unknown family 'nope'"):
        get_family("nope")
    with pytest.raises(ValueError, match=r"timm modules \['resnet'\] already belong to \['resnet'\]"):
        register_family(type("Dup", (Family,), {"name": "dup", "modules": ("resnet",)}))
    with pytest.raises(ValueError, match="other than 'generic'"):
        register_family(type("G", (Family,), {"name": "generic"}))


def test_family_restriction_names_what_is_missing():
    mixer = timm.create_model("mixer_s32_224", device="meta")
    with pytest.raises(ValueError, match=r"method 'vpt' needs a token sequence, windowed attention "
                                         r"or a ConvNet's image input, which the 'mixers' family "
                                         r"\(MlpMixer\) does not provide; see "
                                         r"timm_peft.list_models\(method='vpt'\)"):
        timm_peft.apply_method(mixer, "vpt")
    assert not hasattr(mixer, "vpt") and type(mixer).__name__ == "MlpMixer"
    from timm.models.tnt import TNT

    class MyTNT(TNT):  # a model class defined outside timm: the generic fallback
        pass

    with torch.device("meta"):
        tnt = MyTNT(depth=1)
    with pytest.raises(ValueError, match=r"which the 'generic' family \(MyTNT\) does not provide"):
        timm_peft.apply_method(tnt, "vpt")


def test_partial_k_on_any_model_with_group_matcher():
    mnv3 = timm.create_model("mobilenetv3_small_050", num_classes=4)
    blocks = [b for stage in mnv3.blocks for b in stage]
    timm_peft.apply_method(mnv3, "partial", dict(num_blocks=2))
    trainable = {n for n, p in mnv3.named_parameters() if p.requires_grad}
    expected = {f"blocks.{i}.{j}.{n}" for i, stage in enumerate(mnv3.blocks)
                for j, b in enumerate(stage) if any(b is x for x in blocks[-2:])
                for n, _ in b.named_parameters()}
    expected |= {f"conv_head.{n}" for n, _ in mnv3.conv_head.named_parameters()}
    expected |= {"classifier.weight", "classifier.bias"}
    assert trainable == expected
    with pytest.raises(ValueError, match=rf"PartialConfig.num_blocks must be <= {len(blocks)}"):
        timm_peft.apply_method(timm.create_model("mobilenetv3_small_050"), "partial",
                               dict(num_blocks=len(blocks) + 1))


def test_linear_trains_head_only_and_counts_like_peft():
    model = timm.create_model("resnet18", num_classes=10)
    total = sum(p.numel() for p in model.parameters())
    timm_peft.apply_method(model, "linear")
    assert timm_peft.get_nb_trainable_parameters(model) == (512 * 10 + 10, total)
    assert set(model.peft_adapter_keys) == {"fc.weight", "fc.bias"}
    assert isinstance(model.peft_config, PeftConfig)
    with pytest.raises(ValueError, match="already carries PEFT method 'linear'"):
        timm_peft.apply_method(model, "bias")


def test_print_trainable_parameters(capsys):
    model = timm_peft.apply_method(timm.create_model("resnet18", num_classes=10), "linear")
    timm_peft.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == \
        "trainable params: 5,130 || all params: 11,181,642 || trainable%: 0.0459"


def test_shared_parameter_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
    assert timm_peft.get_nb_trainable_parameters(Tied()) == (16 + 8, 16 + 8)


def test_bias_method_and_frozen_batchnorm_statistics():
    model = timm.create_model("resnet10t", num_classes=3)
    timm_peft.apply_method(model, "bias")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith("bias")} | {"fc.weight"}
    bn = model.bn1
    before = bn.running_mean.clone()
    model.train()
    assert model.training and not bn.training  # frozen statistics: eval-mode BatchNorm
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)
    assert model.bn1.bias.grad is not None and model.bn1.weight.grad is None
    # BN statistics of a frozen base are not adapter state
    assert "bn1.running_mean" not in model.peft_adapter_keys


def test_partial_unfreezes_last_blocks_with_their_statistics():
    model = timm.create_model("resnet18.partial", peft_cfg=dict(num_blocks=2), num_classes=5)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters()
                 if p.requires_grad and n.startswith("layer")}
    assert trainable == {"layer4.0", "layer4.1"}
    assert "layer4.1.bn2.running_var" in model.peft_adapter_keys
    assert "layer3.1.bn2.running_var" not in model.peft_adapter_keys
    model.train()
    assert model.layer4[0].bn1.training and not model.layer3[0].bn1.training
    with pytest.raises(ValueError, match=r"num_blocks must be <= 8 .* got 9"):
        timm.create_model("resnet18.partial", peft_cfg=dict(num_blocks=9))


def test_partial_vit_counts():
    model = timm.create_model("vit_tiny_patch16_224.partial", num_classes=10, **TINY_VIT)
    blk = sum(p.numel() for p in model.blocks[-1].parameters())
    head = 192 * 10 + 10
    norm = 2 * 192
    assert timm_peft.get_nb_trainable_parameters(model)[0] == blk + head + norm


def test_full_trains_everything():
    model = timm.create_model("resnet10t.full", num_classes=3)
    trainable, total = timm_peft.get_nb_trainable_parameters(model)
    assert trainable == total
    model.train()
    assert model.bn1.training


def test_merge_and_unload_of_baseline_is_plain_model():
    model = timm.create_model("resnet10t", peft="bias", num_classes=3)
    assert model._model_args["peft"] == "bias"
    keys = set(model.state_dict())
    plain = timm_peft.merge_and_unload(model)
    assert plain is model and set(plain.state_dict()) == keys
    assert not hasattr(plain, "peft_config") and not hasattr(plain, "peft_base")
    # timm's recorded build args no longer ask for timm_peft (timm.push_to_hf_hub writes them)
    assert plain._model_args == {"num_classes": 3}
    with pytest.raises(ValueError, match="carries no PEFT method"):
        timm_peft.merge_and_unload(plain)


def test_vit_base_linear_count():
    model = timm.create_model("vit_base_patch16_224.linear", num_classes=100)
    trainable, total = timm_peft.get_nb_trainable_parameters(model)
    assert (trainable, total) == (76_900, 85_875_556)


def test_frozen_model_pickles_and_copies_with_frozen_statistics():
    import copy
    import pickle
    model = timm.create_model("resnet10t.bias", num_classes=3)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        clone.train()
        assert clone.training and not clone.bn1.training
        assert "train" not in clone.bn1.__dict__  # the class says it, nothing bound to a module
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(clone.eval()(x), model.eval()(x))


_NO_TIMM_PEFT = """
import builtins, sys
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name == "timm_peft" or name.startswith("timm_peft."):
        raise ImportError("timm_peft is blocked in this process")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
import torch
for path in sys.argv[1:]:
    model = torch.load(path, weights_only=False)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.train()
    assert all(bn.training for bn in norms), "BatchNorm must follow train() again"
    print("ok", type(model).__module__, type(model).__name__)
"""


def _load_without_timm_peft(*paths):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", _NO_TIMM_PEFT, *map(str, paths)],
                          capture_output=True, text=True, timeout=300)


def test_unloaded_models_are_plain_timm_and_load_without_timm_peft(tmp_path):
    import warnings
    cases = [("resnet10t.bias", "merge_and_unload"), ("resnet10t.ssf", "merge_and_unload"),
             ("resnet10t.vpt", "unload"), ("resnet10t.lion", "unload"),
             ("vit_tiny_patch16_224.e2vpt", "unload")]
    paths = []
    for name, how in cases:
        model = timm.create_model(name, num_classes=3, **(TINY_VIT if "vit" in name else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = getattr(timm_peft, how)(model)
        assert all(type(m).__module__.split(".")[0] in ("timm", "torch") for m in plain.modules())
        assert not any(k.startswith("_peft") or k.startswith("peft_") for m in plain.modules()
                       for k in m.__dict__), name
        for bn in plain.modules():
            if isinstance(bn, nn.BatchNorm2d):
                assert type(bn) is nn.BatchNorm2d and "train" not in bn.__dict__
        plain.train()
        assert all(m.training for m in plain.modules())  # train() behaves normally again
        paths.append(tmp_path / f"{len(paths)}.pt")
        torch.save(plain, paths[-1])
    res = _load_without_timm_peft(*paths)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("ok timm.models.") == len(cases)


def test_blocked_import_guard_works(tmp_path):
    """The guard above must fail for a model that still needs timm_peft."""
    torch.save(timm.create_model("resnet10t.vpt", num_classes=3), tmp_path / "peft.pt")
    res = _load_without_timm_peft(tmp_path / "peft.pt")
    assert res.returncode != 0 and "timm_peft is blocked" in res.stderr


def test_vpt_config_round_trips_json_with_every_field_type():
    import json
    from timm_peft.methods.e2vpt import E2VPTConfig
    from timm_peft.methods.vpt import VPTConfig
    cfg = VPTConfig(img_size=(32, 48), projection_dim=8, dropout=0.1, init="normal", deep=False)
    back = VPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.img_size == (32, 48)
    assert VPTConfig.from_dict(json.loads(json.dumps(VPTConfig(img_size=32).to_dict()))).img_size == 32
    e = E2VPTConfig(kept_segments=((0, 1), (2,)), swin_prune_stages=(0, 1), img_size=(16, 16))
    back = E2VPTConfig.from_dict(json.loads(json.dumps(e.to_dict())))
    assert back == e and back.kept_segments == ((0, 1), (2,))
    with pytest.raises(TypeError, match="VPTConfig.img_size"):
        VPTConfig(img_size=[32, 32, 3])
