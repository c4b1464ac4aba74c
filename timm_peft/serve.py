"""Serve many adapters on one frozen backbone over HTTP, with Ray Serve (``timm-peft serve``).

A replica holds one frozen timm backbone and an LRU of adapters loaded onto it with
:func:`timm_peft.load_adapter` (``adapter_name=``), so every adapter it serves costs only its
own tensors. Requests (an image and an adapter id) are collected across adapter ids by
``@serve.batch``; within a batch, requests whose adapters share a method, a config and the
structure :func:`timm_peft.route` needs run in **one** backbone pass, routed per sample; the
rest run grouped, one pass per group. Ray Serve does the HTTP (FastAPI ingress), the replicas,
the queueing and the batching; this module only decides what runs together, including the
batches Ray closed while the backbone was busy, which share its next pass.

Adapters are untrusted input here too. Ids the replica does not hold are loaded on demand, from
the Hub (``hf-hub:<org>/<name>``) or from a directory under ``adapter_root``, through the
library's checked loader (:func:`timm_peft.load_adapter`, which runs every check on a twin of
the model before it touches the model): a failed load leaves the model as it was, is answered
with a 4xx and is remembered for ``failure_ttl_s`` seconds instead of being retried on every
request. An optional allow-list (ids or prefixes) bounds which ids may be loaded at all. Images are
bounded in bytes and pixels and decoded only from common raster formats.

The engine (:class:`AdapterEngine`) has no Ray in it: it is the part that can be unit-tested and
reused behind another front end. :func:`build_app` wraps it in a Ray Serve deployment.

Example:
    >>> import tempfile, timm, timm_peft, torch
    >>> from timm_peft.serve import AdapterEngine, encode_image
    >>> kw = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    >>> m = timm.create_model("vit_tiny_patch16_224.bias", num_classes=3, **kw)
    >>> d = timm_peft.save_pretrained(m, tempfile.mkdtemp(), label_names=["a", "b", "c"])
    >>> engine = AdapterEngine("vit_tiny_patch16_224", {"abc": str(d)}, pretrained=False,
    ...                        check_base=False, model_kwargs=kw)
    >>> x = engine.preprocess("abc", encode_image(torch.zeros(3, 40, 40)))
    >>> out = engine.run_batch([("abc", x, 2)])[0]
    >>> [p["label"] in ("a", "b", "c") for p in out["predictions"]]
    [True, True]
    >>> engine.stats()["backbone_passes"]
    1
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures' real types
import base64
import binascii
import collections
import concurrent.futures
import hashlib
import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .adapters import delete_adapter, get_adapters, route, set_adapter, using_adapter
from .io import HUB_PREFIX, load_adapter, verify_adapter
from .io.load import resolve_adapter_dir

__all__ = ["AdapterEngine", "RequestError", "build_app", "app_builder", "start", "encode_image",
           "IMAGE_FORMATS"]

_log = logging.getLogger(__name__)

#: raster formats an image may come in (PIL decodes many more; some call external programs)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
#: the placeholder adapter the backbone is built with: never served, never evicted
_PLACEHOLDER = "default"


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP status (4xx), the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def encode_image(image: Any, format: str = "PNG") -> bytes:
    """``image`` (a PIL image or a ``(3, H, W)`` float tensor in [0, 1]) as file bytes.

    Example:
        >>> import torch
        >>> encode_image(torch.ones(3, 4, 4))[:4]
        b'\\x89PNG'
    """
    from PIL import Image
    if isinstance(image, torch.Tensor):
        arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise TypeError(f"encode_image takes a PIL image or a (3, H, W) tensor, "
                        f"got {type(image).__name__}")
    buf = io.BytesIO()
    image.save(buf, format=format)
    return buf.getvalue()


@dataclass
class _Entry:
    """One adapter the replica holds: its name on the model and what serving it needs."""

    adapter_id: str
    name: str
    source: str
    method: str
    num_classes: int
    labels: list[str] | None
    data_config: dict[str, Any]
    transform: Callable[[Any], torch.Tensor]
    #: adapters with equal keys run in one routed backbone pass
    key: tuple[Any, ...]
    pins: int = 0
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return dict(id=self.adapter_id, method=self.method, num_classes=self.num_classes,
                    labels=self.labels, data_config=self.data_config)


def _route_key(model: nn.Module, name: str) -> tuple[Any, ...]:
    """What :func:`timm_peft.route` needs adapters to share: method, config, structural tensors."""
    a = get_adapters(model)[name]
    structural = hashlib.sha256()
    for k in sorted(a.state):
        t = a.state[k]
        if not t.is_floating_point():  # e.g. E²VPT's pruning masks shape the forward
            structural.update(f"{k}|{tuple(t.shape)}|".encode())
            structural.update(t.detach().cpu().contiguous().numpy().tobytes())
    return a.method, json.dumps(a.config.to_dict(), sort_keys=True, default=str), \
        structural.hexdigest()


class AdapterEngine:
    """One frozen backbone, an LRU of adapters on it, and mixed-adapter batched inference.

    Args:
        model: the backbone, a timm name ``<arch>[.<tag>]`` (every adapter must be for it).
        adapters: the adapters to load at start, ``{id: source}`` or a list of sources (each
            its own id); a source is a directory, ``local-dir:<dir>`` or ``hf-hub:<org>/<name>``.
        max_adapters: adapters held at once; the least recently used unpinned one is deleted
            (:func:`timm_peft.delete_adapter`: the backbone is never touched) to load another.
        allow: ids or id prefixes that may be loaded on demand (None: any Hub id, and any
            directory under ``adapter_root``). Adapters given at start are always allowed.
        adapter_root: where ids that are not Hub ids are looked up on demand (None: nowhere).
        pretrained, pretrained_file, model_kwargs: how the backbone is built
            (``timm.create_model``; ``pretrained_file`` is a local weights file, timm's path).
        check_base: refuse adapters trained on other base weights (their fingerprint).
        top_k: predictions per answer unless the request asks for fewer or more (<= 100).
        max_image_bytes, max_image_pixels: bounds on an image, before and after its header.
        failure_ttl_s: how long a failed load is answered from memory before it is retried.
        device: where the backbone runs.
    """

    def __init__(self, model: str, adapters: Mapping[str, str] | Sequence[str] = (), *,
                 max_adapters: int = 16, allow: Sequence[str] | None = None,
                 adapter_root: str | os.PathLike | None = None, pretrained: bool = True,
                 pretrained_file: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
                 check_base: bool = True, top_k: int = 5, max_image_bytes: int = 16 << 20,
                 max_image_pixels: int = 40_000_000, failure_ttl_s: float = 60.0,
                 device: str = "cpu") -> None:
        import timm
        if not isinstance(max_adapters, int) or max_adapters < 1:
            raise ValueError(f"max_adapters must be an int >= 1, got {max_adapters!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= 100:
            raise ValueError(f"top_k must be an int in [1, 100], got {top_k!r}")
        self.sources = dict(adapters) if isinstance(adapters, Mapping) else \
            {str(s): str(s) for s in adapters}
        self.max_adapters = max_adapters
        self.allow = None if allow is None else tuple(allow)
        self.adapter_root = None if adapter_root is None else Path(adapter_root).resolve()
        self.check_base = check_base
        self.top_k = top_k
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.failure_ttl_s = failure_ttl_s
        self.model_name = model
        kwargs = dict(model_kwargs or {})
        if pretrained_file is not None:
            kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file), custom_load=False)
            pretrained = True
        # a linear-probe placeholder gives the backbone its adapter host; it is never served
        self.model = timm.create_model(model, pretrained=pretrained, peft="linear",
                                       **kwargs).to(device).eval()
        self.device = torch.device(device)
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._failures: collections.OrderedDict[str, tuple[float, RequestError]] = \
            collections.OrderedDict()
        self._meta = threading.Lock()          # entries, pins, failures, counters: quick
        self._model_lock = threading.Lock()    # the model: loads, evictions, forwards
        self._loading: dict[str, threading.Lock] = {}
        self._serial = 0
        self.counters = collections.Counter(dict.fromkeys(
            ("requests", "batches", "max_batch", "backbone_passes", "routed_passes", "loads",
             "evictions", "load_failures", "cached_failures"), 0))
        for adapter_id in self.sources:
            try:
                self.unpin(self.pin(adapter_id))
            except RequestError as e:
                raise ValueError(f"adapter {adapter_id!r} given at start: {e.message}") from e

    # ------------------------------------------------------------------------------------------
    # adapters
    # ------------------------------------------------------------------------------------------

    def _source(self, adapter_id: str) -> str:
        """Where an id is loaded from; a RequestError for ids that may not be loaded."""
        if (not isinstance(adapter_id, str) or not adapter_id or len(adapter_id) > 512
                or not adapter_id.isprintable()):
            raise RequestError(400, "the adapter id must be a non-empty string of at most 512 "
                               "printable characters")
        if adapter_id in self.sources:
            return self.sources[adapter_id]
        if self.allow is not None and not any(adapter_id.startswith(a) for a in self.allow):
            raise RequestError(403, f"adapter {adapter_id!r} is not allowed here: this server "
                               f"loads the ids {sorted(self.sources)} and ids starting with "
                               f"{list(self.allow)}")
        if adapter_id.startswith(HUB_PREFIX):
            return adapter_id
        if self.adapter_root is not None:
            rel = Path(adapter_id)
            # one spelling per directory ('a', not 'a/' or './a'): aliases would each take a
            # place in the LRU
            if rel.is_absolute() or ".." in rel.parts or rel.as_posix() != adapter_id:
                raise RequestError(400, f"adapter {adapter_id!r}: an id under the adapter root "
                                   "is a relative path in its plain form ('a/b': no '..', '.', "
                                   "'//' or trailing '/')")
            try:
                target = (self.adapter_root / rel).resolve()
                is_dir = target.is_dir()
            except (OSError, RuntimeError) as e:  # a symlink loop, a name the OS refuses
                raise RequestError(404, f"unknown adapter {adapter_id!r}: its path under the "
                                   f"adapter root does not resolve ({type(e).__name__})") from e
            if self.adapter_root not in target.parents:
                raise RequestError(400, f"adapter {adapter_id!r}: an id under the adapter root "
                                   "stays inside it (its symlinks too)")
            if not is_dir:
                raise RequestError(404, f"unknown adapter {adapter_id!r}: not one of "
                                   f"{sorted(self.sources)} and no such adapter directory under "
                                   "the adapter root")
            return str(target)
        raise RequestError(404, f"unknown adapter {adapter_id!r}: this server holds "
                           f"{sorted(self.sources)}; other ids load on demand when they are "
                           f"'{HUB_PREFIX}<org>/<name>'")

    def pin(self, adapter_id: str) -> _Entry:
        """The adapter ``adapter_id``, loaded if needed, pinned (not evicted) until :meth:`unpin`.

        Raises :class:`RequestError` (403, 404, 422) for ids that may not or cannot be loaded.
        """
        with self._meta:
            entry = self._entries.get(adapter_id)
            if entry is not None:
                entry.pins += 1
                self._entries.move_to_end(adapter_id)
                return entry
            failed = self._failures.get(adapter_id)
            if failed is not None and time.monotonic() - failed[0] < self.failure_ttl_s:
                self.counters["cached_failures"] += 1
                raise failed[1]
            lock = self._loading.setdefault(adapter_id, threading.Lock())
        with lock:  # one load per id at a time; the others wait for it and find it loaded
            with self._meta:
                entry = self._entries.get(adapter_id)
                if entry is not None:
                    entry.pins += 1
                    self._entries.move_to_end(adapter_id)
                    return entry
                failed = self._failures.get(adapter_id)
                if failed is not None and time.monotonic() - failed[0] < self.failure_ttl_s:
                    raise failed[1]
            try:
                entry = self._load(adapter_id)
            except RequestError as e:
                with self._meta:
                    self._failures[adapter_id] = (time.monotonic(), e)
                    while len(self._failures) > 4096:  # bounded, whatever ids clients send
                        self._failures.popitem(last=False)
                    self.counters["load_failures"] += 1
                    self._loading.pop(adapter_id, None)
                raise
            with self._meta:
                self._failures.pop(adapter_id, None)
                self._loading.pop(adapter_id, None)
            return entry

    def unpin(self, entry: _Entry) -> None:
        with self._meta:
            entry.pins -= 1

    def _load(self, adapter_id: str) -> _Entry:
        """Fetch the adapter, add it to the model (every check runs first on a twin), then make
        room."""
        source = self._source(adapter_id)
        try:
            adapter_dir = resolve_adapter_dir(source)  # a Hub download: outside the model lock
        except Exception as e:  # AdapterError names the file and field; anything else too
            raise RequestError(422, f"adapter {adapter_id!r} cannot be loaded: "
                               f"{type(e).__name__}: {e}") from e
        with self._model_lock:
            with self._meta:
                self._serial += 1
                name = f"a{self._serial}"
            try:
                load_adapter(self.model, adapter_dir, check_base=self.check_base,
                             adapter_name=name)
            except Exception as e:  # load_adapter removes what it added: the model is as it was
                raise RequestError(422, f"adapter {adapter_id!r} cannot be loaded: "
                                   f"{type(e).__name__}: {e}") from e
            try:
                entry = self._describe(adapter_id, name, str(source))
            except Exception as e:
                delete_adapter(self.model, name)
                raise RequestError(422, f"adapter {adapter_id!r} cannot be served: "
                                   f"{type(e).__name__}: {e}") from e
            with self._meta:
                entry.pins = 1
                self._entries[adapter_id] = entry
                self.counters["loads"] += 1
            self._evict(keep=self.max_adapters)  # after the load: a failed one evicts nothing
        _log.info("loaded adapter %r from %s as %s (%s)", adapter_id, source, name, entry.method)
        return entry

    def _describe(self, adapter_id: str, name: str, source: str) -> _Entry:
        from timm.data import create_transform, resolve_data_config
        with using_adapter(self.model, name):
            pc = dict(self.model.pretrained_cfg or {})
            dc = resolve_data_config({}, model=self.model)
            num_classes = int(self.model.num_classes)
        labels = pc.get("label_names")
        return _Entry(adapter_id=adapter_id, name=name, source=source,
                      method=get_adapters(self.model)[name].method, num_classes=num_classes,
                      labels=list(labels) if labels and len(labels) == num_classes else None,
                      data_config={k: list(v) if isinstance(v, tuple) else v
                                   for k, v in dc.items()},
                      transform=create_transform(**dc, is_training=False),
                      key=_route_key(self.model, name))

    def _evict(self, keep: int) -> None:
        """Delete least recently used, unpinned adapters until at most ``keep`` are held
        (pinned ones are in flight: while more than ``max_adapters`` are, the LRU overflows)."""
        while True:
            with self._meta:
                if len(self._entries) <= keep:
                    return
                victim = next((e for e in self._entries.values() if e.pins == 0), None)
                if victim is None:
                    return
                del self._entries[victim.adapter_id]
                self.counters["evictions"] += 1
            delete_adapter(self.model, victim.name)  # its tensors only; the base is untouched
            _log.info("evicted adapter %r", victim.adapter_id)

    # ------------------------------------------------------------------------------------------
    # requests
    # ------------------------------------------------------------------------------------------

    def decode(self, data: bytes) -> Any:
        """Bytes -> an RGB PIL image, bounded in bytes and pixels (RequestError 413/415)."""
        from PIL import Image
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise RequestError(400, "no image: send the image file's bytes")
        if len(data) > self.max_image_bytes:
            raise RequestError(413, f"the image is {len(data):,d} bytes; at most "
                               f"{self.max_image_bytes:,d} are accepted")
        try:
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Exception as e:  # PIL's UnidentifiedImageError, and anything a header can do
            raise RequestError(415, f"not an image in a supported format ({', '.join(IMAGE_FORMATS)}): "
                               f"{type(e).__name__}") from e
        w, h = im.size
        if w < 1 or h < 1 or w * h > self.max_image_pixels:
            raise RequestError(413, f"the image is {w}x{h} pixels; at most "
                               f"{self.max_image_pixels:,d} pixels are accepted")
        try:
            return im.convert("RGB")
        except Exception as e:  # truncated or corrupt data past the header
            raise RequestError(415, f"the image cannot be decoded: {type(e).__name__}: {e}") from e

    def preprocess(self, adapter: str | _Entry, data: bytes) -> torch.Tensor:
        """Decode ``data`` and apply the adapter's own data configuration (its eval transform)."""
        entry = adapter if isinstance(adapter, _Entry) else self._entries[adapter]
        return entry.transform(self.decode(data))

    def run_batch(self, items: Sequence[tuple[str | _Entry, torch.Tensor, int | None]]
                  ) -> list[dict[str, Any]]:
        """Answer ``(adapter, preprocessed image, top_k)`` items; each answer is a dict.

        Items whose adapters share a route key and input size run in one backbone pass
        (:func:`timm_peft.route` when they name several adapters); each other group runs in
        its own pass. An item whose adapter was evicted after it was queued (its request was
        cancelled, which unpinned it) is answered ``{"adapter", "error"}`` and runs nothing;
        the others in the pass are unaffected.
        """
        entries = [it[0] if isinstance(it[0], _Entry) else self._entries[it[0]] for it in items]
        logits: list[torch.Tensor | None] = [None] * len(items)
        with self._model_lock, torch.inference_mode():
            # under the model lock no load can evict, so what is held now is held for the pass
            with self._meta:
                held = [self._entries.get(e.adapter_id) is e for e in entries]
            groups: dict[tuple[Any, ...], list[int]] = {}
            for i, (entry, (_, x, _)) in enumerate(zip(entries, items)):
                if held[i]:
                    groups.setdefault((entry.key, tuple(x.shape)), []).append(i)
            for idx in groups.values():
                names = [entries[i].name for i in idx]
                x = torch.stack([items[i][1] for i in idx]).to(self.device)
                # one copy to the host per pass: the per-request softmax and top-k below then
                # launch no device work and wait for no device (on a GPU: 3 kernels, 2 waits each)
                for i, row in zip(idx, self._forward(names, x).float().cpu()):
                    logits[i] = row
        with self._meta:
            self.counters["batches"] += 1
            self.counters["requests"] += len(items)
            self.counters["max_batch"] = max(self.counters["max_batch"], len(items))
        out: list[dict[str, Any]] = []
        for entry, (_, _, k), row in zip(entries, items, logits):
            if row is None:
                out.append(dict(adapter=entry.adapter_id, error="the adapter was evicted while "
                                "this request waited (it had been cancelled)"))
                continue
            row = row[:entry.num_classes].softmax(-1)
            scores, index = row.topk(min(k or self.top_k, entry.num_classes))
            out.append(dict(adapter=entry.adapter_id, predictions=[
                dict(label=entry.labels[i] if entry.labels else str(i), index=i, score=s)
                for i, s in zip(index.tolist(), scores.tolist())]))
        return out

    def _forward(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        """One backbone pass over ``x``, sample i with adapter ``names[i]`` (model lock held)."""
        if len(set(names)) == 1:
            set_adapter(self.model, names[0])
            self.counters["backbone_passes"] += 1
            return self.model(x)
        try:
            with route(self.model, names):
                out = self.model(x)
            self.counters["backbone_passes"] += 1
            self.counters["routed_passes"] += 1
            return out
        except ValueError:  # adapters route refuses together after all: one pass per adapter
            parts = {}
            for n in dict.fromkeys(names):
                idx = [i for i, m in enumerate(names) if m == n]
                parts[n] = (idx, self._forward([n] * len(idx), x[idx]))
            width = max(p.shape[1] for _, p in parts.values())
            rows = x.new_full((len(names), width), float("-inf"))
            for idx, p in parts.values():
                rows[idx, :p.shape[1]] = p
            return rows

    def predict(self, adapter_id: str, data: bytes, top_k: int | None = None) -> dict[str, Any]:
        """One request, unbatched: pin, preprocess, run (what a front end without batching does)."""
        entry = self.pin(adapter_id)
        try:
            return self.run_batch([(entry, self.preprocess(entry, data), top_k)])[0]
        finally:
            self.unpin(entry)

    def listing(self) -> dict[str, Any]:
        with self._meta:
            loaded = [e.describe() for e in self._entries.values()]
        return dict(model=self.model_name, max_adapters=self.max_adapters, loaded=loaded,
                    configured=sorted(self.sources), allow=list(self.allow) if self.allow else None,
                    on_demand=dict(hub=True, adapter_root=self.adapter_root is not None))

    def stats(self) -> dict[str, int]:
        with self._meta:
            return dict(self.counters, loaded=len(self._entries))


class _PassMerger:
    """Runs batches on one model thread; the batches that queue while a pass runs share the next.

    Ray Serve's ``@serve.batch`` closes a batch ``batch_wait`` after its first request whether or
    not the backbone is free, so under load the batches that wait for the backbone are small
    (1.0-1.7 requests each for Ray's own batching in the serving report, with 32 clients). Ray
    hands them all to :meth:`run` (``max_concurrent_batches``); every batch waiting when the model
    thread frees up joins the next pass, up to ``max_size`` requests, so passes grow with the load
    while an idle server still runs a batch the moment Ray closes it. A pass that raises fails the
    batches in it, as a failed Ray batch fails its requests.

    Example:
        >>> import asyncio, concurrent.futures
        >>> passes = []
        >>> merger = _PassMerger(lambda items: passes.append(list(items)) or items,
        ...                      concurrent.futures.ThreadPoolExecutor(1), max_size=4)
        >>> async def burst():
        ...     return await asyncio.gather(*(merger.run([i]) for i in range(6)))
        >>> asyncio.run(burst()), passes
        ([[0], [1], [2], [3], [4], [5]], [[0, 1, 2, 3], [4, 5]])
    """

    def __init__(self, fn: Callable[[list[Any]], list[Any]],
                 executor: concurrent.futures.Executor, max_size: int) -> None:
        self.fn, self.executor, self.max_size = fn, executor, max_size
        self._waiting: collections.deque = collections.deque()  # (items, future)
        self._busy = False
        self._task: Any = None  # the running pass loop (a reference keeps the task alive)

    async def run(self, items: list[Any]) -> list[Any]:
        """``fn``'s answers for ``items``, computed in a pass shared with other waiting batches."""
        import asyncio
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future))
        if not self._busy:  # the pass loop runs as its own task: no caller waits for others
            self._busy = True
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        import asyncio
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                taken, size = [], 0
                while self._waiting and (not taken or
                                         size + len(self._waiting[0][0]) <= self.max_size):
                    taken.append(self._waiting.popleft())
                    size += len(taken[-1][0])
                flat = [it for items, _ in taken for it in items]
                try:
                    out = await loop.run_in_executor(self.executor, self.fn, flat)
                except Exception as e:  # noqa: BLE001 - handed to each waiting request
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(e)
                    continue
                start = 0
                for items, future in taken:
                    if not future.done():  # a batch whose handler Ray cancelled is skipped
                        future.set_result(out[start:start + len(items)])
                    start += len(items)
        finally:
            self._busy = False


