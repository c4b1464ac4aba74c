"""Sharing: local-dir / Hub-cache round trips, push_to_hub, the model card, torch.hub, errors.

The Hub is never contacted: a repo is a hand-built huggingface_hub cache read with
HF_HUB_OFFLINE=1, and push_to_hub runs huggingface_hub's real client against an in-process fake
of the Hub's HTTP API (only the transport is replaced).
"""
import base64
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import ModelCard, constants
import safetensors.torch

import timm_peft
from timm_peft.core import _METHODS, _PRESETS, PeftMethod, iter_family_archs, register_method
from timm_peft.io import (ADAPTER_MARKER, CONFIG_NAME, TIMM_CONFIG_NAME, WEIGHTS_NAME, AdapterError,
                          make_model_card, push_to_hub, resolve_adapter_dir)

from conftest import TINY_VIT, local_overlay, move_trainable

ROOT = Path(__file__).resolve().parents[1]
NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
FILES = sorted(["README.md", CONFIG_NAME, WEIGHTS_NAME, TIMM_CONFIG_NAME])
METHODS = ["linear", "bias", "partial"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _trained(vit_weights, method, seed=0):
    """A tiny ViT with ``method`` whose trainable tensors moved away from their initial values."""
    model = timm.create_model(f"{NAME}.{method}", pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=local_overlay(vit_weights), **TINY_VIT)
    return move_trainable(model, seed)


def _out(model, seed=1):
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))


def _cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], ref: str = "main") -> str:
    """Write ``files`` as one snapshot of ``repo_id`` in a huggingface_hub cache, named by ``ref``."""
    sha = hashlib.sha1(b"".join(files[k] for k in sorted(files))).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    return sha


def _read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache (HF_HUB_CACHE) read in offline mode."""
    cache = tmp_path / "hub_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


class FakeHub:
    """The part of the Hub's HTTP API that creating, committing to and reading a repo uses."""

    ENDPOINT = constants.ENDPOINT
    user = "me"  # the token's owner

    def __init__(self):
        self.requests = []  # (method, path, headers, body)
        self.commits = {}  # (repo_id, revision) -> {"summary": ..., "files": {path: bytes}}
        self.missing = {}  # repo_id -> X-Error-Code for any file request

    def __call__(self, request):
        import httpx2
        body = request.read()
        path = request.url.path
        if path == "/api/agent-harnesses":  # huggingface_hub's own once-a-process lookup, no repo data
            return httpx2.Response(404)
        if path == "/" and request.method == "HEAD":  # the front page: timm-peft's reachability probe
            self.requests.append((request.method, path, dict(request.headers), body))
            return httpx2.Response(200)
        self.requests.append((request.method, path, dict(request.headers), body))
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            payload = json.loads(body)
            org = payload["organization"] or self.user
            return httpx2.Response(200, json={"url": f"{self.ENDPOINT}/{org}/{payload['name']}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if parts[:2] == ["api", "models"] and parts[4] == "branch":
            return httpx2.Response(200, json={})
        if parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if parts[:2] == ["api", "models"] and parts[4] == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                     for x in lines if x["key"] == "file"}
            assert all(x["key"] in ("header", "file") for x in lines), lines
            self.commits[("/".join(parts[2:4]), parts[5])] = dict(summary=header["summary"],
                                                                  files=files)
            return httpx2.Response(200, json={"commitUrl": f"{self.ENDPOINT}/{parts[2]}/{parts[3]}",
                                              "commitOid": "c" * 40, "success": True})
        if len(parts) >= 5 and parts[2] == "resolve":
            code = self.missing.get("/".join(parts[:2]), "RepoNotFound")
            if code == "unreachable":
                raise httpx2.ConnectError("no route to host", request=request)
            return httpx2.Response(404, headers={"X-Error-Code": code}, json={"error": code})
        raise AssertionError(f"unexpected request {request.method} {request.url}")

    def paths(self):
        return [(m, p) for m, p, _, _ in self.requests]


@pytest.fixture
def fake_hub(monkeypatch):
    if not hasattr(huggingface_hub, "set_client_factory"):
        pytest.skip("the fake Hub plugs into huggingface_hub's httpx client (huggingface_hub >= 1.0)")
    import httpx2
    from huggingface_hub.utils import _http

    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(hub), event_hooks={"request": [_http.hf_request_event_hook]}))
    yield hub
    huggingface_hub.set_client_factory(_http.default_client_factory)


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_round_trip_local_dir_and_hub_cache_bit_identical(vit_weights, tmp_path, hub_cache, method):
    model = _trained(vit_weights, method)
    ref = _out(model)
    out = timm_peft.save_pretrained(model, tmp_path / "adapter")
    assert sorted(os.listdir(out)) == FILES
    overlay = dict(pretrained=True, pretrained_cfg_overlay=local_overlay(vit_weights))
    sha = _cache_repo(hub_cache, "org/name", _read_dir(out))

    rebuilt = {
        "dir": timm_peft.from_pretrained(out, **overlay),
        "local-dir:": timm.create_model(f"local-dir:{out}", **overlay),
        "hf-hub:": timm_peft.from_pretrained("hf-hub:org/name", **overlay),
        "hf-hub:@sha": timm_peft.from_pretrained(f"hf-hub:org/name@{sha}", **overlay),
        "timm hf-hub:": timm.create_model("hf-hub:org/name", **overlay),
    }
    for how, m in rebuilt.items():
        assert m.peft_method == method and m.peft_config == model.peft_config, how
        assert torch.equal(_out(m), ref), how
    # the adapter is what makes the outputs equal: the base alone differs
    base = timm.create_model(f"{NAME}.{method}", num_classes=5, **overlay, **TINY_VIT)
    assert not torch.equal(_out(base), ref)


