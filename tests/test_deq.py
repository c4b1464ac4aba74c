"""Deep-equilibrium layer: solvers, implicit gradients, memory, statistics (timm_peft.deq)."""
import warnings

import pytest
import torch
from torch import nn

from benchmarks.common import PeakMemory
from timm_peft.deq import (DEQ, DEQConvergenceWarning, anderson, fixed_point_iteration,
                           relative_residual)


class LinearCell(nn.Module):
    """f(z, u) = tanh(W z + V u + b) with ‖W‖₂ = gain: a contraction for gain < 1."""

    def __init__(self, dim: int = 6, gain: float = 0.7) -> None:
        super().__init__()
        self.w = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.w.weight.mul_(gain / torch.linalg.matrix_norm(self.w.weight, 2))

    def forward(self, z, u):
        return torch.tanh(self.w(z) + self.v(u))


class ConvCell(nn.Module):
    """A small convolutional contraction (weights scaled down), batch-independent."""

    def __init__(self, ch: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.5)

    def forward(self, z, u):
        return torch.tanh(self.conv(z) + u)


def _grads(loss, tensors):
    return [g.flatten() for g in torch.autograd.grad(loss, tensors)]


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])
def test_implicit_gradient_matches_unrolled_autograd(solver):
    torch.manual_seed(0)
    cell = LinearCell().double()
    deq = DEQ(cell, solver=solver, max_iter=200, tol=1e-10, backward_max_iter=200,
              backward_tol=1e-10)
    u = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, dtype=torch.float64)
    params = [u, *cell.parameters()]

    implicit = _grads((deq(u) * weight).sum(), params)

    z = torch.zeros_like(u)
    for _ in range(200):  # the reference: plain autograd through the unrolled iteration
        z = cell(z, u)
    unrolled = _grads((z * weight).sum(), params)

    for name, a, b in zip(["u", "w.weight", "w.bias", "v.weight"], implicit, unrolled):
        assert _cos(a, b) > 0.999, name
        assert float((a - b).norm() / b.norm()) < 1e-3, name


def test_implicit_gradient_float32_conv_cell():
    torch.manual_seed(1)
    cell = ConvCell()
    deq = DEQ(cell, max_iter=100, tol=1e-6, backward_max_iter=100, backward_tol=1e-6)
    u = torch.randn(2, 4, 6, 6, requires_grad=True)
    weight = torch.randn(2, 4, 6, 6)
    params = [u, *cell.parameters()]
    implicit = _grads((deq(u) * weight).sum(), params)
    z = torch.zeros_like(u)
    for _ in range(200):
        z = cell(z, u)
    unrolled = _grads((z * weight).sum(), params)
    for a, b in zip(implicit, unrolled):
        assert _cos(a, b) > 0.999
        assert float((a - b).norm() / b.norm()) < 1e-3


@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])
@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_equilibrium_residual_below_tolerance(solver, tol):
    torch.manual_seed(0)
    cell = ConvCell()
    deq = DEQ(cell, solver=solver, max_iter=100, tol=tol)
    u = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        z = deq(u)
        fz = cell(z, u)
    per_sample = (fz - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
    assert float(per_sample.max()) < tol
    last = deq.forward_stats.last
    assert last.converged and last.residual == pytest.approx(float(per_sample.max()), rel=1e-3)


def test_anderson_beats_plain_iteration_on_slow_linear_map():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(-0.95, 0.95, 50, dtype=torch.float64)) @ q.T
    b = torch.randn(2, 50, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(50, dtype=torch.float64) - a, b.T).T
    results = {}
    for solver in (anderson, fixed_point_iteration):
        z, stats = solver(lambda z: z @ a.T + b, torch.zeros_like(b), max_iter=1000, tol=1e-8)
        assert stats.converged
        assert torch.allclose(z, exact, atol=1e-6)
        results[solver.__name__] = stats.iterations
    assert results["anderson"] < results["fixed_point_iteration"] / 2


def test_relative_residual_per_sample():
    z = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    fz = torch.tensor([[3.0, 4.5], [1.0, 0.1]])
    assert torch.allclose(relative_residual(fz, z), torch.tensor([0.5 / 5, 0.1 / 1]))


