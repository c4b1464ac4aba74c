"""Families added for issue 13 and what they let methods do: LION on every classifier a family
names (two heads, one per branch, VOLO's auxiliary head), E²VPT on
parallel-block ViTs, SSF's reported sites on Swin-V2, torch.fx's clear error, and list_models
listing only what builds and trains."""
import copy
import random
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_peft
from timm_peft.families import get_family
from timm_peft.layers.swap import restore_class

LION_SMALL = dict(p1_width=4, p2_width=8, norm_groups=2)


def _img(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _lion(arch, size, **kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = timm.create_model(arch, num_classes=3, **kwargs).eval()
    model = timm_peft.apply_method(copy.deepcopy(base), "lion", LION_SMALL).eval()
    x = _img(size)
    with torch.no_grad():  # identity prompts: LION starts as the frozen backbone, all heads
        torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=0)
        for p in model.lion.parameters():  # move P1 and P2 away from their zero read-outs
            p.add_(0.05 * torch.randn_like(p))
    return base, model, x


def _blend(lion, feats):
    """P2's blend written out (identity prompts): F + β₂·R₂(F), with the P2 of F's width."""
    width = feats.shape[-1]
    if width == lion.p2.proj.out_features:
        p2, gate = lion.p2, lion.gate2
    else:
        p2, gate = lion.p2_extra[str(width)], lion.gate2_extra[str(width)]
    return feats + gate.logits.softmax(0)[1] * p2(feats)


def _backward_reaches_every_trainable(model, x):
    model.train()
    out = model(x)
    F.cross_entropy(out, torch.arange(x.shape[0]) % 3).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_lion_on_a_distilled_vit_blends_both_tokens_for_both_heads():
    base, model, x = _lion("deit_tiny_distilled_patch16_224", 32, img_size=32, depth=2)
    lion = model.lion
    with torch.no_grad():
        feats = base.forward_features(lion.prompt_input(x))
        want = (base.head(_blend(lion, feats[:, 0])) + base.head_dist(_blend(lion, feats[:, 1]))) / 2
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        # pre-logits are the blend of what the model's own pre-logits are
        torch.testing.assert_close(
            model.forward_head(model.forward_features(x), pre_logits=True),
            _blend(lion, (feats[:, 0] + feats[:, 1]) / 2), atol=1e-5, rtol=1e-5)
    _backward_reaches_every_trainable(model, x)


def test_lion_two_heads_on_pooled_features():
    # LeViT and EfficientFormer (the coverage sweep's) both read one pooled vector with two heads
    base, model, x = _lion("levit_128s", 64, img_size=64)
    lion = model.lion
    with torch.no_grad():
        pooled = base.forward_head(base.forward_features(lion.prompt_input(x)), pre_logits=True)
        z = _blend(lion, pooled)
        torch.testing.assert_close(model(x), (base.head(z) + base.head_dist(z)) / 2,
                                   atol=1e-5, rtol=1e-5)
    _backward_reaches_every_trainable(model, x)


def test_lion_on_crossvit_has_one_p2_per_branch_width():
    base, model, x = _lion("crossvit_tiny_240", 240, img_size=240, depth=((1, 1, 0),))
    lion = model.lion
    assert sorted(lion.feature_dims()) == sorted({h.in_features for h in base.head})
    with torch.no_grad():
        xs = base.forward_features(lion.prompt_input(x))
        logits = [head(_blend(lion, t[:, 0])) for head, t in zip(base.head, xs)]
        torch.testing.assert_close(model(x), torch.stack(logits).mean(0), atol=1e-5, rtol=1e-5)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pre, torch.cat([_blend(lion, t[:, 0]) for t in xs], dim=1),
                                   atol=1e-5, rtol=1e-5)
    _backward_reaches_every_trainable(model, x)


def test_lion_on_volo_reaches_the_auxiliary_token_head():
    from timm_peft.methods.lion import LionClassifier
    base, model, x = _lion("volo_d1_224", 64, img_size=64)
    assert get_family(model).name == "volo"
    lion = model.lion
    with torch.no_grad():
        feats = base.forward_features(lion.prompt_input(x))
        tokens = feats[:, 1:]  # P2 on every token the auxiliary head reads
        aux = base.aux_head(_blend(lion, tokens.reshape(-1, tokens.shape[-1])).view(tokens.shape))
        want = base.head(_blend(lion, feats[:, 0])) + 0.5 * aux.max(1)[0]
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        y = model(x)
        restore_class(model.aux_head, LionClassifier)  # what a family without aux_head did
        assert (model(x) - y).abs().max() > 1e-4
    _, model, x = _lion("volo_d1_224", 64, img_size=64)
    _backward_reaches_every_trainable(model, x)


