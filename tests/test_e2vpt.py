"""E²VPT: key-value prompt attention, visual prompts with masks, pruning, rewinding, pruned export."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention

import timm_peft
from timm_peft.methods.e2vpt import (add_kv_prompt, remove_kv_prompt, select_segments,
                                     select_tokens)


# ----------------------------------------------------------------------------------------------
# key-value prompt attention against an explicit softmax(Q·[P;K]ᵀ/√d)·[P;V]
# ----------------------------------------------------------------------------------------------

def _explicit_kv_attention(attn, x, pk, pv, bias=None):
    """softmax(Q [P_K; K]^T / sqrt(d_h) + bias) [P_V; V], heads concatenated, then proj."""
    B, N, C = x.shape
    H = attn.num_heads
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q, k, v = qkv.split(qkv.shape[-1] // 3, dim=-1)
    hd = q.shape[-1] // H
    q, k, v = (t.reshape(B, N, H, hd).transpose(1, 2) for t in (q, k, v))
    k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if bias is not None:
        logits = logits + bias
    out = logits.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, N, H * hd))


@pytest.mark.parametrize("share_kv", [True, False])
def test_kv_attention_matches_explicit_formula(share_kv):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 7, 32)
    plain = attn(x)
    prompt = add_kv_prompt(attn, num_tokens=3, share_kv=share_kv)
    assert type(attn).__name__ == "KVPromptAttention" and isinstance(attn, Attention)
    assert prompt.key.shape == (4, 3, 8)
    assert (prompt.value is None) == share_kv
    pv = prompt.key if share_kv else prompt.value
    ref = _explicit_kv_attention(attn, x, prompt.key, pv)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=0)
    assert not torch.allclose(attn(x), plain, atol=1e-3)  # the prompts do change the output
    # masks over the image keys are padded: prompt keys stay visible to every query
    keep = torch.rand(2, 1, 7, 7) > 0.3
    keep[..., 0] = True
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~keep, float("-inf"))
    pad = torch.zeros(2, 1, 7, 3)
    ref = _explicit_kv_attention(attn, x, prompt.key, pv, torch.cat([pad, additive], -1))
    torch.testing.assert_close(attn(x, attn_mask=keep), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn(x, attn_mask=additive), ref, atol=1e-5, rtol=0)
    causal = torch.zeros(7, 7).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    ref = _explicit_kv_attention(attn, x, prompt.key, pv, torch.cat([torch.zeros(7, 3), causal], -1))
    torch.testing.assert_close(attn(x, is_causal=True), ref, atol=1e-5, rtol=0)
    remove_kv_prompt(attn)
    assert type(attn) is Attention and not hasattr(attn, "kv_prompt")
    torch.testing.assert_close(attn(x), plain)


def test_kv_window_attention_matches_explicit_formula():
    torch.manual_seed(0)
    attn = WindowAttention(16, num_heads=2, window_size=3).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table)
    num_win, B, N = 4, 2, 9
    x = torch.randn(B * num_win, N, 16)
    shift = torch.zeros(num_win, N, N).masked_fill(torch.rand(num_win, N, N) > 0.7, -100.0)
    plain = attn(x, mask=shift)
    prompt = add_kv_prompt(attn, num_tokens=2)
    rel = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
    rel = rel.view(N, N, 2).permute(2, 0, 1)  # (heads, N, N)
    bias = (rel.unsqueeze(0) + shift.unsqueeze(1)).repeat(B, 1, 1, 1)  # window index is inner
    bias = torch.cat([torch.zeros(B * num_win, 2, N, 2), bias], -1)  # prompt keys: no bias, no mask
    ref = _explicit_kv_attention(attn, x, prompt.key, prompt.key, bias)
    torch.testing.assert_close(attn(x, mask=shift), ref, atol=1e-5, rtol=0)
    remove_kv_prompt(attn)
    torch.testing.assert_close(attn(x, mask=shift), plain)


def test_kv_prompt_rejects_other_attention_modules():
    class MyAttention(Attention):
        pass
    with pytest.raises(TypeError, match="MyAttention"):
        add_kv_prompt(MyAttention(32, num_heads=4), 2)


# ----------------------------------------------------------------------------------------------
# selection rules
# ----------------------------------------------------------------------------------------------

def test_token_and_segment_selection_rules():
    scores = torch.tensor([[0.3, 0.1, 0.4, 0.2], [1.0, 2.0, 3.0, 4.0]])
    assert select_tokens(scores, 0.5).tolist() == [[True, False, True, False], [False, False, True, True]]
    assert select_tokens(scores, 0.99).sum(1).tolist() == [1, 1]  # at least one token per layer
    seg = torch.arange(16.0).reshape(2, 4, 2).flip(-1)
    keep_t = torch.tensor([[True, False, True, True], [True, True, True, True]])
    keep_s = select_segments(seg, keep_t, 0.5)
    assert not keep_s[0, 1].any()  # segments of a pruned token are pruned
    assert keep_s.sum((1, 2)).tolist() == [3, 4]
    # the lowest-scoring half of the surviving segments goes
    assert keep_s[1].flatten().tolist() == [False, False, False, False, True, True, True, True]
