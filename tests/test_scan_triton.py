"""scan_triton.py against the oracles of test_scan.py: selective_scan_ref in float64 (itself
checked against a scalar loop) and a loop over the convolutions' taps.

Two modes. With a CUDA GPU the `gpu` tests run the compiled kernels at realistic sizes. Without
one, `test_interpreter_suite` re-runs this file in a subprocess with TRITON_INTERPRET=1 (it must be
set before triton is imported), where the `test_interp_*` tests run the same kernels on CPU
tensors at tiny sizes, in float64 and float32. Without a GPU, Triton still compiles the conv
kernels to a cubin (test_conv_kernels_compile_for_cuda), which checks what the interpreter lets pass.
"""
import os

import pytest
import torch
import triton
import triton.language as tl

import scan_triton
from scan import selective_scan_ref
from conftest import run_interpreter_suite
from scan_triton import biconv_silu, bimamba_scan, mixer_input, selective_scan
from test_scan import bimamba_oracle, loop_biconv, rel_err

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp_only = pytest.mark.skipif(not INTERPRETED, reason="runs inside test_interpreter_suite's subprocess")


def make_inputs(batch, L, ND, E, N, dtype, device, z=True, D=True, delta_bias=True, softplus=True, seed=0):
    """Inputs laid out as DiS's fast block has them: B, C strided slices of an x_proj output,
    z the second half of an in_proj output. Without softplus, delta is drawn positive (a negative
    step makes exp(delta A) > 1 and the state explode, in any implementation)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device)
    x_proj = r(batch, L, ND, 3 + 2 * N).to(dtype)
    xz = r(batch, L, 2 * E).to(dtype)
    inputs = dict(
        u=r(batch, L, ND, E).to(dtype),
        delta=(r(batch, L, ND, E, scale=0.5, shift=-1.0) if softplus
               else torch.rand(batch, L, ND, E, generator=g, dtype=torch.float64).to(device) * 0.3).to(dtype),
        A=(-torch.rand(ND, E, N, generator=g, dtype=torch.float64) * 3 - 0.2).to(device),
        B=x_proj[..., 3:3 + N], C=x_proj[..., 3 + N:],
        D=r(ND, E) if D else None,
        z=xz[..., E:] if z else None,
        delta_bias=r(ND, E, scale=0.3) if delta_bias else None,
    )
    if dtype != torch.float64:
        inputs["A"] = inputs["A"].float()
        for k in ("D", "delta_bias"):
            inputs[k] = inputs[k].float() if inputs[k] is not None else None
    return inputs


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make every torch.empty / empty_like NaN, so an output element the kernels skip shows."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k)))


def check_bimamba(batch, L, ND, E, N, dtype, device, tol, z=True, D=True, delta_bias=True, softplus=True,
                  save_every=1, scan_fn=bimamba_scan):
    """Forward and every gradient of `scan_fn` (bimamba_scan's signature) against the oracle."""
    inputs = make_inputs(batch, L, ND, E, N, dtype, device, z, D, delta_bias, softplus)
    names = [k for k, v in inputs.items() if v is not None]
    leaves = {k: inputs[k].detach().clone().requires_grad_(True) for k in names}
    y = scan_fn(**{**inputs, **leaves}, delta_softplus=softplus, save_every=save_every)
    assert y.shape == (batch, L, E) and y.dtype == dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy)

    ref_leaves = {k: inputs[k].detach().double().requires_grad_(True) for k in names}
    y_ref = bimamba_oracle(**{**inputs, **ref_leaves}, delta_softplus=softplus)
    ref_grads = torch.autograd.grad(y_ref, [ref_leaves[k] for k in names], dy.double())
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < tol, ("y", rel_err(y, y_ref))
    for k, gr, ref in zip(names, grads, ref_grads):
        assert gr.shape == leaves[k].shape and torch.isfinite(gr).all(), k
        assert rel_err(gr, ref) < tol, (k, rel_err(gr, ref))


