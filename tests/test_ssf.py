"""SSF: parameter counts, sites, channel axes, identity init, exact merge / unmerge, save / load."""
import copy
import functools
import json
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import LayerNorm2d
from torch import nn

import timm_peft
from timm_peft.layers import is_swapped, original_class, restore_class, restore_classes
from timm_peft.layers.scale_shift import ScaleShiftNorm
from timm_peft.methods.ssf import ScaleShift, SSFConfig, scale_shift_attached, ssf_sites

from conftest import TINY_VIT

NUM_CLASSES = 5
#: tiny members of each family (plus variants that change the site types)
CONFIGS = {
    "vit": ("vit_tiny_patch16_224", TINY_VIT),
    "vit_qknorm_avg": ("vit_tiny_patch16_224", dict(TINY_VIT, qk_norm=True, class_token=False,
                                                    global_pool="avg")),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=16, depths=(1, 1),
                                                  num_heads=(2, 4), window_size=4)),
    # dims[0] = 8 = the stem's output height and width: the channel axis cannot be told by shape
    "convnext": ("convnext_atto", dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1))),
    "convnext_conv_mlp": ("convnext_atto", dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1),
                                                conv_mlp=True)),
    "resnet": ("resnet10t", dict(channels=(8, 16, 16, 16), stem_width=8)),
}
FOUR_FAMILIES = ("vit", "swin", "convnext", "resnet")


def _input(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


#: the mergeable placement where a config has a choice (the default is tested on its own below)
PEFT_CFG = {"vit_qknorm_avg": dict(pooled_norm_site="after_fc_norm")}


def _build(name: str, **peft_cfg):
    """(plain timm model, the same model with SSF applied) from one seed."""
    arch, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    base = timm.create_model(arch, num_classes=NUM_CLASSES, **kwargs)
    model = timm_peft.apply_method(copy.deepcopy(base), "ssf", {**PEFT_CFG.get(name, {}), **peft_cfg})
    return base.eval(), model


def _train(model: nn.Module, steps: int = 2, lr: float = 0.05) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        x = _input(100 + step)
        loss = F.cross_entropy(model(x), torch.arange(2) % NUM_CLASSES)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _ssf_wired(model: nn.Module) -> int:
    """Sites whose output goes through SSF (a hook, or the scale and shift folded into a norm)."""
    return sum(scale_shift_attached(m) for m in model.modules())


# ----------------------------------------------------------------------------------------------
# counts and sites
# ----------------------------------------------------------------------------------------------

def test_vit_base_parameter_count_matches_paper():
    d, blocks = 768, 12
    per_block = 2 * (d + 3 * d + d + d + 4 * d + d)  # norm1, qkv, proj, norm2, fc1, fc2
    expected = 2 * d + blocks * per_block + 2 * d     # + patch embedding, final norm
    assert expected == 205_824

    headless = timm.create_model("vit_base_patch16_224.ssf", num_classes=0, device="meta")
    assert timm_peft.get_nb_trainable_parameters(headless)[0] == expected
    m = timm.create_model("vit_base_patch16_224.ssf", num_classes=100, device="meta")
    assert timm_peft.get_nb_trainable_parameters(m)[0] == expected + 768 * 100 + 100 == 282_724
    frozen_head = timm.create_model("vit_base_patch16_224.ssf", num_classes=100, device="meta",
                                    peft_cfg=dict(train_head=False))
    assert timm_peft.get_nb_trainable_parameters(frozen_head)[0] == expected


def test_vit_base_sites_are_the_papers():
    plain = timm.create_model("vit_base_patch16_224", device="meta")
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    expected = (["patch_embed.proj"] + [f"blocks.{i}.{s}" for i in range(12) for s in block]
                + ["norm"])
    assert ssf_sites(plain) == expected


def test_sites_per_family():
    _, swin = _build("swin")
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    assert ssf_sites(swin) == (["patch_embed.proj", "patch_embed.norm"]
                               + [f"layers.0.blocks.0.{s}" for s in block]
                               + ["layers.1.downsample.norm"]
                               + [f"layers.1.blocks.0.{s}" for s in block] + ["norm"])

    _, convnext = _build("convnext")
    block = ["conv_dw", "norm", "mlp.fc1", "mlp.fc2"]
    stages = [[f"stages.{i}.downsample.0", f"stages.{i}.downsample.1"] * (i > 0)
              + [f"stages.{i}.blocks.0.{s}" for s in block] for i in range(4)]
    assert ssf_sites(convnext) == ["stem.0", "stem.1"] + sum(stages, []) + ["head.norm"]

    _, resnet = _build("resnet")
    bns = [n for n, m in resnet.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 15 and ssf_sites(resnet) == bns  # stem 2 + bn1 + blocks 8 + downsample 4

    _, vit = _build("vit_qknorm_avg")
    sites = ssf_sites(vit)
    assert {"blocks.0.attn.q_norm", "blocks.0.attn.k_norm", "fc_norm"} <= set(sites)
    assert not any(s.startswith("head") for s in sites)


def test_trainable_are_scales_shifts_and_head_and_backbone_gets_no_grad():
    _, model = _build("vit")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({f"{s}.ssf.scale" for s in ssf_sites(model)}
                         | {f"{s}.ssf.shift" for s in ssf_sites(model)}
                         | {"head.weight", "head.bias"})
    model(_input()).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------

def _reference_axis(op: nn.Module) -> int:
    """Where the channels of each op's output lie, written out independently of the library."""
    if isinstance(op, LayerNorm2d):  # subclasses nn.LayerNorm but normalises dim 1
        return 1
    if isinstance(op, (nn.Linear, nn.LayerNorm)):
        return -1
    assert isinstance(op, (nn.Conv2d, nn.BatchNorm2d)), type(op)
    return 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scale_shift_on_the_channel_axis(name):
    _, model = _build(name)
    g = torch.Generator().manual_seed(5)
    seen = []
    for site in ssf_sites(model):
        op = model.get_submodule(site)
        axis = _reference_axis(op)
        with torch.no_grad():  # non-trivial base affine params and statistics to fold into
            for t in (op.weight, op.bias, getattr(op, "running_mean", None)):
                if t is not None:
                    t.add_(0.3 * torch.randn(t.shape, generator=g))
            if getattr(op, "running_var", None) is not None:
                op.running_var.uniform_(0.5, 2.0, generator=g)

        def post(mod, args, out, site=site, axis=axis):
            seen.append(site)
            plain = original_class(mod).forward(mod, *args)  # the operation alone, without SSF
            gamma, beta = mod.ssf.scale.detach(), mod.ssf.shift.detach()
            shape = [1] * out.ndim
            shape[axis] = -1
            # Linear and norm sites fold γ, β into the weights: float32 rounding of a matmul
            torch.testing.assert_close(out, plain * gamma.view(shape) + beta.view(shape),
                                       rtol=1e-4, atol=1e-4)

        op.register_forward_hook(post)
    with torch.no_grad():
        model(_input())
    assert seen == ssf_sites(model)
    # affine norms fold the map into their parameters, every other site scales its output
    fused = [s for s in seen if is_swapped(model.get_submodule(s), ScaleShiftNorm)]
    assert fused == [s for s in seen if isinstance(model.get_submodule(s),
                                                   (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm))]
    assert fused and (name == "resnet" or len(fused) < len(seen))


@pytest.mark.parametrize("name", FOUR_FAMILIES)
def test_norm_sites_fold_the_map_with_the_hooks_gradients(name):
    """Folding γ, β into a norm's affine parameters gives the gradients of γ ⊙ norm(x) + β."""
    import pickle
    _, model = _build(name)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)) and m.weight is not None:
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.add_(0.3 * torch.randn(m.bias.shape, generator=g))
    reference = copy.deepcopy(model)
    for m in reference.modules():  # every site through a plain hook: y = γ ⊙ op(x) + β
        if is_swapped(m, ScaleShiftNorm):
            restore_class(m, ScaleShiftNorm)
            m.register_forward_hook(lambda mod, args, out: mod.ssf(out))
    x, y = _input(), torch.arange(2) % NUM_CLASSES
    for clone in (model, pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        grads = []
        for m in (clone, reference):
            m.train()
            m.zero_grad()
            torch.manual_seed(0)  # the same drop-path draws (Swin)
            F.cross_entropy(m(x), y).backward()
            grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
        assert grads[0].keys() == grads[1].keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=n: f"{n}: {m}")


