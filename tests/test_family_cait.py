"""The CaiT family (``timm_peft/families/cait.py``): token prompts in front of the patches of
the self-attention blocks, Partial-k over both kinds of blocks, listed by list_models."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_peft
from timm_peft.families import get_family


def _img(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


CAIT = dict(img_size=32, depth=2)


@pytest.mark.parametrize("method", ["vpt", "vpt_shallow"])
def test_cait_prompts_join_the_patches_and_leave_the_output(method):
    torch.manual_seed(0)
    base = timm.create_model("cait_xxs24_224", num_classes=3, **CAIT).eval()
    with torch.no_grad():  # layer scale starts at 1e-5: make the blocks matter
        for p in base.parameters():
            p.add_(0.2 * torch.randn_like(p))
    assert get_family(base).name == "cait"
    x = _img(32)
    zero = timm_peft.apply_method(copy.deepcopy(base), method, dict(num_prompts=0)).eval()
    model = timm_peft.apply_method(copy.deepcopy(base), method, dict(num_prompts=4)).eval()
    with torch.no_grad():
        torch.testing.assert_close(zero(x), base(x), atol=1e-5, rtol=1e-5)
        assert (model(x) - base(x)).abs().max() > 1e-3
        assert model.forward_features(x).shape == base.forward_features(x).shape
        inter = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        plain = base.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert [t.shape for t in inter] == [t.shape for t in plain]
        y = model(x)
        model.vpt.embeddings.copy_(model.vpt.embeddings.flip(1))  # prompts carry no position
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
    model.train()
    F.cross_entropy(model(x), torch.arange(2)).backward()
    assert model.vpt.embeddings.grad.abs().sum() > 0


def test_cait_partial_trains_the_class_attention_blocks_last():
    model = timm.create_model("cait_xxs24_224.partial", num_classes=3,
                              peft_cfg=dict(num_blocks=2), **CAIT)
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"blocks_token_only", "norm", "head"}




def test_cait_is_listed_for_every_token_prompt_method_and_partial():
    for method in ("vpt", "vpt_shallow", "e2vpt", "partial", "ssf", "lion"):
        assert f"cait_xxs24_224.{method}" in timm_peft.list_models("cait_*", method=method)
