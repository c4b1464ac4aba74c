"""The loop: one run of any method - epochs, AMP, accumulation, EMA, DDP, stages, logging, the
saved adapter."""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..core import get_method, get_nb_trainable_parameters, unwrap_features
from ..data import TASKS, DataSplits, TransformDataset, list_tasks
from ..io import WEIGHTS_NAME, atomic_write, base_fingerprint, save_pretrained
from .checkpoint import (_CHECKPOINT_FORMAT, _RUN_FILES, CHECKPOINT_NAME, LOG_NAME, LOG_TXT_NAME,
                         SUMMARY_CSV_NAME, TRAINING_ARGS_NAME, _load_trainable_state,
                         _read_checkpoint, _resolve_resume, _trainable_state)
from .config import TrainConfig
from .distributed import _Dist, _setup_distributed, _ShardSampler
from .evaluation import evaluate
from .factory import (_data_config, _make_splits, _training_hooks, build_model, build_transforms,
                      create_optimizer, create_scheduler)

logger = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What a method's post-training ``"stages"`` receive (see ``PeftMethod.training_hooks``).

    ``fit(model, epochs, desc)`` re-runs the standard loop with a fresh optimiser and schedule
    over the parameters trainable at that moment and returns its final metrics.
    ``all_reduce(t)`` sums a tensor over processes (identity on one process), for statistics
    such as importance scores gathered over the training data. Batches from the loaders are on
    the CPU; move them to ``device``. ``progress`` is the run's ``--no-progress`` choice, for
    stages that show progress bars of their own.
    """

    train_loader: DataLoader
    val_loader: DataLoader | None
    loss_fn: nn.Module
    device: torch.device
    epochs: int
    fit: Callable[[nn.Module, int, str], dict[str, float]]
    all_reduce: Callable[[torch.Tensor], torch.Tensor]
    autocast: Callable[[], ContextManager]
    rank: int = 0
    world_size: int = 1
    progress: bool = True


@dataclass
class TrainResult:
    """Where a run put its outputs and what it measured."""

    output_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    #: the process's rank under torchrun; only rank 0 writes the run directory
    rank: int = 0


class AdapterEma:
    """Exponential moving average of a model's trainable tensors (``--model-ema``).

    The averaging is timm's :class:`~timm.utils.ModelEmaV3` (decay, optional warm-up, foreach
    lerp), run over a view that holds only the adapter's tensors: ``ModelEmaV3`` on the whole
    model would deep-copy the frozen backbone (twice the model's memory) and average millions of
    values that never change.

    Example:
        >>> import timm, timm_peft
        >>> m = timm.create_model("resnet18.bias", num_classes=2)
        >>> ema = AdapterEma(m, decay=0.5)
        >>> sorted(ema.state_dict()) == sorted(m.peft_adapter_keys)
        True
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        from timm.utils import ModelEmaV3
        self.keys = list(unwrap_features(model).peft_adapter_keys)
        self.ema = ModelEmaV3(self._view(model), decay=decay, use_warmup=warmup)

    def _view(self, model: nn.Module) -> nn.Module:
        live = unwrap_features(model).state_dict(keep_vars=True)
        view = nn.Module()
        for i, key in enumerate(self.keys):  # the model's own tensors, not copies
            t = live[key].detach()
            if t.is_floating_point():  # ModelEmaV3 reads its device from the parameters
                view.register_parameter(f"t{i}", nn.Parameter(t, requires_grad=False))
            else:
                view.register_buffer(f"t{i}", t)
        return view

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        self.ema.update(self._view(model), step=step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors under the model's state-dict keys (on the CPU)."""
        avg = self.ema.module.state_dict()
        return {k: avg[f"t{i}"].detach().to("cpu", copy=True) for i, k in enumerate(self.keys)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        avg = self.ema.module.state_dict()
        for i, k in enumerate(self.keys):
            avg[f"t{i}"].copy_(state[k])


class _Trainer:
    """One run: loaders, model, DDP wrapping, epochs, checkpoints, logging."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, splits: DataSplits,
                 data_cfg: dict[str, Any], dctx: _Dist, out: Path) -> None:
        self.cfg, self.model, self.splits, self.dctx, self.out = cfg, model, splits, dctx, out
        self.device = dctx.device
        self.model.to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        train_tf, eval_tf = build_transforms(data_cfg, cfg)
        # stages and evaluation get hard labels; the training loss may see mixed soft targets
        self.hard_loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
        self.loss_fn: nn.Module = self.hard_loss_fn
        self.mixup_fn = None
        if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy
            if cfg.batch_size % 2:
                raise ValueError(f"--mixup/--cutmix mix pairs of images: --batch-size must be "
                                 f"even, got {cfg.batch_size}")
            self.mixup_fn = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                label_smoothing=cfg.smoothing, num_classes=len(splits.classes))
            self.loss_fn = SoftTargetCrossEntropy()
        global_batch = cfg.batch_size * dctx.world_size
        if len(splits.train) < global_batch:
            raise ValueError(f"the training set has {len(splits.train)} images, fewer than one "
                             f"global batch ({cfg.batch_size} x {dctx.world_size} processes); "
                             "lower --batch-size")
        workers = cfg.workers if cfg.workers is not None else (
            0 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 1) // 2))
        common = dict(num_workers=workers, pin_memory=self.device.type == "cuda",
                      persistent_workers=workers > 0)
        # the same sampler on one process as on many: the global batch is identical either way
        self.train_sampler = DistributedSampler(splits.train, num_replicas=dctx.world_size,
                                                rank=dctx.rank, shuffle=True, seed=cfg.seed)
        self.train_loader = DataLoader(TransformDataset(splits.train, train_tf),
                                       batch_size=cfg.batch_size, sampler=self.train_sampler,
                                       drop_last=True, **common)
        self.eval_loaders = {
            name: DataLoader(TransformDataset(ds, eval_tf), batch_size=cfg.batch_size,
                             sampler=_ShardSampler(len(ds), dctx.rank, dctx.world_size), **common)
            for name, ds in (("val", splits.val), ("test", splits.test)) if ds is not None}
        amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        self.amp_dtype = getattr(torch, cfg.amp_dtype)
        self.amp = amp
        # as timm's train.py: a loss scaler only for float16 (bfloat16 has float32's range)
        self.scaler = None
        if amp and self.amp_dtype == torch.float16:
            from timm.utils import NativeScaler
            self.scaler = NativeScaler(device=self.device.type)
        self.history: list[dict[str, Any]] = []
        self.global_step = 0
        self.ema: AdapterEma | None = None
        self._forward: nn.Module | None = None  # the DDP-wrapped and/or compiled model

    # --- helpers -------------------------------------------------------------------------------
    def autocast(self) -> ContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _eval_model(self) -> nn.Module:
        return self._forward if self._forward is not None else self.model

    def evaluate(self, split: str) -> dict[str, float] | None:
        loader = self.eval_loaders.get(split)
        if loader is None:
            return None
        return evaluate(self._eval_model(), loader, self.device, self.autocast,
                        self.dctx.all_reduce, memory_format=self.memory_format)

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.dctx.is_main:
            with open(self.out / LOG_NAME, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        """``(forward module, DDP module or None)``: DDP over the trainable tensors, then
        ``torch.compile`` (timm's order)."""
        ddp = None
        if self.dctx.enabled:
            ddp = self._ddp(model)
            model = ddp
        if self.cfg.torchcompile:
            model = torch.compile(model, backend=self.cfg.torchcompile,
                                  mode=self.cfg.torchcompile_mode)
        return model, ddp

    def _ddp(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP
        inner = unwrap_features(model)
        # Each process loaded the same frozen base itself; check that instead of sending it.
        prints = [None] * self.dctx.world_size
        dist.all_gather_object(prints, base_fingerprint(model))
        if len(set(prints)) != 1:
            raise RuntimeError("the processes built different frozen bases (fingerprints "
                               f"{sorted({p[:19] for p in prints})}); give every process the "
                               "same weights")
        state = inner.state_dict()
        for key in inner.peft_adapter_keys:  # only the adapter starts from rank 0's values
            dist.broadcast(state[key], src=0)
        # No broadcast of the module's states at construction (init_sync) and none before each
        # forward (the frozen base's buffers never change). Older torch names the latter
        # broadcast_buffers and may lack init_sync (then the base is sent once, at start).
        accepted = inspect.signature(DDP.__init__).parameters
        kwargs = {"forward_sync_buffers" if "forward_sync_buffers" in accepted
                  else "broadcast_buffers": False}
        if "init_sync" in accepted:
            kwargs["init_sync"] = False
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   **kwargs)

    def _sync_adapter_buffers(self) -> None:
        """Give every process rank 0's adapter buffers (e.g. BatchNorm statistics that train)."""
        if not self.dctx.enabled:
            return
        inner = unwrap_features(self.model)
        params = {n for n, _ in inner.named_parameters()}
        state = inner.state_dict()
        for key in inner.peft_adapter_keys:
            if key not in params:
                dist.broadcast(state[key], src=0)

    @contextlib.contextmanager
    def _ema_weights(self) -> Iterator[None]:
        """The EMA's tensors in the model for the duration (a no-op without ``--model-ema``)."""
        if self.ema is None:
            yield
            return
        raw = _trainable_state(self.model)
        _load_trainable_state(self.model, self.ema.state_dict(), "the EMA state")
        try:
            yield
        finally:
            _load_trainable_state(self.model, raw, "the raw state")

    # --- epochs ---------------------------------------------------------------------------------
    def fit_stage(self, model: nn.Module, epochs: int, desc: str) -> dict[str, Any]:
        """``StageContext.fit``: the standard loop again, fresh optimiser, same model."""
        if model is not self.model and model is not unwrap_features(self.model):
            raise ValueError("StageContext.fit trains the run's own model; pass the model the "
                             "stage received")
        return self.run_epochs(epochs, desc)

    def updates_per_epoch(self) -> int:
        return -(-len(self.train_loader) // self.cfg.grad_accum_steps)

    def run_epochs(self, epochs: int, phase: str, start_epoch: int = 0,
                   resume_state: dict[str, Any] | None = None,
                   checkpoint: Callable[[int, Any, dict[str, Any]], None] | None = None,
                   ) -> dict[str, Any]:
        """Train ``epochs`` epochs with a fresh optimiser; keep the best validation state."""
        cfg = self.cfg
        optimizer = create_optimizer(self.model, cfg, self.dctx.world_size)
        updates = self.updates_per_epoch()
        scheduler = create_scheduler(optimizer, cfg, epochs, updates)
        self.ema = AdapterEma(self.model, cfg.model_ema_decay, cfg.model_ema_warmup) \
            if cfg.model_ema else None
        best: dict[str, Any] = dict(acc=-1.0, epoch=-1, state=None)
        if resume_state is not None:
            best = self._resume(optimizer, resume_state)
        if scheduler is not None and start_epoch:
            scheduler.step_update(start_epoch * updates)
        forward, ddp = self._wrap(self.model)
        self._forward = forward
        stage = _Stage(phase, epochs, optimizer, scheduler, forward, ddp,
                       [p for p in self.model.parameters() if p.requires_grad], updates)
        method_metrics = _training_hooks(self.model).get("metrics")
        prefix = unwrap_features(self.model).peft_method
        for epoch in range(start_epoch, epochs):
            if method_metrics is not None:
                method_metrics(reset=True)
            record = self._train_epoch(stage, epoch)
            if method_metrics is not None:  # this process's view (rank 0's under torchrun)
                record.update({f"{prefix}/{k}": v for k, v in method_metrics(reset=False).items()})
            if "val" in self.eval_loaders:
                best = self._validate(record, best, epoch)
            self.log(record)
            if self.dctx.is_main:
                _log_epoch(record, self.out if phase == "train" else None)
            if checkpoint is not None:
                checkpoint(epoch + 1, optimizer, best)
        if best["state"] is not None:
            _load_trainable_state(self.model, best["state"], "the best epoch's state")
        elif self.ema is not None:  # no validation: the last average is the result
            _load_trainable_state(self.model, self.ema.state_dict(), "the EMA state")
        return dict(best_val_acc=best["acc"] if best["state"] is not None else None,
                    best_epoch=best["epoch"] if best["state"] is not None else epochs)

    def _resume(self, optimizer: torch.optim.Optimizer, resume_state: dict[str, Any]
                ) -> dict[str, Any]:
        """Optimiser, loss scaler and EMA from a checkpoint; its best state so far."""
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
        except ValueError as e:
            raise ValueError(f"the checkpoint's optimiser state does not fit this run ({e}); "
                             "resume with the same method, config and --opt") from e
        for group, hyper in zip(optimizer.param_groups, fresh):
            group.update(hyper)  # this run's lr / weight decay win over the saved ones
        if self.scaler is not None and resume_state.get("scaler"):
            self.scaler.load_state_dict(resume_state["scaler"])
        if self.ema is not None:
            if not resume_state.get("ema"):
                raise ValueError("the checkpoint holds no EMA state: resume without "
                                 "--model-ema, as the run was started")
            self.ema.load_state_dict(resume_state["ema"])
        return resume_state["best"]

    def _train_epoch(self, stage: _Stage, epoch: int) -> dict[str, Any]:
        """One pass over the training data; the epoch's record (loss, accuracy, lr, speed)."""
        from timm.utils import dispatch_clip_grad
        from tqdm.auto import tqdm
        cfg, dctx, optimizer = self.cfg, self.dctx, stage.optimizer
        batches, accum = len(self.train_loader), cfg.grad_accum_steps
        # one seed per (epoch, process): a resumed run draws the same numbers
        torch.manual_seed(cfg.seed + 1_000_003 * (epoch + 1) + dctx.rank)
        self.train_sampler.set_epoch(epoch)
        if self.mixup_fn is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
            self.mixup_fn.mixup_enabled = False
        self.model.train()
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        t0 = time.perf_counter()
        bar = tqdm(self.train_loader, total=batches,
                   desc=f"{stage.phase} {epoch + 1}/{stage.epochs}", unit="step",
                   disable=not (cfg.progress and dctx.is_main), leave=True, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            y = y.to(self.device, non_blocking=True)
            target = y
            if self.mixup_fn is not None:
                x, target = self.mixup_fn(x, y)
            update_idx = step // accum
            need_update = (step + 1) % accum == 0 or step + 1 == batches
            # the last update of an epoch may gather fewer batches (as in timm's train.py)
            in_update = accum if update_idx < batches // accum else batches % accum
            sync = stage.ddp.no_sync() if stage.ddp is not None and not need_update \
                else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    logits = stage.forward(x)
                    loss = self.loss_fn(logits, target)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at {stage.phase} epoch "
                                             f"{epoch + 1} step {step + 1}; lower the "
                                             "learning rate")
                scaled = loss / in_update if in_update > 1 else loss
                if self.scaler is not None:
                    self.scaler(scaled, optimizer, clip_grad=cfg.clip_grad,
                                clip_mode=cfg.clip_mode, parameters=stage.params,
                                need_update=need_update)
                else:
                    scaled.backward()
                    if need_update:
                        if cfg.clip_grad is not None:
                            dispatch_clip_grad(stage.params, cfg.clip_grad, mode=cfg.clip_mode)
                        optimizer.step()
            if need_update:
                optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                if self.ema is not None:
                    self.ema.update(self.model, step=self.global_step)
                if stage.scheduler is not None:
                    stage.scheduler.step_update(epoch * stage.updates + update_idx + 1)
            stats[0] += loss.detach().float() * y.numel()
            stats[1] += (logits.detach().argmax(-1) == y).sum()
            stats[2] += y.numel()
            if not bar.disable:
                n = stats[2].item()
                bar.set_postfix(loss=f"{stats[0].item() / n:.3f}",
                                acc=f"{stats[1].item() / n:.3f}",
                                img_s=f"{n * dctx.world_size / (time.perf_counter() - t0):.0f}",
                                refresh=False)
        bar.close()
        elapsed = time.perf_counter() - t0
        dctx.all_reduce(stats)
        self._sync_adapter_buffers()
        return dict(
            phase=stage.phase, epoch=epoch + 1, epochs=stage.epochs, step=self.global_step,
            lr=optimizer.param_groups[0]["lr"], train_loss=stats[0].item() / stats[2].item(),
            train_acc=stats[1].item() / stats[2].item(), epoch_time_s=round(elapsed, 3),
            img_per_s=round(stats[2].item() / elapsed, 1))

    def _validate(self, record: dict[str, Any], best: dict[str, Any], epoch: int
                  ) -> dict[str, Any]:
        """The validation metrics into ``record``; the best state so far (the EMA's, if any)."""
        if self.ema is not None:  # timm's choice: the EMA is what gets selected
            record["val_acc_raw"] = self.evaluate("val")["acc"]
        with self._ema_weights():
            val = self.evaluate("val")
            record.update(val_loss=val["loss"], val_acc=val["acc"])
            if val["acc"] > best["acc"]:
                best = dict(acc=val["acc"], epoch=epoch + 1, state=_trainable_state(self.model))
        record["best_val_acc"] = best["acc"]
        return best


@dataclass
class _Stage:
    """What one :meth:`_Trainer.run_epochs` call trains with: its optimiser, schedule and the
    (DDP-wrapped, compiled) forward."""

    phase: str
    epochs: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    forward: nn.Module
    ddp: nn.Module | None
    params: list[torch.Tensor]
    updates: int


def _log_epoch(record: dict[str, Any], summary_dir: Path | None) -> None:
    """One console/log-file line per epoch; main-phase epochs also go to timm's summary.csv."""
    shown = [f"{k}={record[k]:.4f}" for k in ("train_loss", "train_acc", "val_loss", "val_acc")
             if k in record]
    logger.info(f"{record['phase']} epoch {record['epoch']}/{record['epochs']}: "
                + " ".join(shown) + f" lr={record['lr']:.3g} time={record['epoch_time_s']:.1f}s")
    if summary_dir is not None:
        from timm.utils import update_summary
        train_m = dict(loss=record["train_loss"], acc=record["train_acc"])
        eval_m = {k[4:]: record[k] for k in ("val_loss", "val_acc") if k in record}
        update_summary(record["epoch"], train_m, eval_m, str(summary_dir / SUMMARY_CSV_NAME),
                       lr=record["lr"])


class _TqdmHandler(logging.StreamHandler):
    """Console log lines that do not tear tqdm's progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's contract: never raise from a handler
            self.handleError(record)


@contextlib.contextmanager
def _run_logging(is_main: bool) -> Iterator[Callable[[Path], None]]:
    """For the duration of a run, log ``timm_peft`` messages to the console (unless the
    application configured logging itself) and, once the run directory exists, to its
    ``log.txt``: the context yields ``attach(out)`` for that."""
    pkg = logging.getLogger("timm_peft")
    added: list[logging.Handler] = []

    def attach(out: Path) -> None:
        if is_main:
            added.append(logging.FileHandler(out / LOG_TXT_NAME))
            added[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            pkg.addHandler(added[-1])

    if is_main and not pkg.handlers and not logging.getLogger().handlers:
        added.append(_TqdmHandler(sys.stderr))
        added[-1].setFormatter(logging.Formatter("%(message)s"))
        pkg.addHandler(added[-1])
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    try:
        yield attach
    finally:
        for h in added:
            pkg.removeHandler(h)
            h.close()
        pkg.setLevel(old_level)


def _default_output(cfg: TrainConfig) -> Path:
    data = cfg.task or (cfg.dataset or "").replace("/", "-") or Path(cfg.data_dir or "data").name
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{data}"


def train(cfg: TrainConfig, splits: DataSplits | None = None, *,
          distributed: bool = True) -> TrainResult:
    """Fine-tune ``cfg.model`` on the configured data and save the best adapter.

    Writes to the run directory: ``adapter/`` (:func:`timm_peft.save_pretrained` output plus
    ``training_args.json``), ``checkpoint.pt`` (last epoch, for ``resume``), ``log.jsonl`` (one
    JSON record per epoch) and ``summary.json``. ``splits`` replaces the data named in ``cfg``
    (e.g. datasets built once and shared by many runs). Under ``torchrun`` every process calls
    this; only rank 0 writes. ``distributed=False`` trains on this process alone even under
    ``torchrun`` (one run per process, as ``timm-peft reproduce`` spreads its runs).
    Progress goes to the ``timm_peft`` logger, and to ``log.txt`` in the run directory.

    Example:
        >>> cfg = TrainConfig(model="resnet18.bias", task="texture", pretrained=False,
        ...                   epochs=1, train_size=64, test_size=64, batch_size=32)
        >>> train(cfg).metrics["test_acc"]  # doctest: +SKIP
        0.23
    """
    if cfg.task is None and cfg.data_dir is None and cfg.dataset is None and splits is None:
        raise ValueError(f"no data: give a built-in task ({list_tasks()}), a data directory or "
                         "a dataset")
    dctx = _setup_distributed(cfg.device) if distributed else _Dist(
        device=torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    try:
        return _train(cfg, splits, dctx)
    finally:
        if dctx.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, splits: DataSplits | None, dctx: _Dist) -> TrainResult:
    resume_path = _resolve_resume(cfg.resume) if cfg.resume else None
    out = Path(cfg.output) if cfg.output else (resume_path.parent if resume_path else None)
    if out is None:
        out = _default_output(cfg)
        if dctx.enabled:  # every process must agree on a name made from the clock
            names = [str(out)]
            dist.broadcast_object_list(names, src=0)
            out = Path(names[0])
    held = [n for n in _RUN_FILES if os.path.lexists(out / n)]
    # resuming continues the run in its own directory, or in an empty --output the user names
    continuing = resume_path is not None and out.resolve() == resume_path.parent.resolve()
    if resume_path is None and held:
        if not cfg.overwrite:
            hint = f"continue it with --resume {out}, " if CHECKPOINT_NAME in held else ""
            raise ValueError(f"{out} already holds a run ({', '.join(held)}); {hint}start it over "
                             "with --overwrite or choose another --output")
    elif resume_path is not None and not continuing and held:
        raise ValueError(f"--output {out} already holds a run ({', '.join(held)}); resuming "
                         f"{resume_path} writes the continued run where --output points: give a "
                         f"new --output, or none to continue in {resume_path.parent}")

    existed = out.exists()
    prepared: list[Path] = []  # set once this run has (re)made the directory its own
    try:
        with _run_logging(dctx.is_main) as attach_log:
            if continuing:
                attach_log(out)

            def attach_fresh(path: Path) -> None:
                prepared.append(path)
                attach_log(path)
            return _train_logged(cfg, splits, dctx, out, resume_path, held, attach_fresh)
    except KeyboardInterrupt:
        raise _interrupted(out, resume_path, cleanup=dctx.is_main and bool(prepared),
                           remove_dir=not existed) from None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: what was saved, and how to continue (``str(e)``).

    ``checkpoint`` is the file a ``--resume`` continues from (``None``: nothing was saved, and
    the files this run had written are removed, so the same command starts it again).
    """

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def _interrupted(out: Path, resume_path: Path | None, cleanup: bool,
                 remove_dir: bool) -> TrainingInterrupted:
    """The :class:`TrainingInterrupted` for a run stopped in ``out``; without a checkpoint or a
    saved adapter of its own, the files this run wrote there are deleted (and ``out`` itself if
    the run made it)."""
    own = out / CHECKPOINT_NAME
    if own.is_file() and (cleanup or resume_path is not None):
        try:
            epoch = f" (epoch {torch.load(own, map_location='cpu', weights_only=True)['epoch']})"
        except Exception:  # the message only; --resume checks the file in full
            epoch = ""
        return TrainingInterrupted(f"interrupted: the last checkpoint is {own}{epoch}; continue "
                                   f"with: timm-peft train --resume {shlex.quote(str(out))}", own)
    adapter = out / "adapter"
    if cleanup and (adapter / WEIGHTS_NAME).is_file():  # done but for its summary: keep it all
        return TrainingInterrupted(f"interrupted after the adapter was saved to {adapter}; the "
                                   "run's files are kept", None)
    if cleanup:  # nothing resumable: what this run wrote would only block running it again
        for name in _RUN_FILES:
            if os.path.lexists(out / name):
                (shutil.rmtree if (out / name).is_dir() else os.remove)(out / name)
        if remove_dir and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    if resume_path is not None:
        return TrainingInterrupted(f"interrupted before a new checkpoint; {resume_path} is "
                                   "unchanged: continue with: timm-peft train --resume "
                                   f"{shlex.quote(str(resume_path.parent))}", resume_path)
    removed = f"; removed this run's files from {out}" if cleanup else ""
    return TrainingInterrupted(f"interrupted before any checkpoint was saved{removed}: the same "
                               "command starts the run again", None)


def _train_logged(cfg: TrainConfig, splits: DataSplits | None, dctx: _Dist, out: Path,
                  resume_path: Path | None, held: list[str],
                  attach_log: Callable[[Path], None]) -> TrainResult:
    # a generated task is rendered at the model's input size, so the model comes first; its
    # class count is known without rendering anything
    if splits is None and cfg.task is None:
        splits = _make_splits(cfg, None)
    classes = splits.classes if splits is not None else list(TASKS[cfg.task].classes)
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise ValueError(f"num_classes is {cfg.num_classes} but the data has {len(classes)} "
                         f"classes ({', '.join(map(str, classes[:5]))}"
                         f"{', ...' if len(classes) > 5 else ''}): the head is sized from the "
                         "data; drop --num-classes or give the data it describes")
    model = build_model(cfg, num_classes=len(classes))
    data_cfg = _data_config(cfg, model)
    if splits is None:
        splits = _make_splits(cfg, data_cfg["input_size"][-1])
    trainer = _Trainer(cfg, model, splits, data_cfg, dctx, out)

    start_epoch, resume_state = 0, None
    if resume_path is not None:
        ckpt = _read_checkpoint(resume_path, cfg, model, splits.classes)
        _load_trainable_state(model, ckpt["adapter"], f"checkpoint {resume_path}")
        start_epoch, trainer.global_step = ckpt["epoch"], ckpt["step"]
        resume_state = ckpt
        trainer.history = list(ckpt.get("history", []))
        if dctx.is_main:
            logger.info(f"resuming {resume_path} at epoch {start_epoch + 1}/{cfg.epochs}, "
                        f"step {trainer.global_step}")
    fingerprint = base_fingerprint(model)
    trainable, total = get_nb_trainable_parameters(model)
    inner = unwrap_features(model)
    run_info = dict(model=cfg.model, method=inner.peft_method, data=splits.source,
                    num_classes=len(splits.classes), train_images=len(splits.train),
                    val_images=len(splits.val) if splits.val is not None else 0,
                    test_images=len(splits.test) if splits.test is not None else 0,
                    trainable_params=trainable, total_params=total, world_size=dctx.world_size,
                    global_batch=cfg.batch_size * dctx.world_size * cfg.grad_accum_steps,
                    lr=cfg.resolved_lr(dctx.world_size), device=str(dctx.device),
                    updates_per_epoch=trainer.updates_per_epoch())
    if dctx.is_main:
        # only now that model and data are ready: a run that fails to start leaves no trace
        if resume_path is None or out.resolve() != resume_path.parent.resolve():
            for name in held:  # --overwrite (a resume into another --output holds none)
                (shutil.rmtree if (out / name).is_dir() else os.remove)(out / name)
            out.mkdir(parents=True, exist_ok=True)
            attach_log(out)
        logger.info(f"run {out}: " + ", ".join(f"{k}={v}" for k, v in run_info.items()))
        if getattr(get_method(inner.peft_method), "saves_whole_model", False):
            logger.warning(f"--model {cfg.model}: this method trains every parameter; the saved "
                           f"adapter will be the whole model ({trainable:,d} values), not a "
                           "small file. For a parameter-efficient run pick another method "
                           "suffix (timm-peft info lists them).")
        args = dict(cfg.to_dict(), classes=splits.classes, data_config=data_cfg, run=run_info)
        # atomically: a resume reads it, and a kill must not leave half of it
        atomic_write(out / "args.json", (json.dumps(args, indent=2) + "\n").encode())

    def checkpoint(epoch: int, optimizer: torch.optim.Optimizer, best: dict[str, Any]) -> None:
        if not dctx.is_main:
            return
        atomic_write(out / CHECKPOINT_NAME, lambda fh: torch.save(dict(
            format=_CHECKPOINT_FORMAT, model=cfg.model, model_kwargs=cfg.model_kwargs,
            peft_config=inner.peft_config.to_dict(), num_classes=len(splits.classes),
            classes=splits.classes, base_fingerprint=fingerprint, epoch=epoch,
            step=trainer.global_step, adapter=_trainable_state(model),
            optimizer=optimizer.state_dict(),
            scaler=trainer.scaler.state_dict() if trainer.scaler is not None else None,
            ema=trainer.ema.state_dict() if trainer.ema is not None else None,
            best=best, history=trainer.history), fh))

    main = trainer.run_epochs(cfg.epochs, "train", start_epoch=start_epoch,
                              resume_state=resume_state,
                              checkpoint=checkpoint if cfg.checkpoint else None)
    if resume_state is not None and start_epoch >= cfg.epochs and resume_state["best"]["state"]:
        _load_trainable_state(model, resume_state["best"]["state"], "the checkpoint's best state")

    hooks = _training_hooks(model)
    ctx = StageContext(
        train_loader=trainer.train_loader, val_loader=trainer.eval_loaders.get("val"),
        loss_fn=trainer.hard_loss_fn, device=dctx.device, epochs=cfg.epochs,
        fit=trainer.fit_stage,
        all_reduce=dctx.all_reduce, autocast=trainer.autocast, rank=dctx.rank,
        world_size=dctx.world_size, progress=cfg.progress)
    stages = []
    for name, stage in hooks.get("stages", ()):
        if dctx.is_main:
            logger.info(f"stage {name!r} of method {inner.peft_method!r}")
        result = stage(inner, ctx)
        stages.append(dict(stage=name, **(result if isinstance(result, dict) else {})))
        trainer.log(dict(phase=name, stage_done=True, step=trainer.global_step))

    trainer._sync_adapter_buffers()
    metrics: dict[str, Any] = dict(best_epoch=main["best_epoch"])
    for split in ("val", "test"):
        res = trainer.evaluate(split)
        if res is not None:
            metrics[f"{split}_acc"], metrics[f"{split}_loss"] = res["acc"], res["loss"]
    trainable, _ = get_nb_trainable_parameters(model)
    metrics.update(trainable_params=trainable, stages=stages)
    adapter_dir = out / "adapter"
    if dctx.is_main:
        # the adapter records the data config it was trained with, and its class names
        inner.pretrained_cfg = {**(inner.pretrained_cfg or {}), **{
            k: tuple(v) if isinstance(v, list) else v for k, v in data_cfg.items()}}
        with warnings.catch_warnings():  # said at the start, against the user's --model
            warnings.filterwarnings("ignore", message=".*trains every parameter")
            save_pretrained(model, adapter_dir, label_names=list(splits.classes),
                            dataset=splits.source, metrics=metrics)
        training_args = dict(cfg.to_dict(), classes=splits.classes, data_config=data_cfg,
                             metrics=metrics)
        for key in ("pretrained_file", "data_dir"):  # usable from any working directory
            if training_args.get(key):
                training_args[key] = str(Path(training_args[key]).resolve())
        atomic_write(adapter_dir / TRAINING_ARGS_NAME,
                     (json.dumps(training_args, indent=2) + "\n").encode())
        metrics["adapter_bytes"] = (adapter_dir / WEIGHTS_NAME).stat().st_size
        trainer.log(dict(phase="final", step=trainer.global_step, **metrics))
        (out / "summary.json").write_text(json.dumps(dict(run=run_info, metrics=metrics),
                                                     indent=2) + "\n")
        logger.info(f"saved the adapter to {adapter_dir} ("
                    + ", ".join(f"{k}={metrics[k]:.4f}" for k in ("val_acc", "test_acc")
                                if k in metrics) + ")")
    dctx.barrier()
    return TrainResult(output_dir=out, adapter_dir=adapter_dir, metrics=metrics,
                       history=trainer.history, rank=dctx.rank)