def test_revision_selects_the_snapshot(vit_weights, tmp_path, hub_cache):
    overlay = dict(pretrained=True, pretrained_cfg_overlay=local_overlay(vit_weights))
    first, second = _trained(vit_weights, "bias", seed=0), _trained(vit_weights, "linear", seed=1)
    _cache_repo(hub_cache, "org/name", _read_dir(timm_peft.save_pretrained(first, tmp_path / "a")))
    _cache_repo(hub_cache, "org/name", _read_dir(timm_peft.save_pretrained(second, tmp_path / "b")),
                ref="v2")
    main = timm_peft.from_pretrained("hf-hub:org/name", **overlay)
    v2 = timm_peft.from_pretrained("hf-hub:org/name", revision="v2", **overlay)
    v2_at = timm.create_model("hf-hub:org/name@v2", **overlay)
    assert (main.peft_method, v2.peft_method, v2_at.peft_method) == ("bias", "linear", "linear")
    assert torch.equal(_out(main), _out(first))
    assert torch.equal(_out(v2), _out(second)) and torch.equal(_out(v2_at), _out(second))


def test_create_model_without_pretrained_is_the_architecture_only(vit_weights, tmp_path):
    model = _trained(vit_weights, "partial")
    out = timm_peft.save_pretrained(model, tmp_path / "adapter")
    torch.manual_seed(0)
    fresh = timm.create_model(f"local-dir:{out}")
    torch.manual_seed(0)
    expected = timm.create_model(f"{NAME}.partial", num_classes=5, **TINY_VIT)
    assert fresh.peft_config == model.peft_config
    for k, v in expected.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.fixture
