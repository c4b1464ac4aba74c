"""timm integration: method suffixes, composed weight tags, the offline pretrained path, errors."""
import hashlib
import re
import subprocess
import sys

import pytest
import timm
import torch
from timm.models import _registry

import timm_peft
from timm_peft.integration import split_method

from conftest import TINY_VIT, local_overlay


def _digest(model):
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_PLAIN_SCRIPT = """
import hashlib, sys, torch, timm
{maybe_import}
torch.manual_seed(0)
m = timm.create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", img_size=32, depth=2).eval()
h = hashlib.sha256()
for k, v in m.state_dict().items():
    h.update(k.encode() + v.contiguous().view(torch.uint8).numpy().tobytes())
torch.manual_seed(1)
with torch.no_grad():
    y = m(torch.randn(2, 3, 32, 32))
h.update(y.numpy().tobytes())
h.update(repr(sorted(m.pretrained_cfg.items())).encode())
print(h.hexdigest(), type(m).__name__, hasattr(m, "peft_config"))
"""


def test_plain_names_bit_identical_to_timm_without_timm_peft():
    outs = [subprocess.run([sys.executable, "-c", _PLAIN_SCRIPT.format(maybe_import=imp)],
                           capture_output=True, text=True, check=True).stdout.split()
            for imp in ("", "import timm_peft")]
    assert outs[0] == outs[1]
    assert outs[0][1:] == ["VisionTransformer", "False"]


@pytest.mark.parametrize("tag, expected", [
    ("augreg2_in21k_ft_in1k.linear", ("augreg2_in21k_ft_in1k", "linear")),
    ("linear", (None, "linear")),
    ("partial_1", (None, "partial_1")),
    ("augreg_in21k", ("augreg_in21k", None)),
    ("", (None, None)),
])
def test_split_method(tag, expected):
    assert split_method("vit_base_patch16_224", tag) == expected


def test_unknown_method_suffix_lists_methods():
    with pytest.raises(ValueError, match=r"unknown PEFT method suffix 'dora'.*methods: "
                                         r"\[.*'linear'"):
        timm.create_model("vit_tiny_patch16_224.augreg_in21k.dora", **TINY_VIT)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224.lroa", "resnet18.not_a_tag",
                                  "vit_tiny_patch16_224.no_such_tag.linear"])
def test_suffix_neither_tag_nor_method_names_both(name):
    arch, _, suffix = name.partition(".")
    tag = suffix.split(".")[0]
    with pytest.raises(RuntimeError) as info:  # timm's exception type, as before timm_peft
        timm.create_model(name)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)  # like timm_peft's other bad names
    with pytest.raises(RuntimeError) as timm_own:  # timm's unwrapped judgment of the tag
        _registry.get_pretrained_cfg(f"{arch}.{tag}")
    assert msg.startswith(str(timm_own.value) + " ")
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
    assert tags and all(f"'{t}'" in msg for t in tags), msg
    assert all(f"'{m}'" in msg for m in timm_peft.list_methods()), msg
    examples = re.findall(r"e\.g\. '([^']+)' or '([^']+)'$", msg)
    assert examples, msg
    for example in examples[0]:  # the names offered build
        kwargs = TINY_VIT if arch.startswith("vit") else {}
        assert timm.create_model(example, **kwargs).peft_method == "linear"


def test_unknown_weight_tag_keeps_timm_error():
    with pytest.raises(RuntimeError, match="Invalid pretrained tag"):
        timm.create_model("vit_tiny_patch16_224.no_such_tag.linear", **TINY_VIT)
    with pytest.raises(RuntimeError, match="Invalid pretrained tag"):
        timm.create_model("vit_tiny_patch16_224.no_such_tag", **TINY_VIT)


def test_composed_tag_pretrained_offline(vit_weights):
    from safetensors.torch import load_file
    file_state = load_file(str(vit_weights))
    model = timm.create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k.linear", pretrained=True,
                              pretrained_cfg_overlay=local_overlay(vit_weights), num_classes=7,
                              **TINY_VIT)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in file_state.items():
        if not k.startswith("head."):
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert state["head.weight"].shape == (7, 192)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    # timm's pretrained_cfg is untouched and still drives the data pipeline
    assert model.pretrained_cfg["tag"] == "augreg_in21k_ft_in1k"
    assert model.pretrained_cfg["file"] == str(vit_weights)
    plain = timm.create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True,
                              pretrained_cfg_overlay=local_overlay(vit_weights), **TINY_VIT)
    assert timm.data.resolve_data_config(model=model) == timm.data.resolve_data_config(model=plain)
    assert model.pretrained_cfg == plain.pretrained_cfg
    assert model.peft_base == dict(architecture="vit_tiny_patch16_224",
                                   pretrained_tag="augreg_in21k_ft_in1k", pretrained=True,
                                   model_args=dict(num_classes=7, **TINY_VIT))
    # only the method's tensors train
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], state[k])}
    assert changed <= {"head.weight", "head.bias"} and changed


