"""scan_cuda.bimamba_scan (our CUDA scan kernels) on the GPU, against scan.selective_scan_ref in
float64, one direction at a time, as the oracle. The kernels are compiled with NVRTC on first use
(seconds) and cached on disk. Without a GPU these tests are skipped; tests/test_scan_cuda_compile.py
checks the rest without one."""
import ctypes

import pytest
import torch

import scan_cuda
from scan import selective_scan_ref

pytestmark = pytest.mark.gpu
needs_scan = pytest.mark.skipif(torch.cuda.is_available() and not scan_cuda.available(),
                                reason=scan_cuda.why_unavailable() if torch.cuda.is_available() else "no GPU")
bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
# Relative errors (norm of the difference over the norm of the float64 reference) of y and of
# every gradient. The kernels compute in float32; what differs from the reference is float32's
# rounding (1e-4 leaves room for the approximate ex2 and rcp) and, for 16-bit inputs, the rounding
# of y and of the gradients to the inputs' type: half a unit in the last place is 2^-9 = 0.2% for
# bfloat16, 2^-12 = 0.02% for float16, and norm-wise errors are smaller still. Saved states in 16
# bits add one such rounding of the state that the backward pass recomputes each chunk from; the
# same bounds hold with room to spare, while a wrong index or a missed element errs by O(1).
TOL = {f32: 1e-4, bf16: 1e-2, f16: 5e-3}


