"""scan.py against independent oracles written here from the definitions: a scalar float64 loop
for the selective scan (Mamba, eq. 4) and a loop over taps for the two convolutions.

The loop checks `selective_scan_ref`; `selective_scan_ref` in float64 (`bimamba_oracle` for DiS's
two directions) is then the oracle of every other implementation (the "ref" backend's chunked
scan here, the Triton and CUDA kernels in their test files).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import scan
from scan import biconv_silu, bimamba_scan, mixer_input, resolve_backend, selective_scan, selective_scan_ref


# ------------------------------------------------------------------------------------------------
# Oracles
# ------------------------------------------------------------------------------------------------
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


def bimamba_oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """DiS's two directions in float64 from selective_scan_ref: token-major (batch, L, ND, .)
    arguments as bimamba_scan takes them; direction 1 scans the flipped sequence, flipped back.
    Returns (batch, L, E) float64."""
    y = 0
    for d in range(u.shape[2]):
        flip = (lambda x: x.flip(-1)) if d == 1 else (lambda x: x)
        mamba_layout = lambda x: None if x is None else flip(x.double().transpose(1, 2))  # noqa: E731
        y_d = selective_scan_ref(mamba_layout(u[:, :, d]), mamba_layout(delta[:, :, d]), A[d].double(),
                                 mamba_layout(B[:, :, d]), mamba_layout(C[:, :, d]),
                                 None if D is None else D[d].double(), mamba_layout(z),
                                 None if delta_bias is None else delta_bias[d].double(), delta_softplus)
        y = y + flip(y_d).transpose(1, 2)
    return y


def loop_biconv(x, weight, bias):
    """The mixer's two depthwise convolutions + SiLU by a loop over time and taps, in x's dtype:
    x (batch, L, E), weight (2, E, W), bias (2, E) -> (batch, L, 2, E). Output t of direction 0
    reads x[t - (W-1) + k] with tap k (causal), of direction 1 x[t + (W-1) - k] (anti-causal)."""
    batch, L, E = x.shape
    W = weight.shape[-1]
    out = []
    for t in range(L):
        pre = [bias[0], bias[1]]
        for k in range(W):
            for d, s in ((0, t - (W - 1) + k), (1, t + (W - 1) - k)):
                if 0 <= s < L:
                    pre[d] = pre[d] + weight[d, :, k] * x[:, s]
        out.append(torch.stack([F.silu(p.expand(batch, E)) for p in pre], dim=1))
    return torch.stack(out, dim=1)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def make_inputs(batch=2, channels=4, L=7, N=3, groups=0, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (batch, groups, N, L) if groups else (batch, N, L)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype).requires_grad_(requires_grad)
    return dict(u=r(batch, channels, L), delta=r(batch, channels, L, scale=0.5),
                A=(-torch.rand(channels, N, generator=g) * 2 - 0.1).to(dtype).requires_grad_(requires_grad),
                B=r(*shape_bc), C=r(*shape_bc), D=r(channels), z=r(batch, channels, L),
                delta_bias=r(channels, scale=0.3))


def token_major_inputs(batch=2, L=37, ND=2, E=3, N=2, dtype=torch.float64, seed=0):
    """bimamba_scan's arguments; delta drawn so that softplus(delta + bias) spans small and large steps."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
    return dict(u=r(batch, L, ND, E), delta=r(batch, L, ND, E, scale=0.5, shift=-1.0),
                A=-torch.rand(ND, E, N, generator=g, dtype=torch.float64) * 3 - 0.2, B=r(batch, L, ND, N),
                C=r(batch, L, ND, N), D=r(ND, E), z=r(batch, L, E), delta_bias=r(ND, E, scale=0.3))


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


def grads(y, leaves, dy):
    return torch.autograd.grad(y, leaves, dy)


# ------------------------------------------------------------------------------------------------
# The definition: selective_scan_ref against the loop
# ------------------------------------------------------------------------------------------------
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
    ours = grads(selective_scan_ref(**kw), leaves, grad_out)
    theirs = grads(loop_scan(**kw), leaves, grad_out)
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


