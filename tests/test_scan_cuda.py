"""scan_cuda.py (our CUDA scan kernels) against the float64 loop reference of test_scan_triton.py,
on the GPU; the extension is built on first use (a minute or more). Without a GPU, nvcc or ninja
these tests are skipped, and the CPU checks at the end run."""
import pytest
import torch

import scan
import scan_cuda
from scan_triton import bimamba_scan
from test_scan_triton import check_bimamba, make_inputs, poisoned_empty  # noqa: F401 (a fixture)

needs_extension = pytest.mark.skipif(not scan_cuda.available(), reason="needs a GPU, nvcc and ninja")


@pytest.fixture
def poisoned(poisoned_empty):
    """poisoned_empty, and the buffers the extension allocates NaN too: an element the kernels
    skip (an output, or a partial sum the extension finishes) shows in the results."""
    scan_cuda._ext().poison_outputs(True)
    yield
    scan_cuda._ext().poison_outputs(False)


@pytest.fixture
def cuda_calls(monkeypatch):
    """Counts the calls that reach the CUDA kernels (the others run the Triton ones)."""
    calls = []
    real = scan_cuda.forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(scan_cuda, "forward", spy)
    return calls


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4), (torch.float16, 5e-3)])
@pytest.mark.parametrize("batch, L, ND, E, N", [(2, 259, 2, 200, 16), (3, 130, 1, 96, 16), (2, 37, 2, 300, 12)])
def test_gpu_cuda_bimamba(poisoned, cuda_calls, dtype, tol, batch, L, ND, E, N):
    check_bimamba(batch, L, ND, E, N, dtype, "cuda", tol, impl="cuda")
    assert cuda_calls


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("save_every", [2, 3])
def test_gpu_cuda_sparse_checkpoints(poisoned, cuda_calls, monkeypatch, save_every):
    import scan_triton
    monkeypatch.setattr(scan_triton, "SCAN_SAVE_EVERY", save_every)
    check_bimamba(2, 259, 2, 200, 16, torch.float32, "cuda", 1e-4, impl="cuda")
    assert cuda_calls


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("batch, L, ND, E", [(6, 65, 2, 3072), (23, 70, 1, 768)])
def test_gpu_cuda_last_partial_wave(poisoned, cuda_calls, batch, L, ND, E):
    """Shapes whose backward ends in a partial wave of at most one block per SM on an H100 (132
    SMs, two blocks of 64 channels each: 288 and 276 blocks): those blocks run as a second
    launch, of the kernel compiled for one block per SM."""
    check_bimamba(batch, L, ND, E, 16, torch.bfloat16, "cuda", 1e-2, impl="cuda")
    assert cuda_calls


@pytest.mark.gpu
@needs_extension
def test_gpu_cuda_without_d_and_bias(poisoned, cuda_calls):
    check_bimamba(2, 77, 2, 40, 16, torch.float32, "cuda", 1e-4, D=False, delta_bias=False, impl="cuda")
    assert cuda_calls


@pytest.mark.gpu
@needs_extension
def test_gpu_cuda_hands_other_calls_to_triton(cuda_calls):
    """No softplus, or no gate: not DiS's mixer, so the Triton kernels compute it, still correctly.
    (Without softplus the step must stay positive: no delta_bias, see make_inputs.)"""
    check_bimamba(2, 77, 2, 40, 16, torch.float32, "cuda", 1e-4, delta_bias=False, softplus=False, impl="cuda")
    check_bimamba(2, 77, 2, 40, 16, torch.float32, "cuda", 1e-4, z=False, impl="cuda")
    assert not cuda_calls


@pytest.mark.gpu
@needs_extension
def test_gpu_cuda_is_the_default_backend():
    assert scan.available_backends("cuda")[0] == "cuda"


def test_bad_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="impl must be 'triton' or 'cuda'"):
        bimamba_scan(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), torch.zeros(2, 8, 16),
                     torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16), impl="cpp")


def test_supports_only_dis_mixer_calls():
    u = torch.zeros(1, 4, 2, 8)
    A, B, z = torch.zeros(2, 8, 16), torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 8)
    assert not scan_cuda.supports(u, u, A, B, B, z, True)  # CPU tensors
    if torch.cuda.is_available():
        g = [x.cuda() for x in (u, A, B, z)]
        assert scan_cuda.supports(g[0], g[0], g[1], g[2], g[2], g[3], True)
        assert not scan_cuda.supports(g[0], g[0], g[1], g[2], g[2], g[3], False)
        assert not scan_cuda.supports(g[0], g[0], g[1], g[2], g[2], None, True)
        assert not scan_cuda.supports(g[0], g[0], torch.zeros(2, 8, 17, device="cuda"), g[2], g[2], g[3], True)
        assert not scan_cuda.supports(g[0].double(), g[0].double(), g[1], g[2].double(), g[2].double(),
                                      g[3].double(), True)


