"""Discovery: find published timm_peft adapters, on the Hugging Face Hub or in the local Hub cache.

Every adapter :func:`~timm_peft.push_to_hub` publishes carries a model card whose YAML has
``library_name: timm``, the tags ``timm``, ``timm_peft`` and the method, ``base_model`` (timm's
Hub repo of the base weights, with ``base_model_relation: adapter``) when timm has one, the
dataset and the metrics as a ``model-index``. :func:`list_adapters` asks the Hub for exactly those
(``HfApi.list_models`` with tag, base-model and dataset filters) and reads the answer from the
cards. Offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True`` or no network) it reads the
adapters in the local Hub cache instead: their ``adapter_config.json`` and, where cached,
``README.md``.

Cards are untrusted: a malformed field is left out of the record and named in its ``problems``;
nothing on a card can fail the listing, make it allocate or loop without bound.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .core import list_methods, resolve_method
from .io import CONFIG_NAME, HUB_PREFIX, WEIGHTS_NAME

__all__ = ["AdapterInfo", "list_adapters", "MAX_LIMIT", "MAX_SCAN"]

#: largest ``limit`` accepted by :func:`list_adapters`
MAX_LIMIT = 1000
#: most Hub entries read when a filter (an architecture without weight tag) cannot go to the Hub
MAX_SCAN = 5000
#: cached ``adapter_config.json`` / ``README.md`` larger than this are not read (ours are a few kB)
MAX_FILE_BYTES = 1 << 20
_CARD_NAME = "README.md"
_LIBRARY = "timm_peft"
_TIMM_ORG = "timm/"


@dataclass
class AdapterInfo:
    """One published timm_peft adapter, as its model card and config describe it.

    Fields a card does not give (or gives malformed) are ``None``; ``problems`` says which were
    malformed. ``base`` is the timm model name of the base weights (``arch.tag``, or only the
    arch when the adapter did not record a weight tag); ``base_model`` is their Hub repo as the
    card names it (only when timm has Hub weights for the base). ``task`` is the dataset the
    adapter was trained on and ``metrics`` its results there, e.g. ``{"accuracy": 0.91}``.

    Example:
        >>> AdapterInfo("my-org/vit-ssf-cifar100", revision="v1").hub_id
        'hf-hub:my-org/vit-ssf-cifar100@v1'
    """

    repo_id: str
    method: str | None = None
    base: str | None = None
    task: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None
    #: ``None``: the repo's default branch; else the branch, tag or commit that was read
    revision: str | None = None
    #: ``"hub"`` (listed by the Hub) or ``"cache"`` (read from the local Hub cache)
    source: str = "hub"
    problems: tuple[str, ...] = ()

    @property
    def hub_id(self) -> str:
        """The name that loads it: ``timm_peft.from_pretrained(info.hub_id)``."""
        return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _BaseQuery:
    """What ``base=`` asks for: a timm name with weight tag, an arch (any weights) or a Hub repo."""

    name: str | None = None  # "arch.tag": exact base weights
    arch: str | None = None  # "arch": any weights of that architecture
    hub_id: str | None = None  # the base weights' Hub repo, when known

    def matches(self, info: AdapterInfo) -> bool:
        if self.arch is not None:
            return info.base is not None and info.base.split(".", 1)[0] == self.arch
        return ((self.name is not None and info.base == self.name)
                or (self.hub_id is not None and info.base_model == self.hub_id))


def _check_str(value: Any, what: str, example: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str like {example!r}, got {type(value).__name__}")
    if not value.strip() or value != value.strip():
        raise ValueError(f"{what} must be a non-empty name like {example!r} without surrounding "
                         f"spaces, got {value!r}")
    return value


def _parse_base(base: str) -> _BaseQuery:
    import timm
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from timm.models import get_pretrained_cfg, split_model_name_tag

    example = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    name = _check_str(base, "base", example).removeprefix(HUB_PREFIX)
    if "/" in name:
        try:
            validate_repo_id(name)
        except HFValidationError as e:
            raise ValueError(f"base={base!r} is not a Hub repo id ('<org>/<name>') nor a timm model "
                             f"name ('<arch>' or '<arch>.<tag>'): {e}") from e
        return _BaseQuery(name=name[len(_TIMM_ORG):] if name.startswith(_TIMM_ORG) else None,
                          hub_id=name)
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise ValueError(f"base={base!r}: {arch!r} is not a timm architecture (see "
                         "timm.list_models()); give '<arch>', '<arch>.<tag>' or a Hub repo id")
    if tag and tag.rsplit(".", 1)[-1] in list_methods():
        raise ValueError(f"base={base!r} ends in the PEFT method {tag.rsplit('.', 1)[-1]!r}; base "
                         "names the backbone only: pass the method as method=...")
    if not tag:
        return _BaseQuery(arch=arch)
    try:
        hub_id = get_pretrained_cfg(name).hf_hub_id or None
    except RuntimeError:  # a weight tag timm does not know: the base came from elsewhere
        hub_id = None
    return _BaseQuery(name=name, hub_id=hub_id)


def _parse_method(method: str) -> str:
    _check_str(method, "method", "ssf")
    try:
        resolved = resolve_method(method)[0]
    except ValueError:
        raise ValueError(f"unknown PEFT method {method!r}; adapters are listed by method, one of "
                         f"{_method_names()}") from None
    if resolved != method:
        raise ValueError(f"method={method!r} is a preset of {resolved!r}; adapters are listed by "
                         f"method: pass method={resolved!r}")
    return method


def _check_limit(limit: Any) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise TypeError(f"limit must be an int between 1 and {MAX_LIMIT}, got {type(limit).__name__}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


# ----------------------------------------------------------------------------------------------
# reading cards and configs
# ----------------------------------------------------------------------------------------------

def _is_method(name: Any) -> bool:
    """A registered method's own name (not a preset of it)."""
    try:
        return isinstance(name, str) and resolve_method(name)[0] == name
    except ValueError:
        return False


