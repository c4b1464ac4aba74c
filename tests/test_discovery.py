"""Discovery: list_adapters on the Hub (real HfApi, in-process fake of the listing endpoint) and offline.

The Hub is never contacted: huggingface_hub's real client talks to a fake of ``GET /api/models``
(only the transport is replaced) that filters and pages like the Hub, over entries built from
cards that save_pretrained really wrote; offline, a hand-built huggingface_hub cache in a tmp dir.
"""
import hashlib
import json
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import constants

import timm_peft
from timm_peft import discovery
from timm_peft.io import CONFIG_NAME, TIMM_CONFIG_NAME, WEIGHTS_NAME, make_model_card

from conftest import TINY_VIT, local_overlay, move_trainable

#: an unexpected warning (e.g. "the Hub cannot be reached" in offline mode) fails the test
pytestmark = pytest.mark.filterwarnings("error")

VIT = "vit_tiny_patch16_224"
TAG = "augreg_in21k_ft_in1k"
OTHER_TAG = "augreg_in21k"

#: repo id -> (timm name with method, save_pretrained card info); the expected records below
#: restate these values independently of the code under test
SPECS = {
    "org/vit-ssf-cifar10": (f"{VIT}.{TAG}.ssf", dict(dataset="uoft-cs/cifar10",
                                                      metrics={"accuracy": 0.91, "top5": 0.99})),
    "org/vit-bias-cifar100": (f"{VIT}.{TAG}.bias", dict(dataset="uoft-cs/cifar100", metrics={"accuracy": 0.75})),
    "other/vit-ssf-in21k": (f"{VIT}.{OTHER_TAG}.ssf", dict(dataset="uoft-cs/cifar10", metrics={"accuracy": 0.5})),
    "org/resnet-linear": ("resnet10t.c3_in1k.linear", dict(dataset="uoft-cs/cifar100", metrics={"accuracy": 0.6})),
}
CUSTOM = "me/vit-ssf-own-weights"  # base weights timm has no Hub repo for: no base_model on the card


def _rec(repo_id, method, base, task, metrics, base_model, **kw):
    return timm_peft.AdapterInfo(repo_id=repo_id, method=method, base=base, task=task,
                                 metrics=metrics, base_model=base_model, **kw)


def _expected(source="hub"):
    return {
        "org/vit-ssf-cifar10": _rec("org/vit-ssf-cifar10", "ssf", f"{VIT}.{TAG}", "uoft-cs/cifar10",
                                    {"accuracy": 0.91, "top5": 0.99}, f"timm/{VIT}.{TAG}", source=source),
        "org/vit-bias-cifar100": _rec("org/vit-bias-cifar100", "bias", f"{VIT}.{TAG}", "uoft-cs/cifar100",
                                      {"accuracy": 0.75}, f"timm/{VIT}.{TAG}", source=source),
        "other/vit-ssf-in21k": _rec("other/vit-ssf-in21k", "ssf", f"{VIT}.{OTHER_TAG}", "uoft-cs/cifar10",
                                    {"accuracy": 0.5}, f"timm/{VIT}.{OTHER_TAG}", source=source),
        "org/resnet-linear": _rec("org/resnet-linear", "linear", "resnet10t.c3_in1k", "uoft-cs/cifar100",
                                  {"accuracy": 0.6}, "timm/resnet10t.c3_in1k", source=source),
    }


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Local 'pretrained' files for the tiny ViT and resnet10t (any weight tag reads them)."""
    from safetensors.torch import save_file
    out = {}
    for arch, kwargs in ((VIT, TINY_VIT), ("resnet10t", {})):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp("weights") / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in timm.create_model(arch, **kwargs).state_dict().items()},
                  str(path))
        out[arch] = path
    return out


def _build(name, weights, seed=0):
    arch = name.split(".")[0]
    torch.manual_seed(seed)  # the method's own initialisation
    model = timm.create_model(name, pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=local_overlay(weights[arch]),
                              **(TINY_VIT if arch == VIT else {}))
    return move_trainable(model, seed)


def _build_from_timm(name, weights, cache, seed=0):
    """As :func:`_build`, the base loaded the way timm loads its own published weights (from an
    offline Hub cache holding the same file), so the adapter's card may name its base."""
    arch = name.split(".")[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=True, num_classes=3,
                                  **(TINY_VIT if arch == VIT else {}))
    assert timm_peft.io.base_fingerprint(model) == timm_peft.io.base_fingerprint(
        _build(name, weights, seed))
    return move_trainable(model, seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, weights):
    """repo id -> the files save_pretrained wrote for it (the card convention under test)."""
    root = tmp_path_factory.mktemp("adapters")
    timm_hub = tmp_path_factory.mktemp("timm_hub")  # timm's own weights for each base, offline
    for arch, tag in {tuple(name.split(".")[:2]) for name, _ in SPECS.values()}:
        _cache_repo(timm_hub, f"timm/{arch}.{tag}", {"model.safetensors": weights[arch].read_bytes()})
    out = {}
    for repo_id, (name, card) in SPECS.items():
        d = timm_peft.save_pretrained(_build_from_timm(name, weights, timm_hub),
                                      root / repo_id.replace("/", "--"), repo_id=repo_id, **card)
        out[repo_id] = {p.name: p.read_bytes() for p in d.iterdir()}
    # a base whose weights are not timm's Hub weights: the card has no base_model
    files = dict(out["org/vit-ssf-cifar10"])
    cfg = {**json.loads(files[CONFIG_NAME]), "pretrained_tag": "own_weights",
           "base_model_name_or_path": f"{VIT}.own_weights", "base_source": {"kind": "file"}}
    files[CONFIG_NAME] = json.dumps(cfg).encode()
    files["README.md"] = make_model_card(cfg, len(files[WEIGHTS_NAME]), repo_id=CUSTOM,
                                         dataset="uoft-cs/cifar10", metrics={"accuracy": 0.8}).encode()
    out[CUSTOM] = files
    return out


