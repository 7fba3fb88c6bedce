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

import torch

MAX_STATES = 16
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
    return cpp_extension.load(name="dis_scan_cuda", sources=[os.path.join(os.path.dirname(__file__), "scan_cuda.cu")],
                              extra_cuda_cflags=["-O3"])


def supports(u, delta, A, B, C, z, softplus):
    """Whether the kernels compute this call (see the module docstring)."""
    return (softplus and z is not None and u.is_cuda and u.dtype in DTYPES and A.shape[-1] <= MAX_STATES
            and all(x.dtype == u.dtype for x in (delta, B, C, z)))


def forward(u, delta, A, B, C, D, z, delta_bias, save_states, save_every):
    """y (batch, L, E) in u's dtype, and the states the backward pass starts from (float32,
    (batch, ND, saved, E, 16), opaque to the caller) or None."""
    ext = _ext()
    batch, L, ND, E = u.shape
    u, delta, z = _unit_stride(u), _unit_stride(delta), _unit_stride(z)
    y = torch.empty(batch, L, E, device=u.device, dtype=u.dtype)
    states = None
    if save_states:
        n_saved = _cdiv(_cdiv(L, ext.chunk), save_every)
        states = torch.empty(batch, ND, n_saved, E, MAX_STATES, device=u.device, dtype=torch.float32)
    ext.scan_fwd(u, delta, _param(A), B, C, _param(D), z, _param(delta_bias), y, states, save_every)
    return y, states


def backward(dy, u, delta, A, B, C, D, z, delta_bias, states, save_every):
    """(du, ddelta, dA, dB, dC, dD, dz, dbias) from dy (batch, L, E) and forward's states."""
    ext = _ext()
    batch, L, ND, E = u.shape
    N = A.shape[-1]
    dev = u.device
    u, delta, z, dy = _unit_stride(u), _unit_stride(delta), _unit_stride(z), _unit_stride(dy)
    du = torch.empty(batch, L, ND, E, device=dev, dtype=u.dtype)
    ddelta = torch.empty(batch, L, ND, E, device=dev, dtype=delta.dtype)
    dz = torch.empty(batch, L, E, device=dev, dtype=z.dtype)
    # partial sums, finished here with torch.sum (deterministic, no atomics): dB and dC per block
    # of channels, the per-channel parameters' gradients per batch element
    dBC = torch.empty(_cdiv(E, ext.channels), batch, L, ND, 2, N, device=dev, dtype=torch.float32)
    dA = torch.empty(batch, ND, E, N, device=dev, dtype=torch.float32)
    dD = torch.empty(batch, ND, E, device=dev, dtype=torch.float32)
    dbias = torch.empty_like(dD)
    ext.scan_bwd(u, delta, _param(A), B, C, _param(D), z, _param(delta_bias), dy, states,
                 du, ddelta, dz, dBC, dA, dD, dbias, save_every)
    dBC = dBC.sum(0)
    return (du, ddelta, dA.sum(0).to(A.dtype), dBC[..., 0, :].to(B.dtype), dBC[..., 1, :].to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None)


def _unit_stride(x):
    """x with its last dimension contiguous, which the kernels' coalesced loads assume."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _param(x):
    return None if x is None else x.float().contiguous()


def _cdiv(a, b):
    return -(-a // b)