def _train_step_peak(deq, u):
    def run():
        out = deq(u)
        out.square().sum().backward()
    with PeakMemory() as pm:
        run()
    return pm.peak


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])
def test_memory_does_not_grow_with_iterations(solver, backward):
    torch.manual_seed(0)
    cell = ConvCell(8)
    u = torch.randn(4, 8, 16, 16, requires_grad=True)
    peaks, iters = {}, {}
    for n in (5, 40):
        # tol=0 never converges: every solve runs exactly n iterations
        deq = DEQ(cell, solver=solver, max_iter=n, tol=0.0, backward=backward,
                  backward_max_iter=n, backward_tol=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DEQConvergenceWarning)
            peaks[n] = _train_step_peak(deq, u)
        iters[n] = deq.forward_stats.last.iterations
        if backward == "implicit":
            assert deq.backward_stats.last.iterations == n
    assert iters == {5: 5, 40: 40}
    assert peaks[40] <= 1.05 * peaks[5], peaks


def test_nonconvergence_is_warned_once_then_counted():
    torch.manual_seed(0)
    deq = DEQ(LinearCell(gain=0.95), max_iter=2, tol=1e-12)
    u = torch.randn(3, 6)
    with pytest.warns(DEQConvergenceWarning, match="did not converge"):
        deq(u)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DEQConvergenceWarning)
        out = deq(u)  # counted, not warned again
    assert torch.isfinite(out).all()
    assert deq.forward_stats.nonconverged == 2 and deq.forward_stats.solves == 2
    assert deq.stats()["forward_nonconverged"] == 2
    deq.reset_stats()
    assert deq.forward_stats.solves == 0


def test_divergence_raises_instead_of_returning_nan():
    class Blowup(nn.Module):
        def forward(self, z, u):
            return 1e30 * (z + u) ** 3 + u

    deq = DEQ(Blowup(), solver="fixed_point", max_iter=30)
    with pytest.raises(FloatingPointError, match="non-finite"):
        deq(torch.ones(2, 3))


def test_best_iterate_is_returned_not_the_last():
    values = iter([1.0, 1.001, 10.0, 100.0, 1000.0, 1e4])

    def f(z):  # nearly settles at 1, then runs away
        return torch.full_like(z, next(values))

    z, stats = fixed_point_iteration(f, torch.zeros(1, 2), max_iter=6, tol=1e-9)
    assert torch.equal(z, torch.ones(1, 2))
    assert stats.iterations == 6 and not stats.converged
    assert stats.residual == pytest.approx(1e-3, rel=1e-3)


def test_phantom_gradient_approaches_implicit_with_many_steps():
    torch.manual_seed(0)
    cell = LinearCell(gain=0.5).double()
    u = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64)
    params = [u, *cell.parameters()]
    common = dict(max_iter=100, tol=1e-12, backward_max_iter=100, backward_tol=1e-12)
    exact = _grads((DEQ(cell, **common)(u) * weight).sum(), params)
    many = _grads((DEQ(cell, backward="phantom", phantom_steps=60, **common)(u) * weight).sum(),
                  params)
    one = _grads((DEQ(cell, backward="phantom", **common)(u) * weight).sum(), params)
    damped = _grads((DEQ(cell, backward="phantom", phantom_steps=120, phantom_damping=0.5,
                         **common)(u) * weight).sum(), params)
    for e, m, o, d in zip(exact, many, one, damped):
        assert float((m - e).norm() / e.norm()) < 1e-6
        assert float((d - e).norm() / e.norm()) < 1e-6
        assert 0.5 < _cos(o, e) < 1 - 1e-6  # one step is only an approximation


def test_eval_mode_uses_eval_cap_and_no_grad_path_matches():
    torch.manual_seed(0)
    deq = DEQ(LinearCell(gain=0.9), max_iter=3, eval_max_iter=50, tol=1e-6)
    u = torch.randn(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DEQConvergenceWarning)
        deq(u)
    assert deq.forward_stats.last.iterations == 3
    deq.eval()
    with torch.no_grad():
        z_eval = deq(u)
    assert 3 < deq.forward_stats.last.iterations <= 50 and deq.forward_stats.last.converged
    z_grad = deq(u.requires_grad_())
    assert torch.allclose(z_eval, z_grad.detach())


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="solver must be one of"):
        DEQ(LinearCell(), solver="broyden")
    with pytest.raises(ValueError, match="backward must be"):
        DEQ(LinearCell(), backward="unrolled")
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
        DEQ(LinearCell(), max_iter=0)


