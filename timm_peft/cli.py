"""The ``timm-peft`` command line: ``train``, ``eval``, ``reproduce``, ``info`` and ``serve``.

``train`` exposes every :class:`timm_peft.train.TrainConfig` field as a flag (``--batch-size``,
``--lr``, ``--no-aug`` ...); ``--recipe`` applies published settings first, flags given on the
command line win. The same command runs data-parallel under ``torchrun``.

Example:
    $ timm-peft train --model vit_tiny_patch16_224.ssf --task count --no-pretrained \\
          --model-kwargs img_size=32 depth=4 --epochs 2
    $ timm-peft eval runs/<run>/adapter --split test
    $ timm-peft info runs/<run>/adapter
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import re
import sys
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["main", "build_parser"]

_TRAIN_EPILOG = """\
data: a built-in generated task (--task) or an ImageFolder tree (--data-dir) with train/ and
optionally val/ and test/, each holding one folder per class.
recipes (applied in order, explicit flags win): {recipes}
methods: {methods}
distributed: torchrun --nproc_per_node N -m timm_peft train ... (or timm-peft via torchrun)"""


#: other names of a flag: timm train.py's spellings (same meaning) and older ones of ours
_ALIASES = {"smoothing": ("--label-smoothing",), "batch_size": ("-b",), "workers": ("-j",),
            "pretrained_file": ("--pretrained-path",)}
_VAL_SPLIT_HELP = ("a number holds that fraction of train out for validation (ours: VTAB-1k "
                   "0.2, FGVC 0.1; 0 uses val/ if present); a name validates on that split of "
                   "--dataset (timm's meaning, same as --val-split-name), e.g. validation")
#: flags that may be given without a value, and the value they then take
_OPTIONAL_VALUE = {"torchcompile": "inductor"}


def _parse_value(text: str) -> Any:
    """JSON where it parses (numbers, true/false, lists), the raw string otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_kv(items: Sequence[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"{flag} takes KEY=VALUE pairs (e.g. {flag} depth=4), got {item!r}")
        out[key.replace("-", "_")] = _parse_value(value)
    return out


def _fraction_or_name(text: str) -> float | str:
    """``--val-split``: a fraction (ours) or a dataset split's name (timm's train.py)."""
    try:
        return float(text)
    except ValueError:
        return text


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, its type and help taken from the field."""
    from .train import TrainConfig, list_recipes
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "recipes":
            parser.add_argument("--recipe", dest="recipes", action="append",
                                choices=list_recipes(), default=argparse.SUPPRESS,
                                help="published settings to start from (repeatable)")
            continue
        flag = "--" + f.name.replace("_", "-")
        flags = [flag, *_ALIASES.get(f.name, ())]
        tp, meta = hints[f.name], f.metadata
        args = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]
        base = args[0]
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=meta.get("help") or None)
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif base is dict or typing.get_origin(base) is dict:
            kw.update(nargs="+", metavar="KEY=VALUE")
        elif typing.get_origin(base) is tuple:
            items = typing.get_args(base)
            kw.update(type=items[0], nargs="+" if items[-1] is Ellipsis else len(items))
        else:
            kw["type"] = base
        if f.name in _OPTIONAL_VALUE:  # timm's `--torchcompile [backend]`
            kw.update(nargs="?", const=_OPTIONAL_VALUE[f.name])
        if f.name == "val_split":  # timm's is a split name, ours a fraction: both are accepted
            kw.update(type=_fraction_or_name, metavar="FRACTION|SPLIT", help=_VAL_SPLIT_HELP)
        parser.add_argument(*flags, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The ``timm-peft`` argument parser."""
    from . import list_methods
    from .data import list_tasks
    from .train import list_recipes
    parser = argparse.ArgumentParser(
        prog="timm-peft", description="Parameter-efficient fine-tuning of timm models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,eval,reproduce,info,serve}")

    p = sub.add_parser("train", help="fine-tune a method and save the best adapter",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_TRAIN_EPILOG.format(recipes=", ".join(list_recipes()),
                                                   methods=", ".join(list_methods())))
    _add_config_flags(p)

    p = sub.add_parser("eval", help="accuracy of a saved adapter on a split")
    p.add_argument("adapter", help="adapter directory (a run's adapter/)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--task", choices=list_tasks(), help="default: the task it was trained on")
    p.add_argument("--data-dir", help="ImageFolder root (default: the one it was trained on)")
    p.add_argument("--pretrained-file", help="local base weights (default: as in training)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    _add_reproduce_parser(sub)

    p = sub.add_parser("info", help="what an adapter holds, or the methods, recipes and tasks")
    p.add_argument("adapter", nargs="?", help="adapter directory; without it: list everything")
    p.add_argument("--recipe", choices=list_recipes(), help="show one recipe's settings")
    p.add_argument("--json", action="store_true", help="print as JSON")

    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve adapters over HTTP on one backbone (Ray Serve)",
                       description="Serve many adapters on one frozen backbone with Ray Serve: "
                       "POST /predict, GET /adapters, GET /stats, GET /healthz. Needs "
                       "pip install 'timm_peft[serve]'.")
    p.add_argument("--model", required=True, help="backbone <arch>[.<weight tag>]")
    p.add_argument("--adapters", nargs="+", default=[], metavar="[ID=]DIR_OR_HUB_ID",
                   help="adapters loaded at start (directory or hf-hub:<org>/<name>; the id "
                   "clients use is ID, else the source itself)")
    p.add_argument("--max-adapters", type=int, default=16, help="adapters held per replica "
                   "(LRU; default %(default)s)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--allow", nargs="+", metavar="ID_OR_PREFIX", help="ids or id prefixes that "
                   "may be loaded on demand (default: any hf-hub: id)")
    p.add_argument("--adapter-root", help="load unknown ids on demand from directories under it")
    p.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", default=[])
    p.add_argument("--pretrained-file", help="local base weights (timm's pretrained path)")
    p.add_argument("--no-pretrained", action="store_true", help="random base (tests only)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (a fraction "
                   "shares one); with a GPU the backbone runs on it")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)