# ----------------------------------------------------------------------------------------------
# a fake of the Hub's model listing
# ----------------------------------------------------------------------------------------------

def _hub_entry(repo_id, readme):
    """What ``GET /api/models?cardData=true`` returns for a repo: the card's YAML and the tags the
    Hub computes from it (library, base model and relation, datasets)."""
    card = _card_yaml(readme)
    tags = list(card.get("tags") or [])
    if card.get("library_name"):
        tags.append(card["library_name"])
    if card.get("base_model"):
        tags += [f"base_model:{card['base_model']}",
                 f"base_model:{card.get('base_model_relation', 'finetune')}:{card['base_model']}"]
    tags += [f"dataset:{d}" for d in card.get("datasets") or []]
    return {"id": repo_id, "author": repo_id.split("/")[0], "tags": sorted(set(tags)),
            "cardData": card}


def _card_yaml(readme: bytes) -> dict:
    """The YAML front matter of a model card, as the Hub stores it."""
    import yaml
    return yaml.safe_load(readme.decode().split("---\n")[1])


class FakeHub:
    """``GET /api/models`` as the Hub answers it: tag filters ANDed, author, pages of ``limit``
    entries linked by a ``Link: rel="next"`` header. ``ignore_filters`` answers everything (to
    show that list_adapters checks every entry itself)."""

    def __init__(self, entries):
        self.entries = list(entries)
        self.requests = []  # query params of each listing request
        self.ignore_filters = False
        self.page_size = 1000
        self.unreachable = False

    def __call__(self, request):
        import httpx2
        if request.url.path == "/api/agent-harnesses":  # huggingface_hub's own lookup, no repo data
            return httpx2.Response(404)
        assert (request.method, request.url.path) == ("GET", "/api/models"), request.url
        if self.unreachable:
            raise httpx2.ConnectError("no route to host", request=request)
        params = request.url.params
        self.requests.append({k: params.get_list(k) for k in params.keys()})
        hits = [e for e in self.entries if self.ignore_filters or (
            set(params.get_list("filter")) <= set(e["tags"])
            and params.get("author", e["author"]) == e["author"])]
        start = int(params.get("cursor", 0))
        size = min(int(params.get("limit", self.page_size)), self.page_size)
        page = hits[start:start + size]
        headers = {}
        if start + size < len(hits):
            nxt = request.url.copy_set_param("cursor", str(start + size))
            headers["Link"] = f'<{nxt}>; rel="next"'
        return httpx2.Response(200, json=page, headers=headers)