def check_mamba_layout(batch, E, L, N, groups, dtype, device, tol):
    """selective_scan with selective_scan_fn's layout: (batch, E, L); B, C (batch, N, L) for
    groups = 0, else (batch, groups, N, L) with channel e reading group e // (E / groups)."""
    g = torch.Generator().manual_seed(3)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device)
    bc_shape = (batch, groups, N, L) if groups else (batch, N, L)
    inputs = dict(u=r(batch, E, L).to(dtype), delta=r(batch, E, L, scale=0.5, shift=-1.0).to(dtype),
                  A=(-torch.rand(E, N, generator=g, dtype=torch.float64) * 2 - 0.1).to(device),
                  B=r(*bc_shape).to(dtype), C=r(*bc_shape).to(dtype), D=r(E), z=r(batch, E, L).to(dtype),
                  delta_bias=r(E, scale=0.3))
    if dtype != torch.float64:
        for k in ("A", "D", "delta_bias"):
            inputs[k] = inputs[k].float()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y = selective_scan(**leaves, delta_softplus=True)
    assert y.shape == (batch, E, L)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device, dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)

    ref = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items()}
    y_ref = selective_scan_ref(**ref, delta_softplus=True)
    ref_grads = torch.autograd.grad(y_ref, list(ref.values()), dy.double())
    assert rel_err(y, y_ref) < tol
    for k, gr, rg in zip(ref, grads, ref_grads):
        assert rel_err(gr, rg) < tol, (k, rel_err(gr, rg))


