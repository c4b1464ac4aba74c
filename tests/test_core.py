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
    mlp = timm.create_model("mobilenetv3_small_050")
    assert [get_model_family(m) for m in (vit, deit, res, cnx, swin, mlp)] == \
        ["vit", "vit", "resnet", "convnext", "swin", None]
    assert get_blocks(vit) == list(vit.blocks)
    assert len(get_blocks(res)) == 4 and get_blocks(res)[-1] is res.layer4[-1]
    assert len(get_blocks(swin)) == 4
    with pytest.raises(ValueError, match="not in a known family"):
        get_blocks(mlp)


def test_family_restriction_names_supported():
    mlp = timm.create_model("mobilenetv3_small_050")
    with pytest.raises(ValueError, match=r"supports model families \['vit', 'swin', 'convnext', "
                                         r"'resnet'\]; MobileNetV3 is not in any of them"):
        timm_peft.apply_method(mlp, "partial")


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
        assert clone.bn1.train.module is clone.bn1  # bound to the copy, not the original
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(clone.eval()(x), model.eval()(x))
