"""Crafted bad adapters and a mutation fuzzer for timm_peft's adapter loading.

Used by ``tests/test_bad_adapters.py`` (in a fresh process, so memory can be measured) and as a
script::

    python tests/adapter_cases.py crafted                      # every crafted bad adapter
    python tests/adapter_cases.py fuzz --seed 0 --cases 2400 --report benchmarks/results/fuzz_adapters

Every case starts from a valid adapter of a tiny model and damages it. A crafted case must end
in an :class:`~timm_peft.AdapterError` whose message matches the case's pattern (naming the
field), in under a second; a fuzz case may also load (a harmless mutation), but anything other
than success or an ``AdapterError`` is a failure, and so is a case running past its time limit.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ["HF_HUB_OFFLINE"] = "1"

import timm  # noqa: E402
import torch  # noqa: E402

import timm_peft  # noqa: E402
from timm_peft.io import CONFIG_NAME, TIMM_CONFIG_NAME, WEIGHTS_NAME, AdapterError  # noqa: E402

TRAINING_ARGS = "training_args.json"

TINY_VIT = dict(img_size=32, depth=2)
#: the valid adapters every case starts from: (model name, create_model kwargs)
TEMPLATES = {
    "vit_linear": ("vit_tiny_patch16_224.linear", dict(num_classes=3, **TINY_VIT)),
    "vit_vpt": ("vit_tiny_patch16_224.vpt", dict(num_classes=3, peft_cfg=dict(num_prompts=2),
                                                 **TINY_VIT)),
    "vit_lion": ("vit_tiny_patch16_224.lion",
                 dict(num_classes=3, peft_cfg=dict(p1_width=4, p2_width=8, norm_groups=2),
                      **TINY_VIT)),
    "resnet_bias": ("resnet10t.bias", dict(num_classes=3)),
    "vit_mlp3": ("vit_tiny_patch16_224.mlp3", dict(num_classes=3, **TINY_VIT)),
    "vit_sidetune": ("vit_tiny_patch16_224.sidetune",
                     dict(num_classes=3, peft_cfg=dict(side_channels=(8, 16), side_pool=2),
                          **TINY_VIT)),
}


DATA_DIR = Path(tempfile.gettempdir())  # set by make_templates


def make_templates(root: Path) -> dict[str, Path]:
    """Save one valid adapter per template (random bases, trained tensors perturbed), with the
    ``training_args.json`` of a run on a tiny image folder."""
    global DATA_DIR
    DATA_DIR = make_data(root / "data")
    out = {}
    for name, (model_name, kwargs) in TEMPLATES.items():
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        out[name] = timm_peft.save_pretrained(model, root / name,
                                              label_names=["a", "b", "c"])
        write_training_args(out[name], model_name)
    return out


def write_training_args(d: Path, model_name: str) -> None:
    """The ``training_args.json`` ``timm-peft train`` writes, for a tiny generated task."""
    from timm_peft.train import TrainConfig
    args = TrainConfig(model=model_name, data_dir=str(DATA_DIR), pretrained=False,
                       batch_size=6, epochs=1).to_dict()
    data = read_cfg(d).get("data_config")
    args.update(classes=["a", "b", "c"], data_config=data, metrics={"test_acc": 0.5})
    (d / TRAINING_ARGS).write_text(json.dumps(args, indent=2))


def template_model(template: str) -> torch.nn.Module:
    """The model a template adapter was saved from (same seed: same random base)."""
    model_name, kwargs = TEMPLATES[template]
    torch.manual_seed(0)
    return timm.create_model(model_name, pretrained=False, **kwargs)


def make_data(root: Path) -> Path:
    """A 3-class ImageFolder tree (classes a, b, c) for the templates' training_args.json."""
    from PIL import Image
    for split in ("train", "test"):
        for i, name in enumerate("abc"):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (80 * i, 40, 200 - 80 * i)).save(d / "0.png")
    return root


# ----------------------------------------------------------------------------------------------
# editing helpers
# ----------------------------------------------------------------------------------------------

def read_cfg(d: Path) -> dict[str, Any]:
    return json.loads((d / CONFIG_NAME).read_text())


def write_cfg(d: Path, cfg: Any) -> None:
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def edit(fn: Callable[[dict], Any]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        cfg = read_cfg(d)
        fn(cfg)
        write_cfg(d, cfg)
    return apply


def setk(key: str, value: Any) -> Callable[[Path], None]:
    """Set ``a.b.c`` in the config (``None`` value deletes when ``value is DELETE``)."""
    def fn(cfg: dict) -> None:
        *path, last = key.split(".")
        for p in path:
            cfg = cfg[p]
        if value is DELETE:
            del cfg[last]
        else:
            cfg[last] = copy.deepcopy(value)
    return edit(fn)


DELETE = object()


def raw_cfg(text: str | bytes) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / CONFIG_NAME).write_bytes(text if isinstance(text, bytes) else text.encode())
    return apply


