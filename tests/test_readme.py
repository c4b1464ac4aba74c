"""README.md is executable: every ```python and ```bash block of it runs here, offline.

What runs
  * Every ```python block, its text executed verbatim (``exec``), one test per block, named by
    its line and heading (``L262-ssf-scale-and-shift-...``). Blocks under one heading (any level)
    share one namespace and run in order: a block's test first runs the blocks above it under
    the same heading (E²VPT's "step by step" block uses the model of the block before it).
  * Every command of every ```bash block (``\\`` continuations joined, ``&&`` chains split,
    comments dropped), in order, in one temporary working directory per block, with
    ``timm-peft`` run as ``python -m timm_peft``. A command that cannot run in a test is listed
    in ``SKIP_COMMANDS`` with the reason, and ``FAST_FLAGS`` shrinks a slow one (the CLI
    section's generated-task run gets a small train/test size and 32 px); a listed entry that no longer matches a README command
    fails (``test_skip_lists_are_current``), and a new command runs unless it is listed.
  * Figures: a ``# trainable params: ... || all params: ... || trainable%: ...`` comment after a
    ``print_trainable_parameters`` call must be what that call prints for the model the README
    names, at its real size (see "shrinking" below). The quick start's adapter size and test
    accuracy are checked against what its commands produce here (``check_quick_start_figures``).
    Bounds and counts the prose states (the loader's limits, the method configs' upper bounds,
    the bad-adapter suite's size, ``list_adapters``' limits) are checked against the code
    (``test_readme_states_*``, ``test_readme_counts_*``); the Performance section's tables and
    the transfer paragraph are checked against the JSON of their reports in benchmarks/results/.

What the harness substitutes (and nothing else; block text is never edited)
  * Placeholders a reader supplies, defined in the block's namespace before it runs (``PRELUDE``):
    ``loader`` / ``train_loader`` (two batches of two random 224×224 images, labels < 10),
    ``my_fit(model, epochs, desc)`` (one SGD step on one batch, whatever ``epochs`` says) and
    ``class_names`` (100 names). Nothing else: a block imports what it uses.
  * Pretrained weights: ``pretrained=True`` goes through timm's own pretrained path unchanged; the
    first time a model's weights are asked for, a seeded random-init model of that architecture
    (as shrunk below) is written as ``timm/<arch>.<tag>/model.safetensors`` into a local
    huggingface_hub cache read with ``HF_HUB_OFFLINE`` (as ``timm_weights_cached`` in
    tests/test_hub.py).
  * Shrinking (``SHRINK``): models too big for CI (ViT-B/S, Swin-B, ConvNeXt-B, ResNet-50) are built
    with the widths/depths of the table, applied inside timm's ``build_model_with_cfg`` so every
    build of that architecture (ours, ``from_pretrained``'s, a reloaded base's) agrees. Input
    sizes are kept (224). Figures are checked on a fresh, full-size build of the same
    ``create_model`` call (on the ``meta`` device, no weights); a model not built by
    ``create_model`` (``from_pretrained``) is checked as it is.
  * The Hub: ``hf-hub:`` repos a block reads are built first (``HUB_REPOS``: base, method, head)
    and published with the real ``push_to_hub``; ``push_to_hub`` runs huggingface_hub's real
    client against tests/test_hub.py's ``FakeHub`` (only the transport replaced), and what it
    commits is mirrored into the local Hub cache, which every read uses offline.
  * ``timm_peft.train.train(cfg)`` on a ``data_dir`` that does not exist here (``/data/...``)
    runs on a generated ImageFolder tree of that layout (tests/test_data_folders.py's ``_tree``)
    with ``TRAIN_OVERRIDES`` (1 epoch, tiny batches); every other field is the block's.
  * Python blocks that cannot run in a test are listed in ``SKIP_BLOCKS`` with the reason.
  * Registries a block writes to (``register_family``) are restored after it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

import timm_peft
from test_data_folders import _tree
from test_hub import _cache_repo, fake_hub, hub_cache  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: flags appended to a bash command that starts with the key, so it runs in seconds on CI (the
#: quick start's commands are run as written: their runtime is the one the README states)
FAST_FLAGS = {
    "timm-peft train --model resnet10t.bias --no-pretrained --task count":
        "--train-size 64 --test-size 32 --input-size 3 32 32 --batch-size 16",
}

#: python blocks that cannot run in a test: (first code line, reason)
SKIP_BLOCKS = {
    "import base64, json, urllib.request":
        "an HTTP client for a running `timm-peft serve`; tests/test_serve.py sends the same "
        "JSON request to a real local Ray Serve",
}

#: bash commands that cannot run in a test: (command prefix, reason)
SKIP_COMMANDS = {
    "pip install": "installs the package; CI has installed it",
    "HF_HUB_OFFLINE=1 python -m pytest": "the test command itself",
    "timm-peft serve": "starts a long-running server; tests/test_serve.py runs it on a local "
                       "Ray Serve",
    "curl": "a client of the server above",
    "timm-peft train --model vit_base_patch16_224.augreg2_in21k_ft_in1k.ssf --data-dir /data/":
        "needs a real dataset and ViT-B weights; --data-dir trees are covered by "
        "tests/test_data_folders.py",
    "timm-peft reproduce --method ssf --benchmark vtab1k --data-root /data/":
        "the full VTAB-1k protocol on a real dataset (GPU hours); tests/test_reproduce.py runs "
        "it on generated stand-ins",
    "torchrun": "8 processes of the full FGVC protocol; DDP is tested in tests/test_ddp.py",
}

#: architecture (timm's variant name, regex) -> model kwargs that shrink it for CI
SHRINK = {
    r"vit_(tiny|small|base|large)_patch16_224": dict(embed_dim=48, depth=2, num_heads=3),
    r"swin_(tiny|small|base|large)_patch4_window7_224": dict(embed_dim=16, depths=(1, 1, 1, 1),
                                                             num_heads=(1, 2, 4, 8)),
    r"convnext_(tiny|small|base|large)": dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    r"resnet50": dict(layers=(1, 1, 1, 1)),
}

#: Hub repos blocks read: repo id -> (model name, create_model kwargs)
HUB_REPOS = {
    "my-org/vit-s16-ssf-flowers": ("vit_small_patch16_224.augreg_in21k_ft_in1k.ssf",
                                   dict(num_classes=102), dict(dataset="nelorth/oxford-flowers")),
    "my-org/vit-b16-ssf-cifar100": ("vit_base_patch16_224.augreg2_in21k_ft_in1k.ssf",
                                    dict(num_classes=100),
                                    dict(dataset="uoft-cs/cifar100", metrics={"accuracy": 0.912})),
}

#: TrainConfig fields replaced when a block trains on a data_dir that is not here
TRAIN_OVERRIDES = dict(epochs=1, warmup_epochs=0, batch_size=4, workers=0)

PRELUDE = '''
import torch
torch.manual_seed(0)
loader = train_loader = [(torch.randn(2, 3, 224, 224), torch.randint(0, 10, (2,))) for _ in range(2)]

def my_fit(model, epochs, desc=""):
    """One SGD step on one batch (a stand-in for the reader's training loop)."""
    import torch
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    x, y = loader[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step(); opt.zero_grad()

class_names = [f"class_{i}" for i in range(100)]
del torch  # not a placeholder: a block that uses torch imports it
'''

FIGURE = re.compile(r"#\s*(trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+)")


# ----------------------------------------------------------------------------------------------
# README parsing
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Block:
    lang: str
    line: int  # of the opening fence
    heading: str
    code: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:40]
        return f"L{self.line}-{slug}"


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, heading, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            lang, start, body = line[3:].strip(), i + 1, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append(Block(lang, start, heading, "\n".join(body) + "\n"))
        i += 1
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang in ("bash", "sh", "shell")]


def bash_commands(code: str) -> list[str]:
    """The block's commands: continuations joined, ``&&`` chains split, comments dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = re.split(r"\s+#\s", line)[0].strip()  # a trailing comment
        commands += [c.strip() for c in line.split("&&") if c.strip()]
    return commands


def skip_reason(command: str) -> str | None:
    return next((r for p, r in SKIP_COMMANDS.items() if command.startswith(p)), None)


def test_readme_has_code_blocks():
    assert len(PYTHON) >= 8 and len(BASH) >= 4, (len(PYTHON), len(BASH))
    assert {b.lang for b in BLOCKS} <= {"python", "bash", ""}, "a new code block language"


def test_skip_lists_are_current():
    commands = [c for b in BASH for c in bash_commands(b.code)]
    for table in (SKIP_COMMANDS, FAST_FLAGS):
        stale = [p for p in table if not any(c.startswith(p) for c in commands)]
        assert not stale, f"entries no README command matches: {stale}"
    firsts = {b.code.strip().splitlines()[0] for b in PYTHON}
    stale = [p for p in SKIP_BLOCKS if p not in firsts]
    assert not stale, f"SKIP_BLOCKS entries no README block starts with: {stale}"


def test_bash_commands_parse():
    code = "a --x 1 \\\n   --y 2 \\\n  && b # note\n# comment\nc arg   # trailing\n"
    assert bash_commands(code) == ["a --x 1 --y 2", "b", "c arg"]


# ----------------------------------------------------------------------------------------------
# the harness
# ----------------------------------------------------------------------------------------------

def _shrink_kwargs(variant: str) -> dict:
    return next((kw for pat, kw in SHRINK.items() if re.fullmatch(pat, variant)), {})


class Harness:
    def __init__(self, tmp: Path, cache: Path, hub, monkeypatch):
        self.tmp, self.cache, self.hub, self.mp = tmp, cache, hub, monkeypatch
        self.shrink = True
        self.made: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> full build
        self.figures: list[str] = []
        self._install()

    # models --------------------------------------------------------------------------------
    def _install(self):
        from timm.models import _builder
        orig_build = _builder.build_model_with_cfg
        harness = self

        def build(model_cls, variant, pretrained, *args, **kwargs):
            if harness.shrink:
                kwargs.update(_shrink_kwargs(variant))
                if pretrained:
                    harness._ensure_weights(orig_build, model_cls, variant, args, kwargs)
            return orig_build(model_cls, variant, pretrained, *args, **kwargs)

        for name, module in list(sys.modules.items()):
            if name.startswith("timm.models") and getattr(module, "build_model_with_cfg",
                                                          None) is orig_build:
                self.mp.setattr(module, "build_model_with_cfg", build)

        for owner in (timm, timm_peft):
            orig = owner.create_model

            def create(*args, _orig=orig, **kwargs):
                model = _orig(*args, **kwargs)
                if harness.shrink:
                    harness.made[model] = (_orig, args, kwargs)
                return model
            self.mp.setattr(owner, "create_model", create)

        orig_print = timm_peft.print_trainable_parameters

        def print_trainable_parameters(model, *args, **kwargs):
            orig_print(model, *args, **kwargs)
            self.figures.append(self._full_size_figure(orig_print, model))
        self.mp.setattr(timm_peft, "print_trainable_parameters", print_trainable_parameters)

        orig_push = timm_peft.push_to_hub

        def push_to_hub(model, repo_id, *args, **kwargs):
            self.mp.setattr(constants, "HF_HUB_OFFLINE", False)
            try:
                out = orig_push(model, repo_id, *args, **kwargs)
            finally:
                self.mp.setattr(constants, "HF_HUB_OFFLINE", True)
            repo = repo_id if "/" in repo_id else f"{self.hub.user}/{repo_id}"
            revision = kwargs.get("revision") or "main"
            _cache_repo(self.cache, repo, self.hub.commits[(repo, revision)]["files"], ref=revision)
            return out
        self.mp.setattr(timm_peft, "push_to_hub", push_to_hub)
        self.mp.setattr(constants, "HF_HUB_OFFLINE", True)

        import timm_peft.train as train_module
        orig_train = train_module.train

        def train(cfg, *args, **kwargs):
            if cfg.data_dir and not Path(cfg.data_dir).exists():
                root = _tree(self.tmp / "data" / Path(cfg.data_dir).name,
                             splits=("train", "val", "test"), per_class=4)
                cfg = dataclasses.replace(cfg, data_dir=str(root), **TRAIN_OVERRIDES)
            return orig_train(cfg, *args, **kwargs)
        self.mp.setattr(train_module, "train", train)

    def _ensure_weights(self, orig_build, model_cls, variant, args, kwargs):
        from timm.models._builder import resolve_pretrained_cfg
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                     pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
        if cfg.file or not cfg.hf_hub_id:
            return
        repo = self.cache / f"models--{cfg.hf_hub_id.replace('/', '--')}"
        if repo.exists():
            return
        plain = {k: v for k, v in kwargs.items()
                 if k not in ("features_only", "out_indices", "feature_cls", "num_classes")}
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = orig_build(model_cls, variant, False, *args,
                               **dict(plain, num_classes=cfg.num_classes))
        path = self.tmp / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        _cache_repo(self.cache, cfg.hf_hub_id, {"model.safetensors": path.read_bytes()})

    def _full_size_figure(self, orig_print, model) -> str:
        """What print_trainable_parameters says of a full-size build of the same call."""
        made = self.made.get(model)
        if made is not None:
            create, args, kwargs = made
            self.shrink = False
            try:
                with torch.device("meta"):
                    model = create(*args, **dict(kwargs, pretrained=False))
            finally:
                self.shrink = True
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            orig_print(model)
        return out.getvalue().strip()

    # the Hub -------------------------------------------------------------------------------
    def publish(self, code: str):
        """Build and push each HUB_REPOS repo the code names (a seeded, moved adapter)."""
        from conftest import move_trainable
        for repo_id, (name, kwargs, push_kwargs) in HUB_REPOS.items():
            if ((repo_id in code or "list_adapters(" in code)
                    and not (self.cache / f"models--{repo_id.replace('/', '--')}").exists()):
                torch.manual_seed(1)
                model = move_trainable(timm.create_model(name, pretrained=True, **kwargs))
                timm_peft.push_to_hub(model, repo_id, **push_kwargs)

    # running -------------------------------------------------------------------------------
    def run(self, blocks: list[Block]):
        from timm_peft.families import _FAMILIES
        families = dict(_FAMILIES)
        namespace: dict = {"__name__": "__readme__"}
        exec(PRELUDE, namespace)
        try:
            for block in blocks:
                self.publish(block.code)
                self.figures = []
                exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
                check_figures(block, self.figures)
        finally:
            _FAMILIES.clear()
            _FAMILIES.update(families)


def check_figures(block: Block, printed: list[str]):
    """Each figure comment after a print_trainable_parameters call is what that call printed."""
    lines = block.code.splitlines()
    stated = []
    for i, line in enumerate(lines):
        if "print_trainable_parameters(" in line:
            m = FIGURE.search(lines[i + 1]) if i + 1 < len(lines) else None
            stated.append(m.group(1) if m else None)
    assert len(printed) == len(stated), (printed, stated)
    for s, p in zip(stated, printed):
        if s is not None:
            assert p == s, f"README.md:{block.line} states '{s}', the code prints '{p}'"


@pytest.fixture
def harness(tmp_path, hub_cache, fake_hub, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    return Harness(tmp_path, hub_cache, fake_hub, monkeypatch)


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block(block, harness):
    first = block.code.strip().splitlines()[0]
    if first in SKIP_BLOCKS:
        pytest.skip(SKIP_BLOCKS[first])
    same = [b for b in PYTHON if b.heading == block.heading and b.line <= block.line]
    harness.run([b for b in same if b.code.strip().splitlines()[0] not in SKIP_BLOCKS])


@pytest.mark.parametrize("block", BASH, ids=[b.id for b in BASH])
def test_bash_block(block, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    ran = 0
    for command in bash_commands(block.code):
        if skip_reason(command):
            continue
        argv = shlex.split(command) + next(
            (shlex.split(f) for p, f in FAST_FLAGS.items() if command.startswith(p)), [])
        if argv[0] == "timm-peft":
            argv = [sys.executable, "-m", "timm_peft", *argv[1:]]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (f"README.md:{block.line}: `{command}` failed:\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        ran += 1
    if not ran:
        pytest.skip("; ".join(sorted({skip_reason(c) for c in bash_commands(block.code)})))
    if "--output runs/ssf" in block.code:
        check_quick_start_figures(tmp_path / "runs" / "ssf")


def check_quick_start_figures(run: Path) -> None:
    """The quick start's prose states what its commands produce: the adapter's size and the
    test accuracy, as this run measured them."""
    text = README.read_text()
    size = re.search(r"saves the (\d+) KB adapter", text)
    acc = re.search(r"\(about (0\.\d+) test accuracy\)", text)
    assert size and acc, "the quick start no longer states its adapter size and accuracy"
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    assert round(metrics["adapter_bytes"] / 1000) == int(size[1]), metrics["adapter_bytes"]
    # 0.03: the accuracy moves by about that with the number of threads (float sums)
    assert abs(metrics["test_acc"] - float(acc[1])) <= 0.03, metrics["test_acc"]


def test_readme_states_the_loaders_limits():
    """The threat-model section's numbers are the loader's own ``LIMITS``."""
    from timm_peft.io.format import LIMITS
    text = " ".join(README.read_text().split())
    stated = {
        "num_classes": r"`num_classes <= (\d+)`", "img_size": r"`img_size <= (\d+)`",
        "arch_scale": r"any other integer at most (\d+)x the constructor's default",
        "arch_int_no_default": r"at most (\d+) where it has none",
        "base_params_scale": r"at most (\d+)x the parameters of the default arch",
        "resize_side": r"`input_size / crop_pct` at most (\d+)",
    }
    for key, pattern in stated.items():
        found = re.search(pattern, text)
        assert found, f"README no longer states LIMITS[{key!r}] ({pattern})"
        assert int(found[1]) == LIMITS[key], (key, found[1], LIMITS[key])
    assert re.search(rf"`input_size` at most {LIMITS['img_size']} a side", text)


def _stated(text: str, pattern: str) -> re.Match:
    found = re.search(pattern, text)
    assert found, f"README no longer states /{pattern}/"
    return found


def _upper_bound(config: type, name: str) -> float:
    return next(f.metadata["le"] for f in dataclasses.fields(config) if f.name == name)


def test_readme_states_the_adapter_readers_bounds():
    """The threat model's other bounds are the code's: the JSON reader's, the error's length,
    the save journal's token and the method configs' upper bounds."""
    from timm_peft.core import PeftConfig
    from timm_peft.io import format as fmt, load, save_load
    from timm_peft.methods.e2vpt.config import E2VPTConfig
    from timm_peft.methods.lion.config import LionConfig
    from timm_peft.methods.vpt.config import VPTConfig
    text = " ".join(README.read_text().split())
    assert int(_stated(text, r"at most (\d+) levels deep")[1]) == fmt.LIMITS["json_depth"]
    assert 2 ** (int(_stated(text, r"integers within (\d+) bits")[1]) - 1) == fmt._INT_BOUND
    assert int(_stated(text, r"the checked schema below \(at most (\d+) MiB\)")[1]) << 20 \
        == fmt.LIMITS["config_bytes"]
    header = _stated(text, r"header at most (\d+) MiB and ([\d,]+) tensors")
    assert int(header[1]) << 20 == fmt.LIMITS["header_bytes"]
    assert int(header[2].replace(",", "")) == fmt.LIMITS["tensors"]
    assert int(_stated(text, r"generated-task sizes at most ([\d,]+) images")[1]
               .replace(",", "")) == load._GENERATED_IMAGES
    assert int(_stated(text, r"error messages are at most ([\d,]+) characters")[1]
               .replace(",", "")) == fmt.AdapterError.MAX_CHARS
    assert int(_stated(text, r"a random (\d+)-bit token")[1]) == 4 * save_load._TOKEN_HEX
    prompts = int(_stated(text, r"VPT/E²VPT `num_prompts <= (\d+)`")[1])
    assert prompts == _upper_bound(VPTConfig, "num_prompts") \
        == _upper_bound(E2VPTConfig, "num_prompts")
    lion = _stated(text, r"LION's `p1_width <= (\d+)` and `p2_width <= (\d+)`, every solver "
                         r"iteration cap `<= (\d+)`")
    assert [int(n) for n in lion.groups()] == [
        _upper_bound(LionConfig, "p1_width"), _upper_bound(LionConfig, "p2_width"),
        _upper_bound(LionConfig, "max_iter")]
    assert _upper_bound(LionConfig, "eval_max_iter") == _upper_bound(LionConfig, "max_iter") \
        == _upper_bound(LionConfig, "backward_max_iter")
    _stated(text, r"every size-like method config field has an upper bound")
    todo, unbounded = [PeftConfig], []
    while todo:
        config = todo.pop()
        todo += config.__subclasses__()
        unbounded += [f"{config.__name__}.{f.name}" for f in dataclasses.fields(config)
                      if str(f.type).split(" |")[0] == "int" and not any(
                          f.metadata.get(k) is not None for k in ("le", "lt", "choices"))]
    assert not unbounded, unbounded


def test_readme_counts_the_bad_adapter_suite():
    """The threat model's count of crafted bad adapters and of the fuzzer's entry points are
    tests/adapter_cases.py's."""
    import adapter_cases
    text = " ".join(README.read_text().split())
    crafted = len(adapter_cases.crafted_cases()) + len(adapter_cases.BAD_NAMES)
    assert crafted >= int(_stated(text, r"on (\d+)\+ crafted bad adapters")[1]), crafted
    words = {"six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
    stated = _stated(text, r"loads each through all (\w+) entry points")[1]
    assert words[stated] == len(adapter_cases.LOADERS), (stated, list(adapter_cases.LOADERS))


def test_readme_states_the_listing_serving_and_offline_bounds():
    """list_adapters' limits and card size, how long the server remembers a failed load and how
    long a command waits for the Hub before working offline."""
    import inspect
    from timm_peft import discovery, serve
    text = " ".join(README.read_text().split())
    limit = _stated(text, r"At most `limit` \((\d+) to (\d+), default (\d+)\) results")
    default = inspect.signature(discovery.list_adapters).parameters["limit"].default
    assert [int(n) for n in limit.groups()] == [1, discovery.MAX_LIMIT, default]
    assert int(_stated(text, r"among at most (\d+) listed adapters")[1]) == discovery.MAX_SCAN
    assert int(_stated(text, r"files over (\d+) MiB are not read")[1]) << 20 \
        == discovery.MAX_FILE_BYTES
    _stated(text, r"is remembered for a minute rather than retried")
    ttl = inspect.signature(serve.AdapterEngine.__init__).parameters["failure_ttl_s"].default
    assert ttl == 60.0
    from timm_peft.io.offline import PROBE_TIMEOUT_S
    assert float(_stated(text, r"asks it once, with a (\d+)-second limit")[1]) == PROBE_TIMEOUT_S


# ----------------------------------------------------------------------------------------------
# the Performance section's tables are their reports' numbers
# ----------------------------------------------------------------------------------------------

RESULTS = ROOT / "benchmarks" / "results"
VIT_S = "vit_small_patch16_224"
#: README row label -> the report's ``method`` label, where they differ
ROW_NAMES = {
    "vpt (T=50)": "vpt", "vpt (T=10)": "vpt (num_prompts=10)", "e2vpt (T=10)": "e2vpt",
    "e2vpt (T=10, 5 key-value)": "e2vpt", "e2vpt_prune, pruned": "e2vpt_prune",
    "e2vpt_prune, pruned (5 tokens, 6 of 8 segments)": "e2vpt_prune",
    "adapter (reduction 64)": "adapter", "adaptformer (64, s = 0.1)": "adaptformer",
    "lora (r = 8, `qkv`)": "lora", "lora (qkv)": "lora",
    "lora (r = 8, `qkv, proj, fc1, fc2`)": "lora (qkv, proj, fc1, fc2)",
    "HF peft LoRA (r = 8, `qkv`)": "HF peft LoRA r=8 (qkv)",
    "HF peft LoRA (r = 8, `qkv, proj, fc1, fc2`; also the patch embedding)":
        "HF peft LoRA r=8 (qkv, proj, fc1, fc2)",
}
#: README arch label -> timm arch
ARCH_NAMES = {"ViT-S/16": VIT_S, "ResNet-50": "resnet50", "Swin-T": "swin_tiny_patch4_window7_224",
              "ConvNeXt-T": "convnext_tiny", "BEiT-B/16": "beit_base_patch16_224",
              "EfficientNet-B0": "efficientnet_b0", "MobileNetV3-L": "mobilenetv3_large_100"}
#: README column -> report field (a cell's "(merged x)" is ``merged_infer_vs_plain``)
TIMED = {"step CPU vs full": "train_cpu_vs_full", "step CPU vs limit": "train_cpu_vs_limit",
         "step wall vs limit": "train_vs_limit", "peak memory vs full": "train_mem_vs_full",
         "vs limit": "train_mem_vs_limit", "peak memory vs limit": "train_mem_vs_limit",
         "inference CPU vs plain": "infer_cpu_vs_plain", "step vs full": "train_vs_full",
         "step vs limit": "train_vs_limit", "inference vs plain": "infer_vs_plain",
         "trainable": "trainable"}


def _readme_table(header: str) -> list[dict[str, str]]:
    """The README table whose header row starts with ``header``, as {column: cell} rows."""
    lines = README.read_text(encoding="utf-8").split("\n" + header, 1)[1].splitlines()
    rows = [header + lines[0], *itertools.takewhile(lambda s: s.startswith("|"), lines[1:])]
    cells = [[c.strip() for c in row.strip().strip("|").split(" | ")] for row in rows]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def _report(*names: str) -> dict[tuple[str, str], dict]:
    rows = [r for n in names for r in json.loads((RESULTS / f"{n}.json").read_text())["rows"]]
    return {(r["arch"], r["method"]): r for r in rows}


def _shown(value: float, field: str) -> str:
    return f"{value:,d}" if field == "trainable" else f"{value:.2f}"


def _check_cell(cell: str, row: dict, field: str) -> list[str]:
    numbers = re.findall(r"\d[\d,]*(?:\.\d+)?", cell)
    want = [_shown(row[field], field)]
    if "merged" in cell:
        want.append(_shown(row["merged_infer_vs_plain"], "merged_infer_vs_plain"))
    return [] if numbers == want else [f"{cell!r}: the report's {want}"]


@pytest.mark.parametrize("header,reports,arch", [
    ("| method | step CPU vs full", ("efficiency",), VIT_S),
    ("| method | trainable | step CPU", ("efficiency_baselines",), VIT_S),
    ("| method | step vs full", ("efficiency_cuda",), VIT_S),
    ("| arch | method | step CPU vs limit", ("efficiency_families", "efficiency_beit"), None),
])
def test_readme_timing_tables_are_the_reports(header, reports, arch):
    """Every cell of the Performance section's timing tables is its report's value, rounded."""
    report, wrong = _report(*reports), []
    for line in _readme_table(header):
        key = (arch or ARCH_NAMES[line["arch"]], ROW_NAMES.get(line["method"], line["method"]))
        if line.get("step vs full", "").startswith("failed"):
            assert key not in report, f"{key} ran in {reports}: the README says it failed"
            continue
        assert key in report, f"README row {key} is not in {reports}"
        for column, field in TIMED.items():
            if column in line and column not in ("arch", "method"):
                wrong += [f"{key} {column}: {w}" for w in _check_cell(line[column], report[key],
                                                                     field)]
    assert not wrong, "\n".join(wrong)


def test_readme_saved_bytes_table_is_the_report():
    """The "More families" table of saved bytes: each cell ``saved_vs_limit`` of
    benchmarks/results/saved_bytes.json, '-' where the report has no row, and the last row
    E²VPT's saved bytes over VPT's with the same 10 prompts."""
    from benchmarks.efficiency import ARCH_SETS
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert set(ARCH_NAMES.values()) == set(ARCH_SETS["report"])
    assert len(ARCH_SETS["report"]) == 7
    _stated(text, "the seven report families")
    report, wrong = _report("saved_bytes"), []
    for line in _readme_table("| method | ViT-S/16 | ResNet-50"):
        for label, arch in ARCH_NAMES.items():
            cell = line[label]
            if line["method"] == "e2vpt / vpt (T=10)":
                pair = (arch, "e2vpt"), (arch, "vpt (num_prompts=10)")
                value = (report[pair[0]]["saved_MiB"] / report[pair[1]]["saved_MiB"]
                         if pair[0] in report else None)
            else:
                key = (arch, ROW_NAMES.get(line["method"], line["method"]))
                value = report[key]["saved_vs_limit"] if key in report else None
            want = "-" if value is None else f"{value:.2f}"
            if cell != want:
                wrong.append(f"{line['method']} on {label}: {cell!r}, the report's {want!r}")
    assert not wrong, "\n".join(wrong)


def test_readme_layer_scaled_families_are_the_reports():
    """SSF's saved bytes on the layer-scaled families, "X (Y at the initial λ)": X from the
    λ = 0.1 report, Y from the report at timm's initial λ."""
    trained = _report("ssf_saved_bytes_layer_scale_trained")
    initial = _report("ssf_saved_bytes_layer_scale_init")
    text = " ".join(README.read_text(encoding="utf-8").split())
    for name, arch in (("DeiT-III S/16", "deit3_small_patch16_224"),
                       ("DINOv2 ViT-S/14", "vit_small_patch14_dinov2"),
                       ("EVA-02 S", "eva02_small_patch14_224"), ("CaiT-XXS24", "cait_xxs24_224")):
        found = re.search(re.escape(name) + r" ([\d.]+) \(([\d.]+)", text)
        assert found, f"README no longer states SSF's saved bytes on {name}"
        want = [f"{r[arch, 'ssf']['saved_vs_limit']:.2f}" for r in (trained, initial)]
        assert [found[1], found[2]] == want, (name, want)


#: the transfer paragraph's names -> the report's methods
TRANSFER_NAMES = {
    "full": "full", "AdaptFormer": "adaptformer", "SSF": "ssf", "LoRA": "lora", "LION": "lion",
    "LION-R": "lion_no_robust", "Adapter": "adapter", "E²VPT": "e2vpt",
    "E²VPT pruned": "e2vpt_prune", "bias": "bias", "VPT": "vpt", "LION-P2": "lion_no_p2",
    "Mlp-3": "mlp3", "LION-P1": "lion_no_p1", "Sidetune": "sidetune", "linear": "linear",
    "linear on a random-init base": "linear (reference: random-init base)"}


def test_readme_transfer_figures_are_the_report():
    """The Benchmarks section's transfer paragraph: every method's task average and every paper
    claim's difference, under its verdict, are benchmarks/results/transfer.json's."""
    data = json.loads((RESULTS / "transfer.json").read_text())
    text = " ".join(README.read_text(encoding="utf-8").split())
    run = _stated(text, r"Defaults: (\d+) tasks, (\d+) epochs, (\d+) seeds: (\d+) runs, "
                        r"([\d.]+) CPU-minutes, ([\d.]+) minutes on 2 cores")
    args, timing = data["args"], data["timing"]
    assert list(run.groups()) == [
        str(len(args["tasks"].split(","))), str(args["epochs"]), str(len(args["seeds"])),
        str(data["planned"]), f"{timing['cpu'] / 60:.1f}", f"{timing['wall'] / 60:.1f}"]
    pretrain = _stated(text, r"takes about (\d+) CPU-minutes and reached ([\d.]+)% on `shapes`")
    assert pretrain.groups() == (f"{data['pretrain']['vit']['cpu_seconds'] / 60:.0f}",
                                 f"{100 * data['pretrain']['vit']['test_acc']:.1f}")
    para = text.split("The committed report is the default run", 1)[1].split("No paper here", 1)[0]
    averages, verdicts = para.split("**Confirmed**", 1)
    means = {r["method"]: r["mean"][0] for r in data["summary"]}
    assert set(TRANSFER_NAMES.values()) == set(means)
    for name, method in TRANSFER_NAMES.items():
        found = _stated(averages, rf"[:,] {re.escape(name)} (\d+\.\d)[,( ]")
        assert found[1] == f"{means[method]:.1f}", (name, found[1], means[method])
    stated = dict(zip(("confirmed", "contradicted", "not resolved"), re.split(
        r"\*\*Contradicted\*\*|\*\*Not resolved\*\*", verdicts)))
    for verdict, part in stated.items():
        claims = [(f"{c['diff']:+.1f}", f"{c['std']:.1f}") for c in data["claims"]
                  if c["verdict"] == verdict]
        shown = re.findall(r"(?<![\d.])([+-]\d+\.\d)\b(?: ± (\d+\.\d))?", part)
        assert sorted(d for d, _ in shown) == sorted(d for d, _ in claims), (verdict, shown)
        assert all((d, s) in claims for d, s in shown if s), (verdict, shown, claims)


def test_readme_serving_figures_are_the_report():
    """The Serving section's measured figures are benchmarks/results/serving_http.json's, rounded
    as shown: memory, throughput and p99 at 64 adapters under Zipf traffic, requests per pass,
    the one-adapter ratios and the engine bound."""
    rows = {(r["adapters"], r["traffic"]): r
            for r in json.loads((RESULTS / "serving_http.json").read_text())["rows"]}
    r = rows[64, "zipf"]
    text = " ".join(README.read_text(encoding="utf-8").split())
    text = text.split("## Serving", 1)[1].split("## Sharing adapters", 1)[0]

    def same(shown: str, value: float) -> bool:
        decimals = len(shown.partition(".")[2])
        return f"{value:.{decimals}f}" == shown

    checks = [
        (r"our one replica is \*\*([\d.]+)\*\* of 64", [r["rss_vs_per_adapter"]]),
        (r"\(([\d.]+) in model tensor bytes", [r["model_bytes_vs_per_adapter"]]),
        (r"\(b\) holds ([\d.]+)× ours", [r["multiplexed_rss_vs_ours"]]),
        (r"Zipf traffic: \*\*([\d.]+)×\*\* \(b\) \(([\d.]+) vs ([\d.]+) requests/s, p99 "
         r"([\d.]+) vs ([\d.]+) s[;)]",
         [r["throughput_vs_multiplexed"], r["ours_req_s"], r["multiplexed_req_s"],
          r["ours_p99_ms"] / 1e3, r["multiplexed_p99_ms"] / 1e3]),
        (r"hold ([\d.]+) requests to \(b\)'s ([\d.]+)",
         [r["ours_req_per_pass"], r["multiplexed_req_per_pass"]]),
        (r"that alone gives ([\d.]+)–([\d.]+)× \(b\)\)",
         sorted(rows[1, k]["throughput_vs_multiplexed"] for k in ("uniform", "zipf"))),
        (r"engine bound\*.{0,120}? is \*\*([\d.]+)×\*\*", [r["engine_bound"]]),
        (r"runs at (\d+)% of its engine throughput", [100 * r["ours_req_s"] / r["engine_ours_req_s"]]),
    ]
    for pattern, values in checks:
        shown = _stated(text, pattern).groups()
        assert all(map(same, shown, values)), (pattern, shown, values)
    assert r["throughput_vs_multiplexed"] < 2 and "**not** reached" in text  # the goal's verdict


def test_readme_states_the_gpu_estimates_rate():
    """The one number of the GPU-hours estimate that is not measured is gpu_table()'s default."""
    import inspect
    from timm_peft.reproduce import gpu_table
    text = " ".join(README.read_text(encoding="utf-8").split())
    rate = float(_stated(text, r"assumed (\d+) training images/s")[1])
    assert rate == inspect.signature(gpu_table).parameters["img_per_s"].default


def test_readme_states_the_gpu_checks_caps(monkeypatch):
    """"On a GPU": benchmarks/gpu_check.sh's time caps and batch, and efficiency's default
    compile timeout, as the README states them."""
    import argparse
    from benchmarks import efficiency
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    text = " ".join(README.read_text(encoding="utf-8").split())
    cap = dict(re.findall(r'STAGES " == \*" (\d) "\*.*?timeout (\d+) ', script, flags=re.S))
    default_stages = re.search(r"STAGES=\$\{STAGES:-([\d ]+)\}", script)[1].split()
    caps = _stated(text, r"within one (\d+)-minute call by construction \(stages (\d) and (\d), "
                         r"capped at (\d+) and (\d+) s\)")
    assert default_stages == [caps[2], caps[3]]
    assert [cap[s] for s in default_stages] == [caps[4], caps[5]]
    assert sum(int(cap[s]) for s in default_stages) <= int(caps[1]) * 60
    alone = _stated(text, r"`STAGES=(\d) bash benchmarks/gpu_check.sh`.{0,200}in a call of its "
                          r"own capped at (\d+) s")
    assert cap[alone[1]] == alone[2] and int(alone[2]) <= int(caps[1]) * 60
    compiled = _stated(text, r"at batch (\d+) with a (\d+) s cap per entry and (\d+) s for all")
    assert f"--batch-size {compiled[1]}" in script
    assert f"--compile-timeout {compiled[2]} --compile-budget {compiled[3]}" in script
    default = _stated(text, r"`--compile-timeout` seconds \(default (\d+)\)")[1]

    class Parser(Exception):
        """Raised with benchmarks.efficiency's parser instead of parsing (nothing runs)."""

    def stop(parser, *args, **kwargs):
        raise Parser(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(Parser) as parsed:
        efficiency.main()
    assert parsed.value.args[0].get_default("compile_timeout") == float(default)