def test_lion_unload_restores_every_classifier():
    base, model, x = _lion("deit_tiny_distilled_patch16_224", 32, img_size=32, depth=2)
    plain = timm_peft.unload(model)
    assert type(plain.head) is type(base.head) and type(plain.head_dist) is type(base.head_dist)
    with torch.no_grad():
        assert torch.equal(plain(x), base(x))


# ----------------------------------------------------------------------------------------------
# E²VPT on parallel-block ViTs
# ----------------------------------------------------------------------------------------------

def test_e2vpt_on_parallel_blocks_prompts_every_branch():
    torch.manual_seed(0)
    kwargs = dict(img_size=32, depth=2, embed_dim=32, num_heads=2)
    base = timm.create_model("vit_small_patch16_18x2_224", num_classes=3, **kwargs).eval()
    x = _img(32)
    zero = timm_peft.apply_method(copy.deepcopy(base), "e2vpt",
                                  dict(num_prompts=0, num_kv_prompts=0)).eval()
    with torch.no_grad():
        assert torch.equal(zero(x), base(x))
    model = timm_peft.apply_method(copy.deepcopy(base), "e2vpt", dict(num_kv_prompts=3))
    branches = [branch.attn for b in model.blocks for branch in b.attns]
    assert len(branches) == 4 and all(hasattr(a, "kv_prompt") for a in branches)
    _backward_reaches_every_trainable(model, x)
    with pytest.raises(ValueError, match="e2vpt.*key-value prompts"):  # fused attention
        timm.create_model("vit_base_patch16_xp_224.e2vpt", **kwargs)


# ----------------------------------------------------------------------------------------------
# SSF on Swin-V2: the sites its attention bypasses are reported, never trained silently
# ----------------------------------------------------------------------------------------------

def test_swinv2_ssf_reports_the_bypassed_qkv_and_trains_every_site():
    from timm_peft.methods.ssf import ssf_sites
    kwargs = dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(2, 4), window_size=4)
    base = timm.create_model("swinv2_tiny_window8_256", num_classes=3, **kwargs)
    skipped = dict(ssf_sites(base, skipped=True))
    assert {n for n in skipped if n.endswith("attn.qkv")} == {
        "layers.0.blocks.0.attn.qkv", "layers.1.blocks.0.attn.qkv"}
    assert "F.linear on qkv.weight" in skipped["layers.0.blocks.0.attn.qkv"]
    assert any(".cpb_mlp." in n for n in skipped)
    with pytest.warns(UserWarning, match="SSF skips"):
        model = timm.create_model("swinv2_tiny_window8_256.ssf", num_classes=3, **kwargs)
    assert not any(".qkv.ssf" in n for n, _ in model.named_parameters())
    _backward_reaches_every_trainable(model, _img(32))


# ----------------------------------------------------------------------------------------------
# torch.fx: a clear error naming the method, plain-timm computation still traces
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, method", [
    ("vit_tiny_patch16_224.vpt", dict(img_size=32, depth=2), "vpt"),
    ("resnet10t.vpt", {}, "vpt"),
    ("resnet10t.ssf", {}, "ssf"),
    ("resnet10t.lion", {}, "lion"),
    ("vit_tiny_patch16_224.e2vpt", dict(img_size=32, depth=2), "vpt|e2vpt"),
])
def test_fx_symbolic_trace_names_the_blocking_method(name, kwargs, method):
    model = timm.create_model(name, num_classes=3, **kwargs)
    with pytest.raises(RuntimeError, match=rf"torch.fx.symbolic_trace.*'({method})' PEFT method"
                                           r".*merge_and_unload.*torch.compile / torch.export"):
        torch.fx.symbolic_trace(model)


@pytest.mark.parametrize("name", ["resnet10t.linear", "resnet10t.bias"])
def test_fx_traces_methods_that_keep_the_timm_computation(name):
    model = timm.create_model(name, num_classes=3).eval()
    traced = torch.fx.symbolic_trace(model)
    x = _img(32)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_fx_traces_a_merged_model():
    model = timm.create_model("resnet10t.ssf", num_classes=3)
    plain = timm_peft.merge_and_unload(model).eval()
    torch.fx.symbolic_trace(plain)


