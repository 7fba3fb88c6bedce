"""Our CUDA selective scan for DiS's bidirectional mixer: the kernels of scan_cuda.cu, compiled at
run time with NVRTC, and the autograd function around them.

    y = bimamba_scan(u, delta, A, B, C, D, z, delta_bias)        # (batch, L, E)

computes, for direction 0 walking t = 0..L-1 and direction 1 walking t = L-1..0 (the scan of the
flipped sequence, flipped back), per batch element, channel e and state n (Mamba, Algorithm 2):
    delta_t = softplus(delta_t + delta_bias)
    h_t     = exp(delta_t A) h_{t-1} + delta_t B_t u_t                  (h before the first step = 0)
    y_t     = sum over directions of (sum_n C_t h_t + D u_t) * silu(z_t)
in token-major layout: u, delta (batch, L, ND, E) with ND = 1 or 2 directions; A (ND, E, N),
N <= 16 states; B, C (batch, L, ND, N); D, delta_bias (ND, E) or None; the gate z (batch, L, E),
shared by the directions. u, delta, B, C and z share one dtype (float32, bfloat16 or float16), in
which y and their gradients come back; the state and all sums are float32. Any strides. The
design of the kernels is at the top of scan_cuda.cu; scan.py's selective_scan_ref is the
definition the tests compare against.

For training, the backward pass needs the state at the start of every chunk of CHUNK steps,
(batch, ND, chunks, E, 16), from which it recomputes the chunks. Kept from the forward pass they
would be the largest part of a training step's memory at DiS's sizes (four times u's bytes), so
by default (save_every = 0) the forward pass keeps none and the backward pass first runs the
forward pass again, writing only the states, into memory it frees when done: the cost of a
forward pass for the memory of all the states. save_every >= 1 keeps every save_every-th
chunk's state from the forward pass instead. The states are float32 or u's 16-bit type
(`states_dtype`); the default is bfloat16 for bfloat16 inputs; float16 inputs keep float32
states, as float16's range (up to 65504) may be narrower than the states'.

The kernels are compiled with NVRTC, which ships with PyTorch's CUDA wheels, for the GPU at hand:
one program per input dtype and states dtype, the first time it is used, in seconds. The result
is cached on disk ($XDG_CACHE_HOME/dis or ~/.cache/dis), so nothing needs a compiler on the
user's machine. Where the scan cannot run (no NVIDIA driver, no NVRTC, a failed compile)
`available()` is False and `why_unavailable()` says why in one line; scan.py then runs the Triton
scan. NVRTC and the CUDA driver are called through ctypes rather than cuda-bindings, because the C
functions used here have kept their signatures since CUDA 11 while cuda-bindings' Python API has
moved between its releases, and a ctypes call passing the kernel's arguments as one Structure
costs about a microsecond.
"""
import ctypes
import functools
import glob
import hashlib
import json
import logging
import os
import struct
import sys
import tempfile
import threading
from typing import NamedTuple, Optional

import torch

log = logging.getLogger(__name__)

MAX_STATES = 16  # states per channel the kernels hold (scan_cuda.cu's NS); fewer are padded
CHUNK = 4  # steps between the states the forward pass saves (scan_cuda.cu's CHUNK)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scan_cuda.cu")

# The launch configuration, passed to the kernels as template arguments: one channel per thread;
# the forward pass in segments of 4 steps, 128 threads per block, at least 4 blocks per SM (so at
# most 128 registers); the backward pass 128 threads per block, at least 2 blocks per SM.
FWD_SEGMENT, FWD_THREADS, FWD_MIN_BLOCKS = 4, 128, 4
BWD_THREADS, BWD_MIN_BLOCKS = 128, 2
FINISH_THREADS = 256
_C_TYPES = {torch.float32: "float", torch.bfloat16: "dis::bf16", torch.float16: "dis::f16"}
_OPTIONS = ("-std=c++17",)  # NVRTC's defaults otherwise: fused multiply-add on, IEEE division


# ---- the kernels' arguments ------------------------------------------------------------------------
def _pointers(*names):
    return [(name, ctypes.c_void_p) for name in names]


class Params(ctypes.Structure):
    """scan_cuda.cu's Params, field for field (checked when the source is compiled)."""
    _fields_ = (_pointers("u", "dl", "B", "C", "z", "dy", "A", "D", "bias", "y", "du", "ddl", "dz", "states",
                          "dBC", "dA", "dD", "dbias")
                + [(name, ctypes.c_int64) for name in ("su_b", "su_l", "su_d", "sd_b", "sd_l", "sd_d", "sB_b", "sB_l",
                                                        "sB_d", "sB_n", "sC_b", "sC_l", "sC_d", "sC_n", "sz_b", "sz_l",
                                                        "sy_b", "sy_l", "per_b")]
                + [(name, ctypes.c_int) for name in ("batch", "L", "E", "ND", "N", "save_every", "n_saved")]
                + [("save_states", ctypes.c_bool)])