@pytest.fixture(autouse=True)
def no_network():
    """Every request fails the test unless a test installs a FakeHub (hub_with)."""
    if not hasattr(huggingface_hub, "set_client_factory"):
        yield
        return
    import httpx2
    from huggingface_hub.utils import _http

    def refuse(request):
        raise AssertionError(f"a test touched the network: {request.method} {request.url}")
    # huggingface_hub's request hook stays: it is what refuses requests in offline mode
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(refuse), event_hooks={"request": [_http.hf_request_event_hook]}))
    yield
    huggingface_hub.set_client_factory(_http.default_client_factory)


@pytest.fixture
def hub_with(monkeypatch, no_network):
    """``make(entries)``: a FakeHub of those entries becomes huggingface_hub's transport, online."""
    if not hasattr(huggingface_hub, "set_client_factory"):
        pytest.skip("the fake Hub plugs into huggingface_hub's httpx client (huggingface_hub >= 1.0)")
    import httpx2
    from huggingface_hub.utils import _http

    def make(entries):
        hub = FakeHub(entries)
        huggingface_hub.set_client_factory(lambda: httpx2.Client(
            transport=httpx2.MockTransport(hub), event_hooks={"request": [_http.hf_request_event_hook]}))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        return hub
    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)  # no back-off between retries
    return make


@pytest.fixture
def hub(saved, hub_with):
    return hub_with(_hub_entry(r, files["README.md"]) for r, files in saved.items())


# ----------------------------------------------------------------------------------------------
# the Hub
# ----------------------------------------------------------------------------------------------

def test_hub_lists_every_adapter_with_its_card(hub):
    got = {a.repo_id: a for a in timm_peft.list_adapters()}
    want = _expected()
    # base weights unknown to timm's Hub: the card does not say which base, and that is not an error
    want[CUSTOM] = _rec(CUSTOM, "ssf", None, "uoft-cs/cifar10", {"accuracy": 0.8}, None)
    assert got == want
    assert hub.requests == [{"filter": ["timm", "timm_peft"], "cardData": ["true"], "limit": ["100"]}]


@pytest.mark.parametrize("kwargs, filters, expected", [
    (dict(method="ssf"), ["ssf"], {"org/vit-ssf-cifar10", "other/vit-ssf-in21k", CUSTOM}),
    (dict(base=f"{VIT}.{TAG}"), [f"base_model:adapter:timm/{VIT}.{TAG}"],
     {"org/vit-ssf-cifar10", "org/vit-bias-cifar100"}),
    (dict(base=f"hf-hub:timm/{VIT}.{OTHER_TAG}", method="ssf"),
     ["ssf", f"base_model:adapter:timm/{VIT}.{OTHER_TAG}"], {"other/vit-ssf-in21k"}),
    (dict(task="uoft-cs/cifar100"), ["dataset:uoft-cs/cifar100"], {"org/vit-bias-cifar100", "org/resnet-linear"}),
    (dict(base="resnet10t.c3_in1k", task="uoft-cs/cifar100", method="linear"),
     ["linear", "dataset:uoft-cs/cifar100", "base_model:adapter:timm/resnet10t.c3_in1k"], {"org/resnet-linear"}),
])
def test_hub_filters_go_to_the_hub(hub, kwargs, filters, expected):
    got = timm_peft.list_adapters(**kwargs)
    assert {a.repo_id for a in got} == expected
    (params,) = hub.requests
    assert sorted(params["filter"]) == sorted(["timm", "timm_peft", *filters])
    # the same query answered with every entry: list_adapters checks each one against its card
    hub.ignore_filters = True
    assert {a.repo_id for a in timm_peft.list_adapters(**kwargs)} == expected


def test_hub_arch_without_tag_is_matched_locally_and_bounded(hub):
    # the Hub cannot filter "any weights of this arch": the scan is bounded, the match local
    got = timm_peft.list_adapters(base=VIT, method="ssf")
    assert {a.repo_id for a in got} == {"org/vit-ssf-cifar10", "other/vit-ssf-in21k"}
    assert hub.requests[0]["limit"] == [str(discovery.MAX_SCAN)]
    assert "base_model" not in " ".join(hub.requests[0]["filter"])
    # an adapter whose card does not name its base never matches a base filter
    assert CUSTOM not in {a.repo_id for a in got}