# ----------------------------------------------------------------------------------------------
# list_models lists what builds and trains
# ----------------------------------------------------------------------------------------------

def test_list_models_lists_registered_families_only():
    from timm_peft.families import family_of_arch
    for method in ("ssf", "partial", "lion", "vpt", "e2vpt"):
        archs = [n.rsplit(".", 1)[0] for n in timm_peft.list_models(method=method)]
        assert {family_of_arch(a).name for a in archs} - {"generic"} == \
            {family_of_arch(a).name for a in archs}, method
    assert "pit_ti_224.partial" not in timm_peft.list_models("pit_*", method="partial")
    e2vpt = timm_peft.list_models("vit_*", method="e2vpt")
    assert "vit_small_patch16_18x2_224.e2vpt" in e2vpt  # parallel branches of timm Attention
    assert "vit_base_patch16_xp_224.e2vpt" not in e2vpt  # attention fused into the block
    assert "swin_tiny_patch4_window7_224.vpt_shallow" in timm_peft.list_models(
        "swin_*", method="vpt_shallow")
    assert "volo_d1_224.lion" in timm_peft.list_models("volo_*", method="lion")


def _small_listed(method: str, count: int, seed: str) -> list[str]:
    """``count`` archs list_models lists for ``method``, drawn at random among those under 4M
    parameters (counted on the meta device) so that a real CPU build stays fast."""
    names = timm_peft.list_models(method=method)
    rng = random.Random(seed)
    rng.shuffle(names)
    picked = []
    for name in names:
        arch = name.rsplit(".", 1)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                size = sum(p.numel() for p in timm.create_model(arch, device="meta").parameters())
            except Exception:  # noqa: BLE001  the real build below must then fail too
                size = 0
        if size < 4e6:
            picked.append(name)
        if len(picked) == count:
            break
    return picked


@pytest.mark.parametrize("method", ["ssf", "vpt", "vpt_shallow", "e2vpt", "partial", "lion",
                                    "bias", "adapter", "adaptformer", "lora", "mlp3",
                                    "sidetune"])
def test_sampled_listed_archs_build_forward_and_backward(method):
    for name in _small_listed(method, 1, f"{method}-issue-13"):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, num_classes=3)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        x = torch.randn(2, *size)
        _backward_reaches_every_trainable(model, x)


# ----------------------------------------------------------------------------------------------
# pixel prompts on ConvNets bound to input sizes
# ----------------------------------------------------------------------------------------------

def test_pixel_prompts_refuse_a_padded_size_the_model_cannot_take_at_build_time():
    with pytest.raises(ValueError, match=r"make the 64×64 input 74×74 \(pad_size=5\), which "
                                         r"PixelPromptedDLA cannot take.*pad_size"):
        timm.create_model("dla34.vpt", num_classes=3, peft_cfg=dict(img_size=64))
    model = timm.create_model("dla34.vpt", num_classes=3, peft_cfg=dict(img_size=64, pad_size=16))
    _backward_reaches_every_trainable(model, _img(64))
    assert not timm_peft.list_models("dla*", method="vpt")  # the default pad does not fit
    assert "dla34.lion" in timm_peft.list_models("dla*", method="lion")


def test_image_channels_of_a_space_to_depth_stem():
    # TResNet's first conv sees 3·16 channels: the model's own in_chans says 3
    model = timm.create_model("tresnet_m.vpt", num_classes=3,
                              peft_cfg=dict(img_size=64, pad_size=16))
    assert model.vpt.top_bottom.shape[1] == 3
    _backward_reaches_every_trainable(model, _img(64))


def test_train_head_trains_volos_auxiliary_head_too():
    # the family names every classifier; train_head trains them all (was: get_classifier's only)
    model = timm.create_model("volo_d1_224.linear", num_classes=3, img_size=64)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head", "aux_head"}


# ----------------------------------------------------------------------------------------------
# Swin-V2: prompts as extra keys and values of every window (cosine attention)
# ----------------------------------------------------------------------------------------------

