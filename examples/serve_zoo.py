"""Serve a zoo: three adapters of two methods on one backbone, over HTTP, with Ray Serve.

Needs the serving extra (``pip install "timm_peft[serve]"``). Runs offline on a CPU in about a
minute: the base is a small randomly initialised ViT saved to a local weights file, which the
adapters record and the server loads through timm's pretrained path, as it would load real
weights. The script trains nothing; it gives each adapter random values, saves it with its class
names, starts the server, sends a burst of requests for all three adapters at once and checks
every answer against the adapter reloaded on its own::

    python examples/serve_zoo.py

The same server from the command line, on real weights::

    timm-peft serve --model vit_base_patch16_224.augreg2_in21k_ft_in1k \\
        --adapters birds=runs/birds/adapter hf-hub:my-org/vit-b16-ssf-flowers
"""
from __future__ import annotations

import base64
import io
import json
import socket
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

import timm_peft

ARCH = "vit_small_patch16_224"
SIZE = dict(img_size=64, patch_size=16, depth=4)  # small enough for a CPU
TASKS = {"birds": ("ssf", 10), "flowers": ("ssf", 5), "pets": ("vpt", 3)}  # id -> method, classes


def make_zoo(root: Path) -> tuple[Path, dict[str, str]]:
    """A base weights file and one saved adapter per task (random values, named classes)."""
    torch.manual_seed(0)
    weights = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(ARCH, **SIZE).state_dict().items()},
              str(weights))
    overlay = dict(file=str(weights), custom_load=False)  # timm's pretrained path, from a file
    dirs = {}
    for task, (method, classes) in TASKS.items():
        model = timm.create_model(f"{ARCH}.{method}", pretrained=True, num_classes=classes,
                                  pretrained_cfg_overlay=overlay, **SIZE)
        with torch.no_grad():  # stands in for training
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
        dirs[task] = str(timm_peft.save_pretrained(
            model, root / task, label_names=[f"{task}-{c}" for c in range(classes)]))
    return weights, dirs


def post(url: str, adapter: str, image: bytes) -> dict:
    body = json.dumps(dict(adapter=adapter, image=base64.b64encode(image).decode(), top_k=2))
    req = urllib.request.Request(f"{url}/predict", body.encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return json.loads(r.read())


def main() -> None:
    import ray
    from ray import serve

    from timm_peft.serve import build_app, start

    root = Path(tempfile.mkdtemp())
    weights, dirs = make_zoo(root)
    g = torch.Generator().manual_seed(1)
    images = []
    for _ in range(4):  # PNG files, as clients send them
        buf = io.BytesIO()
        pixels = (torch.rand(80, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(buf, format="PNG")
        images.append(buf.getvalue())

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = build_app(ARCH, dirs, pretrained_file=str(weights), model_kwargs=SIZE,
                        max_batch_size=16, batch_wait_ms=100)
        url = start(app, port=port)
        print(f"serving {sorted(get(url, '/adapters')['configured'])} at {url}")

        # a burst for all three adapters at once: mixed batches, SSF adapters routed together
        burst = [(task, images[i % len(images)]) for i, task in enumerate(list(TASKS) * 4)]
        before = get(url, "/stats")
        with ThreadPoolExecutor(len(burst)) as pool:
            answers = list(pool.map(lambda a: post(url, *a), burst))
        after = get(url, "/stats")
        for (task, _), ans in list(zip(burst, answers))[:3]:
            print(f"{task:8s} -> {[(p['label'], round(p['score'], 3)) for p in ans['predictions']]}")

        # every answer is what the adapter computes when reloaded on its own
        overlay = dict(file=str(weights), custom_load=False)
        for task in TASKS:
            model = timm_peft.from_pretrained(dirs[task], pretrained_cfg_overlay=overlay).eval()
            transform = create_transform(**resolve_data_config({}, model=model))
            for (t, image), ans in zip(burst, answers):
                if t != task:
                    continue
                with torch.no_grad():
                    x = transform(Image.open(io.BytesIO(image)).convert("RGB"))
                    probs = model(x[None]).softmax(-1)[0]
                score, index = probs.topk(2)
                got = [(p["index"], p["score"]) for p in ans["predictions"]]
                assert [i for i, _ in got] == index.tolist(), (task, got, index)
                assert torch.allclose(torch.tensor([s for _, s in got]), score, atol=1e-4)
                assert ans["predictions"][0]["label"] == f"{task}-{index[0]}"
        passes = after["backbone_passes"] - before["backbone_passes"]
        print(f"{len(burst)} requests for {len(TASKS)} adapters answered as each adapter alone, "
              f"in {passes} backbone passes")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
