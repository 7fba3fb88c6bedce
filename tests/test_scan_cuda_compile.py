"""scan_cuda without a GPU: scan_cuda.cu compiles with NVRTC for the GPUs DiS is trained on, the
kernels' argument structs match scan_cuda.py's, and the host side (argument packing, the disk
cache, the reasons given when the scan cannot run) does what it says. The NVRTC tests are skipped
only where NVRTC cannot be loaded."""
import ctypes
import logging
import os
import re

import numpy as np
import pytest
import torch

import scan_cuda
from scan_cuda import Unavailable


def _nvrtc_missing():
    try:
        scan_cuda.nvrtc_version()
        return ""
    except Unavailable as e:
        return str(e)


needs_nvrtc = pytest.mark.skipif(bool(_nvrtc_missing()), reason=_nvrtc_missing() or "NVRTC is here")
bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32


# ---- compiling -------------------------------------------------------------------------------------------
@needs_nvrtc
@pytest.mark.parametrize("dtype, states_dtype, arch", [
    (f32, f32, "sm_90"), (bf16, bf16, "sm_90"), (bf16, f32, "sm_90"), (f16, f16, "sm_90"), (f16, f32, "sm_90"),
    (bf16, bf16, "sm_80"), (f16, f32, "sm_89"),  # A100, L40/RTX 4090 (each program takes seconds: one each)
])
def test_kernels_compile_without_warnings(dtype, states_dtype, arch):
    """Every program DiS loads compiles for the H100/H200; one each for the A100 and Ada cards.
    The compile also checks Params and Sums against the kernels' structs (static_asserts)."""
    program = scan_cuda.compile_program(dtype, states_dtype, arch)
    assert program.log == ""
    assert program.image[:4] == b"\x7fELF"  # a cubin
    assert set(program.names) == set(scan_cuda.name_expressions(dtype, states_dtype))
    assert all(lowered.startswith("_Z") and lowered.encode() in program.image for lowered in program.names.values())


def _layout_only(monkeypatch, **structs):
    """Compile scan_cuda.cu with the layout checks of `structs` in place of Params / Sums, no
    kernel instantiated (front end only: a fraction of a second)."""
    for name, struct in structs.items():
        monkeypatch.setattr(scan_cuda, name, struct)
    with open(scan_cuda.SOURCE) as f:
        text = f.read() + "\n" + scan_cuda._layout_checks()
    return scan_cuda._nvrtc_compile(text, [], "compute_90")


def _struct(name, fields):
    return type(name, (ctypes.Structure,), {"_fields_": fields})


@needs_nvrtc
def test_layout_checks_catch_a_mismatch(monkeypatch):
    """The same checks that pass in every compile above fail for structs laid out otherwise:
    fields in another order, of another type, or missing."""
    assert _layout_only(monkeypatch).log == ""
    fields = list(scan_cuda.Params._fields_)
    i, j = [name for name, _ in fields].index("su_b"), [name for name, _ in fields].index("su_l")
    swapped = fields.copy()
    swapped[i], swapped[j] = fields[j], fields[i]
    with pytest.raises(Unavailable, match="Params lists other fields or another order"):
        _layout_only(monkeypatch, Params=_struct("Params", swapped))
    narrowed = [(name, ctypes.c_int if name == "per_b" else t) for name, t in fields]
    with pytest.raises(Unavailable, match="Params has another size|Params.per_b: another type"):
        _layout_only(monkeypatch, Params=_struct("Params", narrowed))
    with pytest.raises(Unavailable, match="could not compile"):
        _layout_only(monkeypatch, Sums=_struct("Sums", scan_cuda.Sums._fields_[:-1]))


@needs_nvrtc
def test_a_compile_error_is_its_first_error_line():
    with pytest.raises(Unavailable) as e:
        scan_cuda._nvrtc_compile("__global__ void k() { int x = undefined_name; }\n", [], "compute_90")
    message = str(e.value)
    assert "\n" not in message and 'identifier "undefined_name" is undefined' in message and "compute_90" in message