def test_swinv2_window_attention_with_extra_keys_matches_written_out_attention():
    import math
    from timm.models.swin_transformer_v2 import WindowAttention
    from timm_peft.layers.kv_attention import ExtraKVWindowAttentionV2
    from timm_peft.layers.swap import swap_class
    torch.manual_seed(0)
    attn = WindowAttention(16, window_size=(2, 2), num_heads=2).eval()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(6, 4, 16)  # 3 images x 2 windows of 2x2 tokens
    mask = torch.zeros(2, 4, 4)
    mask[1, :2, 2:] = mask[1, 2:, :2] = -100.0  # a shifted window's mask
    ek, ev = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)  # 3 extra keys/values per head
    with torch.no_grad():
        want = []
        for m in (None, mask):
            qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
            q, k, v = qkv.reshape(6, 4, 3, 2, 8).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([ek.expand(6, -1, -1, -1), k], 2), torch.cat([ev.expand(6, -1, -1, -1), v], 2)
            cos = (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-2, -1)
            logits = cos * torch.clamp(attn.logit_scale, max=math.log(100)).exp()
            table = attn.cpb_mlp(attn.relative_coords_table).view(-1, 2)
            rel = 16 * torch.sigmoid(table[attn.relative_position_index.view(-1)].view(4, 4, 2).permute(2, 0, 1))
            logits[..., 3:] += rel  # the window's own keys get the position bias, the extra ones none
            if m is not None:
                logits[..., 3:] += m.repeat(3, 1, 1).unsqueeze(1)
            out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(6, 4, 16)
            want.append(attn.proj(out))
        plain = [attn(x), attn(x, mask=mask)]
        swap_class(attn, ExtraKVWindowAttentionV2)
        got = [attn(x, extra_kv=(ek, ev)), attn(x, mask=mask, extra_kv=(ek, ev))]
        none = [attn(x), attn(x, mask=mask)]  # no extra keys: timm's own forward
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    for n, p in zip(none, plain):
        assert torch.equal(n, p)


@pytest.mark.parametrize("method", ["vpt", "vpt_shallow", "e2vpt"])
def test_prompts_on_swinv2_train_save_and_unload(method, tmp_path):
    kw = dict(img_size=32, window_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
              num_classes=3)
    torch.manual_seed(0)
    base = timm.create_model("swinv2_tiny_window8_256", **kw).eval()
    with torch.no_grad():  # timm starts the post-norms at 0 (every block the identity)
        for stage in base.layers:
            for block in stage.blocks:
                block.norm1.weight.fill_(1.0)
    model = timm_peft.apply_method(copy.deepcopy(base), method, dict(num_prompts=3)).eval()
    x = torch.randn(2, 3, 32, 32)
    _backward_reaches_every_trainable(model, x)
    model.eval()
    d = timm_peft.save_pretrained(model, tmp_path / "a")
    loaded = timm_peft.load_adapter(timm_peft.apply_method(copy.deepcopy(base), method,
                                                           dict(num_prompts=3)).eval(), d)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert not torch.allclose(model(x), base(x))
        assert torch.equal(timm_peft.unload(model)(x), base(x))


# ----------------------------------------------------------------------------------------------
# E²VPT's key-value prompts on EVA (rotary) and BEiT (relative position bias)
# ----------------------------------------------------------------------------------------------

def _written_out(q, k, v, pk, pv, bias=None):
    """softmax([q·P_K; q·K] / √d + [0; bias]) [P_V; V], heads kept apart."""
    b = q.shape[0]
    k = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2)
    v = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2)
    logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if bias is not None:
        logits[..., pk.shape[1]:] += bias
    return logits.softmax(-1) @ v


def test_kv_prompts_on_eva_attention_match_written_out_attention():
    from timm.layers import apply_rot_embed_cat
    from timm.models.eva import EvaAttention
    from timm_peft.methods.e2vpt import add_kv_prompt
    torch.manual_seed(0)
    attn = EvaAttention(32, num_heads=2, qkv_bias=True, num_prefix_tokens=1, qk_norm=False,
                        scale_norm=False, norm_layer=torch.nn.LayerNorm).eval()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x, rope = torch.randn(2, 5, 32), torch.randn(4, 32)  # 1 prefix token + 4 patches
    prompt = add_kv_prompt(attn, num_tokens=3, share_kv=False)
    with torch.no_grad():
        prompt.key.normal_()
        prompt.value.normal_()
        qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], rope)], 2)
        k = torch.cat([k[:, :, :1], apply_rot_embed_cat(k[:, :, 1:], rope)], 2)  # prompts: no rope
        want = attn.proj(_written_out(q, k, v, prompt.key, prompt.value).transpose(1, 2).reshape(2, 5, 32))
        torch.testing.assert_close(attn(x, rope=rope), want, atol=1e-5, rtol=1e-5)