def _layouts():
    g = torch.Generator().manual_seed(3)
    nchw = torch.randn(2, 6, 5, 4, generator=g)
    yield 1, nchw
    yield 1, nchw.to(memory_format=torch.channels_last)
    yield 1, torch.randn(2, 6, 1, 1, generator=g).to(memory_format=torch.channels_last)
    yield 1, torch.randn(7, 6, generator=g).t()[None, :, None, :]  # odd strides of size-1 dims
    yield 1, torch.randn(3, 6, generator=g)
    yield 1, torch.randn(2, 9, 6, generator=g).transpose(1, 2)
    tokens = torch.randn(2, 5, 6, generator=g)
    yield -1, tokens
    yield -1, tokens.transpose(0, 1).contiguous().transpose(0, 1)
    yield -1, torch.randn(2, 4, 6, 6, generator=g)[..., ::2, :]
    yield -1, torch.randn(6, generator=g)


@pytest.mark.parametrize("dim,x", list(_layouts()))
def test_scale_shift_values_and_gradients_for_any_memory_layout(dim, x):
    C = x.shape[dim]
    ss = ScaleShift(C, dim)
    ss.reset_parameters("normal", 0.5)
    gamma, beta = (ss.scale.detach().clone().requires_grad_(),
                   ss.shift.detach().clone().requires_grad_())
    shape = [1] * x.ndim
    shape[dim] = -1
    x_ref, x_ss = x.clone().requires_grad_(), x.detach().requires_grad_()
    ref = x_ref * gamma.view(shape) + beta.view(shape)
    out = ss(x_ss)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    ref.backward(grad)
    out.backward(grad)
    for a, b in ((x_ss.grad, x_ref.grad), (ss.scale.grad, gamma.grad), (ss.shift.grad, beta.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FOUR_FAMILIES)
def test_identity_init_reproduces_the_base_model(name):
    base, model = _build(name, init="identity")
    model.eval()
    x = _input()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    _, noisy = _build(name)  # the paper's init moves the output
    with torch.no_grad():
        assert not torch.allclose(noisy.eval()(x), base(x))


def test_normal_init_statistics():
    def stats(std):
        _, model = _build("vit", init_std=std)
        scales = torch.cat([m.scale.detach() for m in model.modules() if isinstance(m, ScaleShift)])
        shifts = torch.cat([m.shift.detach() for m in model.modules() if isinstance(m, ScaleShift)])
        return scales.mean(), scales.std(), shifts.mean(), shifts.std()

    for std in (0.02, 0.1):
        s_mean, s_std, b_mean, b_std = stats(std)
        assert abs(s_mean - 1) < 0.1 * std and abs(s_std - std) < 0.1 * std
        assert abs(b_mean) < 0.1 * std and abs(b_std - std) < 0.1 * std


def test_fused_attention_and_compile_fullgraph(monkeypatch):
    _, model = _build("vit")
    model.eval()
    x = _input()
    with torch.no_grad():
        ref = model(x)
    assert all(b.attn.fused_attn for b in model.blocks)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad():
        model(x)
    assert len(calls) == len(model.blocks)
    monkeypatch.undo()

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# merge / unmerge / merge_and_unload
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    """Each config's SSF model after a few optimiser steps, with its output on a fixed input."""
    out = {}
    for name in CONFIGS:
        base, model = _build(name)
        _train(model)
        x = _input()
        with torch.no_grad():
            ref = model(x)
            assert not torch.allclose(ref, base(x), atol=1e-3)  # SSF changed the function
        out[name] = (model, x, ref)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_unmerge_round_trip(trained, name):
    trained_model, x, ref = trained[name]
    model = copy.deepcopy(trained_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _ssf_wired(model)

    timm_peft.merge(model)
    assert _ssf_wired(model) == hooks - len(ssf_sites(model))  # no site runs SSF any more
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == set(before)  # the copies are not state
    timm_peft.merge(model)  # a second merge changes nothing
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)

    timm_peft.unmerge(model)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit-exact
    assert _ssf_wired(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    _train(model, steps=1)  # training resumes: the scales move again
    assert any(not torch.equal(model.state_dict()[k], before[k]) for k in before
               if k.endswith(".ssf.scale"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_and_unload_gives_a_plain_timm_model(trained, name):
    model, x, ref = trained[name]
    arch, kwargs = CONFIGS[name]
    merged = timm_peft.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, ScaleShift) for m in merged.modules())
    assert _ssf_wired(merged) == 0 and not hasattr(merged, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ref, rtol=0, atol=1e-5)

    plain = timm.create_model(arch, num_classes=NUM_CLASSES, **kwargs)  # no method suffix
    assert list(merged.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), ref, rtol=0, atol=1e-5)


def test_unload_discards_ssf_and_restores_the_base():
    base, model = _build("convnext")
    _train(model)
    plain = timm_peft.unload(model)
    assert not any(isinstance(m, ScaleShift) for m in plain.modules()) and _ssf_wired(plain) == 0
    assert list(plain.state_dict()) == list(base.state_dict())
    x = _input()
    with torch.no_grad():  # the trained head stays; the backbone is the base again
        assert torch.equal(plain.eval().forward_features(x), base.forward_features(x))


_PLAIN_TIMM_CHECK = """
import json, sys
import timm, torch
from safetensors.torch import load_file
assert "timm_peft" not in sys.modules
for case in json.load(open(sys.argv[1])):
    model = timm.create_model(case["arch"], num_classes=case["num_classes"], **case["kwargs"])
    model.load_state_dict(load_file(case["weights"]), strict=True)
    io = load_file(case["io"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(io["x"]), io["y"], rtol=0, atol=1e-5)
    print("ok", case["arch"])
"""


def test_merged_state_dict_loads_into_timm_without_timm_peft(trained, tmp_path):
    cases = []
    for name in FOUR_FAMILIES:
        model, x, ref = trained[name]
        arch, kwargs = CONFIGS[name]
        merged = timm_peft.merge_and_unload(copy.deepcopy(model))
        save_file({k: v.contiguous() for k, v in merged.state_dict().items()},
                  str(tmp_path / f"{name}.safetensors"))
        save_file({"x": x, "y": ref}, str(tmp_path / f"{name}_io.safetensors"))
        cases.append(dict(arch=arch, kwargs=kwargs, num_classes=NUM_CLASSES,
                          weights=str(tmp_path / f"{name}.safetensors"),
                          io=str(tmp_path / f"{name}_io.safetensors")))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "check.py").write_text(_PLAIN_TIMM_CHECK)
    res = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(tmp_path / "cases.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("ok") == len(FOUR_FAMILIES)


def test_unfoldable_sites_are_skipped_and_reported_and_merge_stays_exact():
    torch.manual_seed(0)
    kwargs = dict(TINY_VIT, norm_layer=functools.partial(nn.LayerNorm, elementwise_affine=False))
    with pytest.warns(UserWarning, match=r"SSF skips 5 operation\(s\).*blocks\.0\.norm1 "
                                         r"\(LayerNorm: it has no affine weight"):
        model = timm.create_model("vit_tiny_patch16_224.ssf", num_classes=NUM_CLASSES, **kwargs)
    skipped = ssf_sites(model, skipped=True)
    assert [n for n, _ in skipped] == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1",
                                       "blocks.1.norm2", "norm"]
    assert not set(n for n, _ in skipped) & set(ssf_sites(model))
    assert not any(hasattr(model.get_submodule(n), "ssf") for n, _ in skipped)
    _train(model, steps=1)
    x = _input()
    with torch.no_grad():
        ref = model.eval()(x)
    merged = timm_peft.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ref, rtol=0, atol=1e-5)


