"""scan.py against an independent float64 loop written here from the definition (Mamba, eq. 4)."""
import math

import pytest
import torch
import torch.nn.functional as F

import scan
from scan import causal_conv1d, scan_backend, selective_scan, selective_scan_ref


def loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Scalar float64 loop over (batch, channel, time, state): no vectorisation, no shared code."""
    u, delta, A, B, C = (x.double() for x in (u, delta, A, B, C))
    batch, channels, L = u.shape
    N = A.shape[1]
    y = torch.zeros(batch, channels, L, dtype=torch.float64)
    for b in range(batch):
        for d in range(channels):
            g = d // (channels // B.shape[1]) if B.dim() == 4 else None
            h = [torch.zeros((), dtype=torch.float64) for _ in range(N)]
            for t in range(L):
                dt = delta[b, d, t] + (delta_bias[d].double() if delta_bias is not None else 0.0)
                if delta_softplus:
                    dt = torch.log1p(torch.exp(dt))
                out = torch.zeros((), dtype=torch.float64)
                for n in range(N):
                    Bv = B[b, g, n, t] if g is not None else B[b, n, t]
                    Cv = C[b, g, n, t] if g is not None else C[b, n, t]
                    h[n] = torch.exp(dt * A[d, n]) * h[n] + dt * Bv * u[b, d, t]
                    out = out + Cv * h[n]
                if D is not None:
                    out = out + D[d].double() * u[b, d, t]
                if z is not None:
                    zv = z[b, d, t].double()
                    out = out * zv / (1 + torch.exp(-zv))
                y[b, d, t] = out
    return y


def make_inputs(batch=2, channels=4, L=7, N=3, groups=0, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (batch, groups, N, L) if groups else (batch, N, L)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype).requires_grad_(requires_grad)
    return dict(u=r(batch, channels, L), delta=r(batch, channels, L, scale=0.5),
                A=(-torch.rand(channels, N, generator=g) * 2 - 0.1).to(dtype).requires_grad_(requires_grad),
                B=r(*shape_bc), C=r(*shape_bc), D=r(channels), z=r(batch, channels, L),
                delta_bias=r(channels, scale=0.3))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = [
    dict(),
    dict(D=True),
    dict(z=True),
    dict(delta_bias=True, delta_softplus=True),
    dict(D=True, z=True, delta_bias=True, delta_softplus=True),
    dict(D=True, z=True, delta_softplus=True, groups=1),
    dict(D=True, z=True, delta_bias=True, delta_softplus=True, groups=2),
]


def select(inputs, case):
    kw = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    for name in ("D", "z", "delta_bias"):
        kw[name] = inputs[name] if case.get(name) else None
    kw["delta_softplus"] = case.get("delta_softplus", False)
    return kw


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_loop(case):
    inputs = make_inputs(groups=case.get("groups", 0), seed=len(str(case)))
    kw = select(inputs, case)
    y = selective_scan_ref(**kw)
    assert y.dtype == torch.float32 and y.shape == kw["u"].shape
    assert rel_err(y, loop_scan(**kw)) < 1e-5


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6]])
def test_reference_gradients_match_loop(case):
    inputs = make_inputs(groups=case.get("groups", 0), dtype=torch.float64, requires_grad=True, seed=3)
    inputs["D"].requires_grad_(True)
    kw = select(inputs, case)
    grad_out = torch.randn(kw["u"].shape, dtype=torch.float64)
    leaves = [v for v in kw.values() if isinstance(v, torch.Tensor)]
    ours = torch.autograd.grad((selective_scan_ref(**kw) * grad_out).sum(), leaves)
    theirs = torch.autograd.grad((loop_scan(**kw) * grad_out).sum(), leaves)
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) < 1e-10


def test_reference_gradcheck():
    inputs = make_inputs(batch=1, channels=2, L=4, N=2, dtype=torch.float64, requires_grad=True, seed=5)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for name in names:
        inputs[name].requires_grad_(True)

    def f(*args):
        return selective_scan_ref(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True)
    assert torch.autograd.gradcheck(f, [inputs[n] for n in names])


def test_reference_keeps_input_dtype_and_float32_state():
    inputs = make_inputs(dtype=torch.bfloat16, seed=7)
    kw = select(inputs, CASES[4])
    y = selective_scan_ref(**kw)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, loop_scan(**kw)) < 1e-2  # only the output is rounded to bfloat16


def test_last_state_is_the_final_recurrence_state():
    inputs = make_inputs(L=5, seed=11)
    kw = select(inputs, CASES[0])
    _, last = selective_scan_ref(**kw, return_last_state=True)
    # With C = one-hot on state n at the last step, y_{L-1} reads h_{L-1}[n] directly.
    for n in range(kw["A"].shape[1]):
        C = torch.zeros_like(kw["C"])
        C[:, n, -1] = 1
        y = loop_scan(**{**kw, "C": C})
        assert torch.allclose(last[:, :, n].double(), y[:, :, -1], atol=1e-5)


def test_causal_conv1d_matches_loop():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 3, 9, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    expected = torch.zeros(2, 3, 9)
    for t in range(9):
        for k in range(4):  # tap k sees input t - 3 + k
            if t - 3 + k >= 0:
                expected[:, :, t] += w[:, k] * x[:, :, t - 3 + k]
    expected += b[:, None]
    assert torch.allclose(causal_conv1d(x, w, b, silu=False), expected, atol=1e-5)
    assert torch.allclose(causal_conv1d(x, w, b), F.silu(expected), atol=1e-5)


def test_backend_selection_on_cpu(monkeypatch):
    monkeypatch.delenv("DIS_SCAN_BACKEND", raising=False)
    assert scan_backend("cpu") == "ref"
    monkeypatch.setenv("DIS_SCAN_BACKEND", "mamba")
    with pytest.raises(RuntimeError, match="not available"):
        scan_backend("cpu")
    with pytest.raises(RuntimeError, match="not available"):
        scan_backend("cpu", backend="triton")
    with pytest.raises(ValueError, match="unknown scan backend"):
        scan_backend("cpu", backend="cuda-magic")
    monkeypatch.setenv("DIS_SCAN_BACKEND", "ref")
    inputs = make_inputs(seed=2)
    kw = select(inputs, CASES[4])
    assert torch.equal(selective_scan(**kw), selective_scan_ref(**kw))


def dis_shape_inputs(dtype, batch=2, channels=736, L=257, N=16, seed=0):
    """Inputs like one DiS-S/2 scan direction (scaled down in batch) on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)
    A = -torch.arange(1, N + 1, device="cuda", dtype=torch.float32).repeat(channels, 1)
    dt = torch.exp(torch.rand(channels, generator=g, device="cuda") * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(u=r(batch, channels, L), delta=r(batch, channels, L, scale=0.1), A=A,
                B=r(batch, N, L), C=r(batch, N, L), D=torch.ones(channels, device="cuda"), z=r(batch, channels, L),
                delta_bias=dt + torch.log(-torch.expm1(-dt)), delta_softplus=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["mamba", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backend_matches_reference(backend, dtype):
    if backend not in scan.available_backends("cuda"):
        pytest.skip(f"{backend} backend not installed")
    kw = dis_shape_inputs(dtype)
    leaves = {k: v.requires_grad_(True) for k, v in kw.items() if isinstance(v, torch.Tensor)}
    grad_out = torch.randn_like(kw["u"])
    y_ref = selective_scan_ref(**kw)
    g_ref = torch.autograd.grad((y_ref.float() * grad_out).sum(), list(leaves.values()))
    y = selective_scan(**kw, backend=backend)
    g = torch.autograd.grad((y.float() * grad_out).sum(), list(leaves.values()))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(y, y_ref) < tol
    for name, a, b in zip(leaves, g, g_ref):
        assert rel_err(a, b) < tol, name
