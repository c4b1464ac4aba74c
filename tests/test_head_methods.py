"""MLP-k and Sidetune (VPT's head-side baselines), each against an independent reference.

MLP-k: the MLP written out by hand on timm's own pooled features. Sidetune: the side network
written out with ``torch.nn.functional`` from its documented architecture, and the blend at
α = 1 (the backbone alone: a linear probe) and α = 0 (the side network alone).
"""
from __future__ import annotations

import copy
import pickle
import threading

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import timm_peft
from timm_peft.methods.mlp import MlpConfig
from timm_peft.methods.sidetune import SidetuneConfig

from conftest import TINY_VIT, local_overlay, move_trainable

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CNN = ("resnet10t", dict(channels=(8, 16, 16, 16), stem_width=8))
VIT = ("vit_tiny_patch16_224", dict(TINY_VIT, patch_size=8, embed_dim=32, num_heads=2))
SMALL_SIDE = dict(side_channels=(8, 16, 16), side_pool=2)


def _pair(arch, kwargs, method, cfg=None, num_classes=4):
    """(plain timm model, the same weights with ``method``), trainable values moved, eval."""
    torch.manual_seed(0)
    plain = timm.create_model(arch, num_classes=num_classes, **kwargs).eval()
    model = timm_peft.apply_method(copy.deepcopy(plain), method, cfg)
    move_trainable(model, seed=1)
    with torch.no_grad():  # the plain model reads the head the adapter trained
        plain.get_classifier().weight.copy_(model.get_classifier().weight)
        plain.get_classifier().bias.copy_(model.get_classifier().bias)
    return plain, model.eval()


def _pooled(plain, x):
    with torch.no_grad():
        return plain.forward_head(plain.forward_features(x), pre_logits=True)


# ----------------------------------------------------------------------------------------------
# MLP-k
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,kwargs", [VIT, CNN])
@pytest.mark.parametrize("cfg", [None, dict(num_layers=4, hidden_dim=5, act="gelu")])
def test_mlp_equals_hand_written_mlp_on_timm_features(arch, kwargs, cfg):
    plain, model = _pair(arch, kwargs, "mlp", cfg)
    config = MlpConfig(**(cfg or {}))
    act = F.relu if config.act == "relu" else F.gelu
    h = _pooled(plain, X)
    d = h.shape[-1]
    layers = [m for m in model.mlp_head.layers[str(d)] if isinstance(m, torch.nn.Linear)]
    assert len(layers) == config.num_layers - 1
    widths = [d, *[config.hidden_dim or d] * (config.num_layers - 2), d]
    assert [(lin.in_features, lin.out_features) for lin in layers] == list(zip(widths, widths[1:]))
    for lin in layers:
        h = act(h @ lin.weight.T + lin.bias)
    with torch.no_grad():
        want = plain.get_classifier()(h)
        torch.testing.assert_close(model(X), want)
        torch.testing.assert_close(model.forward_head(model.forward_features(X), pre_logits=True), h)
        # the backbone is the plain model's
        torch.testing.assert_close(model.forward_features(X), plain.forward_features(X))


def test_mlp3_parameters_are_vpts():
    # VPT Table 1/2: Mlp-3 is 1.35x (ViT-B, 24 tasks) / 1.47x (Swin-B, 19 tasks) the backbone:
    # two hidden layers of the feature width, 2(d^2 + d)
    vit = timm.create_model("vit_base_patch16_224.mlp3", num_classes=0, device="meta")
    swin = timm.create_model("swin_base_patch4_window7_224.mlp3", num_classes=0, device="meta")
    assert timm_peft.get_nb_trainable_parameters(vit)[0] == 2 * (768 ** 2 + 768)
    assert timm_peft.get_nb_trainable_parameters(swin)[0] == 2 * (1024 ** 2 + 1024)
    total = timm_peft.get_nb_trainable_parameters(vit)[1] - 2 * (768 ** 2 + 768)
    head = 76_900 / 100 * 93  # ~93 classes per task on average (Linear: 1.02x)
    assert round((total + 24 * (2 * (768 ** 2 + 768) + head)) / total, 2) == 1.35


