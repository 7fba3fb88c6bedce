"""The selective scan (Mamba's S6 layer) and the depthwise convolutions that precede it; the one
place that chooses which implementation runs them.

The selective scan is the discretised state space model of the paper's eq. (4), with the
input-dependent step size Delta of Mamba (Gu & Dao, 2023):

    dA_t = exp(Delta_t * A)                      (zero-order hold for A)
    h_t  = dA_t * h_{t-1} + Delta_t * B_t * u_t  (Euler step for B, as Mamba's kernel does)
    y_t  = <C_t, h_t> + D * u_t,   then  y_t * SiLU(z_t)  when a gate z is given

for every (batch, channel) independently, with N states per channel.

`selective_scan_ref` below is the definition: readable, differentiable by autograd, the one the
tests compare every other implementation against. Four backends compute it:
  "ref"    `_ChunkedScan` below: the same arithmetic on any device, with a backward pass that
           keeps only the states at chunk boundaries (memory grows with L / REF_CHUNK, not L).
  "mamba"  mamba-ssm's fused CUDA kernel (optional GPU extra).
  "triton" our Triton kernels, scan_triton.py (CUDA; on CPU under Triton's interpreter).
  "cuda"   our CUDA kernels, scan_cuda.py: DiS's bidirectional mixer (softplus, gate z); its
           other calls, and `selective_scan`'s one direction, run on the Triton kernels.
`resolve_backend(device, name)` turns "auto" into the fastest that runs on the device (cuda,
triton, mamba, then ref) and checks a forced name; the entry points `selective_scan` (one
direction, mamba-ssm's layout), `bimamba_scan` (DiS's two directions, token-major),
`biconv_silu` and `mixer_input` (the convolutions and x_proj as one backward pass) take the
backend as an argument.
"""
import importlib.util
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("ref", "mamba", "triton", "cuda")
OUR_KERNELS = ("triton", "cuda")  # the backends that run our own kernels (Triton needed by both)
REF_CHUNK = 16  # steps between the states the reference keeps for its backward pass


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


# ---------------------------------------------------------------------------------------------
# The "ref" backend: selective_scan_ref's arithmetic, one direction, in time-major layout
# (L, batch, E), with a hand-written backward pass that recomputes each chunk of REF_CHUNK steps
# from the state saved at its start. Autograd through the readable loop would keep every step's
# (batch, E, N) state: for DiS-S/2 at batch 16 that is gigabytes per block.
# ---------------------------------------------------------------------------------------------
def _step_inputs(u, delta, A, B, bias, softplus):
    """Per step of a chunk: (x = delta + bias, Delta = softplus(x), dA = exp(Delta A), dBu = Delta u B);
    u, delta (T, batch, E); B (T, batch, N) -> x, Delta (T, batch, E); dA, dBu (T, batch, E, N)."""
    x = delta if bias is None else delta + bias
    dt = F.softplus(x) if softplus else x
    return x, dt, torch.exp(dt[..., None] * A), (dt * u)[..., None] * B[:, :, None, :]


def _recurrence(h, dA, dBu, reverse):
    """States (T, batch, E, N) of h_t = dA_t h_{t-1} + dBu_t over a chunk's rows, from h (batch, E, N)
    before the first; `reverse` runs the rows last to first."""
    hs = torch.empty_like(dBu)
    steps = list(zip(dA.unbind(0), dBu.unbind(0), hs.unbind(0)))
    for a_t, b_t, h_t in (reversed(steps) if reverse else steps):
        h = torch.addcmul(b_t, a_t, h, out=h_t)
    return hs


def _adjoint(carry, dA, gC, reverse):
    """The adjoint states dh_t = gC_t + dA_{t+1} dh_{t+1} (T, batch, E, N) over a chunk's rows, run
    backwards in scan order from carry = dA_{t+1} dh_{t+1} of the step after the chunk; and the
    carry into the chunk before, dA dh of the chunk's first step."""
    dh = torch.empty_like(gC)
    steps = list(zip(dA.unbind(0), gC.unbind(0), dh.unbind(0)))
    for a_t, gC_t, dh_t in (steps if reverse else reversed(steps)):
        torch.add(gC_t, carry, out=dh_t)
        carry = a_t * dh_t
    return dh, carry