@needs_nvrtc
def test_target_of_each_gpu():
    archs = scan_cuda._supported_archs()
    assert scan_cuda._target((9, 0)) == "sm_90"
    assert scan_cuda._target((8, 9)) == "sm_89"
    assert scan_cuda._target((99, 0)) == f"compute_{max(archs)}"  # newer than NVRTC: PTX, compiled by the driver
    with pytest.raises(Unavailable, match="does not compile for sm_30"):
        scan_cuda._target((3, 0))


# ---- the kernels' arguments ------------------------------------------------------------------------------
def test_params_hold_each_tensors_address_strides_and_sizes():
    batch, L, ND, E, N, save_every = 2, 9, 2, 8, 12, 3
    u = torch.randn(L, batch, ND, E).transpose(0, 1)  # unit stride along E, others permuted
    delta = torch.randn(batch, L, ND, E)
    A, D, bias = torch.randn(ND, E, N), torch.randn(ND, E), torch.randn(ND, E)
    x_proj = torch.randn(batch, L, ND, 2 * N + 3)
    B, C = x_proj[..., 3:3 + N], x_proj[..., 3 + N:]  # strided slices, as DiS's mixer passes them
    z = torch.randn(batch, L, 2 * E)[..., E:]
    y = torch.empty(batch, L, E)
    states = torch.empty(batch, ND, 1, E, 16)
    p = scan_cuda._params(u, delta, A, B, C, D, z, bias, save_every, 1, y=y, states=states)
    for field, x in (("u", u), ("dl", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("bias", bias),
                     ("y", y), ("states", states)):
        assert getattr(p, field) == x.data_ptr(), field
    assert (p.su_b, p.su_l, p.su_d) == u.stride()[:3]
    assert (p.sd_b, p.sd_l, p.sd_d) == delta.stride()[:3]
    assert (p.sB_b, p.sB_l, p.sB_d, p.sB_n) == B.stride() and (p.sC_b, p.sC_l, p.sC_d, p.sC_n) == C.stride()
    assert (p.sz_b, p.sz_l) == (L * 2 * E, 2 * E) and (p.sy_b, p.sy_l) == (L * E, E)
    assert (p.batch, p.L, p.E, p.ND, p.N, p.save_every, p.n_saved) == (batch, L, E, ND, N, save_every, 1)
    assert p.save_states and p.dy is None and p.du is None and p.dA is None
    no_states = scan_cuda._params(u, delta, A, B, C, None, z, None, 1, 0, y=y)
    assert not no_states.save_states and no_states.states is None and no_states.D is None and no_states.bias is None


def test_backward_params_split_one_buffer_of_per_channel_sums():
    batch, L, ND, E, N = 3, 5, 2, 4, 16
    u = torch.randn(batch, L, ND, E)
    A, B = torch.randn(ND, E, N), torch.randn(batch, L, ND, N)
    z, dy = torch.randn(batch, L, E), torch.randn(batch, L, E)
    per_b = ND * E * (N + 2)
    per_channel = torch.empty(batch, per_b)
    p = scan_cuda._params(u, u, A, B, B, None, z, None, 1, 2, dy=dy, per_channel=per_channel, du=u, ddelta=u, dz=z)
    start = per_channel.data_ptr()
    assert (p.dA, p.dD, p.dbias) == (start, start + 4 * ND * E * N, start + 4 * (ND * E * N + ND * E))
    assert p.per_b == per_b and (p.sy_b, p.sy_l) == dy.stride()[:2] and p.dy == dy.data_ptr() and p.y is None


def test_saved_states_count():
    """A state at the start of every save_every-th chunk of CHUNK steps (the last chunk may be partial)."""
    assert scan_cuda.CHUNK == 4
    assert [scan_cuda._n_saved(L, 1) for L in (1, 4, 5, 256)] == [1, 1, 2, 64]
    assert [scan_cuda._n_saved(L, 3) for L in (4, 12, 13, 256)] == [1, 1, 2, 22]


def test_softplus_polynomial_is_log1p_to_float32_precision():
    """scan_cuda.cu's softplus is max(x, 0) + log1p(w), w = e^-|x|, with log1p(w) = w Q(w): Q's
    coefficients, read from the source, against numpy's log1p (float64) on (0, 1]; then softplus
    as the kernel evaluates it in float32 (fused multiply-adds: exact products, one rounding)
    against log(1 + e^x), and x itself above torch's threshold of 20."""
    text = re.search(r"constexpr float Q\[\] = \{(.*?)\};", open(scan_cuda.SOURCE).read(), re.S).group(1)
    Q = np.array([float(c.strip().rstrip("f")) for c in text.split(",")], dtype=np.float32)
    w = np.linspace(0.0, 1.0, 100_001)[1:]
    assert np.abs(w * np.polyval(Q[::-1].astype(np.float64), w) / np.log1p(w) - 1).max() < 2e-7

    x = np.linspace(-30, 30, 600_001).astype(np.float32)
    w = np.exp(-np.abs(x.astype(np.float64))).astype(np.float32)
    q = Q[-1]
    for c in Q[-2::-1]:
        q = (q.astype(np.float64) * w + c).astype(np.float32)
    softplus = np.maximum(x, np.float32(0)) + w * q
    assert np.abs(softplus / np.logaddexp(0.0, x.astype(np.float64)) - 1).max() < 4e-7
    assert np.array_equal(softplus[x > 20], x[x > 20])


# ---- the disk cache ------------------------------------------------------------------------------------
@pytest.fixture
def fake_compiler(monkeypatch, tmp_path):
    """NVRTC replaced by a counter (the cache logic alone), the cache in a fresh folder."""
    calls = []

    def compile_program(dtype, states_dtype, arch, options=()):
        calls.append((dtype, states_dtype, arch))
        return scan_cuda.Program(b"\x7fELF" + bytes(range(256)) + b"\n\n", {"k<float>": "_Z1kIfEvv"}, "")
    monkeypatch.setattr(scan_cuda, "compile_program", compile_program)
    monkeypatch.setattr(scan_cuda, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return calls


def test_compiled_once_then_loaded_from_disk(fake_compiler, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="scan_cuda"):
        scan_cuda._announce.cache_clear()
        first = scan_cuda._program(bf16, bf16, "sm_90")
    assert fake_compiler == [(bf16, bf16, "sm_90")]
    assert "seconds, once" in caplog.text and str(tmp_path / "dis") in caplog.text
    assert os.listdir(tmp_path / "dis") == [os.path.basename(scan_cuda._cache_path(bf16, bf16, "sm_90"))]
    again = scan_cuda._program(bf16, bf16, "sm_90")
    assert fake_compiler == [(bf16, bf16, "sm_90")]  # not compiled again
    assert (again.image, again.names) == (first.image, first.names)


def test_a_damaged_cache_file_is_compiled_anew(fake_compiler):
    path = scan_cuda._cache_path(f32, f32, "sm_80")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"{not json")
    assert scan_cuda._program(f32, f32, "sm_80").names == {"k<float>": "_Z1kIfEvv"}
    assert len(fake_compiler) == 1
    assert scan_cuda._program(f32, f32, "sm_80").names == {"k<float>": "_Z1kIfEvv"} and len(fake_compiler) == 1


def test_cache_key_covers_what_changes_the_image(fake_compiler, monkeypatch):
    paths = {scan_cuda._cache_path(bf16, bf16, "sm_90"), scan_cuda._cache_path(bf16, f32, "sm_90"),
             scan_cuda._cache_path(f16, f16, "sm_90"), scan_cuda._cache_path(bf16, bf16, "sm_89")}
    monkeypatch.setattr(scan_cuda, "nvrtc_version", lambda: (12, 8))
    paths.add(scan_cuda._cache_path(bf16, bf16, "sm_90"))
    monkeypatch.setattr(scan_cuda, "_source", lambda: "// another kernel source")
    paths.add(scan_cuda._cache_path(bf16, bf16, "sm_90"))
    monkeypatch.setattr(scan_cuda, "_OPTIONS", ("-std=c++17", "--use_fast_math"))
    paths.add(scan_cuda._cache_path(bf16, bf16, "sm_90"))
    assert len(paths) == 7


def test_an_unwritable_cache_only_warns(fake_compiler, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the folder would go
    with caplog.at_level(logging.WARNING, logger="scan_cuda"):
        assert scan_cuda._program(f32, f32, "sm_90").names == {"k<float>": "_Z1kIfEvv"}
    assert "could not cache" in caplog.text


# ---- when the scan cannot run -----------------------------------------------------------------------------
@pytest.fixture
def pretend_gpu(monkeypatch, tmp_path):
    """torch believing in a GPU 0, an sm_90 one, and an empty kernel cache; the scan's process-wide
    caches emptied before and after."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(scan_cuda, "_loaded", {})
    caches = (scan_cuda._unavailable_reason, scan_cuda._driver, scan_cuda._nvrtc, scan_cuda._device, scan_cuda._source)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def _sm90(index):
    return scan_cuda._Device(context=1, arch="sm_90")


def test_no_gpu_is_a_reason():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    scan_cuda._unavailable_reason.cache_clear()
    assert not scan_cuda.available()
    assert scan_cuda.why_unavailable() == "the CUDA scan cannot run here: no CUDA GPU"


def missing_library(monkeypatch, fragment):
    """Make ctypes fail to open the shared libraries whose names contain fragment."""
    real = ctypes.CDLL

    def cdll(name, *args, **kwargs):
        if fragment in str(name):
            raise OSError(f"{name}: cannot open shared object file")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(ctypes, "CDLL", cdll)


def test_no_driver_is_a_reason(pretend_gpu, monkeypatch):
    missing_library(monkeypatch, "cuda")
    assert not scan_cuda.available()
    reason = scan_cuda.why_unavailable()
    assert "\n" not in reason and "NVIDIA driver" in reason and "cannot open shared object file" in reason


def test_no_nvrtc_is_a_reason(pretend_gpu, monkeypatch):
    monkeypatch.setattr(scan_cuda, "_device", _sm90)
    missing_library(monkeypatch, "nvrtc")
    assert not scan_cuda.available()
    reason = scan_cuda.why_unavailable()
    assert "\n" not in reason and reason.startswith("the CUDA scan cannot run here: NVRTC could not be loaded (")
    with pytest.raises(RuntimeError, match="the CUDA scan cannot run cuda:0: NVRTC could not be loaded"):
        scan_cuda.build("cuda:0")


@needs_nvrtc
def test_a_compile_error_is_a_reason(pretend_gpu, monkeypatch):
    monkeypatch.setattr(scan_cuda, "_device", _sm90)
    monkeypatch.setattr(scan_cuda, "_source", lambda: "namespace dis { int broken = ; }\n")
    assert not scan_cuda.available()
    reason = scan_cuda.why_unavailable()
    assert "\n" not in reason and "NVRTC could not compile scan_cuda.cu for sm_90: scan_cuda.cu(1): error" in reason


# ---- the calls the kernels take ------------------------------------------------------------------------------
def test_supports_only_dis_mixer_calls(monkeypatch):
    u, A, B, z = torch.zeros(1, 4, 2, 8), torch.zeros(2, 8, 16), torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 8)
    assert not scan_cuda.supports(u, u, A, B, B, z, True)  # CPU tensors
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert scan_cuda.supports(u, u, A, B, B, z, True)
    assert not scan_cuda.supports(u, u, A, B, B, z, False)
    assert not scan_cuda.supports(u, u, A, B, B, None, True)
    assert not scan_cuda.supports(u, u, torch.zeros(2, 8, 17), B, B, z, True)
    assert not scan_cuda.supports(u.double(), u.double(), A, B.double(), B.double(), z.double(), True)
    assert not scan_cuda.supports(u.bfloat16(), u, A, B, B, z, True)


def test_default_states_dtype():
    assert scan_cuda.default_states_dtype(bf16) == bf16
    assert scan_cuda.default_states_dtype(f16) == f32  # float16's range is too narrow for states
    assert scan_cuda.default_states_dtype(f32) == f32


def _args(batch=1, L=4, ND=2, E=8, N=16, dtype=f32):
    return dict(u=torch.zeros(batch, L, ND, E, dtype=dtype), delta=torch.zeros(batch, L, ND, E, dtype=dtype),
                A=torch.zeros(ND, E, N), B=torch.zeros(batch, L, ND, N, dtype=dtype),
                C=torch.zeros(batch, L, ND, N, dtype=dtype), D=None, z=torch.zeros(batch, L, E, dtype=dtype),
                delta_bias=None)


@pytest.mark.parametrize("change, message", [
    (dict(u=torch.zeros(1, 0, 2, 8)), r"u must be a non-empty \(batch, L, ND, E\), got \(1, 0, 2, 8\)"),
    (dict(z=None), "z: the CUDA scan .* needs the gate z"),
    (dict(A=torch.zeros(2, 8, 32), B=torch.zeros(1, 4, 2, 32), C=torch.zeros(1, 4, 2, 32)), "at most 16 states"),
    (dict(), "u must be a CUDA tensor"),
])
def test_bad_arguments_name_the_argument(change, message):
    with pytest.raises(ValueError, match=message):
        scan_cuda.bimamba_scan(**{**_args(), **change})


def test_bad_options_name_the_option(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    args = _args(dtype=bf16)
    with pytest.raises(ValueError, match="save_every must be an integer >= 0, got -1"):
        scan_cuda.bimamba_scan(**args, save_every=-1)
    with pytest.raises(ValueError, match="states_dtype must be float32 or u's dtype"):
        scan_cuda.bimamba_scan(**args, states_dtype=f16)
    with pytest.raises(ValueError, match="C must have u's dtype"):
        scan_cuda.bimamba_scan(**{**args, "C": args["C"].float()})


# ---- torch.compile -----------------------------------------------------------------------------------------
@pytest.fixture
def cpu_stand_in(monkeypatch):
    """The operators on the CPU as zeros of the shapes their fake implementations give (kernels
    registered once per process, only ever reached from tests), and the CUDA check skipped."""
    for op, fake in ((scan_cuda._fwd_op, scan_cuda._fwd_fake), (scan_cuda._bwd_op, scan_cuda._bwd_fake)):
        if "cpu" not in op._backend_fns:
            op.register_kernel("cpu")(lambda *a, fake=fake: type(fake(*a))(t.zero_() for t in fake(*a)))
    if "cpu" not in scan_cuda._states_op._backend_fns:
        scan_cuda._states_op.register_kernel("cpu")(lambda *a: scan_cuda._states_fake(*a).zero_())
    monkeypatch.setattr(scan_cuda, "_check_args", lambda *a: None)


@pytest.mark.parametrize("dtype", [f32, bf16])
@pytest.mark.parametrize("save_every", [0, 1])
def test_compile_keeps_the_scan_in_one_graph(cpu_stand_in, dtype, save_every):
    """torch.compile traces the forward and backward without a graph break (they are registered
    operators, the states' recomputation too), so the glue around the scan fuses."""
    torch._dynamo.reset()
    leaves = {k: v.requires_grad_(k != "A") if v is not None else None for k, v in _args(2, 9, 2, 8, 16, dtype).items()}

    def loss(**kw):
        return (scan_cuda.bimamba_scan(**kw, save_every=save_every) * kw["u"].sum()).sum()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(**leaves).backward()
    assert all(leaves[k].grad is not None for k in ("u", "delta", "B", "C", "z"))


def test_fake_states_have_the_dtype_asked_for():
    args = _args(2, 9, 2, 8, 16, bf16)
    for states_dtype in (bf16, f32):
        y, states = scan_cuda._fwd_fake(*args.values(), True, 2, states_dtype, False)
        assert y.shape == (2, 9, 8) and y.dtype == bf16
        assert states.shape == (2, 2, 2, 8, 16) and states.dtype == states_dtype