_REPRODUCE_EPILOG = """\
data layouts (--data-root):
  vtab1k: <root>/<task>/{train800,val200,train800val200,test}.txt, lines 'relative/path label',
          tasks: %s
  fgvc:   <root>/<name>/{train,val,test}.json (VPT's splits, {"relative/path": label}) with the
          images under <root>/<name>/<image folder>: %s
tables go to <output>/<method>-<benchmark>.{md,json}; run it again to continue where it stopped.
multi-GPU: torchrun --nproc_per_node N -m timm_peft reproduce ... (runs spread over the GPUs)"""


def _add_reproduce_parser(sub: Any) -> None:
    from .data import FGVC_DATASETS, VTAB1K_TASKS
    from .reproduce import BENCHMARKS, PROTOCOLS
    fgvc = ", ".join(f"{n} ({d or '.'}/)" for n, (d, _) in FGVC_DATASETS.items())
    p = sub.add_parser("reproduce", help="a paper's protocol on VTAB-1k or FGVC, and a table of "
                       "our accuracy beside the published one",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_REPRODUCE_EPILOG % (", ".join(VTAB1K_TASKS), fgvc))
    p.add_argument("--method", required=True, choices=sorted(PROTOCOLS))
    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    p.add_argument("--data-root", required=True, help="the benchmark's root folder")
    p.add_argument("--model", help="backbone <arch>[.<weight tag>] (default: the one the "
                   "method's authors used, e.g. vit_base_patch16_224.orig_in21k for vpt, "
                   "vit_base_patch16_224.augreg_in21k for ssf)")
    p.add_argument("--output", default="runs/reproduce", help="runs and tables (default %(default)s)")
    p.add_argument("--tasks", nargs="+", help="a subset of the benchmark's tasks")
    p.add_argument("--seeds", type=int, help="final runs per task (default: the paper's)")
    p.add_argument("--grid", nargs="+", metavar="KEY=V1,V2",
                   help="replace the method's grid, e.g. lr=0.01,0.001 peft_cfg.num_prompts=10,50")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (a quick check)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--pretrained-file", help="local base weights (timm's pretrained path)")
    p.add_argument("--no-pretrained", action="store_true", help="random base (tests only)")
    p.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", default=[])
    p.add_argument("--train-args", nargs="+", metavar="KEY=VALUE", default=[],
                   help="any other timm-peft train setting, e.g. workers=8 amp_dtype=float16")
    p.add_argument("--device")
    p.add_argument("--dry-run", action="store_true", help="print the protocol item by item "
                   "(what runs, whose choice it is), count the runs, estimate GPU hours, and stop")
    p.add_argument("--img-per-s", type=float, default=800.0, help="--dry-run: training images/s "
                   "of the frozen-backbone limit on your GPU (default %(default)s, assumed; "
                   "each method's measured step ratio scales it, see the README)")


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------

def _serve_kwargs(ns: argparse.Namespace) -> tuple[dict[str, Any], str, int]:
    """:func:`timm_peft.serve.build_app`'s keywords, host and port from ``timm-peft serve``."""
    adapters: dict[str, str] = {}
    for item in ns.adapters:
        name, eq, source = item.partition("=")
        if not eq or name.startswith(("hf-hub:", "local-dir:")) or "/" in name:
            name, source = item, item  # a path or Hub id (which may hold '='), its own id
        if name in adapters:
            raise ValueError(f"--adapters: the id {name!r} is given twice")
        adapters[name] = source
    kwargs = dict(model=ns.model, adapters=adapters, max_adapters=ns.max_adapters,
                  replicas=ns.replicas, max_batch_size=ns.max_batch_size,
                  batch_wait_ms=ns.batch_wait_ms, allow=ns.allow, adapter_root=ns.adapter_root,
                  model_kwargs=_parse_kv(ns.model_kwargs, "--model-kwargs"),
                  pretrained=not ns.no_pretrained, pretrained_file=ns.pretrained_file,
                  top_k=ns.top_k, num_cpus=ns.num_cpus, num_gpus=ns.num_gpus)
    return kwargs, ns.host, ns.port


def _cmd_serve(ns: argparse.Namespace) -> int:
    import time
    from .serve import build_app, start
    kwargs, host, port = _serve_kwargs(ns)
    try:
        app = build_app(**kwargs)
    except ImportError as e:  # Ray Serve is an optional extra: say how to get it, no traceback
        raise RuntimeError(str(e)) from e
    url = start(app, host=host, port=port)
    print(f"Serving {len(kwargs['adapters'])} adapter(s) on {ns.model} at {url} "
          f"(POST {url}/predict, GET {url}/adapters, {url}/stats, {url}/healthz); Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve
        serve.shutdown()
    return 0


def _cmd_reproduce(ns: argparse.Namespace) -> int:
    from .reproduce import ITEMS, PROTOCOLS, estimate, protocol_items, reproduce
    grid = None
    if ns.grid:
        grid = {}
        for item in ns.grid:
            key, eq, values = item.partition("=")
            if not eq or not key or not values:
                raise ValueError(f"--grid takes KEY=V1,V2,... (e.g. lr=0.01,0.001), got {item!r}")
            grid[key.replace("-", "_")] = [_parse_value(v) for v in values.split(",")]
    if ns.dry_run:
        items = protocol_items(ns.method, ns.benchmark)
        sources = PROTOCOLS[ns.method].sources
        print(f"{ns.method} on {ns.benchmark}: the protocol")
        for item in ITEMS:
            print(f"  {item}: {items[item]}  [{sources[item]}]")
        est = estimate(ns.method, ns.benchmark, tasks=ns.tasks, grid=grid, seeds=ns.seeds,
                       epochs=ns.epochs, img_per_s=ns.img_per_s)
        ratios = est["step_ratios"]
        ratios = ("not measured, 1.0 assumed" if ratios is None else
                  f"train {ratios[0]:.2f}x the frozen-backbone limit, eval {ratios[1]:.2f}x")
        print(f"{est['runs']} runs ({est['tune_runs']} tuning, {est['final_runs']} final) of "
              f"{est['epochs']} epochs, {est['training_images']:,d} training images: about "
              f"{est['gpu_hours']:.1f} GPU hours at {ns.img_per_s:g} images/s for the limit "
              f"(step ratios: {ratios}; evaluation included)")
        return 0
    train_args = _parse_kv(ns.train_args, "--train-args")
    for key in ("epochs", "batch_size", "pretrained_file", "device"):
        if getattr(ns, key) is not None:
            train_args[key] = getattr(ns, key)
    if ns.no_pretrained:
        train_args["pretrained"] = False
    if ns.model_kwargs:
        train_args["model_kwargs"] = _parse_kv(ns.model_kwargs, "--model-kwargs")
    from .train import TrainingInterrupted
    try:
        res = reproduce(ns.method, ns.benchmark, ns.data_root, ns.model, output=ns.output,
                        tasks=ns.tasks, grid=grid, seeds=ns.seeds, train_args=train_args)
    except TrainingInterrupted as e:  # its --resume hint is for one run; the command resumes all
        where = e.checkpoint.parent if e.checkpoint is not None else "a run"
        raise KeyboardInterrupt(f"interrupted in {where}: the same command continues (finished "
                                "runs are kept, an interrupted one resumes from its last "
                                "checkpoint)") from None
    if res.table_md is not None:
        print(res.table_md.read_text())
        print(f"Wrote {res.table_md} and {res.table_json}")
    return 0


#: the largest args.json a resume reads (a run's own is a few KiB)
_ARGS_MAX_BYTES = 1 << 20


def _saved_run_args(resume: str) -> tuple[dict[str, Any], Path]:
    """The settings a run was started with (its ``args.json``), for ``--resume DIR`` alone.

    Where the run was written (``output``) is not among them: a resumed run continues where
    ``--resume`` points (a copy of a run continues in the copy), or in ``--output``.
    """
    from .train import TrainConfig
    run_dir = Path(resume)
    if not run_dir.exists():
        raise ValueError(f"--resume {resume}: no such run directory or checkpoint file")
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    path = run_dir / "args.json"
    if not path.is_file():
        raise ValueError(f"--resume {resume}: no args.json in {run_dir} to take the run's "
                         "settings from; give them again (--model, the data ...)")
    with open(path, "rb") as fh:  # a regular file (checked above): reading it cannot hang
        raw = fh.read(_ARGS_MAX_BYTES + 1)
    if len(raw) > _ARGS_MAX_BYTES:
        raise ValueError(f"{path} is larger than {_ARGS_MAX_BYTES:,d} bytes: not a run's "
                         "settings")
    try:
        saved = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e)[:200]}); give the run's settings "
                         "again (--model, the data ...)") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} must hold a JSON object of the run's settings, got a "
                         f"{type(saved).__name__}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in saved.items()
            if k in fields and k not in ("resume", "overwrite", "output")}, path


