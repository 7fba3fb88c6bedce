"""Our CUDA selective scan (scan_cuda.cu) for DiS's bidirectional mixer: the computation and calling
contract of scan_triton.py's forward and backward passes, with four lanes per channel holding its
16 states in registers (the design is at the top of scan_cuda.cu).

The kernels cover DiS's mixer: delta through softplus, the output gated by silu(z), at most 16
states, u, delta, B, C, z of one dtype (float32, bfloat16 or float16); `supports` says whether a
call fits, and scan_triton.bimamba_scan runs the Triton kernels for any other.

The extension is compiled on first use by torch.utils.cpp_extension for the GPUs present and
cached in torch's extension directory (TORCH_EXTENSIONS_DIR). That takes one to three minutes and
needs the CUDA toolkit matching torch's CUDA (nvcc, found through CUDA_HOME or PATH) and ninja
(pip install ninja); without them the "triton" backend is used.
"""
import functools
import os
from typing import Optional

import torch

MAX_STATES = 16
CHUNK = 4  # steps between the states the forward pass saves (scan_cuda.cu's QUAD)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available():
    """Whether the extension can be built and run here (a GPU, nvcc and ninja)."""
    if not torch.cuda.is_available():
        return False
    from torch.utils import cpp_extension  # looks for the CUDA toolkit on import
    return cpp_extension.CUDA_HOME is not None and cpp_extension.is_ninja_available()


@functools.cache
def _ext():
    if not available():
        raise RuntimeError("the CUDA scan needs a GPU, the CUDA toolkit (nvcc, or CUDA_HOME) and ninja "
                           "(pip install ninja); use DIS_SCAN_BACKEND=triton instead")
    from torch.utils import cpp_extension
    ext = cpp_extension.load(name="dis_scan_cuda", sources=[os.path.join(os.path.dirname(__file__), "scan_cuda.cu")],
                             extra_cuda_cflags=["-O3"])
    if ext.chunk != CHUNK:
        raise RuntimeError(f"scan_cuda.cu saves a state every {ext.chunk} steps, scan_cuda.py expects {CHUNK}")
    return ext


def loaded():
    """Whether the extension is loaded in this process already."""
    return _ext.cache_info().currsize > 0


def build():
    """Compile the extension now (or load it from the cache) rather than at the first scan; a
    build that fails raises RuntimeError saying what to use instead."""
    try:
        _ext()
    except RuntimeError as e:
        raise RuntimeError(f"{e}\nthe CUDA scan could not be built here: use the Triton scan instead "
                           "(--scan-backend triton, or DIS_SCAN_BACKEND=triton)") from e


def supports(u, delta, A, B, C, z, softplus):
    """Whether the kernels compute this call (see the module docstring)."""
    return (softplus and z is not None and u.is_cuda and u.dtype in DTYPES and A.shape[-1] <= MAX_STATES
            and all(x.dtype == u.dtype for x in (delta, B, C, z)))


# The kernels are registered as torch operators, with functions that give their outputs' shapes
# ("fake" implementations), so that torch.compile keeps them in its graph instead of breaking it
# at each call into the extension. Eager calls run the implementations directly (forward, backward).
def _fwd_impl(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: Optional[torch.Tensor], z: torch.Tensor, delta_bias: Optional[torch.Tensor], save_states: bool,
              save_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    # the extension allocates the outputs and makes the inputs' layouts what the kernels read
    # (fewer calls back into torch from Python: host time a scan waits for when the GPU is idle)
    y, states = _ext().scan_fwd(u, delta, A, B, C, D, z, delta_bias, save_states, save_every)
    return y, states


_fwd_op = torch.library.custom_op("dis::scan_cuda_fwd", _fwd_impl, mutates_args=())


@_fwd_op.register_fake
def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, save_states, save_every):
    batch, L, ND, E = u.shape
    n_saved = _cdiv(_cdiv(L, CHUNK), save_every) if save_states else 0
    return u.new_empty(batch, L, E), u.new_empty(batch, ND, n_saved, E, MAX_STATES, dtype=torch.float32)


def _bwd_impl(dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: Optional[torch.Tensor], z: torch.Tensor, delta_bias: Optional[torch.Tensor],
              states: torch.Tensor, save_every: int) -> list[torch.Tensor]:
    # dB and dC (sums over channels) and the per-channel parameters' gradients (sums over the
    # batch) are summed from partial sums in a fixed order by the extension: no atomics, the
    # same result on every run
    return _ext().scan_bwd(dy, u, delta, A, B, C, D, z, delta_bias, states, save_every)


_bwd_op = torch.library.custom_op("dis::scan_cuda_bwd", _bwd_impl, mutates_args=())


@_bwd_op.register_fake
def _bwd_fake(dy, u, delta, A, B, C, D, z, delta_bias, states, save_every):
    batch, L, ND, E = u.shape
    N = A.shape[-1]
    fresh = lambda x: x.new_empty(x.shape)  # contiguous, as the kernels write them
    per_channel = A.new_empty(ND, E, dtype=torch.float32)
    return [fresh(u), fresh(delta), fresh(A), B.new_empty(batch, L, ND, N), C.new_empty(batch, L, ND, N),
            per_channel, fresh(z), per_channel.new_empty(ND, E)]


def forward(u, delta, A, B, C, D, z, delta_bias, save_states, save_every):
    """y (batch, L, E) in u's dtype, and the states the backward pass starts from (float32,
    (batch, ND, saved, E, 16), opaque to the caller) or None."""
    # eager calls skip the dispatcher (tens of microseconds a call, a few percent of a scan)
    op = torch.ops.dis.scan_cuda_fwd if torch.compiler.is_compiling() else _fwd_impl
    y, states = op(u, delta, A, B, C, D, z, delta_bias, save_states, save_every)
    return y, states if save_states else None


def backward(dy, u, delta, A, B, C, D, z, delta_bias, states, save_every):
    """(du, ddelta, dA, dB, dC, dD, dz, dbias) from dy (batch, L, E) and forward's states."""
    op = torch.ops.dis.scan_cuda_bwd if torch.compiler.is_compiling() else _bwd_impl
    du, ddelta, dA, dB, dC, dD, dz, dbias = op(dy, u, delta, A, B, C, D, z, delta_bias, states, save_every)
    return (du, ddelta, dA, dB, dC, dD.to(D.dtype) if D is not None else None, dz,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None)


def _cdiv(a, b):
    return -(-a // b)