# ----------------------------------------------------------------------------------------------
# Ray Serve
# ----------------------------------------------------------------------------------------------

# batches Ray may hand a replica at once; they merge into passes of max_batch_size
_BATCHES_IN_FLIGHT = 8


def _parse_request(body: bytes, content_type: str, query: Mapping[str, str],
                   max_body: int) -> tuple[str, bytes, int | None]:
    """``(adapter id, image bytes, top_k)`` from a JSON body or raw image bytes + query."""
    if len(body) > max_body:
        raise RequestError(413, f"the request body is {len(body):,d} bytes; at most "
                           f"{max_body:,d} are accepted")
    if content_type.split(";")[0].strip().lower() == "application/json":
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON: {e}") from e
        except RecursionError:  # "[[[[..." within the size bound: the parser's own stack
            raise RequestError(400, "the JSON body is nested too deeply; expected "
                               '{"adapter": ID, "image": BASE64, "top_k": K}') from None
        if not isinstance(payload, dict):
            raise RequestError(400, "the JSON body must be an object "
                               '{"adapter": ID, "image": BASE64, "top_k": K}')
        unknown = sorted(set(payload) - {"adapter", "image", "top_k"})
        if unknown:
            raise RequestError(400, f"unknown fields {unknown}; allowed: adapter, image, top_k")
        adapter, image, top_k = payload.get("adapter"), payload.get("image"), payload.get("top_k")
        if not isinstance(image, str):
            raise RequestError(400, "field 'image' must be the image file's bytes in base64")
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"field 'image' is not valid base64: {e}") from e
    else:
        adapter, data, top_k = query.get("adapter"), body, query.get("top_k")
        if top_k is not None:
            try:
                top_k = int(top_k)
            except ValueError:
                raise RequestError(400, f"top_k must be an integer, got {top_k!r}") from None
    if not isinstance(adapter, str) or not adapter:
        raise RequestError(400, "no adapter: give the adapter id ('adapter' in the JSON body, "
                           "or ?adapter=ID with raw image bytes)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                              or not 1 <= top_k <= 100):
        raise RequestError(400, f"top_k must be an integer in [1, 100], got {top_k!r}")
    return adapter, data, top_k


def _deployment_class() -> Any:
    """The Ray Serve deployment (built on first use, so that Ray is imported only here)."""
    global _DEPLOYMENT
    if _DEPLOYMENT is not None:
        return _DEPLOYMENT
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI(title="timm_peft", description="Many adapters on one frozen timm backbone")

    def refuse(e: RequestError) -> JSONResponse:
        return JSONResponse(status_code=e.status, content=dict(error=e.message))

    @serve.deployment(name="timm_peft")
    @serve.ingress(api)
    class TimmPeftServer:
        """One replica: an :class:`AdapterEngine`, batched by ``@serve.batch``."""

        def __init__(self, engine_kwargs: dict[str, Any], max_batch_size: int,
                     batch_wait_s: float) -> None:
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
            self.engine = AdapterEngine(**engine_kwargs)
            # the model's own thread: batches never queue behind decoding in the default pool
            self.passes = _PassMerger(self.engine.run_batch, concurrent.futures.ThreadPoolExecutor(
                1, "timm_peft-model"), max_batch_size)
            self.max_body = self.engine.max_image_bytes * 4 // 3 + 4096  # base64 + JSON
            self.infer.set_max_batch_size(max_batch_size)
            self.infer.set_batch_wait_timeout_s(batch_wait_s)

        @api.get("/healthz")
        def healthz(self) -> dict[str, Any]:
            return dict(status="ok", loaded=len(self.engine._entries))

        @api.get("/adapters")
        def adapters(self) -> dict[str, Any]:
            return self.engine.listing()

        @api.get("/stats")
        def stats(self) -> dict[str, Any]:
            return self.engine.stats()

        @api.post("/predict")
        async def predict(self, request: Request) -> Any:
            try:
                length = int(request.headers.get("content-length") or 0)
            except ValueError:
                length = 0
            if length > self.max_body:
                return refuse(RequestError(413, f"the request body is {length:,d} bytes; at "
                                           f"most {self.max_body:,d} are accepted"))
            body = bytearray()
            async for chunk in request.stream():  # bounded even without a Content-Length
                body += chunk
                if len(body) > self.max_body:
                    return refuse(RequestError(413, f"the request body is over "
                                               f"{self.max_body:,d} bytes"))
            try:
                adapter, data, top_k = _parse_request(
                    bytes(body), request.headers.get("content-type", ""),
                    dict(request.query_params), self.max_body)
                entry = await asyncio.to_thread(self.engine.pin, adapter)
            except RequestError as e:
                return refuse(e)
            try:
                x = await asyncio.to_thread(self.engine.preprocess, entry, data)
                return await self.infer((entry, x, top_k))
            except RequestError as e:
                return refuse(e)
            finally:
                self.engine.unpin(entry)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005,
                     max_concurrent_batches=_BATCHES_IN_FLIGHT)
        async def infer(self, items: list[tuple[_Entry, torch.Tensor, int | None]]
                        ) -> list[dict[str, Any]]:
            return await self.passes.run(items)

    _DEPLOYMENT = TimmPeftServer
    return _DEPLOYMENT