def test_nothing_to_follow_is_refused():
    arch, kwargs = CONFIGS["resnet"]
    with pytest.raises(ValueError, match=r"'ssf' needs operations SSF can follow and fold into"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timm.create_model(f"{arch}.ssf", num_classes=NUM_CLASSES, **kwargs,
                              norm_layer=functools.partial(nn.BatchNorm2d, affine=False))


def test_bias_free_operation_gets_a_bias_by_default():
    arch, kwargs = "vit_tiny_patch16_224", dict(TINY_VIT, qkv_bias=False)
    torch.manual_seed(0)
    model = timm.create_model(f"{arch}.ssf", num_classes=NUM_CLASSES, **kwargs)
    _train(model, steps=2)
    x = _input()
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.warns(UserWarning, match=r"added a bias to 2 .*blocks\.0\.attn\.qkv\.bias"):
        timm_peft.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)
    timm_peft.unmerge(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert model.blocks[0].attn.qkv.bias is None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = timm_peft.merge_and_unload(model)
    plain = timm.create_model(arch, num_classes=NUM_CLASSES, **dict(kwargs, qkv_bias=True))
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), ref, rtol=0, atol=1e-5)


def test_bias_free_scale_only_keeps_the_base_keys():
    arch, kwargs = "vit_tiny_patch16_224", dict(TINY_VIT, qkv_bias=False)
    torch.manual_seed(0)
    model = timm.create_model(f"{arch}.ssf", num_classes=NUM_CLASSES,
                              peft_cfg=dict(bias_free="scale_only"), **kwargs)
    qkv = model.blocks[0].attn.qkv
    assert qkv.ssf.shift is None and model.blocks[0].attn.proj.ssf.shift is not None
    headless = timm.create_model(f"{arch}.ssf", num_classes=0, **kwargs)
    expected = timm_peft.get_nb_trainable_parameters(headless)[0] - 2 * qkv.out_features
    assert timm_peft.get_nb_trainable_parameters(model)[0] == expected + 192 * 5 + 5
    _train(model, steps=2)
    x = _input()
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = timm_peft.merge_and_unload(model)
    plain = timm.create_model(arch, num_classes=NUM_CLASSES, **kwargs)
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# save / load, config, families
# ----------------------------------------------------------------------------------------------

