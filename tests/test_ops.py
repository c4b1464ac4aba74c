"""Memory-lean operations (timm_peft.ops) against the plain formulations they replace."""
import pytest
import torch
import torch.nn.functional as F

from timm_peft.ops import (floor_magnitude, kv_prompt_attention, linear_scale_shift, prompted_qkv,
                           scale_shift)


def _saved_storages(fn):
    """Storage pointers of every tensor autograd saves while running ``fn()``."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


# ----------------------------------------------------------------------------------------------
# scale_shift
# ----------------------------------------------------------------------------------------------

CASES = [((4, 6), -1), ((2, 5, 6), -1), ((2, 6, 3, 3), 1), ((2, 3, 3, 6), -1), ((3, 6), 1)]


@pytest.mark.parametrize("shape,dim", CASES)
@pytest.mark.parametrize("with_shift", [True, False])
def test_scale_shift_matches_autograd_of_the_formula(shape, dim, with_shift):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    gamma = (1 + 0.3 * torch.randn(shape[dim])).requires_grad_()
    beta = torch.randn(shape[dim], requires_grad=True) if with_shift else None
    bshape = [1] * len(shape)
    bshape[dim] = -1
    ref = x * gamma.view(bshape) + (0 if beta is None else beta.view(bshape))
    out = scale_shift(x, gamma, beta, dim=dim)
    assert torch.allclose(out, ref, atol=1e-6)
    w = torch.randn(shape)
    params = [x, gamma] + ([beta] if with_shift else [])
    for a, b in zip(torch.autograd.grad((out * w).sum(), params),
                    torch.autograd.grad((ref * w).sum(), params)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,dim", CASES[:3])
def test_scale_shift_gradcheck_float64(shape, dim):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    gamma = (1 + 0.3 * torch.randn(shape[dim], dtype=torch.float64))
    gamma = (gamma * torch.where(torch.arange(shape[dim]) % 2 == 0, 1.0, -1.0)).requires_grad_()
    beta = torch.randn(shape[dim], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, g, b: scale_shift(a, g, b, dim=dim),
                                    (x, gamma, beta))
    assert torch.autograd.gradcheck(lambda a, g: scale_shift(a, g, None, dim=dim), (x, gamma))


def test_scale_shift_saves_its_output_not_its_input():
    x = torch.randn(4, 8, 6, requires_grad=True)
    gamma, beta = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    out, saved = _saved_storages(lambda: scale_shift(x, gamma, beta))
    big = [p for p in saved if p not in (gamma.untyped_storage().data_ptr(),
                                         beta.untyped_storage().data_ptr())]
    assert x.untyped_storage().data_ptr() not in saved
    assert out.untyped_storage().data_ptr() in saved
    # the reference formula keeps the input: what the op is there to avoid
    _, ref_saved = _saved_storages(lambda: x * gamma + beta)
    assert x.untyped_storage().data_ptr() in ref_saved
    assert len(big) == 2  # the output and the floored γ (a small new tensor)


#: what code after a site may do to its output in place (each a function of the output)
WRITES = {
    "relu_": lambda y: y.relu_(),
    "F.relu inplace": lambda y: F.relu(y, inplace=True),
    "F.relu inplace positional": lambda y: F.relu(y, True),
    "F.dropout inplace": lambda y: F.dropout(y, 0.5, True, True),
    "+=": lambda y: y.__iadd__(1.5),
    "mul_ on a view": lambda y: (y.view(-1)[:5].mul_(3.0), y)[1],
    "setitem": lambda y: (y.__setitem__((Ellipsis, 0), 7.0), y)[1],
    "transpose then add_": lambda y: (y.transpose(0, -1).add_(2.0), y)[1],
    "narrow then sigmoid_": lambda y: (y.narrow(0, 0, 1).sigmoid_(), y)[1],
    "aten add_": lambda y: torch.ops.aten.add_.Tensor(y, 1.0),
    "out= without grad": lambda y: _no_grad(lambda: torch.mul(y, 2.0, out=y), y),
    "copy_": lambda y: y.copy_(torch.ones_like(y)),
    "detach then add_": lambda y: (y.detach().add_(1.0), y)[1],
    "twice": lambda y: y.add_(1.0).relu_(),
}


def _no_grad(fn, y):
    with torch.no_grad():
        fn()
    return y


def _site_and_reference(kind, x, gamma, beta, w=None, b=None, r=None):
    """(fused op, plain autograd formula) of a site."""
    shape = [1] * (x.ndim - 1) + [-1]
    if kind == "scale_shift":
        return scale_shift(x, gamma, beta), x * gamma.view(shape) + beta.view(shape)
    ref = F.linear(x, w, b) * gamma + beta
    fused = linear_scale_shift(x, w, b, gamma, beta, residual=r)
    return fused, ref if r is None else r + ref


@pytest.mark.parametrize("kind", ["scale_shift", "linear", "linear_residual"])
@pytest.mark.parametrize("write", list(WRITES))
def test_an_output_written_in_place_keeps_exact_gradients(kind, write):
    """Whatever overwrites a site's saved output in place (an in-place activation, ``+=``, a
    view written in place, ``out=``, an aten operator), backward neither fails nor uses the
    written value: every gradient equals plain autograd's of the formula followed by the same
    write."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, requires_grad=True)
    gamma = (1 + 0.3 * torch.randn(6)).requires_grad_()
    beta = torch.randn(6, requires_grad=True)
    w, b = torch.randn(6, 6), torch.randn(6)
    r = torch.randn(3, 4, 6, requires_grad=True) if kind == "linear_residual" else None
    params = [x, gamma, beta] + ([r] if r is not None else [])
    probe = torch.randn(3, 4, 6)
    grads = []
    for which in (0, 1):
        torch.manual_seed(1)  # the same dropout mask
        out = _site_and_reference(kind.split("_")[0] if kind != "scale_shift" else kind,
                                  x, gamma, beta, w, b, r)[which]
        if which == 1:
            out = out.clone()  # the formula's own output is a plain tensor autograd saves
        y = WRITES[write](out)
        grads.append(torch.autograd.grad((y * probe).sum(), params))
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_an_output_nobody_writes_keeps_no_copy_and_a_written_one_keeps_one():
    """The memory-saving path stays: unwritten, the saved output is the output itself; written,
    one copy of it (what the plain path would have saved) and nothing more."""
    from timm_peft.ops import SavedOutput
    x = torch.randn(4, 8, 6, requires_grad=True)
    gamma, beta = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    y = scale_shift(x, gamma, beta)
    assert isinstance(y, SavedOutput) and y._peft_kept.value is None
    z = F.gelu(y)  # read, not written
    assert type(z) is torch.Tensor and y._peft_kept.value is None
    view = y[:, 1:]
    assert isinstance(view, SavedOutput) and view._peft_kept is y._peft_kept
    view.relu_()
    kept = y._peft_kept.value
    assert kept is not None and kept.shape == y.shape
    assert kept.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()
    y.add_(1.0)  # a second write keeps nothing more
    assert y._peft_kept.value is kept
    with torch.no_grad():  # inference: a plain tensor, no guard
        assert type(scale_shift(x, gamma, beta)) is torch.Tensor


