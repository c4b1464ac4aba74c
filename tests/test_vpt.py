"""VPT (timm_peft.methods.vpt): counts, token-level references, layout invariants, Swin, ConvNets."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import timm_peft
from timm_peft.methods.vpt import VisualPrompts, VPTConfig

TINY = dict(img_size=32, depth=3, num_classes=5)


def build(peft_cfg=None, method="vpt", seed=0, **kwargs):
    """A tiny ViT with VPT and an untouched deep copy of the same base."""
    torch.manual_seed(seed)
    base = timm.create_model("vit_tiny_patch16_224", **{**TINY, **kwargs}).eval()
    model = timm_peft.apply_method(copy.deepcopy(base), method, peft_cfg).eval()
    return base, model


def reference(base, prompts, img, deep=True, append=False):
    """Token-level VPT written out: embed, concatenate prompts, run the frozen blocks one by one
    (overwriting the prompts before every block if deep), pool what the base pools."""
    n = base.num_prefix_tokens
    x = base.norm_pre(base.patch_drop(base._pos_embed(base.patch_embed(img))))
    t = prompts.shape[1]

    def with_prompts(x, p, old):
        p = p.unsqueeze(0).expand(x.shape[0], -1, -1)
        if append:
            return torch.cat([x[:, :x.shape[1] - old], p], dim=1)
        return torch.cat([x[:, :n], p, x[:, n + old:]], dim=1)

    x = with_prompts(x, prompts[0], 0)
    for i, blk in enumerate(base.blocks):
        if deep and i > 0:
            x = with_prompts(x, prompts[i], t)
        x = blk(x)
    x = base.norm(x)
    image = x[:, n:x.shape[1] - t] if append else x[:, n + t:]
    if base.global_pool == "token":
        pooled = x[:, 0]
    elif base.global_pool == "map":  # attention pooling over the image tokens
        pooled = base.attn_pool(image)
    else:
        pooled = image.mean(dim=1)
    return base.head(base.fc_norm(pooled))


# ----------------------------------------------------------------------------------------------
# parameter counts (the paper's arithmetic on ViT-B/16)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, expected", [("vpt", 460_800), ("vpt_shallow", 38_400)])
def test_vit_base_counts(method, expected):
    m = timm.create_model(f"vit_base_patch16_224.{method}", num_classes=0, device="meta")
    assert timm_peft.get_nb_trainable_parameters(m)[0] == expected
    assert m.vpt.embeddings.shape == ((12 if method == "vpt" else 1), 50, 768)


def test_vit_base_counts_with_projection_and_init_bound():
    m = timm.create_model("vit_base_patch16_224.vpt", num_classes=0, device="meta",
                          peft_cfg=dict(projection_dim=64))
    assert timm_peft.get_nb_trainable_parameters(m)[0] == 12 * 50 * 64 + 64 * 768 + 768
    p = VisualPrompts(12, 50, 768, patch_size=(16, 16))
    assert p.embeddings.abs().max() <= 0.0625 and p.embeddings.abs().max() > 0.06


# ----------------------------------------------------------------------------------------------
# ViT: token-level references
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(reg_tokens=2, no_embed_class=True),
    dict(class_token=False, global_pool="avg"),
    dict(global_pool="map"),
], ids=["cls", "cls+reg,no_embed_class", "avgpool", "mappool"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_vit_matches_token_level_reference(kwargs, deep):
    base, model = build(dict(num_prompts=4, deep=deep), **kwargs)
    img = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(base, model.vpt.embeddings, img, deep=deep)
        torch.testing.assert_close(model(img), expected, atol=1e-5, rtol=0)
        # and the prompts matter: the head does not simply read the base model
        assert not torch.allclose(model(img), base(img), atol=1e-3)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_prompt_location_invariance(deep):
    """Paper Sec. 3.2: [x, P, E] and [x, E, P] give the same class-token output."""
    base, model = build(dict(num_prompts=3, deep=deep))
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        appended = reference(base, model.vpt.embeddings, img, deep=deep, append=True)
        torch.testing.assert_close(model(img), appended, atol=1e-5, rtol=0)


def test_zero_prompts_is_the_base_model():
    base, model = build(dict(num_prompts=0))
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(img), base(img))
        assert torch.equal(model.forward_features(img), base.forward_features(img))


class _Pruned(VisualPrompts):
    """What a pruning subclass does: fewer active tokens than configured."""

    keep = 2

    @property
    def num_tokens(self):
        return self.keep

    def tokens(self, layer):
        return super().tokens(layer)[:self.keep]


@pytest.mark.parametrize("keep", [2, 0])
def test_fewer_active_tokens_than_configured(keep):
    base, model = build(dict(num_prompts=4))
    model.vpt.__class__ = type("Pruned", (_Pruned,), {"keep": keep})
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if keep == 0:  # every prompt masked out: the base model
            assert torch.equal(model(img), base(img))
        else:
            expected = reference(base, model.vpt.embeddings[:, :keep], img)
            torch.testing.assert_close(model(img), expected, atol=1e-5, rtol=0)
        feats, inter = model.forward_intermediates(img)
        assert feats.shape == base.forward_features(img).shape


# ----------------------------------------------------------------------------------------------
# ViT: the timm API keeps its base layout
# ----------------------------------------------------------------------------------------------

def test_vit_stays_a_vision_transformer_with_base_keys():
    base, model = build()
    from timm.models.vision_transformer import VisionTransformer
    assert isinstance(model, VisionTransformer)
    base_keys = set(base.state_dict())
    assert base_keys <= set(model.state_dict())
    assert set(model.state_dict()) - base_keys == {"vpt.embeddings"}
    assert model.peft_adapter_keys == ("head.weight", "head.bias", "vpt.embeddings")


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_vit_intermediates_never_hold_prompts(deep):
    base, model = build(dict(num_prompts=4, deep=deep), reg_tokens=1)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, maps = model.forward_intermediates(img)
        b_feats, b_maps = base.forward_intermediates(img)
        assert feats.shape == b_feats.shape and [m.shape for m in maps] == [m.shape for m in b_maps]
        torch.testing.assert_close(feats, model.forward_features(img))
        # the last map is the final tokens (before the norm) with the prompts removed
        n = model.num_prefix_tokens
        last = maps[-1].flatten(2).transpose(1, 2)
        torch.testing.assert_close(model.norm(last), feats[:, n:])
        nlc = model.forward_intermediates(img, output_fmt="NLC", intermediates_only=True)
        assert [m.shape for m in nlc] == [(2, 4, 192)] * 3
        with_prefix = model.forward_intermediates(img, indices=[1], return_prefix_tokens=True,
                                                  intermediates_only=True)
        assert with_prefix[0][0].shape == (2, 192, 2, 2) and with_prefix[0][1].shape == (2, 2, 192)
        d = model.forward_intermediates(img, output_dict=True, return_prefix_tokens=True)
        assert set(d) == set(base.forward_intermediates(img, output_dict=True, return_prefix_tokens=True))
        assert [y.shape for y in model.get_intermediate_layers(img, n=2, reshape=True)] == [(2, 192, 2, 2)] * 2


def test_vit_features_only():
    torch.manual_seed(0)
    fm = timm.create_model("vit_tiny_patch16_224.vpt", img_size=32, depth=3, features_only=True,
                           out_indices=(0, 2))
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = fm(img)
        assert [o.shape for o in out] == [(2, 192, 2, 2)] * 2
        ref = fm.model.forward_intermediates(img, indices=(0, 2), intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert timm_peft.get_nb_trainable_parameters(fm)[0] == 3 * 50 * 192


def test_vit_forward_head_pre_logits_and_reset_classifier():
    base, model = build(dict(num_prompts=4))
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(img), pre_logits=True)
        assert pre.shape == (2, 192)
        torch.testing.assert_close(model.head(pre), model(img))
    model.reset_classifier(7)
    assert model(img).shape == (2, 7) and model.head.weight.requires_grad


def test_vit_grad_checkpointing_same_outputs_and_grads():
    _, model = build(dict(num_prompts=4, deep=True))
    model.train()
    img = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(img)
        out.square().sum().backward()
        grads.append((out.detach(), model.vpt.embeddings.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum(dim=(1, 2)).min() > 0  # every layer's prompts get a gradient


def test_vit_keeps_sdpa():
    _, model = build(dict(num_prompts=4))
    calls = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                calls.append(args[1].shape)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 3 and calls[0][-2] == 1 + 4 + 4  # keys: class + prompts + patches


def test_vit_flops_grow_with_the_sequence():
    """FLOPs counted by torch (under no_grad) grow at least like the sequence, (N+T)/N."""
    from torch.utils.flop_counter import FlopCounterMode
    base, model = build(dict(num_prompts=4))
    flops = []
    for m in (base, model):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(torch.randn(1, 3, 32, 32))
        flops.append(counter.get_total_flops())
    assert flops[1] / flops[0] >= (5 + 4) / 5 - 0.1  # the head's FLOPs do not grow


def test_vit_torch_compile():
    _, model = build(dict(num_prompts=4))
    img = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(img), model(img))


def test_vit_prompt_dropout_is_per_sample_and_off_in_eval():
    _, model = build(dict(num_prompts=4, dropout=0.5))
    img = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1)
    with torch.no_grad():
        model.eval()
        out = model(img)
        assert torch.equal(out[0], out[3])
        model.train()
        out = model(img)
        assert not torch.allclose(out[0], out[3])


def test_deepcopy_owns_its_prompts_and_hooks():
    """timm's EMA and many trainers deep-copy models: the copy must use and unload its own prompts."""
    base, model = build(dict(num_prompts=4))
    twin = copy.deepcopy(model)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        twin.vpt.embeddings.normal_()  # (a constant shift would vanish in the LayerNorm)
        assert not torch.allclose(twin(img), model(img), atol=1e-3)
        expected = reference(base, twin.vpt.embeddings, img)
        torch.testing.assert_close(twin(img), expected, atol=1e-5, rtol=0)
        timm_peft.unload(twin)
        assert torch.equal(twin(img), base(img))
        torch.testing.assert_close(model(img), reference(base, model.vpt.embeddings, img),
                                   atol=1e-5, rtol=0)


