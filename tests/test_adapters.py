"""Many named adapters on one model: switching, disabling, saving, loading and routing.

Every result is compared with an independent reference: a separately built single-adapter model
given the same tensors, or the plain timm model with the same base weights.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import timm
import torch

import timm_peft

VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
VIT_ARCH = "vit_tiny_patch16_224"
CNN_ARCH = "resnet10t"
CNN = dict(channels=(8, 16, 16, 16), stem_width=8)
TOL = dict(atol=2e-5, rtol=1e-4)

# method -> (peft_cfg, routing arch kwargs) on ViT and on the ConvNet
VIT_METHODS = {
    "ssf": None, "vpt": dict(num_prompts=3), "vpt_shallow": dict(num_prompts=3),
    "e2vpt": dict(num_prompts=3, num_kv_prompts=2), "lion": None, "bias": None, "linear": None,
    "partial": dict(num_blocks=1), "adapter": dict(placement="houlsby", bottleneck=4),
    "adaptformer": dict(bottleneck=4), "lora": dict(r=2), "mlp3": None,
    "sidetune": dict(side_channels=(8, 16), side_pool=2),
}
CNN_METHODS = {"ssf": None, "vpt": dict(img_size=32), "lion": None, "bias": None, "linear": None,
               "partial": dict(num_blocks=1), "mlp3": None,
               "sidetune": dict(side_channels=(8, 16), side_pool=2)}


def _build(arch: str, method: str, cfg, kwargs, num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model(f"{arch}.{method}", num_classes=num_classes, peft_cfg=cfg,
                             **kwargs).eval()


def _perturb(model, seed: int) -> dict[str, torch.Tensor]:
    """Give the active adapter random values (so adapters differ and nothing is an identity)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    active = timm_peft.active_adapter(model)
    adapters = timm_peft.get_adapters(model)
    with torch.no_grad():
        for member in active if isinstance(active, tuple) else (active,):
            for name, t in adapters[member].state.items():
                if t.is_floating_point():
                    t.add_(0.05 * torch.randn(t.shape, generator=g))
                out[name] = t.detach().clone()
    return out


def _reference(arch, method, cfg, kwargs, num_classes, base_state, adapter_state):
    """A fresh single-adapter model with the same base weights and the adapter's tensors."""
    ref = _build(arch, method, cfg, kwargs, num_classes, seed=123)
    ref_state = {**ref.state_dict(), **{k: v for k, v in base_state.items() if k in ref.state_dict()
                                        and v.shape == ref.state_dict()[k].shape}}
    ref.load_state_dict(ref_state)
    with torch.no_grad():
        slots = timm_peft.get_adapters(ref)["default"].state
        for name, t in adapter_state.items():
            slots[name].copy_(t)
    return ref


def _plain_state(model) -> dict[str, torch.Tensor]:
    with timm_peft.disable_adapter(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,kwargs,methods", [
    (VIT_ARCH, VIT, VIT_METHODS), (CNN_ARCH, CNN, CNN_METHODS),
    # SSF's routed Linear folds b, β and a layer scale λ into per-sample vectors
    ("deit3_small_patch16_224", dict(VIT, init_values=0.5), {"ssf": None}),
    ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), ls_init_value=0.5),
     {"ssf": None})])
def test_route_equals_each_adapter_alone(arch, kwargs, methods):
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for method, cfg in methods.items():
        model = _build(arch, method, cfg, kwargs, num_classes=3)
        a = _perturb(model, 1)
        timm_peft.add_adapter(model, "b", cfg, method=method, num_classes=5)
        timm_peft.set_adapter(model, "b")
        b = _perturb(model, 2)
        timm_peft.set_adapter(model, "default")
        base = _plain_state(model)
        names = ["b", "default", "b", "b", "default"]
        with timm_peft.route(model, names) as r:
            with torch.no_grad():
                out = model(x)
            trained = model(x)  # with grad: the training-time paths (SSF's fused residual adds)
        assert out.shape == (5, 5) and r.num_classes.tolist() == [5, 3, 5, 5, 3]
        torch.testing.assert_close(trained.detach(), out, **TOL, msg=method)
        with torch.no_grad():
            ref_a = _reference(arch, method, cfg, kwargs, 3, base, a)(x)
            ref_b = _reference(arch, method, cfg, kwargs, 5, base, b)(x)
        for i, n in enumerate(names):
            ref = ref_b[i] if n == "b" else ref_a[i]
            torch.testing.assert_close(out[i, :len(ref)], ref, **TOL, msg=f"{method} sample {i}")
            assert torch.isinf(out[i, len(ref):]).all()
        # the model is left as it was: the default adapter active, its own forward
        torch.testing.assert_close(model(x), ref_a, **TOL)