def test_mlp_on_two_headed_and_conv_headed_models():
    # distilled DeiT: both classifiers read the MLP (eval averages them)
    m = timm.create_model("deit_tiny_distilled_patch16_224.mlp3", img_size=32, depth=1,
                          num_classes=3).eval()
    assert type(m.head).__name__ == "MlpLinear" and type(m.head_dist).__name__ == "MlpLinear"
    with torch.no_grad():
        feats = m.forward_features(X)
        h = m.mlp_head(feats[:, :2], 192)  # the same MLP on the class and distillation tokens
        want = (F.linear(h[:, 0], m.head.weight, m.head.bias)
                + F.linear(h[:, 1], m.head_dist.weight, m.head_dist.bias)) / 2
        torch.testing.assert_close(m(X), want)
    # a 1x1-conv classifier (DLA) reads the MLP, and Sidetune's blend, on its channel axis
    x = torch.randn(2, 3, 64, 64)
    for method, cfg in (("mlp3", None), ("sidetune", dict(SMALL_SIDE, alpha=0.0,
                                                           learn_alpha=False))):
        torch.manual_seed(0)
        plain = timm.create_model("dla34", num_classes=3).eval()
        dla = timm_peft.apply_method(copy.deepcopy(plain), method, cfg).eval()
        assert type(dla.fc).__name__ in ("MlpConv2d", "SidetuneConv2d")
        with torch.no_grad():
            f = _pooled(plain, x)  # (B, C, 1, 1)
            if method == "mlp3":
                h = dla.mlp_head(f.flatten(1), f.shape[1])
            else:  # alpha = 0: the projected side features alone
                h = _side_reference(dla.sidetune.side, x, 2) @ dla.sidetune.proj[
                    str(f.shape[1])].weight.T
            want = plain.fc(h[:, :, None, None]).flatten(1)
            torch.testing.assert_close(dla(x), want)


def test_mlp_config_bounds_and_refusals():
    for bad in (dict(num_layers=1), dict(num_layers=17), dict(hidden_dim=0),
                dict(hidden_dim=10 ** 6), dict(act="tanh"), dict(dropout=1.0),
                dict(num_layers=2, hidden_dim=8), dict(num_layers=True)):
        with pytest.raises((ValueError, TypeError)):
            MlpConfig(**bad)
    with pytest.raises(ValueError, match="does not pool"):
        timm.create_model("resnet10t.mlp3", global_pool="", num_classes=3)
    with pytest.raises(ValueError, match="train_head"):
        timm.create_model("resnet10t.mlp3", peft_cfg=dict(train_head=False))


# ----------------------------------------------------------------------------------------------
# Sidetune
# ----------------------------------------------------------------------------------------------

def _side_reference(side: torch.nn.Sequential, x: torch.Tensor, pool: int) -> torch.Tensor:
    """The documented side network written out: AlexNet's convolutions (11x11/4, 5x5, then
    3x3), ReLU, 3x3/2 max pools (padding 1) after the first, second and last, average pool to
    pool x pool, flatten."""
    convs = [m for m in side if isinstance(m, torch.nn.Conv2d)]
    h = x
    for i, conv in enumerate(convs):
        pad = 2 if i < 2 else 1
        h = F.relu(F.conv2d(h, conv.weight, conv.bias, stride=4 if i == 0 else 1, padding=pad))
        if i in (0, 1) or i == len(convs) - 1:
            h = F.max_pool2d(h, 3, 2, padding=1)
    return F.adaptive_avg_pool2d(h, pool).flatten(1)


@pytest.mark.parametrize("arch,kwargs", [VIT, CNN])
@pytest.mark.parametrize("alpha,learn", [(1.0, False), (0.0, False), (0.3, True)])
def test_sidetune_blend_matches_reference_and_its_endpoints(arch, kwargs, alpha, learn):
    cfg = dict(SMALL_SIDE, alpha=alpha, learn_alpha=learn)
    plain, model = _pair(arch, kwargs, "sidetune", cfg)
    st = model.sidetune
    a = float(st.alpha.detach())
    if not learn:
        assert a == alpha
    f = _pooled(plain, X)
    with torch.no_grad():
        s = _side_reference(st.side, X, 2) @ st.proj[str(f.shape[-1])].weight.T
        want = plain.get_classifier()(a * f + (1 - a) * s)
        got = model(X)
        torch.testing.assert_close(got, want)
        if alpha == 1.0:  # the backbone alone: exactly the linear probe
            assert torch.equal(got, plain(X))
        if alpha == 0.0:  # the side network alone: the backbone does not matter
            other = timm_peft.apply_method(
                timm.create_model(arch, num_classes=4, **kwargs), "sidetune", cfg).eval()
            other.load_state_dict({k: v for k, v in model.state_dict().items()
                                   if k in model.peft_adapter_keys}, strict=False)
            torch.testing.assert_close(other(X), got)
        assert torch.equal(model.forward_features(X), plain.forward_features(X))


def test_sidetune_alpha_learns_and_gradients_reach_side_network():
    _, model = _pair(*CNN, "sidetune", SMALL_SIDE)
    model.train()
    loss = F.cross_entropy(model(X), torch.tensor([0, 1, 2]))
    loss.backward()
    st = model.sidetune
    assert abs(float(torch.sigmoid(torch.tensor(0.0))) - 0.5) < 1e-9
    assert st.alpha_logit.grad is not None and st.alpha_logit.grad.abs() > 0
    assert all(p.grad is not None for p in st.side.parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if not n.startswith(("sidetune.", "fc.")))


def test_sidetune_parameters_are_vpts():
    # VPT Table 1: Sidetune is 3.69x (ViT-B/16, 24 tasks): AlexNet's features (2,469,696)
    # and a 9216 -> 768 projection (7,077,888) per task, plus alpha
    vit = timm.create_model("vit_base_patch16_224.sidetune", num_classes=0, device="meta")
    n, total = timm_peft.get_nb_trainable_parameters(vit)
    assert n == 2_469_696 + 9216 * 768 + 1
    base = total - n
    assert round((base + 24 * (n + 76_900 / 100 * 93)) / base, 2) == 3.69


