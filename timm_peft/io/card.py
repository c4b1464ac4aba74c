"""The model card (``README.md``) and timm's ``config.json`` of an adapter.

The card is built with huggingface_hub's :class:`~huggingface_hub.ModelCard` from a template;
its metadata says only what is true: ``base_model`` (with ``base_model_relation: adapter``) and
``license`` only when the base really is timm's published weights, ``datasets`` only for a Hub
dataset id, and only accuracy-like metrics in the model-index.
"""
from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..core import get_method, unwrap_features
from .format import ADAPTER_MARKER, CONFIG_NAME, TIMM_CONFIG_NAME, WEIGHTS_NAME

__all__ = ["make_model_card", "timm_config", "CARD_FIELDS", "hub_dataset_id", "card_metrics"]

HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"

#: keyword arguments of ``save_pretrained``/``push_to_hub`` that go to the card
CARD_FIELDS: dict[str, tuple[type, ...]] = {
    "repo_id": (str,), "dataset": (str,), "metrics": (dict,), "training": (dict,),
    "license": (str,), "tags": (list, tuple), "description": (str,),
}
_ACCURACY = re.compile(r"(^|_)(acc|accuracy|top1|top5|acc1|acc5|f1|map|auc)(_|$)", re.I)

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{% if description %}{{ description }}

{% endif %}A **{{ peft_type }}** adapter for the timm model {{ base_link }}, made with timm_peft.
This repository holds only the task-specific tensors; {{ base_sentence }}

## Method

{{ method_text }}
{% if citation %}
```bibtex
{{ citation }}
```
{% endif %}
## Adapter

| | |
|---|---|
{% for k, v in adapter_rows %}| {{ k }} | {{ v }} |
{% endfor %}
## Preprocessing

The data configuration the adapter was trained with; `timm_peft.from_pretrained` puts it in
`model.pretrained_cfg`, so `timm.data.resolve_data_config(model=model)` returns it.

| | |
|---|---|
{% for k, v in data_rows %}| {{ k }} | {{ v }} |
{% endfor %}
## How to use

```python
import timm, timm_peft, torch
from PIL import Image

model = timm_peft.from_pretrained("{{ source }}"{{ load_args }}).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
image = Image.open("image.jpg").convert("RGB")
with torch.no_grad():
    probs = model(transform(image).unsqueeze(0)).softmax(-1)[0]
labels = model.pretrained_cfg.get("label_names") or range(model.num_classes)
for p, i in zip(*probs.topk(min(5, model.num_classes))):
    print(list(labels)[i], f"{p:.3f}")
```

With `timm_peft` imported, `timm.create_model("{{ timm_name }}", pretrained=True)` builds the same
model. Without it, timm refuses the repo (its `config.json` holds a `timm_peft_adapter` argument
no timm model accepts), so the adapter is never mistaken for full weights.
{% if training_rows %}
## Training

| setting | value |
|---|---|
{% for k, v in training_rows %}| {{ k }} | {{ v }} |
{% endfor %}{% endif %}{% if metric_rows %}
## Results

| metric | value |
|---|---|
{% for k, v in metric_rows %}| {{ k }} | {{ v }} |
{% endfor %}{% endif %}
## Files

- `{{ weights_name }}`: the adapter tensors (safetensors, nothing pickled)
- `{{ config_name }}`: method, config, base arch, weight tag, architecture arguments, data
  configuration, class names, base origin and fingerprint, weights hash
- `{{ timm_config_name }}`: what `timm.create_model("hf-hub:...")` reads

Saved with timm_peft {{ versions }}.
"""


def hub_dataset_id(dataset: str | None) -> str | None:
    """``dataset`` if it is a Hub dataset id (``org/name``), else None (a local path or task name).

    Example:
        >>> hub_dataset_id("uoft-cs/cifar10"), hub_dataset_id("digits"), hub_dataset_id("/data/x")
        ('uoft-cs/cifar10', None, None)
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if not dataset or dataset.count("/") != 1 or Path(dataset).exists():
        return None
    try:
        validate_repo_id(dataset)
    except HFValidationError:
        return None
    return dataset