def test_autocast_and_low_precision():
    torch.manual_seed(0)
    cell = ConvCell()
    u = torch.randn(2, 4, 6, 6, requires_grad=True)
    deq = DEQ(cell, tol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = deq(u)
    z.float().square().sum().backward()
    assert torch.isfinite(z).all() and torch.isfinite(u.grad).all()
    assert deq.forward_stats.last.converged and deq.backward_stats.last.converged
    half = DEQ(ConvCell().bfloat16(), tol=1e-2)
    assert half(u.detach().bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("loop", ["auto", "early_exit", "masked"])
def test_autocast_injection_from_a_layer_backward_reevaluates_under_autocast(loop):
    # as in LION: u comes out of a layer under autocast (bfloat16) while the cell's weights are
    # float32, so the adjoint's re-evaluation of f must run under the same autocast
    torch.manual_seed(0)
    inject, cell = nn.Linear(6, 6), LinearCell(gain=0.5)
    deq = DEQ(cell, tol=1e-2, backward_tol=1e-2, loop=loop)
    x = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = inject(x)
        assert u.dtype == torch.bfloat16
        z = deq(u)
    z.float().square().sum().backward()
    for p in (*inject.parameters(), *cell.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    ref = torch.autograd.grad(DEQ(cell, tol=1e-6, backward_tol=1e-6)(inject(x)).square().sum(),
                              inject.weight)[0]
    assert _cos(inject.weight.grad.flatten(), ref.flatten()) > 0.98


# ----------------------------------------------------------------------------------------------
# The masked loop: same results as the early-exit loop, compiles whole, exports
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", [anderson, fixed_point_iteration])
def test_masked_loop_gives_the_early_exit_point_and_statistics(solver):
    torch.manual_seed(0)
    cell = ConvCell()
    # samples of very different scale converge at different iterations
    u = torch.randn(3, 4, 6, 6) * torch.tensor([0.1, 1.0, 3.0]).view(3, 1, 1, 1)
    z_exit, s_exit = solver(lambda z: cell(z, u), torch.zeros_like(u), max_iter=60, tol=1e-5)
    z_mask, s_mask = solver(lambda z: cell(z, u), torch.zeros_like(u), max_iter=60, tol=1e-5,
                            masked=True)
    assert s_exit.converged and s_exit.iterations < 60  # the masked loop ran on after this
    assert torch.equal(z_exit, z_mask)
    assert s_exit == s_mask
    assert len(set(s_exit.sample_iterations)) > 1
    assert max(s_exit.sample_iterations) == s_exit.iterations
    # per-sample counts are the first iteration whose residual is below tol: the plain loop
    # from zero, run by hand, must agree
    if solver is fixed_point_iteration:
        z, first = torch.zeros_like(u), [0, 0, 0]
        for k in range(1, s_exit.iterations + 1):
            fz = cell(z, u)
            for i, r in enumerate(relative_residual(fz, z).tolist()):
                first[i] = first[i] or (k if r < 1e-5 else 0)
            z = fz
        assert tuple(first) == s_exit.sample_iterations


def test_masked_loop_not_converged_matches_too():
    torch.manual_seed(0)
    cell = LinearCell(gain=0.95)
    u = torch.randn(4, 6)
    for solver in (anderson, fixed_point_iteration):
        a = solver(lambda z: cell(z, u), torch.zeros_like(u), max_iter=3, tol=1e-12)
        b = solver(lambda z: cell(z, u), torch.zeros_like(u), max_iter=3, tol=1e-12, masked=True)
        assert torch.equal(a[0], b[0]) and a[1] == b[1] and not a[1].converged
        assert a[1].sample_iterations == (3, 3, 3, 3)


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_masked_deq_same_values_gradients_and_counters(backward):
    torch.manual_seed(0)
    cell = ConvCell()
    u = torch.randn(2, 4, 6, 6, requires_grad=True)
    kw = dict(max_iter=30, tol=1e-5, backward_max_iter=30, backward_tol=1e-6, backward=backward)
    results = {}
    for loop in ("early_exit", "masked"):
        deq = DEQ(cell, loop=loop, **kw)
        z = deq(u)
        grads = torch.autograd.grad(z.square().sum(), [u, *cell.parameters()])
        results[loop] = z, grads, deq.stats()
    (z_e, g_e, s_e), (z_m, g_m, s_m) = results["early_exit"], results["masked"]
    assert torch.equal(z_e, z_m)
    for a, b in zip(g_e, g_m):  # the masked adjoint takes vjps with torch.func: same maths
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert s_e.keys() == s_m.keys()
    for k in s_e:
        assert s_e[k] == pytest.approx(s_m[k], rel=1e-5), k
    assert s_m["forward_solves"] == 1 and s_m["forward_last_iterations"] > 1


def test_masked_deq_counts_nonconvergence_and_nonfinite_without_raising():
    deq = DEQ(LinearCell(gain=0.95), max_iter=2, tol=1e-12, loop="masked")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DEQConvergenceWarning)
        deq(torch.randn(3, 6))  # nothing read on the host: no warning yet
    with pytest.warns(DEQConvergenceWarning, match="1 of 1 masked solves"):
        assert deq.forward_stats.nonconverged == 1

    class Blowup(nn.Module):
        def forward(self, z, u):
            return 1e30 * (z + u) ** 3 + u

    bad = DEQ(Blowup(), solver="fixed_point", max_iter=30, loop="masked")
    bad(torch.ones(2, 3))  # counted, not raised (raising would need the host)
    with pytest.warns(DEQConvergenceWarning, match="1 non-finite"):
        assert bad.stats()["forward_nonfinite"] == 1
    bad.reset_stats()
    assert bad.stats()["forward_solves"] == 0
    with pytest.raises(ValueError, match="loop must be one of"):
        DEQ(LinearCell(), loop="while")


def test_masked_deq_compiles_whole_for_training_and_inference_and_exports():
    torch.manual_seed(0)
    cell = ConvCell()
    deq = DEQ(cell, max_iter=4, tol=1e-4, backward_max_iter=4, loop="masked")
    u = torch.randn(2, 4, 6, 6, requires_grad=True)
    params = [u, *cell.parameters()]
    z = deq(u)
    eager = torch.autograd.grad(z.square().sum(), params)
    deq.reset_stats()
    # fullgraph=True: any graph break (a host sync, data-dependent control flow) is an error
    compiled = torch.compile(deq, fullgraph=True, backend="aot_eager")
    z_c = compiled(u)
    grads = torch.autograd.grad(z_c.square().sum(), params)
    assert torch.allclose(z_c, z)
    for a, b in zip(grads, eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert deq.forward_stats.solves == 1 and deq.forward_stats.last.iterations == 4
    deq.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(u), deq(u))
    exported = torch.export.export(deq, (u.detach(),))
    assert torch.allclose(exported.module()(u.detach()), deq(u.detach()))


def test_lion_compiles_whole_in_its_default_configuration():
    """LION as built by default (``solver_loop="auto"``): the whole model trains under
    ``torch.compile(fullgraph=True)`` like in eager (a graph break would be an error), and
    exports; eager keeps stopping early."""
    import timm
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224.lion", img_size=32, depth=1, num_classes=5,
                              peft_cfg=dict(max_iter=6, eval_max_iter=6, backward_max_iter=6,
                                            p2_width=16))
    assert model.peft_config.solver_loop == "auto"
    deqs = list(model.lion.deqs().values())
    assert len(deqs) == 2
    assert all(deq.loop == "auto" for deq in deqs)  # the config reaches both equilibria
    with torch.no_grad():  # non-trivial prompts, so the equilibria take several iterations
        for p in model.lion.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    params = [p for p in model.parameters() if p.requires_grad]

    def step(m):
        return torch.autograd.grad(F.cross_entropy(m(x), y), params)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DEQConvergenceWarning)
        eager = step(model)
        eager_its = [d.forward_stats.iterations for d in deqs]
        compiled = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
        for a, b in zip(compiled, eager):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
        assert any(float(g.abs().max()) > 0 for g in compiled[:-2])  # not just the head
        # eager and compiled solves both counted; the compiled one ran the same iterations
        assert all(d.forward_stats.solves == 2 for d in deqs)
        assert [d.forward_stats.iterations for d in deqs] == [2 * i for i in eager_its]
        model.eval()
        exported = torch.export.export(model, (x,))
        assert torch.allclose(exported.module()(x), model(x), atol=1e-6)