def test_switching_equals_separate_models_and_never_touches_the_base():
    model = _build(VIT_ARCH, "ssf", None, VIT)
    a = _perturb(model, 1)
    base_ptrs = {n: t.data_ptr() for n, t in model.state_dict().items()
                 if n not in model.peft_adapter_keys}
    timm_peft.add_adapter(model, "vpt", dict(num_prompts=2, dropout=0.5), method="vpt",
                          num_classes=4)
    timm_peft.add_adapter(model, "ssf2", num_classes=3)
    timm_peft.add_adapter(model, "bias", method="bias", num_classes=2)
    x = torch.randn(2, 3, 32, 32)
    base = _plain_state(model)
    states = {"default": ("ssf", None, 3, a)}
    for name, (method, cfg, n) in {"vpt": ("vpt", dict(num_prompts=2, dropout=0.5), 4),
                                   "ssf2": ("ssf", None, 3),
                                   "bias": ("bias", None, 2)}.items():
        timm_peft.set_adapter(model, name)
        assert model.peft_method == method and model.num_classes == n
        states[name] = (method, cfg, n, _perturb(model, hash(name) % 100))
    for name in ["ssf2", "default", "bias", "vpt", "default", "ssf2"]:
        timm_peft.set_adapter(model, name)
        method, cfg, n, tensors = states[name]
        assert not any(m.training for m in model.modules())  # new modules follow eval mode
        with torch.no_grad():
            expected = _reference(VIT_ARCH, method, cfg, VIT, n, base, tensors)(x)
            torch.testing.assert_close(model(x), expected, **TOL)
        # only the active adapter trains, and the base weights are the very same tensors
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and trainable <= set(model.peft_adapter_keys)
        for n, t in model.state_dict().items():
            if n in base_ptrs and n not in model.peft_adapter_keys:
                assert t.data_ptr() == base_ptrs[n], n


def test_switching_between_adapters_of_one_structure_reuses_the_modules():
    model = _build(VIT_ARCH, "vpt", dict(num_prompts=2), VIT)
    timm_peft.add_adapter(model, "b", dict(num_prompts=2))
    blocks = [id(m) for m in model.modules()]
    prompts_a = model.get_parameter(next(k for k in model.peft_adapter_keys if "vpt" in k))
    timm_peft.set_adapter(model, "b")
    prompts_b = model.get_parameter(next(k for k in model.peft_adapter_keys if "vpt" in k))
    assert [id(m) for m in model.modules()] == blocks  # no surgery: only tensors re-pointed
    assert prompts_b is not prompts_a and not torch.equal(prompts_a, prompts_b)


def test_disable_adapter_is_the_plain_model_and_unload_gives_the_base_back():
    torch.manual_seed(0)
    plain = timm.create_model(VIT_ARCH, num_classes=3, **VIT).eval()
    model = timm_peft.apply_method(copy.deepcopy(plain), "bias")
    model_state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # "training" changes the adapter's biases and head
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
    x = torch.randn(2, 3, 32, 32)
    trained = model(x)
    with timm_peft.disable_adapter(model):
        assert model.peft_config is None and type(model) is type(plain)
        torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)
    torch.testing.assert_close(model(x), trained, atol=0, rtol=0)
    unloaded = timm_peft.unload(model)
    for k, v in unloaded.state_dict().items():
        assert torch.equal(v, model_state_before[k]), k
    assert not hasattr(unloaded, "peft_adapters")