class Sums(ctypes.Structure):
    """scan_cuda.cu's Sums: the arguments of the backward pass's last kernel."""
    _fields_ = (_pointers("dBC", "per_channel", "dB", "dC", "dA", "dD", "dbias")
                + [(name, ctypes.c_int64) for name in ("rows", "n_A", "n_D")]
                + [(name, ctypes.c_int) for name in ("n_blocks", "N", "batch")])


def _layout_checks():
    """C++ appended to scan_cuda.cu when it is compiled: static_asserts that Params and Sums above
    have the fields of the kernels' structs, in the same order, of the same kinds and sizes (so
    at the same offsets). Structured bindings check the count and order of the fields, as NVRTC
    has no offsetof."""
    kinds = {ctypes.c_void_p: 1, ctypes.c_int64: 2, ctypes.c_int: 3, ctypes.c_bool: 4}
    lines = ["namespace dis_layout {",
             "template <typename T> struct kind { static constexpr int id = 0; };",
             "template <typename T> struct kind<T*> { static constexpr int id = 1; };",
             "template <> struct kind<long long> { static constexpr int id = 2; };",
             "template <> struct kind<int> { static constexpr int id = 3; };",
             "template <> struct kind<bool> { static constexpr int id = 4; };"]
    for layout in (Params, Sums):
        name, fields = layout.__name__, [field for field, _ in layout._fields_]
        lines += [f"__device__ constexpr bool {name}_fields() {{",
                  f"  dis::{name} s{{}};",
                  f"  auto& [{', '.join(fields)}] = s;",
                  "  return " + " && ".join(f"&{f} == &s.{f}" for f in fields) + ";",
                  "}",
                  f'static_assert({name}_fields(), "scan_cuda.py\'s {name} lists other fields or another order");',
                  f'static_assert(sizeof(dis::{name}) == {ctypes.sizeof(layout)}, "scan_cuda.py\'s {name} has '
                  f'another size");']
        lines += [f'static_assert(kind<decltype(dis::{name}::{f})>::id == {kinds[t]}, "{name}.{f}: another type in '
                  f'scan_cuda.py");' for f, t in layout._fields_]
    lines += [f'static_assert(dis::CHUNK == {CHUNK} && dis::NS == {MAX_STATES}, "scan_cuda.py\'s CHUNK or MAX_STATES");',
              "}  // namespace dis_layout", ""]
    return "\n".join(lines)


def _packer(layout):
    """A struct.Struct packing the ctypes Structure `layout`'s fields, in order, into its exact
    bytes (padding included): packing and copying the bytes in is several times faster than the
    Structure's constructor, and a scan call is short enough for its host time to matter."""
    codes, at = ["="], 0
    for name, ctype in layout._fields_:
        offset = getattr(layout, name).offset
        codes += ["x" * (offset - at), {ctypes.c_void_p: "Q", ctypes.c_int64: "q", ctypes.c_int: "i",
                                        ctypes.c_bool: "?"}[ctype]]
        at = offset + ctypes.sizeof(ctype)
    codes.append("x" * (ctypes.sizeof(layout) - at))
    packer = struct.Struct("".join(codes))
    assert packer.size == ctypes.sizeof(layout)
    return packer


def _ptr(x):
    return 0 if x is None else x.data_ptr()


def _params(u, delta, A, B, C, D, z, bias, save_every, n_saved, *, y=None, dy=None, states=None, du=None,
            ddelta=None, dz=None, dBC=None, per_channel=None):
    """The kernels' Params for one call: addresses (0 for none), strides in elements, sizes. u,
    delta and z (and y or dy, whose strides go to sy_*) have unit stride along E; A, D and bias
    are contiguous float32. per_channel holds the backward's partial sums of dA, dD and dbias."""
    batch, L, ND, E = u.shape
    N = A.shape[-1]
    out = next(x for x in (y, dy, z) if x is not None)  # whose strides go to sy_* (z: neither is used)
    n_A, n_D = ND * E * N, ND * E
    dA = _ptr(per_channel)
    return Params.from_buffer_copy(_PACK_PARAMS.pack(
        u.data_ptr(), delta.data_ptr(), B.data_ptr(), C.data_ptr(), z.data_ptr(), _ptr(dy),
        A.data_ptr(), _ptr(D), _ptr(bias), _ptr(y), _ptr(du), _ptr(ddelta), _ptr(dz), _ptr(states), _ptr(dBC),
        dA, dA and dA + 4 * n_A, dA and dA + 4 * (n_A + n_D),  # float32 sections of one buffer
        *u.stride()[:3], *delta.stride()[:3], *B.stride(), *C.stride(), *z.stride()[:2], *out.stride()[:2],
        n_A + 2 * n_D, batch, L, E, ND, N, save_every, n_saved, states is not None))


_PACK_PARAMS, _PACK_SUMS = _packer(Params), _packer(Sums)