def test_keyword_forms_and_their_errors():
    a = timm.create_model("vit_tiny_patch16_224", peft="partial", peft_cfg={"num_blocks": 2},
                          **TINY_VIT)
    b = timm_peft.create_model("vit_tiny_patch16_224", peft="partial_1", **TINY_VIT)
    c = timm.create_model("vit_tiny_patch16_224.partial", peft="partial", **TINY_VIT)
    assert a.peft_config.num_blocks == 2 and b.peft_config.num_blocks == 1
    assert c.peft_method == "partial"
    with pytest.raises(ValueError, match="peft_cfg was given but no method"):
        timm.create_model("vit_tiny_patch16_224", peft_cfg={"num_blocks": 2}, **TINY_VIT)
    with pytest.raises(ValueError, match="method suffix 'linear' and peft='bias' disagree"):
        timm.create_model("vit_tiny_patch16_224.linear", peft="bias", **TINY_VIT)
    with pytest.raises(ValueError, match="unknown PEFT method 'nope'"):
        timm_peft.create_model("vit_tiny_patch16_224", peft="nope", **TINY_VIT)
    with pytest.raises(ValueError, match="PartialConfig.num_blocks must be >= 1"):
        timm.create_model("vit_tiny_patch16_224.partial", peft_cfg={"num_blocks": 0}, **TINY_VIT)
    with pytest.raises(TypeError, match="peft_cfg must be a dict or PartialConfig"):
        timm.create_model("vit_tiny_patch16_224.partial", peft_cfg=3, **TINY_VIT)


def test_archs_registered_after_import_are_reached():
    from timm.models import register_model

    @register_model
    def timm_peft_test_net(pretrained=False, **kwargs):
        return timm.models.resnet._create_resnet(
            "resnet10t", pretrained, **dict(block=timm.models.resnet.BasicBlock,
                                            layers=(1, 1, 1, 1), **kwargs))

    try:
        model = timm.create_model("timm_peft_test_net.linear", num_classes=4)
        assert model.peft_method == "linear"
        assert timm_peft.get_nb_trainable_parameters(model)[0] == 512 * 4 + 4
    finally:
        for reg in (_registry._model_entrypoints, _registry._model_to_module):
            reg.pop("timm_peft_test_net", None)
        for names in _registry._module_to_models.values():
            names.discard("timm_peft_test_net")


def test_weight_tags_survive_import():
    # timm_peft never re-registers archs (that would delete their weight tags)
    assert "vit_base_patch16_224.augreg2_in21k_ft_in1k" in timm.list_pretrained("vit_base_patch16_224*")
    fn = _registry._model_entrypoints["vit_base_patch16_224"]
    assert fn.__name__ == "vit_base_patch16_224" and hasattr(fn, "__timm_peft_original__")


def test_features_only_reaches_inner_model():
    model = timm.create_model("vit_tiny_patch16_224.bias", features_only=True, out_indices=(1,),
                              **TINY_VIT)
    assert model.peft_method == "bias" and model.model.peft_method == "bias"
    feats = model(torch.randn(1, 3, 32, 32))
    assert feats[0].shape == (1, 192, 2, 2)


def test_list_models():
    names = timm_peft.list_models("vit_base_patch16_224*", method="partial")
    assert "vit_base_patch16_224.partial" in names
    assert all(n.endswith(".partial") for n in names)
    tagged = timm_peft.list_models("vit_base_patch16_224.augreg*", method="linear", pretrained=True)
    assert "vit_base_patch16_224.augreg2_in21k_ft_in1k.linear" in tagged
    assert "mobilenetv3_large_100.partial" in timm_peft.list_models("mobilenetv3_*", method="partial")
    assert "mobilenetv3_large_100.vpt" in timm_peft.list_models("mobilenetv3_*", method="vpt")
    assert not timm_peft.list_models("mobilenetv3_*", method="e2vpt")  # no tokens, no attention
    assert not timm_peft.list_models("mixer_*", method="vpt")  # generic family: no prompt site
    assert "mobilenetv3_small_050.linear" in timm_peft.list_models("mobilenetv3_*", method="linear")


@pytest.mark.parametrize("name, kwargs", [
    ("resnet10t.bias", {}),
    ("convnext_atto.partial", {}),
    ("swin_tiny_patch4_window7_224.bias", dict(img_size=64, window_size=2, depths=(1, 1, 1, 1),
                                               embed_dim=16, num_heads=(1, 1, 1, 1))),
])
def test_features_only_on_convnets_and_swin(name, kwargs):
    model = timm.create_model(name, features_only=True, out_indices=(1, 2), **kwargs)
    plain = timm.create_model(name.split(".")[0], features_only=True, out_indices=(1, 2),
                              feature_cls="getter", **kwargs)
    plain.load_state_dict(model.state_dict())
    assert model.model.peft_method == name.split(".")[1]
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(model.eval()(x), plain.eval()(x)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="feature_cls='getter'"):
        timm.create_model(name, features_only=True, feature_cls="list", **kwargs)


def test_distilled_deit_trains_both_heads():
    model = timm.create_model("deit_tiny_distilled_patch16_224.linear", num_classes=3, img_size=32,
                              depth=1)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