def test_save_load_carries_only_scales_shifts_and_head(tmp_path):
    def build():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224.ssf", num_classes=NUM_CLASSES, **TINY_VIT)

    model = build()
    _train(model, steps=2)
    x = _input()
    with torch.no_grad():
        ref = model(x)
    out = timm_peft.save_pretrained(model, tmp_path / "adapter")
    saved = load_file(str(out / "adapter_model.safetensors"))
    sites = ssf_sites(model)
    assert set(saved) == ({f"{s}.ssf.{p}" for s in sites for p in ("scale", "shift")}
                          | {"head.weight", "head.bias"})
    assert sum(t.numel() for t in saved.values()) == timm_peft.get_nb_trainable_parameters(model)[0]

    fresh = build()
    timm_peft.load_adapter(fresh, out)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), ref)

    timm_peft.merge(model)
    with pytest.raises(ValueError, match=r"merged SSF model.*unmerge"):
        timm_peft.save_pretrained(model, tmp_path / "merged")
    with pytest.raises(ValueError, match=r"merged SSF model.*unmerge"):
        timm_peft.load_adapter(model, out)
    timm_peft.unmerge(model)
    timm_peft.save_pretrained(model, tmp_path / "again")


def test_config_validation():
    with pytest.raises(ValueError, match=r"init must be one of \['normal', 'identity'\]"):
        SSFConfig(init="uniform")
    with pytest.raises(ValueError, match=r"init_std must be >= 0"):
        SSFConfig(init_std=-0.1)
    with pytest.raises(ValueError, match=r"bias_free must be one of"):
        SSFConfig(bias_free="drop")
    with pytest.raises(ValueError, match="unknown SSFConfig field"):
        timm.create_model("vit_tiny_patch16_224.ssf", peft_cfg=dict(scale_init=1.0), **TINY_VIT)


def test_generic_sites_by_type_on_other_families():
    """Beyond the four families the sites come from module types: every Linear, Conv and affine
    norm (timm's BatchNormAct2d included) but the classifier; merging is exact."""
    from timm.layers import BatchNormAct2d
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050.ssf", num_classes=NUM_CLASSES)
    plain = timm.create_model("mobilenetv3_small_050", num_classes=NUM_CLASSES)
    sites = ssf_sites(model)
    expected = [n for n, m in plain.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) and n != "classifier"]
    assert sites == expected
    assert any(isinstance(model.get_submodule(s), BatchNormAct2d) for s in sites)
    _train(model, steps=1)
    x = _input()
    with torch.no_grad():
        ref = model.eval()(x)
    merged = timm_peft.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ref, rtol=1e-4, atol=1e-4)
    assert set(merged.state_dict()) <= set(plain.state_dict()) | {
        f"{s}.bias" for s in sites}
    with pytest.raises(ValueError, match="'ssf' needs operations SSF can follow"):
        timm_peft.apply_method(nn.Sequential(nn.ReLU()), "ssf")


