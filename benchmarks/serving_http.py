"""Serving over real HTTP on Ray Serve: mixed-adapter batches vs Ray's multiplexing vs one
deployment per adapter, for 1, 8 and 64 adapters under uniform and Zipf traffic.

Three ways to serve ``n`` SSF adapters of one backbone, on one local Ray Serve, in one run:

* ``ours``: :func:`timm_peft.serve.build_app`, one replica, one backbone, ``@serve.batch``
  collecting requests across adapter ids, adapters that share a structure routed together in one
  backbone pass (:func:`timm_peft.route`), the batches that queued behind a running pass merged
  into the next.
* ``multiplexed`` (b): Ray Serve's model multiplexing (``@serve.multiplexed`` +
  ``serve.get_multiplexed_model_id``, the id in the ``serve_multiplexed_model_id`` header) with
  ``@serve.batch``, which splits each batch by model id: one backbone pass per adapter in a batch,
  each batch as Ray closes it. Its multiplexed "model" per id is what Ray's documentation loads
  per id, a model of its own (:func:`_model_per_id`, the code a per-adapter replica runs), so
  no pass pays for switching adapters and (b) holds n backbones. Everything else is ours: the
  same FastAPI ingress, request parsing, preprocessing and Serve settings.
* ``per_adapter`` (a): one deployment (one replica, our engine with one adapter, batching its
  own requests) per adapter, each at its own route prefix.

A bounded closed-loop load generator (``--concurrency`` clients, aiohttp) sends a fixed, seeded
sequence of ``--requests`` requests (a stop after ``--duration`` seconds too): a JPEG's own bytes
as the body and the adapter id in the query, for every system; adapters drawn uniformly or
Zipf(``--zipf-s``)-skewed. Every system gets the same sequence after a warm-up request per
adapter. Memory: the resident set of the replica processes (``psutil``) and the tensor bytes of
the models they hold. Where the time goes: each part's CPU time per request (the replicas, Ray's
HTTP proxy, the rest of Ray, the load generator), and the engine bound (:func:`engine_bound`),
the replica's own work for full batches measured in this process without HTTP.

Run: ``nice -n 10 python -m benchmarks.serving_http`` (``--quick`` for a smoke run).
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures' real types

import argparse
import asyncio
import collections
import concurrent.futures
import itertools
import json
import os
import random
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch

import timm_peft
from benchmarks.common import RESULTS, median_ratio, round_robin_clocks, write_report
from benchmarks.serving import _nbytes
from timm_peft.serve import _BATCHES_IN_FLIGHT, AdapterEngine, encode_image


# ----------------------------------------------------------------------------------------------
# the adapters
# ----------------------------------------------------------------------------------------------

def make_zoo(root: Path, arch: str, kwargs: dict, n: int, method: str) -> tuple[Path, list[Path]]:
    """A base weights file and ``n`` trained-looking adapters of ``method`` (heads of 10-14)."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    weights = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(arch, **kwargs).state_dict().items()},
              str(weights))
    overlay = dict(file=str(weights), custom_load=False)
    dirs = []
    for i in range(n):
        classes = 10 + i % 5
        m = timm.create_model(f"{arch}.{method}", pretrained=True, pretrained_cfg_overlay=overlay,
                              num_classes=classes, **kwargs)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        dirs.append(timm_peft.save_pretrained(m, root / f"t{i}", label_names=[
            f"t{i}_class{c}" for c in range(classes)]))
    return weights, dirs


# ----------------------------------------------------------------------------------------------
# (b): Ray Serve multiplexing, batches split by model id
# ----------------------------------------------------------------------------------------------

def _model_per_id(engine_kwargs: dict, adapter_id: str, source: str) -> AdapterEngine:
    """(b)'s model for one id, as Ray's multiplexing loads a model per id: an engine holding
    that one adapter on its own backbone (what a per-adapter replica runs), so no pass pays for
    switching adapters (between heads of other sizes, a switch redoes the method's surgery)."""
    return AdapterEngine(**engine_kwargs, adapters={adapter_id: source}, max_adapters=1)