def test_hub_limit_stops_paging(hub):
    hub.page_size = 2
    got = timm_peft.list_adapters(limit=2)
    assert [a.repo_id for a in got] == list(SPECS)[:2]
    assert len(hub.requests) == 1 and hub.requests[0]["limit"] == ["2"]
    # an arch-only scan reads pages only until `limit` adapters matched
    hub.requests.clear()
    hub.entries = hub.entries * 3  # 15 entries, 8 pages of 2
    got = timm_peft.list_adapters(base=VIT, limit=4)
    assert len(got) == 4 and all(a.base.startswith(VIT + ".") for a in got)
    assert len(hub.requests) == 3  # pages 1-3 hold the 4th vit adapter; pages 4-8 never asked
    assert "cursor" not in hub.requests[0] and hub.requests[-1]["cursor"] == ["4"]


def test_hub_base_weights_from_another_repo(saved, hub_with):
    # a card may name any Hub repo as its base; that repo is then what base= asks for
    readme = saved[CUSTOM]["README.md"].replace(
        b"library_name: timm\n",
        b"library_name: timm\nbase_model: my-org/my-vit\nbase_model_relation: adapter\n")
    other = "org/vit-ssf-cifar10"
    hub = hub_with([_hub_entry(CUSTOM, readme), _hub_entry(other, saved[other]["README.md"])])
    assert timm_peft.list_adapters(base="my-org/my-vit") == [
        _rec(CUSTOM, "ssf", None, "uoft-cs/cifar10", {"accuracy": 0.8}, "my-org/my-vit")]
    assert "base_model:adapter:my-org/my-vit" in hub.requests[0]["filter"]
    hub.ignore_filters = True
    assert [a.repo_id for a in timm_peft.list_adapters(base="my-org/my-vit")] == [CUSTOM]


def test_hub_author(hub):
    got = timm_peft.list_adapters(author="org", method="ssf")
    assert [a.repo_id for a in got] == ["org/vit-ssf-cifar10"]
    assert hub.requests[0]["author"] == ["org"]


def test_hub_bad_cards_are_recorded_not_fatal(saved, hub_with):
    good = _hub_entry("org/vit-ssf-cifar10", saved["org/vit-ssf-cifar10"]["README.md"])
    bad_metric = json.loads(json.dumps(good))
    bad_metric["id"] = "bad/metric"
    result = bad_metric["cardData"]["model-index"][0]["results"][0]
    result["metrics"] = [{"type": "accuracy", "value": "high"}, {"type": "top5", "value": 0.5},
                         {"type": "bool", "value": True}, {"type": "huge", "value": 10 ** 400}]
    several = json.loads(json.dumps(good))
    several["id"] = "bad/several"
    several["cardData"].update(tags=["timm", "timm_peft", "ssf", "bias"], base_model=["a/b", "c/d"],
                               datasets=7)
    several["tags"] += ["bias"]
    hub_with([good, bad_metric, several])
    with pytest.warns(UserWarning, match=r"2 adapter card\(s\) have problems \(bad/metric, bad/several\)"):
        got = {a.repo_id: a for a in timm_peft.list_adapters()}
    assert got["org/vit-ssf-cifar10"] == _expected()["org/vit-ssf-cifar10"]
    m = got["bad/metric"]
    assert (m.method, m.base, m.task, m.metrics) == ("ssf", f"{VIT}.{TAG}", "uoft-cs/cifar10", {"top5": 0.5})
    assert len(m.problems) == 3
    assert all(f"'{k}'" in p for k, p in zip(["accuracy", "bool", "huge"], m.problems))
    s = got["bad/several"]
    assert (s.method, s.base, s.base_model) == (None, None, None)
    assert s.task == "uoft-cs/cifar10"  # no usable datasets: the model-index still names it
    assert any("several methods ['bias', 'ssf']" in p for p in s.problems)
    assert any("base_model names several repos" in p for p in s.problems)
    assert any("datasets must be a str or a list of str" in p for p in s.problems)