def _cmd_train(ns: argparse.Namespace) -> int:
    from .train import TrainConfig, train
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "debug")}
    for key in ("peft_cfg", "model_kwargs", "pretrained_cfg"):
        if key in given:
            given[key] = _parse_kv(given[key], "--" + key.replace("_", "-"))
    if isinstance(given.get("val_split"), str):  # timm's meaning: a split of --dataset
        if given.get("val_split_name") is not None:
            raise ValueError(f"--val-split {given['val_split']} names a split, and so does "
                             f"--val-split-name {given['val_split_name']}: give one")
        given["val_split_name"] = given.pop("val_split")
        given["val_split"] = 0.0  # validating on a named split holds nothing out (recipes' 0.2)
    recipes = given.pop("recipes", [])
    if given.get("resume") and not recipes:
        # `--resume DIR` alone continues the run as it was started; flags given win
        saved, path = _saved_run_args(given["resume"])
        recipes = saved.pop("recipes", [])
        if not isinstance(recipes, list) or not all(isinstance(r, str) for r in recipes):
            raise ValueError(f"{path}: field 'recipes' must be a list of recipe names")
        missing = [k for k in ("model",) if not (given.get(k) or saved.get(k))]
        if missing or not any(given.get(k) or saved.get(k) for k in ("task", "data_dir", "dataset")):
            raise ValueError(f"{path} lacks the run's {missing[0] if missing else 'data'!r} "
                             "setting; give it again (--model, --task/--data-dir/--dataset)")
        values = dict({**saved, **given}, recipes=tuple(recipes))
        try:
            cfg = TrainConfig(**values)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--resume {given['resume']}: the settings in {path} (with the "
                             f"flags given) do not make a run: {e}") from None
    else:
        cfg = TrainConfig.from_recipes(recipes, **given)
    result = train(cfg)
    if result.rank == 0:  # under torchrun, the process that wrote the run reports it
        _report_run(cfg, result)
    return 0


