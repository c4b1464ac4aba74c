"""The family wing and the insertion mechanism: every method on families beyond the first four,
pickling of every method's model, clear TorchScript errors, and what list_models promises."""
import copy
import io
import pickle
import random
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_peft
from timm_peft.families import get_family
from timm_peft.layers import PromptsAsPrefix, restore_class

from conftest import TINY_VIT

SWIN = dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(2, 4), window_size=4)
EVA = dict(img_size=28, depth=2)


def _img(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# the insertion mechanism: every method's model pickles and torch.saves whole
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, kwargs, size, method", [
    ("vit_tiny_patch16_224", TINY_VIT, 32, "vpt"),
    ("vit_tiny_patch16_224", TINY_VIT, 32, "vpt_shallow"),
    ("vit_tiny_patch16_224", TINY_VIT, 32, "e2vpt"),
    ("vit_tiny_patch16_224", TINY_VIT, 32, "ssf"),
    ("vit_tiny_patch16_224", TINY_VIT, 32, "lion"),
    ("swin_tiny_patch4_window7_224", SWIN, 32, "vpt"),
    ("swin_tiny_patch4_window7_224", SWIN, 32, "e2vpt"),
    ("resnet10t", {}, 32, "vpt"),
    ("eva02_tiny_patch14_224", EVA, 28, "vpt"),
])
def test_every_method_pickles_and_torch_saves_whole(arch, kwargs, size, method):
    torch.manual_seed(0)
    cfg = dict(img_size=size) if method == "vpt" and arch == "resnet10t" else None
    model = timm.create_model(f"{arch}.{method}", num_classes=3, peft_cfg=cfg, **kwargs).eval()
    x = _img(size)
    with torch.no_grad():
        ref = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False),
                  copy.deepcopy(model)):
        assert type(clone) is type(model)
        with torch.no_grad():
            assert torch.equal(clone.eval()(x), ref)
        # the copy owns its adapter: changing it leaves the original alone
        with torch.no_grad():
            for p in clone.parameters():
                if p.requires_grad:
                    p.add_(1.0)
            assert torch.equal(model(x), ref)


def test_torchscript_names_the_blocking_method():
    model = timm.create_model("vit_tiny_patch16_224.vpt", **TINY_VIT)
    with pytest.raises(RuntimeError, match=r"'vpt' PEFT method.*merge_and_unload.*torch.compile"):
        torch.jit.script(model)
    ssf = timm.create_model("resnet10t.ssf", num_classes=3)
    with pytest.raises(RuntimeError, match=r"'ssf' PEFT method"):
        torch.jit.script(ssf)
    merged = timm_peft.merge_and_unload(ssf)
    torch.jit.script(merged.eval())  # merged: plain timm again


# ----------------------------------------------------------------------------------------------
# token prompts on EVA: rotary embeddings skip the prompts
# ----------------------------------------------------------------------------------------------

def _eva(method="vpt", **cfg):
    torch.manual_seed(0)
    base = timm.create_model("eva02_tiny_patch14_224", num_classes=3, **EVA).eval()
    return base, timm_peft.apply_method(copy.deepcopy(base), method, cfg or None).eval()


def test_eva_zero_prompts_is_the_base_model():
    base, model = _eva(num_prompts=0)
    x = _img(28)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


def test_eva_prompts_have_no_position():
    """Prompts carry no position embedding and get no rotary embedding, so permuting a layer's
    prompts cannot change the output (with rotary on them it does, or fails on the shapes)."""
    _, model = _eva(num_prompts=4)
    x = _img(28)
    with torch.no_grad():
        y1 = model(x)
        model.vpt.embeddings.copy_(model.vpt.embeddings.flip(1))
        torch.testing.assert_close(model(x), y1, atol=1e-5, rtol=0)
    for b in model.blocks:
        restore_class(b.attn, PromptsAsPrefix)
    with pytest.raises(RuntimeError):
        model(x)


def test_eva_prompts_change_the_output_and_train():
    base, model = _eva(num_prompts=4)
    x = _img(28)
    with torch.no_grad():
        assert not torch.allclose(model(x), base(x))
    model.train()
    F.cross_entropy(model(x), torch.arange(2)).backward()
    assert model.vpt.embeddings.grad is not None and model.vpt.embeddings.grad.abs().sum() > 0
    inter = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    plain = base.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert [t.shape for t in inter] == [t.shape for t in plain]
    assert get_family(model).name == "eva"


def test_eva_shallow_and_unload():
    base, model = _eva("vpt_shallow")
    x = _img(28)
    assert model(x).shape == (2, 3)
    plain = timm_peft.unload(model)
    assert type(plain) is type(base) and all(type(b.attn) is type(base.blocks[0].attn)
                                             for b in plain.blocks)
    with torch.no_grad():
        assert torch.equal(plain(x), base(x))


# ----------------------------------------------------------------------------------------------
# pixel prompts on any ConvNet
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenetv3_small_050", "regnetx_002"])
def test_pixel_prompts_on_any_convnet_are_the_padded_image(arch):
    torch.manual_seed(0)
    base = timm.create_model(arch, num_classes=3).eval()
    model = timm_peft.apply_method(copy.deepcopy(base), "vpt", dict(img_size=40, pad_size=3)).eval()
    assert get_family(model).name == "convnets"
    x = _img(40)
    vpt = model.vpt
    padded = torch.cat([vpt.top_bottom[0].expand(2, -1, -1, -1),
                        torch.cat([vpt.left_right[0].expand(2, -1, -1, -1), x,
                                   vpt.left_right[1].expand(2, -1, -1, -1)], dim=-1),
                        vpt.top_bottom[1].expand(2, -1, -1, -1)], dim=-2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(padded), atol=1e-5, rtol=0)
    model.train()
    F.cross_entropy(model(x), torch.arange(2)).backward()
    assert vpt.top_bottom.grad.abs().sum() > 0 and vpt.left_right.grad.abs().sum() > 0