# ---- NVRTC and the CUDA driver through ctypes -------------------------------------------------------
class Unavailable(RuntimeError):
    """The CUDA scan cannot run here; the message is one line saying why."""


_P, _I, _SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_NVRTC_FUNCTIONS = {
    "nvrtcVersion": [ctypes.POINTER(_I), ctypes.POINTER(_I)],
    "nvrtcGetNumSupportedArchs": [ctypes.POINTER(_I)],
    "nvrtcGetSupportedArchs": [ctypes.POINTER(_I)],
    "nvrtcCreateProgram": [ctypes.POINTER(_P), ctypes.c_char_p, ctypes.c_char_p, _I, _P, _P],
    "nvrtcAddNameExpression": [_P, ctypes.c_char_p],
    "nvrtcCompileProgram": [_P, _I, ctypes.POINTER(ctypes.c_char_p)],
    "nvrtcGetProgramLogSize": [_P, ctypes.POINTER(_SIZE)],
    "nvrtcGetProgramLog": [_P, ctypes.c_char_p],
    "nvrtcGetCUBINSize": [_P, ctypes.POINTER(_SIZE)],
    "nvrtcGetCUBIN": [_P, ctypes.c_char_p],
    "nvrtcGetPTXSize": [_P, ctypes.POINTER(_SIZE)],
    "nvrtcGetPTX": [_P, ctypes.c_char_p],
    "nvrtcGetLoweredName": [_P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)],
    "nvrtcDestroyProgram": [ctypes.POINTER(_P)],
}
_CUDA_FUNCTIONS = {
    "cuInit": [ctypes.c_uint],
    "cuGetErrorName": [_I, ctypes.POINTER(ctypes.c_char_p)],
    "cuDeviceGet": [ctypes.POINTER(_I), _I],
    "cuDeviceGetAttribute": [ctypes.POINTER(_I), _I, _I],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(_P), _I],
    "cuCtxGetCurrent": [ctypes.POINTER(_P)],
    "cuCtxPushCurrent_v2": [_P],
    "cuCtxPopCurrent_v2": [ctypes.POINTER(_P)],
    "cuModuleLoadData": [ctypes.POINTER(_P), ctypes.c_char_p],
    "cuModuleGetFunction": [ctypes.POINTER(_P), _P, ctypes.c_char_p],
    "cuLaunchKernel": [_P, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                       ctypes.c_uint, _P, ctypes.POINTER(_P), _P],
}
_COMPUTE_CAPABILITY_MAJOR, _COMPUTE_CAPABILITY_MINOR = 75, 76  # CUdevice_attribute


def _declare(lib, functions):
    for name, argtypes in functions.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = argtypes, _I
    return lib


def _first_line(text):
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "unknown error")


def _nvrtc_candidates():
    """Where libnvrtc may be: as cuda.pathfinder (a dependency of PyTorch's CUDA wheels) finds it,
    in the nvidia wheels next to PyTorch, on the system's library path."""
    try:
        from cuda import pathfinder
        yield pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path
    except Exception:  # no cuda.pathfinder, or it found no NVRTC: look further
        pass
    for folder in sys.path:
        yield from sorted(glob.glob(os.path.join(folder, "nvidia", "*", "lib", "libnvrtc.so.*[0-9]")), reverse=True)
    yield from ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")


@functools.cache
def _nvrtc():
    """libnvrtc, the first that loads of _nvrtc_candidates."""
    reason = "not found"
    for path in filter(None, _nvrtc_candidates()):
        try:
            return _declare(ctypes.CDLL(path), _NVRTC_FUNCTIONS)
        except (OSError, AttributeError) as e:
            reason = _first_line(e)
    raise Unavailable(f"NVRTC could not be loaded ({reason})")