def make_inputs(batch, L, ND, E, N, dtype, device="cuda", D=True, delta_bias=True, seed=0):
    """Inputs laid out as DiS's mixer passes them: B, C strided slices of an x_proj output, z the
    second half of an in_proj output; delta around softplus(-1), A negative."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device)
    x_proj = r(batch, L, ND, 3 + 2 * N).to(dtype)
    xz = r(batch, L, 2 * E).to(dtype)
    return dict(u=r(batch, L, ND, E).to(dtype), delta=r(batch, L, ND, E, scale=0.5, shift=-1.0).to(dtype),
                A=(-torch.rand(ND, E, N, generator=g, dtype=torch.float64) * 3 - 0.2).to(device, f32),
                B=x_proj[..., 3:3 + N], C=x_proj[..., 3 + N:], D=r(ND, E).float() if D else None,
                z=xz[..., E:], delta_bias=r(ND, E, scale=0.3).float() if delta_bias else None)


def reference(u, delta, A, B, C, D, z, delta_bias):
    """The bidirectional scan from selective_scan_ref ((batch, E, L) layout), in the inputs' dtype
    (float64 here): direction 1 is the scan of the time-flipped inputs, flipped back."""
    y = 0
    for d in range(u.shape[2]):
        def channel_major(x):  # (batch, L, channels) -> (batch, channels, L), flipped for direction 1
            return (x.flip(1) if d else x).transpose(1, 2)
        y_d = selective_scan_ref(channel_major(u[:, :, d]), channel_major(delta[:, :, d]), A[d],
                                 channel_major(B[:, :, d]), channel_major(C[:, :, d]), None if D is None else D[d],
                                 channel_major(z), None if delta_bias is None else delta_bias[d], delta_softplus=True)
        y = y + (y_d.flip(-1) if d else y_d).transpose(1, 2)
    return y


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(inputs, dy, **options):
    """y and the gradients of every input given, from bimamba_scan with every buffer it allocates
    poisoned with NaN (an element the kernels skip shows)."""
    names = [k for k, v in inputs.items() if v is not None]
    leaves = {k: inputs[k].detach().requires_grad_(True) for k in names}  # B, C, z keep their strides
    y = scan_cuda.bimamba_scan(**{**inputs, **leaves}, poison_outputs=True, **options)
    return y, dict(zip(names, torch.autograd.grad(y, [leaves[k] for k in names], dy)))


def check(batch, L, ND, E, N, dtype, states_dtype=None, save_every=1, **make):
    inputs = make_inputs(batch, L, ND, E, N, dtype, **make)
    dy = torch.randn(batch, L, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to("cuda", dtype)
    y, grads = run(inputs, dy, states_dtype=states_dtype, save_every=save_every)
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items() if v is not None}
    y_ref = reference(**{**inputs, **ref_leaves})
    ref_grads = torch.autograd.grad(y_ref, list(ref_leaves.values()), dy.double())
    tol = TOL[dtype]
    assert y.shape == (batch, L, E) and y.dtype == dtype and torch.isfinite(y).all()
    assert rel_err(y, y_ref) < tol, ("y", rel_err(y, y_ref))
    for (k, leaf), ref in zip(ref_leaves.items(), ref_grads):
        g = grads[k]
        assert g.shape == leaf.shape and g.dtype == inputs[k].dtype and torch.isfinite(g).all(), k
        assert rel_err(g, ref) < tol, (k, rel_err(g, ref))


@needs_scan
@pytest.mark.parametrize("dtype, states_dtype", [(f32, f32), (bf16, bf16), (bf16, f32), (f16, f32), (f16, f16)])
@pytest.mark.parametrize("batch, L, ND, E, N", [(2, 259, 2, 200, 16), (3, 130, 1, 96, 16), (2, 37, 2, 300, 12)])
def test_gpu_matches_reference(dtype, states_dtype, batch, L, ND, E, N):
    check(batch, L, ND, E, N, dtype, states_dtype)


@needs_scan
@pytest.mark.parametrize("save_every", [0, 2, 3])
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_gpu_sparse_checkpoints(dtype, save_every):
    check(2, 259, 2, 200, 16, dtype, save_every=save_every)


@needs_scan
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_gpu_recomputed_states_are_the_saved_ones(dtype):
    """save_every=0 keeps no state from the forward pass (the autograd graph holds None in
    their place); the backward pass recomputes exactly the states save_every=1 keeps, so every
    gradient is bitwise that of save_every=1."""
    inputs = make_inputs(2, 131, 2, 200, 16, dtype)
    dy = torch.randn(2, 131, 200, device="cuda", dtype=dtype)
    _, kept = scan_cuda.forward(*inputs.values(), True, 1)
    assert torch.equal(scan_cuda.recompute_states(*inputs.values(), poison_outputs=True), kept)
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
    y = scan_cuda.bimamba_scan(**leaves, save_every=0)
    assert y.grad_fn.saved_tensors[-1] is None
    y1, g1 = run(inputs, dy, save_every=1)
    y0, g0 = run(inputs, dy, save_every=0)
    assert torch.equal(y0, y1)
    assert all(torch.equal(g0[k], g1[k]) for k in g1)


@needs_scan
@pytest.mark.parametrize("batch, L, ND, E", [(6, 65, 2, 3072), (23, 70, 1, 768)])
def test_gpu_last_partial_wave(batch, L, ND, E):
    """Backward grids that end in a partial wave of blocks on an H100 or H200 (132 SMs, two blocks
    of 128 channels each: 144 and 138 blocks)."""
    check(batch, L, ND, E, 16, bf16)


@needs_scan
def test_gpu_without_d_and_bias():
    check(2, 77, 2, 40, 16, f32, D=False, delta_bias=False)


@needs_scan
@pytest.mark.parametrize("dtype", [bf16, f32])
def test_gpu_is_deterministic(dtype):
    """Two runs give bitwise the same y and gradients: every sum over channels, blocks or the
    batch is taken in a fixed order (no atomics)."""
    inputs = make_inputs(4, 300, 2, 384, 16, dtype)
    dy = torch.randn(4, 300, 384, device="cuda", dtype=dtype)
    y1, g1 = run(inputs, dy)
    y2, g2 = run(inputs, dy)
    assert torch.equal(y1, y2)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


@needs_scan
def test_gpu_inference_saves_no_states():
    inputs = make_inputs(2, 37, 2, 40, 16, bf16)
    with torch.no_grad():
        y = scan_cuda.bimamba_scan(**inputs, poison_outputs=True)
    _, states = scan_cuda.forward(*inputs.values(), False, 1)
    assert states is None and torch.isfinite(y).all()
    assert rel_err(y, reference(**{k: None if v is None else v.double() for k, v in inputs.items()})) < TOL[bf16]


@needs_scan
def test_gpu_states_take_the_dtype_asked_for():
    inputs = make_inputs(2, 37, 2, 40, 16, bf16)
    for states_dtype, size in ((None, 2), (bf16, 2), (f32, 4)):
        _, states = scan_cuda.forward(*inputs.values(), True, 1, states_dtype)
        assert states.shape == (2, 2, 10, 40, 16) and states.element_size() == size


@needs_scan
def test_gpu_runs_on_the_current_stream():
    inputs = make_inputs(2, 259, 2, 200, 16, bf16)
    dy = torch.randn(2, 259, 200, device="cuda", dtype=bf16)
    y, grads = run(inputs, dy)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y_side, grads_side = run(inputs, dy)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y, y_side) and all(torch.equal(grads[k], grads_side[k]) for k in grads)


@needs_scan
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_on_another_device_than_the_current_one():
    inputs = make_inputs(2, 37, 2, 40, 16, f32, device="cuda:1")
    assert torch.cuda.current_device() == 0
    y = scan_cuda.bimamba_scan(**inputs, poison_outputs=True)
    assert y.device == torch.device("cuda:1")
    assert rel_err(y, reference(**{k: None if v is None else v.double() for k, v in inputs.items()})) < TOL[f32]


@needs_scan
def test_gpu_second_load_comes_from_the_disk_cache(monkeypatch, tmp_path):
    """A fresh process (no kernels loaded) compiles once; the next loads the cached cubin."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiled = []
    real = scan_cuda.compile_program
    monkeypatch.setattr(scan_cuda, "compile_program", lambda *a, **k: compiled.append(a) or real(*a, **k))
    inputs = make_inputs(2, 37, 2, 40, 16, f16)
    results = []
    for _ in range(2):
        monkeypatch.setattr(scan_cuda, "_loaded", {})  # as in a new process
        results.append(scan_cuda.bimamba_scan(**inputs))
    assert compiled == [(f16, f32, scan_cuda._device(0).arch)]
    assert len(list((tmp_path / "dis").iterdir())) == 1
    assert torch.equal(results[0], results[1])