def test_pixel_prompts_sized_from_the_model_input_and_features_match_feature_info():
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0.vpt", features_only=True, out_indices=(1, 2, 4),
                              pretrained_cfg_overlay=dict(input_size=(3, 48, 48)),
                              peft_cfg=dict(pad_size=4))
    inner = timm_peft.core.unwrap_features(model)
    assert inner.vpt.img_size == (48, 48)  # from the model's input size, not a default
    feats = model(_img(48))
    info = model.feature_info
    assert [f.shape[1] for f in feats] == info.channels()
    assert [f.shape[-1] for f in feats] == [-(-56 // r) for r in info.reduction()]  # 48 + 2·4
    with pytest.raises(ValueError, match=r"made for 48×48 inputs, got 32×32"):
        model(_img(32))


# ----------------------------------------------------------------------------------------------
# what list_models lists builds and runs
# ----------------------------------------------------------------------------------------------

# archs whose smallest config still takes minutes on CPU, or needs arguments to build at all
_SAMPLE = 3


@pytest.mark.parametrize("method", ["ssf", "vpt", "e2vpt", "partial", "bias", "adapter",
                                    "adaptformer", "lora"])
def test_listed_archs_build_and_run(method):
    names = timm_peft.list_models(method=method)
    assert names and all(n.endswith(f".{method}") for n in names)
    rng = random.Random(f"{method}-13")
    for name in rng.sample(names, _SAMPLE):
        arch = name.rsplit(".", 1)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, num_classes=3, device="meta")
            size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
            out = model(torch.empty(1, 3, *size, device="meta"))
        assert out.shape == (1, 3), arch
        assert timm_peft.get_nb_trainable_parameters(model)[0] > 0


# ----------------------------------------------------------------------------------------------
# token prompts on BEiT: the relative-position bias is padded for the prompts
# ----------------------------------------------------------------------------------------------

BEIT = dict(img_size=32, depth=2, embed_dim=32, num_heads=2)


@pytest.mark.parametrize("kwargs", [BEIT, dict(BEIT, use_rel_pos_bias=False,
                                               use_shared_rel_pos_bias=True)])
def test_beit_prompts_get_zero_relative_position_bias(kwargs):
    from timm_peft.layers.prompts import PromptPaddedBias, PromptPaddedRelPos
    torch.manual_seed(0)
    base = timm.create_model("beitv2_base_patch16_224", num_classes=3, **kwargs).eval()
    with torch.no_grad():  # layer scale starts near zero: make the blocks matter
        for p in base.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = _img(32)
    zero = timm_peft.apply_method(copy.deepcopy(base), "vpt", dict(num_prompts=0)).eval()
    with torch.no_grad():
        assert torch.equal(zero(x), base(x))
    model = timm_peft.apply_method(copy.deepcopy(base), "vpt", dict(num_prompts=4)).eval()
    assert get_family(model).name == "beit"
    with torch.no_grad():
        y1 = model.forward_features(x)
        assert (y1 - base.forward_features(x)).abs().max() > 1e-4
        model.vpt.embeddings.copy_(model.vpt.embeddings.flip(1))  # prompts have no position
        torch.testing.assert_close(model.forward_features(x), y1, atol=1e-5, rtol=0)
    broken = copy.deepcopy(model)
    for m in broken.modules():
        for mixin in (PromptPaddedRelPos, PromptPaddedBias):
            restore_class(m, mixin)
    with pytest.raises(RuntimeError):  # unpadded, the bias does not fit the longer sequence
        broken(x)
    plain = timm_peft.unload(model)
    with torch.no_grad():
        assert torch.equal(plain(x), base(x))


def test_pad_for_prompts_keeps_prefix_and_patch_pairs():
    from timm_peft.layers.prompts import pad_for_prompts
    bias = torch.arange(9.).view(1, 3, 3)
    out = pad_for_prompts(bias, 1, 2)
    keep = [0, 3, 4]
    assert torch.equal(out[0][keep][:, keep], bias[0])
    assert out[0, 1:3].abs().sum() == 0 and out[0, :, 1:3].abs().sum() == 0


# ----------------------------------------------------------------------------------------------
# LION beyond pooled linear heads
# ----------------------------------------------------------------------------------------------

def test_lion_on_a_1x1_conv_classifier_is_the_backbone_at_init():
    torch.manual_seed(0)
    base = timm.create_model("dla34", num_classes=3).eval()
    model = timm_peft.apply_method(copy.deepcopy(base), "lion").eval()
    x = _img(64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=0)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape[1] == 512
    model.train()
    F.cross_entropy(model(x), torch.arange(2)).backward()
    assert model.lion.p2.proj.weight.grad is not None


def test_pixel_prompts_not_promised_where_the_padded_size_breaks():
    # every arch listed for vpt builds: those whose downsampling or attention is bound to the
    # input size are not listed, and a build says why
    listed = set(timm_peft.list_models(method="vpt"))
    for arch in ("resnetaa50", "seresnextaa101d_32x8d", "resnet50_clip", "resnet50_clip_gap",
                 "bat_resnext26ts"):
        assert f"{arch}.vpt" not in listed
        with warnings.catch_warnings(), pytest.raises(ValueError, match="cannot take"):
            warnings.simplefilter("ignore")
            timm.create_model(f"{arch}.vpt", device="meta")
    for arch in ("resnet50d", "resnetblur50", "gernet_s", "regnetz_b16"):
        assert f"{arch}.vpt" in listed