def test_auto_loop_is_early_exit_in_eager_and_masked_when_traced():
    torch.manual_seed(0)
    cell = ConvCell()
    u = torch.randn(2, 4, 6, 6, requires_grad=True)
    params = [u, *cell.parameters()]
    kw = dict(max_iter=40, tol=1e-4, backward_max_iter=40, backward_tol=1e-5)
    auto, exit_ = DEQ(cell, **kw), DEQ(cell, loop="early_exit", **kw)
    assert auto.loop == "auto"
    z = auto(u)
    grads = torch.autograd.grad(z.square().sum(), params)
    z_e = exit_(u)
    assert torch.equal(z, z_e) and auto.forward_stats == exit_.forward_stats
    assert 1 < auto.forward_stats.last.iterations < 40  # stopped early, in eager
    # traced: the masked loop (a host read would be a graph break, an error with fullgraph)
    compiled = torch.compile(auto, fullgraph=True, backend="aot_eager")
    z_c = compiled(u)
    for a, b in zip(torch.autograd.grad(z_c.square().sum(), params), grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert torch.allclose(z_c, z)
    stats = auto.forward_stats  # one eager and one compiled solve, same iterations
    assert stats.solves == 2 and stats.iterations == 2 * exit_.forward_stats.iterations
    exported = torch.export.export(DEQ(cell, **kw).eval(), (u.detach(),))
    assert torch.allclose(exported.module()(u.detach()), z.detach(), atol=1e-6)


def test_vectorised_masked_loop_stops_when_every_sample_has_stopped():
    """Under vmap (route) every sample is its own masked solve, and the loop stops once the
    slowest sample of the whole batch has converged, not at the cap; each sample's result is the
    one it gets alone."""
    from torch.func import vmap
    torch.manual_seed(0)
    cell = ConvCell()
    deq = DEQ(cell, max_iter=200, tol=1e-5).eval()
    calls = []
    cell.register_forward_pre_hook(lambda *_: calls.append(1))
    u = torch.randn(3, 4, 6, 6) * torch.tensor([0.1, 1.0, 3.0]).view(3, 1, 1, 1)
    with torch.no_grad():
        alone = [deq(u[i:i + 1]) for i in range(3)]
        alone_its = [deq.forward_stats.last.iterations]  # the last (slowest) sample
        its = [s.sample_iterations[0] for s in (anderson(lambda z: cell(z, u[i:i + 1]),
                                                         torch.zeros_like(u[i:i + 1]),
                                                         max_iter=200, tol=1e-5)[1]
                                                for i in range(3))]
        calls.clear()
        with deq.vmap_context():
            z = vmap(lambda ui: deq(ui[None])[0])(u)
    assert len(set(its)) > 1 and max(its) < 200
    assert len(calls) == max(its)  # the slowest sample's iterations, not the cap
    for i in range(3):
        torch.testing.assert_close(z[i], alone[i][0], rtol=1e-5, atol=1e-6)
    assert deq.forward_stats.solves == 3 and alone_its  # the vectorised solve is not counted

def test_any_over_batch_reduces_over_the_vectorised_dimension():
    from torch.func import vmap

    from timm_peft.deq import _any_over_batch
    flags = torch.tensor([[False, False], [True, False], [False, False]])
    assert not bool(_any_over_batch(flags[0])) and bool(_any_over_batch(flags[1]))
    seen = []

    def per_sample(f):
        out = _any_over_batch(f)
        seen.append(bool(out))  # unbatched: the host may read it inside vmap
        return f.float().sum() * out

    assert vmap(per_sample)(flags).tolist() == [0.0, 1.0, 0.0]
    assert seen == [True]  # one answer for the whole vectorised batch
    assert vmap(_any_over_batch)(flags[[0, 2]]).tolist() == [False, False]