def _report_run(cfg: Any, result: Any) -> None:
    from .io.load import reload_code
    from .train import pretrained_overlay
    m = result.metrics
    adapter = result.adapter_dir
    lines = [f"\nSaved the adapter to {adapter}/ ({m['trainable_params']:,d} trainable parameters, "
             f"{m.get('adapter_bytes', 0):,d} bytes)"]
    accs = [f"{s} accuracy {m[f'{s}_acc']:.4f}" for s in ("val", "test") if f"{s}_acc" in m]
    if accs:
        lines.append("  " + ", ".join(accs))
    overlay = pretrained_overlay(cfg.pretrained_cfg, cfg.pretrained_file)
    lines += ["Load it with:", *(f"  {line}" for line in reload_code(adapter, overlay))]
    weights = f" --pretrained-file {cfg.pretrained_file}" if cfg.pretrained_file else ""
    lines.append(f"or measure it again: timm-peft eval {adapter} --split test{weights}")
    print("\n".join(lines))


def _cmd_eval(ns: argparse.Namespace) -> int:
    from .train import evaluate_adapter
    res = evaluate_adapter(ns.adapter, ns.split, task=ns.task, data_dir=ns.data_dir,
                           pretrained_file=ns.pretrained_file, batch_size=ns.batch_size,
                           device=ns.device, workers=ns.workers)
    if ns.json:
        print(json.dumps(res))
    else:
        print(f"{_printable(res['adapter'])} on {_printable(res['data'])} [{res['split']}]: "
              f"accuracy {res['acc']:.4f}, "
              f"loss {res['loss']:.4f} over {res['n']} images")
    return 0


