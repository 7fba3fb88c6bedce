"""Triton kernels for DiS's bidirectional Mamba mixer: the selective scan of both directions,
forward and backward, and the two depthwise convolutions (causal and anti-causal) followed by
SiLU. Self-contained: `bimamba_scan`, `selective_scan` and `biconv_silu` are its entry points.

Everything works in token-major layout, (batch, L, directions, E), so that no transpose or
flip of the sequence is ever materialised: direction 1 walks the same memory backwards.

Selective scan (Mamba, Gu & Dao 2023, Algorithm 2; mamba-ssm's selective_scan_fn), per
batch b, channel e, state n and scan step s:
    delta_s = softplus(delta_raw_s + delta_bias)
    h_s     = exp(delta_s A) h_{s-1} + delta_s B_s u_s          (h_{-1} = 0)
    y_s     = (sum_n C_s h_s + D u_s) * silu(z_s)
One program owns a block of channels of one batch element and runs the directions in turn.
Time is cut into chunks of T steps: the inputs of a chunk are loaded as (T, channels) tiles
while the previous chunk is computed, and the T steps of a chunk are unrolled with the state
(N, channels) in registers. Rows are taken out of and put into tiles with selects on constant
row indices, which the compiler resolves at compile time wherever a thread holds all rows.

For training the forward pass also stores the state at the start of every chunk, a
(batch, directions, chunks, N, E) float32 tensor (1/T of the full state history), or of every
S-th chunk (the `save_every` argument), or of none (save_every 0: the backward pass first runs
the forward pass again, and holds its states only while it runs). The backward pass walks the chunks last to first: it
recomputes the chunk's states from its checkpoint (first advancing over the chunks in between
if S > 1), then runs the adjoint recurrence dh_s = C_s g_s + a_{s+1} dh_{s+1} (g = dy silu(z),
a_s = exp(delta_s A)) backwards through the chunk, and forms the gradients from both.

Set TRITON_INTERPRET=1 before importing this module to run the kernels on CPU tensors.
"""
import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Tunables, all in one place. The scan's chunk length T is also the spacing of the states the
# forward pass saves for the backward pass, so forward and backward share it: longer chunks save
# fewer states (less memory) but hold more per-step values in registers in the backward pass.
# ---------------------------------------------------------------------------------------------
SCAN_CHUNK = {"cuda": 4, "cpu": 8}  # by device type; a power of two
# (BLOCK_E channels, num_warps, maxnreg). A register cap lets more one-warp programs share an SM
# at the price of a few spills; caps that spill more lose. Wider blocks spill in the backward pass.
SCAN_FWD_CONFIGS = [(16, 1, None), (32, 1, None), (8, 1, None), (16, 1, 128), (32, 1, 168)]
SCAN_BWD_CONFIGS = [(8, 1, None), (16, 1, None), (8, 1, 168)]
SCAN_CPU_BLOCK_E = 16  # interpreter: small blocks keep the CPU tests fast
# The convolutions' tiles, (BLOCK_T, BLOCK_E, num_warps, span): BLOCK_E channels per program
# (num_warps warps), time cut into spans of about `span` steps (one program each), walked BLOCK_T
# rows per loop step (their loads issued together). Shorter spans make more programs; each span
# re-reads 2(W-1) rows at its ends. The backward pass, which streams four inputs in the mixer
# (x, u's two gradients, z's), runs fastest on longer spans than the forward pass (H200, DiS-S/2 and
# DiS-H/2 shapes).
CONV_FWD_TILE = (8, 128, 2, 32)
CONV_BWD_TILE = (8, 128, 2, 128)
CONV_CPU_TILE = (2, 8, 1, 4)  # interpreter: small, so that the tests cross every edge
# The backward pass leaves a chunk's T channel sums in T columns of a channel block (_channel_sums).
if SCAN_CHUNK["cuda"] > min(be for be, _, _ in SCAN_BWD_CONFIGS) or SCAN_CHUNK["cpu"] > SCAN_CPU_BLOCK_E:
    raise ValueError("the scan's chunk length must not exceed its smallest backward channel block")

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2(e))
LN2 = tl.constexpr(0.6931471805599453)


def _tuned(kernel, configs):
    """Autotuned version of `kernel` over (BLOCK_E, num_warps, maxnreg), re-tuned per (E, L, dtypes)."""
    return triton.autotune(
        configs=[triton.Config({"BLOCK_E": be}, num_warps=w, maxnreg=r) for be, w, r in configs],
        key=["E", "L"],
    )(kernel)


# ---------------------------------------------------------------------------------------------
# Shared pieces of the scan kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with its threshold 20; log1p done by Goldberg's trick.
    w = tl.exp(x)
    v = 1.0 + w
    log1p_w = tl.where(v == 1.0, w, tl.log(v) * (w / (v - 1.0)))
    return tl.where(x > 20.0, x, log1p_w)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _chunk_rows(c, L, T: tl.constexpr, REV: tl.constexpr):
    """Time index t of the scan steps of chunk c (reversed for direction 1), and which exist."""
    s = c * T + tl.arange(0, T)
    if REV:
        t = L - 1 - s
    else:
        t = s
    return t, (s < L) & (s >= 0)


@triton.jit
def _tile(base, t, cols, s_t, s_c, mask):
    """(T, cols) tile of a strided (time, column) array, zero where masked, in its dtype."""
    return tl.load(base + t[:, None] * s_t + cols[None, :] * s_c, mask=mask, other=0.0)


@triton.jit
def _direction_params(A_ptr, bias_ptr, D_ptr, d, e, n, emask, nmask, E, N, BLOCK_E: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, ACC: tl.constexpr):
    """Direction d's A (NP, BLOCK_E) times log2(e), so that exp(delta A) = exp2(delta A2) costs
    one multiply less per element; delta_bias and D (BLOCK_E,); zero where absent."""
    A2 = tl.load(A_ptr + d * E * N + e[None, :] * N + n[:, None],
                 mask=nmask[:, None] & emask[None, :], other=0.0).to(ACC) * LOG2E
    bias = tl.zeros([BLOCK_E], ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d * E + e, mask=emask, other=0.0).to(ACC)
    Dv = tl.zeros([BLOCK_E], ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + d * E + e, mask=emask, other=0.0).to(ACC)
    return A2, bias, Dv