def test_an_output_written_in_place_under_compile_keeps_exact_gradients():
    """Compiled, the graph is functional: the saved output is not the written one."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, requires_grad=True)
    gamma, beta = (1 + 0.3 * torch.randn(6)).requires_grad_(), torch.randn(6, requires_grad=True)

    def f(x, g, b):
        y = scale_shift(x, g, b)
        y.relu_()
        return (y * torch.arange(6.0)).sum()

    def ref(x, g, b):
        return ((x * g + b).relu() * torch.arange(6.0)).sum()
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(
        x, gamma, beta), [x, gamma, beta])
    want = torch.autograd.grad(ref(x, gamma, beta), [x, gamma, beta])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_scale_shift_floors_tiny_scales_and_passes_their_gradient_through():
    x = torch.randn(5, 3)
    gamma = torch.tensor([1e-6, -1e-6, 0.5], requires_grad=True)
    beta = torch.tensor([1.0, 2.0, 3.0])
    y = scale_shift(x, gamma, beta, min_scale=1e-3)
    g = floor_magnitude(gamma.detach(), 1e-3)
    assert g.tolist() == pytest.approx([1e-3, -1e-3, 0.5])
    assert torch.allclose(y, x * g + beta)
    y.sum().backward()
    # straight through the floor: the gradient of γ̃ ⊙ x + β with respect to γ̃
    assert torch.allclose(gamma.grad, x.sum(0), rtol=1e-3, atol=1e-3)


def test_scale_shift_low_precision_and_compile():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, dtype=torch.bfloat16, requires_grad=True)
    gamma = (1 + 0.1 * torch.randn(6)).requires_grad_()
    beta = torch.randn(6, requires_grad=True)
    y = scale_shift(x, gamma, beta)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert gamma.grad.dtype == torch.float32 and beta.grad.dtype == torch.float32
    ref = (x.detach().float() * gamma.detach() + beta.detach())
    assert torch.allclose(y.float(), ref, atol=3e-2)
    xf = x.detach().float().requires_grad_()
    compiled = torch.compile(scale_shift, fullgraph=True, backend="aot_eager")
    out = compiled(xf, gamma, beta)
    assert torch.allclose(out, xf * gamma + beta, atol=1e-6)
    out.sum().backward()
    assert torch.allclose(xf.grad, gamma.detach().expand(4, 8, 6))


def test_scale_shift_bad_arguments_are_explained():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="dim must be 1"):
        scale_shift(x, torch.ones(3), dim=2)
    with pytest.raises(ValueError, match=r"shape \(x.shape\[-1\],\) = \(4,\)"):
        scale_shift(x, torch.ones(3))
    with pytest.raises(ValueError, match="min_scale must be > 0"):
        scale_shift(x, torch.ones(4), min_scale=0.0)


# ----------------------------------------------------------------------------------------------
# linear_scale_shift
# ----------------------------------------------------------------------------------------------

def _linear_case(shape, with_bias, with_shift, dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(*shape, 5, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 5, dtype=dtype)
    b = torch.randn(6, dtype=dtype) if with_bias else None
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=dtype)  # negative γ too
    gamma = ((1 + 0.3 * torch.randn(6, dtype=dtype)) * sign).requires_grad_()
    beta = torch.randn(6, dtype=dtype, requires_grad=True) if with_shift else None
    return x, w, b, gamma, beta


@pytest.mark.parametrize("shape", [(4,), (2, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_shift", [True, False])
def test_linear_scale_shift_matches_autograd_of_the_formula(shape, with_bias, with_shift):
    """Against plain autograd of ``F.linear(x, W, b) * γ + β``: output and the gradients of x, γ
    and β."""
    x, w, b, gamma, beta = _linear_case(shape, with_bias, with_shift)
    ref = F.linear(x, w, b) * gamma + (0 if beta is None else beta)
    out = linear_scale_shift(x, w, b, gamma, beta)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    probe = torch.randn(out.shape)
    params = [x, gamma] + ([beta] if with_shift else [])
    for a, r in zip(torch.autograd.grad((out * probe).sum(), params),
                    torch.autograd.grad((ref * probe).sum(), params)):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference: the folded matmul without autograd
        assert torch.allclose(linear_scale_shift(x, w, b, gamma, beta), ref, rtol=1e-5, atol=1e-5)


def test_linear_scale_shift_gradcheck_float64():
    x, w, b, gamma, beta = _linear_case((2, 3), True, True, torch.float64)
    assert torch.autograd.gradcheck(lambda a, g, s: linear_scale_shift(a, w, b, g, s),
                                    (x, gamma, beta))


def test_linear_scale_shift_saves_only_its_output():
    x, w, b, gamma, beta = _linear_case((3, 4), True, True)
    out, saved = _saved_storages(lambda: linear_scale_shift(x, w, b, gamma, beta))
    big = [p for p in saved if p not in (w.untyped_storage().data_ptr(),
                                         beta.untyped_storage().data_ptr())]
    assert x.untyped_storage().data_ptr() not in saved
    assert out.untyped_storage().data_ptr() in saved
    assert len(big) == 2  # the output and the floored γ
    # the reference keeps the Linear's output (for γ's gradient)
    _, ref_saved = _saved_storages(lambda: F.linear(x, w, b) * gamma + beta)
    assert len([p for p in ref_saved if p != w.untyped_storage().data_ptr()]) >= 2


@pytest.mark.parametrize("with_shift", [True, False])
@pytest.mark.parametrize("with_layer_scale", [False, True])
def test_linear_scale_shift_with_residual_matches_autograd_and_saves_nothing_new(
        with_shift, with_layer_scale):
    """``r + λ ⊙ (γ ⊙ (x Wᵀ + b) + β)`` against plain autograd (gradients of x, r, γ, β), and
    what it saves: the sum (its output) and ``r`` (its input), no tensor of its own."""
    x, w, b, gamma, beta = _linear_case((2, 7), True, with_shift)
    lam = torch.randn(w.shape[0]) * torch.logspace(-3, 0, w.shape[0]) if with_layer_scale \
        else None
    r = (10 * torch.randn(2, 7, w.shape[0])).requires_grad_()  # a residual stream larger than y
    branch = F.linear(x, w, b) * gamma + (0 if beta is None else beta)
    ref = r + (branch if lam is None else lam * branch)
    out, saved = _saved_storages(lambda: linear_scale_shift(x, w, b, gamma, beta, residual=r,
                                                            layer_scale=lam))
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    acts = {p for p in saved if p not in (w.untyped_storage().data_ptr(),)} - {
        t.untyped_storage().data_ptr() for t in (gamma, beta, lam) if t is not None}
    assert out.untyped_storage().data_ptr() in acts and r.untyped_storage().data_ptr() in acts
    assert x.untyped_storage().data_ptr() not in acts
    assert len(acts) == 3  # the output, r and the floored γ
    probe = torch.randn(out.shape)
    params = [x, r, gamma] + ([beta] if with_shift else [])
    for a, e in zip(torch.autograd.grad((out * probe).sum(), params),
                    torch.autograd.grad((ref * probe).sum(), params)):
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-5)
    x64, w64, b64, g64, s64 = _linear_case((2, 3), True, with_shift, torch.float64)
    r64 = torch.randn(2, 3, w64.shape[0], dtype=torch.float64, requires_grad=True)
    lam64 = None if lam is None else torch.rand(w64.shape[0], dtype=torch.float64) - 0.5
    assert torch.autograd.gradcheck(
        lambda a, rr, g, *s: linear_scale_shift(a, w64, b64, g, s[0] if s else None,
                                                residual=rr, layer_scale=lam64),
        (x64, r64, g64) + ((s64,) if with_shift else ()))


@pytest.mark.parametrize("with_shift", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_scale_shift_with_drop_path_matches_timm_and_saves_nothing_new(with_shift, dtype):
    """``r + drop_path(λ ⊙ (γ ⊙ (x Wᵀ + b) + β))`` with timm's own drop_path under the same seed:
    the same mask (dropped samples included), gradients of x, r, γ, β equal plain autograd's,
    and in float32 still nothing saved but the sum and r (bfloat16 sums save y, as without)."""
    from timm.layers import drop_path
    x, w, b, gamma, beta = _linear_case((8, 7), True, with_shift)
    x, w, b = x.detach().to(dtype).requires_grad_(), w.to(dtype), b.to(dtype)
    lam = torch.randn(w.shape[0]) * torch.logspace(-2, 0, w.shape[0])
    r = (10 * torch.randn(8, 7, w.shape[0])).to(dtype).requires_grad_()
    torch.manual_seed(3)
    out, saved = _saved_storages(lambda: linear_scale_shift(
        x, w, b, gamma, beta, residual=r, layer_scale=lam, drop_prob=0.5))
    torch.manual_seed(3)
    branch = (F.linear(x.float(), w.float(), b.float()) * gamma + (0 if beta is None else beta))
    ref = r.float() + drop_path((lam * branch).to(dtype), 0.5, training=True).float()
    dropped = (ref - r.float()).flatten(1).abs().amax(1) == 0
    assert 0 < dropped.sum() < 8  # some samples dropped, some kept
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.1)
    torch.testing.assert_close(out.float(), ref, **tol)
    if dtype == torch.float32:
        acts = set(saved) - {t.untyped_storage().data_ptr()
                             for t in (w, gamma, beta, lam) if t is not None}
        assert x.untyped_storage().data_ptr() not in acts
        assert {out.untyped_storage().data_ptr(), r.untyped_storage().data_ptr()} <= acts
    probe = torch.randn(out.shape)
    params = [x, r, gamma] + ([beta] if with_shift else [])
    for a, e in zip(torch.autograd.grad((out.float() * probe).sum(), params),
                    torch.autograd.grad((ref * probe).sum(), params)):
        torch.testing.assert_close(a.float(), e.float(), **tol)


@pytest.mark.parametrize("drop_prob", [0.0, 0.5])
def test_scale_shift_into_a_residual_matches_timm_and_saves_nothing_new(drop_prob):
    """``r + drop_path(γ ⊙ x + β)`` (an SSF applied at a residual add): the output and the
    gradients of x, r, γ, β equal plain autograd's with timm's drop_path under the same seed,
    and what it saves is the sum and r, no tensor of its own; a bfloat16 sum saves y."""
    from timm.layers import drop_path
    torch.manual_seed(0)
    x = torch.randn(8, 5, 6, requires_grad=True)
    r = (10 * torch.randn(8, 5, 6)).requires_grad_()
    gamma = (1 + 0.3 * torch.randn(6)).requires_grad_()
    beta = torch.randn(6, requires_grad=True)
    torch.manual_seed(3)
    out, saved = _saved_storages(lambda: scale_shift(x, gamma, beta, residual=r,
                                                     drop_prob=drop_prob))
    torch.manual_seed(3)
    ref = r + drop_path(x * gamma + beta, drop_prob, training=True)
    torch.testing.assert_close(out, ref)
    acts = set(saved) - {t.untyped_storage().data_ptr() for t in (gamma, beta)}
    assert x.untyped_storage().data_ptr() not in acts
    assert {out.untyped_storage().data_ptr(), r.untyped_storage().data_ptr()} <= acts
    assert len(acts) == 3  # the sum, r and the floored γ
    probe = torch.randn(out.shape)
    for a, e in zip(torch.autograd.grad((out * probe).sum(), [x, r, gamma, beta]),
                    torch.autograd.grad((ref * probe).sum(), [x, r, gamma, beta])):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    xb, rb = x.detach().bfloat16().requires_grad_(), r.detach().bfloat16()
    out_b, saved_b = _saved_storages(lambda: scale_shift(xb, gamma, beta, residual=rb))
    assert rb.untyped_storage().data_ptr() not in saved_b
    g, = torch.autograd.grad(out_b.float().sum(), [gamma])
    torch.testing.assert_close(g, xb.float().sum((0, 1)), rtol=0.02, atol=0.5)


def test_drop_path_needs_a_residual():
    x, w, b, gamma, beta = _linear_case((4,), True, True)
    with pytest.raises(ValueError, match="drop_prob goes with a residual"):
        linear_scale_shift(x, w, b, gamma, beta, drop_prob=0.1)
    with pytest.raises(ValueError, match="scale_shift: drop_prob goes with a residual"):
        scale_shift(torch.randn(2, gamma.numel()), gamma, beta, drop_prob=0.1)


def test_linear_scale_shift_with_a_low_precision_sum_saves_its_output():
    """A bfloat16 sum would lose y to cancellation against r, so y is saved instead."""
    x, w, b, gamma, beta = _linear_case((2, 7), True, True)
    x, r = x.detach().bfloat16().requires_grad_(), torch.randn(2, 7, w.shape[0]).bfloat16()
    out, saved = _saved_storages(lambda: linear_scale_shift(x, w.bfloat16(), b.bfloat16(), gamma,
                                                            beta, residual=r))
    assert out.dtype == torch.bfloat16 and r.untyped_storage().data_ptr() not in saved
    ref = r.float() + F.linear(x.float(), w, b) * gamma + beta
    assert torch.allclose(out.float(), ref, rtol=0.05, atol=0.05)
    g, = torch.autograd.grad(out.float().sum(), [gamma])
    g_ref, = torch.autograd.grad(ref.sum(), [gamma])
    assert torch.allclose(g, g_ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("shape,dim", CASES)
@pytest.mark.parametrize("with_shift", [True, False])
def test_affine_grads_fused_and_plain_reductions_agree(shape, dim, with_shift):
    """γ's and β's gradients from the output: the batch-norm kernel (CPU) and the plain
    reductions (other devices, whose kernel needs more arguments) against the formula."""
    from timm_peft.ops import _affine_grads
    torch.manual_seed(0)
    x, g = torch.randn(shape), torch.randn(shape)
    gamma = torch.randn(shape[dim]).sign() * (0.5 + torch.rand(shape[dim]))
    beta = torch.randn(shape[dim]) if with_shift else None
    bshape = [1] * len(shape)
    bshape[dim] = -1
    y = x * gamma.view(bshape) + (0 if beta is None else beta.view(bshape))
    dims = [d for d in range(len(shape)) if d != dim % len(shape)]
    want = ((g * x).sum(dims), g.sum(dims))
    for fused in (True, False):
        got = _affine_grads(g, y, gamma, beta, dim, True, beta is not None, fused=fused)
        assert torch.allclose(got[0], want[0], rtol=1e-4, atol=1e-4), (fused, got[0], want[0])
        assert got[1] is None if beta is None else torch.allclose(got[1], want[1], atol=1e-4)


def test_linear_scale_shift_trains_a_weight_that_requires_grad():
    """A trainable W or b (SSF next to another method) takes plain autograd: W gets its gradient."""
    x, w, b, gamma, beta = _linear_case((4,), True, True)
    w.requires_grad_()
    out = linear_scale_shift(x, w, b, gamma, beta)
    ref = F.linear(x, w, b) * gamma + beta
    got, want = (torch.autograd.grad(o.sum(), [w, gamma]) for o in (out, ref))
    assert all(torch.allclose(a, r, rtol=1e-5, atol=1e-5) for a, r in zip(got, want))


def test_linear_scale_shift_bad_shapes_are_explained():
    with pytest.raises(ValueError, match=r"shape \(out_features,\) = \(6,\)"):
        linear_scale_shift(torch.randn(2, 5), torch.randn(6, 5), None, torch.ones(5))


# ----------------------------------------------------------------------------------------------
# key-value prompts
# ----------------------------------------------------------------------------------------------

def _reference(qkv, heads, pk, pv, **kw):
    """E²VPT's formulation: timm's q, k, v, then the prompts concatenated to k and to v."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    k = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2)
    v = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _inputs(dtype=torch.float32, B=2, N=7, H=3, T=4, d=8):
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * d, dtype=dtype, requires_grad=True)
    pk = torch.randn(H, T, d, dtype=dtype, requires_grad=True)
    pv = torch.randn(H, T, d, dtype=dtype, requires_grad=True)
    return qkv, H, pk, pv