def test_one_direction_calls_prefer_the_triton_kernel(monkeypatch):
    """selective_scan (one direction) runs the Triton kernel unless the CUDA one is forced: for one
    direction it is the faster (BENCHMARKS.md)."""
    seen = []
    monkeypatch.setattr(scan, "scan_backend", lambda device, backend=None: "cuda")
    import scan_triton
    monkeypatch.setattr(scan_triton, "selective_scan_triton", lambda *a, impl: seen.append(impl))
    monkeypatch.delenv("DIS_SCAN_BACKEND", raising=False)
    u = torch.zeros(1, 8, 4)
    scan.selective_scan(u, u, torch.zeros(8, 16), torch.zeros(1, 16, 4), torch.zeros(1, 16, 4))
    scan.selective_scan(u, u, torch.zeros(8, 16), torch.zeros(1, 16, 4), torch.zeros(1, 16, 4), backend="cuda")
    assert seen == ["triton", "cuda"]


def test_unavailable_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(scan_cuda, "available", lambda: False)
    scan_cuda._ext.cache_clear()
    with pytest.raises(RuntimeError, match="DIS_SCAN_BACKEND=triton"):
        scan_cuda._ext()
    scan_cuda._ext.cache_clear()


@pytest.mark.gpu
@needs_extension
def test_gpu_operators_match_their_fake_implementations():
    """The shapes, dtypes and strides that torch.compile is told (register_fake) are the real ones."""
    inputs = make_inputs(2, 37, 2, 40, 16, torch.bfloat16, "cuda")
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y, states = torch.ops.dis.scan_cuda_fwd(*args, True, 1)
    torch.library.opcheck(torch.ops.dis.scan_cuda_fwd, (*args, True, 1), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.dis.scan_cuda_bwd, (torch.randn_like(y), *args, states, 1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.fixture
def cpu_stand_in(monkeypatch):
    """The operators on the CPU as zeros of the shapes their fake implementations give (kernels
    registered once per process, only ever reached from tests), and every call routed to them."""
    for op, fake in ((scan_cuda._fwd_op, scan_cuda._fwd_fake), (scan_cuda._bwd_op, scan_cuda._bwd_fake)):
        if "cpu" not in op._backend_fns:
            op.register_kernel("cpu")(lambda *a, fake=fake: _zeros(fake(*a)))
    monkeypatch.setattr(scan_cuda, "supports", lambda *a: True)


def _zeros(out):
    return type(out)(t.zero_() for t in out)


def test_compile_keeps_the_cuda_scan_in_one_graph(cpu_stand_in):
    """torch.compile traces the CUDA scan's forward and backward without a graph break (the calls
    into the extension are registered operators), so the glue around it fuses."""
    torch._dynamo.reset()
    inputs = make_inputs(2, 9, 2, 8, 16, torch.float32, "cpu")
    leaves = {k: v.detach().requires_grad_(k != "A") for k, v in inputs.items()}

    def loss(**kw):
        return (bimamba_scan(**kw, impl="cuda") * kw["u"].sum()).sum()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(**leaves).backward()
    assert all(leaves[k].grad is not None for k in ("u", "delta", "B", "C", "z"))


def test_the_cuda_scan_is_built_before_anything_is_timed(monkeypatch):
    """train.py and sample.py resolve the scan backend before their first step: the CUDA scan's
    extension is compiled there (minutes on first use, not inside --max-minutes' clock), and a
    build that fails stops the run saying what to use instead."""
    import functools
    monkeypatch.setattr(scan, "scan_backend", lambda device: "cuda")
    built, said = [], []
    monkeypatch.setattr(scan_cuda, "build", lambda: built.append(True))
    monkeypatch.setattr(scan_cuda, "loaded", lambda: False)
    assert scan.active_scan_backend("cuda", say=said.append) == "cuda" and built
    assert "one to three minutes" in said[0]
    monkeypatch.undo()
    monkeypatch.setattr(scan, "scan_backend", lambda device: "cuda")

    @functools.cache
    def broken():
        raise RuntimeError("Error building extension 'dis_scan_cuda'")
    monkeypatch.setattr(scan_cuda, "_ext", broken)
    with pytest.raises(SystemExit, match="Error building extension(.|\n)*--scan-backend triton"):
        scan.active_scan_backend("cuda", say=lambda message: None)
