"""LION cost: inference and training-step time against the base model, solver iterations, and
training memory against the number of solver iterations.

LION runs two deep-equilibrium prompt blocks (P1 on the image, P2 on the pooled features) around
a frozen backbone. Inference costs one backbone pass plus the two fixed-point solves; a training
step adds the backward pass through the backbone (P1 needs the gradient at the image) and the two
adjoint solves, then LION's robust Adam step. The solver's iteration counts depend on the
adapter's state, so two are measured: ``init`` (as built: tiny cell weights and zero read-outs,
so the adjoint is zero and the backward solves stop at once) and ``trained`` (after a few
robust-Adam steps at a high learning rate on a colour-coded copy of the batch, a stand-in for a
trained adapter).

Times are medians over alternating rounds (load from other processes hits every model alike);
``peak_extra_MiB`` is the peak live tensor memory of a call beyond weights and inputs
(:func:`benchmarks.common.peak_memory`). The last rows run the ``trained`` training step with the
solver forced (``tol=0``) to exactly 5 and 40 iterations, forward and adjoint: the peak memory
must not change.

Run from the repository root::

    python -m benchmarks.bench_lion             # vit_small_patch16_224 + resnet50, batch 4
    python -m benchmarks.bench_lion --models resnet18 --batch-size 8
"""
from __future__ import annotations

import argparse
import warnings

import timm
import torch
import torch.nn.functional as F

import timm_peft
from timm_peft.deq import DEQConvergenceWarning

from .common import inference, peak_memory, round_robin_medians, write_report

NUM_CLASSES = 100


#: extra create_model arguments per arch (set in main: img_size for models with a fixed size)
ARCH_KWARGS: dict[str, dict] = {}


def _size_kwargs(arch: str, img_size: int) -> dict:
    """``img_size`` for archs built for one input size (ViT, Swin); none for ConvNets."""
    try:
        timm.create_model(arch, device="meta", img_size=img_size)
    except TypeError:  # the model takes any size and has no such argument
        return {}
    return {"img_size": img_size}


def _build(arch: str, method: str | None, **peft_cfg) -> torch.nn.Module:
    torch.manual_seed(0)  # the same random "pretrained" base for every model
    name = arch if method is None else f"{arch}.{method}"
    return timm.create_model(name, num_classes=NUM_CLASSES, **ARCH_KWARGS.get(arch, {}),
                             **({"peft_cfg": peft_cfg} if peft_cfg else {}))


def _trained(arch: str, x: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """LION's state after ``steps`` robust-Adam steps (lr 1e-2) on a colour task: a stand-in for
    a trained adapter (cell weights grown, read-outs non-zero, so the solves do real work)."""
    m = _build(arch, "lion").train()
    opt = timm_peft.core.get_method("lion").training_hooks(m)["optimizer_wrapper"](
        torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2), m)
    y = torch.arange(x.shape[0]) % 4
    x = x + torch.linspace(-1, 1, 4)[y][:, None, None, None]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m.state_dict()


def _lion(arch: str, state: dict[str, torch.Tensor] | None, **peft_cfg) -> torch.nn.Module:
    m = _build(arch, "lion", **peft_cfg)
    if state is not None:
        m.load_state_dict(state)
    return m


def _solver_columns(model: torch.nn.Module) -> dict[str, float]:
    stats = model.lion.solver_stats()
    out = {}
    for p in ("p1", "p2"):
        out[f"{p}_fwd_iters"] = stats[f"{p}/forward_mean_iterations"]
        if stats.get(f"{p}/backward_solves"):
            out[f"{p}_bwd_iters"] = stats[f"{p}/backward_mean_iterations"]
    out["nonconverged"] = sum(v for k, v in stats.items() if k.endswith("nonconverged"))
    return out