def card_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The accuracy-like scalar metrics, rounded to 4 digits (what the model-index carries).

    Example:
        >>> card_metrics({"val_acc": 0.912345, "val_loss": 0.3, "best_epoch": 3})
        {'val_acc': 0.9123}
    """
    return {str(k): round(float(v), 4) for k, v in metrics.items()
            if _ACCURACY.search(str(k)) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def _method_text(peft_type: str) -> tuple[str, str | None]:
    """What the method says about itself: its paper (or its module's opening lines), citation."""
    method = get_method(peft_type)
    paper = getattr(method, "paper", None)
    if not paper:
        doc = inspect.getdoc(inspect.getmodule(type(method))) or ""
        paper = doc.split("\n\n")[0].replace("\n", " ").strip()
    text = f"`{peft_type}`: {method.description or method.name}."
    if paper:
        text += f" {paper}"
    return text, getattr(method, "citation", None)


def make_model_card(cfg: dict[str, Any], nbytes: int, **card_info: Any) -> str:
    """The ``README.md`` of an adapter: Hub YAML metadata and a vision model card.

    ``cfg`` is the adapter's ``adapter_config.json`` and ``nbytes`` the size of its weights file.
    ``card_info`` (all optional): ``repo_id`` (the Hub repo, used in the loading snippet),
    ``dataset`` (a Hub dataset id ``org/name`` goes into the metadata; any other name, such as a
    local path or a built-in task, only into the text), ``metrics`` (``{"val_acc": 0.91}``;
    accuracy-like ones become Hub evaluation results), ``training`` (settings such as
    ``{"epochs": 100}``), ``license`` (default: the base weights' license when the base is
    timm's), ``tags`` and ``description``.

    Example:
        >>> import timm, timm_peft, tempfile
        >>> d = timm_peft.save_pretrained(timm.create_model("resnet18.bias"), tempfile.mkdtemp(),
        ...                               dataset="uoft-cs/cifar10", metrics={"accuracy": 0.9})
        >>> (d / "README.md").read_text().splitlines()[0]
        '---'
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    unknown = sorted(set(card_info) - set(CARD_FIELDS))
    if unknown:
        raise TypeError(f"unknown model card field(s) {unknown}; allowed: {sorted(CARD_FIELDS)}")
    for key, value in card_info.items():
        if value is not None and not isinstance(value, CARD_FIELDS[key]):
            allowed = " or ".join(t.__name__ for t in CARD_FIELDS[key])
            raise TypeError(f"model card field {key!r} must be {allowed}, got {type(value).__name__}")
    repo_id: str | None = card_info.get("repo_id")
    dataset: str | None = card_info.get("dataset")
    hub_dataset = hub_dataset_id(dataset)
    metrics = card_metrics(dict(card_info.get("metrics") or {}))
    training = {str(k): v for k, v in dict(card_info.get("training") or {}).items()
                if isinstance(v, (str, int, float, bool))}

    peft_type = cfg["peft_type"]
    base_name = cfg.get("base_model_name_or_path") or cfg["architecture"]
    source = cfg.get("base_source") or {"kind": "unknown"}
    kind = source["kind"]
    base_hub = source.get("hf_hub_id") if kind == "timm" else None
    license_ = card_info.get("license") or (source.get("license") if kind == "timm" else None)
    name = repo_id or f"{base_name}.{peft_type}"
    tags = list(dict.fromkeys(["timm", "timm_peft", peft_type, "peft", "image-classification",
                               *[str(t) for t in card_info.get("tags") or ()]]))
    results = [EvalResult(task_type="image-classification", task_name="Image Classification",
                          dataset_type=hub_dataset or dataset, dataset_name=dataset,
                          metric_type=k, metric_value=v)
               for k, v in metrics.items()] if dataset and metrics else None
    extra = dict(base_model_relation="adapter") if base_hub else {}
    data = ModelCardData(library_name="timm", tags=tags, pipeline_tag="image-classification",
                         base_model=base_hub, license=license_,
                         datasets=[hub_dataset] if hub_dataset else None,
                         metrics=list(metrics) or None,
                         model_name=name if results else None, eval_results=results, **extra)

    if kind == "timm":
        base_link = f"[`{base_name}`](https://huggingface.co/{base_hub})" if base_hub \
            else f"`{base_name}`"
        base_sentence = "the frozen base weights are timm's published weights for " \
                        f"`{base_name}`, loaded from timm's usual pretrained source."
    else:
        base_link = f"`{cfg['architecture']}`"
        fp = str(cfg.get("base_fingerprint") or "")[:19]
        base_sentence = {
            "file": f"the frozen base weights came from a local file (fingerprint `{fp}…`), "
                    "not from timm's published weights; pass the same file to load it "
                    "(`pretrained_cfg_overlay=dict(file=...)`).",
            "random": "the frozen base was randomly initialised (no pretrained weights); it is "
                      f"rebuilt only from the same seed (fingerprint `{fp}…`).",
        }.get(kind, f"the base weights' origin is not known to timm_peft (fingerprint `{fp}…`).")
    method_text, citation = _method_text(peft_type)
    trainable, total = cfg.get("num_trainable_parameters", 0), cfg.get("num_parameters", 0)
    hp = ", ".join(f"`{k}={v!r}`" for k, v in cfg["peft_config"].items())
    margs = ", ".join(f"`{k}={v!r}`" for k, v in cfg["model_args"].items()) or "(defaults)"
    labels = cfg.get("label_names")
    adapter_rows = [
        ("method", f"`{peft_type}`"),
        ("method config", hp or "(defaults)"),
        ("base", f"`{base_name}` (timm arch `{cfg['architecture']}`; origin: {kind})"),
        ("architecture arguments", margs),
        ("classes", f"{cfg['model_args'].get('num_classes', '?')}" + (
            f": {', '.join(labels[:10])}{', …' if len(labels) > 10 else ''}" if labels else "")),
        ("trainable parameters", f"{trainable:,d} of {total:,d} "
                                 f"({100 * trainable / total if total else 0:.4f}%)"),
        ("adapter file", f"`{WEIGHTS_NAME}`, {nbytes:,d} bytes "
                         f"({cfg.get('num_adapter_values', 0):,d} values)"),
    ]
    dc = cfg.get("data_config") or {}
    data_rows = [(k, f"`{_fmt(dc[k])}`") for k in ("input_size", "interpolation", "crop_pct",
                                                   "crop_mode", "mean", "std") if k in dc]
    where = f" on `{dataset}`" if dataset else ""
    load_args = "" if kind in ("timm", "unknown") else (
        ", pretrained_cfg_overlay=dict(file=\"base_weights.safetensors\")" if kind == "file"
        else ", pretrained=False")
    card = ModelCard.from_template(
        data, template_str=CARD_TEMPLATE, name=name, description=card_info.get("description"),
        peft_type=peft_type, base_link=base_link, base_sentence=base_sentence,
        method_text=method_text, citation=citation, adapter_rows=adapter_rows,
        data_rows=data_rows, source=f"{HUB_PREFIX}{repo_id}" if repo_id else "path/to/this/folder",
        load_args=load_args,
        timm_name=f"{HUB_PREFIX}{repo_id}" if repo_id else f"{LOCAL_PREFIX}path/to/this/folder",
        training_rows=[(k, f"`{v!r}`") for k, v in training.items()],
        metric_rows=[(f"{k}{where}", f"{v:.4f}") for k, v in metrics.items()],
        weights_name=WEIGHTS_NAME, config_name=CONFIG_NAME, timm_config_name=TIMM_CONFIG_NAME,
        versions=f"{cfg.get('timm_peft_version', '?')}, timm {cfg.get('timm_version', '?')}, "
                 f"torch {cfg.get('torch_version', '?')}")
    return str(card)


def timm_config(model: nn.Module, cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` that makes ``timm.create_model("hf-hub:<adapter repo>")`` rebuild the model.

    Laid out as timm's Hub configs: ``architecture``, ``num_classes``, ``label_names``,
    ``model_args`` and ``pretrained_cfg`` holding the data configuration the adapter was trained
    with. ``model_args`` carries ``timm_peft_adapter``: timm_peft's build hook recognises it and
    rebuilds base + method + adapter, while plain timm passes it on to the model's ``__init__``,
    which raises ``TypeError``, so an adapter directory is never loaded as full weights.
    """
    inner = unwrap_features(model)
    out: dict[str, Any] = dict(architecture=cfg["architecture"])
    num_classes = getattr(inner, "num_classes", None)
    data = dict(cfg.get("data_config") or {})
    if isinstance(num_classes, int):
        out["num_classes"] = data["num_classes"] = num_classes
    if cfg.get("label_names"):
        out["label_names"] = list(cfg["label_names"])
    out["model_args"] = {**cfg["model_args"], ADAPTER_MARKER: CONFIG_NAME}
    out["pretrained_cfg"] = data
    return out
