"""Adapter, AdaptFormer and LoRA: identity at init, the papers' formulas, HF peft's LoRA, exact
merges, parameter counts of the papers' tables, save/load, composition, listing and refusals.

References are independent of the code under test: the plain timm model (identity at init and
unload), the formulas written out on a plain timm MLP / Linear, HF peft's LoRA on the same
weights, and the parameter counts printed in the SSF paper's Table 5.
"""
from __future__ import annotations

import copy
import io
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import timm_peft
from timm_peft.families import FamilyCapabilityError, get_family
from timm_peft.layers import is_swapped
from timm_peft.layers.bottleneck import ParallelAdapter, SequentialAdapter
from timm_peft.methods.lora import LoraConfig, LoraLayer, lora_targets

VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
ARCH = "vit_tiny_patch16_224"
CFGS = {"adapter": dict(bottleneck=4), "adapter_houlsby": dict(placement="houlsby", bottleneck=4),
        "adaptformer": dict(bottleneck=4), "lora": dict(r=2)}
#: one tiny model per family that promises the methods (arch, kwargs, input size)
FAMILIES = [
    ("vit_tiny_patch16_224", VIT, 32),
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=2), 28),
    ("beitv2_base_patch16_224", dict(img_size=32, depth=2, embed_dim=32, num_heads=2), 32),
    ("cait_xxs24_224", dict(img_size=32, depth=2, depth_token_only=1), 32),
    ("swin_tiny_patch4_window7_224", dict(img_size=56, depths=(1, 1), num_heads=(1, 2),
                                          embed_dim=16), 56),
    ("swinv2_tiny_window8_256", dict(img_size=64, depths=(1, 1), num_heads=(1, 2),
                                     embed_dim=16, window_size=8), 64),
    ("convnext_atto", dict(depths=(1, 1, 1, 1)), 32),   # 1×1-conv MLPs (conv_mlp)
    ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16)), 32),  # Linear MLPs
]


def _method(key: str) -> tuple[str, dict]:
    return key.split("_")[0], CFGS[key]


def _perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _pair(arch, kwargs, method, cfg, num_classes=3):
    """(plain timm model, the same weights with ``method`` applied)."""
    torch.manual_seed(0)
    plain = timm.create_model(arch, num_classes=num_classes, **kwargs).eval()
    return plain, timm_peft.apply_method(copy.deepcopy(plain), method, cfg).eval()


# ----------------------------------------------------------------------------------------------
# identity at init, on every family that lists the methods
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,kwargs,size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_fresh_adapters_are_the_plain_model_on_every_family(arch, kwargs, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    family = get_family(timm.create_model(arch, device="meta", **kwargs))
    for key in CFGS:
        method, cfg = _method(key)
        cfg = dict(cfg)
        if method == "lora" and "qkv" not in family.capabilities:
            cfg["target_modules"] = ("fc1", "fc2")  # ConvNeXt: its MLP (1×1 convs on atto)
        if key == "adapter_houlsby" and "block_attn" not in family.capabilities:
            with pytest.raises(FamilyCapabilityError, match="an attention in every block"):
                _pair(arch, kwargs, method, cfg)
            continue
        plain, model = _pair(arch, kwargs, method, cfg)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6, msg=key)
        # and the adapter is wired: moving its tensors changes the output, backward reaches them
        _perturb(model).train()
        model(x).sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        # (a ReLU bottleneck may be dead on CaiT's two class tokens: no per-tensor check)
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, key
        with torch.no_grad():
            assert not torch.allclose(model.eval()(x), plain(x), atol=1e-4), key


# ----------------------------------------------------------------------------------------------
# the formulas, on a plain timm block
# ----------------------------------------------------------------------------------------------

