"""Serving many adapters on one backbone (timm_peft.serve): the engine alone, then over real HTTP
on a local Ray Serve (skipped where Ray is not installed; it is in the ``dev`` extras)."""
from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import timm_peft
from timm_peft.serve import AdapterEngine, RequestError, _PassMerger, encode_image

from conftest import local_overlay, move_trainable

KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
ARCH = "vit_tiny_patch16_224"
# id -> (method, classes, data config set on the model before saving)
ADAPTERS = {
    "ssf_a": ("ssf", 3, dict(mean=(0.2, 0.3, 0.4), std=(0.5, 0.5, 0.5))),
    "ssf_b": ("ssf", 5, dict(crop_pct=0.5)),
    "vpt_a": ("vpt", 4, dict(interpolation="bilinear")),
    "bias_a": ("bias", 2, {}),
}


def _save_adapter(out: Path, weights: Path, method: str, classes: int, data: dict, seed: int
                  ) -> Path:
    torch.manual_seed(seed)
    m = timm.create_model(f"{ARCH}.{method}", pretrained=True, num_classes=classes,
                          pretrained_cfg_overlay=local_overlay(weights), **KW)
    move_trainable(m, seed)
    m.pretrained_cfg = {**m.pretrained_cfg, **data}
    return timm_peft.save_pretrained(m, out, label_names=[f"{out.name}_{i}" for i in range(classes)])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """Base weights, four adapters of three methods, one more on demand and hostile ones."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    weights = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(ARCH, **KW).state_dict().items()},
              str(weights))
    dirs = {}
    for seed, (name, (method, classes, data)) in enumerate(ADAPTERS.items()):
        dirs[name] = _save_adapter(root / name, weights, method, classes, data, seed + 1)
    dirs["bias_b"] = _save_adapter(root / "bias_b", weights, "bias", 6, {}, 9)
    # hostile: NaN values behind a matching hash; another base's weights; a broken config
    nan = _save_adapter(root / "hostile_nan", weights, "bias", 2, {}, 10)
    t = load_file(str(nan / "adapter_model.safetensors"))
    next(iter(t.values())).fill_(float("nan"))
    blob = (nan / "adapter_model.safetensors")
    save_file(t, str(blob), metadata={"format": "pt"})
    cfg = json.loads((nan / "adapter_config.json").read_text())
    import hashlib
    cfg["weights_sha256"] = hashlib.sha256(blob.read_bytes()).hexdigest()
    (nan / "adapter_config.json").write_text(json.dumps(cfg))
    other = root / "other_base.safetensors"
    torch.manual_seed(123)
    save_file({k: v.contiguous() for k, v in timm.create_model(ARCH, **KW).state_dict().items()},
              str(other))
    _save_adapter(root / "hostile_base", other, "ssf", 3, {}, 11)
    broken = _save_adapter(root / "hostile_config", weights, "bias", 2, {}, 12)
    cfg = json.loads((broken / "adapter_config.json").read_text())
    cfg["model_args"]["depth"] = 10 ** 6
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    return dict(root=root, weights=weights, dirs=dirs)


def _image(seed: int, size: int = 40) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return encode_image(torch.rand(3, size, size + 7, generator=g))


def _reference(zoo: dict, name: str, data: bytes, k: int) -> list[tuple[str, float]]:
    """The adapter reloaded on its own (from_pretrained) and its own data config, run directly."""
    from PIL import Image
    import io
    from timm.data import create_transform, resolve_data_config
    m = timm_peft.from_pretrained(zoo["dirs"][name], pretrained_cfg_overlay=local_overlay(
        zoo["weights"])).eval()
    tf = create_transform(**resolve_data_config({}, model=m))
    x = tf(Image.open(io.BytesIO(data)).convert("RGB"))[None]
    with torch.no_grad():
        p = m(x).softmax(-1)[0]
    s, i = p.topk(min(k, p.numel()))
    labels = m.pretrained_cfg["label_names"]
    return [(labels[j], v) for j, v in zip(i.tolist(), s.tolist())]


def _check_answer(answer: dict, expected: list[tuple[str, float]]) -> None:
    got = [(p["label"], p["score"]) for p in answer["predictions"]]
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert [g[1] for g in got] == pytest.approx([e[1] for e in expected], abs=1e-5)


def _engine(zoo: dict, **kw) -> AdapterEngine:
    kw.setdefault("adapters", {n: str(zoo["dirs"][n]) for n in ADAPTERS})
    return AdapterEngine(ARCH, pretrained_file=str(zoo["weights"]), model_kwargs=KW,
                         adapter_root=zoo["root"], **kw)


def _snapshot(model: torch.nn.Module) -> dict:
    inner = model
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for n, a in timm_peft.get_adapters(model).items():
        out.update({f"{n}.{k}": v.detach().clone() for k, v in a.state.items()})
    out["__names__"] = sorted(timm_peft.get_adapters(model))
    out["__active__"] = timm_peft.active_adapter(model)
    out["__cfg__"] = dict(inner.pretrained_cfg)
    return out


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
               for k in a)


# ----------------------------------------------------------------------------------------------
# the engine, without Ray
# ----------------------------------------------------------------------------------------------

def test_engine_mixed_batch_one_pass_per_route_group_and_answers_equal_direct(zoo):
    engine = _engine(zoo)
    names = ["ssf_a", "ssf_b", "vpt_a", "ssf_b", "bias_a", "ssf_a"]
    imgs = [_image(i) for i in range(len(names))]
    items = [(n, engine.preprocess(n, d), 3) for n, d in zip(names, imgs)]
    calls = []
    # the stem runs once per backbone pass (a routed pass vectorises the samples over it)
    hook = engine.model.patch_embed.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        before = engine.stats()
        answers = engine.run_batch(items)
    finally:
        hook.remove()
    # SSF adapters (two heads) routed in one pass, VPT and bias one pass each: 3, not 6
    assert len(calls) == 3
    assert engine.stats()["backbone_passes"] - before.get("backbone_passes", 0) == 3
    assert engine.stats()["routed_passes"] - before.get("routed_passes", 0) == 1
    for n, d, ans in zip(names, imgs, answers):
        assert ans["adapter"] == n
        _check_answer(ans, _reference(zoo, n, d, 3))


def test_engine_preprocessing_follows_each_adapters_data_config(zoo):
    engine = _engine(zoo)
    listing = {a["id"]: a for a in engine.listing()["loaded"]}
    assert listing["ssf_a"]["data_config"]["mean"] == pytest.approx([0.2, 0.3, 0.4])
    assert listing["ssf_b"]["data_config"]["crop_pct"] == 0.5
    assert listing["vpt_a"]["data_config"]["interpolation"] == "bilinear"
    d = _image(0)
    assert not torch.equal(engine.preprocess("ssf_a", d), engine.preprocess("bias_a", d))


def test_engine_lru_evicts_without_touching_the_base_and_reloads(zoo):
    engine = _engine(zoo, max_adapters=2, adapters={n: str(zoo["dirs"][n]) for n in ADAPTERS})
    assert [a["id"] for a in engine.listing()["loaded"]] == ["vpt_a", "bias_a"]
    base = {k: v.clone() for k, v in timm_peft.get_adapters(engine.model)["default"].state.items()}
    frozen = {n: p.clone() for n, p in engine.model.named_parameters() if not p.requires_grad}
    d = _image(3)
    ans = engine.predict("ssf_a", d, 2)  # configured, evicted at start: loaded again
    _check_answer(ans, _reference(zoo, "ssf_a", d, 2))
    assert [a["id"] for a in engine.listing()["loaded"]] == ["bias_a", "ssf_a"]
    assert engine.stats()["evictions"] == 3 and engine.stats()["loads"] == 5
    assert len(timm_peft.get_adapters(engine.model)) == 3  # placeholder + 2
    _check_answer(engine.predict("bias_b", d, 2), _reference(zoo, "bias_b", d, 2))  # on demand
    assert [a["id"] for a in engine.listing()["loaded"]] == ["ssf_a", "bias_b"]
    with timm_peft.disable_adapter(engine.model):
        now = {n: p for n, p in engine.model.named_parameters() if n in frozen}
        assert all(torch.equal(now[n], frozen[n]) for n in now) and now
    assert all(torch.equal(v, base[k]) for k, v in
               timm_peft.get_adapters(engine.model)["default"].state.items())


def test_engine_an_item_whose_adapter_was_evicted_while_queued_fails_alone(zoo):
    """A request cancelled after it was queued unpins its adapter, which a load may then evict:
    the pass it sits in still answers everyone else (a client that disconnects on purpose while
    others load adapters must not fail their requests)."""
    engine = _engine(zoo, max_adapters=2, adapters={n: str(zoo["dirs"][n]) for n in
                                                     ("ssf_a", "ssf_b")})
    gone, stays = engine.pin("ssf_a"), engine.pin("ssf_b")
    d = _image(7)
    items = [(gone, engine.preprocess(gone, d), 3), (stays, engine.preprocess(stays, d), 3)]
    engine.unpin(gone)  # its request was cancelled while the items waited for the model
    engine.unpin(engine.pin("bias_b"))  # a load evicts it (ssf_b is pinned)
    assert "ssf_a" not in [a["id"] for a in engine.listing()["loaded"]]
    dead, live = engine.run_batch(items)
    assert dead == dict(adapter="ssf_a", error=dead["error"]) and "evicted" in dead["error"]
    _check_answer(live, _reference(zoo, "ssf_b", d, 3))
    engine.unpin(stays)


@pytest.mark.parametrize("hostile", ["hostile_base", "hostile_nan", "hostile_config"])
def test_engine_hostile_adapter_leaves_the_model_unchanged_and_failure_is_cached(zoo, hostile):
    engine = _engine(zoo, max_adapters=len(ADAPTERS))  # full: a load would have to evict
    before, held = _snapshot(engine.model), engine.listing()["loaded"]
    with pytest.raises(RequestError) as e:
        engine.pin(hostile)
    assert e.value.status == 422 and hostile in e.value.message
    assert _same(before, _snapshot(engine.model))
    assert engine.listing()["loaded"] == held and engine.stats()["evictions"] == 0
    loads = engine.stats()["load_failures"]
    with pytest.raises(RequestError):
        engine.pin(hostile)
    assert engine.stats()["load_failures"] == loads  # answered from the failure cache
    assert engine.stats()["cached_failures"] == 1
    d = _image(5)
    _check_answer(engine.predict("vpt_a", d, 3), _reference(zoo, "vpt_a", d, 3))


def test_engine_failure_cache_expires(zoo):
    engine = _engine(zoo, adapters={"bias_a": str(zoo["dirs"]["bias_a"])}, failure_ttl_s=0.0)
    for _ in range(2):
        with pytest.raises(RequestError):
            engine.pin("hostile_base")
    assert engine.stats()["load_failures"] == 2  # retried once the entry expired


def test_engine_refuses_ids_it_may_not_load(zoo):
    engine = _engine(zoo, adapters={"bias_a": str(zoo["dirs"]["bias_a"])}, allow=["ssf_"])
    with pytest.raises(RequestError) as e:
        engine.pin("bias_b")
    assert e.value.status == 403 and "ssf_" in e.value.message
    engine = _engine(zoo, adapters={"bias_a": str(zoo["dirs"]["bias_a"])})
    loop = zoo["root"] / "loop"
    if not loop.is_symlink():
        loop.symlink_to(loop)  # a symlink loop under the root
    outside = zoo["root"] / "outside"
    if not outside.is_symlink():
        outside.symlink_to(zoo["root"].parent)
    for bad, status in [("../zoo/bias_b", 400), ("/etc", 400), ("nope", 404), ("", 400),
                        ("bias_\x00b", 400), ("bias_b\n", 400), ("loop", 404), ("loop/x", 404),
                        ("outside", 400), ("bias_b/", 400), ("bias_b/.", 400), ("./bias_b", 400),
                        ("x//bias_b", 400)]:
        with pytest.raises(RequestError) as e:
            engine.pin(bad)
        assert e.value.status == status, bad
    engine.unpin(engine.pin("bias_b"))  # its one spelling loads
    no_root = AdapterEngine(ARCH, {"bias_a": str(zoo["dirs"]["bias_a"])},
                            pretrained_file=str(zoo["weights"]), model_kwargs=KW)
    with pytest.raises(RequestError) as e:
        no_root.pin(str(zoo["dirs"]["bias_b"]))  # a client may not name server paths
    assert e.value.status == 404


def test_engine_bounds_images(zoo):
    engine = _engine(zoo, adapters={"bias_a": str(zoo["dirs"]["bias_a"])},
                     max_image_pixels=50 * 50, max_image_bytes=20_000)
    for data, status in [(b"not an image", 415), (_image(0, size=60), 413), (b"", 400),
                         (b"\x89PNG" + bytes(30_000), 413), (_image(0)[:60], 415)]:
        with pytest.raises(RequestError) as e:
            engine.preprocess("bias_a", data)
        assert e.value.status == status


def test_pass_merger_batches_that_queue_during_a_pass_share_the_next():
    """Ray closes batches on its timer while the backbone is busy: every batch waiting when the
    model thread frees up runs in the next pass, up to max_size, and each gets its own answers."""
    started, release, passes = threading.Event(), threading.Event(), []

    def fn(items):
        passes.append(list(items))
        if len(passes) == 1:
            started.set()
            assert release.wait(10)
        if "boom" in items:
            raise RuntimeError("a failed pass")
        return [f"answer {i}" for i in items]

    merger = _PassMerger(fn, ThreadPoolExecutor(1), max_size=4)

    async def scenario():
        first = asyncio.ensure_future(merger.run(["a"]))
        await asyncio.to_thread(started.wait, 10)  # pass 1 is running: the others queue
        queued = [asyncio.ensure_future(merger.run(b)) for b in
                  (["b"], ["c", "d"], ["e"], ["f", "g"], ["boom", "h"])]
        gone = asyncio.ensure_future(merger.run(["x"]))  # Ray cancels its handler as it waits
        queued.append(asyncio.ensure_future(merger.run(["i"])))
        await asyncio.sleep(0)
        gone.cancel()
        release.set()
        return await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True), 10)

    answers = asyncio.run(scenario())
    # merged in arrival order, never splitting a Ray batch, never over max_size
    assert passes == [["a"], ["b", "c", "d", "e"], ["f", "g", "boom", "h"], ["x", "i"]]
    assert answers[:4] == [["answer a"], ["answer b"], ["answer c", "answer d"], ["answer e"]]
    assert all(isinstance(a, RuntimeError) for a in answers[4:6])  # the failed pass's batches
    assert answers[6] == ["answer i"]  # the next pass runs; the cancelled request is skipped


# ----------------------------------------------------------------------------------------------
# over HTTP, on Ray Serve
# ----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(zoo):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from timm_peft.serve import build_app, start
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = build_app(ARCH, {n: str(zoo["dirs"][n]) for n in ADAPTERS}, max_adapters=4,
                        adapter_root=str(zoo["root"]), pretrained_file=str(zoo["weights"]),
                        model_kwargs=KW, max_batch_size=16, batch_wait_ms=200,
                        max_image_pixels=64 * 64, max_image_bytes=50_000)
        url = start(app, port=_free_port())
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _http(url: str, path: str, body: bytes | None = None, ctype: str = "application/json"
          ) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": ctype} if body
                                 is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _predict(url: str, adapter: str, data: bytes, k: int = 3) -> tuple[int, dict]:
    body = json.dumps(dict(adapter=adapter, image=base64.b64encode(data).decode(), top_k=k))
    return _http(url, "/predict", body.encode())


def test_http_three_methods_answer_as_the_model_run_directly(server, zoo):
    assert _http(server, "/healthz")[1]["status"] == "ok"
    for i, name in enumerate(["ssf_a", "vpt_a", "bias_a"]):
        d = _image(20 + i)
        status, ans = _predict(server, name, d)
        assert status == 200, ans
        _check_answer(ans, _reference(zoo, name, d, 3))
    d = _image(30)  # raw bytes, adapter in the query
    status, ans = _http(server, "/predict?adapter=ssf_b&top_k=2", d, "image/png")
    assert status == 200, ans
    _check_answer(ans, _reference(zoo, "ssf_b", d, 2))
    listing = _http(server, "/adapters")[1]
    assert {a["id"]: a["method"] for a in listing["loaded"]} == \
        {n: m for n, (m, _, _) in ADAPTERS.items()}


def test_http_mixed_burst_is_batched_into_few_backbone_passes(server, zoo):
    names = ["ssf_a", "ssf_b"] * 4 + ["vpt_a", "bias_a"]
    imgs = [_image(40 + i) for i in range(len(names))]
    before = _http(server, "/stats")[1]
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda a: _predict(server, *a), zip(names, imgs)))
    after = _http(server, "/stats")[1]
    assert all(s == 200 for s, _ in answers), answers
    passes = after["backbone_passes"] - before["backbone_passes"]
    assert after["requests"] - before["requests"] == len(names)
    assert passes < len(names) - 3, (before, after)  # one request per pass would be 10
    assert after["routed_passes"] > before.get("routed_passes", 0)
    for n, d, (_, ans) in zip(names, imgs, answers):
        _check_answer(ans, _reference(zoo, n, d, 3))


def test_http_lru_eviction_and_reload(server, zoo):
    d = _image(50)
    for name in ADAPTERS:  # LRU order: ssf_a, ssf_b, vpt_a, bias_a
        assert _predict(server, name, d)[0] == 200
    before = _http(server, "/stats")[1]
    status, ans = _predict(server, "bias_b", d)  # on demand from the root: evicts ssf_a
    assert status == 200, ans
    _check_answer(ans, _reference(zoo, "bias_b", d, 3))
    loaded = [a["id"] for a in _http(server, "/adapters")[1]["loaded"]]
    assert loaded == ["ssf_b", "vpt_a", "bias_a", "bias_b"]
    status, ans = _predict(server, "ssf_a", d)  # reloaded, evicting ssf_b
    assert status == 200
    _check_answer(ans, _reference(zoo, "ssf_a", d, 3))
    after = _http(server, "/stats")[1]
    assert after["loads"] - before["loads"] == 2 and after["evictions"] - before["evictions"] == 2
    assert [a["id"] for a in _http(server, "/adapters")[1]["loaded"]] == \
        ["vpt_a", "bias_a", "bias_b", "ssf_a"]


def test_http_bad_requests_get_4xx_and_the_server_keeps_serving(server, zoo):
    good = _image(60)
    expected = _reference(zoo, "vpt_a", good, 3)
    b64 = base64.b64encode(good).decode()
    big = encode_image(torch.zeros(3, 100, 100))
    cases = [
        ("malformed JSON", b"{not json", "application/json", 400),
        ("JSON not an object", b"[1, 2]", "application/json", 400),
        ("JSON nested too deeply", b"[" * 60_000, "application/json", 400),
        ("a control character in the id", json.dumps(dict(adapter="vpt_a\n", image=b64)).encode(),
         "application/json", 400),
        ("no adapter", json.dumps(dict(image=b64)).encode(), "application/json", 400),
        ("bad base64", json.dumps(dict(adapter="vpt_a", image="%%%")).encode(),
         "application/json", 400),
        ("bad top_k", json.dumps(dict(adapter="vpt_a", image=b64, top_k=0)).encode(),
         "application/json", 400),
        ("unknown field", json.dumps(dict(adapter="vpt_a", image=b64, x=1)).encode(),
         "application/json", 400),
        ("not an image", json.dumps(dict(adapter="vpt_a", image=base64.b64encode(
            b"hello").decode())).encode(), "application/json", 415),
        ("too many pixels", json.dumps(dict(adapter="vpt_a", image=base64.b64encode(
            big).decode())).encode(), "application/json", 413),
        ("too many bytes", bytes(200_000), "image/png", 413),
        ("unknown adapter", json.dumps(dict(adapter="nope", image=b64)).encode(),
         "application/json", 404),
        ("path escape", json.dumps(dict(adapter="../x", image=b64)).encode(),
         "application/json", 400),
        ("hostile adapter", json.dumps(dict(adapter="hostile_base", image=b64)).encode(),
         "application/json", 422),
        ("hostile adapter again", json.dumps(dict(adapter="hostile_base", image=b64)).encode(),
         "application/json", 422),
        ("hostile config", json.dumps(dict(adapter="hostile_config", image=b64)).encode(),
         "application/json", 422),
    ]
    for what, body, ctype, status in cases:
        path = "/predict?adapter=vpt_a" if ctype != "application/json" else "/predict"
        got, ans = _http(server, path, body, ctype)
        assert got == status, (what, ans)
        assert ans["error"], what
        got, ans = _predict(server, "vpt_a", good)
        assert got == 200, (what, ans)
        _check_answer(ans, expected)
    assert _http(server, "/stats")[1]["cached_failures"] >= 1


def test_app_builder_and_cli_parse_the_same_deployment(zoo):
    pytest.importorskip("ray.serve")
    from timm_peft.cli import _serve_kwargs, build_parser
    from timm_peft.serve import app_builder
    ns = build_parser().parse_args([
        "serve", "--model", ARCH, "--adapters", f"a={zoo['dirs']['bias_a']}",
        str(zoo["dirs"]["ssf_a"]), "--max-adapters", "3", "--replicas", "2",
        "--max-batch-size", "4", "--batch-wait-ms", "7", "--allow", "hf-hub:me/",
        "--model-kwargs", "img_size=32", "depth=2", "--pretrained-file", str(zoo["weights"])])
    kwargs, host, port = _serve_kwargs(ns)
    assert (host, port) == ("127.0.0.1", 8000)
    assert kwargs["adapters"] == {"a": str(zoo["dirs"]["bias_a"]),
                                  str(zoo["dirs"]["ssf_a"]): str(zoo["dirs"]["ssf_a"])}
    assert kwargs["model_kwargs"] == dict(img_size=32, depth=2)
    assert (kwargs["max_adapters"], kwargs["replicas"], kwargs["max_batch_size"],
            kwargs["batch_wait_ms"], kwargs["allow"]) == (3, 2, 4, 7.0, ["hf-hub:me/"])
    app = app_builder(dict(kwargs))  # what a Ray Serve config file's args build
    deployment = app._bound_deployment
    assert deployment.num_replicas == 2
    engine_kwargs, max_batch, wait_s = deployment.init_args
    assert engine_kwargs["adapters"] == kwargs["adapters"] and (max_batch, wait_s) == (4, 0.007)
    assert deployment.ray_actor_options == dict(num_cpus=1.0, num_gpus=0.0)
    assert "device" not in engine_kwargs  # the engine's default: the CPU

    # a GPU per replica (or a share of one): Ray reserves it and the backbone runs on it
    ns = build_parser().parse_args(["serve", "--model", ARCH, "--num-gpus", "0.5"])
    deployment = app_builder(_serve_kwargs(ns)[0])._bound_deployment
    assert deployment.ray_actor_options == dict(num_cpus=1.0, num_gpus=0.5)
    assert deployment.init_args[0]["device"] == "cuda"


def test_build_app_checks_the_start_adapters_before_any_replica(zoo, tmp_path, capsys):
    """A bad adapter given at start fails build_app (and `timm-peft serve`) at once, naming it,
    instead of as Ray's failed deployment after its replicas built the backbone; good ones
    pass."""
    pytest.importorskip("ray.serve")
    from timm_peft.cli import main
    from timm_peft.serve import build_app
    good = {"a": str(zoo["dirs"]["bias_a"])}
    for name, source, says in [("nan", zoo["root"] / "hostile_nan", "finite"),
                               ("deep", zoo["root"] / "hostile_config", "model_args"),
                               ("gone", tmp_path / "nope", "does not exist")]:
        with pytest.raises(ValueError, match=f"adapter '{name}' given at start: .*{says}"):
            build_app(ARCH, {**good, name: str(source)}, pretrained_file=str(zoo["weights"]),
                      model_kwargs=KW)
    assert build_app(ARCH, good, pretrained_file=str(zoo["weights"]), model_kwargs=KW)
    rc = main(["serve", "--model", ARCH, "--adapters", f"gone={tmp_path / 'nope'}"])
    assert rc == 2 and "adapter 'gone' given at start" in capsys.readouterr().err
