"""The selective scan (Mamba's S6 layer) and the depthwise causal conv1d that precedes it.

The selective scan is the discretised state space model of the paper's eq. (4), with the
input-dependent step size Delta of Mamba (Gu & Dao, 2023):

    dA_t = exp(Delta_t * A)                      (zero-order hold for A)
    h_t  = dA_t * h_{t-1} + Delta_t * B_t * u_t  (Euler step for B, as Mamba's kernel does)
    y_t  = <C_t, h_t> + D * u_t,   then  y_t * SiLU(z_t)  when a gate z is given

for every (batch, channel) independently, with N states per channel.

Four implementations share the signature of mamba-ssm's `selective_scan_fn`:
  "ref"    `selective_scan_ref` below: readable, differentiable by autograd, runs anywhere;
           it is the definition the tests compare the fast ones against.
  "mamba"  mamba-ssm's fused CUDA kernel (optional GPU extra).
  "triton" our Triton kernel in scan_triton.py (CUDA only).
  "cuda"   our CUDA kernel in scan_cuda.cu, built on first use (needs nvcc and ninja); it covers
           DiS's mixer (softplus, gate z) and hands other calls to the Triton kernel.
`selective_scan` picks one: the forced backend (argument or env DIS_SCAN_BACKEND), else the
fastest available on CUDA tensors (cuda, triton, then mamba), else the reference. (The CUDA
kernel is the fastest for DiS's two directions and in its own token-major layout; for the one
direction of `selective_scan`, whose (batch, E, L) layout both kernels reach through transposes,
the Triton one is as fast or faster, so an unforced "cuda" runs that: BENCHMARKS.md.)
"""
import functools
import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("ref", "mamba", "triton", "cuda")
OUR_KERNELS = ("triton", "cuda")  # run through scan_triton's wrappers: bimamba_scan(impl=...)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Readable selective scan; same signature and semantics as mamba-ssm's selective_scan_fn.

    u, delta: (batch, channels, L);  A: (channels, N);  z: (batch, channels, L) or None
    B, C: (batch, N, L), or grouped (batch, G, N, L) with channels split evenly over G groups
    D, delta_bias: (channels,) or None
    Returns y: (batch, channels, L) in u's dtype (and the last state (batch, channels, N)).
    State and accumulation are float32 (float64 if the inputs are float64).
    """
    dtype_in = u.dtype
    acc = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A, B, C = (x.to(acc) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, L = u.shape
    if B.dim() == 4:  # grouped: channel d uses group d // (channels / G)
        B = B.repeat_interleave(channels // B.shape[1], dim=1)  # (batch, channels, N, L)
        C = C.repeat_interleave(channels // C.shape[1], dim=1)
    else:
        B, C = B[:, None], C[:, None]  # (batch, 1, N, L): shared by all channels
    dA = torch.exp(delta[:, :, None, :] * A[None, :, :, None])  # (batch, channels, N, L)
    dBu = (delta * u)[:, :, None, :] * B                         # (batch, channels or 1, N, L)
    h = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for t in range(L):  # the recurrence of eq. (4), one time step at a time
        h = dA[..., t] * h + dBu[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)  # (batch, channels, L)
    if D is not None:
        y = y + D.to(acc)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


@functools.cache  # what is installed does not change while we run, and every mixer call asks
def _gpu_backends():
    """The backends that can run on CUDA tensors here, fastest first."""
    import scan_cuda
    triton_ok = importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
    cuda_ok = triton_ok and scan_cuda.available()  # it runs inside scan_triton's wrappers
    mamba_ok = importlib.util.find_spec("mamba_ssm") is not None
    return tuple(name for name, ok in (("cuda", cuda_ok), ("triton", triton_ok), ("mamba", mamba_ok)) if ok)


def available_backends(device):
    """The scan backends that can run on `device`, fastest first."""
    if torch.device(device).type != "cuda":
        return ["ref"]
    return [*_gpu_backends(), "ref"]


def _forced(backend):
    """The backend forced by the argument or DIS_SCAN_BACKEND, or None."""
    return backend or os.environ.get("DIS_SCAN_BACKEND") or None


_announced = set()


def scan_backend(device, backend=None):
    """Resolve which backend `selective_scan` uses on `device`.

    `backend` (or the environment variable DIS_SCAN_BACKEND) forces one of BACKENDS; a forced
    backend that cannot run here raises instead of silently falling back.
    """
    forced = _forced(backend)
    options = available_backends(device)
    if forced is None:
        choice = options[0]
    elif forced not in BACKENDS:
        raise ValueError(f"unknown scan backend {forced!r}; choose one of {BACKENDS}")
    elif forced not in options:
        hint = {"mamba": "install the GPU extras (pip install -r requirements-gpu.txt) and use CUDA tensors",
                "triton": "it needs CUDA tensors and the triton package",
                "cuda": "it needs CUDA tensors, the triton package, nvcc (the CUDA toolkit) and ninja"}.get(forced, "")
        raise RuntimeError(f"scan backend {forced!r} is not available on {torch.device(device)}: {hint}")
    else:
        choice = forced
    key = (torch.device(device).type, choice)
    if key not in _announced:
        _announced.add(key)
        log.info("selective scan backend on %s: %s", key[0], choice)
    return choice


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   backend=None):
    """`selective_scan_ref`'s computation on the backend `scan_backend` picks for u's device."""
    choice = scan_backend(u.device, backend)
    if choice == "cuda" and _forced(backend) is None:
        choice = "triton"  # one direction: see the module docstring
    if choice == "mamba":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if choice in OUR_KERNELS:
        from scan_triton import selective_scan_triton
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl=choice)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d(x, weight, bias=None, silu=True, fused=True):
    """Depthwise causal convolution over time, optionally followed by SiLU.

    x: (batch, channels, L); weight: (channels, W); bias: (channels,) -> (batch, channels, L).
    Output t sees inputs t-W+1..t (zero padding on the left), as in Mamba's conv1d.
    Uses causal-conv1d's CUDA kernel when `fused`, installed, and x is on CUDA; else F.conv1d.
    """
    if fused and x.is_cuda and importlib.util.find_spec("causal_conv1d") is not None:
        from causal_conv1d import causal_conv1d_fn
        return causal_conv1d_fn(x, weight, bias, activation="silu" if silu else None)
    width = weight.shape[-1]
    out = F.conv1d(x, weight[:, None, :], bias, padding=width - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(out) if silu else out


def set_scan_backend(name):
    """--scan-backend: 'auto' lets scan.py pick the fastest on the device; others are forced."""
    if name == "auto":
        os.environ.pop("DIS_SCAN_BACKEND", None)
    else:
        os.environ["DIS_SCAN_BACKEND"] = name


def active_scan_backend(device, say=print):
    """The scan backend that runs on `device`, or SystemExit with the reason. The CUDA scan's
    extension is compiled here (on first use, one to three minutes, announced through `say`),
    before anything is timed."""
    try:
        backend = scan_backend(device)
        if backend == "cuda":
            import scan_cuda
            if not scan_cuda.loaded():
                say("Loading the CUDA scan extension (compiled on first use: one to three minutes)")
            scan_cuda.build()
        return backend
    except (RuntimeError, ValueError) as e:
        raise SystemExit(str(e))