@pytest.mark.parametrize("init_values", [None, 0.1])
def test_training_linear_sites_save_only_their_output(init_values):
    """In training, SSF after a frozen Linear is one matmul (ops.linear_scale_shift) that saves
    its output, which attention or GELU keep anyway: neither the Linear's input nor its output
    before the scale-shift is saved (issue 16). The branch ends (proj, fc2) do the block's
    residual add and save the sum and the block input, which the next norm and the branch's norm
    save anyway: they keep no tensor of their own. Under no_grad the same values."""
    from timm_peft.layers.scale_shift import ScaleShiftLinear
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224.ssf", img_size=32, depth=2, num_classes=5,
                              init_values=init_values)  # with a layer scale (DeiT-III, DINOv2)
    sites = {n: m for n, m in model.named_modules() if is_swapped(m, ScaleShiftLinear)}
    assert set(sites) == {f"blocks.{i}.{s}" for i in range(2)
                          for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    norms = {n: m for n, m in model.named_modules() if n.endswith(("norm1", "norm2"))
             or n == "norm"}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current, saved, io = [None], {}, {}
    for name, m in {**sites, **norms}.items():
        m.register_forward_pre_hook(lambda mod, args, n=name: current.__setitem__(0, n))
        m.register_forward_hook(lambda mod, args, out, n=name: (
            io.__setitem__(n, (args[0], out)), current.__setitem__(0, None))[-1])

    def pack(t):
        if current[0] is not None and t.untyped_storage().data_ptr() not in params \
                and t.ndim > 1:  # activations, not γ
            saved.setdefault(current[0], []).append(t.untyped_storage().data_ptr())
        return t
    x = torch.randn(2, 3, 32, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    by_norms = {p for n in norms for p in saved[n]}
    for name, (inp, y) in io.items():
        if name in norms:
            continue
        ptr = y.untyped_storage().data_ptr()
        assert inp.untyped_storage().data_ptr() not in saved[name]
        if name.endswith(("qkv", "fc1")):
            assert saved[name] == [ptr], name
        else:  # the sum and the block input, both kept by norms
            assert ptr in saved[name] and len(saved[name]) == 2, name
            assert set(saved[name]) <= by_norms, name
    out.sum().backward()
    with torch.no_grad():
        assert torch.allclose(model(x), out, rtol=1e-5, atol=1e-5)


def _assert_same_ssf_grads(model, ref, atol=1e-5):
    """Every trainable gradient of ``model`` close to ``ref``'s, including the scale-shifts of
    the branch ends (proj, fc2) whose backward the fused residual changes."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(".proj.ssf." in n for n in grads) and any(".fc2.ssf." in n for n in grads)
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=atol), n


@pytest.mark.parametrize("init_values", [None, 0.1])
def test_residual_into_branch_matches_timm_block_forward_and_gradients(init_values):
    """The blocks whose residual add SSF moves into proj/fc2 compute what timm's Block forward
    computes with the same SSF (the mixin taken out): logits bit-equal (with a frozen layer
    scale λ, folded into the Linear: to rounding), every gradient close. With a layer scale that
    trains, or under no_grad, timm's forward runs."""
    from timm.layers import LayerScale

    from timm_peft.layers.scale_shift import ResidualIntoBranch
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224.ssf", img_size=32, depth=2, num_classes=5,
                              init_values=init_values)
    if init_values is not None:  # per-channel λ of mixed size and sign, as after pretraining
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("ls1.gamma", "ls2.gamma")):
                    p.copy_(torch.randn_like(p).sign() * torch.logspace(-3, 0, p.numel()))
    assert all(is_swapped(b, ResidualIntoBranch) for b in model.blocks)
    for b in model.blocks:
        scales = b._layer_scales()
        assert scales == [None, None] if init_values is None else (
            scales[0] is b.ls1.gamma and scales[1] is b.ls2.gamma)
    ref = copy.deepcopy(model)
    for b in ref.blocks:
        restore_class(b, ResidualIntoBranch)
    x, g = torch.randn(3, 3, 32, 32), torch.randn(3, 5)
    out, out_ref = model(x), ref(x)
    assert torch.equal(out, out_ref) if init_values is None else torch.allclose(
        out, out_ref, rtol=1e-5, atol=1e-5)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    _assert_same_ssf_grads(model, ref, atol=1e-6)
    for m in (model, ref):  # a layer scale that trains: timm's forward runs
        m.blocks[0].ls1 = LayerScale(model.embed_dim, init_values=0.5)
    assert model.blocks[0]._layer_scales() is None and model.blocks[1]._layer_scales()
    assert torch.allclose(model(x), ref(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert model.blocks[1]._layer_scales() is None


@pytest.mark.parametrize("placement", ["before_pool", "after_fc_norm"])
def test_average_pooled_vit_last_site_against_the_formulas(placement):
    """global_pool="avg": timm's `norm` is Identity and `fc_norm` normalises the pooled tokens.
    The default follows the authors: fc_norm(γ ⊙ mean(x) + β) (their SSF after the Identity norm,
    on the tokens); the option keeps γ ⊙ fc_norm(mean(x)) + β. Hand-written heads of both."""
    base, model = _build("vit_qknorm_avg", pooled_norm_site=placement)
    assert (timm_peft.apply_method(copy.deepcopy(base), "ssf", None).peft_config
            .pooled_norm_site == "before_pool")  # the default
    _train(model)
    model.eval()
    x = _input()
    tokens = []
    handle = model.blocks[-1].register_forward_hook(lambda mod, inp, out: tokens.append(out))
    with torch.no_grad():
        out = model(x)
    handle.remove()
    pooled = tokens[0][:, model.num_prefix_tokens:].mean(1)
    fc = base.fc_norm  # the plain LayerNorm with the frozen base weights
    if placement == "before_pool":
        ss = model.norm.ssf
        assert "fc_norm" not in ssf_sites(model) and ssf_sites(model)[-1] == "norm"
        head_in = F.layer_norm(pooled * ss.scale + ss.shift, fc.normalized_shape, fc.weight,
                               fc.bias, fc.eps)
    else:
        ss = model.fc_norm.ssf
        assert "norm" not in ssf_sites(model) and ssf_sites(model)[-1] == "fc_norm"
        head_in = F.layer_norm(pooled, fc.normalized_shape, fc.weight, fc.bias, fc.eps) \
            * ss.scale + ss.shift
    with torch.no_grad():
        ref = model.head(head_in)  # the head trains with SSF; it is no site
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if placement == "before_pool":  # exact merge is impossible there: refused, nothing changed
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="before average pooling.*pooled_norm_site"):
            timm_peft.merge(model)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    else:
        merged = timm_peft.merge_and_unload(copy.deepcopy(model))
        with torch.no_grad():
            torch.testing.assert_close(merged(x), out, rtol=0, atol=1e-5)


class _SqueezeExcite(nn.Module):
    """timm's SE block: a conv whose output an in-place ReLU overwrites."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, c // 2, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(c // 2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class _Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se = _SqueezeExcite(8)
        self.pw = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.pw(self.se(F.gelu(self.conv(x))))).mean((2, 3))


def test_conv_sites_save_their_output_even_when_an_inplace_op_overwrites_it():
    """Conv sites save their output in training (ops.scale_shift); the SE block's in-place ReLU
    overwrites one of them, which then keeps a copy first (ops.SavedOutput). The gradients of
    every γ, β match plain autograd of ``conv(x) * γ + β``."""
    from timm_peft.ops import SavedOutput
    torch.manual_seed(0)
    model = timm_peft.apply_method(_Body(), "ssf")
    sites = {n: m.ssf for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    kept = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, a, out, n=n: kept.__setitem__(n, out))
    with torch.no_grad():
        for s in sites.values():
            s.scale.add_(0.2 * torch.randn_like(s.scale))
            s.shift.add_(0.2 * torch.randn_like(s.shift))
    params = [p for s in sites.values() for p in (s.scale, s.shift)]
    x = torch.randn(2, 3, 6, 6)
    probe = torch.randn(2, 8)
    got = torch.autograd.grad((model(x) * probe).sum(), params)
    assert all(isinstance(o, SavedOutput) for o in kept.values())
    assert {n: o._peft_kept.value is not None for n, o in kept.items()} == {
        "conv": False, "se.conv_reduce": True, "se.conv_expand": False, "pw": False}
    for s in sites.values():  # the formula, with autograd's own backward
        s.forward = lambda t, s=s: t * s.scale.view(-1, 1, 1) + s.shift.view(-1, 1, 1)
    want = torch.autograd.grad((model(x) * probe).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_training_off_the_cpu_reductions_give_the_same_gradients(monkeypatch):
    """Off the CPU, γ's and β's gradients come from plain reductions (CUDA's batch-norm backward
    kernel needs more arguments): forced here on a whole model, the same gradients as the CPU
    path, and a training step runs on the meta device (no CPU-only assumption left)."""
    import timm_peft.ops as ops
    torch.manual_seed(0)
    a = timm.create_model("vit_tiny_patch16_224.ssf", img_size=32, depth=2, num_classes=5)
    b = copy.deepcopy(a)
    x = torch.randn(2, 3, 32, 32)
    a(x).sum().backward()
    cpu_path = ops._affine_grads
    monkeypatch.setattr(ops, "_affine_grads", lambda *args, **kw: cpu_path(*args, fused=False))
    b(x).sum().backward()
    _assert_same_ssf_grads(a, b)
    monkeypatch.setattr(ops, "_affine_grads", cpu_path)
    meta = b.to("meta")
    meta(torch.randn(2, 3, 32, 32, device="meta")).sum().backward()
    assert meta.blocks[0].attn.proj.ssf.scale.grad.device.type == "meta"


def _saved_bytes(model, x):
    """Bytes of the distinct storages autograd saves in one forward, and the output."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(saved.values()), out


@pytest.mark.parametrize("arch,kwargs", [
    ("eva02_tiny_patch14_224", dict(patch_size=8)),  # SwiGLU, rotary, avg pool
    ("beitv2_base_patch16_224", dict(patch_size=8, init_values=0.1)),  # gamma_1 tensors
    ("cait_xxs24_224", dict(patch_size=8, depth_token_only=1)),  # LayerScaleBlock, one drop-path
    ("deit3_small_patch16_224", dict(patch_size=8)),  # timm's LayerScale modules
])
def test_residual_into_branch_on_each_family(arch, kwargs):
    """Every family that describes its pre-norm blocks (Family.residual_branches): the adds move
    into proj/fc2, logits and gradients equal timm's block forward (the mixin taken out), and
    one forward saves two activations fewer per block."""
    from timm_peft.layers.scale_shift import ResidualIntoBranch
    torch.manual_seed(0)
    model = timm.create_model(f"{arch}.ssf", img_size=32, depth=2, embed_dim=32, num_heads=2,
                              num_classes=3, **kwargs)
    with torch.no_grad():  # layer scales of mixed size and sign, as after pretraining
        for n, p in model.named_parameters():
            if n.endswith(("gamma_1", "gamma_2", "ls1.gamma", "ls2.gamma")):
                p.copy_(torch.randn_like(p).sign() * torch.logspace(-2, 0, p.numel()))
    blocks = [b for b in model.modules() if is_swapped(b, ResidualIntoBranch)]
    assert len(blocks) == 2 and all(b._layer_scales() is not None for b in blocks)
    ref = copy.deepcopy(model)
    restore_classes(ref, ResidualIntoBranch)
    x, g = torch.randn(2, 3, 32, 32), torch.randn(2, 3)
    shapes = []
    hook = ref.blocks[0].register_forward_pre_hook(lambda m, a: shapes.append(a[0].shape))
    (fused_bytes, out), (ref_bytes, out_ref) = _saved_bytes(model, x), _saved_bytes(ref, x)
    hook.remove()
    assert torch.allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    act = shapes[0].numel() * 4  # one (B, N, C) float32 activation of the blocks
    # proj's and fc2's outputs of both blocks, less the last block's sum where no norm saves it
    assert fused_bytes <= ref_bytes - 3 * act, (fused_bytes, ref_bytes, act)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    _assert_same_ssf_grads(model, ref)
    assert type(timm_peft.unload(model).blocks[0]) is original_class(ref.blocks[0])


#: (arch, kwargs, input size, the blocks whose sum a norm after them saves anyway, the blocks
#: whose input the fused path keeps because nothing else does): ConvNeXt's sums are saved by the
#: downsampling norms after each stage's last block (a block's depthwise conv, fused with its
#: SSF, saves its output, not its input), its last block is pooled before the head's norm, and
#: the first block keeps the stem's output; Swin's patch merging copies the tokens (a
#: permutation) before its norm, so only blocks followed by a block or the final norm
BRANCH_FAMILIES = {
    "convnext": ("convnext_atto", dict(dims=(8, 16, 16, 16), depths=(2, 1, 1, 1),
                                       conv_mlp=False), 64, (1, 2, 3), (0,)),
    "convnext, no layer scale": ("convnext_atto", dict(dims=(8, 16, 16, 16), depths=(2, 1, 1, 1),
                                                       conv_mlp=False, ls_init_value=None),
                                 64, (1, 2, 3), (0,)),
    "convnextv2 (GRN MLP)": ("convnextv2_atto", dict(dims=(8, 16, 16, 16), depths=(2, 1, 1, 1),
                                                    conv_mlp=False), 64, (1, 2, 3), (0,)),
    "swin (attention branch as timm's)": (
        "swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=16, depths=(2, 2, 1),
                                             num_heads=(2, 2, 4), window_size=4,
                                             drop_path_rate=0.0), 32, (0, 2, 4), ()),
}