def test_kv_prompts_on_beit_attention_match_written_out_attention():
    from timm.models.beit import Attention as BeitAttention
    from timm_peft.methods.e2vpt import add_kv_prompt
    torch.manual_seed(0)
    attn = BeitAttention(32, num_heads=2, qkv_bias=True, window_size=(2, 2)).eval()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
        attn.relative_position_bias_table.normal_()
    x, shared = torch.randn(2, 5, 32), torch.randn(1, 2, 5, 5)  # class token + 2x2 patches
    prompt = add_kv_prompt(attn, num_tokens=3)
    with torch.no_grad():
        qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
        bias = attn._get_rel_pos_bias() + shared  # the patches' bias; the prompts get none
        want = attn.proj(_written_out(q, k, v, prompt.key, prompt.key, bias).transpose(1, 2).reshape(2, 5, 32))
        torch.testing.assert_close(attn(x, shared_rel_pos_bias=shared), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["eva02_tiny_patch14_224", "beitv2_base_patch16_224"])
def test_e2vpt_on_eva_and_beit_trains_saves_and_unloads(arch, tmp_path):
    kw = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=3)
    cfg = dict(num_prompts=3, num_kv_prompts=2)
    torch.manual_seed(0)
    base = timm.create_model(arch, **kw).eval()
    model = timm_peft.apply_method(copy.deepcopy(base), "e2vpt", cfg)
    x = torch.randn(2, 3, 32, 32)
    _backward_reaches_every_trainable(model, x)
    model.eval()
    d = timm_peft.save_pretrained(model, tmp_path / "a")
    loaded = timm_peft.load_adapter(timm_peft.apply_method(copy.deepcopy(base), "e2vpt", cfg).eval(), d)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(timm_peft.unload(model)(x), base(x))
    assert f"{arch}.e2vpt" in timm_peft.list_models(arch, method="e2vpt")


def test_kv_prompts_on_cait_talking_heads_match_written_out_attention():
    from timm.models.cait import TalkingHeadAttn
    from timm_peft.methods.e2vpt import add_kv_prompt
    torch.manual_seed(0)
    attn = TalkingHeadAttn(32, num_heads=2).eval()
    x = torch.randn(2, 5, 32)
    prompt = add_kv_prompt(attn, num_tokens=3)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
        k = torch.cat([prompt.key.unsqueeze(0).expand(2, -1, -1, -1), k], 2)
        v = torch.cat([prompt.key.unsqueeze(0).expand(2, -1, -1, -1), v], 2)
        logits = torch.einsum("bhqd,bhkd->bqkh", q, k) / 4.0  # (B, N, T+N, heads)
        mixed = F.linear(logits, attn.proj_l.weight, attn.proj_l.bias).softmax(dim=2)
        weights = F.linear(mixed, attn.proj_w.weight, attn.proj_w.bias)
        out = torch.einsum("bqkh,bhkd->bqhd", weights, v).reshape(2, 5, 32)
        torch.testing.assert_close(attn(x), attn.proj(out), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# issue 24: shared modules (alias keys), Partial-k on function group matchers, LION at build
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["bias", "ssf"])
def test_shared_modules_reload_after_training(method, tmp_path):
    # CoaT shares one cpe/crpe per stage among its serial blocks: the state dict names those
    # tensors once per block, the trained ones included
    kw = dict(img_size=32, num_classes=3)
    torch.manual_seed(0)
    model = timm.create_model(f"coat_lite_tiny.{method}", **kw)
    state = model.state_dict(keep_vars=True)
    assert len({id(t) for t in state.values()}) < len(state)  # there are aliases
    keys = model.peft_adapter_keys
    assert len({id(state[k]) for k in keys}) == len(keys)  # one key per trained tensor
    before = timm_peft.base_fingerprint(model)
    fresh = copy.deepcopy(model)
    x = _img(32)
    _backward_reaches_every_trainable(model, x)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert timm_peft.base_fingerprint(model) == before  # training moves no base tensor
    model.eval()
    timm_peft.save_pretrained(model, tmp_path / "a")
    timm_peft.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    # a frozen tensor that does change is still seen, under whichever of its names
    with torch.no_grad():
        next(t for k, t in fresh.state_dict(keep_vars=True).items()
             if ".cpe." in k and not t.requires_grad).add_(1.0)
    assert timm_peft.base_fingerprint(fresh) != before