def test_hub_metrics_are_those_on_the_task(saved, hub_with):
    entry = _hub_entry("org/vit-ssf-cifar10", saved["org/vit-ssf-cifar10"]["README.md"])
    results = entry["cardData"]["model-index"][0]["results"]
    results.insert(0, {"task": {"type": "image-classification"},
                       "dataset": {"type": "imagenet-1k", "name": "imagenet-1k"},
                       "metrics": [{"type": "accuracy", "value": 0.3}, {"type": "loss", "value": 2.0}]})
    hub_with([entry])
    (info,) = timm_peft.list_adapters()
    assert info.task == "uoft-cs/cifar10" and info.metrics == {"accuracy": 0.91, "top5": 0.99}


@pytest.mark.parametrize("where", ["hub", "cache"])
def test_a_reader_failure_on_one_card_is_recorded(saved, hub_with, tmp_path, monkeypatch, where):
    record = discovery._record

    def flaky(repo_id, *args, **kwargs):
        if repo_id == "org/vit-bias-cifar100":
            raise RecursionError("deeply nested card")
        return record(repo_id, *args, **kwargs)
    monkeypatch.setattr(discovery, "_record", flaky)
    repos = ["org/vit-ssf-cifar10", "org/vit-bias-cifar100", "org/resnet-linear"]
    hub_with([_hub_entry(r, saved[r]["README.md"]) for r in repos])
    for r in repos:
        _cache_repo(tmp_path, r, saved[r])
    with pytest.warns(UserWarning, match=r"1 adapter card\(s\) have problems \(org/vit-bias-cifar100\)"):
        got = timm_peft.list_adapters(local_files_only=where == "cache", cache_dir=tmp_path)
    assert [a.repo_id for a in got] == (sorted(repos) if where == "cache" else repos)
    bad = next(a for a in got if a.repo_id == "org/vit-bias-cifar100")
    assert bad.method is None and "RecursionError('deeply nested card')" in bad.problems[0]
    assert all(a.method for a in got if a is not bad)


def test_hub_card_that_breaks_huggingface_hub_ends_the_listing_with_a_warning(saved, hub_with):
    entries = [_hub_entry(r, saved[r]["README.md"]) for r in list(SPECS)[:2]]
    broken = dict(entries[0], id="bad/tags", cardData={"tags": 5})  # ModelInfo itself raises
    hub_with([entries[0], broken, entries[1]])
    with pytest.warns(UserWarning, match="stopped early at a malformed entry or model card"):
        got = timm_peft.list_adapters()
    assert [a.repo_id for a in got] == [list(SPECS)[0]]


def test_hub_unreachable_falls_back_to_the_cache(hub, saved, tmp_path):
    cache = tmp_path / "cache"
    _cache_repo(cache, "org/vit-bias-cifar100", saved["org/vit-bias-cifar100"])
    hub.unreachable = True
    with pytest.warns(UserWarning, match="cannot be reached.*local Hub cache instead"):
        got = timm_peft.list_adapters(cache_dir=cache)
    assert got == [_expected("cache")["org/vit-bias-cifar100"]]
    assert len(hub.requests) == 0  # the transport failed before any answer


# ----------------------------------------------------------------------------------------------
# the local Hub cache
# ----------------------------------------------------------------------------------------------