@pytest.mark.parametrize("family", list(BRANCH_FAMILIES))
def test_residual_into_fc2_matches_timm_block_forward(family):
    """ConvNeXt's channels-last MLP and Swin's MLP end in fc2, whose add into the residual moves
    into fc2 (ConvNeXt: ResidualBranch with pre, channels_last, shortcut; Swin: its windowed
    attention branch kept as timm computes it, last=None): logits and every gradient equal
    timm's block forward with the same SSF, and one forward saves each block's fc2 output
    fewer where a norm saves the sum anyway (BRANCH_FAMILIES says which). With
    conv_mlp (ConvNeXt-atto's default) fc2 is a 1x1 conv and timm's forward runs."""
    from timm_peft.layers.scale_shift import ResidualIntoBranch
    arch, kwargs, size, saved_after, kept_inputs = BRANCH_FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(f"{arch}.ssf", num_classes=3, **kwargs)
    with torch.no_grad():  # layer scales of mixed size and sign, as after pretraining
        for n, p in model.named_parameters():
            if n.endswith(".gamma") and p.ndim == 1:
                p.copy_(torch.randn_like(p).sign() * torch.logspace(-2, 0, p.numel()))
    blocks = [b for b in model.modules() if is_swapped(b, ResidualIntoBranch)]
    assert len(blocks) == 5 and all(b._layer_scales() is not None for b in blocks)
    ref = copy.deepcopy(model)
    restore_classes(ref, ResidualIntoBranch)
    fc2_bytes = []
    for b in ref.modules():
        if original_class(b).__name__ in ("ConvNeXtBlock", "SwinTransformerBlock"):
            b.mlp.fc2.register_forward_hook(
                lambda m, a, out: fc2_bytes.append(out.untyped_storage().nbytes()))
    x, g = torch.randn(2, 3, size, size), torch.randn(2, 3)
    (fused_bytes, out), (ref_bytes, out_ref) = _saved_bytes(model, x), _saved_bytes(ref, x)
    assert len(fc2_bytes) == 5
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    # (a block's input is as large as its fc2 output: the blocks keep their width)
    assert fused_bytes <= ref_bytes - sum(fc2_bytes[i] for i in saved_after) + sum(
        fc2_bytes[i] for i in kept_inputs), (fused_bytes, ref_bytes, fc2_bytes)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert any(n.endswith("fc2.ssf.scale") for n, p in model.named_parameters())