def _method_names() -> list[str]:
    return [n for n in list_methods() if _is_method(n)]


def _str_list(value: Any, what: str, problems: list[str]) -> list[str]:
    """A card field that may be a str or a list of str; anything else is a problem."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    problems.append(f"{_CARD_NAME}: {what} must be a str or a list of str, got {value!r:.80}")
    return []


def _metrics(eval_results: Any, task: str | None, problems: list[str]) -> dict[str, float]:
    """``{metric type: value}`` of the card's evaluation results on ``task``."""
    if eval_results is None:
        return {}
    if not isinstance(eval_results, list):
        problems.append(f"{_CARD_NAME}: model-index results are not a list")
        return {}
    out: dict[str, float] = {}
    for r in eval_results:
        if task is not None and getattr(r, "dataset_type", None) != task:
            continue
        kind, value = getattr(r, "metric_type", None), getattr(r, "metric_value", None)
        number = (float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
                  and abs(value) < 1e300 else math.nan)  # an int too large for a float is no metric
        if isinstance(kind, str) and math.isfinite(number):
            out[kind] = number
        else:
            problems.append(f"{_CARD_NAME}: model-index metric {kind!r:.40} has no finite number "
                            f"value ({value!r:.40})")
    return out


def _record(repo_id: str, card: Any, hub_tags: Iterable[Any], config: Any, problems: list[str],
            **where: Any) -> AdapterInfo | None:
    """The record of one repo, or ``None`` when it is not a timm_peft adapter.

    ``card`` is a ``ModelCardData`` (or ``None``), ``hub_tags`` the tags the Hub computed,
    ``config`` the parsed ``adapter_config.json`` (or ``None``). ``adapter_config.json`` wins over
    the card: it is what loading uses.
    """
    tags = _str_list(getattr(card, "tags", None), "tags", problems)
    tags += [t for t in hub_tags if isinstance(t, str)]
    config = config if isinstance(config, dict) else {}
    if _LIBRARY not in tags and config.get("library_name") != _LIBRARY:
        return None  # another library's repo (e.g. an HF peft adapter): not ours, not a problem

    method = config.get("peft_type")
    if method is not None and not _is_method(method):
        problems.append(f"{CONFIG_NAME}: peft_type {method!r:.40} is not a method this timm_peft "
                        f"knows ({_method_names()})")
        method = None
    if method is None and "peft_type" not in config:
        named = sorted({t for t in tags if _is_method(t)})
        if len(named) > 1:
            problems.append(f"{_CARD_NAME}: tags name several methods {named}")
        method = named[0] if len(named) == 1 else None

    base_models = _str_list(getattr(card, "base_model", None), "base_model", problems)
    if len(base_models) > 1:
        problems.append(f"{_CARD_NAME}: base_model names several repos {base_models[:4]}")
    base_model = base_models[0] if len(base_models) == 1 else None
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.append(f"{CONFIG_NAME}: base_model_name_or_path must be a str, got {base!r:.40}")
        base = None
    if base is None and base_model is not None and base_model.startswith(_TIMM_ORG):
        base = base_model[len(_TIMM_ORG):]

    eval_results = getattr(card, "eval_results", None)
    datasets = _str_list(getattr(card, "datasets", None), "datasets", problems)
    if not datasets and isinstance(eval_results, list):
        datasets = [t for t in (getattr(r, "dataset_type", None) for r in eval_results)
                    if isinstance(t, str)]
    task = datasets[0] if datasets else None
    return AdapterInfo(repo_id=repo_id, method=method, base=base, task=task,
                       metrics=_metrics(eval_results, task, problems), base_model=base_model,
                       problems=tuple(problems), **where)