def _cache_repo(cache: Path, repo_id: str, files: dict, ref: str = "main") -> str:
    """Write ``files`` as a snapshot of ``repo_id`` in huggingface_hub's cache layout (blobs + links)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    sha = hashlib.sha1(b"".join(files[k] for k in sorted(files)) + ref.encode()).hexdigest()
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    return sha


@pytest.fixture
def cache(saved, tmp_path, monkeypatch):
    """An offline Hub cache with adapters as users get them, next to repos that are not ours."""
    cache = tmp_path / "hub_cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _cache_repo(cache, "org/vit-ssf-cifar10", saved["org/vit-ssf-cifar10"])  # every file
    # as from_pretrained downloads it: config and weights, no card
    _cache_repo(cache, "org/vit-bias-cifar100",
                {k: v for k, v in saved["org/vit-bias-cifar100"].items() if k in (CONFIG_NAME, WEIGHTS_NAME)})
    _cache_repo(cache, "other/vit-ssf-in21k", saved["other/vit-ssf-in21k"], ref="v1")  # a branch only
    _cache_repo(cache, CUSTOM, saved[CUSTOM])
    # not timm_peft adapters: plain timm weights, an HF peft LoRA adapter
    _cache_repo(cache, f"timm/{VIT}.{TAG}", {TIMM_CONFIG_NAME: b'{"architecture": "vit"}',
                                             "model.safetensors": b"x"})
    _cache_repo(cache, "peft/lora", {CONFIG_NAME: b'{"peft_type": "LORA", "base_model_name_or_path": "x"}',
                                     "adapter_model.safetensors": b"x"})
    return cache


def test_cache_lists_adapters_offline(cache, saved, hub_with):
    want = _expected("cache")
    want["org/vit-bias-cifar100"] = _rec("org/vit-bias-cifar100", "bias", f"{VIT}.{TAG}", None, {}, None,
                                         source="cache")  # no card cached: task and metrics unknown
    want["other/vit-ssf-in21k"].revision = "v1"
    want[CUSTOM] = _rec(CUSTOM, "ssf", f"{VIT}.own_weights", "uoft-cs/cifar10", {"accuracy": 0.8}, None,
                        source="cache")  # adapter_config.json names the base the card could not
    del want["org/resnet-linear"]
    # a later branch of a repo whose main is cached: main is what hf-hub:<repo> loads
    _cache_repo(cache, "org/vit-ssf-cifar10", saved["org/vit-bias-cifar100"], ref="v2")
    got = timm_peft.list_adapters()
    assert got == sorted(want.values(), key=lambda a: a.repo_id)
    assert [a.hub_id for a in got if a.revision] == ["hf-hub:other/vit-ssf-in21k@v1"]
    # local_files_only reads the cache without asking the Hub, online too
    hub = hub_with([])
    assert timm_peft.list_adapters(local_files_only=True) == got
    assert hub.requests == []


@pytest.mark.parametrize("kwargs, expected", [
    (dict(method="ssf"), {"org/vit-ssf-cifar10", "other/vit-ssf-in21k", CUSTOM}),
    (dict(base=f"{VIT}.{TAG}"), {"org/vit-ssf-cifar10", "org/vit-bias-cifar100"}),
    (dict(base=f"timm/{VIT}.{OTHER_TAG}"), {"other/vit-ssf-in21k"}),
    (dict(base=VIT, method="ssf"), {"org/vit-ssf-cifar10", "other/vit-ssf-in21k", CUSTOM}),
    (dict(base=f"{VIT}.own_weights"), {CUSTOM}),
    (dict(task="uoft-cs/cifar10", author="org"), {"org/vit-ssf-cifar10"}),
    (dict(task="uoft-cs/cifar100"), set()),  # the bias adapter's card is not cached: its task is unknown
    (dict(limit=2), {CUSTOM, "org/vit-bias-cifar100"}),  # the first two by repo id
])
def test_cache_filters(cache, kwargs, expected):
    assert {a.repo_id for a in timm_peft.list_adapters(**kwargs)} == expected


def test_cache_arch_is_matched_whole(cache, saved):
    # an arch matches the base's whole arch: resnet10t is not resnet10t_x
    _cache_repo(cache, "org/resnet-linear", saved["org/resnet-linear"])
    cfg = {**json.loads(saved["org/resnet-linear"][CONFIG_NAME]), "architecture": "resnet10t_x",
           "base_model_name_or_path": "resnet10t_x.c3_in1k"}
    _cache_repo(cache, "org/resnet-x", {**saved["org/resnet-linear"], CONFIG_NAME: json.dumps(cfg).encode()})
    assert [a.base for a in timm_peft.list_adapters(method="linear")] == ["resnet10t.c3_in1k",
                                                                          "resnet10t_x.c3_in1k"]
    assert [a.repo_id for a in timm_peft.list_adapters(base="resnet10t")] == ["org/resnet-linear"]


def test_listed_cache_adapter_loads_offline(cache, saved, weights):
    (info,) = timm_peft.list_adapters(base=f"{VIT}.{OTHER_TAG}")
    model = timm_peft.from_pretrained(info.hub_id, pretrained_cfg_overlay=local_overlay(weights[VIT]))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), _build(SPECS[info.repo_id][0], weights)(x))


def test_cache_bad_files_are_recorded_not_fatal(cache, saved, monkeypatch):
    card = saved["org/vit-ssf-cifar10"]["README.md"]
    _cache_repo(cache, "bad/config", {CONFIG_NAME: b"{not json", "README.md": card,
                                      WEIGHTS_NAME: b"x"})
    _cache_repo(cache, "bad/yaml", {**saved["org/vit-bias-cifar100"],
                                    "README.md": b"---\nfoo: [unclosed\n---\n"})
    _cache_repo(cache, "bad/no-weights", {CONFIG_NAME: saved["org/resnet-linear"][CONFIG_NAME]})
    with pytest.warns(UserWarning, match=r"3 adapter card\(s\) have problems"):
        got = {a.repo_id: a for a in timm_peft.list_adapters(author="bad")}
    c = got["bad/config"]  # the card still says what it is
    assert (c.method, c.base, c.task) == ("ssf", f"{VIT}.{TAG}", "uoft-cs/cifar10")
    assert c.problems[0].startswith(f"{CONFIG_NAME}: not valid JSON")
    y = got["bad/yaml"]  # the config still says what it is
    assert (y.method, y.base, y.task) == ("bias", f"{VIT}.{TAG}", None)
    assert "unreadable YAML" in y.problems[0]
    n = got["bad/no-weights"]
    assert n.method == "linear" and f"{WEIGHTS_NAME} is not in the cache" in n.problems[0]
    # files above the size bound are not read: here the card, not the config
    files = saved["org/vit-ssf-cifar10"]
    bound = len(files[CONFIG_NAME])
    assert len(files["README.md"]) > bound
    monkeypatch.setattr(discovery, "MAX_FILE_BYTES", bound)
    with pytest.warns(UserWarning, match=r"1 adapter card\(s\) have problems \(org/vit-ssf-cifar10\)"):
        (info,) = timm_peft.list_adapters(base=f"timm/{VIT}.{TAG}", method="ssf")
    assert (info.method, info.task, info.metrics) == ("ssf", None, {})
    assert info.problems == (f"README.md: {len(files['README.md']):,d} bytes, more than the "
                             f"{bound:,d} read",)
    # neither config nor card read: nothing tells it is a timm_peft adapter
    monkeypatch.setattr(discovery, "MAX_FILE_BYTES", 100)
    assert timm_peft.list_adapters(author="org") == []


def test_empty_or_missing_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert timm_peft.list_adapters(cache_dir=tmp_path / "nothing_here") == []


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(base=f"{VIT}.{TAG}.ssf"), ValueError, "ends in the PEFT method 'ssf'.*method="),
    (dict(base="vit_tiny"), ValueError, "'vit_tiny' is not a timm architecture"),
    (dict(base="org/na/me"), ValueError, "is not a Hub repo id"),
    (dict(base=3), TypeError, "base must be a str"),
    (dict(method="vpt_shallow"), ValueError, "preset of 'vpt'.*method='vpt'"),
    (dict(method="dora"), ValueError, r"unknown PEFT method 'dora'; .* one of \['adapter'"),
    (dict(task=""), ValueError, "task must be a non-empty name"),
    (dict(task=["uoft-cs/cifar10"]), TypeError, "task must be a str"),
    (dict(author=" org"), ValueError, "author must be a non-empty name"),
    (dict(limit=0), ValueError, "limit must be between 1 and 1000, got 0"),
    (dict(limit=10**6), ValueError, "limit must be between 1 and 1000"),
    (dict(limit=2.0), TypeError, "limit must be an int"),
    (dict(limit=True), TypeError, "limit must be an int"),
    (dict(local_files_only="yes"), TypeError, "local_files_only must be a bool"),
])
def test_bad_arguments_fail_before_any_request(hub, kwargs, error, match):
    with pytest.raises(error, match=match):
        timm_peft.list_adapters(**kwargs)
    assert hub.requests == []