def test_delete_and_errors():
    model = _build(CNN_ARCH, "bias", None, CNN)
    timm_peft.add_adapter(model, "b", num_classes=4)
    with pytest.raises(ValueError, match="already has an adapter 'b'"):
        timm_peft.add_adapter(model, "b")
    with pytest.raises(ValueError, match="identifier"):
        timm_peft.add_adapter(model, "a/b")
    with pytest.raises(KeyError, match="no adapter 'c'"):
        timm_peft.set_adapter(model, "c")
    with pytest.raises(ValueError, match="trains the base itself"):
        timm_peft.add_adapter(model, "f", method="full")
    timm_peft.delete_adapter(model, "default")
    assert timm_peft.active_adapter(model) == "b" and model.num_classes == 4
    with pytest.raises(ValueError, match="only adapter"):
        timm_peft.delete_adapter(model, "b")
    with pytest.raises(ValueError, match="carries no PEFT method"):
        timm_peft.add_adapter(timm.create_model(CNN_ARCH), "x")


def test_route_refuses_what_it_cannot_do():
    model = _build(VIT_ARCH, "ssf", None, VIT)
    timm_peft.add_adapter(model, "v", method="vpt")
    timm_peft.add_adapter(model, "s")
    with pytest.raises(ValueError, match="share one method and config"):
        with timm_peft.route(model, ["default", "v"]):
            pass
    assert timm_peft.active_adapter(model) == "default"
    with pytest.raises(KeyError, match="no adapter"):
        with timm_peft.route(model, ["default", "nope"]):
            pass
    with timm_peft.route(model, ["default", "s"]):
        with pytest.raises(ValueError, match="2 adapter names"):
            model(torch.randn(3, 3, 32, 32))
        with pytest.raises(RuntimeError, match="not routed per sample"):
            model.forward_features(torch.randn(2, 3, 32, 32))
    assert type(model) is type(_build(VIT_ARCH, "ssf", None, VIT))


def test_route_trains_every_routed_adapter():
    model = _build(VIT_ARCH, "ssf", None, VIT).train()
    timm_peft.add_adapter(model, "b", num_classes=3)
    x = torch.randn(4, 3, 32, 32)
    with timm_peft.route(model, ["default", "b", "b", "default"]):
        model(x).logsumexp(-1).sum().backward()
    for name, adapter in timm_peft.get_adapters(model).items():
        grads = [t.grad for t in adapter.state.values() if t.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_save_all_and_load_named_reproduce_each_adapter(tmp_path):
    model = _build(VIT_ARCH, "ssf", None, VIT)
    _perturb(model, 1)
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": ("a", "b", "c"),
                            "mean": (0.1, 0.2, 0.3)}
    timm_peft.add_adapter(model, "pets", dict(num_prompts=2), method="vpt", num_classes=2)
    timm_peft.set_adapter(model, "pets")
    _perturb(model, 2)
    timm_peft.set_adapter(model, "default")
    x = torch.randn(2, 3, 32, 32)
    expected = {}
    for name in ("default", "pets"):
        with timm_peft.using_adapter(model, name):
            expected[name] = model(x).detach()
    out = timm_peft.save_pretrained(model, tmp_path / "zoo")
    assert sorted(p.name for p in out.iterdir()) == ["default", "pets"]
    assert timm_peft.read_adapter_config(out / "pets")["peft_type"] == "vpt"

    torch.manual_seed(0)
    fresh = timm.create_model(f"{VIT_ARCH}.bias", num_classes=7, **VIT).eval()
    fresh.load_state_dict({**fresh.state_dict(), **{k: v for k, v in _plain_state(model).items()
                                                    if k in fresh.state_dict() and
                                                    v.shape == fresh.state_dict()[k].shape}})
    for name in ("default", "pets"):
        timm_peft.load_adapter(fresh, out / name, adapter_name=f"loaded_{name}", check_base=False)
    assert timm_peft.active_adapter(fresh) == "default" and fresh.peft_method == "bias"
    for name in ("default", "pets"):
        timm_peft.set_adapter(fresh, f"loaded_{name}")
        torch.testing.assert_close(fresh(x), expected[name], **TOL)
    timm_peft.set_adapter(fresh, "loaded_default")
    assert fresh.pretrained_cfg["label_names"] == ("a", "b", "c")
    assert timm.data.resolve_data_config(model=fresh)["mean"] == (0.1, 0.2, 0.3)
    timm_peft.set_adapter(fresh, "loaded_pets")
    assert "label_names" not in fresh.pretrained_cfg and fresh.num_classes == 2
    with pytest.raises(ValueError, match="already has an adapter"):
        timm_peft.load_adapter(fresh, out / "pets", adapter_name="loaded_pets", check_base=False)