def _guarded(repo_id: str, build: Any) -> AdapterInfo | None:
    """``build()``; a card that breaks the reader gives a record that says so, not a failure."""
    try:
        return build()
    except Exception as e:  # untrusted card content: whatever it does, the listing goes on
        return AdapterInfo(repo_id=repo_id, problems=(f"unreadable card or config: {e!r:.200}",))


def _from_hub(model_info: Any) -> AdapterInfo | None:
    return _guarded(model_info.id, lambda: _record(
        model_info.id, model_info.card_data, model_info.tags or (), None, [], source="hub"))


def _read_small(path: Any, size: int, problems: list[str]) -> str | None:
    if size > MAX_FILE_BYTES:
        problems.append(f"{path.name}: {size:,d} bytes, more than the {MAX_FILE_BYTES:,d} read")
        return None
    from .io.format import AdapterError, read_bytes
    try:  # the one bounded reader: a FIFO or device in the cache is refused, not read
        return read_bytes(path, MAX_FILE_BYTES, f"a cached {path.name}").decode("utf-8")
    except (AdapterError, UnicodeDecodeError) as e:
        problems.append(f"{path.name}: cannot be read ({e})")
        return None


def _from_cache_revision(repo_id: str, revision: Any) -> AdapterInfo | None:
    from huggingface_hub import ModelCard

    sizes = {f.file_name: f.size_on_disk for f in revision.files}
    snapshot = revision.snapshot_path
    problems: list[str] = []
    config = None
    text = _read_small(snapshot / CONFIG_NAME, sizes[CONFIG_NAME], problems)
    if text is not None:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{CONFIG_NAME}: not valid JSON ({e})")
    if config is not None and not isinstance(config, dict):
        problems.append(f"{CONFIG_NAME}: must hold a JSON object, got {type(config).__name__}")
    card = None
    text = _read_small(snapshot / _CARD_NAME, sizes[_CARD_NAME], problems) \
        if _CARD_NAME in sizes else None
    if text is not None:
        try:
            card = ModelCard(text, ignore_metadata_errors=True).data
        except Exception as e:  # YAML errors come in many types; the card is untrusted
            problems.append(f"{_CARD_NAME}: unreadable YAML front matter ({e!r:.120})")
    if WEIGHTS_NAME not in sizes:
        problems.append(f"{WEIGHTS_NAME} is not in the cache: download it once with network access")
    refs = sorted(revision.refs)
    where = dict(source="cache",
                 revision=None if "main" in refs else (refs[0] if refs else revision.commit_hash))
    return _record(repo_id, card, (), config, problems, **where)


def _scan_cache(cache_dir: str | os.PathLike | None) -> Iterator[AdapterInfo]:
    """Records of the adapters in the local Hub cache, by repo id.

    One record per repo: the revision ``main`` points to, else the latest cached one.
    """
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        # read the cache location now, as hf_hub_download does (scan_cache_dir's default is
        # fixed when huggingface_hub is imported)
        cache = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)
    except CacheNotFound:
        return
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        revisions = [r for r in repo.revisions if any(f.file_name == CONFIG_NAME for f in r.files)]
        if repo.repo_type != "model" or not revisions:
            continue
        revision = max(revisions, key=lambda r: ("main" in r.refs, r.last_modified))
        info = _guarded(repo.repo_id, lambda: _from_cache_revision(repo.repo_id, revision))
        if info is not None:
            yield info


# ----------------------------------------------------------------------------------------------
# the Hub
# ----------------------------------------------------------------------------------------------