def test_adapter_and_adaptformer_compute_the_papers_formulas():
    torch.manual_seed(0)
    plain = timm.create_model(ARCH, num_classes=3, **VIT).eval()
    h = torch.randn(2, 5, 32)
    mlp, attn = plain.blocks[0].mlp, plain.blocks[0].attn

    model = _perturb(timm_peft.apply_method(copy.deepcopy(plain), "adapter",
                                            dict(placement="houlsby", bottleneck=4, act="gelu")))
    a = model.blocks[0].mlp.adapter
    with torch.no_grad():
        y = mlp(h)  # y + W_up gelu(W_down y + b_down) + b_up
        want = y + (F.gelu(y @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
        torch.testing.assert_close(model.blocks[0].mlp(h), want)
        y = attn(h)
        a = model.blocks[0].attn.adapter
        want = y + (F.gelu(y @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
        torch.testing.assert_close(model.blocks[0].attn(h), want)

    model = _perturb(timm_peft.apply_method(copy.deepcopy(plain), "adaptformer",
                                            dict(bottleneck=4, scale=0.1)))
    a = model.blocks[0].mlp.adaptformer
    with torch.no_grad():  # MLP(h) + s · ReLU(h W_down) W_up (AdaptFormer Eq. 5-6), h = LN(x')
        want = mlp(h) + 0.1 * (F.relu(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
        torch.testing.assert_close(model.blocks[0].mlp(h), want)


def test_bottlenecks_on_channels_first_maps_act_on_the_channel_axis():
    torch.manual_seed(0)
    plain = timm.create_model("convnext_atto", depths=(1, 1, 1, 1), num_classes=3).eval()
    model = _perturb(timm_peft.apply_method(copy.deepcopy(plain), "adapter",
                                            dict(bottleneck=3)))
    mlp, a = model.stages[0].blocks[0].mlp, model.stages[0].blocks[0].mlp.adapter
    h = torch.randn(2, 40, 4, 5)
    with torch.no_grad():
        y = plain.stages[0].blocks[0].mlp(h)
        yl = y.permute(0, 2, 3, 1)
        want = yl + (F.relu(yl @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
        torch.testing.assert_close(mlp(h), want.permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------
# LoRA: HF peft is the reference; merges are exact
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [dict(r=8), dict(r=4, lora_alpha=16.0),
                                 dict(r=4, lora_alpha=16.0, use_rslora=True),
                                 dict(r=2, target_modules=("qkv", "fc1"))])
def test_lora_equals_hf_peft_on_the_same_weights(cfg):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    plain = timm.create_model(ARCH, num_classes=3, **VIT).eval()
    ours = _perturb(timm_peft.apply_method(copy.deepcopy(plain), "lora", cfg), scale=0.3)
    config = LoraConfig(**cfg)
    ref = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, use_rslora=config.use_rslora,
        target_modules=list(config.target_modules))).eval()
    # peft's ModulesToSave would wrap nothing here: copy the head ours trained too
    state = ref.state_dict()
    targets = lora_targets(plain, config)
    assert len(targets) == 2 * len(config.target_modules)
    with torch.no_grad():
        for name in targets:
            lora = ours.get_submodule(name).lora
            state[f"base_model.model.{name}.lora_A.default.weight"].copy_(lora.A)
            state[f"base_model.model.{name}.lora_B.default.weight"].copy_(lora.B)
        state["base_model.model.head.weight"].copy_(ours.head.weight)
        state["base_model.model.head.bias"].copy_(ours.head.bias)
        x = torch.randn(3, 3, 32, 32)
        want = ref(x)
        assert not torch.allclose(want, plain(x), atol=1e-3)  # the update does something
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)


def test_lora_merge_is_exact_and_unmerge_bit_exact():
    torch.manual_seed(0)
    model = _perturb(timm.create_model(f"{ARCH}.lora", num_classes=3, peft_cfg=dict(r=4), **VIT),
                     scale=0.3)
    x = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y = model(x)
        timm_peft.merge(model)
        qkv = model.blocks[0].attn.qkv
        lora = qkv.lora
        torch.testing.assert_close(qkv.weight, before["blocks.0.attn.qkv.weight"]
                                   + lora.scaling * lora.B @ lora.A)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="merged LoRA model.*unmerge"):
            timm_peft.save_pretrained(model, "/nonexistent/never_written")
        timm_peft.unmerge(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(x), y)


def test_lora_merge_and_unload_is_a_plain_timm_model(tmp_path):
    torch.manual_seed(0)
    model = _perturb(timm.create_model(f"{ARCH}.lora", num_classes=3, **VIT), scale=0.3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    plain = timm_peft.merge_and_unload(model)
    assert not any(is_swapped(m) for m in plain.modules())
    fresh = timm.create_model(ARCH, num_classes=3, **VIT).eval()
    assert set(plain.state_dict()) == set(fresh.state_dict())
    fresh.load_state_dict(plain.state_dict())  # strict: exactly the base architecture's keys
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.save(plain, buf)
    assert b"timm_peft" not in buf.getvalue()


def test_lora_reaches_functional_qkv_through_timms_separate_bias_path():
    """EVA/BEiT/Swin-V2 attentions read qkv.weight with F.linear when they have q/v biases;
    LoRA switches them to timm's call-then-add path, and unload switches them back."""
    torch.manual_seed(0)
    kwargs = dict(img_size=28, depth=1)
    plain = timm.create_model("eva02_tiny_patch14_224", num_classes=3, **kwargs).eval()
    assert plain.blocks[0].attn.q_bias is not None and not plain.blocks[0].attn.qkv_bias_separate
    model = _perturb(timm_peft.apply_method(copy.deepcopy(plain), "lora"), scale=0.3)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        y = model(x)
        # reference: the merged weight through timm's own F.linear path
        ref = copy.deepcopy(plain)
        qkv, lora = model.blocks[0].attn.qkv, model.blocks[0].attn.qkv.lora
        ref.blocks[0].attn.qkv.weight.add_(lora.scaling * lora.B @ lora.A)
        ref.head.load_state_dict(model.head.state_dict())
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    timm_peft.unload(model)
    assert not is_swapped(model.blocks[0].attn) and not model.blocks[0].attn.qkv_bias_separate


def test_lora_targets_and_config_checks():
    model = timm.create_model(ARCH, **VIT)
    assert lora_targets(model, LoraConfig(target_modules=("mlp.fc2",))) == [
        "blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert lora_targets(model, LoraConfig(target_modules=("head",))) == []  # never the classifier
    for bad in [dict(r=0), dict(r=10**6), dict(target_modules=()), dict(target_modules=("a b",)),
                dict(target_modules=tuple(f"m{i}" for i in range(65))), dict(lora_dropout=1.0)]:
        with pytest.raises((ValueError, TypeError)):
            LoraConfig(**bad)
    with pytest.raises(FamilyCapabilityError, match=r"named \['nope'\].*fc1"):
        timm.create_model(f"{ARCH}.lora", peft_cfg=dict(target_modules=["nope"]), **VIT)


def test_lora_on_1x1_convolutions_merges_exactly():
    torch.manual_seed(0)
    model = _perturb(timm.create_model("convnext_atto.lora", depths=(1, 1, 1, 1), num_classes=3,
                                       peft_cfg=dict(target_modules=("fc1", "fc2"), r=2)),
                     scale=0.3)
    assert isinstance(model.stages[0].blocks[0].mlp.fc1, nn.Conv2d)
    assert is_swapped(model.stages[0].blocks[0].mlp.fc1, LoraLayer)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        plain = timm_peft.merge_and_unload(model)
        torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Adapter / AdaptFormer: no merge, clean unload
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["adapter", "adaptformer"])
def test_unmergeable_methods_refuse_merge_and_unload_to_the_base(method):
    plain, model = _pair(ARCH, VIT, method, dict(bottleneck=4))
    _perturb(model)
    for fn in (timm_peft.merge, timm_peft.merge_and_unload):
        with pytest.raises(NotImplementedError, match="cannot be merged: a bottleneck's "
                                                      "non-linearity.*unload"):
            fn(model)
    x = torch.randn(2, 3, 32, 32)
    base = timm_peft.unload(model)
    assert not any(is_swapped(m, SequentialAdapter) or is_swapped(m, ParallelAdapter)
                   for m in base.modules())
    assert set(base.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(base(x), plain(x))


# ----------------------------------------------------------------------------------------------
# parameter counts: the papers' tables
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,num_classes,want", [
    # SSF paper, Table 5 (Adapter rows, params in M): CIFAR-100 (100 classes) / ImageNet-1K
    ("vit_base_patch16_224", 100, 0.31), ("vit_base_patch16_224", 1000, 1.00),
    ("swin_base_patch4_window7_224", 100, 0.33), ("swin_base_patch4_window7_224", 1000, 1.26),
    ("convnext_base", 100, 0.45), ("convnext_base", 1000, 1.37)])
def test_adapter_counts_are_the_ssf_papers_table_5(arch, num_classes, want):
    model = timm.create_model(f"{arch}.adapter", num_classes=num_classes, device="meta")
    assert round(timm_peft.get_nb_trainable_parameters(model)[0] / 1e6, 2) == want


@pytest.mark.parametrize("name,cfg,want", [
    # 12 · (2·768·d' + d' + 768), d' = 768 // reduction (VPT's grid 8, 64, 256)
    ("adapter", dict(reduction_factor=8), 12 * (2 * 768 * 96 + 96 + 768)),
    ("adapter", dict(reduction_factor=64), 230_544),
    ("adapter", dict(reduction_factor=256), 12 * (2 * 768 * 3 + 3 + 768)),
    ("adapter", dict(placement="houlsby"), 2 * 230_544),
    ("adaptformer", None, 12 * (2 * 768 * 64 + 64 + 768)),   # d̂ = 64
    ("lora", None, 12 * 8 * (768 + 3 * 768))])               # qkv, r = 8: 0.29M
def test_vit_base_counts_follow_the_formulas(name, cfg, want):
    model = timm.create_model(f"vit_base_patch16_224.{name}", num_classes=0, peft_cfg=cfg,
                              device="meta")
    assert timm_peft.get_nb_trainable_parameters(model)[0] == want


# ----------------------------------------------------------------------------------------------
# save / load, pickling, composition, listing
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", list(CFGS))
def test_save_reload_is_bit_identical_and_carries_only_the_adapter(key, tmp_path):
    method, cfg = _method(key)

    def build(seed):
        torch.manual_seed(seed)
        return timm.create_model(f"{ARCH}.{method}", num_classes=3, peft_cfg=cfg, **VIT).eval()

    model = _perturb(build(0))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    out = timm_peft.save_pretrained(model, tmp_path / key)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert set(saved) == set(model.peft_adapter_keys)
    assert sum(t.numel() for t in saved.values()) == timm_peft.get_nb_trainable_parameters(model)[0]
    card = (out / "README.md").read_text()
    assert timm_peft.core.get_method(method).paper.split(",")[0] in card
    fresh = build(0)  # same base weights, fresh adapter
    timm_peft.load_adapter(fresh, out)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
        assert torch.equal(pickle.loads(pickle.dumps(model))(x), y)


def test_lora_composes_with_ssf_in_either_order():
    from timm_peft.methods.lora import LoraConfig
    from timm_peft.methods.ssf import SSFConfig
    torch.manual_seed(0)
    plain = timm.create_model(ARCH, num_classes=3, **VIT).eval()
    x = torch.randn(2, 3, 32, 32)
    for first, second, cfg2 in [("ssf", "lora", LoraConfig(r=2, train_head=False)),
                                ("lora", "ssf", SSFConfig(train_head=False))]:
        model = timm_peft.apply_method(copy.deepcopy(plain), first)
        timm_peft.add_adapter(model, "b", cfg2.to_dict(), method=second)
        timm_peft.set_adapter(model, ["default", "b"])
        _perturb(model, scale=0.2)
        members = timm_peft.get_adapters(model)
        # reference: the two surgeries in turn on a copy of the base, with the same tensors
        ref = timm_peft.apply_method(copy.deepcopy(plain), first)
        timm_peft.core.get_method(second).apply(ref, cfg2)
        with torch.no_grad():
            for name in ("default", "b"):
                for k, t in members[name].state.items():
                    ref.state_dict()[k].copy_(t)
            torch.testing.assert_close(model(x), ref.eval()(x), atol=0, rtol=0)
            # and by hand on blocks.0.attn.qkv: γ⊙(Wh+b+sBAh)+β (ssf outer) or γ⊙(Wh+b)+β+sBAh
            qkv = model.blocks[0].attn.qkv
            h = torch.randn(4, 32)
            lin = F.linear(h, qkv.weight, qkv.bias)
            low = qkv.lora.scaling * h @ qkv.lora.A.T @ qkv.lora.B.T
            g, b = qkv.ssf.scale, qkv.ssf.shift
            want = g * lin + b + low if first == "ssf" else g * (lin + low) + b
            torch.testing.assert_close(qkv(h), want, rtol=1e-5, atol=1e-6)
        model.train()
        model(x).sum().backward()
        assert qkv.lora.B.grad is not None and qkv.ssf.scale.grad is not None


def test_list_models_lists_exactly_the_promised_families():
    lora = set(timm_peft.list_models(method="lora"))
    adapter = set(timm_peft.list_models(method="adapter"))
    assert {"vit_base_patch16_224.lora", "swin_tiny_patch4_window7_224.lora",
            "eva02_tiny_patch14_224.lora", "cait_xxs24_224.lora"} <= lora
    assert "convnext_tiny.lora" not in lora and "resnet50.lora" not in lora
    assert {"convnext_tiny.adapter", "swinv2_tiny_window8_256.adapter",
            "beitv2_base_patch16_224.adapter"} <= adapter
    assert not any(n.startswith("resnet") for n in adapter)
    assert set(timm_peft.list_models(method="adaptformer")) == {
        n.replace(".adapter", ".adaptformer") for n in adapter}
    # ViT archs whose blocks fuse attention and MLP (ParallelScalingBlock) are not listed
    fused = [a for a in timm.list_models("vit_*") if timm_peft.families.base.entrypoint_uses(
        a, "ParallelScalingBlock")]
    assert fused and not any(f"{a}.adapter" in adapter or f"{a}.lora" in lora for a in fused)
    # every family listed builds on the meta device
    for name in sorted(lora)[::40] + sorted(adapter)[::40]:
        timm.create_model(name, device="meta")


@pytest.mark.parametrize("method", ["adapter", "adaptformer", "lora"])
def test_build_time_refusal_says_what_is_missing(method):
    with pytest.raises(FamilyCapabilityError, match=rf"method '{method}' needs .*'resnet' family.*"
                                                    rf"list_models\(method='{method}'\)"):
        timm.create_model(f"resnet18.{method}")


# ----------------------------------------------------------------------------------------------
# the README's sections for these methods run as written
# ----------------------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("### Adapter:", "### AdaptFormer:", "### LoRA:")


@pytest.mark.parametrize("heading", SECTIONS)
def test_readme_section_runs(heading, tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"README section {heading!r} has no python block"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, f"README {heading}", "exec"), {})


# ----------------------------------------------------------------------------------------------
# an adapter is untrusted input: every size-like field is bounded, at every door
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["adapter", "adaptformer", "lora"])
def test_every_numeric_config_field_is_bounded(method):
    import dataclasses
    import typing
    cls = timm_peft.core.get_method(method).config_cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        if int in args or float in args:
            assert f.metadata.get("le") is not None or f.metadata.get("lt") is not None, f.name


@pytest.mark.parametrize("method,cfg,field,value,message", [
    ("lora", dict(r=2), "r", 10 ** 9, r"LoraConfig.r must be <= 4096"),
    ("lora", dict(r=2), "r", 4, r"mis-shaped tensors"),
    ("lora", dict(r=2), "target_modules", ["x"] * 1000, r"target_modules must name 1 to 64"),
    ("lora", dict(r=2), "target_modules", ["fc1"], r"tensors|keys"),
    ("lora", dict(r=2), "lora_alpha", 1e30, r"LoraConfig.lora_alpha must be <= 65536"),
    ("adapter", dict(bottleneck=4), "bottleneck", 10 ** 9, r"AdapterConfig.bottleneck must be <= 8192"),
    ("adapter", dict(bottleneck=4), "reduction_factor", 10 ** 9,
     r"AdapterConfig.reduction_factor must be <= 4096"),
    ("adapter", dict(bottleneck=4), "placement", "houlsby", r"tensors|keys"),
    ("adaptformer", dict(bottleneck=4), "bottleneck", 10 ** 7,
     r"AdaptFormerConfig.bottleneck must be <= 8192"),
    ("adaptformer", dict(bottleneck=4), "scale", 1e300, r"AdaptFormerConfig.scale must be <= 100"),
])
def test_hostile_configs_are_refused_and_change_nothing(method, cfg, field, value, message,
                                                        tmp_path):
    import json
    from timm_peft.io import CONFIG_NAME, AdapterError
    torch.manual_seed(0)
    model = _perturb(timm.create_model(f"{ARCH}.{method}", num_classes=3, peft_cfg=cfg, **VIT))
    out = timm_peft.save_pretrained(model, tmp_path / "a")
    config = json.loads((out / CONFIG_NAME).read_text())
    config["peft_config"][field] = value
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=message):
        timm_peft.from_pretrained(out)
    target = _perturb(timm.create_model(f"{ARCH}.{method}", num_classes=3, peft_cfg=cfg, **VIT), 7)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterError):
        timm_peft.load_adapter(target, out)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("first,second,cfg2", [
    ("ssf", "adapter", dict(bottleneck=4, placement="houlsby")), ("adapter", "ssf", {}),
    ("ssf", "adaptformer", dict(bottleneck=4)),
    ("ssf", "lora", dict(r=2, target_modules=("proj", "fc2")))])