def _adapter_info(path: str) -> dict[str, Any]:
    from .io import read_training_args
    from .io.load import open_adapter, verify_adapter
    src = open_adapter(path)
    cfg = verify_adapter(src)  # config, weights header, hash and values: an AdapterError exits 2
    info = dict(adapter=str(src.dir), method=cfg["peft_type"],
                base=cfg.get("base_model_name_or_path"),
                base_origin=(cfg.get("base_source") or {}).get("kind", "unknown"),
                data_config=cfg.get("data_config"), num_labels=len(cfg.get("label_names") or []),
                model_args=cfg["model_args"], peft_config=cfg["peft_config"],
                trainable_params=cfg.get("num_trainable_parameters"),
                total_params=cfg.get("num_parameters"),
                adapter_values=cfg.get("num_adapter_values"),
                adapter_bytes=src.header.file_bytes,
                format_version=cfg["format_version"], timm_peft_version=cfg.get("timm_peft_version"),
                base_fingerprint=cfg.get("base_fingerprint"))
    t = read_training_args(src.dir)  # checked like every adapter file
    if t:
        info["trained_on"] = t.get("task") or t.get("data_dir") or t.get("dataset")
        info["classes"] = t.get("classes")
        info["metrics"] = {k: v for k, v in (t.get("metrics") or {}).items()
                           if k.endswith("_acc") or k == "best_epoch"}
    return info