@triton.jit
def _chunk_inputs(c, L, T: tl.constexpr, REV: tl.constexpr, e, n, emask, nmask,
                  u_base, su_l, su_e, dl_base, sd_l, sd_e, B_base, sB_l, sB_n, C_base, sC_l, sC_n):
    """Chunk c's (T, BLOCK_E) tiles of u and delta, its (T, NP) tiles of B and C, and the
    (T, BLOCK_E) mask of the steps that exist, for loading other (T, BLOCK_E) tiles alike."""
    t, valid = _chunk_rows(c, L, T, REV)
    m_te = valid[:, None] & emask[None, :]
    m_tn = valid[:, None] & nmask[None, :]
    return (t, m_te, _tile(u_base, t, e, su_l, su_e, m_te), _tile(dl_base, t, e, sd_l, sd_e, m_te),
            _tile(B_base, t, n, sB_l, sB_n, m_tn), _tile(C_base, t, n, sC_l, sC_n, m_tn))


@triton.jit
def _delta(raw, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(delta, raw + bias): delta = softplus(raw + bias), zero on masked entries (so that
    exp(delta A) = 1 and the state is left alone there)."""
    x = raw
    if HAS_BIAS:
        x = x + bias[None, :]
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    return tl.where(mask, dt, 0.0), x


@triton.jit
def _row(x, i, T: tl.constexpr):
    """Row i of a (T, a, b) tile as an (a, b) tile. Where one thread holds all T rows, a
    constant i makes this a register move (-0.0 is the exact identity of +)."""
    return tl.sum(tl.where((tl.arange(0, T) == i)[:, None, None], x, -0.0), axis=0)


@triton.jit
def _put(x, i, v, T: tl.constexpr):
    """x with row i replaced by the (a, b) tile v."""
    return tl.where((tl.arange(0, T) == i)[:, None, None], v[None, :, :], x)


@triton.jit
def _swap_columns(x, e_loc, MASK: tl.constexpr):
    """x (NP, BLOCK_E) with column e replaced by column e ^ MASK. Channels lie along lanes, so on
    the GPU this compiles to one warp shuffle per value a thread holds."""
    return tl.gather(x, tl.broadcast_to((e_loc ^ MASK)[None, :], x.shape), axis=1)


@triton.jit
def _held_row(e_loc, T: tl.constexpr):
    """Which row of a chunk the channel sums that _channel_sums leaves in column e_loc belong to."""
    if T == 4:
        return 2 * (e_loc & 1) + ((e_loc >> 1) & 1)
    else:
        return e_loc % T


@triton.jit
def _channel_sums(x, e_loc, T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Sums over channels of the T rows of x (T, NP, BLOCK_E), as an (NP, BLOCK_E) tile whose column
    e holds row _held_row(e) (the T rows fill columns 0..T-1; the other columns repeat them).

    T = 4 (CUDA's chunk): a butterfly reduce-scatter. At channel bits 0 and 1, column pairs swap half
    of their rows and each keeps the sum of the other half; each further bit adds the last row.
    A thread shuffles 8 and 4 values at the first two bits and 4 at each further one, where
    tl.sum over the channels shuffles all 16 at every bit. Other T: tl.sum, then each column
    picks its row."""
    if T == 4:
        b0 = (e_loc & 1)[None, :] != 0
        b1 = (e_loc & 2)[None, :] != 0
        x0, x1, x2, x3 = _row(x, 0, T), _row(x, 1, T), _row(x, 2, T), _row(x, 3, T)
        p0 = tl.where(b0, x2, x0) + _swap_columns(tl.where(b0, x0, x2), e_loc, 1)  # row 0 or 2 by bit 0
        p1 = tl.where(b0, x3, x1) + _swap_columns(tl.where(b0, x1, x3), e_loc, 1)  # row 1 or 3
        q = tl.where(b1, p1, p0) + _swap_columns(tl.where(b1, p0, p1), e_loc, 2)  # row 2 b0 + b1
        for k in tl.static_range(2, 16):
            if (1 << k) < BLOCK_E:
                q += _swap_columns(q, e_loc, 1 << k)
        return q
    else:
        sums = tl.sum(x, axis=2)  # (T, NP)
        pick = tl.arange(0, T)[:, None, None] == _held_row(e_loc, T)[None, None, :]
        return tl.sum(tl.where(pick, sums[:, :, None], 0.0), axis=0)


@triton.jit
def _saved_state(hs_base, c, n, e, E, NP: tl.constexpr, SAVE_EVERY: tl.constexpr):
    """Pointers (NP, BLOCK_E) to the state saved for chunk c: the one at the start of chunk
    c - c % SAVE_EVERY, kept at index c // SAVE_EVERY of the direction's (chunks, NP, E) states."""
    return hs_base + (c // SAVE_EVERY) * NP * E + n[:, None] * E + e[None, :]


@triton.jit
def _advance(h, u_c, dl_c, B_c, mask, A2, bias, T: tl.constexpr, HAS_BIAS: tl.constexpr,
             SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
    """The state (NP, BLOCK_E) after the T steps of a chunk, from the state before it."""
    dt, _ = _delta(dl_c.to(ACC), bias, mask, HAS_BIAS, SOFTPLUS)
    dt3 = dt[:, None, :]
    du3 = (dt * u_c.to(ACC))[:, None, :]
    B3 = B_c.to(ACC)[:, :, None]
    for i in tl.static_range(T):
        h = tl.exp2(_row(dt3, i, T) * A2) * h + _row(du3, i, T) * _row(B3, i, T)
    return h


# ---------------------------------------------------------------------------------------------
# Scan forward. Grid: (blocks of BLOCK_E channels, batch). The second direction adds its gated
# output onto the first's.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _scan_fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, hs_ptr,
    L, E,
    su_b, su_l, su_d, su_e,
    sd_b, sd_l, sd_d, sd_e,
    sB_b, sB_l, sB_d, sB_n,
    sC_b, sC_l, sC_d, sC_n,
    sz_b, sz_l, sz_e,
    sy_b, sy_l, sy_e,
    ND: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr, SAVE_EVERY: tl.constexpr, ACC: tl.constexpr,
):
    pid_e = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < E
    n = tl.arange(0, NP)  # states padded to a power of two; padded states stay zero
    nmask = n < N
    n_chunks = tl.cdiv(L, T)
    z_base = z_ptr + b * sz_b
    y_base = y_ptr + b * sy_b
    for d in tl.static_range(ND):
        u_base = u_ptr + b * su_b + d * su_d
        dl_base = dl_ptr + b * sd_b + d * sd_d
        B_base = B_ptr + b * sB_b + d * sB_d
        C_base = C_ptr + b * sC_b + d * sC_d
        hs_base = hs_ptr + ((b * ND + d) * tl.cdiv(n_chunks, SAVE_EVERY)) * NP * E
        A2, bias, Dv = _direction_params(A_ptr, bias_ptr, D_ptr, d, e, n, emask, nmask, E, N, BLOCK_E,
                                         HAS_BIAS, HAS_D, ACC)
        h = tl.zeros([NP, BLOCK_E], ACC)
        # Tiles of chunk 0; every iteration then loads the next chunk's tiles before computing.
        t, m_te, u_n, dl_n, B_n, C_n = _chunk_inputs(0, L, T, d == 1, e, n, emask, nmask, u_base, su_l, su_e,
                                                     dl_base, sd_l, sd_e, B_base, sB_l, sB_n, C_base, sC_l, sC_n)
        z_n = u_n
        if HAS_Z:
            z_n = _tile(z_base, t, e, sz_l, sz_e, m_te)
        y_n = u_n
        if d > 0:
            tl.debug_barrier()  # the first direction's last y stores before these loads (see the backward)
            y_n = _tile(y_base, t, e, sy_l, sy_e, m_te)
        for c in range(0, n_chunks):
            u_c, dl_c, B_c, C_c, z_c, y_c = u_n, dl_n, B_n, C_n, z_n, y_n
            t1, m1_te, u_n, dl_n, B_n, C_n = _chunk_inputs(c + 1, L, T, d == 1, e, n, emask, nmask, u_base, su_l,
                                                           su_e, dl_base, sd_l, sd_e, B_base, sB_l, sB_n, C_base,
                                                           sC_l, sC_n)
            if HAS_Z:
                z_n = _tile(z_base, t1, e, sz_l, sz_e, m1_te)
            if d > 0:
                y_n = _tile(y_base, t1, e, sy_l, sy_e, m1_te)

            t, valid = _chunk_rows(c, L, T, d == 1)
            mask = valid[:, None] & emask[None, :]
            if SAVE_STATES:
                tl.store(_saved_state(hs_base, c, n, e, E, NP, SAVE_EVERY), h,
                         mask=emask[None, :] & (c % SAVE_EVERY == 0))
            u = u_c.to(ACC)
            dt, _ = _delta(dl_c.to(ACC), bias, mask, HAS_BIAS, SOFTPLUS)
            dt3 = dt[:, None, :]
            du3 = (dt * u)[:, None, :]
            B3 = B_c.to(ACC)[:, :, None]
            C3 = C_c.to(ACC)[:, :, None]
            y3 = tl.zeros([T, 1, BLOCK_E], ACC)
            for i in tl.static_range(T):
                h = tl.exp2(_row(dt3, i, T) * A2) * h + _row(du3, i, T) * _row(B3, i, T)
                y3 = _put(y3, i, tl.sum(h * _row(C3, i, T), axis=0, keep_dims=True), T)
            y = tl.sum(y3, axis=1) + Dv[None, :] * u
            if HAS_Z:
                zt = z_c.to(ACC)
                y = y * zt * _sigmoid(zt)
            if d > 0:
                y += y_c.to(ACC)
            tl.store(y_base + t[:, None] * sy_l + e[None, :] * sy_e, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Scan backward: same grid; chunks walked last to first. Gradients of per-channel parameters
# (A, D, delta_bias) are summed over time in registers and written per batch element; those
# of B and C are summed over the program's channels and written per block of channels. Both
# partial sums are finished with torch.sum (deterministic, no atomics).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _scan_bwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, hs_ptr,
    du_ptr, ddl_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    L, E, NB,
    su_b, su_l, su_d, su_e,
    sd_b, sd_l, sd_d, sd_e,
    sB_b, sB_l, sB_d, sB_n,
    sC_b, sC_l, sC_d, sC_n,
    sz_b, sz_l, sz_e,
    sdy_b, sdy_l, sdy_e,
    ND: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_EVERY: tl.constexpr, ACC: tl.constexpr,
):
    pid_e = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    e_loc = tl.arange(0, BLOCK_E)
    e = pid_e * BLOCK_E + e_loc
    emask = e < E
    n = tl.arange(0, NP)
    nmask = n < N
    n_chunks = tl.cdiv(L, T)
    z_base = z_ptr + b * sz_b
    dy_base = dy_ptr + b * sdy_b
    dz_base = dz_ptr + b * L * E  # dz, du, ddelta are contiguous
    dBC_base = (pid_e.to(tl.int64) * NB + b) * L * ND * N  # dB, dC partials: (E blocks, batch, L, ND, N)
    for d in tl.static_range(ND):
        u_base = u_ptr + b * su_b + d * su_d
        dl_base = dl_ptr + b * sd_b + d * sd_d
        B_base = B_ptr + b * sB_b + d * sB_d
        C_base = C_ptr + b * sC_b + d * sC_d
        hs_base = hs_ptr + ((b * ND + d) * tl.cdiv(n_chunks, SAVE_EVERY)) * NP * E
        dud_base = b * L * ND * E + d * E
        A2, bias, Dv = _direction_params(A_ptr, bias_ptr, D_ptr, d, e, n, emask, nmask, E, N, BLOCK_E,
                                         HAS_BIAS, HAS_D, ACC)
        dh = tl.zeros([NP, BLOCK_E], ACC)  # adjoint state after the current chunk
        a_next = tl.zeros([NP, BLOCK_E], ACC)  # its decay (first step of the chunk after)
        dA = tl.zeros([NP, BLOCK_E], ACC)
        dD = tl.zeros([BLOCK_E], ACC)
        dbias = tl.zeros([BLOCK_E], ACC)
        # Tiles of the last chunk; every iteration then loads the previous chunk's tiles first.
        t, m_te, u_n, dl_n, B_n, C_n = _chunk_inputs(n_chunks - 1, L, T, d == 1, e, n, emask, nmask, u_base, su_l,
                                                     su_e, dl_base, sd_l, sd_e, B_base, sB_l, sB_n, C_base, sC_l,
                                                     sC_n)
        dy_n = _tile(dy_base, t, e, sdy_l, sdy_e, m_te)
        z_n = dy_n
        dz_n = dy_n  # the first direction's dz, which the second adds to (loaded ahead, like the inputs)
        if HAS_Z:
            z_n = _tile(z_base, t, e, sz_l, sz_e, m_te)
            if d > 0:
                # The first direction's last dz stores may come from other threads than these loads
                # (the compiler lays stores and loads out separately): a CTA barrier orders them.
                # (The forward pass does the same for y.)
                tl.debug_barrier()
                dz_n = _tile(dz_base, t, e, E, 1, m_te)
        h_n = tl.load(_saved_state(hs_base, n_chunks - 1, n, e, E, NP, SAVE_EVERY), mask=emask[None, :], other=0.0)
        for cc in range(0, n_chunks):
            c = n_chunks - 1 - cc
            u_c, dl_c, B_c, C_c, dy_c, z_c, dz_c, h = u_n, dl_n, B_n, C_n, dy_n, z_n, dz_n, h_n
            t1, m1_te, u_n, dl_n, B_n, C_n = _chunk_inputs(c - 1, L, T, d == 1, e, n, emask, nmask, u_base, su_l,
                                                           su_e, dl_base, sd_l, sd_e, B_base, sB_l, sB_n, C_base,
                                                           sC_l, sC_n)
            dy_n = _tile(dy_base, t1, e, sdy_l, sdy_e, m1_te)
            if HAS_Z:
                z_n = _tile(z_base, t1, e, sz_l, sz_e, m1_te)
                if d > 0:
                    dz_n = _tile(dz_base, t1, e, E, 1, m1_te)
            h_n = tl.load(_saved_state(hs_base, c - 1, n, e, E, NP, SAVE_EVERY), mask=emask[None, :] & (c > 0),
                          other=0.0)
            if SAVE_EVERY > 1:  # from the saved state to chunk c's start: the chunks in between
                for j in range(c - c % SAVE_EVERY, c):
                    _, m_j, u_j, dl_j, B_j, _ = _chunk_inputs(j, L, T, d == 1, e, n, emask, nmask, u_base, su_l,
                                                              su_e, dl_base, sd_l, sd_e, B_base, sB_l, sB_n, C_base,
                                                              sC_l, sC_n)
                    h = _advance(h, u_j, dl_j, B_j, m_j, A2, bias, T, HAS_BIAS, SOFTPLUS, ACC)

            t, valid = _chunk_rows(c, L, T, d == 1)
            mask = valid[:, None] & emask[None, :]
            u = u_c.to(ACC)
            dt, x = _delta(dl_c.to(ACC), bias, mask, HAS_BIAS, SOFTPLUS)
            dy = dy_c.to(ACC)
            g = dy
            if HAS_Z:
                zt = z_c.to(ACC)
                sig = _sigmoid(zt)
                g = dy * zt * sig
            dt3 = tl.broadcast_to(dt[:, None, :], (T, NP, BLOCK_E))
            du3 = tl.broadcast_to((dt * u)[:, None, :], (T, NP, BLOCK_E))
            g3 = tl.broadcast_to(g[:, None, :], (T, NP, BLOCK_E))
            B3 = tl.broadcast_to(B_c.to(ACC)[:, :, None], (T, NP, BLOCK_E))
            C3 = tl.broadcast_to(C_c.to(ACC)[:, :, None], (T, NP, BLOCK_E))
            # Per-step inputs and results are whole (T, NP, BLOCK_E) tiles, in which each thread holds
            # all T steps of its elements: rows move in registers, and the sums over states (y, dhB,
            # wA) and over channels (dB, dC) run once per chunk instead of once per step across threads.
            # Forward through the chunk from its checkpoint, keeping a_s, a_s h_{s-1} and h_s per step.
            a3 = tl.zeros([T, NP, BLOCK_E], ACC)
            ah3 = tl.zeros([T, NP, BLOCK_E], ACC)
            hs3 = tl.zeros([T, NP, BLOCK_E], ACC)
            for i in tl.static_range(T):
                a = tl.exp2(_row(dt3, i, T) * A2)
                ah = a * h
                h = ah + _row(du3, i, T) * _row(B3, i, T)
                a3 = _put(a3, i, a, T)
                ah3 = _put(ah3, i, ah, T)
                hs3 = _put(hs3, i, h, T)
            dC_sums = _channel_sums(hs3 * g3, e_loc, T, BLOCK_E)  # dC_s = sum_e g_s h_s
            if HAS_Z:
                y = tl.sum(hs3 * C3, axis=1) + Dv[None, :] * u
                dz = dy * y * sig * (1.0 + zt * (1.0 - sig))
                if d > 0:
                    dz += dz_c.to(ACC)
                tl.store(dz_base + t[:, None] * E + e[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
            # Backward through the chunk: dh_s = C_s g_s + a_{s+1} dh_{s+1}.
            dh3 = tl.zeros([T, NP, BLOCK_E], ACC)
            for j in tl.static_range(T):
                i = T - 1 - j
                dh = a_next * dh + _row(C3, i, T) * _row(g3, i, T)
                a_next = _row(a3, i, T)
                dh3 = _put(dh3, i, dh, T)
            w3 = dh3 * ah3  # gradient w.r.t. a_s, times a_s
            dA += tl.sum(w3 * dt3, axis=0)
            dB_sums = _channel_sums(dh3 * du3, e_loc, T, BLOCK_E)  # dB_s = sum_e dh_s delta_s u_s
            dhB = tl.sum(dh3 * B3, axis=1)
            ddt = LN2 * tl.sum(w3 * A2[None, :, :], axis=1) + dhB * u  # d a_s / d delta_s = A a_s
            du = dhB * dt + Dv[None, :] * g
            dD += tl.sum(g * u, axis=0)
            if SOFTPLUS:
                ddt = ddt * tl.where(x > 20.0, 1.0, _sigmoid(x))
            ddt = tl.where(mask, ddt, 0.0)
            dbias += tl.sum(ddt, axis=0)
            te_off = dud_base + t[:, None] * ND * E + e[None, :]
            tl.store(du_ptr + te_off, du.to(du_ptr.dtype.element_ty), mask=mask)
            tl.store(ddl_ptr + te_off, ddt.to(ddl_ptr.dtype.element_ty), mask=mask)
            # column e of the channel sums holds step s_e of the chunk (columns >= T repeat them)
            s_e = c * T + _held_row(e_loc, T)
            t_e = s_e
            if d == 1:
                t_e = L - 1 - s_e
            ne_off = dBC_base + t_e[None, :] * ND * N + d * N + n[:, None]
            ne_mask = nmask[:, None] & ((e_loc < T) & (s_e < L))[None, :]
            tl.store(dB_ptr + ne_off, dB_sums, mask=ne_mask)
            tl.store(dC_ptr + ne_off, dC_sums, mask=ne_mask)
        pe = (b * ND + d) * E + e
        tl.store(dA_ptr + pe[None, :] * N + n[:, None], dA, mask=nmask[:, None] & emask[None, :])
        tl.store(dD_ptr + pe, dD, mask=emask)
        tl.store(dbias_ptr + pe, dbias, mask=emask)


_scan_fwd_tuned = _tuned(_scan_fwd_kernel, SCAN_FWD_CONFIGS)
_scan_bwd_tuned = _tuned(_scan_bwd_kernel, SCAN_BWD_CONFIGS)


def _acc_torch_dtype(x):
    """Accumulation dtype for x's kernels: float64 stays float64 (gradcheck), all else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _acc_dtype(x):
    return tl.float64 if _acc_torch_dtype(x) == torch.float64 else tl.float32


def _launch(kernel, tuned, grid_args, *args, **meta):
    """Run `kernel` with the autotuner on CUDA, with the fixed small CPU block on the
    interpreter. Returns the BLOCK_E that ran."""
    E, batch = grid_args
    if args[0].is_cuda:
        tuned[lambda m: (triton.cdiv(E, m["BLOCK_E"]), batch)](*args, **meta)
        return tuned.best_config.kwargs["BLOCK_E"]
    be = SCAN_CPU_BLOCK_E
    kernel[(triton.cdiv(E, be), batch)](*args, BLOCK_E=be, **meta)
    return be


def _check_scan_args(u, delta, A, B, C):
    """What the kernels need beyond the shapes scan.bimamba_scan checks; runs on every call, before
    the GPU gets work: kept to cheap comparisons."""
    N = A.shape[-1]
    if N > 256:
        raise ValueError(f"the state size N must be at most 256 (Mamba uses 16), got {N}")
    device = u.device
    if delta.device != device or A.device != device or B.device != device or C.device != device:
        raise ValueError("all scan inputs must be on the same device")


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, save_states, save_every):
    batch, L, ND, E = u.shape
    N = A.shape[-1]
    T = SCAN_CHUNK["cuda" if u.is_cuda else "cpu"]
    A = A.contiguous()
    y = torch.empty(batch, L, E, device=u.device, dtype=u.dtype)
    states = None
    if save_states:
        n_saved = triton.cdiv(triton.cdiv(L, T), save_every)
        states = torch.empty(batch, ND, n_saved, triton.next_power_of_2(N), E, device=u.device,
                             dtype=_acc_torch_dtype(u))
    zz = z if z is not None else y
    _launch(
        _scan_fwd_kernel, _scan_fwd_tuned, (E, batch),
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A,
        y, states if save_states else y,
        L, E,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *zz.stride(), *y.stride(),
        ND=ND, N=N, NP=triton.next_power_of_2(N), T=T, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, SAVE_STATES=save_states, SAVE_EVERY=save_every,
        ACC=_acc_dtype(u),
    )
    return y, states


def _scan_backward(dy, u, delta, A, B, C, D, z, delta_bias, softplus, states, save_every):
    batch, L, ND, E = u.shape
    N = A.shape[-1]
    T = SCAN_CHUNK["cuda" if u.is_cuda else "cpu"]
    acc = states.dtype
    dev = u.device
    du = torch.empty(batch, L, ND, E, device=dev, dtype=u.dtype)
    ddelta = torch.empty(batch, L, ND, E, device=dev, dtype=delta.dtype)
    dz = torch.empty(batch, L, E, device=dev, dtype=z.dtype) if z is not None else None
    # room for the smallest block the autotuner may pick (asked of the autotuner itself, so that
    # a config list changed at run time cannot make the kernel write past the buffer)
    min_be = min(c.kwargs["BLOCK_E"] for c in _scan_bwd_tuned.configs) if u.is_cuda else SCAN_CPU_BLOCK_E
    dB_part = torch.empty(triton.cdiv(E, min_be), batch, L, ND, N, device=dev, dtype=acc)
    dC_part = torch.empty_like(dB_part)
    dA_part = torch.empty(batch, ND, E, N, device=dev, dtype=acc)
    dD_part = torch.empty(batch, ND, E, device=dev, dtype=acc)
    dbias_part = torch.empty_like(dD_part)
    zz = z if z is not None else dy
    be = _launch(
        _scan_bwd_kernel, _scan_bwd_tuned, (E, batch),
        u, delta, A.contiguous(), B, C, D if D is not None else A, zz,
        delta_bias if delta_bias is not None else A, dy, states,
        du, ddelta, dz if dz is not None else du, dB_part, dC_part, dA_part, dD_part, dbias_part,
        L, E, batch,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *zz.stride(), *dy.stride(),
        ND=ND, N=N, NP=triton.next_power_of_2(N), T=T, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, SAVE_EVERY=save_every, ACC=_acc_dtype(u),
    )
    n_blocks = triton.cdiv(E, be)
    dB = dB_part[:n_blocks].sum(0).to(B.dtype)
    dC = dC_part[:n_blocks].sum(0).to(C.dtype)
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


class _BiMambaScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, save_states, save_every):
        keep = save_states and save_every > 0
        y, states = _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, keep, max(save_every, 1))
        ctx.softplus, ctx.save_every = softplus, save_every
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        save_every = ctx.save_every
        if save_every == 0:  # none kept: the forward pass again, its states held for this backward pass only
            _, states = _scan_forward(u, delta, A, B, C, D, z, delta_bias, ctx.softplus, True, 1)
            save_every = 1
        grads = _scan_backward(dy, u, delta, A, B, C, D, z, delta_bias, ctx.softplus, states, save_every)
        return (*grads, None, None, None)


def bimamba_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, save_every=0):
    """Selective scan of ND = 1 or 2 directions, summed, token-major layout.

    u, delta: (batch, L, ND, E); A: (ND, E, N) float32 (negative); B, C: (batch, L, ND, N);
    D, delta_bias: (ND, E) or None; z: (batch, L, E) or None, shared by the directions.
    Direction 0 scans t = 0..L-1, direction 1 scans t = L-1..0 (scan of the flipped sequence,
    flipped back). Any strides; fastest when the last dimension is contiguous.
    save_every: keep the state of every save_every-th chunk for the backward pass (1/save_every
    of that memory, for recomputing the chunks in between); 0: keep none, the backward pass runs
    the forward pass again first and holds its states only while it runs.
    Returns y: (batch, L, E) in u's dtype, sum over directions of scan_d(...) * silu(z).
    The shapes are those scan.bimamba_scan, the dispatcher, has checked.
    """
    _check_scan_args(u, delta, A, B, C)
    if not isinstance(save_every, int) or save_every < 0:
        raise ValueError(f"save_every must be an integer >= 0, got {save_every!r}")
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    save_states = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    return _BiMambaScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), save_states, save_every)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, save_every=1):
    """mamba-ssm's selective_scan_fn layout on the same kernels (one direction).

    u, delta, z: (batch, E, L); A: (E, N); B, C: (batch, N, L), or (batch, G, N, L) with channel
    e using group e // (E / G); D, delta_bias: (E,) or None. Returns (batch, E, L) in u's dtype.
    The shapes are those scan.selective_scan, the dispatcher, has checked.
    """
    if B.dim() == 4 and B.shape[1] > 1:  # one call per group of channels
        per = u.shape[1] // B.shape[1]
        outs = []
        for i in range(B.shape[1]):
            ch = slice(i * per, (i + 1) * per)
            outs.append(selective_scan(
                u[:, ch], delta[:, ch], A[ch], B[:, i:i + 1], C[:, i:i + 1], None if D is None else D[ch],
                None if z is None else z[:, ch], None if delta_bias is None else delta_bias[ch], delta_softplus,
                save_every))
        return torch.cat(outs, 1)

    def token_major_bc(x):  # (batch, [1,] N, L) -> (batch, L, 1, N)
        return (x[:, 0] if x.dim() == 4 else x).transpose(1, 2).unsqueeze(2)

    def param(x):  # (E, ...) -> (1, E, ...) in float32 (float64 kept, for gradcheck)
        return None if x is None else (x if x.dtype == torch.float64 else x.float()).unsqueeze(0)

    y = bimamba_scan(
        u.transpose(1, 2).unsqueeze(2), delta.transpose(1, 2).unsqueeze(2), param(A),
        token_major_bc(B), token_major_bc(C), param(D),
        z.transpose(1, 2) if z is not None else None, param(delta_bias), delta_softplus, save_every,
    )
    return y.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Depthwise convolution + SiLU for both directions (the conv1d / conv1d_b of the mixer).
# Direction 0 is mamba's causal Conv1d(groups=E, padding=W-1)[..., :L]; direction 1 is the
# same on the time-reversed sequence, reversed back, i.e. anti-causal.
#   pre0[t] = bias0 + sum_k w0[k] x[t - (W-1) + k]      pre1[t] = bias1 + sum_k w1[k] x[t + (W-1) - k]
# The backward pass is the transposed convolutions of g_d = du_d silu'(pre_d):
#   dx[t] = sum_k w0[k] g0[t + (W-1) - k] + w1[k] g1[t - (W-1) + k]
#
# Both kernels stream: a program owns BLOCK_E channels of one sequence over a span of time steps
# and walks it one row (the BLOCK_E contiguous channels of a time step) at a time, BLOCK_T rows
# per loop step, loads first. At lead row s it holds the window x[s-W+1..s] in registers, which
# is exactly what pre0[s] and pre1[s-W+1] read, so each x row is loaded once. The backward pass
# also keeps the W newest rows of g0 (up to s) and of g1 (up to s-W+1), which are what dx[s-W+1]
# reads. A span's outputs need W-1 rows of x and du past each of its ends: those rows are loaded
# again by the neighbouring span, and their g recomputed but summed into dw, dbias only by the
# span that owns them. Windows are tuples of (BLOCK_E,) rows, shifted by one per row.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _conv_rows(ptrs, t0, emask, L, stride_t, N: tl.constexpr, ACC: tl.constexpr):
    """Rows t0..t0+N-1 of a (time, channels) array whose row 0 is at ptrs, as a tuple of N
    (BLOCK_E,) rows in ACC, zero outside the sequence."""
    rows = ()
    for i in tl.static_range(N):
        t = t0 + i
        rows = rows + (tl.load(ptrs + t * stride_t, mask=emask & (t >= 0) & (t < L), other=0.0).to(ACC),)
    return rows


@triton.jit
def _add_rows(a, b, N: tl.constexpr):
    """Two tuples of N rows added row by row."""
    out = ()
    for i in tl.static_range(N):
        out = out + (a[i] + b[i],)
    return out


@triton.jit
def _conv_filter(w_ptr, b_ptr, e, emask, E, D: tl.constexpr, W: tl.constexpr, ACC: tl.constexpr):
    """Direction D's filter as a tuple of W (BLOCK_E,) taps, and its bias."""
    taps = ()
    for k in tl.static_range(W):
        taps = taps + (tl.load(w_ptr + (D * E + e) * W + k, mask=emask, other=0.0).to(ACC),)
    return taps, tl.load(b_ptr + D * E + e, mask=emask, other=0.0).to(ACC)


@triton.jit
def _conv_sigmoid(x):
    """1 / (1 + 2^(-x log2 e)): exp2 is one instruction on NVIDIA GPUs, where exp adds a fix-up
    for subnormal results that a sigmoid does not need."""
    return 1.0 / (1.0 + tl.exp2(x * -LOG2E))


@triton.jit
def _conv_pre(xs, w0, b0, w1, b1, W: tl.constexpr):
    """pre0[s] and pre1[s-W+1] from the window xs = (x[s-W+1], ..., x[s])."""
    pre0 = b0
    pre1 = b1
    for k in tl.static_range(W):
        pre0 += w0[k] * xs[k]
        pre1 += w1[k] * xs[W - 1 - k]
    return pre0, pre1


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, u_ptr, L, E, span, sx_b, sx_l, sx_e, W: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, ACC: tl.constexpr):
    """u[t] for t in this program's span: lead row s writes u0[s] and u1[s-W+1]."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    t0 = tl.program_id(1) * span
    t1 = tl.minimum(t0 + span, L)
    b = tl.program_id(2).to(tl.int64)
    emask = e < E
    x_ptrs = x_ptr + b * sx_b + e * sx_e
    u_ptrs = u_ptr + b * L * 2 * E + e
    w0, b0 = _conv_filter(w_ptr, b_ptr, e, emask, E, 0, W, ACC)
    w1, b1 = _conv_filter(w_ptr, b_ptr, e, emask, E, 1, W, ACC)
    xs = _conv_rows(x_ptrs, t0 - (W - 1), emask, L, sx_l, W - 1, ACC)  # the window before lead row t0
    for s0 in range(t0, t1 + W - 1, BLOCK_T):
        x_rows = _conv_rows(x_ptrs, s0, emask, L, sx_l, BLOCK_T, ACC)
        for i in tl.static_range(BLOCK_T):
            s = s0 + i
            r = s - (W - 1)
            xs = xs + (x_rows[i],)
            pre0, pre1 = _conv_pre(xs, w0, b0, w1, b1, W)
            tl.store(u_ptrs + s * 2 * E, (pre0 * _conv_sigmoid(pre0)).to(u_ptr.dtype.element_ty), mask=emask & (s < t1))
            tl.store(u_ptrs + r * 2 * E + E, (pre1 * _conv_sigmoid(pre1)).to(u_ptr.dtype.element_ty),
                     mask=emask & (r >= t0) & (r < t1))
            xs = xs[1:]


@triton.jit
def _silu_grad(du, pre):
    """du silu'(pre), silu'(p) = sigmoid(p) (1 + p (1 - sigmoid(p)))."""
    sig = _conv_sigmoid(pre)
    return du * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, du_ptr, du2_ptr, dz_ptr, dx_ptr, part_ptr, L, E, span,
                     sx_b, sx_l, sx_e, sdu_b, sdu_l, sdu_d, sdu_e, sdz_b, sdz_l, sdx_b, sdx_l, W: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, ACC: tl.constexpr, HAS_DU2: tl.constexpr,
                     HAS_DZ: tl.constexpr):
    """dx[t] for t in this program's span (lead row s writes dx[s-W+1]), and the span's sums over
    time of dw and dbias, written to (batch, spans, 2, E, W + 1): the W taps' then the bias's.
    HAS_DU2: u's gradient is du + du2 (du2 laid out as du), summed here as the rows are loaded.
    HAS_DZ: dx has rows of 2E values (xz's gradient), x's gradient in their first half; dz
    (batch, L, E), unit channel stride, is copied into their second half, row t beside dx[t]."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    t0 = tl.program_id(1) * span
    t1 = tl.minimum(t0 + span, L)
    b = tl.program_id(2).to(tl.int64)
    emask = e < E
    x_ptrs = x_ptr + b * sx_b + e * sx_e
    du_ptrs = du_ptr + b * sdu_b + e * sdu_e
    du2_ptrs = du2_ptr + b * sdu_b + e * sdu_e
    dx_ptrs = dx_ptr + b * sdx_b + e
    dz_ptrs = dz_ptr + b * sdz_b + e
    w0, b0 = _conv_filter(w_ptr, b_ptr, e, emask, E, 0, W, ACC)
    w1, b1 = _conv_filter(w_ptr, b_ptr, e, emask, E, 1, W, ACC)
    xs = _conv_rows(x_ptrs, t0 - (W - 1), emask, L, sx_l, W - 1, ACC)  # the window before lead row t0
    zero = tl.zeros([BLOCK_E], ACC)
    # g0[s-W+1..s-1] and g1[s-2W+2..s-W] before lead row s; the zeros that stand for rows before
    # the span reach only dx rows that the span does not write
    g0s = ()
    g1s = ()
    for k in tl.static_range(W - 1):
        g0s = g0s + (zero,)
        g1s = g1s + (zero,)
    dw0 = ()
    dw1 = ()
    for k in tl.static_range(W):
        dw0 = dw0 + (zero,)
        dw1 = dw1 + (zero,)
    db0 = zero
    db1 = zero
    for s0 in range(t0, t1 + W - 1, BLOCK_T):
        x_rows = _conv_rows(x_ptrs, s0, emask, L, sx_l, BLOCK_T, ACC)
        du0_rows = _conv_rows(du_ptrs, s0, emask, L, sdu_l, BLOCK_T, ACC)
        du1_rows = _conv_rows(du_ptrs + sdu_d, s0 - (W - 1), emask, L, sdu_l, BLOCK_T, ACC)
        if HAS_DU2:
            du0_rows = _add_rows(du0_rows, _conv_rows(du2_ptrs, s0, emask, L, sdu_l, BLOCK_T, ACC), BLOCK_T)
            du1_rows = _add_rows(du1_rows, _conv_rows(du2_ptrs + sdu_d, s0 - (W - 1), emask, L, sdu_l, BLOCK_T, ACC),
                                  BLOCK_T)
        if HAS_DZ:
            dz_rows = _conv_rows(dz_ptrs, s0 - (W - 1), emask, L, sdz_l, BLOCK_T, ACC)  # beside dx's rows
        for i in tl.static_range(BLOCK_T):
            s = s0 + i
            r = s - (W - 1)
            xs = xs + (x_rows[i],)
            pre0, pre1 = _conv_pre(xs, w0, b0, w1, b1, W)
            g0 = _silu_grad(du0_rows[i], pre0)  # zero past the end (du masked)
            g1 = _silu_grad(du1_rows[i], pre1)  # zero before the start
            g0s = g0s + (g0,)
            g1s = g1s + (g1,)
            dx = w1[0] * g1s[0]
            for k in tl.static_range(W):  # one chain of fused multiply-adds
                dx += w0[k] * g0s[W - 1 - k]
                if k > 0:
                    dx += w1[k] * g1s[k]
            own1 = (r >= t0) & (r < t1)
            tl.store(dx_ptrs + r * sdx_l, dx.to(dx_ptr.dtype.element_ty), mask=emask & own1)
            if HAS_DZ:
                tl.store(dx_ptrs + r * sdx_l + E, dz_rows[i].to(dx_ptr.dtype.element_ty), mask=emask & own1)
            g0 = tl.where(s < t1, g0, 0.0)  # g0[s] for s >= t1 is summed by the next span
            g1 = tl.where(own1, g1, 0.0)
            db0 += g0
            db1 += g1
            new0 = ()
            new1 = ()
            for k in tl.static_range(W):
                new0 = new0 + (dw0[k] + g0 * xs[k],)
                new1 = new1 + (dw1[k] + g1 * xs[W - 1 - k],)
            dw0 = new0
            dw1 = new1
            xs = xs[1:]
            g0s = g0s[1:]
            g1s = g1s[1:]
    pe = ((b * tl.num_programs(1) + tl.program_id(1)) * 2 * E + e) * (W + 1)
    for k in tl.static_range(W):
        tl.store(part_ptr + pe + k, dw0[k], mask=emask)
        tl.store(part_ptr + pe + E * (W + 1) + k, dw1[k], mask=emask)
    tl.store(part_ptr + pe + W, db0, mask=emask)
    tl.store(part_ptr + pe + E * (W + 1) + W, db1, mask=emask)


def _conv_meta(x, W, tile):
    """Span length, number of spans, channel block and launch keywords of a conv kernel with `tile`
    (CPU tensors: CONV_CPU_TILE). The spans are of equal length (up to rounding), so that none is a
    short tail."""
    bt, be, nw, span = tile if x.is_cuda else CONV_CPU_TILE
    L = x.shape[1]
    n_spans = triton.cdiv(L, span)
    span = triton.cdiv(L, n_spans)
    return span, n_spans, be, dict(W=W, BLOCK_T=bt, BLOCK_E=be, ACC=_acc_dtype(x), num_warps=nw)


def _conv_forward(x, weight, bias):
    """u (batch, L, 2, E) from x (batch, L, E), any strides."""
    batch, L, E = x.shape
    u = torch.empty(batch, L, 2, E, device=x.device, dtype=x.dtype)
    span, n_spans, be, meta = _conv_meta(x, weight.shape[-1], CONV_FWD_TILE)
    _conv_fwd_kernel[(triton.cdiv(E, be), n_spans, batch)](x, weight, bias, u, L, E, span, *x.stride(), **meta)
    return u


def _conv_backward(x, weight, bias, du, du2=None, dz=None):
    """The convolutions' backward pass for u's gradient du (+ du2, laid out as du): x's gradient
    (batch, L, E), or with dz (batch, L, E) the gradient of xz (batch, L, 2E), x's beside dz; and
    the filters' gradients (dw, dbias)."""
    batch, L, E = x.shape
    W = weight.shape[-1]
    span, n_spans, be, meta = _conv_meta(x, W, CONV_BWD_TILE)
    dx = torch.empty(batch, L, E if dz is None else 2 * E, device=x.device, dtype=x.dtype)
    part = torch.empty(batch, n_spans, 2, E, W + 1, device=x.device, dtype=_acc_torch_dtype(x))
    du2_in, dz_in = (du if du2 is None else du2), (dx if dz is None else dz)  # unread where absent
    _conv_bwd_kernel[(triton.cdiv(E, be), n_spans, batch)](
        x, weight, bias, du, du2_in, dz_in, dx, part, L, E, span, *x.stride(), *du.stride(),
        dz_in.stride(0), dz_in.stride(1), dx.stride(0), dx.stride(1), HAS_DU2=du2 is not None,
        HAS_DZ=dz is not None, **meta)
    part = part.sum((0, 1))  # (2, E, W + 1): the taps', then the bias's gradient
    return dx, part[..., :W].to(weight.dtype), part[..., W].to(bias.dtype)


class _BiConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        weight, bias = weight.contiguous(), bias.contiguous()
        ctx.save_for_backward(x, weight, bias)
        return _conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, du):
        x, weight, bias = ctx.saved_tensors
        return _conv_backward(x, weight, bias, du)


class _MixerInput(torch.autograd.Function):
    """xz -> (u, x_dbl, z), see mixer_input. u has two consumers (the scan and x_proj) and xz two
    halves, each with its own gradient: autograd would add u's two gradients and concatenate x's
    and z's, two more passes over (batch, L, 2E) tensors. Here the convolution's backward kernel
    reads both of u's gradients and writes x's straight into xz's gradient, copying z's beside it."""

    @staticmethod
    def forward(ctx, xz, weight, bias, proj):
        E = xz.shape[-1] // 2
        x, z = xz[..., :E], xz[..., E:]
        weight, bias = weight.contiguous(), bias.contiguous()
        u = _conv_forward(x, weight, bias)
        proj = proj.to(u.dtype)
        x_dbl = u.flatten(2) @ proj.t()
        ctx.save_for_backward(x, weight, bias, u, proj)
        return u, x_dbl, z

    @staticmethod
    def backward(ctx, du, dx_dbl, dz):
        x, weight, bias, u, proj = ctx.saved_tensors
        du_proj = (dx_dbl @ proj).view(u.shape)  # x_proj's share of u's gradient
        dxz, dw, db = _conv_backward(x, weight, bias, du.contiguous(), du_proj, dz.contiguous())
        dproj = dx_dbl.flatten(0, 1).t() @ u.flatten(0, 1).flatten(1)
        return dxz, dw, db, dproj


def biconv_silu(x, weight, bias):
    """Causal and anti-causal depthwise conv1d, each followed by SiLU.

    x: (batch, L, E), any strides (in DiS the x half of in_proj's output, row stride 2E);
    weight: (2, E, W); bias: (2, E). Returns u: (batch, L, 2, E) contiguous, direction 0 causal
    (mamba's conv1d), direction 1 anti-causal (conv1d_b on the flipped sequence, flipped back).
    The shapes are those scan.biconv_silu, the dispatcher, has checked.
    """
    return _BiConvSiLU.apply(x, weight, bias)


def mixer_input(xz, weight, bias, proj):
    """The mixer's input side up to the scan, with one backward pass for all of it.

    xz: (batch, L, 2E), in_proj's output, x then z; weight: (2, E, W); bias: (2, E); proj:
    (P, 2E), x_proj's weight over both directions. Returns u = biconv_silu(x) (batch, L, 2, E),
    x_dbl = u.flatten(2) @ proj^T (batch, L, P) in u's dtype, and z (batch, L, E), a view of xz.
    The shapes are those scan.mixer_input, the dispatcher, has checked.
    """
    return _MixerInput.apply(xz, weight, bias, proj)