def _multiplexed_deployment() -> Any:
    # the web stack only here: --bound-only runs where Ray Serve is not installed (a GPU machine)
    from fastapi import FastAPI, Request
    from ray import serve

    from timm_peft.serve import _parse_request

    api = FastAPI()

    @serve.deployment(name="multiplexed")
    @serve.ingress(api)
    class Multiplexed:
        """Ray's multiplexing in place of our adapter handling: a model per id (up to 64 per
        replica, Ray's LRU), the id from the ``serve_multiplexed_model_id`` header, batches
        split by it by ``@serve.batch``; the same FastAPI ingress, request parsing, engine code
        and preprocessing as ours."""

        def __init__(self, engine_kwargs: dict, sources: dict[str, str], max_batch_size: int,
                     batch_wait_s: float) -> None:
            torch.set_num_threads(1)
            self.engine_kwargs, self.sources = engine_kwargs, sources
            self.models: dict[str, AdapterEngine] = {}  # for /stats
            self.model_thread = concurrent.futures.ThreadPoolExecutor(1, "model")  # as ours
            self.infer.set_max_batch_size(max_batch_size)
            self.infer.set_batch_wait_timeout_s(batch_wait_s)

        @serve.multiplexed(max_num_models_per_replica=64)
        async def get_model(self, model_id: str) -> Any:
            model = await asyncio.to_thread(_model_per_id, self.engine_kwargs, model_id,
                                            self.sources[model_id])
            self.models[model_id] = model
            return model

        @api.get("/stats")
        def stats(self) -> dict:
            out: dict[str, int] = collections.Counter()
            for model in self.models.values():
                out.update(model.stats())
            return dict(out)

        @api.post("/predict")
        async def predict(self, request: Request) -> Any:
            adapter = serve.get_multiplexed_model_id()
            model = await self.get_model(adapter)
            _, data, top_k = _parse_request(await request.body(),
                                            request.headers.get("content-type", ""),
                                            dict(request.query_params), 1 << 24)
            x = await asyncio.to_thread(model.preprocess, adapter, data)
            return await self.infer((model, adapter, x, top_k))

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def infer(self, items: list) -> list:  # one id per batch: Ray splits by it
            return await asyncio.get_running_loop().run_in_executor(
                self.model_thread, items[0][0].run_batch, [it[1:] for it in items])

    return Multiplexed


# ----------------------------------------------------------------------------------------------
# load and measurement
# ----------------------------------------------------------------------------------------------

def traffic(n: int, kind: str, count: int, s: float, seed: int = 0) -> list[int]:
    """``count`` adapter indices: uniform, or Zipf(s) over ranks given to adapters at random."""
    rng = random.Random(seed)
    if kind == "uniform":
        return [rng.randrange(n) for _ in range(count)]
    ranks = list(range(n))
    rng.shuffle(ranks)
    weights = [1.0 / (r + 1) ** s for r in ranks]
    return rng.choices(range(n), weights=weights, k=count)