def plain_timm(monkeypatch):
    """timm exactly as without timm_peft: its own entrypoint lookup and entrypoints, no hooks."""
    from timm.models import _factory, _registry

    from timm_peft import integration
    monkeypatch.setattr(integration, "BUILD_HOOKS", [])
    monkeypatch.setattr(_factory, "model_entrypoint",
                        getattr(_factory.model_entrypoint, "__timm_peft_original__"))
    for name in ("load_model_config_from_path", "load_model_config_from_hf"):
        monkeypatch.setattr(_factory, name, getattr(_factory, name).__timm_peft_original__)
    for arch, fn in list(_registry._model_entrypoints.items()):
        if hasattr(fn, "__timm_peft_original__"):
            monkeypatch.setitem(_registry._model_entrypoints, arch, fn.__timm_peft_original__)


@pytest.mark.filterwarnings("ignore:method 'full' trains every parameter")
def test_plain_timm_refuses_an_adapter(vit_weights, tmp_path, hub_cache, request):
    # the 'full' adapter is a complete state dict: timm's local-dir would happily load it
    out = timm_peft.save_pretrained(_trained(vit_weights, "full"), tmp_path / "adapter")
    _cache_repo(hub_cache, "org/name", _read_dir(out))
    timm_cfg = json.loads((out / TIMM_CONFIG_NAME).read_text())
    assert timm_cfg["architecture"] == "vit_tiny_patch16_224"
    assert timm_cfg["model_args"] == {**timm_peft.read_adapter_config(out)["model_args"],
                                      ADAPTER_MARKER: CONFIG_NAME}
    request.getfixturevalue("plain_timm")
    for name in (f"local-dir:{out}", "hf-hub:org/name"):
        for pretrained in (True, False):
            with pytest.raises(TypeError, match=f"unexpected keyword argument.*{ADAPTER_MARKER}"):
                timm.create_model(name, pretrained=pretrained)


# ----------------------------------------------------------------------------------------------
# push_to_hub
# ----------------------------------------------------------------------------------------------