def _chunks(L, chunk, reverse):
    """Row slices of the chunks of a length-L scan in scan order (from the end when `reverse`)."""
    starts = range(0, L, chunk)
    return [slice(L - min(s + chunk, L), L - s) if reverse else slice(s, min(s + chunk, L)) for s in starts]


def _dot_states(x, v, over):
    """Sum over states (over="n": x (T, batch, E, N), v (T, batch, N) -> (T, batch, E)) or over
    channels (over="e": v (T, batch, E) -> (T, batch, N)) of x * v. Elementwise products and sums,
    so that autocast leaves them in the state's precision."""
    if over == "n":
        return (x * v[:, :, None, :]).sum(-1)
    return (x * v[..., None]).sum(2)


class _ChunkedScan(torch.autograd.Function):
    """One direction in time-major layout: u, delta, z (L, batch, E); A (E, N); B, C (L, batch, N);
    D, delta_bias (E,) or None. `reverse` scans t = L-1..0 (the flipped sequence, flipped back)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, reverse, chunk, keep_states):
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        A_, D_, bias = (None if p is None else p.to(acc) for p in (A, D, delta_bias))
        chunks = _chunks(u.shape[0], chunk, reverse)
        y = torch.empty_like(u)
        # the state before each chunk, (chunks, batch, E, N); allocated before the chunks' temporaries
        states = u.new_zeros(len(chunks) if keep_states else 1, u.shape[1], u.shape[2], A.shape[1], dtype=acc)
        h = states[0]
        for i, rows in enumerate(chunks):
            u_c, delta_c, B_c, C_c = (x[rows].to(acc) for x in (u, delta, B, C))
            if keep_states:
                states[i] = h
            _, _, dA, dBu = _step_inputs(u_c, delta_c, A_, B_c, bias, softplus)
            hs = _recurrence(h, dA, dBu, reverse)
            h = hs[0 if reverse else -1]  # the last state in scan order
            y_c = _dot_states(hs, C_c, over="n")
            if D_ is not None:
                y_c = y_c + D_ * u_c
            if z is not None:
                y_c = y_c * F.silu(z[rows].to(acc))
            y[rows] = y_c
        ctx.softplus, ctx.reverse, ctx.chunk = softplus, reverse, chunk
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states if keep_states else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        acc = states.dtype
        A_, D_, bias = (None if p is None else p.to(acc) for p in (A, D, delta_bias))
        du, ddelta, dB, dC = (torch.empty_like(x) for x in (u, delta, B, C))
        dz = torch.empty_like(z) if z is not None else None
        dA = torch.zeros_like(A_)
        dD = torch.zeros_like(D_) if D_ is not None else None
        dbias = torch.zeros_like(bias) if bias is not None else None
        carry = torch.zeros_like(states[0])  # dA_{t+1} dh_{t+1}: what step t's state gets from the next
        chunks = _chunks(u.shape[0], ctx.chunk, ctx.reverse)
        for rows, h0 in reversed(list(zip(chunks, states.unbind(0)))):  # chunks last to first in scan order
            u_c, delta_c, B_c, C_c, g = (x[rows].to(acc) for x in (u, delta, B, C, dy))
            x, dt, a, dBu = _step_inputs(u_c, delta_c, A_, B_c, bias, ctx.softplus)
            hs = _recurrence(h0, a, dBu, ctx.reverse)  # the chunk's states again
            if z is not None:  # y = y_ssm * silu(z): g becomes the gradient at y_ssm
                z_c = z[rows].to(acc)
                y_ssm = _dot_states(hs, C_c, over="n") + (D_ * u_c if D_ is not None else 0)
                sig = torch.sigmoid(z_c)
                dz[rows] = g * y_ssm * sig * (1 + z_c * (1 - sig))
                g = g * z_c * sig
            dh, carry = _adjoint(carry, a, g[..., None] * C_c[:, :, None, :], ctx.reverse)
            h_prev = torch.cat([hs[1:], h0[None]]) if ctx.reverse else torch.cat([h0[None], hs[:-1]])
            w = dh * a * h_prev  # dL/d(dA_t) dA_t, from which d/dDelta_t = A and d/dA = Delta_t
            d_dtu = _dot_states(dh, B_c, over="n")  # dL/d(Delta_t u_t)
            ddt = (w * A_).sum(-1) + d_dtu * u_c
            dA += (w * dt[..., None]).sum((0, 1))
            dB[rows] = _dot_states(dh, dt * u_c, over="e")
            dC[rows] = _dot_states(hs, g, over="e")
            du_c = d_dtu * dt
            if D_ is not None:
                du_c = du_c + D_ * g
                dD += (g * u_c).sum((0, 1))
            du[rows] = du_c
            if ctx.softplus:  # softplus'(x) = sigmoid(x); F.softplus is the identity above 20
                ddt = ddt * torch.where(x > 20, 1.0, torch.sigmoid(x))
            if dbias is not None:
                dbias += ddt.sum((0, 1))
            ddelta[rows] = ddt
        cast = lambda grad, like: None if grad is None else grad.to(like.dtype)  # noqa: E731
        return (du, ddelta, cast(dA, A), dB, dC, cast(dD, D), dz, cast(dbias, delta_bias),
                None, None, None, None)


def _scan_ref(u, delta, A, B, C, D, z, delta_bias, softplus, reverse=False, chunk=REF_CHUNK):
    """One direction on the "ref" backend, time-major: see _ChunkedScan. Returns (L, batch, E)."""
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                           for x in (u, delta, A, B, C, D, z, delta_bias))
    return _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(softplus), reverse, chunk, keep)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
def _installed(package):
    return importlib.util.find_spec(package) is not None


def _triton_interprets():
    """Whether Triton runs its kernels on CPU tensors here (TRITON_INTERPRET=1 before its import)."""
    import triton
    knobs = getattr(triton, "knobs", None)
    return bool(knobs and knobs.runtime.interpret)


def _why_not(device, name):
    """Why backend `name` cannot run on `device`, or None if it can (the CUDA scan unbuilt)."""
    cuda = device.type == "cuda"
    if name == "mamba":
        if not cuda:
            return "mamba-ssm's kernel needs a CUDA device"
        if not _installed("mamba_ssm"):
            return "mamba-ssm is not installed (pip install -r requirements-gpu.txt)"
    if name in OUR_KERNELS and not _installed("triton"):
        return "the triton package is not installed"
    if name == "triton" and not cuda and not (device.type == "cpu" and _triton_interprets()):
        return "the Triton scan needs a CUDA device (or, on CPU, TRITON_INTERPRET=1 for Triton's interpreter)"
    if name == "cuda":
        import scan_cuda
        if not cuda:
            return "the CUDA scan needs a CUDA device"
        if not scan_cuda.available():
            return scan_cuda.why_unavailable()
    return None


def _build_cuda(device):
    """Compile or load the CUDA scan now; None, or the one-line reason it failed."""
    import scan_cuda
    try:
        scan_cuda.build(device)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def _resolve(device, name):
    if name == "auto":
        if device.type != "cuda":
            return "ref"
        if _why_not(device, "triton") is None:
            reason = _why_not(device, "cuda") or _build_cuda(device)
            if reason is None:
                return "cuda"
            log.warning("the CUDA scan cannot run here (%s); using the Triton scan", reason)
            return "triton"
        return "mamba" if _why_not(device, "mamba") is None else "ref"
    reason = _why_not(device, name) or (_build_cuda(device) if name == "cuda" else None)
    if reason is not None:
        raise ValueError(f"scan backend {name!r} cannot run on {device.type}: {reason}")
    return name


_resolved = {}


def resolve_backend(device, name="auto"):
    """The scan backend ("ref", "mamba", "triton" or "cuda") that runs for `name` on `device`.

    "auto" is the fastest that runs there; where the CUDA scan cannot be built it says why in one
    log line and takes the Triton scan. A forced backend that cannot run raises ValueError with
    the reason. "cuda" (forced or chosen) is compiled here, before the first step. Resolved once
    per device type and name.
    """
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"scan backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    device = torch.device(device)
    key = (device.type, name)
    if key not in _resolved:
        _resolved[key] = _resolve(device, name)
    return _resolved[key]


def available_backends(device):
    """The backends that can run on `device`, fastest first (the CUDA scan is built to find out)."""
    out = []
    for name in ("cuda", "triton", "mamba", "ref"):
        try:
            out.append(resolve_backend(device, name))
        except ValueError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto"):
    """`selective_scan_ref`'s computation (one direction, mamba-ssm's layout and signature) on
    `backend` (resolve_backend's names). The CUDA scan covers DiS's two directions only: here
    "cuda" runs the Triton kernels."""
    _check_mamba_layout(u, delta, A, B, C, D, z, delta_bias)
    choice = resolve_backend(u.device, backend)
    if choice == "mamba":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if choice in OUR_KERNELS:
        import scan_triton
        return scan_triton.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if B.dim() == 4:  # grouped B, C: each group of channels on its own
        per = u.shape[1] // B.shape[1]
        return torch.cat([selective_scan(_part(u, g, per, 1), _part(delta, g, per, 1), _part(A, g, per), B[:, g],
                                         C[:, g], _part(D, g, per), _part(z, g, per, 1), _part(delta_bias, g, per),
                                         delta_softplus, backend="ref")
                          for g in range(B.shape[1])], dim=1)

    def time_major(x):  # (batch, ., L) -> (L, batch, .)
        return None if x is None else x.permute(2, 0, 1)
    y = _scan_ref(time_major(u), time_major(delta), A, time_major(B), time_major(C), D, time_major(z),
                  delta_bias, delta_softplus)
    return y.permute(1, 2, 0)


def _part(x, g, per, dim=0):
    """Group g of `per` channels of x along `dim` (None stays None)."""
    return None if x is None else x.narrow(dim, g * per, per)


def bimamba_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, backend="auto",
                 save_every=0):
    """The scans of DiS's two directions, summed, in token-major layout (Vim's bidirectional mixer).

    u, delta: (batch, L, ND, E); A: (ND, E, N); B, C: (batch, L, ND, N); D, delta_bias: (ND, E) or
    None; z: (batch, L, E) or None, shared by the directions. ND = 2 (or 1: direction 0 alone).
    Direction 0 scans t = 0..L-1, direction 1 the flipped sequence, flipped back. Returns y
    (batch, L, E) in u's dtype:
        selective_scan_ref(direction 0) + flip(selective_scan_ref(flip(direction 1))).
    save_every: the Triton and CUDA scans keep the state of every save_every-th chunk for the
    backward pass (less memory, the chunks between recomputed), or none with 0 (the backward
    pass recomputes them all first and holds them only while it runs); the reference keeps one
    state per max(save_every, 1) * REF_CHUNK steps; mamba-ssm's kernel keeps its own (save_every
    must be 0 or 1).
    """
    _check_bimamba(u, delta, A, B, C, D, z, delta_bias, save_every)
    choice = resolve_backend(u.device, backend)
    if choice == "mamba" and save_every > 1:
        raise ValueError(f"save_every > 1 applies to the ref, triton and cuda scans, not mamba-ssm's; got {save_every}")
    if choice == "cuda":
        import scan_cuda
        if scan_cuda.supports(u, delta, A, B, C, z, delta_softplus):
            return scan_cuda.bimamba_scan(u, delta, A, B, C, D, z, delta_bias, save_every=save_every)
    if choice in OUR_KERNELS:
        import scan_triton
        return scan_triton.bimamba_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_every)
    y = 0
    for d in range(u.shape[2]):
        direction = (u[:, :, d], delta[:, :, d], A[d], B[:, :, d], C[:, :, d], None if D is None else D[d], z,
                     None if delta_bias is None else delta_bias[d])
        if choice == "mamba":
            y = y + _mamba_direction(*direction, delta_softplus, reverse=d == 1)
        else:
            y = y + _ref_direction(*direction, delta_softplus, reverse=d == 1,
                                   chunk=REF_CHUNK * max(save_every, 1))
    return y


def _ref_direction(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, chunk):
    """One direction on the reference, from token-major (batch, L, .) arguments: (batch, L, E)."""
    def time_major(x):  # (batch, L, .) -> (L, batch, .)
        return None if x is None else x.transpose(0, 1)
    y = _scan_ref(time_major(u), time_major(delta), A, time_major(B), time_major(C), D, time_major(z), delta_bias,
                  softplus, reverse, chunk)
    return y.transpose(0, 1)


def _mamba_direction(u, delta, A, B, C, D, z, delta_bias, softplus, reverse):
    """One direction on mamba-ssm's kernel, from token-major (batch, L, .) arguments: (batch, L, E)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    def channel_major(x):  # (batch, L, .) -> (batch, ., L), in scan order
        return None if x is None else (x.flip(1) if reverse else x).transpose(1, 2)
    y = selective_scan_fn(channel_major(u), channel_major(delta), A, channel_major(B), channel_major(C), D,
                          channel_major(z), delta_bias, softplus).transpose(1, 2)
    return y.flip(1) if reverse else y