def check_biconv(batch, L, E, dtype, device, tol, W=4):
    g = torch.Generator().manual_seed(5)
    xz = torch.randn(batch, L, 2 * E, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(True)
    x = xz[..., :E]  # strided like the x half of in_proj's output
    weight = (torch.randn(2, E, W, generator=g, dtype=torch.float64) * 0.5).to(device, dtype).requires_grad_(True)
    bias = torch.randn(2, E, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(True)
    u = biconv_silu(x, weight, bias)
    assert u.shape == (batch, L, 2, E) and u.is_contiguous() and u.dtype == dtype
    du = torch.randn(u.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device, dtype)
    grads = torch.autograd.grad(u, (xz, weight, bias), du)
    ref_in = [t.detach().double().requires_grad_(True) for t in (xz, weight, bias)]
    u_ref = loop_biconv(ref_in[0][..., :E], ref_in[1], ref_in[2])
    ref_grads = torch.autograd.grad(u_ref, ref_in, du.double())
    assert rel_err(u, u_ref) < tol
    for name, gr, rg in zip(("x", "weight", "bias"), grads, ref_grads):
        assert rel_err(gr, rg) < tol, (name, rel_err(gr, rg))


def check_mixer_input(batch, L, E, P, dtype, device, tol, W=4, proj_dtype=None):
    """mixer_input's outputs and the gradients of xz, the filters and proj, with gradients arriving
    at all three outputs (u's from the scan and from x_proj), against loop_biconv and a matmul."""
    g = torch.Generator().manual_seed(7)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)
    xz = r(batch, L, 2 * E).to(dtype).requires_grad_(True)
    weight = (r(2, E, W) * 0.5).to(dtype).requires_grad_(True)
    bias = r(2, E).to(dtype).requires_grad_(True)
    proj = (r(P, 2 * E) * 0.3).to(proj_dtype or dtype).requires_grad_(True)
    u, x_dbl, z = mixer_input(xz, weight, bias, proj)
    assert (u.shape, x_dbl.shape, z.shape) == ((batch, L, 2, E), (batch, L, P), (batch, L, E))
    assert u.dtype == x_dbl.dtype == z.dtype == dtype
    du, dx_dbl, dz = r(*u.shape).to(dtype), r(*x_dbl.shape).to(dtype), r(*z.shape).to(dtype)
    leaves = (xz, weight, bias, proj)
    grads = torch.autograd.grad((u, x_dbl, z), leaves, (du, dx_dbl, dz))
    assert [gr.dtype for gr in grads] == [t.dtype for t in leaves]
    ref_in = [t.detach().double().requires_grad_(True) for t in leaves]
    u_ref = loop_biconv(ref_in[0][..., :E], ref_in[1], ref_in[2])
    outs_ref = (u_ref, u_ref.flatten(2) @ ref_in[3].t(), ref_in[0][..., E:])
    ref_grads = torch.autograd.grad(outs_ref, ref_in, (du.double(), dx_dbl.double(), dz.double()))
    for name, out, ref in zip(("u", "x_dbl", "z"), (u, x_dbl, z), outs_ref):
        assert rel_err(out, ref) < tol, (name, rel_err(out, ref))
    for name, gr, rg in zip(("xz", "weight", "bias", "proj"), grads, ref_grads):
        assert rel_err(gr, rg) < tol, (name, rel_err(gr, rg))


# ------------------------------------------------------------------------------------------------
# CPU: the kernels under Triton's interpreter (tiny sizes)
# ------------------------------------------------------------------------------------------------
def test_interpreter_suite(request):
    run_interpreter_suite(request, __file__)


@interp_only
@pytest.mark.parametrize("batch, L, ND, E, N, z, D, delta_bias, softplus", [
    (1, 11, 2, 20, 16, True, True, True, True),      # L and E not multiples of the chunk (8) / block (16)
    (1, 9, 1, 36, 8, False, True, False, True),      # one direction, three channel blocks
    (1, 1, 2, 5, 4, True, False, True, False),       # L = 1, no D, no softplus
    (1, 10, 2, 6, 4, False, False, True, False),     # no softplus over several chunks
    (2, 6, 2, 9, 3, True, True, True, True),         # two sequences; N not a power of two
])
def test_interp_bimamba_float64(poisoned_empty, batch, L, ND, E, N, z, D, delta_bias, softplus):
    check_bimamba(batch, L, ND, E, N, torch.float64, "cpu", 1e-10, z, D, delta_bias, softplus)


@interp_only
def test_interp_bimamba_float32(poisoned_empty):
    check_bimamba(1, 11, 2, 12, 16, torch.float32, "cpu", 2e-5)


@interp_only
@pytest.mark.parametrize("save_every", [0, 2, 3])
def test_interp_bimamba_sparse_checkpoints(poisoned_empty, save_every):
    """States saved every 2nd / 3rd chunk only, or none (0: the backward pass runs the forward
    pass again first); the backward pass recomputes the chunks between. L = 17 is three CPU
    chunks of 8: the last starts from a recomputed state."""
    check_bimamba(1, 17, 2, 5, 16, torch.float64, "cpu", 1e-10, save_every=save_every)
    check_bimamba(1, 13, 1, 9, 3, torch.float64, "cpu", 1e-10, z=False, softplus=False, save_every=save_every)


@interp_only
def test_interp_bimamba_chunk4_butterfly(poisoned_empty, monkeypatch):
    """CUDA's chunk length 4, whose backward pass sums dB and dC over channels by a butterfly
    reduce-scatter: L = 9 ends in a partial chunk, E = 20 in a partial block of 16 channels."""
    monkeypatch.setitem(scan_triton.SCAN_CHUNK, "cpu", scan_triton.SCAN_CHUNK["cuda"])
    check_bimamba(1, 9, 2, 20, 16, torch.float64, "cpu", 1e-10)
    check_bimamba(1, 6, 1, 9, 3, torch.float64, "cpu", 1e-10, z=False, softplus=False, save_every=2)


@interp_only
@pytest.mark.parametrize("groups", [0, 1, 2])
def test_interp_mamba_layout(groups):
    check_mamba_layout(1, 4, 9, 4, groups, torch.float64, "cpu", 1e-10)


@interp_only
@pytest.mark.parametrize("batch, L, E, W", [
    (1, 11, 13, 4),  # spans of 4, 4, 3 (CPU tile): L a multiple of neither span nor BLOCK_T; a partial channel block
    (1, 11, 6, 3),   # a width that is not a power of two
    (2, 13, 5, 4),   # two sequences; spans of 4, 4, 4, 1: a last span of one row
    (1, 9, 6, 4),    # spans of 3: each halo (W-1 rows) covers a whole neighbouring span
    (1, 9, 6, 6),    # halos of 5 rows, wider than the spans
    (1, 3, 6, 4),    # L shorter than W: one span, every output reads padding
    (1, 1, 3, 3),    # L = 1
])
def test_interp_biconv(poisoned_empty, batch, L, E, W):
    check_biconv(batch, L, E, torch.float64, "cpu", 1e-10, W)


@interp_only
def test_interp_biconv_bf16(poisoned_empty):
    """bf16 in and out, float32 inside: u and dx rounded once each."""
    check_biconv(1, 11, 6, torch.bfloat16, "cpu", 1e-2)


@interp_only
@pytest.mark.parametrize("tile", ["CONV_FWD_TILE", "CONV_BWD_TILE"])
def test_interp_biconv_cuda_tile(poisoned_empty, monkeypatch, tile):
    """A CUDA tile (BLOCK_T rows per step, BLOCK_E channels, spans of about `span` steps):
    L = span + 13 is two spans whose lead rows are not a multiple of BLOCK_T, and
    E = BLOCK_E + 2 ends in a partial channel block."""
    _, block_e, _, span = getattr(scan_triton, tile)
    monkeypatch.setattr(scan_triton, "CONV_CPU_TILE", getattr(scan_triton, tile))
    check_biconv(1, span + 13, block_e + 2, torch.float64, "cpu", 1e-10)


@interp_only
@pytest.mark.parametrize("batch, L, E, P, W", [(2, 13, 5, 8, 4), (1, 3, 6, 16, 4), (1, 1, 3, 8, 3)])
def test_interp_mixer_input(poisoned_empty, batch, L, E, P, W):
    check_mixer_input(batch, L, E, P, torch.float64, "cpu", 1e-10, W)


@interp_only
def test_interp_mixer_input_bf16_with_float32_proj(poisoned_empty):
    """As in DiS under autocast: xz in bf16, x_proj's weight in float32 (used in bf16, its gradient
    returned in float32)."""
    check_mixer_input(1, 11, 6, 16, torch.bfloat16, "cpu", 1e-2, proj_dtype=torch.float32)


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernels; the interpreter runs them instead")
@pytest.mark.parametrize("kernel, options", [("_conv_fwd_kernel", {}),
                                             ("_conv_bwd_kernel", dict(HAS_DU2=False, HAS_DZ=False)),
                                             ("_conv_bwd_kernel", dict(HAS_DU2=True, HAS_DZ=True))])
def test_conv_kernels_compile_for_cuda(kernel, options):
    """Triton compiles the conv kernels to a cubin for the H100/H200 (sm_90) without a GPU, with the
    CUDA tile, bf16 data, W = 4 and x's channel stride 1 as in DiS: the interpreter runs code that
    the compiler may still refuse (loop-carried tuples, dtypes of values carried through loops)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(scan_triton, kernel)
    data = {"x_ptr", "u_ptr", "du_ptr", "du2_ptr", "dz_ptr", "dx_ptr"}
    signature = {a: ("*bf16" if a in data else "*fp32") if a.endswith("_ptr") else "i32" for a in fn.arg_names}
    block_t, block_e, warps, _ = scan_triton.CONV_FWD_TILE if kernel == "_conv_fwd_kernel" else scan_triton.CONV_BWD_TILE
    constexprs = dict(W=4, BLOCK_T=block_t, BLOCK_E=block_e, ACC=tl.float32, sx_e=1, sdu_e=1, **options)
    constexprs = {k: v for k, v in constexprs.items() if k in signature}
    signature.update({k: "constexpr" for k in constexprs})
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps))
    assert compiled.asm["cubin"][:4] == b"\x7fELF"


@interp_only
def test_interp_mixer_matches_reference(poisoned_empty):
    """model.BiMamba on the Triton kernels (both directions at once) against BiMamba on the "ref"
    backend, same weights: output and every parameter's gradient, float64."""
    from model import BiMamba
    torch.manual_seed(0)
    m = BiMamba(8).double()
    with torch.no_grad():  # break the symmetries of the init so that swapped directions would show
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h = torch.randn(1, 11, 8, dtype=torch.float64)
    dy = torch.randn(1, 11, 8, dtype=torch.float64)
    results = {}
    for backend in ("ref", "triton"):
        m.scan_backend = backend
        out = m(h)
        results[backend] = (out, torch.autograd.grad(out, list(m.parameters()), dy))
    (out_ref, grads_ref), (out, grads) = results["ref"], results["triton"]
    assert rel_err(out, out_ref) < 1e-10
    for (name, _), g, gr in zip(m.named_parameters(), grads, grads_ref):
        assert rel_err(g, gr) < 1e-10, (name, rel_err(g, gr))


def test_too_many_states_is_a_clear_error():
    u = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"the state size N must be at most 256 \(Mamba uses 16\), got 512"):
        bimamba_scan(u, u, torch.zeros(2, 8, 512), torch.zeros(1, 4, 2, 512), torch.zeros(1, 4, 2, 512))