def test_push_to_hub_uploads_exactly_the_adapter(vit_weights, tmp_path, fake_hub, monkeypatch):
    model = _trained(vit_weights, "partial")
    card = dict(dataset="uoft-cs/cifar100", metrics={"accuracy": 0.875}, training={"epochs": 3})
    info = push_to_hub(model, "org/name", private=True, revision="v1",
                                 commit_message="add adapter", token="hf_fake", **card)
    assert info.oid == "c" * 40

    assert fake_hub.paths() == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/models/org/name/branch/v1"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/org/name/preupload/v1"),
        ("POST", "/api/models/org/name/commit/v1"),
    ]
    create = json.loads(fake_hub.requests[0][3])
    assert (create["name"], create["organization"]) == ("name", "org")
    assert create.get("visibility") == "private" or create.get("private") is True
    assert all(h.get("authorization") == "Bearer hf_fake" for _, _, h, _ in fake_hub.requests)

    commit = fake_hub.commits[("org/name", "v1")]
    assert commit["summary"] == "add adapter"
    files = commit["files"]
    assert sorted(files) == FILES
    assert json.loads(fake_hub.requests[2][3])["content"] == files["README.md"].decode()
    # the same as save_pretrained writes (safetensors' header order varies: compare contents)
    local = _read_dir(timm_peft.save_pretrained(model, tmp_path / "local", repo_id="org/name", **card))
    assert files["README.md"] == local["README.md"]
    assert files[TIMM_CONFIG_NAME] == local[TIMM_CONFIG_NAME]
    pushed_cfg = json.loads(files[CONFIG_NAME])
    assert pushed_cfg["weights_sha256"] == hashlib.sha256(files[WEIGHTS_NAME]).hexdigest()
    assert {**pushed_cfg, "weights_sha256": None} == {**json.loads(local[CONFIG_NAME]),
                                                      "weights_sha256": None}
    pushed, saved = safetensors.torch.load(files[WEIGHTS_NAME]), safetensors.torch.load(local[WEIGHTS_NAME])
    assert pushed.keys() == saved.keys() and all(torch.equal(pushed[k], saved[k]) for k in saved)

    # the weights are the adapter and nothing of the frozen base
    keys = set(pushed)
    assert keys == set(model.peft_adapter_keys)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not keys & frozen

    meta = ModelCard(files["README.md"].decode()).data.to_dict()
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"timm", "image-classification", "partial"} <= set(meta["tags"])
    # the base came from a local file, not timm's weights: the card claims no timm base
    assert "base_model" not in meta and "base_model_relation" not in meta and "license" not in meta
    assert meta["datasets"] == ["uoft-cs/cifar100"]
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"] == [{"type": "accuracy", "value": 0.875}]
    assert 'timm_peft.from_pretrained("hf-hub:org/name", pretrained_cfg_overlay=' \
        in files["README.md"].decode()

    # a second machine: the pushed files in its cache, offline, one line
    cache = tmp_path / "second_machine"
    _cache_repo(cache, "org/name", files, ref="v1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = timm_peft.from_pretrained("hf-hub:org/name@v1", pretrained_cfg_overlay=local_overlay(vit_weights))
    assert torch.equal(_out(loaded), _out(model))


def test_push_to_hub_name_without_namespace_and_main(vit_weights, fake_hub):
    # the Hub puts a bare name in the token owner's namespace; the card must name the full id
    push_to_hub(_trained(vit_weights, "linear"), "name")
    assert json.loads(fake_hub.requests[0][3])["organization"] is None
    assert fake_hub.paths()[-1] == ("POST", "/api/models/me/name/commit/main")
    commit = fake_hub.commits[("me/name", "main")]
    assert 'from_pretrained("hf-hub:me/name"' in commit["files"]["README.md"].decode()
    assert commit["summary"] == "Upload linear adapter for vit_tiny_patch16_224 (timm_peft)"


def test_push_to_hub_one_adapter_of_many(vit_weights, fake_hub):
    # a repo holds one adapter: the active one, or the one named
    model = _trained(vit_weights, "linear")
    timm_peft.add_adapter(model, "other", method="bias", num_classes=3)
    push_to_hub(model, "org/active")
    push_to_hub(model, "org/other", adapter_name="other")
    active = fake_hub.commits[("org/active", "main")]["files"]
    other = fake_hub.commits[("org/other", "main")]["files"]
    assert sorted(active) == sorted(other) == FILES
    assert json.loads(active[CONFIG_NAME])["peft_type"] == "linear"
    assert json.loads(other[CONFIG_NAME])["peft_type"] == "bias"
    assert json.loads(other[CONFIG_NAME])["model_args"]["num_classes"] == 3
    assert timm_peft.active_adapter(model) == "default"
    timm_peft.add_adapter(model, "ssf", dict(train_head=False), method="ssf")
    timm_peft.set_adapter(model, ["default", "ssf"])
    with pytest.raises(ValueError, match="composed and a repo holds one adapter"):
        push_to_hub(model, "org/both")


def test_push_to_hub_bad_input_fails_before_any_request(vit_weights, fake_hub):
    model = _trained(vit_weights, "linear")
    with pytest.raises(ValueError, match="carries no PEFT method"):
        push_to_hub(timm.create_model("resnet18", num_classes=2), "org/name")
    with pytest.raises(AdapterError, match="bad Hub adapter id"):
        push_to_hub(model, "org/na/me")
    with pytest.raises(AdapterError, match="revision="):
        push_to_hub(model, "org/name@v1")
    with pytest.raises(TypeError, match=r"unknown model card field\(s\) \['datasets'\]; allowed"):
        push_to_hub(model, "org/name", datasets=["cifar100"])
    assert fake_hub.requests == []


# ----------------------------------------------------------------------------------------------
# model card
# ----------------------------------------------------------------------------------------------

def test_model_card_yaml_and_body(vit_weights, tmp_path):
    model = _trained(vit_weights, "bias")
    out = timm_peft.save_pretrained(model, tmp_path / "a", license="mit", tags=["cifar"],
                                    training={"lr": 0.001})
    text = (out / "README.md").read_text()
    meta = huggingface_hub.metadata_load(out / "README.md")
    assert meta["license"] == "mit" and "cifar" in meta["tags"] and "bias" in meta["tags"]
    assert "datasets" not in meta and "model-index" not in meta and "metrics" not in meta
    cfg = timm_peft.read_adapter_config(out)
    n_bytes = (out / WEIGHTS_NAME).stat().st_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{trainable:,d} of" in text and f"{n_bytes:,d} bytes" in text
    assert "| lr | `0.001` |" in text
    assert "Model Card for" not in text and "[More Information Needed]" not in text
    # a base whose weights have no Hub repo gets no base_model (the Hub would reject it)
    card = make_model_card({**cfg, "pretrained_tag": "not_a_timm_tag"}, n_bytes)
    meta = ModelCard(card).data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["library_name"] == "timm"


@pytest.fixture
def timm_weights_cached(vit_weights, hub_cache):
    """vit_weights as timm's own published weights for NAME, in the offline Hub cache."""
    _cache_repo(hub_cache, f"timm/{NAME}", {"model.safetensors": vit_weights.read_bytes()})
    return hub_cache


def _meta(out):
    return huggingface_hub.metadata_load(out / "README.md")


def test_card_and_config_tell_where_the_base_came_from(vit_weights, timm_weights_cached, tmp_path):
    kwargs = dict(num_classes=5, **TINY_VIT)
    from_timm = timm.create_model(f"{NAME}.linear", pretrained=True, **kwargs)
    from_file = timm.create_model(f"{NAME}.linear", pretrained=True,
                                  pretrained_cfg_overlay=local_overlay(vit_weights), **kwargs)
    random = timm.create_model(f"{NAME}.linear", pretrained=False, **kwargs)
    metrics = dict(val_acc=0.912345, val_loss=0.123456789, best_epoch=3, stages=[{"a": 1}])
    outs = {name: timm_peft.save_pretrained(m, tmp_path / name, dataset="digits", metrics=metrics)
            for name, m in (("timm", from_timm), ("file", from_file), ("random", random))}
    kinds = {n: timm_peft.read_adapter_config(o)["base_source"]["kind"] for n, o in outs.items()}
    assert kinds == {"timm": "timm", "file": "file", "random": "random"}
    meta = _meta(outs["timm"])
    assert meta["base_model"] == f"timm/{NAME}" and meta["base_model_relation"] == "adapter"
    assert meta["license"] == "apache-2.0"
    assert {"timm", "timm_peft", "linear"} <= set(meta["tags"])
    for name in ("file", "random"):
        meta = _meta(outs[name])
        assert not {"base_model", "base_model_relation", "license"} & set(meta), name
        assert "augreg_in21k_ft_in1k" not in (outs[name] / "README.md").read_text(), name
        assert timm_peft.read_adapter_config(outs[name])["base_model_name_or_path"] == \
            "vit_tiny_patch16_224"
    # a generated task name is not a Hub dataset; only accuracy-like metrics, rounded
    assert "datasets" not in meta
    results = meta["model-index"][0]["results"]
    assert [m for r in results for m in r["metrics"]] == [{"type": "val_acc", "value": 0.9123}]
    # a file base is refused without the file, and loads with it
    with pytest.raises(AdapterError, match="came from a local file"):
        timm_peft.from_pretrained(outs["file"])
    timm_peft.from_pretrained(outs["file"], pretrained_cfg_overlay=local_overlay(vit_weights))
    # a timm base loads through timm's own source for the tag, nothing passed
    assert torch.equal(_out(timm_peft.from_pretrained(outs["timm"])), _out(from_timm))


@pytest.mark.parametrize("card_info, match", [
    (dict(metrics=[0.9]), "'metrics' must be dict, got list"),
    (dict(dataset=["a", "b"]), "'dataset' must be str, got list"),
    (dict(licence="mit"), r"unknown model card field\(s\) \['licence'\]"),
])
def test_model_card_bad_fields_write_nothing(vit_weights, tmp_path, card_info, match):
    with pytest.raises(TypeError, match=match):
        timm_peft.save_pretrained(_trained(vit_weights, "linear"), tmp_path / "a", **card_info)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


# ----------------------------------------------------------------------------------------------
# torch.hub
# ----------------------------------------------------------------------------------------------

def _import_hubconf():
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_hub_arch_method_entrypoint(vit_weights):
    torch.manual_seed(0)
    got = torch.hub.load(str(ROOT), "vit_tiny_patch16_224_partial", source="local",
                         peft_cfg=dict(num_blocks=1), num_classes=5, **TINY_VIT)
    torch.manual_seed(0)
    want = timm.create_model("vit_tiny_patch16_224.partial", peft_cfg=dict(num_blocks=1),
                             num_classes=5, **TINY_VIT)
    assert got.peft_config == want.peft_config
    assert [n for n, p in got.named_parameters() if p.requires_grad] == \
        [n for n, p in want.named_parameters() if p.requires_grad]
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.state_dict().items())
    # pretrained base with a weight tag, from a local file
    from safetensors.torch import load_file
    pre = torch.hub.load(str(ROOT), "vit_tiny_patch16_224_linear", source="local", pretrained=True,
                         tag="augreg_in21k_ft_in1k", pretrained_cfg_overlay=local_overlay(vit_weights),
                         num_classes=5, **TINY_VIT)
    state = pre.state_dict()
    assert all(torch.equal(state[k], v) for k, v in load_file(str(vit_weights)).items()
               if not k.startswith("head."))
    assert pre.pretrained_cfg["tag"] == "augreg_in21k_ft_in1k"