def test_fingerprint_is_that_of_distinct_tensors():
    from timm_peft.io.format import base_fingerprint
    torch.manual_seed(0)
    model = timm.create_model("resnet10t.bias", num_classes=3)
    want = base_fingerprint(model)
    model.alias = model.layer1  # a second name for every layer1 tensor
    assert len(model.state_dict()) > len(copy.deepcopy(model).layer1.state_dict())
    assert base_fingerprint(model) == want


@pytest.mark.parametrize("arch, last", [("inception_v3", {"Mixed_7c"}),
                                        ("inception_resnet_v2", {"block8", "conv2d_7b"}),
                                        ("hrnet_w18_small", {"stage4", "incre_modules",
                                                             "downsamp_modules", "final_layer"})])
def test_partial_on_function_and_block_types_group_matchers(arch, last):
    assert f"{arch}.partial" in timm_peft.list_models(arch, method="partial")
    model = timm.create_model(f"{arch}.partial", device="meta", num_classes=3)
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained - {"fc", "classif", "classifier"} == last  # the last block, the head


@pytest.mark.parametrize("arch, kwargs, size", [
    ("gemma4_vit_167m", dict(depth=1, embed_dim=32, num_heads=2), 32),  # head takes patch_valid
    ("sequencer2d_s", dict(layers=(1, 1, 1, 1)), 64),  # get_classifier: a pooling head
    ("samvit_base_patch16_224", dict(img_size=32, depth=1, embed_dim=32, num_heads=2,
                                     global_attn_indexes=(0,), window_size=2), 32),
])
def test_lion_where_the_head_pools_or_takes_arguments(arch, kwargs, size):
    torch.manual_seed(0)
    base = timm.create_model(arch, num_classes=3, **kwargs).eval()
    model = timm_peft.apply_method(copy.deepcopy(base), "lion", LION_SMALL).eval()
    x = _img(size)
    with torch.no_grad():  # identity prompts: the frozen backbone
        torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=0)
    _backward_reaches_every_trainable(model, x)


# ----------------------------------------------------------------------------------------------
# the all-modules coverage report and list_models agree
# ----------------------------------------------------------------------------------------------

def _coverage():
    import json
    from benchmarks.coverage import RESULTS
    data = json.loads((RESULTS / "coverage.json").read_text())
    if data["timm"] != timm.__version__:
        pytest.skip(f"coverage.json is of timm {data['timm']}, this is {timm.__version__}")
    return data


def test_coverage_report_has_every_module():
    data = _coverage()
    rows = {r["label"]: r for r in data["rows"]}
    assert {k for k, r in rows.items() if r["section"] == "modules"} == set(timm.list_modules())
    assert {k for k, r in rows.items() if r["section"] == "test archs"} == \
        {a for a in timm.list_models("test_*")}


def test_coverage_report_has_no_failure():
    rows = {r["label"]: r for r in _coverage()["rows"]}
    assert len(rows) >= 40
    failing = [f"{k}.{m}: {c[1]}" for k, r in rows.items() for m, c in r["cells"].items()
               if c[0] not in ("works", "refused")]
    assert not failing


def test_list_models_lists_exactly_the_cells_that_work():
    from benchmarks.coverage import mismatches
    assert mismatches(_coverage()) == {"listed_failing": [], "working_unlisted": []}


def test_sampled_coverage_cells_still_hold():
    # the report is not stale: a few cells of small models, rerun now, say what it says
    from benchmarks.archs import num_params
    from benchmarks.coverage import check
    data = _coverage()
    rng = random.Random("issue-24")
    cells = [(r, m, c[0]) for r in data["rows"] for m, c in r["cells"].items()
             if r["section"] != "variants"]
    rng.shuffle(cells)
    picked = {}
    for r, m, status in cells:
        if status not in picked and num_params(r["arch"]) < 3e6:
            picked[status] = (r, m)
    assert set(picked) == {"works", "refused"}
    for status, (r, m) in picked.items():
        import ast
        got = check(r["arch"], m, ast.literal_eval(r["kwargs"]), r["size"])
        assert got[0] == status, (r["label"], m, got)