def _printable(value: Any) -> str:
    """``value`` as text for a terminal: control characters from an adapter's files escaped."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]", lambda m: repr(m.group())[1:-1],
                  str(value))


def _cmd_info(ns: argparse.Namespace) -> int:
    from . import list_methods
    from .core import get_method, resolve_method
    from .data import TASKS
    from .train import RECIPES, get_recipe
    if ns.adapter:
        info = _adapter_info(ns.adapter)
        if ns.json:
            print(json.dumps(info, indent=2))
        else:
            width = max(len(k) for k in info)
            for k, v in info.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    v = f"{v:,d}"
                print(f"{k:<{width}}  {_printable(v)}")
        return 0
    if ns.recipe:
        r = get_recipe(ns.recipe)
        data = dataclasses.asdict(r)
        if ns.json:
            print(json.dumps(data, indent=2))
        else:
            print(f"{r.name}: {r.summary}\n  source: {r.source}\n  settings: "
                  + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r.settings.items())
                  + (f"\n  notes: {r.notes}" if r.notes else ""))
        return 0
    methods = {}
    for name in list_methods():
        method, overrides = resolve_method(name)
        impl = get_method(name)
        methods[name] = dict(method=method, overrides=overrides,
                             families=list(impl.families) if impl.families else "any",
                             description=impl.description)
    listing = dict(methods=methods,
                   recipes={n: r.summary for n, r in sorted(RECIPES.items())},
                   tasks={n: f"{t.description} ({t.kind}; like VTAB {t.analogue})"
                          for n, t in sorted(TASKS.items())})
    if ns.json:
        print(json.dumps(listing, indent=2))
        return 0
    print("methods:")
    for name, m in methods.items():
        alias = f" (= {m['method']} {m['overrides']})" if m["overrides"] else ""
        print(f"  {name:<14} {m['description']}{alias}; families: {m['families']}")
    print("recipes (--recipe):")
    for name, summary in listing["recipes"].items():
        print(f"  {name:<14} {summary}")
    print("built-in tasks (--task):")
    for name, desc in listing["tasks"].items():
        print(f"  {name:<14} {desc}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``timm-peft`` console script (also ``python -m timm_peft``).

    Bad input (unknown method or recipe, missing data, a checkpoint of another run ...) ends
    with exit status 2 and one line saying what was wrong; ``--debug`` shows the traceback.

    Example:
        >>> main(["info", "--recipe", "vtab1k"])  # doctest: +ELLIPSIS
        vtab1k: VTAB-1k protocol...
        0
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    commands = dict(train=_cmd_train, eval=_cmd_eval, reproduce=_cmd_reproduce, info=_cmd_info,
                    serve=_cmd_serve)
    from .io.offline import offline_when_unreachable
    with _console_logging(), offline_when_unreachable():  # no Hub: fail in seconds, not a minute
        try:
            return commands[ns.command](ns)
        except (ValueError, TypeError, OSError, RuntimeError) as e:
            if ns.debug:
                raise
            print(f"timm-peft {ns.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # Ctrl-C: one line (train's says what was saved)
            if ns.debug:
                raise
            print(f"\ntimm-peft {ns.command}: {e or 'interrupted'}", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _console_logging() -> Iterator[None]:
    """The ``timm_peft`` log on stderr while a command runs (as timm's train.py sets up its
    logging): run header, epoch summaries and warnings show with or without --no-progress."""
    from .train.loop import _TqdmHandler
    pkg = logging.getLogger("timm_peft")
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level, pkg.level = pkg.level, logging.INFO
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