def test_vit_unload_restores_the_plain_model():
    base, model = build(dict(num_prompts=4))
    img = torch.randn(2, 3, 32, 32)
    plain = timm_peft.unload(model)
    assert type(plain) is type(base) and not hasattr(plain, "vpt")
    assert set(plain.state_dict()) == set(base.state_dict())
    assert all(type(b) is type(base.blocks[0]) and "vpt_prompts" not in b.__dict__
               for b in plain.blocks)
    with torch.no_grad():
        assert torch.equal(plain(img), base(img))


def test_vit_save_load_round_trip(tmp_path):
    _, model = build(dict(num_prompts=4, projection_dim=8))
    with torch.no_grad():
        model.vpt.embeddings.normal_()
    timm_peft.save_pretrained(model, tmp_path)
    _, fresh = build(dict(num_prompts=4, projection_dim=8), seed=0)
    fresh.vpt.reset_parameters()
    timm_peft.load_adapter(fresh, tmp_path)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(img), model(img))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (dict(num_prompts=-1), "num_prompts must be >= 0"),
    (dict(dropout=1.0), "dropout must be < 1"),
    (dict(init="xavier"), "init must be one of"),
    (dict(projection_dim=0), "projection_dim must be >= 1"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        VPTConfig(**bad)


def test_vit_refuses_attn_mask():
    _, model = build(dict(num_prompts=2))
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(torch.randn(1, 3, 32, 32), attn_mask=torch.zeros(1, 1, 5, 5))


# ----------------------------------------------------------------------------------------------
# Swin
# ----------------------------------------------------------------------------------------------

SWIN = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
            num_classes=3, drop_path_rate=0.0)