@pytest.mark.parametrize("arch,kwargs,size", [
    ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=16, depths=(2, 2, 1),
                                          num_heads=(2, 2, 4), window_size=4), 32),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3, init_values=0.1), 32),
    ("convnext_atto", dict(dims=(8, 16, 16, 16), depths=(2, 1, 1, 1), conv_mlp=False,
                           ls_init_value=0.1), 64),
])
def test_residual_into_branch_with_drop_path_matches_timm(arch, kwargs, size):
    """Training with stochastic depth (Swin's default drop_path_rate=0.1; here 0.5 so samples
    drop): the adds still move into fc2/proj, the Linear applies timm's per-sample mask drawn at
    the point of the random stream where timm's forward draws it, so logits under one seed
    equal timm's block forward, every gradient is close, and each block's fc2 output is not
    saved."""
    from timm_peft.layers.scale_shift import ResidualIntoBranch
    torch.manual_seed(0)
    model = timm.create_model(f"{arch}.ssf", num_classes=3, drop_path_rate=0.5, **kwargs)
    blocks = [b for b in model.modules() if is_swapped(b, ResidualIntoBranch)]
    assert blocks and all(b._layer_scales() is not None for b in blocks)
    ref = copy.deepcopy(model)
    restore_classes(ref, ResidualIntoBranch)
    x, g = torch.randn(6, 3, size, size), torch.randn(6, 3)
    torch.manual_seed(1)
    fused_bytes, out = _saved_bytes(model, x)
    torch.manual_seed(1)
    ref_bytes, out_ref = _saved_bytes(ref, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert fused_bytes < ref_bytes, (fused_bytes, ref_bytes)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)
    model.eval()  # drop-path off: the same fused blocks, no mask
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