def test_bad_save_every_is_a_clear_error():
    u = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="save_every must be an integer >= 0, got -1"):
        bimamba_scan(u, u, torch.zeros(2, 8, 16), torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16), save_every=-1)


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernels at realistic sizes
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("batch, L, ND, E", [(2, 259, 2, 200), (3, 130, 1, 96)])
def test_gpu_bimamba(poisoned_empty, dtype, tol, batch, L, ND, E):
    check_bimamba(batch, L, ND, E, 16, dtype, "cuda", tol)


@pytest.mark.gpu
def test_gpu_bimamba_sparse_checkpoints(poisoned_empty):
    check_bimamba(2, 259, 2, 200, 16, torch.float32, "cuda", 1e-4, save_every=2)


@pytest.mark.gpu
def test_gpu_bimamba_options():
    check_bimamba(2, 77, 2, 40, 16, torch.float32, "cuda", 1e-4, z=False, D=False, delta_bias=False, softplus=False)


@pytest.mark.gpu
@pytest.mark.parametrize("groups", [0, 1, 2])
def test_gpu_mamba_layout(groups):
    check_mamba_layout(2, 64, 150, 16, groups, torch.float32, "cuda", 1e-4)


@pytest.mark.gpu
def test_gpu_gradcheck_float64():
    inputs = make_inputs(1, 9, 2, 5, 4, torch.float64, "cuda")
    tensors = tuple(v.detach().clone().requires_grad_(True) for v in inputs.values())
    assert torch.autograd.gradcheck(lambda *t: bimamba_scan(*t), tensors, fast_mode=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("batch, L, E, W", [(4, 257, 300, 4), (2, 130, 736, 3), (3, 2, 40, 4)])
def test_gpu_biconv(poisoned_empty, dtype, tol, batch, L, E, W):
    check_biconv(batch, L, E, dtype, "cuda", tol, W)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("batch, L, E, P", [(4, 257, 736, 112), (3, 2, 40, 16)])
def test_gpu_mixer_input(poisoned_empty, monkeypatch, dtype, tol, batch, L, E, P):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # x_proj's float32 GEMMs in full precision
    check_mixer_input(batch, L, E, P, dtype, "cuda", tol, proj_dtype=torch.float32)