def build_swin(peft_cfg=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    base = timm.create_model("swin_tiny_patch4_window7_224", **{**SWIN, **kwargs}).eval()
    model = timm_peft.apply_method(copy.deepcopy(base), "vpt", peft_cfg).eval()
    return base, model


def window_attention_with_prompt_tokens(attn, x, mask, prompts):
    """The paper's reading written out: every window's sequence is [prompts, window tokens];
    prompts get zero relative-position bias and are never masked; their outputs are dropped."""
    b_, n, c = x.shape
    t = prompts.shape[0]
    tokens = torch.cat([prompts.unsqueeze(0).expand(b_, -1, -1), x], dim=1)
    q, k, v = attn.qkv(tokens).reshape(b_, t + n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B_, heads, T+N, T+N)
    bias = torch.zeros(attn.num_heads, t + n, t + n)
    bias[:, t:, t:] = attn._get_rel_pos_bias()[0]
    logits = logits + bias
    if mask is not None:
        full = torch.zeros(mask.shape[0], t + n, t + n)
        full[:, t:, t:] = mask
        logits = (logits.view(-1, mask.shape[0], attn.num_heads, t + n, t + n)
                  + full[None, :, None]).view(b_, attn.num_heads, t + n, t + n)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b_, t + n, -1)
    return attn.proj(out)[:, t:]