def test_torch_hub_adapter_entrypoint(vit_weights, tmp_path, hub_cache):
    model = _trained(vit_weights, "bias")
    out = timm_peft.save_pretrained(model, tmp_path / "adapter")
    _cache_repo(hub_cache, "org/name", _read_dir(out))
    for source in (str(out), "hf-hub:org/name"):
        got = torch.hub.load(str(ROOT), "adapter", source, source="local",
                             pretrained_cfg_overlay=local_overlay(vit_weights))
        assert torch.equal(_out(got), _out(model)), source


def test_hubconf_lists_one_entrypoint_per_arch_and_method():
    hubconf = _import_hubconf()
    torch.hub._check_dependencies(hubconf)
    listed = {f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")}
    expected = {"adapter"} | {
        f"{arch}_{method}" for method in timm_peft.list_methods()
        for arch in hubconf._COMMON_ARCHS
        if arch in set(iter_family_archs(timm_peft.core.get_method(method).families))}
    assert listed == expected
    assert {f"vit_base_patch16_224_{m}" for m in METHODS} <= listed
    assert all(getattr(hubconf, f).__doc__ and "Example" in getattr(hubconf, f).__doc__
               for f in listed)
    assert hubconf.vit_base_patch16_224_partial_1.__name__ == "vit_base_patch16_224_partial_1"


def test_hubconf_follows_the_registry():
    @register_method
    class _HubProbe(PeftMethod):
        name = "hub_probe_test"
        families = ("resnet",)
        description = "probe"

        def apply(self, model, config):
            return model
    try:
        hubconf = _import_hubconf()
        assert hasattr(hubconf, "resnet50_hub_probe_test")
        assert not hasattr(hubconf, "vit_base_patch16_224_hub_probe_test")  # family not supported
        assert "probe" in hubconf.resnet50_hub_probe_test.__doc__
    finally:
        _METHODS.pop("hub_probe_test")
        _PRESETS.pop("hub_probe_test")
    assert not hasattr(_import_hubconf(), "resnet50_hub_probe_test")


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

def test_uncached_hub_adapter_offline_says_so(hub_cache):
    with pytest.raises(AdapterError, match=r"HF_HUB_OFFLINE is set and its adapter_config.json is "
                                           r"not in the local Hugging Face cache"):
        timm_peft.from_pretrained("hf-hub:org/not_cached")


@pytest.mark.parametrize("adapter, kwargs, match", [
    ("org/name", {}, r"does not exist; for a Hugging Face Hub repo write 'hf-hub:org/name'"),
    ("hf-hub:org/na/me", {}, "bad Hub adapter id"),
    ("hf-hub:org/name@v1@v2", {}, "bad Hub adapter id"),
    ("hf-hub:org/name@", {}, "bad Hub adapter id"),
    ("hf-hub:org/name@v1", {"revision": "v2"}, "names revision 'v1' but revision='v2'"),
    (".", {"revision": "v2"}, "applies to Hub adapters"),
])
def test_bad_ids(adapter, kwargs, match):
    with pytest.raises(AdapterError, match=match):
        resolve_adapter_dir(adapter, **kwargs)


def test_missing_files(vit_weights, tmp_path, hub_cache):
    out = timm_peft.save_pretrained(_trained(vit_weights, "linear"), tmp_path / "adapter")
    files = _read_dir(out)
    with pytest.raises(AdapterError, match="is a file"):
        resolve_adapter_dir(out / WEIGHTS_NAME)
    # a cached repo missing its weights (an interrupted download)
    _cache_repo(hub_cache, "org/partial", {CONFIG_NAME: files[CONFIG_NAME]})
    with pytest.raises(AdapterError, match=f"its {WEIGHTS_NAME} is not in the local"):
        timm_peft.from_pretrained("hf-hub:org/partial")
    # timm's local-dir on a folder with config.json but no adapter
    shutil.copytree(out, tmp_path / "no_adapter")
    (tmp_path / "no_adapter" / CONFIG_NAME).unlink()
    with pytest.raises(AdapterError, match=f"no {CONFIG_NAME}"):
        timm.create_model(f"local-dir:{tmp_path / 'no_adapter'}")


@pytest.mark.parametrize("repo, code, match", [
    ("org/missing", "RepoNotFound", "no such model repo, or it is private or gated"),
    ("org/plain", "EntryNotFound", "has no adapter_config.json; it is not a timm_peft adapter repo"),
    ("org/name", "RevisionNotFound", "has no such revision"),
    ("org/name", "unreachable", "the Hub cannot be reached and its adapter_config.json is not in "
                                "the local Hugging Face cache"),
])
def test_hub_errors_are_clear(fake_hub, tmp_path, monkeypatch, repo, code, match):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    fake_hub.missing[repo] = code
    if code == "unreachable":  # skip huggingface_hub's back-off between retries
        from huggingface_hub.utils import _http
        monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)
    with pytest.raises(AdapterError, match=match):
        resolve_adapter_dir(f"hf-hub:{repo}", revision="v9" if code == "RevisionNotFound" else None)


@pytest.mark.parametrize("extra", [
    {"pretrained_cfg_overlay": {"url": "http://127.0.0.1:9/evil.safetensors"}},
    {"checkpoint_path": "/etc/passwd"},
    {"num_classes": 7},
])
def test_config_json_cannot_choose_weights_or_arguments(vit_weights, tmp_path, extra):
    # config.json is only a pointer: arguments it adds beyond adapter_config.json are refused
    out = timm_peft.save_pretrained(_trained(vit_weights, "linear"), tmp_path / "adapter")
    timm_cfg = json.loads((out / TIMM_CONFIG_NAME).read_text())
    timm_cfg["model_args"].update(extra)
    (out / TIMM_CONFIG_NAME).write_text(json.dumps(timm_cfg))
    # (timm itself refuses a config.json pretrained_cfg_overlay, as a duplicate keyword)
    with pytest.raises((AdapterError, TypeError),
                       match=r"field 'model_args' of config.json .* differs|multiple values"):
        timm.create_model(f"local-dir:{out}", pretrained=True)