def _bench_arch(arch: str, x: torch.Tensor, y: torch.Tensor, warmup: int, rounds: int,
                train_steps: int) -> list[dict]:
    rows: list[dict] = []
    trained = _trained(arch, x, train_steps)
    tag = f"trained {train_steps} steps"

    # ---- inference ----
    models = {"base (plain timm)": _build(arch, None), "LION, init": _lion(arch, None),
              f"LION, {tag}": _lion(arch, trained)}
    for m in models.values():
        m.eval()

    times = round_robin_medians({k: inference(m, x) for k, m in models.items()}, warmup, rounds)
    for key, m in models.items():
        row = dict(arch=arch, measure="inference", model=key, time_ms=1e3 * times[key],
                   ratio_vs_base=times[key] / times["base (plain timm)"],
                   peak_extra_MiB=peak_memory(inference(m, x)) / 2**20)
        if hasattr(m, "lion"):
            row.update(_solver_columns(m))
        rows.append(row)
    del models

    # ---- training step: forward, backward, optimiser step (LION: its robust Adam) ----
    trainers = {"linear probe": _build(arch, "linear"), "full fine-tuning": _build(arch, "full"),
                "LION, init": _lion(arch, None), f"LION, {tag}": _lion(arch, trained),
                f"LION, {tag}, phantom grad": _lion(arch, trained, backward="phantom")}
    steps = {}
    for key, m in trainers.items():
        m.train()
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        wrapper = timm_peft.core.get_method(m.peft_method).training_hooks(m).get(
            "optimizer_wrapper")
        opt = wrapper(opt, m) if wrapper is not None else opt

        def step(m: torch.nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
        steps[key] = step
    times = round_robin_medians(steps, max(1, warmup - 1), rounds)
    for key, m in trainers.items():
        row = dict(arch=arch, measure="train step", model=key,
                   trainable_params=timm_peft.get_nb_trainable_parameters(m)[0],
                   time_ms=1e3 * times[key],
                   ratio_vs_linear=times[key] / times["linear probe"],
                   ratio_vs_full=times[key] / times["full fine-tuning"],
                   peak_extra_MiB=peak_memory(steps[key]) / 2**20)
        if hasattr(m, "lion"):
            row.update(_solver_columns(m))
        rows.append(row)
    del trainers, steps

    # ---- training memory vs solver iterations (tol=0: exactly n iterations each solve) ----
    for n in (5, 40):
        m = _lion(arch, trained, tol=0.0, backward_tol=0.0, max_iter=n,
                  backward_max_iter=n).train()

        def step(m: torch.nn.Module = m) -> None:
            F.cross_entropy(m(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DEQConvergenceWarning)
            peak = peak_memory(step) / 2**20
        rows.append(dict(arch=arch, measure=f"train memory, {n} iterations", model=f"LION, {tag}",
                         peak_extra_MiB=peak, **_solver_columns(m)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_small_patch16_224,resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=20,
                        help="steps that make the 'trained' adapter state")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,))
    rows: list[dict] = []
    for arch in args.models.split(","):
        ARCH_KWARGS[arch] = _size_kwargs(arch, args.img_size)
        rows += _bench_arch(arch, x, y, args.warmup, args.rounds, args.train_steps)

    defaults = timm_peft.methods.lion.LionConfig()
    notes = (
        f"Random-init backbones at {args.img_size}², {NUM_CLASSES} classes, batch "
        f"{args.batch_size}, {args.rounds} alternating rounds (median), "
        f"{torch.get_num_threads()} threads. LION at its defaults (P1 width {defaults.p1_width}, "
        f"stride {defaults.p1_stride}; P2 width {defaults.p2_width}; {defaults.solver}, tol "
        f"{defaults.tol:g}, caps {defaults.max_iter} train / {defaults.eval_max_iter} eval / "
        f"{defaults.backward_max_iter} adjoint; cell_max_norm {defaults.cell_max_norm}). "
        f"'init' is LION as built; 'trained' is LION after {args.train_steps} robust-Adam steps at "
        "lr 1e-2 on a colour-coded copy of the batch (a stand-in for a trained adapter: at init "
        "the read-outs are zero, so the adjoint is zero and each backward solve stops at once). "
        "`pN_fwd_iters` / `pN_bwd_iters` are the mean iterations of the forward / adjoint "
        "solves during the timed calls, `nonconverged` counts solves that hit their cap. Training "
        "uses Adam (LION: wrapped in its robust update, as the paper); `ratio_vs_linear` compares "
        "with a linear probe (no backward through the backbone), `ratio_vs_full` with full "
        "fine-tuning. The 'train memory' rows (trained state) force every solve to exactly 5 or "
        "40 iterations, forward and adjoint (so `nonconverged` counts all of them): the peak "
        "extra memory of a training step does not depend on it.")
    path = write_report("bench_lion", "LION: inference and training cost, solver iterations",
                        "python -m benchmarks.bench_lion", rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