def test_sidetune_head_needs_the_image_and_threads_do_not_mix():
    _, model = _pair(*CNN, "sidetune", SMALL_SIDE)
    with pytest.raises(RuntimeError, match="only model\\(x\\) computes"):
        model.forward_head(model.forward_features(X))
    xs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        want = [model(x) for x in xs]
    got: dict[int, torch.Tensor] = {}

    def run(i):
        with torch.no_grad():
            for _ in range(5):
                got[i] = model(xs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert torch.equal(got[i], want[i])
    assert not model.sidetune.__dict__.get("_peft_side")  # nothing left behind


def test_sidetune_config_bounds_and_refusals():
    for bad in (dict(side_channels=()), dict(side_channels=(8,) * 9), dict(side_channels=(0,)),
                dict(side_channels=(2048,)), dict(side_pool=0), dict(side_pool=9),
                dict(alpha=1.5), dict(alpha=0.0), dict(alpha=1.0, learn_alpha=True)):
        with pytest.raises((ValueError, TypeError)):
            SidetuneConfig(**bad)
    with pytest.raises(ValueError, match="does not pool"):
        timm.create_model("resnet10t.sidetune", global_pool="", num_classes=3)


# ----------------------------------------------------------------------------------------------
# both: save / reload, pickling, unload, listing
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,cfg,prefix", [("mlp3", None, "mlp_head."),
                                               ("sidetune", SMALL_SIDE, "sidetune.")])
def test_save_reload_is_the_trained_model(tmp_path, vit_weights, method, cfg, prefix):
    def build():
        return timm.create_model(f"vit_tiny_patch16_224.{method}", pretrained=True, num_classes=3,
                                 pretrained_cfg_overlay=local_overlay(vit_weights),
                                 peft_cfg=cfg, **TINY_VIT)

    model = move_trainable(build(), seed=2)
    with torch.no_grad():
        out = model(X)
    d = timm_peft.save_pretrained(model, tmp_path / method)
    saved = load_file(str(d / "adapter_model.safetensors"))
    assert set(saved) == set(model.peft_adapter_keys)
    assert any(k.startswith(prefix) for k in saved) and "head.weight" in saved
    assert not any(k.startswith("blocks.") for k in saved)  # no frozen base tensor
    fresh = timm_peft.load_adapter(build(), d).eval()
    rebuilt = timm_peft.from_pretrained(d, pretrained_cfg_overlay=local_overlay(vit_weights)).eval()
    assert rebuilt.peft_config == model.peft_config
    card = (d / "README.md").read_text()
    assert timm_peft.core.get_method(method).citation.splitlines()[0] in card
    with torch.no_grad():
        assert torch.equal(fresh(X), out)
        assert torch.equal(rebuilt(X), out)
        assert torch.equal(pickle.loads(pickle.dumps(model))(X), out)
        assert torch.equal(copy.deepcopy(model)(X), out)


@pytest.mark.parametrize("method,cfg", [("mlp3", None), ("sidetune", SMALL_SIDE)])
def test_unload_gives_back_plain_timm(method, cfg):
    torch.manual_seed(0)
    plain = timm.create_model(VIT[0], num_classes=4, **VIT[1]).eval()
    model = timm_peft.apply_method(copy.deepcopy(plain), method, cfg)
    back = timm_peft.unload(model).eval()
    assert type(back) is type(plain) and type(back.head) is torch.nn.Linear
    assert set(back.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(back(X), plain(X))


@pytest.mark.parametrize("method", ["mlp", "mlp3", "sidetune"])
def test_listed_on_every_classifier_family(method):
    listed = set(timm_peft.list_models(method=method))
    for arch in ("vit_base_patch16_224", "resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224",
                 "deit_base_distilled_patch16_224", "mixer_b16_224"):
        assert f"{arch}.{method}" in listed


# ----------------------------------------------------------------------------------------------
# the README's section for these methods runs as written and prints what it shows
# ----------------------------------------------------------------------------------------------

def test_readme_section_runs_and_prints_what_it_shows(capsys):
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("### MLP-k and Sidetune", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        capsys.readouterr()
        exec(compile(block, "README MLP-k and Sidetune", "exec"), {})
        shown = [line[2:] for line in block.splitlines() if line.startswith("# ")]
        assert capsys.readouterr().out.splitlines() == shown
    # the table's numbers are paper_results.json's
    from timm_peft.reproduce import paper_results
    published = paper_results()
    rows = re.findall(r"^\| `(\w+)` \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|",
                      section, flags=re.M)
    assert len(rows) == 8
    for method, *numbers in rows:
        entry = published[method]
        want = [entry["fgvc"]["group_means"]["fgvc"], *entry["vtab1k"]["group_means"].values()]
        assert [float(n) for n in numbers] == want, method
