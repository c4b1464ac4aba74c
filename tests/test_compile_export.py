"""Compile / export support per method, kept true against the README's "Performance" table.

:data:`SUPPORT` is the table in the README; :func:`test_readme_table_is_support` parses the
README and fails when the two differ, and every other test here checks one cell against the
eager model (values and one training step's gradients, to float tolerance). A cell is ``yes``
(works and matches eager), ``refused`` (TorchScript only: raises the clear error naming the
method) or ``no`` (fails today; the test asserts it still fails, so fixing it forces the README
to be updated). ONNX: ``torch.onnx.export(dynamo=True)`` (needs ``onnx`` and ``onnxscript``, in
the dev extra), the graph run by onnx's reference evaluator.
"""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_peft  # noqa: F401  (registers the methods)
from timm_peft.deq import DEQConvergenceWarning

COLUMNS = ("eager", "torch.compile fullgraph", "torch.export", "TorchScript", "ONNX")
#: mirrors the README table (method -> cell per column)
SUPPORT: dict[str, tuple[str, ...]] = {
    "linear": ("yes", "yes", "yes", "yes", "yes"),
    "bias": ("yes", "yes", "yes", "yes", "yes"),
    "partial": ("yes", "yes", "yes", "yes", "yes"),
    "full": ("yes", "yes", "yes", "yes", "yes"),
    "ssf": ("yes", "yes", "yes", "refused", "yes"),
    "vpt": ("yes", "yes", "yes", "refused", "yes"),
    "vpt_shallow": ("yes", "yes", "yes", "refused", "yes"),
    "e2vpt": ("yes", "yes", "yes", "refused", "yes"),
    "lion": ("yes", "yes", "yes", "refused", "no"),
    "adapter": ("yes", "yes", "yes", "refused", "yes"),
    "adaptformer": ("yes", "yes", "yes", "refused", "yes"),
    "lora": ("yes", "yes", "yes", "refused", "yes"),
    "mlp3": ("yes", "yes", "yes", "refused", "yes"),
    "sidetune": ("yes", "yes", "yes", "refused", "yes"),
}
#: tiny configs: the method name in the table -> (registered method, peft_cfg)
CASES = {
    "linear": ("linear", None), "bias": ("bias", None), "partial": ("partial", None),
    "full": ("full", None), "ssf": ("ssf", None),
    "vpt": ("vpt", dict(num_prompts=4)), "vpt_shallow": ("vpt_shallow", dict(num_prompts=4)),
    "e2vpt": ("e2vpt", dict(num_prompts=4, num_kv_prompts=3)),
    # the default solver_loop ("auto"): masked while traced, early exit in eager
    "lion": ("lion", dict(max_iter=3, eval_max_iter=3, backward_max_iter=3, p2_width=16)),
    "adapter": ("adapter", dict(placement="houlsby", bottleneck=8)),
    "adaptformer": ("adaptformer", dict(bottleneck=8)), "lora": ("lora", dict(r=4)),
    "mlp3": ("mlp3", None), "sidetune": ("sidetune", dict(side_channels=(8, 16), side_pool=2)),
}
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_table() -> dict[str, tuple[str, ...]]:
    """The support table under the README's "Performance" section, as ``SUPPORT`` is written."""
    text = README.read_text(encoding="utf-8").split("## Performance", 1)[1].split("\n## ", 1)[0]
    header = "| method | " + " | ".join(COLUMNS) + " |"
    assert header in text, f"README Performance section lacks the support table {header!r}"
    rows = {}
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        name, *cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.sub(r"`", "", name)
        rows[name] = tuple(re.sub(r"[*`]", "", c).split()[0].lower() for c in cells)
    return rows


def test_readme_table_is_support():
    assert readme_table() == SUPPORT


def build(case: str) -> torch.nn.Module:
    method, cfg = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(f"vit_tiny_patch16_224.{method}", img_size=32, depth=1,
                              num_classes=5, peft_cfg=cfg)
    # non-trivial adapter values: identity-initialised adapters would hide wrong gradients
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


X, Y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 3])


def step(model, x=X):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    return (out.detach(), *torch.autograd.grad(F.cross_entropy(out, Y), params))


def close(a, b):
    return all(torch.allclose(u, v, rtol=1e-4, atol=1e-5) for u, v in zip(a, b)) and len(a) == len(b)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DEQConvergenceWarning)
        yield


@pytest.mark.parametrize("case", SUPPORT)
def test_compile_fullgraph_matches_eager(case):
    expected = SUPPORT[case][COLUMNS.index("torch.compile fullgraph")]
    model = build(case)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    if expected == "no":
        with pytest.raises(Exception):
            compiled(X)
        return
    # one graph (forward and backward of a training step) keeps this at a few seconds per case
    eager = step(model)
    got = step(compiled)
    assert close(got, eager)  # the output, then every trainable parameter's gradient
    assert any(float(g.abs().max()) > 0 for g in got[1:])


@pytest.mark.parametrize("case", SUPPORT)
def test_export_matches_eager(case):
    expected = SUPPORT[case][COLUMNS.index("torch.export")]
    model = build(case)
    if expected == "no":
        with pytest.raises(Exception):
            torch.export.export(model, (X,))
        return
    exported = torch.export.export(model, (X,)).module()
    x2 = torch.randn_like(X)
    with torch.no_grad():
        for x in (X, x2):
            assert torch.allclose(exported(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", SUPPORT)
def test_torchscript(case):
    expected = SUPPORT[case][COLUMNS.index("TorchScript")]
    model = build(case)
    if expected == "refused":
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile \w+: the "
                                               r"'\w+' PEFT method changed"):
            torch.jit.script(model)
        return
    if expected == "no":
        with pytest.raises(Exception):
            torch.jit.script(model)
        return
    scripted = torch.jit.script(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.allclose(scripted(X), model(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", SUPPORT)
def test_onnx_matches_eager(case):
    expected = SUPPORT[case][COLUMNS.index("ONNX")]
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install -e .[dev])")
    from onnx.reference import ReferenceEvaluator
    model = build(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notices
        if expected == "no":
            with pytest.raises(Exception):
                torch.onnx.export(model, (X,), dynamo=True, verbose=False)
            return
        program = torch.onnx.export(model, (X,), dynamo=True, verbose=False)
    run = ReferenceEvaluator(program.model_proto)
    name = program.model_proto.graph.input[0].name
    with torch.no_grad():
        want = model(X)
    got = torch.from_numpy(run.run(None, {name: X.numpy()})[0])
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