@functools.cache
def _driver():
    """libcuda, the NVIDIA driver's CUDA library, initialised."""
    try:
        lib = _declare(ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1"), _CUDA_FUNCTIONS)
    except (OSError, AttributeError) as e:
        raise Unavailable(f"the NVIDIA driver's CUDA library could not be loaded ({_first_line(e)})") from None
    _check(lib.cuInit(0), "cuInit", lib)
    return lib


def _check(rc, what, lib=None):
    if rc:
        name = ctypes.c_char_p()
        (lib or _driver()).cuGetErrorName(rc, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: {(name.value or b'CUDA error %d' % rc).decode()}")


def nvrtc_version():
    """(major, minor) of the NVRTC found here."""
    major, minor = _I(), _I()
    _nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def _supported_archs():
    lib, n = _nvrtc(), _I()
    lib.nvrtcGetNumSupportedArchs(ctypes.byref(n))
    archs = (_I * n.value)()
    lib.nvrtcGetSupportedArchs(archs)
    return list(archs)


def _target(capability):
    """What NVRTC compiles for a GPU of compute capability (major, minor): "sm_XY", a cubin; for
    a GPU newer than this NVRTC knows, PTX of its newest architecture ("compute_XY"), which the
    driver compiles on loading."""
    cc, archs = 10 * capability[0] + capability[1], _supported_archs()
    if cc in archs:
        return f"sm_{cc}"
    if cc > max(archs):
        return f"compute_{max(archs)}"
    major, minor = nvrtc_version()
    raise Unavailable(f"NVRTC {major}.{minor} does not compile for sm_{cc} (its oldest is sm_{min(archs)})")


# ---- compiling -----------------------------------------------------------------------------------------
class Program(NamedTuple):
    image: bytes  # cubin, or PTX for a compute_XY target
    names: dict   # name expression -> its lowered (mangled) name in the image
    log: str      # NVRTC's log: empty when the compile raised no warning


def name_expressions(dtype, states_dtype):
    """The kernels of one program, for inputs of `dtype` and saved states of `states_dtype`:
    the forward pass per direction, the backward pass per direction, the states alone (both
    directions), the backward pass's sums."""
    T, S = _C_TYPES[dtype], _C_TYPES[states_dtype]
    fwd = [f"dis::scan_fwd_kernel<{T}, {S}, {d}, {FWD_SEGMENT}, {FWD_THREADS}, {FWD_MIN_BLOCKS}>" for d in (0, 1)]
    bwd = [f"dis::scan_bwd_kernel<{T}, {S}, {d}, {BWD_THREADS}, {BWD_MIN_BLOCKS}>" for d in (0, 1)]
    states = f"dis::scan_states_kernel<{T}, {S}, {FWD_SEGMENT}, {FWD_THREADS}, {FWD_MIN_BLOCKS}>"
    return fwd + bwd + [states, f"dis::finish_bwd_kernel<{T}>"]


@functools.cache
def _source():
    """The text NVRTC compiles: scan_cuda.cu and the layout checks of Params and Sums."""
    with open(SOURCE) as f:
        return f.read() + "\n" + _layout_checks()


def _nvrtc_compile(text, names, arch, options=()):
    """NVRTC-compile `text` (named scan_cuda.cu in messages) for `arch` ("sm_90": a cubin,
    "compute_90": PTX), instantiating the templates `names`; a Program. A failed compile raises
    Unavailable with the log's first error line. Needs NVRTC only, no GPU."""
    lib, prog = _nvrtc(), _P()
    _nvrtc_check(lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), b"scan_cuda.cu", 0, None, None),
                 "nvrtcCreateProgram")
    try:
        for name in names:
            _nvrtc_check(lib.nvrtcAddNameExpression(prog, name.encode()), "nvrtcAddNameExpression")
        opts = [o.encode() for o in (f"--gpu-architecture={arch}", *_OPTIONS, *options)]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        text_log = _program_text(lib.nvrtcGetProgramLogSize, lib.nvrtcGetProgramLog, prog)
        text_log = text_log.decode(errors="replace").strip("\0 \n")
        if rc:
            errors = [line for line in text_log.splitlines() if "error" in line]
            raise Unavailable(f"NVRTC could not compile scan_cuda.cu for {arch}: "
                              f"{_first_line(errors[0] if errors else text_log)}")
        ptx = arch.startswith("compute_")
        image = (_program_text(lib.nvrtcGetPTXSize, lib.nvrtcGetPTX, prog) if ptx else
                 _program_text(lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN, prog))
        lowered = {}
        for name in names:
            out = ctypes.c_char_p()
            _nvrtc_check(lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)), "nvrtcGetLoweredName")
            lowered[name] = out.value.decode()
        return Program(image, lowered, text_log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _nvrtc_check(rc, what):
    if rc:
        raise Unavailable(f"{what} failed with NVRTC error {rc}")


def _program_text(size_of, get, prog):
    size = _SIZE()
    size_of(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    get(prog, buf)
    return buf.raw


def compile_program(dtype, states_dtype, arch, options=()):
    """scan_cuda.cu's kernels for inputs of `dtype` and states of `states_dtype`, compiled for
    `arch` by NVRTC (no cache): a Program."""
    return _nvrtc_compile(_source(), name_expressions(dtype, states_dtype), arch, options)


def _cache_dir():
    """Where compiled kernels are kept: $XDG_CACHE_HOME/dis, or ~/.cache/dis."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dis")


def _cache_path(dtype, states_dtype, arch):
    """The cache file of one program: named by a hash of all that determines the compiled image
    (the source, the target, the NVRTC version, the options, the kernels' names)."""
    names = name_expressions(dtype, states_dtype)
    key = json.dumps([_source(), arch, nvrtc_version(), _OPTIONS, names])
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return os.path.join(_cache_dir(), f"scan_cuda-{str(dtype)[6:]}-{str(states_dtype)[6:]}-{arch}-{digest}.bin")


@functools.cache
def _announce(where):
    log.info("Compiling the CUDA scan kernels with NVRTC (seconds, once: they are cached in %s)", where)


def _program(dtype, states_dtype, arch):
    """The compiled Program from the disk cache, or compiled now and written there (to a
    temporary file, then renamed, so that a reader never sees part of one)."""
    path = _cache_path(dtype, states_dtype, arch)
    try:
        with open(path, "rb") as f:
            header, image = f.read().split(b"\n", 1)
        return Program(image, json.loads(header), "")
    except (OSError, ValueError):  # not cached yet, or unreadable: compile anew
        pass
    _announce(os.path.dirname(path))
    compiled = compile_program(dtype, states_dtype, arch)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(compiled.names).encode() + b"\n" + compiled.image)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache the compiled CUDA scan kernels in %s: %s", os.path.dirname(path), e)
    return compiled


# ---- loading on a device -------------------------------------------------------------------------------
class _Device(NamedTuple):
    context: int  # the device's primary context, which PyTorch uses too
    arch: str


@functools.cache
def _device(index):
    """CUDA device `index` (PyTorch's numbering), asked once."""
    lib, dev, ctx = _driver(), _I(), _P()
    _check(lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    values = []
    for attribute in (_COMPUTE_CAPABILITY_MAJOR, _COMPUTE_CAPABILITY_MINOR):
        v = _I()
        _check(lib.cuDeviceGetAttribute(ctypes.byref(v), attribute, dev), "cuDeviceGetAttribute")
        values.append(v.value)
    _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    return _Device(ctx.value, _target(values))


class _Current:
    """Makes a device's primary context current on this thread while kernels are loaded or
    launched (a thread of PyTorch's may hold another device's, or none yet)."""
    __slots__ = ("context", "pushed")

    def __init__(self, context):
        self.context, self.pushed = context, False

    def __enter__(self):
        lib, current = _driver(), _P()
        _check(lib.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
        if current.value != self.context:
            _check(lib.cuCtxPushCurrent_v2(self.context), "cuCtxPushCurrent")
            self.pushed = True

    def __exit__(self, *exc):
        if self.pushed:
            _driver().cuCtxPopCurrent_v2(ctypes.byref(_P()))


def _load_module(index, image, names):
    """Load a compiled image on device `index`: {name: CUfunction handle} for `names`."""
    lib, module = _driver(), _P()
    with _Current(_device(index).context):
        _check(lib.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
        functions = {}
        for name in names:
            f = _P()
            _check(lib.cuModuleGetFunction(ctypes.byref(f), module, name.encode()), f"cuModuleGetFunction({name})")
            functions[name] = f.value
    return functions


def _arguments(*structs):
    """A kernel's parameters as cuLaunchKernel takes them: the addresses of `structs` (ctypes
    Structures, which the caller keeps alive until its launches are queued)."""
    return (_P * len(structs))(*[ctypes.addressof(s) for s in structs])


def _launch(function, grid, threads, stream, args):
    """Queue `function` on `stream` with the parameters `args` (from `_arguments`), copied at the
    launch: the Structures may change afterwards. grid: (x, y) or (x, y, z) blocks."""
    gx, gy, gz = (*grid, 1)[:3]
    rc = _driver().cuLaunchKernel(function, gx, gy, gz, threads, 1, 1, 0, stream, args, None)
    if rc:
        _check(rc, "cuLaunchKernel")


class _Kernels(NamedTuple):
    """One program's kernels loaded on one device."""
    context: int
    fwd: tuple  # per direction
    bwd: tuple  # per direction
    states: int
    finish: int


_loaded = {}  # (device index, dtype, states dtype) -> _Kernels
_loading = threading.Lock()


def _kernels(index, dtype, states_dtype):
    k = _loaded.get((index, dtype, states_dtype))
    return k if k is not None else _load(index, dtype, states_dtype)


def _load(index, dtype, states_dtype):
    with _loading:
        key = (index, dtype, states_dtype)
        if key not in _loaded:
            device = _device(index)
            names = name_expressions(dtype, states_dtype)
            prog = _program(dtype, states_dtype, device.arch)
            f = _load_module(index, prog.image, [prog.names[n] for n in names])
            fwd0, fwd1, bwd0, bwd1, states, finish = (f[prog.names[n]] for n in names)  # name_expressions' order
            _loaded[key] = _Kernels(device.context, (fwd0, fwd1), (bwd0, bwd1), states, finish)
        return _loaded[key]


# ---- availability ----------------------------------------------------------------------------------------
def _index(device):
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device)
    if device.type != "cuda":
        raise Unavailable(f"{device} is not a CUDA device")
    return torch.cuda.current_device() if device.index is None else device.index


def build(device=None):
    """Compile (or load from the disk cache) the kernels for every input dtype, with its default
    states dtype, and load them on `device` (default: the current CUDA device) now rather than at
    the first scan. Raises RuntimeError with a one-line reason when the CUDA scan cannot run there."""
    try:
        if not torch.cuda.is_available():
            raise Unavailable("no CUDA GPU")
        index = _index(device)
        for dtype in DTYPES:
            _kernels(index, dtype, default_states_dtype(dtype))
    except RuntimeError as e:  # Unavailable, or a CUDA error loading the kernels
        where = "here" if device is None else str(device)
        raise RuntimeError(f"the CUDA scan cannot run {where}: {_first_line(e)}") from e


@functools.cache
def _unavailable_reason():
    try:
        build()
    except RuntimeError as e:
        return str(e)
    return ""


def available():
    """Whether the CUDA scan runs on the current CUDA device (compiling or loading it, once)."""
    return not _unavailable_reason()


def why_unavailable():
    """One line saying why the CUDA scan cannot run here; empty when it can."""
    return _unavailable_reason()


def loaded(device=None):
    """Whether build(device) has loaded the kernels in this process already."""
    index = _index(device)
    return all((index, dtype, default_states_dtype(dtype)) in _loaded for dtype in DTYPES)


def default_states_dtype(dtype):
    """The saved states' dtype for inputs of `dtype`: bfloat16 for bfloat16, else float32 (see the
    module docstring)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def supports(u, delta, A, B, C, z, softplus):
    """Whether the kernels compute this call: DiS's mixer (softplus on delta, a gate z), at most
    MAX_STATES states, u, delta, B, C and z of one dtype of DTYPES, on a CUDA device."""
    return (bool(softplus) and z is not None and u.is_cuda and u.dtype in DTYPES and A.shape[-1] <= MAX_STATES
            and all(x.dtype == u.dtype for x in (delta, B, C, z)))


# ---- the passes ------------------------------------------------------------------------------------------
def _cdiv(a, b):
    return -(-a // b)


def _n_saved(L, save_every):
    return _cdiv(_cdiv(L, CHUNK), save_every)


def _unit_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _f32(x):  # A, D, bias as the kernels read them
    return x if x is None or (x.dtype == torch.float32 and x.is_contiguous()) else x.float().contiguous()


def _empty(shape, dtype, device, poison):
    """A new buffer; NaN everywhere with `poison` (tests: an element the kernels fail to write,
    an output or a partial sum, then shows in the results)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if poison else t


def _stream(index):
    # PyTorch's current stream on the device (what its generated code reads at every launch)
    return torch._C._cuda_getCurrentRawStream(index)


# The passes are registered as torch operators, with functions that give their outputs' shapes
# ("fake" implementations), so that torch.compile keeps them in its graph instead of breaking it at
# each call. Eager calls run the implementations directly (forward, backward).
def _fwd_impl(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: Optional[torch.Tensor], z: torch.Tensor, delta_bias: Optional[torch.Tensor], save_states: bool,
              save_every: int, states_dtype: torch.dtype, poison: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, L, _, E = u.shape
    y = _empty((batch, L, E), u.dtype, u.device, poison)
    states = _run_forward(u, delta, A, B, C, D, z, delta_bias, save_states, save_every, states_dtype, poison, y)
    return y, states


def _run_forward(u, delta, A, B, C, D, z, delta_bias, save_states, save_every, states_dtype, poison, y):
    """Launch the forward kernels, writing y (None: the states only) and returning the states."""
    u, delta, z = _unit_stride(u), _unit_stride(delta), _unit_stride(z)
    A, D, delta_bias = _f32(A), _f32(D), _f32(delta_bias)
    batch, L, ND, E = u.shape
    n_saved = _n_saved(L, save_every) if save_states else 0
    states = _empty((batch, ND, n_saved, E, MAX_STATES), states_dtype, u.device, poison)
    index = u.device.index
    k = _kernels(index, u.dtype, states_dtype)
    p = _params(u, delta, A, B, C, D, z, delta_bias, save_every, n_saved, y=y, states=states if save_states else None)
    grid, stream, args = (_cdiv(E, FWD_THREADS), batch), _stream(index), _arguments(p)
    with _Current(k.context):
        if y is None:  # the states alone: both directions in one launch
            _launch(k.states, (*grid, ND), FWD_THREADS, stream, args)
        else:
            for d in range(ND):  # direction 1 adds its output onto direction 0's
                _launch(k.fwd[d], grid, FWD_THREADS, stream, args)
    return states


_fwd_op = torch.library.custom_op("dis::scan_cuda_fwd", _fwd_impl, mutates_args=())


@_fwd_op.register_fake
def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, save_states, save_every, states_dtype, poison):
    batch, L, ND, E = u.shape
    n_saved = _n_saved(L, save_every) if save_states else 0
    return u.new_empty(batch, L, E), u.new_empty(batch, ND, n_saved, E, MAX_STATES, dtype=states_dtype)


def _states_impl(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: Optional[torch.Tensor], z: torch.Tensor, delta_bias: Optional[torch.Tensor],
                 states_dtype: torch.dtype, poison: bool) -> torch.Tensor:
    # the forward pass without y: the state at the start of every chunk, for the backward pass
    return _run_forward(u, delta, A, B, C, D, z, delta_bias, True, 1, states_dtype, poison, None)


_states_op = torch.library.custom_op("dis::scan_cuda_states", _states_impl, mutates_args=())


@_states_op.register_fake
def _states_fake(u, delta, A, B, C, D, z, delta_bias, states_dtype, poison):
    batch, L, ND, E = u.shape
    return u.new_empty(batch, ND, _n_saved(L, 1), E, MAX_STATES, dtype=states_dtype)


def _bwd_impl(dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: Optional[torch.Tensor], z: torch.Tensor, delta_bias: Optional[torch.Tensor],
              states: torch.Tensor, save_every: int, poison: bool) -> list[torch.Tensor]:
    # dB and dC (sums over channels) and the per-channel parameters' gradients (sums over the
    # batch) are summed from partial sums in a fixed order: no atomics, the same result every run
    A_dtype = A.dtype
    u, delta, z, dy = _unit_stride(u), _unit_stride(delta), _unit_stride(z), _unit_stride(dy)
    A, D, delta_bias = _f32(A), _f32(D), _f32(delta_bias)
    batch, L, ND, E = u.shape
    N = A.shape[-1]
    dev, f32 = u.device, torch.float32
    n_saved = _n_saved(L, save_every)
    if states.shape != (batch, ND, n_saved, E, MAX_STATES) or states.dtype not in (f32, u.dtype):
        raise ValueError(f"states must be what the forward pass saved with save_every={save_every}: "
                         f"{(batch, ND, n_saved, E, MAX_STATES)} float32 or {u.dtype}, "
                         f"got {tuple(states.shape)} {states.dtype}")
    n_blocks = _cdiv(E, BWD_THREADS)  # blocks of channels: the partial sums of dB and dC
    du, ddelta, dz = (_empty(x.shape, x.dtype, dev, poison) for x in (u, delta, z))
    dBC = _empty((n_blocks, batch, L, ND, 2, N), f32, dev, poison)
    per_channel = _empty((batch, ND * E * (N + 2)), f32, dev, poison)  # dA, dD, dbias per batch element
    dB, dC = (_empty((batch, L, ND, N), x.dtype, dev, poison) for x in (B, C))
    dA = _empty((ND, E, N), f32, dev, poison)
    dD, dbias = (_empty((ND, E), f32, dev, poison) for _ in range(2))
    index = dev.index
    k = _kernels(index, u.dtype, states.dtype)
    p = _params(u, delta, A, B, C, D, z, delta_bias, save_every, n_saved, dy=dy, states=states, du=du, ddelta=ddelta,
                dz=dz, dBC=dBC, per_channel=per_channel)
    rows = batch * L * ND
    sums = Sums.from_buffer_copy(_PACK_SUMS.pack(dBC.data_ptr(), per_channel.data_ptr(), dB.data_ptr(), dC.data_ptr(),
                                                 dA.data_ptr(), dD.data_ptr(), dbias.data_ptr(), rows, ND * E * N,
                                                 ND * E, n_blocks, N, batch))
    stream, args = _stream(index), _arguments(p)
    with _Current(k.context):
        for d in range(ND):  # direction 1 adds its dz onto direction 0's
            _launch(k.bwd[d], (n_blocks * batch, 1), BWD_THREADS, stream, args)
        _launch(k.finish, (_cdiv(rows * 2 * N + p.per_b, FINISH_THREADS), 1), FINISH_THREADS, stream, _arguments(sums))
    return [du, ddelta, dA.to(A_dtype), dB, dC, dD, dz, dbias]


_bwd_op = torch.library.custom_op("dis::scan_cuda_bwd", _bwd_impl, mutates_args=())


@_bwd_op.register_fake
def _bwd_fake(dy, u, delta, A, B, C, D, z, delta_bias, states, save_every, poison):
    batch, L, ND, E = u.shape
    N = A.shape[-1]
    fresh = lambda x: x.new_empty(x.shape)  # contiguous, as the kernels write them
    per_channel = A.new_empty(ND, E, dtype=torch.float32)
    return [fresh(u), fresh(delta), fresh(A), B.new_empty(batch, L, ND, N), C.new_empty(batch, L, ND, N),
            per_channel, fresh(z), per_channel.new_empty(ND, E)]


def forward(u, delta, A, B, C, D, z, delta_bias, save_states, save_every, states_dtype=None, poison_outputs=False):
    """The forward pass: y (batch, L, E) in u's dtype, and the states the backward pass starts
    from ((batch, ND, saved, E, 16) in `states_dtype`, default default_states_dtype(u.dtype),
    opaque to the caller) or None without save_states."""
    states_dtype = states_dtype or default_states_dtype(u.dtype)
    # eager calls skip the dispatcher (tens of microseconds a call, a few percent of a scan)
    op = torch.ops.dis.scan_cuda_fwd if torch.compiler.is_compiling() else _fwd_impl
    y, states = op(u, delta, A, B, C, D, z, delta_bias, save_states, save_every, states_dtype, poison_outputs)
    return y, states if save_states else None


def backward(dy, u, delta, A, B, C, D, z, delta_bias, states, save_every, poison_outputs=False):
    """The backward pass: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) from dy (batch, L, E) and
    the forward pass's states; dD, ddelta_bias None where D, delta_bias are."""
    op = torch.ops.dis.scan_cuda_bwd if torch.compiler.is_compiling() else _bwd_impl
    du, ddelta, dA, dB, dC, dD, dz, dbias = op(dy, u, delta, A, B, C, D, z, delta_bias, states, save_every,
                                               poison_outputs)
    return (du, ddelta, dA, dB, dC, dD.to(D.dtype) if D is not None else None, dz,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None)


def recompute_states(u, delta, A, B, C, D, z, delta_bias, states_dtype=None, poison_outputs=False):
    """The states forward(save_states=True, save_every=1) saves, from a forward pass that writes
    nothing else: what the backward pass runs first when the forward pass kept none."""
    states_dtype = states_dtype or default_states_dtype(u.dtype)
    op = torch.ops.dis.scan_cuda_states if torch.compiler.is_compiling() else _states_impl
    return op(u, delta, A, B, C, D, z, delta_bias, states_dtype, poison_outputs)


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, save_states, save_every, states_dtype, poison):
        keep = save_states and save_every > 0
        y, states = forward(u, delta, A, B, C, D, z, delta_bias, keep, max(save_every, 1), states_dtype, poison)
        ctx.save_every, ctx.states_dtype, ctx.poison = save_every, states_dtype, poison
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        save_every = ctx.save_every
        if save_every == 0:  # none kept: every chunk's state again, held for this backward pass only
            states = recompute_states(u, delta, A, B, C, D, z, delta_bias, ctx.states_dtype, ctx.poison)
            save_every = 1
        grads = backward(dy, u, delta, A, B, C, D, z, delta_bias, states, save_every, ctx.poison)
        return (*grads, None, None, None, None)


def _check_args(u, delta, A, B, C, D, z, delta_bias, save_every, states_dtype):
    """What the kernels need beyond the shapes scan.bimamba_scan checks; runs on every call, before
    the GPU gets work: kept to cheap comparisons."""
    if u.numel() == 0:
        raise ValueError(f"u must be a non-empty (batch, L, ND, E), got {tuple(u.shape)}")
    if z is None:
        raise ValueError("z: the CUDA scan computes DiS's gated mixer and needs the gate z (batch, L, E)")
    for name, x in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if x is not None and x.device != u.device:
            raise ValueError(f"{name} must be on u's device {u.device}, got {x.device}")
    if A.shape[-1] > MAX_STATES:
        raise ValueError(f"A: the CUDA scan holds at most {MAX_STATES} states, got {A.shape[-1]}")
    if u.device.type != "cuda" or u.dtype not in DTYPES:
        raise ValueError(f"u must be a CUDA tensor of float32, bfloat16 or float16, got {u.dtype} on {u.device}")
    for name, x in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        if x.dtype != u.dtype:
            raise ValueError(f"{name} must have u's dtype {u.dtype}, got {x.dtype}")
    if not isinstance(save_every, int) or save_every < 0:
        raise ValueError(f"save_every must be an integer >= 0, got {save_every!r}")
    if states_dtype not in (None, torch.float32, u.dtype):
        raise ValueError(f"states_dtype must be float32 or u's dtype {u.dtype}, got {states_dtype}")


def bimamba_scan(u, delta, A, B, C, D, z, delta_bias, save_every=0, states_dtype=None, poison_outputs=False):
    """The selective scan of ND = 1 or 2 directions, summed and gated (the module docstring has
    the computation and the shapes), differentiable. Returns y (batch, L, E) in u's dtype.

    save_every: keep the state for the backward pass at every save_every-th chunk of CHUNK steps
        only: 1/save_every of that memory, for recomputing up to save_every - 1 chunks to reach a
        chunk's start in the backward pass. 0: keep none; the backward pass first recomputes
        them all (recompute_states: a forward pass writing only the states), into memory it
        frees when done, so that no state is held from the forward pass to the backward pass.
    states_dtype: the saved states' dtype, float32 or u's 16-bit dtype; None: default_states_dtype.
    poison_outputs: (tests) fill every buffer allocated here with NaN before the kernels run.
    The shapes are those scan.bimamba_scan, the dispatcher, has checked.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias, save_every, states_dtype)
    states_dtype = states_dtype or default_states_dtype(u.dtype)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    save_states = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    return _Scan.apply(*inputs, save_states, save_every, states_dtype, bool(poison_outputs))