def _masks(N=7, T=4):
    torch.manual_seed(1)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    boolean = torch.cat([torch.ones(N, T, dtype=torch.bool), causal], 1)
    additive = torch.randn(2, 1, N, T + N)
    return [None, boolean, additive]


@pytest.mark.parametrize("mask", range(3))
def test_kv_prompt_attention_matches_sdpa_on_concatenated_kv(mask):
    qkv, H, pk, pv = _inputs()
    attn_mask = _masks()[mask]
    out = kv_prompt_attention(qkv, H, pk, pv, attn_mask=attn_mask)
    ref = _reference(qkv, H, pk, pv, attn_mask=attn_mask)
    assert out.shape == ref.shape == (2, 3, 7, 8)
    assert torch.allclose(out, ref, atol=1e-6)
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * w).sum(), [qkv, pk, pv]),
                    torch.autograd.grad((ref * w).sum(), [qkv, pk, pv])):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_kv_prompt_attention_gradcheck_float64():
    qkv, H, pk, pv = _inputs(torch.float64, B=2, N=3, H=2, T=2, d=3)
    mask = torch.randn(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b, c: kv_prompt_attention(a, H, b, c, attn_mask=mask, scale=0.7), (qkv, pk, pv))


def test_prompted_qkv_makes_one_copy_that_q_k_and_v_share():
    qkv, H, pk, pv = _inputs()
    q, k, v = prompted_qkv(qkv, H, pk, pv)
    ptr = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    assert len(ptr) == 1 and qkv.untyped_storage().data_ptr() not in ptr
    rq, rk, rv = qkv.detach().reshape(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)
    assert torch.equal(q, rq) and torch.equal(k[:, :, 4:], rk) and torch.equal(v[:, :, 4:], rv)
    assert torch.equal(k[0, :, :4], pk) and torch.equal(v[1, :, :4], pv)
    # what attention keeps for backward lives in that one buffer (and the small prompts)
    _, saved = _saved_storages(lambda: kv_prompt_attention(qkv, H, pk, pv))
    assert qkv.untyped_storage().data_ptr() not in saved
    assert max(saved.count(p) for p in saved) == 3  # q, k and v: one storage
    _, ref_saved = _saved_storages(lambda: _reference(qkv, H, pk, pv))
    assert qkv.untyped_storage().data_ptr() in ref_saved  # q keeps the qkv output alive