@pytest.mark.parametrize("fused", [False, True], ids=["manual", "sdpa"])
def test_swin_windows_attend_to_prompts_like_tokens(fused):
    _, model = build_swin(dict(num_prompts=3))
    img = torch.randn(2, 3, 32, 32)
    seen = []

    def capture(attn, args, kwargs, out):
        seen.append((attn, args[0], kwargs.get("mask"), out))

    handles = []
    for stage in model.layers:
        for blk in stage.blocks:
            blk.attn.fused_attn = fused
            handles.append(blk.attn.register_forward_hook(capture, with_kwargs=True))
    with torch.no_grad():
        model(img)
        assert len(seen) == 4 and seen[1][2] is not None  # block 1 of stage 0 is shifted
        blocks = [b for stage in model.layers for b in stage.blocks]
        prompts = [model.vpt[s].embeddings[j] for s in range(2) for j in range(2)]
        for (attn, x, mask, out), blk, p in zip(seen, blocks, prompts):
            expected = window_attention_with_prompt_tokens(attn, x, mask, blk.norm1(p))
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_swin_counts_layout_and_zero_prompts():
    base, model = build_swin(dict(num_prompts=3))
    assert [tuple(p.embeddings.shape) for p in model.vpt] == [(2, 3, 16), (2, 3, 32)]
    assert timm_peft.get_nb_trainable_parameters(model)[0] == 2 * 3 * (16 + 32) + 32 * 3 + 3
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(img), base(img), atol=1e-4)
        feats, maps = model.forward_intermediates(img)
        b_feats, b_maps = base.forward_intermediates(img)
        assert feats.shape == b_feats.shape and [m.shape for m in maps] == [m.shape for m in b_maps]
        assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    base0, model0 = build_swin(dict(num_prompts=0))
    with torch.no_grad():
        assert torch.equal(model0(img), base0(img))


def test_swin_shallow_prompts_the_first_block_only():
    from timm_peft.layers.kv_attention import ExtraKVWindowAttention
    from timm_peft.layers.swap import is_swapped
    base, model = build_swin(dict(deep=False, num_prompts=3))
    assert [tuple(p.embeddings.shape) for p in model.vpt] == [(1, 3, 16)]
    blocks = [b for stage in model.layers for b in stage.blocks]
    swapped = [is_swapped(b.attn, ExtraKVWindowAttention) for b in blocks]
    assert swapped[0] and not any(swapped[1:]) and len(swapped) > 1
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(img) - base(img)).abs().max() > 1e-6
    model.train()
    F.cross_entropy(model(img), torch.arange(2)).backward()
    assert model.vpt[0].embeddings.grad.abs().sum() > 0


def _train(model, img, target, steps=15, lr=0.05):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(img), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def _local_base(tmp_path, arch, kwargs):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    base = timm.create_model(arch, **kwargs)
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    return dict(file=str(path), custom_load=False)


def test_swin_trains_and_round_trips(tmp_path):
    overlay = _local_base(tmp_path, "swin_tiny_patch4_window7_224", SWIN)
    model = timm.create_model("swin_tiny_patch4_window7_224.vpt", pretrained=True,
                              pretrained_cfg_overlay=overlay,
                              peft_cfg=dict(num_prompts=2, dropout=0.1), **SWIN)
    assert model.peft_adapter_keys == ("head.fc.weight", "head.fc.bias", "vpt.0.embeddings",
                                       "vpt.1.embeddings")
    torch.manual_seed(1)
    img, target = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    before = [p.detach().clone() for p in model.vpt.parameters()]
    model, losses = _train(model, img, target)
    assert losses[-1] < 0.7 * losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, model.vpt.parameters()))
    timm_peft.save_pretrained(model, tmp_path / "adapter")
    again = timm_peft.from_pretrained(tmp_path / "adapter", pretrained=True,
                                      pretrained_cfg_overlay=overlay).eval()
    for a, b in zip(model.vpt.parameters(), again.vpt.parameters()):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(again(img), model(img))