def test_swin_attention_ssf_moves_to_the_add_past_the_window_reversal():
    """Swin's proj output reaches the add only rearranged (windows reversed, rolled, cropped),
    which a per-channel γ ⊙ · + β commutes with: proj's SSF runs at the add (ResidualBranch
    site), so no block keeps proj's output; logits and gradients equal timm's block forward
    (padded windows and shifted windows included). With proj's dropout active, or another
    method on proj, the branch keeps timm's add."""
    from timm_peft.layers.scale_shift import ResidualIntoBranch, scale_shift_deferred
    torch.manual_seed(0)
    kwargs = dict(img_size=40, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4,
                  num_classes=3, drop_path_rate=0.3)  # 10x10 tokens: windows padded to 12
    model = timm.create_model("swin_tiny_patch4_window7_224.ssf", **kwargs)
    ref = copy.deepcopy(model)
    restore_classes(ref, ResidualIntoBranch)
    proj_bytes = []
    for b in ref.modules():
        if original_class(b).__name__ == "SwinTransformerBlock":
            b.attn.proj.register_forward_hook(
                lambda m, a, out: proj_bytes.append(out.untyped_storage().nbytes()))
    x, g = torch.randn(4, 3, 40, 40), torch.randn(4, 3)
    torch.manual_seed(1)
    fused_bytes, out = _saved_bytes(model, x)
    torch.manual_seed(1)
    ref_bytes, out_ref = _saved_bytes(ref, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert len(proj_bytes) == 4 and fused_bytes <= ref_bytes - sum(proj_bytes), (
        fused_bytes, ref_bytes, proj_bytes)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)
    assert model.layers[0].blocks[1].shift_size  # a shifted-window block was covered
    block = model.layers[0].blocks[0]
    calls = []
    add_into = block.attn.proj.ssf.add_into
    block.attn.proj.ssf.add_into = lambda *a: (calls.append(1), add_into(*a))[1]
    model(x)
    assert len(calls) == 1
    for m in (model, ref):  # dropout between proj and the add: SSF stays at proj
        m.layers[0].blocks[0].attn.proj_drop.p = 0.5
    torch.manual_seed(2)
    out = model(x)
    torch.manual_seed(2)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="was not called"):
        with scale_shift_deferred(block.attn.proj):
            pass


def test_tiny_layer_scales_keep_timm_forward_and_exact_gradients():
    """With timm's layer-scale init (1e-6, before pretraining) ``out − r`` cannot give back
    ``λ ⊙ y`` to float32 precision, so the branch keeps timm's forward (the Linear saves its own
    output): gradients equal plain autograd's, relative to each gradient's size."""
    from benchmarks.ssf_gradients import compare
    from timm_peft.layers.scale_shift import MIN_FUSED_LAYER_SCALE, ResidualIntoBranch
    kwargs = dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), conv_mlp=False)
    model = timm.create_model("convnext_atto.ssf", num_classes=3, **kwargs)
    blocks = [b for b in model.modules() if is_swapped(b, ResidualIntoBranch)]
    assert blocks and all(b.gamma.abs().max() < MIN_FUSED_LAYER_SCALE for b in blocks)
    assert all(b._layer_scales() is None for b in blocks)
    with torch.no_grad():
        blocks[0].gamma.fill_(0.5)  # a new version of λ is checked again
    assert blocks[0]._layer_scales() == [blocks[0].gamma]
    res = compare("convnext_atto", input_size=64, **kwargs)
    assert res["grad_err"] < 1e-4 and not res["missing"], res


def test_conv_sites_fold_into_the_convolution_where_padding_is_static():
    """An nn.Conv2d site runs as one convolution with γ, β folded in (ops.conv_scale_shift);
    timm's Conv2dSame pads by the input's size in forward, so it keeps conv-then-map."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm_peft.layers.scale_shift import ScaleShiftConv, ScaleShiftOutput
    kw = dict(num_classes=3)
    convs = [m for m in timm.create_model("efficientnet_b0.ssf", **kw).modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(is_swapped(m, ScaleShiftConv) for m in convs)
    same = [m for m in timm.create_model("tf_efficientnet_b0.ssf", **kw).modules()
            if isinstance(m, Conv2dSame)]
    assert same and all(is_swapped(m, ScaleShiftOutput) and not is_swapped(m, ScaleShiftConv)
                        for m in same)