# ------------------------------------------------------------------------------------------------
# The "ref" backend: chunks of REF_CHUNK steps, states kept at chunk starts only
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6]])
def test_ref_backend_matches_loop_across_chunks(case):
    """L = 37: two whole chunks of 16 and a partial one, values and every gradient."""
    inputs = make_inputs(batch=1, channels=4, L=37, N=2, groups=case.get("groups", 0), dtype=torch.float64,
                         requires_grad=True, seed=13)
    kw = select(inputs, case)
    leaves = [v for v in kw.values() if isinstance(v, torch.Tensor)]
    dy = torch.randn(kw["u"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, expected = selective_scan(**kw, backend="ref"), loop_scan(**kw)
    assert rel_err(y, expected) < 1e-12
    for a, b in zip(grads(y, leaves, dy), grads(expected, leaves, dy)):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("save_every", [0, 1, 2])
@pytest.mark.parametrize("options", [dict(), dict(D=None, z=None, delta_bias=None, delta_softplus=False)])
def test_ref_backend_both_directions(save_every, options):
    """bimamba_scan on the ref backend against the oracle, values and every gradient; L = 37 spans
    three chunks (one and a half with save_every=2, which keeps one state per 32 steps; 0 keeps
    them as 1 does)."""
    inputs = token_major_inputs()
    if not options.get("delta_softplus", True):  # without softplus a negative step makes the state explode
        inputs["delta"] = inputs["delta"].abs() * 0.3
    kw = {**{k: v.requires_grad_(True) for k, v in inputs.items()}, **options}
    leaves = [v for v in kw.values() if isinstance(v, torch.Tensor)]
    dy = torch.randn(2, 37, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = bimamba_scan(**kw, backend="ref", save_every=save_every)
    expected = bimamba_oracle(**kw)
    assert y.shape == (2, 37, 3) and rel_err(y, expected) < 1e-12
    for a, b in zip(grads(y, leaves, dy), grads(expected, leaves, dy)):
        assert rel_err(a, b) < 1e-10


def test_ref_backend_gradcheck():
    inputs = token_major_inputs(batch=1, L=18, E=2, N=2, seed=4)
    names = list(inputs)
    tensors = [inputs[n].requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(lambda *t: bimamba_scan(*t, backend="ref"), tensors, fast_mode=True)


def test_ref_backend_in_bfloat16_keeps_float32_state():
    kw = token_major_inputs(dtype=torch.bfloat16, seed=6)
    kw.update(A=kw["A"].float(), D=kw["D"].float(), delta_bias=kw["delta_bias"].float())
    leaves = {k: v.requires_grad_(True) for k, v in kw.items()}
    y = bimamba_scan(**leaves, backend="ref")
    assert y.dtype == torch.bfloat16 and rel_err(y, bimamba_oracle(**kw)) < 1e-2
    y.float().sum().backward()
    assert all(v.grad.dtype == v.dtype for v in leaves.values())


# ------------------------------------------------------------------------------------------------
# The convolutions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("W", [4, 3])
def test_biconv_silu_matches_loop(W):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, W, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    u, expected = biconv_silu(x, w, b, backend="ref"), loop_biconv(x, w, b)
    assert u.shape == (2, 9, 2, 3) and rel_err(u, expected) < 1e-12
    du = torch.randn(u.shape, generator=g, dtype=torch.float64)
    for a, e in zip(grads(u, (x, w, b), du), grads(expected, (x, w, b), du)):
        assert rel_err(a, e) < 1e-12


def test_mixer_input_ref_is_the_conv_then_x_proj():
    """The reference path: u the convolutions of xz's first half, x_dbl u @ proj^T, z xz's second half."""
    g = torch.Generator().manual_seed(1)
    xz = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    w, b = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    proj = torch.randn(5, 6, generator=g, dtype=torch.float64)
    u, x_dbl, z = mixer_input(xz, w, b, proj, backend="ref")
    expected = loop_biconv(xz[..., :3], w, b)
    assert rel_err(u, expected) < 1e-12 and rel_err(x_dbl, expected.flatten(2) @ proj.T) < 1e-12
    assert torch.equal(z, xz[..., 3:])


# ------------------------------------------------------------------------------------------------
# Backends and bad input
# ------------------------------------------------------------------------------------------------
def test_backend_resolution_on_cpu():
    assert resolve_backend("cpu") == "ref" and resolve_backend("cpu", "ref") == "ref"
    for name in ("mamba", "triton", "cuda"):  # (Triton's interpreter is off in this process)
        with pytest.raises(ValueError, match=f"scan backend '{name}' cannot run on cpu: "):
            resolve_backend("cpu", name)
    with pytest.raises(ValueError, match="scan backend must be one of auto, ref, mamba, triton, cuda; got 'fast'"):
        resolve_backend("cpu", "fast")
    assert scan.available_backends("cpu") == ["ref"]


def _scan_args(**changes):
    kw = {k: torch.zeros(v.shape) for k, v in make_inputs(batch=1, channels=4, L=5, N=2).items()}
    return {**kw, **changes}


def _bimamba_args(**changes):
    return {**token_major_inputs(batch=1, L=5, E=4, N=2, dtype=torch.float32), **changes}


BAD_INPUTS = [  # (function, keyword arguments, message)
    (selective_scan, _scan_args(u=torch.zeros(4, 5)), r"u must be \(batch, channels, L\)"),
    (selective_scan, _scan_args(delta=torch.zeros(1, 4, 6)), r"delta must have shape \(1, 4, 5\)"),
    (selective_scan, _scan_args(A=torch.zeros(3, 2)), r"A must be \(channels, N\) with 4 channels"),
    (selective_scan, _scan_args(B=torch.zeros(1, 3, 5)), r"B must be \(batch, N, L\) = \(1, 2, 5\)"),
    (selective_scan, _scan_args(C=torch.zeros(1, 3, 2, 5)), r"C must be .* G dividing the 4 channels"),
    (selective_scan, _scan_args(D=torch.zeros(5)), r"D must have shape \(4,\)"),
    (selective_scan, _scan_args(z=torch.zeros(1, 4, 4)), r"z must have shape \(1, 4, 5\)"),
    (selective_scan, _scan_args(delta_bias=torch.zeros(4, 1)), r"delta_bias must have shape \(4,\)"),
    (selective_scan, _scan_args(backend="fast"), "scan backend must be one of"),
    (bimamba_scan, _bimamba_args(u=torch.zeros(1, 5, 3, 4)), r"u must be \(batch, L, directions, E\)"),
    (bimamba_scan, _bimamba_args(A=torch.zeros(2, 3, 2)), r"A must be \(directions, E, N\) = \(2, 4, N\)"),
    (bimamba_scan, _bimamba_args(delta=torch.zeros(1, 5, 1, 4)), r"delta must have shape \(1, 5, 2, 4\)"),
    (bimamba_scan, _bimamba_args(B=torch.zeros(1, 5, 2, 3)), r"B must have shape \(1, 5, 2, 2\)"),
    (bimamba_scan, _bimamba_args(C=torch.zeros(1, 4, 2, 2)), r"C must have shape \(1, 5, 2, 2\)"),
    (bimamba_scan, _bimamba_args(D=torch.zeros(4)), r"D must have shape \(2, 4\)"),
    (bimamba_scan, _bimamba_args(z=torch.zeros(1, 5, 2, 4)), r"z must have shape \(1, 5, 4\)"),
    (bimamba_scan, _bimamba_args(delta_bias=torch.zeros(2, 5)), r"delta_bias must have shape \(2, 4\)"),
    (bimamba_scan, _bimamba_args(save_every=-1), "save_every must be an integer >= 0, got -1"),
    (bimamba_scan, _bimamba_args(backend="mamba"), "scan backend 'mamba' cannot run on cpu"),
    (biconv_silu, dict(x=torch.zeros(1, 5), weight=torch.zeros(2, 5, 4), bias=torch.zeros(2, 5)),
     r"biconv_silu needs x \(batch, L, E\), weight \(2, E, W\), bias \(2, E\)"),
    (biconv_silu, dict(x=torch.zeros(1, 5, 3), weight=torch.zeros(1, 3, 4), bias=torch.zeros(2, 3)),
     r"got x \(1, 5, 3\), weight \(1, 3, 4\)"),
    (mixer_input, dict(xz=torch.zeros(1, 5, 7), weight=torch.zeros(2, 3, 4), bias=torch.zeros(2, 3),
                       proj=torch.zeros(8, 6)), r"mixer_input needs xz \(batch, L, 2E\) and proj \(P, 2E\)"),
    (mixer_input, dict(xz=torch.zeros(1, 5, 6), weight=torch.zeros(2, 3, 4), bias=torch.zeros(2, 3),
                       proj=torch.zeros(8, 4)), r"got xz \(1, 5, 6\), proj \(8, 4\)"),
    (mixer_input, dict(xz=torch.zeros(1, 5, 6), weight=torch.zeros(2, 4, 4), bias=torch.zeros(2, 3),
                       proj=torch.zeros(8, 6)), r"mixer_input needs x \(batch, L, E\), weight \(2, E, W\)"),
]


@pytest.mark.parametrize("fn, kwargs, message", BAD_INPUTS)
def test_bad_input_is_one_clear_value_error(fn, kwargs, message):
    with pytest.raises(ValueError, match=message) as raised:
        fn(**kwargs)
    assert "\n" not in str(raised.value)


# ------------------------------------------------------------------------------------------------
# GPU: the fused backends against the reference at DiS's size
# ------------------------------------------------------------------------------------------------
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
@pytest.mark.parametrize("backend", ["ref", "mamba", "triton"])
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