@needs_scan
def test_gpu_bf16_rounding_without_the_instruction():
    """bf16_rne, the rounding of GPUs older than sm_80 (which have no cvt.rn.bf16.f32), against
    torch's float32 -> bfloat16 on random bit patterns and the edge cases: ties, the largest
    finite values, infinities, NaNs, subnormals."""
    kernel = """
struct RoundArgs { const float* x; unsigned short* out; int n; };
extern "C" __global__ void round_bf16(RoundArgs a) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < a.n) a.out[i] = dis::bf16_rne(a.x[i]);
}
"""

    class RoundArgs(ctypes.Structure):
        _fields_ = [("x", ctypes.c_void_p), ("out", ctypes.c_void_p), ("n", ctypes.c_int)]
    edges = [0x3f808000, 0x3f818000, 0x3f80ffff, 0x7f7fffff, 0x7f7f8000, 0x7f800000, 0xff800000, 0x7fc00000,
             0x7f800001, 0xffffffff, 0x00000001, 0x807fffff, 0x00008000, 0x80000000]
    bits = torch.cat([torch.tensor(edges, dtype=torch.int64),
                      torch.randint(0, 2 ** 32, (1 << 20,), generator=torch.Generator().manual_seed(0))])
    x = bits.to(torch.int32).view(f32).cuda()  # two's complement keeps the bits
    out = torch.empty(x.shape, dtype=torch.int16, device="cuda")
    program = scan_cuda._nvrtc_compile(scan_cuda._source() + kernel, ["round_bf16"], scan_cuda._device(0).arch)
    function = scan_cuda._load_module(0, program.image, [program.names["round_bf16"]])[program.names["round_bf16"]]
    with scan_cuda._Current(scan_cuda._device(0).context):
        args = RoundArgs(x.data_ptr(), out.data_ptr(), x.numel())
        scan_cuda._launch(function, (x.numel() // 256 + 1, 1), 256, torch.cuda.current_stream().cuda_stream,
                         scan_cuda._arguments(args))
    ours, torch_bf16 = out.view(bf16), x.to(bf16)
    nan = torch.isnan(torch_bf16)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(ours[~nan].view(torch.int16), torch_bf16[~nan].view(torch.int16))


@needs_scan
def test_gpu_available_here():
    assert scan_cuda.available() and scan_cuda.why_unavailable() == ""
    scan_cuda.build("cuda")
    assert scan_cuda.loaded("cuda")


@needs_scan
def test_gpu_operators_match_their_fake_implementations():
    """The shapes, dtypes and strides that torch.compile is told (register_fake) are the real ones."""
    inputs = make_inputs(2, 37, 2, 40, 16, bf16)
    args = list(inputs.values())
    for states_dtype in (bf16, f32):
        y, states = torch.ops.dis.scan_cuda_fwd(*args, True, 1, states_dtype, False)
        torch.library.opcheck(torch.ops.dis.scan_cuda_fwd, (*args, True, 1, states_dtype, False),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.dis.scan_cuda_bwd, (torch.randn_like(y), *args, states, 1, False),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.dis.scan_cuda_states, (*args, states_dtype, False),
                              test_utils=("test_schema", "test_faketensor"))