def test_load_named_refuses_another_build(tmp_path):
    other = timm.create_model(f"{VIT_ARCH}.ssf", num_classes=3, **{**VIT, "depth": 1})
    d = timm_peft.save_pretrained(other, tmp_path / "a")
    model = _build(VIT_ARCH, "ssf", None, VIT)
    with pytest.raises(timm_peft.AdapterError, match="model_args"):
        timm_peft.load_adapter(model, d, adapter_name="other", check_base=False)
    assert sorted(timm_peft.get_adapters(model)) == ["default"]


def test_many_adapters_pickle_and_follow_the_model():
    model = _build(VIT_ARCH, "ssf", None, VIT)
    timm_peft.add_adapter(model, "b", method="vpt", num_classes=4)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 32, 32)
    for m in (loaded, clone):
        timm_peft.set_adapter(m, "b")
        timm_peft.set_adapter(model, "b")
        torch.testing.assert_close(m(x), model(x), atol=0, rtol=0)
        timm_peft.set_adapter(model, "default")
    model.double()  # an inactive adapter follows the model's dtype when it becomes active
    timm_peft.set_adapter(model, "b")
    assert model(x.double()).dtype == torch.float64


def test_composed_adapters_equal_the_methods_applied_in_turn(tmp_path):
    from timm_peft.methods.vpt import VPTConfig
    torch.manual_seed(0)
    plain = timm.create_model(VIT_ARCH, num_classes=3, **VIT).eval()
    model = timm_peft.apply_method(copy.deepcopy(plain), "ssf").eval()
    _perturb(model, 1)
    timm_peft.add_adapter(model, "prompts", dict(num_prompts=2, train_head=False), method="vpt")
    timm_peft.set_adapter(model, ["default", "prompts"])
    assert timm_peft.active_adapter(model) == ("default", "prompts")
    _perturb(model, 2)  # both members' tensors (the composition's slots)
    x = torch.randn(2, 3, 32, 32)
    # reference: SSF, then VPT's surgery, on a copy of the base, given the same tensors
    ref = timm_peft.apply_method(copy.deepcopy(plain), "ssf")
    timm_peft.core.get_method("vpt").apply(ref, VPTConfig(num_prompts=2, train_head=False))
    ref.eval()
    members = timm_peft.get_adapters(model)
    with torch.no_grad():
        for name in ("default", "prompts"):
            for k, t in members[name].state.items():
                ref.state_dict()[k].copy_(t)
        torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)
    # both train together, and only they
    model.train()
    model(x).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for a in members.values() for k, t in a.state.items() if t.requires_grad}
    assert any("ssf" in n for n in trainable) and "vpt.embeddings" in trainable
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    # each member saves on its own; the composition is active again afterwards
    with torch.no_grad():
        y = model(x)
    out = timm_peft.save_pretrained(model, tmp_path / "zoo")
    assert sorted(p.name for p in out.iterdir()) == ["default", "prompts"]
    assert timm_peft.read_adapter_config(out / "prompts")["peft_type"] == "vpt"
    with timm_peft.disable_adapter(model), torch.no_grad():
        assert torch.equal(model(x), plain(x))
    with torch.no_grad():
        assert torch.equal(model(x), y) and timm_peft.active_adapter(model) == ("default", "prompts")
    with pytest.raises(ValueError, match="composed: merge one at a time"):
        timm_peft.merge_and_unload(model)
    with torch.no_grad():
        assert torch.equal(timm_peft.unload(model)(x), plain(x))


def test_composition_refuses_what_does_not_compose():
    model = _build(VIT_ARCH, "ssf", None, VIT)
    timm_peft.add_adapter(model, "vpt_head", method="vpt")  # trains the head too
    timm_peft.add_adapter(model, "lion", dict(train_head=False), method="lion")
    timm_peft.add_adapter(model, "ssf2")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    for names, match in [(["default", "vpt_head"], "both own .*head"),
                         (["default", "lion"], "own training behaviour"),
                         (["default", "ssf2"], "one adapter per method"),
                         (["default", "default"], "repeat")]:
        with pytest.raises(ValueError, match=match):
            timm_peft.set_adapter(model, names)
        assert timm_peft.active_adapter(model) == "default"  # refused before any change
        with torch.no_grad():
            assert torch.equal(model(x), y)