def split_weights(d: Path) -> tuple[dict, bytes]:
    blob = (d / WEIGHTS_NAME).read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_weights(d: Path, blob: bytes, fix_hash: bool = True) -> None:
    """Write a weights file; with ``fix_hash`` the config names its hash (a deliberate forgery)."""
    (d / WEIGHTS_NAME).write_bytes(blob)
    if fix_hash:
        cfg = read_cfg(d)
        cfg["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        write_cfg(d, cfg)


def pack(header: Any, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data


def header_edit(fn: Callable[[dict, bytes], tuple[Any, bytes]]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        header, data = split_weights(d)
        header, data = fn(header, data)
        write_weights(d, pack(header, data))
    return apply


def _first(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def _retype(dtype: str, itemsize: int) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def fn(h: dict, data: bytes) -> tuple[dict, bytes]:  # re-encode every tensor as `dtype`
        out, chunks, pos = {"__metadata__": h.get("__metadata__", {})}, [], 0
        for k in sorted(k for k in h if k != "__metadata__"):
            n = 1
            for s in h[k]["shape"]:
                n *= s
            chunks.append(b"\0" * (n * itemsize))
            out[k] = dict(dtype=dtype, shape=h[k]["shape"], data_offsets=[pos, pos + n * itemsize])
            pos += n * itemsize
        return out, b"".join(chunks)
    return fn


def _values(value: float) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        from safetensors.torch import load, save
        tensors = load((d / WEIGHTS_NAME).read_bytes())
        k = sorted(k for k, t in tensors.items() if t.is_floating_point())[0]
        tensors[k] = tensors[k].clone()
        tensors[k].view(-1)[0] = value
        write_weights(d, save(tensors, metadata={"format": "pt"}))
    return apply


def _drop_tensor(h: dict, data: bytes) -> tuple[dict, bytes]:
    k = _first(h)
    b, e = h.pop(k)["data_offsets"]
    for v in h.values():
        if isinstance(v, dict) and "data_offsets" in v and v["data_offsets"][0] >= e:
            v["data_offsets"] = [v["data_offsets"][0] - (e - b), v["data_offsets"][1] - (e - b)]
    return h, data[:b] + data[e:]


def _extra_tensor(h: dict, data: bytes) -> tuple[dict, bytes]:
    h["evil.tensor"] = dict(dtype="F32", shape=[2], data_offsets=[len(data), len(data) + 8])
    return h, data + b"\0" * 8


def _reshape(h: dict, data: bytes) -> tuple[dict, bytes]:
    k = max((k for k in h if k != "__metadata__"), key=lambda k: len(h[k]["shape"]))
    shape = h[k]["shape"]
    h[k]["shape"] = [shape[-1], *shape[:-1]] if len(shape) > 1 and shape[0] != shape[-1] \
        else [1, *shape]
    return h, data


def _huge_shape(h: dict, data: bytes) -> tuple[dict, bytes]:
    h[_first(h)]["shape"] = [10 ** 7, 10 ** 7]
    return h, data


def _set_entry(key: str, value: Any) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def fn(h: dict, data: bytes) -> tuple[dict, bytes]:
        if value is DELETE:
            del h[_first(h)][key]
        else:
            h[_first(h)][key] = value
        return h, data
    return fn


def _overlap(h: dict, data: bytes) -> tuple[dict, bytes]:
    keys = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = keys[0], keys[1]
    n = h[a]["data_offsets"][1] - h[a]["data_offsets"][0]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + (
        h[b]["data_offsets"][1] - h[b]["data_offsets"][0])] if n else h[b]["data_offsets"]
    return h, data


def _raw_weights(blob: bytes) -> Callable[[Path], None]:
    return lambda d: write_weights(d, blob)


def _many_tensors(h: dict, data: bytes) -> tuple[dict, bytes]:
    for i in range(10_001):
        h[f"t{i}"] = dict(dtype="F32", shape=[0], data_offsets=[len(data), len(data)])
    return h, data


def _flip_weight_byte(d: Path) -> None:
    blob = bytearray((d / WEIGHTS_NAME).read_bytes())
    blob[-1] ^= 0xFF
    (d / WEIGHTS_NAME).write_bytes(bytes(blob))


def _truncate(d: Path) -> None:
    blob = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(blob[: len(blob) // 2])


def _deep(n: int) -> str:
    return '{"format_version": 1, "x": ' + "[" * n + "]" * n + "}"


# ----------------------------------------------------------------------------------------------
# crafted cases: (name, template, damage, expected message pattern, how to load)
# ----------------------------------------------------------------------------------------------

Case = tuple[str, str, Callable[[Path], None], str]
_HOSTILE_URL = "http://127.0.0.1:9/evil.safetensors"


def crafted_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name: str, damage: Callable[[Path], None], pattern: str,
            template: str = "vit_linear") -> None:
        cases.append((name, template, damage, pattern))

    # --- adapter_config.json as a file --------------------------------------------------------
    add("config_missing", lambda d: (d / CONFIG_NAME).unlink(), "no adapter_config.json in")
    add("config_not_json", raw_cfg('{"format_version": 1, '), "is not valid JSON")
    add("config_array", raw_cfg("[1, 2]"), "must hold a JSON object")
    add("config_deep_nesting", raw_cfg(_deep(100_000)), "nested too deeply|not valid JSON|bytes")
    add("config_nesting_past_limit", raw_cfg(_deep(40)), "nested deeper than 16 levels")
    add("config_oversized", raw_cfg('{"x": "' + "a" * (2 << 20) + '"}'), "may be at most 1,048,576")
    add("config_not_utf8", raw_cfg(b'{"x": "\xff\xfe"}'), "is not UTF-8 text")
    add("config_nan_literal", raw_cfg('{"format_version": NaN}'), "not a number JSON allows")
    add("config_infinity_literal", raw_cfg('{"format_version": -Infinity}'),
        "not a number JSON allows")
    add("config_overflowing_float", raw_cfg('{"format_version": 1e999}'), "only finite numbers")
    add("config_huge_int_literal", raw_cfg('{"format_version": ' + "9" * 5000 + "}"),
        "is not valid JSON")
    for key in ("format_version", "peft_type", "peft_config", "architecture", "model_args",
                "weights_sha256"):
        add(f"missing_{key}", setk(key, DELETE), rf"incomplete: missing \['{key}'\]")
    add("unknown_top_level_field", setk("checkpoint_path", "/etc/passwd"),
        r"unknown field\(s\) \['checkpoint_path'\]")
    for i, v in enumerate(["1", 0, -1, True, 1.5]):
        add(f"format_version_bad_{i}", setk("format_version", v),
            "format_version must be a positive integer")
    add("format_version_future", setk("format_version", 99), "format_version 99, newer")
    for i, v in enumerate([123, None, "dora", [], {"a": 1}]):
        add(f"peft_type_bad_{i}", setk("peft_type", v), "field 'peft_type': unknown PEFT method")
    for i, v in enumerate([123, None, "", "../../etc", "a" * 300]):
        add(f"architecture_bad_type_{i}", setk("architecture", v), "field 'architecture' must be")
    add("architecture_unknown", setk("architecture", "not_a_timm_model"),
        "field 'architecture' names 'not_a_timm_model', not a timm architecture")
    for i, v in enumerate([5, "bad tag!", "", ["augreg"]]):
        add(f"pretrained_tag_bad_{i}", setk("pretrained_tag", v), "field 'pretrained_tag' must be")
    add("pretrained_tag_unknown", setk("pretrained_tag", "no_such_tag"),
        "field 'pretrained_tag' 'no_such_tag' is not a timm weight tag")
    # --- method config (bounded by each method's config class) --------------------------------
    add("peft_config_list", setk("peft_config", [1]), "model_args and peft_config must be JSON")
    add("peft_config_unknown_field", setk("peft_config.evil", 1),
        r"bad peft_config: unknown PeftConfig field")
    add("peft_config_wrong_type", setk("peft_config.train_head", "yes"),
        "PeftConfig.train_head must be bool")
    add("vpt_num_prompts_huge", setk("peft_config.num_prompts", 10 ** 7),
        r"VPTConfig.num_prompts must be <= 1000", "vit_vpt")
    add("vpt_num_prompts_negative", setk("peft_config.num_prompts", -1),
        r"VPTConfig.num_prompts must be >= 0", "vit_vpt")
    add("vpt_num_prompts_string", setk("peft_config.num_prompts", "5"),
        r"VPTConfig.num_prompts must be int", "vit_vpt")
    add("vpt_num_prompts_float", setk("peft_config.num_prompts", 2.0),
        r"VPTConfig.num_prompts must be int", "vit_vpt")
    add("vpt_dropout_out_of_range", setk("peft_config.dropout", 2.0),
        r"VPTConfig.dropout must be < 1.0", "vit_vpt")
    add("vpt_projection_dim_huge", setk("peft_config.projection_dim", 10 ** 9),
        r"VPTConfig.projection_dim must be <= 8192", "vit_vpt")
    add("vpt_init_not_a_choice", setk("peft_config.init", "evil"),
        r"VPTConfig.init must be one of", "vit_vpt")
    add("vpt_more_prompts_than_saved", setk("peft_config.num_prompts", 3),
        r"mis-shaped tensors", "vit_vpt")
    add("lion_eval_max_iter_unbounded", edit(lambda c: c["peft_config"].update(
        tol=0, eval_max_iter=10 ** 9)), r"LionConfig.eval_max_iter must be <= 1000", "vit_lion")
    add("lion_max_iter_unbounded", setk("peft_config.max_iter", 10 ** 9),
        r"LionConfig.max_iter must be <= 1000", "vit_lion")
    add("lion_backward_max_iter_unbounded", setk("peft_config.backward_max_iter", 10 ** 6),
        r"LionConfig.backward_max_iter must be <= 1000", "vit_lion")
    add("lion_p1_width_huge", setk("peft_config.p1_width", 10 ** 6),
        r"LionConfig.p1_width must be <= 1024", "vit_lion")
    add("lion_p2_width_huge", setk("peft_config.p2_width", 10 ** 6),
        r"LionConfig.p2_width must be <= 4096", "vit_lion")
    add("lion_anderson_m_huge", setk("peft_config.anderson_m", 10 ** 6),
        r"LionConfig.anderson_m must be <= 50", "vit_lion")
    add("lion_identity_prompt_flipped", setk("peft_config.identity_prompt", "no"),
        r"LionConfig.identity_prompt must be bool", "vit_lion")
    add("lion_gate_init_nan_like", setk("peft_config.gate_init", 1.0),
        r"LionConfig.gate_init must be < 1.0", "vit_lion")
    add("lion_wider_than_saved", setk("peft_config.p2_width", 16),
        r"mis-shaped tensors", "vit_lion")
    add("mlp_num_layers_huge", setk("peft_config.num_layers", 10 ** 6),
        r"MlpConfig.num_layers must be <= 16", "vit_mlp3")
    add("mlp_hidden_dim_huge", setk("peft_config.hidden_dim", 10 ** 9),
        r"MlpConfig.hidden_dim must be <= 8192", "vit_mlp3")
    add("mlp_deeper_than_saved", edit(lambda c: c["peft_config"].update(
        num_layers=16, hidden_dim=8192)), r"missing tensors|unexpected tensors|mis-shaped",
        "vit_mlp3")
    add("sidetune_side_channels_huge", setk("peft_config.side_channels", [10 ** 6]),
        r"SidetuneConfig.side_channels must be <= 1024", "vit_sidetune")
    add("sidetune_too_many_layers", setk("peft_config.side_channels", [8] * 10 ** 4),
        r"SidetuneConfig.side_channels must hold 1 to 8", "vit_sidetune")
    add("sidetune_side_pool_huge", setk("peft_config.side_pool", 10 ** 4),
        r"SidetuneConfig.side_pool must be <= 8", "vit_sidetune")
    add("sidetune_alpha_at_an_end_but_learned", setk("peft_config.alpha", 1.0),
        r"SidetuneConfig.alpha must be in \(0, 1\)", "vit_sidetune")
    # the largest side network the bounds allow (~60M values): refused against the saved
    # tensors' shapes before anything is allocated
    add("sidetune_largest_in_bounds", edit(lambda c: c["peft_config"].update(
        side_channels=[1024] * 8, side_pool=8)), r"missing tensors|unexpected tensors|mis-shaped",
        "vit_sidetune")
    add("bias_unknown_field", setk("peft_config.num_blocks", 2),
        r"unknown BiasConfig field|unknown PeftConfig field", "resnet_bias")
    # --- model_args: only architecture arguments, bounded ------------------------------------
    add("model_args_list", setk("model_args", [1]), "model_args and peft_config must be JSON")
    for kw, value in [
            ("pretrained_cfg_overlay", {"url": _HOSTILE_URL}),
            ("pretrained_cfg_overlay", {"hf_hub_id": "evil/weights"}),
            ("pretrained_cfg_overlay", {"file": "/etc/passwd"}),
            ("checkpoint_path", "/etc/passwd"), ("pretrained_cfg", {"url": _HOSTILE_URL}),
            ("pretrained", True), ("cache_dir", "/tmp/evil"), ("features_only", True),
            ("pretrained_strict", False), ("peft", "full"), ("peft_cfg", {}),
            ("timm_peft_adapter", "x"), ("device", "cuda"), ("scriptable", True)]:
        add(f"model_args_loading_kw_{kw}_{len(cases)}", setk(f"model_args.{kw}", value),
            rf"field 'model_args.{kw}' is not allowed: it chooses where weights come from")
    add("model_args_not_an_argument", setk("model_args.evil", 1),
        r"field 'model_args.evil' is not allowed: it is not an argument of")
    add("model_args_depth_huge", setk("model_args.depth", 10 ** 6),
        r"field 'model_args.depth' must be within \[-24, 24\]")
    add("model_args_embed_dim_huge", setk("model_args.embed_dim", 10 ** 6),
        r"field 'model_args.embed_dim' must be within")
    add("model_args_img_size_huge", setk("model_args.img_size", 10 ** 5),
        r"field 'model_args.img_size' must be within")
    add("model_args_num_classes_string", setk("model_args.num_classes", "5"),
        r"field 'model_args.num_classes' must be int \(like its default\), got '5'")
    add("model_args_num_classes_huge", setk("model_args.num_classes", 10 ** 9),
        r"field 'model_args.num_classes' must be within \[-100000, 100000\]")
    add("model_args_num_classes_negative", setk("model_args.num_classes", -3),
        r"do not build|label_names")
    add("model_args_num_classes_other", setk("model_args.num_classes", 4),
        r"label_names' has 3 names but model_args.num_classes is 4")
    add("model_args_nested_object", setk("model_args.drop_rate", {"a": 1}),
        r"field 'model_args.drop_rate' must be a JSON scalar")
    add("model_args_long_list", setk("model_args.img_size", [32] * 100),
        r"field 'model_args.img_size' must be a JSON scalar or a list of at most 64")
    add("model_args_bad_act_layer", setk("model_args.act_layer", "no_such_layer"),
        r"fields 'model_args'/'peft_config' do not build")
    add("model_args_wider_base", edit(lambda c: c["model_args"].update(embed_dim=384,
                                                                         mlp_ratio=64.0)),
        r"field 'model_args' makes a base of [\d,]+ parameters; at most")
    add("model_args_mlp_ratio_huge", setk("model_args.mlp_ratio", 1e6),
        r"field 'model_args' makes a base of")
    add("model_args_bad_patch", setk("model_args.patch_size", 0),
        r"fields 'model_args'/'peft_config' do not build")
    add("resnet_model_args_layers_huge", setk("model_args.layers", [10 ** 6, 1, 1, 1]),
        r"field 'model_args.layers' must be within", "resnet_bias")
    # --- data config, class names, provenance, bookkeeping ------------------------------------
    for i, (key, value, pattern) in enumerate([
            ("data_config", [1], "field 'data_config' must be an object"),
            ("data_config.evil", 1, "field 'data_config' must be an object"),
            ("data_config.input_size", [3, 32], "field 'data_config.input_size' must be"),
            ("data_config.input_size", [3, 10 ** 6, 32], "field 'data_config.input_size' must be"),
            ("data_config.input_size", [0, 32, 32], "field 'data_config.input_size' must be"),
            ("data_config.mean", [0.5], "field 'data_config.mean' must be a list of 3"),
            ("data_config.std", [0.5, 0.0, 0.5], "field 'data_config.std' must be"),
            ("data_config.interpolation", "evil", "field 'data_config.interpolation' must be"),
            ("data_config.crop_pct", 0, "field 'data_config.crop_pct' must be"),
            ("data_config.crop_pct", "x", "field 'data_config.crop_pct' must be"),
            ("data_config.crop_mode", "evil", "field 'data_config.crop_mode' must be"),
            ("label_names", ["a", "b"], "field 'label_names' has 2 names"),
            ("label_names", [1, 2, 3], "field 'label_names' must be a list of class-name"),
            ("label_names", "abc", "field 'label_names' must be a list"),
            ("label_names", ["a", "b", "c" * 5000], "field 'label_names' must be a list"),
            ("base_source", {"kind": "evil"}, "field 'base_source' must be"),
            ("base_source", {"kind": "timm", "url": _HOSTILE_URL}, "field 'base_source' must be"),
            ("base_source", "timm", "field 'base_source' must be"),
            ("base_source", {"kind": "timm", "hf_hub_id": "a b"},
             "field 'base_source.hf_hub_id' must be"),
            ("weights_sha256", "abc", "field 'weights_sha256' must be"),
            ("weights_sha256", None, "field 'weights_sha256' must be"),
            ("base_fingerprint", "md5:00", "field 'base_fingerprint' must be"),
            ("num_parameters", -1, "field 'num_parameters' must be a non-negative integer"),
            ("timm_version", "1.0\n<script>", "field 'timm_version' must be"),
            ("library_name", "evil", "field 'library_name' must be one of"),
            ("inference_mode", "yes", "field 'inference_mode' must be one of"),
            ("base_model_name_or_path", "../../x y", "field 'base_model_name_or_path' must be")]):
        add(f"field_{key}_{i}", setk(key, value), pattern)
    # --- adapter_model.safetensors ------------------------------------------------------------
    add("weights_missing", lambda d: (d / WEIGHTS_NAME).unlink(), "no adapter_model.safetensors in")
    add("weights_empty", _raw_weights(b""), "header length .missing. does not fit")
    add("weights_four_bytes", _raw_weights(b"\x01\x02\x03\x04"), "header length .missing.")
    add("weights_header_length_huge", _raw_weights((2 ** 60).to_bytes(8, "little") + b"{}"),
        "header length 1152921504606846976 does not fit")
    add("weights_header_longer_than_file", _raw_weights((100).to_bytes(8, "little") + b"{}"),
        "header length 100 does not fit")
    add("weights_header_not_json", _raw_weights((16).to_bytes(8, "little") + b"{not a header!!}"),
        "bad header")
    add("weights_header_list", _raw_weights(pack([1, 2], b"")), "the header is not an object")
    add("weights_metadata_not_strings", header_edit(
        lambda h, d: ({**h, "__metadata__": {"a": 1}}, d)), "'__metadata__' must map strings")
    add("weights_entry_missing_dtype", header_edit(_set_entry("dtype", DELETE)),
        "header entry must have exactly")
    add("weights_dtype_unknown", header_edit(_set_entry("dtype", "F8_E4M3")),
        "dtype 'F8_E4M3' is not allowed")
    add("weights_dtype_unhashable", header_edit(_set_entry("dtype", ["F32"])),
        r"dtype \['F32'\] is not allowed")
    add("weights_shape_negative", header_edit(_set_entry("shape", [-1])), "shape must be a list")
    add("weights_shape_too_many_dims", header_edit(_set_entry("shape", [1] * 9)),
        "shape must be a list of at most 8")
    add("weights_shape_huge", header_edit(_huge_shape), r"data_offsets .* hold")
    add("weights_offsets_bad", header_edit(_set_entry("data_offsets", [5, 1])),
        "data_offsets must be")
    add("weights_offsets_overlap", header_edit(_overlap), "overlap or leave a gap|hold")
    add("weights_trailing_bytes", lambda d: write_weights(d, (d / WEIGHTS_NAME).read_bytes() +
                                                          b"\0" * 64), "header describes")
    add("weights_too_many_tensors", header_edit(_many_tensors), "at most 10,000 are allowed")
    add("weights_missing_tensor", header_edit(_drop_tensor), r"missing tensors \['head")
    add("weights_extra_tensor", header_edit(_extra_tensor), r"unexpected tensors \['evil.tensor'\]")
    add("weights_misshaped_tensor", header_edit(_reshape), "mis-shaped tensors")
    add("weights_int_dtype", header_edit(_retype("I32", 4)), "tensors of another dtype")
    add("weights_half_dtype", header_edit(_retype("F16", 2)), "tensors of another dtype")
    add("weights_bool_dtype", header_edit(_retype("BOOL", 1)), "tensors of another dtype")
    add("weights_nan", _values(float("nan")), "holds NaN or Inf values")
    add("weights_inf", _values(float("inf")), "holds NaN or Inf values")
    add("weights_nan_resnet", _values(float("nan")), "holds NaN or Inf values", "resnet_bias")
    add("weights_hash_mismatch", _flip_weight_byte, "field 'weights_sha256' differs")
    add("weights_truncated", _truncate, "truncated")
    add("weights_is_directory", lambda d: ((d / WEIGHTS_NAME).unlink(),
                                           (d / WEIGHTS_NAME).mkdir()), "no adapter_model|it is a directory")
    return cases


def _seeded(fn: Callable[[], Any]) -> Any:
    torch.manual_seed(0)  # a template's base is random: the same seed rebuilds it
    return fn()


def _eval(d: Any) -> Any:
    from timm_peft.train import evaluate_adapter
    torch.manual_seed(0)
    return evaluate_adapter(d, "test", device="cpu")


def _info(d: Any) -> Any:
    from timm_peft.cli import _adapter_info
    return _adapter_info(d)


#: every entry point that reads an adapter: ``(adapter path, template name)`` -> anything
LOADERS: dict[str, Callable[[Any, str], Any]] = {
    "from_pretrained": lambda d, t: _seeded(lambda: timm_peft.from_pretrained(d)),
    "load_adapter": lambda d, t: timm_peft.load_adapter(template_model(t), d),
    "verify": lambda d, t: timm_peft.io.verify_adapter(d),
    "read_config": lambda d, t: timm_peft.read_adapter_config(d),
    "local_dir": lambda d, t: _seeded(lambda: timm.create_model(f"local-dir:{d}",
                                                                pretrained=True)),
    "local_dir_arch": lambda d, t: timm.create_model(f"local-dir:{d}", pretrained=False),
    "info": lambda d, t: _info(d),
    "eval": lambda d, t: _eval(d),
}


#: adapter names that are not directories at all (crafted too)
BAD_NAMES: list[tuple[str, Any, str]] = [
    ("path_none", None, "an adapter is a directory"),
    ("path_int", 5, "an adapter is a directory"),
    ("path_nonexistent", "/nonexistent/adapter", "does not exist"),
    ("hub_bad_id", "hf-hub:org/na/me", "bad Hub adapter id"),
    ("hub_uncached_offline", "hf-hub:nobody/not-cached-anywhere", "HF_HUB_OFFLINE is set"),
]


class Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Timeout()


def run_one(fn: Callable[[], Any], limit_s: float) -> tuple[str, str, float]:
    """``(outcome, message, seconds)``; outcome: loaded, adapter_error, hang or the exception type.

    A hang is ``limit_s`` seconds of CPU (a busy loop) or ``WALL_FACTOR`` times that of wall
    time (blocked, e.g. on a FIFO): on a shared, loaded machine a wall-clock limit alone would
    call slow cases hangs.
    """
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGPROF, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s * WALL_FACTOR)
    signal.setitimer(signal.ITIMER_PROF, limit_s)
    t = time.perf_counter()
    try:
        fn()
        outcome, msg = "loaded", ""
    except AdapterError as e:
        outcome, msg = "adapter_error", str(e)
    except Timeout:
        outcome, msg = "hang", f"no result within {limit_s} s of CPU or {limit_s * WALL_FACTOR} s"
    except Exception as e:  # noqa: BLE001 - what the fuzzer counts
        outcome, msg = type(e).__name__, str(e)[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.setitimer(signal.ITIMER_PROF, 0)
    return outcome, msg, time.perf_counter() - t


#: wall-clock limit of a case, in multiples of its CPU limit
WALL_FACTOR = 12


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_crafted(loader: str = "from_pretrained") -> dict[str, Any]:
    """Run every crafted case once; returns per-case results and the peak memory growth."""
    import re
    root = Path(tempfile.mkdtemp(prefix="bad_adapters_"))
    try:
        templates = make_templates(root / "templates")
        for t, d in templates.items():  # warm up (imports, caches); each template must load
            LOADERS[loader](d, t)
        base_rss = _maxrss_mb()
        results = []
        for name, template, damage, pattern in crafted_cases():
            d = root / "cases" / name
            shutil.copytree(templates[template], d)
            damage(d)
            outcome, msg, secs = run_one(lambda: LOADERS[loader](d, template), 10.0)
            results.append(dict(name=name, outcome=outcome, seconds=round(secs, 4),
                                matched=bool(re.search(pattern, msg)), pattern=pattern,
                                message=msg[:400]))
        for name, value, pattern in BAD_NAMES:
            outcome, msg, secs = run_one(lambda: LOADERS[loader](value, "vit_linear"), 10.0)
            results.append(dict(name=name, outcome=outcome, seconds=round(secs, 4),
                                matched=bool(re.search(pattern, msg)), pattern=pattern,
                                message=msg[:400]))
        return dict(loader=loader, cases=results,
                    peak_rss_growth_mb=round(_maxrss_mb() - base_rss, 1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# mutation fuzzer
# ----------------------------------------------------------------------------------------------

_POOL: list[Any] = [None, True, False, 0, 1, -1, 2 ** 31, 10 ** 9, -10 ** 9, 0.5, -0.0, 1e308,
                    "", "x", "a" * 1000, "../../etc/passwd", "http://127.0.0.1:9/x", [], [1],
                    [None], {}, {"a": 1}, [[[[1]]]], {"url": "http://127.0.0.1:9/x"},
                    {"file": "/etc/passwd"}, [3, 10 ** 6, 10 ** 6], "NaN"]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _mutate_json(cfg: Any, rng: random.Random) -> Any:
    cfg = copy.deepcopy(cfg)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        paths = [p for p in _paths(cfg) if p]
        if not paths:
            return rng.choice(_POOL)
        path = rng.choice(paths)
        parent = cfg
        for p in path[:-1]:
            parent = parent[p]
        op = rng.random()
        old = parent[path[-1]]
        if op < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        elif op < 0.25 and isinstance(parent, dict):
            parent[rng.choice(["evil", "checkpoint_path", "pretrained_cfg_overlay", "url"])] = \
                rng.choice(_POOL)
        elif op < 0.5 and _is_num(old):
            parent[path[-1]] = rng.choice([old * 10 ** rng.randint(1, 9), -old, old + 1,
                                           old - 1, float(old), 0, str(old)])
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(_POOL))
    return cfg


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mutate_bytes(blob: bytes, rng: random.Random, lo: int = 0) -> bytes:
    b = bytearray(blob)
    op = rng.random()
    if op < 0.4 and len(b) > lo:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(lo, len(b))
            b[i] = rng.randrange(256)
    elif op < 0.6:
        b = b[: rng.randrange(0, len(b) + 1)]
    elif op < 0.8:
        i = rng.randrange(lo, len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        i = rng.randrange(lo, max(lo + 1, len(b)))
        del b[i:i + rng.randint(1, 16)]
    return bytes(b)


def _mutate_file_json(d: Path, name: str, rng: random.Random) -> None:
    path = d / name
    path.write_text(json.dumps(_mutate_json(json.loads(path.read_text()), rng)))


def _layout(d: Path, rng: random.Random) -> str:
    """Damage the directory's layout: a file missing, or replaced by a directory, a FIFO, an
    empty file, a link to a device, a dangling or looping link; or a stray file added."""
    name = rng.choice([CONFIG_NAME, WEIGHTS_NAME, TIMM_CONFIG_NAME, TRAINING_ARGS])
    path = d / name
    op = rng.choice(["missing", "directory", "fifo", "empty", "dev_zero", "dangling", "loop",
                     "stray", "dir_is_link"])
    if op == "stray":
        (d / rng.choice(["model.safetensors", "pytorch_model.bin", "extra.json"])).write_bytes(
            b"\0" * 16)
        return op
    if op == "dir_is_link":  # the whole adapter reached through a symbolic link: must load
        moved = d.with_name(d.name + "_real")
        shutil.rmtree(moved, ignore_errors=True)
        d.rename(moved)
        d.symlink_to(moved, target_is_directory=True)
        return op
    path.unlink(missing_ok=True)
    if op == "directory":
        path.mkdir()
    elif op == "fifo":
        os.mkfifo(path)
    elif op == "empty":
        path.write_bytes(b"")
    elif op == "dev_zero":
        path.symlink_to("/dev/zero")
    elif op == "dangling":
        path.symlink_to(d / "nowhere")
    elif op == "loop":
        path.symlink_to(path)
    return op


def fuzz_case(d: Path, rng: random.Random) -> str:
    """Damage the adapter in ``d`` one random way; returns the kind of mutation."""
    kind = rng.choice(["config_json", "config_json", "config_json", "config_bytes",
                       "header_json", "header_bytes", "weights_bytes", "weights_values",
                       "timm_config_json", "timm_config_bytes", "training_args_json",
                       "training_args_json", "training_args_bytes", "layout"])
    if kind == "config_json":
        write_cfg(d, _mutate_json(read_cfg(d), rng))
    elif kind == "config_bytes":
        (d / CONFIG_NAME).write_bytes(_mutate_bytes((d / CONFIG_NAME).read_bytes(), rng))
    elif kind == "timm_config_json":
        _mutate_file_json(d, TIMM_CONFIG_NAME, rng)
    elif kind == "timm_config_bytes":
        (d / TIMM_CONFIG_NAME).write_bytes(_mutate_bytes((d / TIMM_CONFIG_NAME).read_bytes(), rng))
    elif kind == "training_args_json":
        _mutate_file_json(d, TRAINING_ARGS, rng)
    elif kind == "training_args_bytes":
        (d / TRAINING_ARGS).write_bytes(_mutate_bytes((d / TRAINING_ARGS).read_bytes(), rng))
    elif kind == "layout":
        kind = f"layout_{_layout(d, rng)}"
    elif kind == "header_json":
        header, data = split_weights(d)
        write_weights(d, pack(_mutate_json(header, rng), data))
    elif kind == "header_bytes":  # within the header, hash forged so the header parser is reached
        blob = (d / WEIGHTS_NAME).read_bytes()
        n = int.from_bytes(blob[:8], "little")
        write_weights(d, _mutate_bytes(blob[:8 + n], rng) + blob[8 + n:])
    elif kind == "weights_bytes":  # anywhere, hash forged or not
        blob = _mutate_bytes((d / WEIGHTS_NAME).read_bytes(), rng)
        write_weights(d, blob, fix_hash=rng.random() < 0.7)
    else:
        _values(rng.choice([float("nan"), float("inf"), -float("inf"), 1e30, 0.0]))(d)
    return kind


def run_controls(templates: dict[str, Path], limit_s: float) -> list[dict[str, Any]]:
    """Every loader on every unmutated template: each must load (else the fuzzer cannot tell a
    refusal of damage from a loader that refuses everything)."""
    out = []
    for loader in sorted(LOADERS):
        for t, d in sorted(templates.items()):
            outcome, msg, secs = run_one(lambda: LOADERS[loader](d, t), limit_s)
            out.append(dict(loader=loader, template=t, outcome=outcome, message=msg[:300],
                            seconds=round(secs, 3)))
    return out


def run_fuzz(seed: int, cases: int, limit_s: float = 10.0,
             progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``cases`` random mutations of the templates, loaded through a rotating entry point;
    the unmutated templates are loaded by every entry point before and after (live controls).
    ``progress`` gets the results so far every 250 cases (``completed`` says how many)."""
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="fuzz_adapters_"))
    counts: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    by_loader: dict[str, dict[str, int]] = {}
    failures = []
    slowest = 0.0
    t0 = time.perf_counter()
    try:
        templates = make_templates(root / "templates")
        controls = run_controls(templates, limit_s)  # also the warm-up
        base_rss = _maxrss_mb()
        loaders = sorted(LOADERS)

        def summary(completed: int) -> dict[str, Any]:
            bad_controls = [c for c in controls if c["outcome"] != "loaded"]
            return dict(seed=seed, cases=cases, completed=completed, counts=counts,
                        by_loader=by_loader, by_mutation=by_kind, controls=len(controls),
                        controls_failed=bad_controls,
                        other_exceptions=sum(v for k, v in counts.items()
                                             if k not in ("loaded", "adapter_error", "hang")),
                        hangs=counts.get("hang", 0), slowest_case_s=round(slowest, 3),
                        peak_rss_growth_mb=round(_maxrss_mb() - base_rss, 1),
                        total_s=round(time.perf_counter() - t0, 1), failures=failures[:50])

        for i in range(cases):
            template = rng.choice(sorted(templates))
            d = root / "case"
            for p in (d, d.with_name(d.name + "_real")):
                if p.is_symlink():
                    p.unlink()
                shutil.rmtree(p, ignore_errors=True)
            shutil.copytree(templates[template], d)
            kind = fuzz_case(d, rng)
            loader = loaders[i % len(loaders)]
            outcome, msg, secs = run_one(lambda: LOADERS[loader](d, template), limit_s)
            slowest = max(slowest, secs)
            counts[outcome] = counts.get(outcome, 0) + 1
            for table, key in ((by_kind, kind), (by_loader, loader)):
                table.setdefault(key, {}).setdefault(outcome, 0)
                table[key][outcome] += 1
            if outcome not in ("loaded", "adapter_error"):
                failures.append(dict(case=i, template=template, kind=kind, loader=loader,
                                     outcome=outcome, message=msg))
            if progress is not None and (i + 1) % 250 == 0 and i + 1 < cases:
                progress(summary(i + 1))
        controls += run_controls(templates, limit_s)
        return summary(cases)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _table(rows: dict[str, dict[str, int]], what: str) -> list[str]:
    outcomes = sorted({o for v in rows.values() for o in v})
    return [f"| {what} | " + " | ".join(outcomes) + " |",
            "|---" * (len(outcomes) + 1) + "|",
            *[f"| {k} | " + " | ".join(str(v.get(o, 0)) for o in outcomes) + " |"
              for k, v in sorted(rows.items())]]


def _write_report(res: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Adapter mutation fuzzer",
        "",
        f"`python tests/adapter_cases.py fuzz --seed {res['seed']} --cases {res['cases']}`: "
        + ("" if res["completed"] == res["cases"] else
           f"**unfinished: {res['completed']} of the {res['cases']} cases ran** (a progress "
           "report; the controls after the run are still to come). ")
        + f"{res['completed']} mutations of valid adapters ({', '.join(TEMPLATES)}; their "
        f"`adapter_config.json`, weights, `config.json`, `training_args.json` and directory "
        f"layout), each loaded through one of {len(LOADERS)} entry points in turn ({10.0:.0f} s "
        f"of CPU or {10.0 * WALL_FACTOR:.0f} s of wall time count as a hang). Live controls: every entry point loads every "
        f"unmutated template before and after the run ({res['controls']} loads, "
        f"**{len(res['controls_failed'])} failed**); a failed control fails the run.",
        "",
        "| outcome | cases |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(res["counts"].items())],
        "",
        f"Other exceptions: **{res['other_exceptions']}**; hangs: **{res['hangs']}**; slowest case "
        f"{res['slowest_case_s']} s; peak memory growth over the warmed-up process "
        f"{res['peak_rss_growth_mb']} MB; total {res['total_s']} s.",
        "",
        "Per entry point:",
        "",
        *_table(res["by_loader"], "entry point"),
        "",
        "Per mutation:",
        "",
        *_table(res["by_mutation"], "mutation"),
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("crafted")
    c.add_argument("--loader", default="from_pretrained", choices=sorted(LOADERS))
    f = sub.add_parser("fuzz")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--cases", type=int, default=100)
    f.add_argument("--report", type=Path, default=None, help="write <report>.json and .md")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    if ns.command == "crafted":
        res = run_crafted(ns.loader)
    else:
        report = ns.report
        res = run_fuzz(ns.seed, ns.cases,
                       progress=None if report is None else lambda r: _write_report(r, report))
        if report is not None:
            _write_report(res, report)
        if res["controls_failed"]:  # the run means nothing: say so with the exit status
            print(json.dumps(res))
            return 1
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