def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the Hub cannot be reached (its HTTP client varies by version)."""
    import importlib

    from huggingface_hub.utils import OfflineModeIsEnabled
    errors: list[type[BaseException]] = [OfflineModeIsEnabled]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(errors)


def _list_hub(filters: list[str], task: str | None, author: str | None, hub_limit: int,
              token: str | bool | None) -> Iterator[AdapterInfo]:
    from huggingface_hub import HfApi

    models = HfApi().list_models(filter=filters, trained_dataset=task, author=author, cardData=True,
                                 limit=hub_limit, token=token)
    it = iter(models)
    while True:
        try:
            model_info = next(it)
        except StopIteration:
            return
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            # huggingface_hub could not parse an entry (its card): its listing cannot go past it
            warnings.warn(f"the Hub listing stopped early at a malformed entry or model card "
                          f"({e!r:.200}); the adapters after it are not listed", stacklevel=3)
            return
        info = _from_hub(model_info)
        if info is not None:
            yield info


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

def list_adapters(
        base: str | None = None,
        method: str | None = None,
        task: str | None = None,
        *,
        author: str | None = None,
        limit: int = 100,
        local_files_only: bool = False,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
) -> list[AdapterInfo]:
    """Find published timm_peft adapters: on the Hugging Face Hub, or offline in the local Hub cache.

    Args:
        base: the backbone: a timm name with weight tag
            (``"vit_base_patch16_224.augreg2_in21k_ft_in1k"``: those exact weights), an
            architecture (``"vit_base_patch16_224"``: any weights), or the base weights' Hub repo
            (``"timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"``).
        method: a PEFT method name (``"ssf"``; see :func:`timm_peft.list_methods`).
        task: the dataset the adapter was trained on, as its card names it (``"cifar100"``).
        author: a Hub user or organisation.
        limit: at most this many adapters are returned (1 to :data:`MAX_LIMIT`).
        local_files_only: read only the local Hub cache. It is also read when ``HF_HUB_OFFLINE=1``
            or when the Hub cannot be reached (with a warning).
        cache_dir: the Hub cache to read offline (default: huggingface_hub's).
        token: a Hub token, for private repos.

    Online, the filters go to ``HfApi.list_models`` (tags ``timm`` and ``timm_peft``, the method
    tag, ``base_model:adapter:<base repo>`` and the dataset), and every entry is checked again
    against its card; an architecture without weight tag is matched here among at most
    :data:`MAX_SCAN` entries. Offline, each cached adapter is read from its ``adapter_config.json``
    (method, base) and, where cached, ``README.md`` (task, metrics): an adapter fetched with
    ``from_pretrained`` alone has no card in the cache, so its task and metrics are unknown.
    A filter never matches a field that is unknown. Malformed cards never fail the listing:
    their records name the problems (``AdapterInfo.problems``) and one warning sums them up.

    Example:
        >>> import timm_peft
        >>> for a in timm_peft.list_adapters(base="vit_base_patch16_224", method="ssf",
        ...                                  task="cifar100", limit=5):  # doctest: +SKIP
        ...     print(a.repo_id, a.base, a.metrics)
        >>> model = timm_peft.from_pretrained(a.hub_id)  # doctest: +SKIP
    """
    from huggingface_hub import constants

    query = _parse_base(base) if base is not None else None
    method = _parse_method(method) if method is not None else None
    task = _check_str(task, "task", "cifar100") if task is not None else None
    author = _check_str(author, "author", "my-org") if author is not None else None
    limit = _check_limit(limit)
    if not isinstance(local_files_only, bool):
        raise TypeError(f"local_files_only must be a bool, got {type(local_files_only).__name__}")

    def wanted(info: AdapterInfo) -> bool:
        return ((query is None or query.matches(info))
                and (method is None or info.method == method)
                and (task is None or info.task == task)
                and (author is None or info.repo_id.split("/", 1)[0] == author))

    found: list[AdapterInfo] = []

    def collect(infos: Iterable[AdapterInfo]) -> None:
        for info in infos:
            if wanted(info):
                found.append(info)
                if len(found) == limit:
                    return

    if local_files_only or constants.HF_HUB_OFFLINE:
        collect(_scan_cache(cache_dir))
    else:
        filters = ["timm", _LIBRARY] + ([method] if method else [])
        if query is not None and query.hub_id is not None:
            filters.append(f"base_model:adapter:{query.hub_id}")
        # an arch-only base cannot be asked of the Hub: scan further and match here
        hub_limit = MAX_SCAN if query is not None and query.hub_id is None else limit
        try:
            collect(_list_hub(filters, task, author, hub_limit, token))
        except _network_errors() as e:
            warnings.warn(f"the Hugging Face Hub cannot be reached ({e!r:.120}); listing the adapters "
                          "in the local Hub cache instead", stacklevel=2)
            found.clear()
            collect(_scan_cache(cache_dir))
    bad = [info.repo_id for info in found if info.problems]
    if bad:
        warnings.warn(f"{len(bad)} adapter card(s) have problems ({', '.join(bad[:5])}"
                      f"{', …' if len(bad) > 5 else ''}); see AdapterInfo.problems", stacklevel=2)
    return found