async def _load(requests: list[tuple[str, dict, bytes]], concurrency: int, duration: float
                ) -> dict[str, Any]:
    """Send ``requests`` (url, headers, body) from ``concurrency`` clients; stop at the end or
    after ``duration`` seconds."""
    import aiohttp
    latencies: list[float] = []
    errors = 0
    it = iter(requests)
    t0 = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for url, headers, body in it:
            if time.perf_counter() - t0 > duration:
                return
            t = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    continue
            latencies.append(time.perf_counter() - t)

    timeout = aiohttp.ClientTimeout(total=max(60.0, duration))
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(client(s) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else float("nan")

    return dict(done=len(lat), errors=errors, seconds=elapsed, req_per_s=len(lat) / elapsed,
                p50_ms=pct(0.50), p99_ms=pct(0.99))


def engine_bound(engine: AdapterEngine, models: dict[str, AdapterEngine], ids: list[str],
                 images: list[bytes], kind: str, batch: int, rounds: int, zipf_s: float
                 ) -> dict[str, float]:
    """The replica's own work for full batches, without HTTP: ours vs (b), in this process.

    Round r takes the r-th ``batch`` consecutive requests of the load generator's own sequence
    (the same for both systems) and times, in process CPU seconds, what each
    system's replica runs for it: ours one :meth:`AdapterEngine.run_batch` over the mixed batch
    (one routed backbone pass), (b) one ``run_batch`` per adapter id in it on that id's own
    model, ``models[id]`` (Ray's ``@serve.batch`` splits a batch by multiplexed model id,
    and its multiplexing holds a model per id). The tensors are the images
    preprocessed once, beforehand. ``bound`` is the median over rounds of (b)'s time / ours: the
    throughput ratio of a server that spends time on nothing but the backbone and fills every
    batch. On a GPU the times are wall-clock (CUDA-synchronised): its work is not the process's
    CPU time.
    """
    seq = traffic(len(ids), kind, batch * rounds, zipf_s)
    batches = [[(ids[k], engine.preprocess(ids[k], images[i % len(images)]), 3)
                for i, k in enumerate(seq[b * batch:(b + 1) * batch])] for b in range(rounds)]

    def split(items: list) -> None:
        groups: dict[str, list] = {}
        for item in items:
            groups.setdefault(item[0], []).append(item)
        for adapter, group in groups.items():
            models[adapter].run_batch(group)

    def cycle(run: Any) -> Any:  # each system its own iterator: round r gives both one draw
        it = itertools.cycle(batches)
        return lambda: run(next(it))

    wall, cpu = round_robin_clocks(dict(ours=cycle(engine.run_batch), multiplexed=cycle(split)),
                                   warmup=1, rounds=rounds, device=engine.device)
    times = wall if engine.device.type == "cuda" else cpu
    return dict(bound=median_ratio(times, "multiplexed", "ours"),
                ours_req_s=batch / statistics.median(times["ours"]),
                multiplexed_req_s=batch / statistics.median(times["multiplexed"]),
                distinct=statistics.mean(len({it[0] for it in b}) for b in batches))


def _replica_memory(app_prefix: str) -> tuple[int, int]:
    """Resident bytes summed over the Serve replica processes of apps named ``app_prefix*``."""
    import psutil
    total, count = 0, 0
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if f"ServeReplica:{app_prefix}" in cmd:
            try:
                total += p.memory_info().rss
                count += 1
            except psutil.Error:
                pass
    return total, count


#: where a request's CPU time goes: the system's replicas, Ray Serve's HTTP proxy, the rest of Ray
#: (raylet, GCS, Serve's controller, ...) and this driver (the load generator)
PARTS = ("replica", "proxy", "ray", "client")


def _cpu_seconds(app_prefix: str) -> dict[int, tuple[str, float]]:
    """``{pid: (part, CPU seconds so far)}`` for this driver and every process under it (Ray's
    own and its workers); replicas are those of the apps named ``app_prefix*``."""
    import psutil
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            cmd, t = " ".join(p.cmdline()), p.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        part = ("client" if p.pid == me.pid else "replica" if f"ServeReplica:{app_prefix}" in cmd
                else "proxy" if "ProxyActor" in cmd else "ray")
        out[p.pid] = (part, t.user + t.system)
    return out


def _cpu_ms_per_request(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                        requests: int) -> dict[str, float]:
    """CPU milliseconds per answered request of each part between two :func:`_cpu_seconds`."""
    ms = dict.fromkeys(PARTS, 0.0)
    for pid, (part, t) in after.items():
        ms[part] += (t - before.get(pid, (part, 0.0))[1]) * 1e3 / max(1, requests)
    return ms


def _stats(url: str) -> dict[str, int]:
    import urllib.request
    with urllib.request.urlopen(url + "/stats") as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--method", default="ssf")
    p.add_argument("--adapters", default="1,8,64")
    p.add_argument("--per-adapter-max", type=int, default=8,
                   help="largest n run as n real deployments for (a); above it (a)'s memory is "
                   "n x one replica's and its throughput is not measured")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--duration", type=float, default=45.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--bound-rounds", type=int, default=12,
                   help="batches drawn per cell for the in-process engine bound")
    p.add_argument("--device", default="cpu", help="where every system's backbone runs (cuda: "
                   "each replica gets the GPU, the n per-adapter replicas a 1/n share each)")
    p.add_argument("--bound-only", action="store_true", help="only the in-process engine bound "
                   "and model bytes (no Ray, no HTTP): a minute on a GPU")
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument("--out", default="serving_http", help="report name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.requests, args.duration, args.depth = "1,8", 60, 10.0, 2
        args.img_size, args.bound_rounds = 64, 4
    torch.set_num_threads(1)
    counts = [int(c) for c in args.adapters.split(",")]
    kwargs = dict(img_size=args.img_size, depth=args.depth)
    root = Path(tempfile.mkdtemp(prefix="serving_http_"))
    t_start, load = time.time(), [os.getloadavg()[0]]
    weights, dirs = make_zoo(root, args.arch, kwargs, max(counts), args.method)
    g = torch.Generator().manual_seed(0)
    jpegs = [encode_image(torch.rand(3, args.img_size, args.img_size, generator=g),
                          format="JPEG") for _ in range(8)]  # as photos come: small bodies
    gpu = 1.0 if args.device.startswith("cuda") else 0.0
    common = dict(pretrained_file=str(weights), model_kwargs=kwargs, num_cpus=0,
                  max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms)

    # in this process, before Ray starts: model tensor bytes (one backbone with n adapters vs
    # n single models) and the engine bound of each cell
    single = _nbytes(timm_peft.from_pretrained(dirs[0], pretrained_cfg_overlay=dict(
        file=str(weights), custom_load=False)))
    model_ratio, bound = {}, {}
    engine_base = dict(model=args.arch, pretrained_file=str(weights), model_kwargs=kwargs,
                       device=args.device)
    models = {f"t{i}": _model_per_id(engine_base, f"t{i}", str(d)) for i, d in enumerate(dirs)}
    for n in counts:
        ids = [f"t{i}" for i in range(n)]
        engine = AdapterEngine(args.arch, {a: str(dirs[i]) for i, a in enumerate(ids)},
                               max_adapters=n, pretrained_file=str(weights), model_kwargs=kwargs,
                               device=args.device)
        model_ratio[n] = _nbytes(engine.model) / (n * single)
        for kind in ("uniform", "zipf"):
            bound[n, kind] = engine_bound(engine, models, ids, jpegs, kind,
                                          args.max_batch_size, args.bound_rounds, args.zipf_s)
            print(f"engine bound n={n} {kind}:",
                  {k: round(v, 3) for k, v in bound[n, kind].items()}, flush=True)
        del engine
    del models
    command = "python -m benchmarks.serving_http " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:])
    if args.bound_only:
        device = args.device + (f" ({torch.cuda.get_device_name()})" if gpu else "")
        rows = [dict(adapters=n, traffic=kind, bound=b["bound"], ours_req_s=b["ours_req_s"],
                     multiplexed_req_s=b["multiplexed_req_s"], distinct_per_batch=b["distinct"],
                     model_bytes_vs_separate=model_ratio[n])
                for (n, kind), b in bound.items()]
        md = write_report(args.out, "Serving engine bound: mixed-adapter batches vs batches split "
                          "by adapter id, in process", command, rows, notes=(
                              f"`{args.arch}` ({args.img_size}x{args.img_size}, depth "
                              f"{args.depth}), {args.method.upper()} adapters, on {device}; "
                              f"batches of {args.max_batch_size} consecutive requests of the "
                              f"load generator's sequence, {args.bound_rounds} rounds "
                              f"(`engine_bound`): ours one routed pass per batch, (b) one pass "
                              f"per adapter id in it, each on that id's own model. No HTTP, no "
                              f"Ray: the replica's own work only."))
        shutil.rmtree(root, ignore_errors=True)
        print(md.read_text())
        return
    import ray
    from ray import serve

    from timm_peft.serve import build_app
    runs = RESULTS / f"{args.out}_runs.json"

    ray.init(num_cpus=16, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options=dict(host="127.0.0.1", port=port))
    rows: list[dict[str, Any]] = []
    one_replica_rss: list[int] = []
    try:
        for n in counts:
            ids = [f"t{i}" for i in range(n)]
            sources = {a: str(dirs[i]) for i, a in enumerate(ids)}
            systems: dict[str, Any] = {}

            def deploy_ours() -> list[str]:
                serve.run(build_app(args.arch, sources, max_adapters=n, num_gpus=gpu,
                                    device=args.device, **common),
                          name="ours", route_prefix="/")
                return ["ours"]

            def deploy_multiplexed() -> list[str]:
                app = _multiplexed_deployment().options(  # Serve's settings as ours has them
                    ray_actor_options=dict(num_cpus=0, num_gpus=gpu),
                    max_ongoing_requests=max(64, _BATCHES_IN_FLIGHT * args.max_batch_size)).bind(
                    engine_base, sources, args.max_batch_size, args.batch_wait_ms / 1000)
                serve.run(app, name="multiplexed", route_prefix="/")
                return ["multiplexed"]

            def deploy_per_adapter() -> list[str]:
                targets = [serve.RunTarget(build_app(args.arch, {a: src}, max_adapters=1,
                                                     num_gpus=gpu / n, device=args.device,
                                                     **common),
                                           name=f"per_adapter_{a}", route_prefix=f"/{a}")
                           for a, src in sources.items()]
                serve.run_many(targets)  # deployed together, waits until all run
                return [t.name for t in targets]

            # the image's own bytes, the id in the query: no base64 or JSON for any system
            jpeg = {"Content-Type": "image/jpeg"}

            def req_ours(k: int, j: int) -> tuple[str, dict, bytes]:
                return f"{url}/predict?adapter={ids[k]}&top_k=3", jpeg, jpegs[j]

            def req_multiplexed(k: int, j: int) -> tuple[str, dict, bytes]:
                return (f"{url}/predict?adapter={ids[k]}&top_k=3",
                        {**jpeg, "serve_multiplexed_model_id": ids[k]}, jpegs[j])

            def req_per_adapter(k: int, j: int) -> tuple[str, dict, bytes]:
                return f"{url}/{ids[k]}/predict?adapter={ids[k]}&top_k=3", jpeg, jpegs[j]

            systems["ours"] = (deploy_ours, req_ours)
            systems["multiplexed"] = (deploy_multiplexed, req_multiplexed)
            if n <= args.per_adapter_max:
                systems["per_adapter"] = (deploy_per_adapter, req_per_adapter)
            for system, (deploy, make) in systems.items():
                t0 = time.time()
                apps = deploy()
                # warm-up: every adapter once, then a short burst
                warm = [make(k, 0) for k in range(n)] + [make(k % n, 1) for k in range(32)]
                w = asyncio.run(_load(warm, min(args.concurrency, len(warm)), 120.0))
                assert w["errors"] == 0, (system, w)
                app_prefix = system if system != "per_adapter" else "per_adapter_"
                rss, procs = _replica_memory(app_prefix)
                if system == "per_adapter" and procs:
                    one_replica_rss.append(rss // procs)
                for kind in ("uniform", "zipf"):
                    seq = traffic(n, kind, args.requests, args.zipf_s)
                    reqs = [make(k, i % len(jpegs)) for i, k in enumerate(seq)]
                    stats0 = _stats(url) if system != "per_adapter" else None
                    cpu0 = _cpu_seconds(app_prefix)
                    res = asyncio.run(_load(reqs, args.concurrency, args.duration))
                    cpu = _cpu_ms_per_request(cpu0, _cpu_seconds(app_prefix), res["done"])
                    row = dict(adapters=n, traffic=kind, system=system, **res,
                               replica_rss_mb=rss / 2**20, replicas=procs,
                               **{f"{k}_cpu_ms": v for k, v in cpu.items()})
                    if stats0 is not None:  # requests per batch and per backbone pass
                        st = {k: v - stats0[k] for k, v in _stats(url).items()}
                        row["mean_batch"] = st["requests"] / max(1, st["batches"])
                        row["req_per_pass"] = st["requests"] / max(1, st["backbone_passes"])
                    print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()},
                          flush=True)
                    rows.append(row)
                    runs.write_text(json.dumps(rows, indent=2) + "\n")  # kept if a later cell fails
                for app in apps:
                    serve.delete(app)
                print(f"  {system} n={n}: {time.time() - t0:.0f} s", flush=True)
    finally:
        load.append(os.getloadavg()[0])
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    # ratios against (b) and (a) in the same run
    by = {(r["adapters"], r["traffic"], r["system"]): r for r in rows}
    rss_one = statistics.median(one_replica_rss) if one_replica_rss else float("nan")
    summary = []
    for n in counts:
        for kind in ("uniform", "zipf"):
            ours, mux = by[(n, kind, "ours")], by[(n, kind, "multiplexed")]
            pa = by.get((n, kind, "per_adapter"))
            summary.append(dict(
                adapters=n, traffic=kind,
                ours_req_s=ours["req_per_s"], multiplexed_req_s=mux["req_per_s"],
                per_adapter_req_s=pa["req_per_s"] if pa else float("nan"),
                throughput_vs_multiplexed=ours["req_per_s"] / mux["req_per_s"],
                engine_bound=bound[n, kind]["bound"],
                engine_ours_req_s=bound[n, kind]["ours_req_s"],
                ids_per_full_batch=bound[n, kind]["distinct"],
                ours_replica_cpu_ms=ours["replica_cpu_ms"],
                ours_rest_cpu_ms=sum(ours[f"{k}_cpu_ms"] for k in PARTS if k != "replica"),
                multiplexed_replica_cpu_ms=mux["replica_cpu_ms"],
                multiplexed_rest_cpu_ms=sum(mux[f"{k}_cpu_ms"] for k in PARTS if k != "replica"),
                ours_req_per_pass=ours.get("req_per_pass", float("nan")),
                multiplexed_req_per_pass=mux.get("req_per_pass", float("nan")),
                ours_p99_ms=ours["p99_ms"], multiplexed_p99_ms=mux["p99_ms"],
                per_adapter_p99_ms=pa["p99_ms"] if pa else float("nan"),
                rss_vs_per_adapter=ours["replica_rss_mb"] * 2**20 / (n * rss_one),
                multiplexed_rss_vs_ours=mux["replica_rss_mb"] / ours["replica_rss_mb"],
                model_bytes_vs_per_adapter=model_ratio[n]))
    notes = (
        f"`{args.arch}` ({args.img_size}x{args.img_size} input, depth {args.depth}, random "
        f"base from a local weights file), {args.method.upper()} adapters with heads of 10-14 "
        f"classes, backbones on {args.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if gpu else ''}. "
        f"Ray Serve {ray.__version__} on this machine ({os.cpu_count()} CPU cores, "
        f"load average {load[0]:.1f} at the start and {load[1]:.1f} at the end of the run; one "
        "torch thread per replica and in the engine bound), HTTP on localhost from "
        f"an aiohttp load generator in the driver: {args.concurrency} concurrent clients, "
        f"{args.requests} requests per cell (stop after {args.duration:g} s), the same seeded "
        f"sequence for every system; Zipf s={args.zipf_s}. `@serve.batch` up to "
        f"{args.max_batch_size} requests, {args.batch_wait_ms:g} ms wait, for every system. "
        "(b) `multiplexed` holds a model per id (an engine with that one adapter, as a "
        "per-adapter replica runs it; `multiplexed_rss_vs_ours`: its replica's resident memory "
        "/ ours'), so no pass of it switches adapters. (a) "
        f"`per_adapter` runs as n real deployments up to n={args.per_adapter_max}; above that "
        "its memory is n x the median replica RSS measured at the smaller n and its throughput "
        "is not measured (n replica processes of about 1 GB each do not fit this machine). "
        "`rss_vs_per_adapter`: resident memory of our one replica / n x one per-adapter "
        "replica (processes: the torch runtime counts); `model_bytes_vs_per_adapter`: tensor "
        "bytes of one backbone with n adapters / n separate models. `engine_bound`: the same "
        "replica code in the driver process before Ray starts, no HTTP, the images preprocessed "
        f"beforehand: for batches of {args.max_batch_size} consecutive requests of the same "
        f"sequence ({args.bound_rounds} batches; `ids_per_full_batch` distinct adapters in one "
        "on average), (b)'s time (one `run_batch` per adapter id, as Ray's `@serve.batch` "
        "splits it, each on that id's own model) / ours (one `run_batch`, one routed backbone "
        "pass), process CPU time, the "
        "median over batches; `engine_ours_req_s` is ours' full-batch throughput. It is the "
        "ratio to (b) a server would reach on this hardware with full batches if the backbone "
        "were all it spent time on (partial batches, as over HTTP, give other ratios). "
        "`*_replica_cpu_ms` / `*_rest_cpu_ms`: CPU milliseconds per answered request in the "
        "system's replica / everywhere else (Ray Serve's HTTP proxy, the rest of Ray, the load "
        "generator; split in the runs file), from the processes' CPU times; compare "
        "1000 / `engine_ours_req_s`, the replica's backbone work per request in a full batch. "
        "Goals: 64 adapters, Zipf: "
        "throughput ≥ 2x (b) at equal p99; memory ≤ 0.15 of (a). Closed loop: a system with "
        "a higher throughput and a lower p99 at one concurrency meets 'at equal p99'. "
        f"Total time {time.time() - t_start:.0f} s.")
    md = write_report(args.out, "Serving over HTTP: mixed-adapter batches vs Ray multiplexing "
                      "vs a deployment per adapter", command.strip(), summary, notes)
    print(md.read_text())


if __name__ == "__main__":
    main()