def biconv_silu(x, weight, bias, backend="auto"):
    """The two depthwise convolutions of the mixer, each followed by SiLU.

    x: (batch, L, E); weight: (2, E, W); bias: (2, E) -> u: (batch, L, 2, E). Direction 0 is
    Mamba's causal conv1d (output t sees inputs t-W+1..t, zero padding before the start);
    direction 1 is the same on the flipped sequence, flipped back (anti-causal).
    """
    _check_conv(x, weight, bias, "biconv_silu")
    choice = resolve_backend(x.device, backend)
    if choice in OUR_KERNELS:
        import scan_triton
        return scan_triton.biconv_silu(x, weight, bias)
    fused = choice == "mamba" and _installed("causal_conv1d")
    x = x.transpose(1, 2)  # (batch, E, L)
    u = [_causal_conv1d_silu(x, weight[0], bias[0], fused),
         _causal_conv1d_silu(x.flip(-1), weight[1], bias[1], fused).flip(-1)]
    return torch.stack([u_d.transpose(1, 2) for u_d in u], dim=2)  # contiguous (batch, L, 2, E)


def mixer_input(xz, weight, bias, proj, backend="auto"):
    """The mixer's input side: x, z = the halves of xz; u = biconv_silu(x); x_dbl = x_proj(u).

    xz: (batch, L, 2E), in_proj's output; weight: (2, E, W); bias: (2, E); proj: (P, 2E), x_proj's
    weight over both directions' u -> u (batch, L, 2, E), x_dbl (batch, L, P), z (batch, L, E).
    On our kernels one backward pass takes all of it (scan_triton.mixer_input): it sums u's two
    gradients (the scan's and x_proj's) in the convolution's kernel and writes x's gradient beside
    z's, where autograd would add and concatenate (B, L, 2E) tensors.
    """
    E = xz.shape[-1] // 2
    if xz.dim() != 3 or xz.shape[-1] != 2 * E or proj.dim() != 2 or proj.shape[1] != 2 * E:
        raise ValueError(f"mixer_input needs xz (batch, L, 2E) and proj (P, 2E); got xz {tuple(xz.shape)}, "
                         f"proj {tuple(proj.shape)}")
    _check_conv(xz[..., :E], weight, bias, "mixer_input")
    if resolve_backend(xz.device, backend) in OUR_KERNELS:
        import scan_triton
        return scan_triton.mixer_input(xz, weight, bias, proj)
    x, z = xz.split(E, dim=-1)
    u = biconv_silu(x, weight, bias, backend)
    return u, F.linear(u.flatten(2), proj), z