def test_kv_prompt_attention_compiles_and_bad_shapes_are_explained():
    qkv, H, pk, pv = _inputs()
    compiled = torch.compile(kv_prompt_attention, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(qkv, H, pk, pv), _reference(qkv, H, pk, pv), atol=1e-6)
    with pytest.raises(ValueError, match="qkv must be"):
        prompted_qkv(qkv[..., :-1], H, pk, pv)
    with pytest.raises(ValueError, match=r"\(heads, T, head_dim\) = \(3, T, 8\)"):
        prompted_qkv(qkv, H, pk[:, :, :4], pv)


# ----------------------------------------------------------------------------------------------
# attention from a packed qkv
# ----------------------------------------------------------------------------------------------

def _unfused(qkv, heads, scale, bias):
    """timm's unfused attention: q·scale @ kᵀ, + bias, softmax, @ v."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1)
    return ((attn if bias is None else attn + bias).softmax(-1)) @ v


@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_attention_matches_unfused_attention_and_saves_qkv_and_probabilities(with_bias):
    from timm_peft.ops import packed_attention
    torch.manual_seed(0)
    qkv = torch.randn(4, 7, 3 * 2 * 8, requires_grad=True)
    bias = torch.randn(4, 2, 7, 7) if with_bias else None
    out, saved = _saved_storages(lambda: packed_attention(qkv, 2, 0.3, bias))
    ref, ref_saved = _saved_storages(lambda: _unfused(qkv, 2, 0.3, bias))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    probe = torch.randn(ref.shape)
    for a, b in zip(torch.autograd.grad((out * probe).sum(), qkv),
                    torch.autograd.grad((ref * probe).sum(), qkv)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(set(saved)) == 2 and qkv.untyped_storage().data_ptr() in saved
    assert qkv.untyped_storage().data_ptr() not in ref_saved  # timm's matmuls save copies
    assert len(set(ref_saved)) >= 4
    q64 = qkv.detach()[:2].double().requires_grad_()
    b64 = None if bias is None else bias[:2].double()
    assert torch.autograd.gradcheck(lambda t: packed_attention(t, 2, 0.3, b64), (q64,))


def test_packed_attention_bad_arguments_are_explained():
    from timm_peft.ops import packed_attention
    with pytest.raises(ValueError, match="qkv must be"):
        packed_attention(torch.randn(2, 3, 10), 2, 0.5)
    with pytest.raises(ValueError, match="bias gets no gradient"):
        packed_attention(torch.randn(2, 3, 12), 2, 0.5, torch.zeros(3, 3, requires_grad=True))


# ----------------------------------------------------------------------------------------------
# conv_scale_shift
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 1, 3),
                                                           (1, 2, 2, 6)])
def test_conv_scale_shift_matches_conv_then_map_and_saves_only_its_output(stride, padding,
                                                                        dilation, groups):
    """One convolution with γ, β folded in: the same values and gradients as the frozen conv
    followed by γ ⊙ y + β, and autograd keeps its output only (a frozen conv saves its input)."""
    from timm_peft.ops import conv_scale_shift
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, 3, stride, padding, dilation, groups).requires_grad_(False)
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    g = (torch.rand(6) + 0.5).requires_grad_()
    b = torch.randn(6, requires_grad=True)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    out, saved = _saved_storages(lambda: conv_scale_shift(x, conv.weight, conv.bias, g, b, *args))
    ref, ref_saved = _saved_storages(lambda: conv(x) * g[:, None, None] + b[:, None, None])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    probe = torch.randn(ref.shape)
    for a, r in zip(torch.autograd.grad((out * probe).sum(), (x, g, b)),
                    torch.autograd.grad((ref * probe).sum(), (x, g, b))):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    params = {p.untyped_storage().data_ptr() for p in (conv.weight, g, b)}
    # the output and γ̃ (γ with its magnitude floored: six numbers), not the input
    assert out.untyped_storage().data_ptr() in saved and len(set(saved) - params) == 2
    assert x.untyped_storage().data_ptr() not in saved
    assert x.untyped_storage().data_ptr() in ref_saved
    with torch.no_grad():  # inference: the merged model's convolution
        torch.testing.assert_close(conv_scale_shift(x, conv.weight, conv.bias, g, b, *args), ref,
                                   rtol=1e-5, atol=1e-5)
    x64, g64, b64 = (t.detach().double().requires_grad_() for t in (x, g, b))
    w64, c64 = conv.weight.double(), conv.bias.double()
    assert torch.autograd.gradcheck(
        lambda *t: conv_scale_shift(t[0], w64, c64, t[1], t[2], *args), (x64, g64, b64))


def test_conv_scale_shift_bad_arguments_are_explained():
    from timm_peft.ops import conv_scale_shift
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"shape \(out,\)"):
        conv_scale_shift(torch.randn(1, 3, 5, 5), w, None, torch.ones(3))
    with pytest.raises(ValueError, match="padding must be numbers"):
        conv_scale_shift(torch.randn(1, 3, 5, 5), w, None, torch.ones(4), padding="same")