# ----------------------------------------------------------------------------------------------
# ConvNets: a learnable pixel border
# ----------------------------------------------------------------------------------------------

CONVNETS = {
    "resnet": ("resnet18", dict(num_classes=3, layers=(1, 1, 1, 1), channels=(8, 16, 32, 64),
                                stem_width=8)),
    "convnext": ("convnext_atto", dict(num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))),
}


@pytest.mark.parametrize("family", sorted(CONVNETS))
def test_convnet_border_matches_padded_image(family):
    arch, kwargs = CONVNETS[family]
    torch.manual_seed(0)
    base = timm.create_model(arch, **kwargs).eval()
    model = timm_peft.apply_method(copy.deepcopy(base), "vpt", dict(img_size=32, pad_size=3)).eval()
    p = 3
    assert timm_peft.get_nb_trainable_parameters(model)[0] == 2 * p * 3 * (32 + 32 + 2 * p) + \
        sum(q.numel() for q in model.get_classifier().parameters())
    img = torch.randn(2, 3, 32, 32)
    canvas = torch.zeros(2, 3, 32 + 2 * p, 32 + 2 * p)
    canvas[..., p:-p, p:-p] = img
    canvas[..., :p, :], canvas[..., -p:, :] = model.vpt.top_bottom
    canvas[..., p:-p, :p], canvas[..., p:-p, -p:] = model.vpt.left_right
    with torch.no_grad():
        assert torch.equal(model(img), base(canvas))
        maps = model.forward_intermediates(img, intermediates_only=True)
        assert torch.equal(maps[-1], base.forward_intermediates(canvas, intermediates_only=True)[-1])
    # init: pixels uniform in [0, 1], normalised with the model's mean and std
    mean = torch.tensor(base.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(base.pretrained_cfg["std"]).view(1, 3, 1, 1)
    pixels = model.vpt.left_right * std + mean
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.std() > 0.2
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(img)
    assert counter.get_total_flops() > 0
    with pytest.raises(ValueError, match="made for 32×32 inputs, got 40×40"):
        model(torch.randn(1, 3, 40, 40))


@pytest.mark.parametrize("family", sorted(CONVNETS))
def test_convnet_trains_and_round_trips(family, tmp_path):
    arch, kwargs = CONVNETS[family]
    overlay = _local_base(tmp_path, arch, kwargs)
    cfg = dict(img_size=32, pad_size=4)
    model = timm.create_model(f"{arch}.vpt", pretrained=True, pretrained_cfg_overlay=overlay,
                              peft_cfg=cfg, **kwargs)
    torch.manual_seed(1)
    img, target = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    before = model.vpt.left_right.detach().clone()
    model, losses = _train(model, img, target)
    assert losses[-1] < 0.7 * losses[0]
    assert not torch.equal(before, model.vpt.left_right)
    timm_peft.save_pretrained(model, tmp_path / "adapter")
    again = timm.create_model(f"{arch}.vpt", pretrained=True, pretrained_cfg_overlay=overlay,
                              peft_cfg=cfg, **kwargs).eval()
    timm_peft.load_adapter(again, tmp_path / "adapter")
    assert torch.equal(again.vpt.top_bottom, model.vpt.top_bottom)
    with torch.no_grad():
        assert torch.equal(again(img), model(img))
    base = timm_peft.unload(again)
    assert type(base).__module__.startswith("timm.models.") and not hasattr(base, "vpt")


def test_convnet_zero_border_is_the_base_and_projection_is_refused():
    torch.manual_seed(0)
    base = timm.create_model(CONVNETS["resnet"][0], **CONVNETS["resnet"][1]).eval()
    model = timm_peft.apply_method(copy.deepcopy(base), "vpt", dict(img_size=32, pad_size=0)).eval()
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(img), base(img))
    with pytest.raises(ValueError, match="projection_dim applies to prompt tokens"):
        timm_peft.apply_method(timm.create_model("resnet18"), "vpt", dict(projection_dim=8))
