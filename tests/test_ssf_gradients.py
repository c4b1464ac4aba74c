"""SSF's fused training paths against plain autograd (the fast subset of
``benchmarks/ssf_gradients.py``, which sweeps the smallest arch of every timm module).

Each case is one training step of ``<arch>.ssf`` against a copy whose every scale-shift is the
plain formula and whose blocks run timm's forward: the same logits and gradients. The models
are chosen for what follows their sites: an in-place ``+=`` after a conv (Twins' PosConv), an
in-place add on a Linear's output (NaFlexViT's position embedding), in-place activations after
convs (squeeze-excite), moved residual adds (ViT), channels-last MLPs (ConvNeXt), windows
(Swin).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm_peft
from benchmarks.ssf_gradients import RTOL, compare, plain_reference

CASES = {
    "twins (conv output += in forward)": ("twins_svt_small", 64, dict(depths=(1, 1, 1, 1))),
    "naflexvit (Linear output add_ in forward)": ("naflexvit_base_patch16_parfac_gap", 32,
                                                  dict(depth=1, embed_dim=32, num_heads=2)),
    "mobilenetv3 (SE, in-place activations)": ("mobilenetv3_small_050", 64, {}),
    "vit (residual adds in the branches)": ("vit_tiny_patch16_224", 32,
                                            dict(img_size=32, depth=2)),
    "convnext (residual add into the channels-last fc2)": (
        "convnext_atto", 64, dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), conv_mlp=False)),
    "swin": ("swin_tiny_patch4_window7_224", 32, dict(img_size=32, embed_dim=16, depths=(1, 1),
                                                      num_heads=(2, 4), window_size=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_ssf_training_matches_plain_autograd(case):
    arch, size, kwargs = CASES[case]
    res = compare(arch, input_size=size, **kwargs)
    assert res["sites"] > 0 and not res["missing"], res
    assert res["out_err"] <= RTOL and res["grad_err"] <= RTOL, res


class _Hostile(nn.Module):
    """In-place writes after sites, in forward code rather than modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y[:, :4] *= 2.0                         # a view of a conv site's output, written
        y += 1.0                                # the output itself
        t = y.flatten(2).transpose(1, 2)        # (B, N, C): views of it
        h = self.fc1(t)
        F.gelu(h).sum()                         # read, not written
        h.relu_()                               # a Linear site's output, written
        z = self.fc2(h)
        z.unsqueeze(0)[0].sub_(0.5)             # a view's view
        return self.head(z.mean(1))

    def get_classifier(self) -> nn.Module:
        return self.head


def test_inplace_writes_in_forward_code_keep_exact_gradients():
    """A model whose forward writes its sites' outputs in place (no module says so): fused
    training neither fails nor differs from plain autograd."""
    torch.manual_seed(0)
    model = timm_peft.apply_method(_Hostile(), "ssf")
    ref = plain_reference(model)
    x, probe = torch.randn(2, 3, 5, 5), torch.randn(2, 3)
    grads = []
    for m in (model, ref):
        (m(x) * probe).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 2 * 3 + 2  # γ, β of conv, fc1, fc2; the head
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=1e-4, atol=1e-5, msg=n)
