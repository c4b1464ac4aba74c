"""Shared fixtures: tiny timm configs and a local 'pretrained' weight file (no network)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import timm_peft  # noqa: E402,F401  (installs the timm integration)

#: keyword arguments that make vit_tiny_patch16_224 tiny enough for fast tests
TINY_VIT = dict(img_size=32, depth=2)


@pytest.fixture
def vit_weights(tmp_path):
    """A randomly initialised vit_tiny saved as a local safetensors 'pretrained' file."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    path = tmp_path / "vit_tiny_weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def local_overlay(path):
    """pretrained_cfg_overlay that makes timm's own pretrained path read a local file."""
    return dict(file=str(path), custom_load=False)


def move_trainable(model, seed=0):
    """Move every trainable tensor away from its initial value (seeded), so an adapter's values
    differ from a fresh build's; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen))
    return model.eval()
