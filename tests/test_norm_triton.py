"""norm_triton.py (a DiS block's add and RMSNorm, one Triton kernel each way) against model.add_norm's
PyTorch operations in float64.

With a CUDA GPU the `gpu` tests run the compiled kernels at DiS-S/2's size; without one,
`test_interpreter_suite` re-runs this file's test_interp_* tests under Triton's interpreter
(conftest.run_interpreter_suite), and the kernels are compiled for sm_90 to check what the
interpreter lets pass.
"""
import os

import pytest
import torch
import triton

import model
import norm_triton
from conftest import run_interpreter_suite
from test_scan import rel_err

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp_only = pytest.mark.skipif(not INTERPRETED, reason="runs inside test_interpreter_suite's subprocess")


def check_add_norm(B, L, D, dtype, device, residual, keep, out_dtype, use_residual_out, tol):
    """The kernels against model.add_norm (fused=False) on float64 copies of the same inputs: both
    outputs, and the gradients of hidden, residual and the weight for random incoming gradients."""
    g = torch.Generator().manual_seed(B * 1000 + L * 10 + D)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)
    hidden = r(B, L, D).to(dtype).requires_grad_(True)
    res = r(B, L, D, scale=2.0).float().requires_grad_(True) if residual else None
    norm = model.RMSNorm(D).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * r(D))
    scale = (torch.tensor([0.0, 1.25, 1.25, 0.0])[:B].to(device) if keep else None)
    normed, r_out = norm_triton.add_rms_norm(hidden, res, norm.weight, norm.eps, scale, out_dtype)
    assert normed.dtype == out_dtype and r_out.dtype == torch.float32 and normed.shape == r_out.shape == (B, L, D)

    ref_norm = model.RMSNorm(D).to(device).double()
    with torch.no_grad():
        ref_norm.weight.copy_(norm.weight.double())
    ref_in = [t.detach().double().requires_grad_(True) for t in (hidden, *([res] if residual else []))]
    h64 = ref_in[0]
    branch = h64 if scale is None else h64 * scale.double()[:, None, None]
    r64 = branch if not residual else ref_in[1] + branch
    n64 = ref_norm(r64)
    assert rel_err(normed, n64) < tol and rel_err(r_out, r64) < 1e-6

    dn = r(B, L, D).to(out_dtype)
    dr = r(B, L, D).float()
    outs, grads_in = ((normed, r_out), (dn, dr)) if use_residual_out else ((normed,), (dn,))
    grads = torch.autograd.grad(outs, [hidden, *([res] if residual else []), norm.weight], grads_in)
    ref_outs = (n64, r64) if use_residual_out else (n64,)
    ref_grads = torch.autograd.grad(ref_outs, [*ref_in, ref_norm.weight], [x.double() for x in grads_in])
    assert grads[0].dtype == dtype
    for name, gr, rg in zip(["hidden"] + ["residual"] * residual + ["weight"], grads, ref_grads):
        assert rel_err(gr, rg) < tol, (name, rel_err(gr, rg))


# ------------------------------------------------------------------------------------------------
# CPU: the kernels under Triton's interpreter (tiny sizes)
# ------------------------------------------------------------------------------------------------
def test_interpreter_suite(request):
    run_interpreter_suite(request, __file__)


@interp_only
@pytest.mark.parametrize("residual, keep, use_residual_out", [
    (False, False, True),   # the first block: no residual yet, no drop path
    (True, True, True),     # a later block in training, drop path on
    (True, False, False),   # the final norm: residual' not used further
])
@pytest.mark.parametrize("B, L, D", [(2, 5, 12), (4, 3, 16)])  # rows not a multiple of ROWS; D not a power of 2
def test_interp_add_norm_matches_reference(B, L, D, residual, keep, use_residual_out):
    check_add_norm(B, L, D, torch.float32, "cpu", residual, keep, torch.float32, use_residual_out, 1e-5)


@interp_only
def test_interp_backward_programs_split_rows(monkeypatch):
    """More rows than one program walks, in row ranges that end mid-tile: the weight gradient's
    partial sums of several programs, the last one short."""
    monkeypatch.setattr(norm_triton, "BWD_PROGRAMS", 3)
    monkeypatch.setattr(norm_triton, "TILE", 32)  # 2 rows of D = 12 (padded to 16)
    check_add_norm(2, 7, 12, torch.float32, "cpu", True, True, torch.float32, True, 1e-5)


@interp_only
def test_interp_model_matches_reference():
    """A tiny DiS in training mode (drop path on) on the Triton kernels against the same weights on
    the "ref" backend: the output and every parameter's gradient, with the same random draws."""
    torch.manual_seed(0)
    net = model.DiS(img_size=4, patch_size=2, channels=1, embed_dim=8, depth=2, num_classes=3, drop_path_rate=0.5)
    x, t, y = torch.randn(2, 1, 4, 4), torch.tensor([3, 7]), torch.tensor([0, 2])
    results = {}
    for backend in ("ref", "triton"):
        for m in net.modules():
            if isinstance(m, model.BiMamba):
                m.scan_backend = backend
        torch.manual_seed(1)
        out = net(x, t, y)
        results[backend] = (out, torch.autograd.grad(out.square().sum(), list(net.parameters()), allow_unused=True))
    (out_ref, grads_ref), (out, grads) = results["ref"], results["triton"]
    assert rel_err(out, out_ref) < 1e-5
    for (name, _), gr, rg in zip(net.named_parameters(), grads, grads_ref):
        if rg is not None:
            assert rel_err(gr, rg) < 1e-4, (name, rel_err(gr, rg))


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernels; the interpreter runs them instead")
@pytest.mark.parametrize("kernel", ["_add_norm_fwd_kernel", "_add_norm_bwd_kernel"])
def test_kernels_compile_for_cuda(kernel):
    """Triton compiles both kernels to a cubin for the H100/H200 (sm_90) without a GPU, with bf16
    activations and DiS-S/2's D = 368: the interpreter runs code the compiler may still refuse."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(norm_triton, kernel)
    bf16 = {"h_ptr", "normed_ptr", "dn_ptr", "dh_ptr"}
    signature = {a: ("*bf16" if a in bf16 else "*fp32") if a.endswith("_ptr") else "i32" for a in fn.arg_names}
    signature["eps"] = "fp32" if "eps" in signature else None
    signature = {k: v for k, v in signature.items() if v}
    constexprs = {k: True for k in fn.arg_names if k.startswith(("HAS_", "WRITE_"))}
    meta = norm_triton._meta(368)
    constexprs.update(ROWS=meta["ROWS"], BLOCK_D=meta["BLOCK_D"])
    signature.update({k: "constexpr" for k in constexprs})
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=norm_triton.WARPS))
    assert compiled.asm["cubin"][:4] == b"\x7fELF"


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernels at DiS-S/2's size (32x32 images, batch 128: 257 tokens of D = 368)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("residual, keep, use_residual_out", [(False, False, True), (True, True, True),
                                                              (True, False, False)])
def test_add_norm_matches_reference_on_gpu(residual, keep, use_residual_out):
    check_add_norm(4, 257, 368, torch.bfloat16, "cuda", residual, keep, torch.bfloat16, use_residual_out, 1e-2)
    check_add_norm(4, 257, 368, torch.float32, "cuda", residual, keep, torch.float32, use_residual_out, 1e-5)