def _causal_conv1d_silu(x, weight, bias, fused):
    """(batch, E, L) -> (batch, E, L): causal depthwise conv1d then SiLU (causal-conv1d's kernel if fused)."""
    if fused:
        from causal_conv1d import causal_conv1d_fn
        return causal_conv1d_fn(x, weight, bias, activation="silu")
    width = weight.shape[-1]
    return F.silu(F.conv1d(x, weight[:, None, :], bias, padding=width - 1, groups=x.shape[1])[..., :x.shape[-1]])


# ---------------------------------------------------------------------------------------------
# Argument checks: one line naming the argument and what it accepts
# ---------------------------------------------------------------------------------------------
def _check_conv(x, weight, bias, origin):
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[:2] != (2, x.shape[2]) or tuple(bias.shape) != (2, x.shape[2]):
        raise ValueError(f"{origin} needs x (batch, L, E), weight (2, E, W), bias (2, E); got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}")


def _check_shapes(expected, origin):
    for name, x, shape in expected:
        if x is not None and tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)} ({origin}), got {tuple(x.shape)}")


def _check_mamba_layout(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, L), got shape {tuple(u.shape)}")
    batch, E, L = u.shape
    if A.dim() != 2 or A.shape[0] != E:
        raise ValueError(f"A must be (channels, N) with {E} channels (from u), got shape {tuple(A.shape)}")
    N = A.shape[1]
    for name, x in (("B", B), ("C", C)):
        grouped = x.dim() == 4 and x.shape[0] == batch and tuple(x.shape[2:]) == (N, L) and x.shape[1] >= 1 \
            and E % x.shape[1] == 0
        if tuple(x.shape) != (batch, N, L) and not grouped:
            raise ValueError(f"{name} must be (batch, N, L) = {(batch, N, L)} or (batch, G, N, L) with G dividing "
                             f"the {E} channels, got shape {tuple(x.shape)}")
    if B.dim() != C.dim() or (B.dim() == 4 and B.shape[1] != C.shape[1]):
        raise ValueError(f"B and C must have the same groups, got shapes {tuple(B.shape)} and {tuple(C.shape)}")
    _check_shapes((("delta", delta, u.shape), ("z", z, u.shape), ("D", D, (E,)), ("delta_bias", delta_bias, (E,))),
                  f"from u {tuple(u.shape)}")


def _check_bimamba(u, delta, A, B, C, D, z, delta_bias, save_every):
    if u.dim() != 4 or u.shape[2] not in (1, 2):
        raise ValueError(f"u must be (batch, L, directions, E) with 1 or 2 directions, got shape {tuple(u.shape)}")
    batch, L, ND, E = u.shape
    if A.dim() != 3 or tuple(A.shape[:2]) != (ND, E):
        raise ValueError(f"A must be (directions, E, N) = ({ND}, {E}, N) (from u), got shape {tuple(A.shape)}")
    N = A.shape[2]
    _check_shapes((("delta", delta, u.shape), ("B", B, (batch, L, ND, N)), ("C", C, (batch, L, ND, N)),
                   ("D", D, (ND, E)), ("z", z, (batch, L, E)), ("delta_bias", delta_bias, (ND, E))),
                  f"from u {tuple(u.shape)} and A {tuple(A.shape)}")
    if not isinstance(save_every, int) or isinstance(save_every, bool) or save_every < 0:
        raise ValueError(f"save_every must be an integer >= 0, got {save_every!r}")