def test_composition_with_ssf_keeps_the_residual_adds_right(first, second, cfg2):
    """SSF moves a pre-norm block's residual adds into its branches' last Linears while training
    (a memory saving); with another method adding to those branches' outputs it must not, or the
    adapter would read (and LoRA's update skip the layer scale of) the residual stream."""
    torch.manual_seed(0)
    kwargs = dict(VIT, init_values=0.5)  # a layer scale, as DeiT-III's
    first_cfg = dict(bottleneck=4) if first == "adapter" else None
    model = timm.create_model(f"{ARCH}.{first}", num_classes=3, peft_cfg=first_cfg, **kwargs)
    timm_peft.add_adapter(model, "b", dict(cfg2, train_head=False), method=second)
    timm_peft.set_adapter(model, ["default", "b"])
    _perturb(model, scale=0.2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.eval()(x)  # timm's block forward (no grad: no residual fusion)
    got = model.train()(x)      # eager training: SSF's fused residual where it may
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generic_answer_finds_timms_mlp_and_attention_on_declaration_families():
    """Models of a declaration-only family (XCiT among the mixers) take the methods where timm's
    own block structure has an ``mlp`` and an ``attn`` (the generic answer); they are listed
    through the family's ``module_capabilities``, the coverage sweep's cells."""
    arch, kwargs = "xcit_nano_12_p16_224", dict(img_size=32, depth=2)
    for method in ("adapter", "adaptformer", "lora"):
        assert f"{arch}.{method}" in timm_peft.list_models("xcit_*", method=method)
    x = torch.randn(2, 3, 32, 32)
    for method, cfg in [("adapter", dict(placement="houlsby")), ("adaptformer", None),
                        ("lora", None)]:
        plain, model = _pair(arch, kwargs, method, cfg)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)
