"""Many tasks on one frozen backbone: named adapters, switching, the plain base, mixed batches.

Runs offline on a CPU in seconds: the base is a small randomly initialised ViT (no
pretrained weights can be downloaded here; pass ``--pretrained`` with internet access to use
timm's weights at full size). Each step checks what it claims against an independent
computation, so the script fails loudly if any of it stops being true::

    python examples/many_tasks.py
    python examples/many_tasks.py --model vit_small_patch16_224.augreg_in21k_ft_in1k --pretrained
"""
from __future__ import annotations

import argparse
import tempfile

import timm
import torch

import timm_peft


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--pretrained", action="store_true")
    args = p.parse_args()
    size = {} if args.pretrained else dict(img_size=64, patch_size=16, depth=4)
    img = 224 if args.pretrained else 64
    torch.manual_seed(0)

    # one backbone, three tasks: SSF for 10 classes ("default"), SSF for 5, VPT for 3
    model = timm.create_model(f"{args.model}.ssf", pretrained=args.pretrained, num_classes=10,
                              **size).eval()
    timm_peft.add_adapter(model, "flowers", num_classes=5)
    timm_peft.add_adapter(model, "pets", method="vpt", peft_cfg=dict(num_prompts=5), num_classes=3)
    for name, a in timm_peft.get_adapters(model).items():
        print(f"{name:8s} {a.method:4s} {a.num_classes:3d} classes, "
              f"{sum(t.numel() for t in a.state.values()):,d} values")

    # training one task: switch, then build the optimiser (only that adapter trains)
    timm_peft.set_adapter(model, "flowers")
    timm_peft.print_trainable_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(8, 3, img, img), torch.randint(0, 5, (8,))
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    # each task alone
    batch = torch.randn(6, 3, img, img)
    alone = {}
    with torch.no_grad():
        for name in timm_peft.get_adapters(model):
            with timm_peft.using_adapter(model, name):
                alone[name] = model(batch)

    # a mixed batch of the two SSF tasks in one backbone pass (heads of 10 and 5 classes)
    names = ["default", "flowers", "flowers", "default", "flowers", "default"]
    with torch.no_grad(), timm_peft.route(model, names) as r:
        logits = model(batch)
    for i, name in enumerate(names):
        n = int(r.num_classes[i])
        assert torch.allclose(logits[i, :n], alone[name][i], atol=1e-5), (i, name)
        assert torch.isinf(logits[i, n:]).all()
    print("routed batch:", logits.argmax(-1).tolist(), "equals each adapter alone")

    # the plain base, and nothing of the base was changed by all of the above
    plain = timm.create_model(args.model, pretrained=args.pretrained, num_classes=10, **size).eval()
    with timm_peft.disable_adapter(model), torch.no_grad():
        if not args.pretrained:  # a random base: give the reference the same weights
            plain.load_state_dict(model.state_dict())
        assert torch.equal(model(batch), plain(batch))
    print("disable_adapter: the plain timm model")

    # save every adapter, then serve them from a fresh model of another method
    with tempfile.TemporaryDirectory() as d:
        timm_peft.save_pretrained(model, d)
        fresh = timm.create_model(f"{args.model}.linear", pretrained=args.pretrained,
                                  num_classes=10, **size).eval()
        if not args.pretrained:
            fresh.load_state_dict(plain.state_dict())
        for name in ("default", "flowers", "pets"):
            timm_peft.load_adapter(fresh, f"{d}/{name}", adapter_name=name + "_loaded")
            with timm_peft.using_adapter(fresh, name + "_loaded"), torch.no_grad():
                assert torch.allclose(fresh(batch), alone[name], atol=1e-5), name
    print("saved and reloaded: every adapter computes what it did")


if __name__ == "__main__":
    main()