_DEPLOYMENT: Any = None


def build_app(model: str, adapters: Mapping[str, str] | Sequence[str] = (), *,
              replicas: int = 1, max_batch_size: int = 16, batch_wait_ms: float = 5.0,
              num_cpus: float = 1.0, num_gpus: float = 0.0, **engine_kwargs: Any) -> Any:
    """The Ray Serve application: ``serve.run(build_app(...))``.

    ``model``, ``adapters`` and ``engine_kwargs`` (``max_adapters``, ``allow``,
    ``adapter_root``, ``pretrained_file``, ``model_kwargs``, ...) are
    :class:`AdapterEngine`'s; ``replicas`` copies of it run behind Ray Serve's HTTP proxy, each
    batching up to ``max_batch_size`` requests that arrive within ``batch_wait_ms``; each replica
    reserves ``num_cpus`` CPUs and ``num_gpus`` GPUs from Ray (a fraction shares one), and with a
    GPU its backbone runs on ``cuda`` unless ``device`` says otherwise. The adapters given here
    are checked first (:func:`timm_peft.io.verify_adapter`: no model is built), so a bad one
    raises ``ValueError`` naming it before any replica starts. Routes:
    ``POST /predict`` (JSON ``{"adapter", "image" (base64), "top_k"}`` or the image's raw bytes
    with ``?adapter=ID&top_k=K``), ``GET /adapters``, ``GET /stats``, ``GET /healthz``. For a
    Ray Serve config file use :func:`app_builder` (``import_path: timm_peft.serve:app_builder``).
    """
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if not batch_wait_ms >= 0:
        raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
    if not num_gpus >= 0:
        raise ValueError(f"num_gpus must be >= 0, got {num_gpus!r}")
    if num_gpus > 0:  # Ray sets CUDA_VISIBLE_DEVICES in the replica: its GPU is `cuda`
        engine_kwargs.setdefault("device", "cuda")
    try:
        deployment = _deployment_class()
    except ImportError as e:
        raise ImportError("serving needs Ray Serve: pip install 'timm_peft[serve]'") from e
    given = dict(adapters) if isinstance(adapters, Mapping) else {s: s for s in adapters}
    for adapter_id, source in given.items():
        # every check that needs no model, here: a bad adapter fails now with its own message,
        # not as Ray's failed deployment after its replicas retried building the backbone
        try:
            verify_adapter(source)
        except Exception as e:  # AdapterError names the file and field
            raise ValueError(f"adapter {adapter_id!r} given at start: {type(e).__name__}: "
                             f"{e}") from e
    engine_kwargs = dict(model=model, adapters=dict(adapters) if isinstance(adapters, Mapping)
                         else list(adapters), **engine_kwargs)
    return deployment.options(
        num_replicas=replicas, max_ongoing_requests=max(64, _BATCHES_IN_FLIGHT * max_batch_size),
        ray_actor_options=dict(num_cpus=num_cpus, num_gpus=num_gpus),
    ).bind(engine_kwargs, max_batch_size, batch_wait_ms / 1000)


def app_builder(args: dict[str, Any]) -> Any:
    """:func:`build_app` for a Ray Serve config file or ``serve run``: its ``args`` are
    :func:`build_app`'s keywords (``import_path: timm_peft.serve:app_builder``)."""
    return build_app(**args)


def start(app: Any, host: str = "127.0.0.1", port: int = 8000, name: str = "timm_peft") -> str:
    """Start Ray Serve's HTTP proxy on ``host:port``, run ``app`` at ``/``; returns its URL."""
    from ray import serve
    serve.start(http_options=dict(host=host, port=port))
    serve.run(app, name=name, route_prefix="/")
    return f"http://{host}:{port}"
