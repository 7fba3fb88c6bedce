"""The add-and-norm step that opens every DiS block, as one Triton kernel each way:

    residual' = residual + keep_b * hidden      (float32; without a residual: hidden as float32)
    normed    = residual' / rms(residual') * weight        (RMSNorm, in the dtype asked for)

model.add_norm is the readable definition (a residual add, drop path's per-sample scale
keep_b, model.RMSNorm), which the tests compare against. In PyTorch these are four to six
kernels each way, each reading and writing the (B, L, D) activations, and RMSNorm's
weight gradient alone is slow at D of a few hundred; here the forward reads hidden and the
residual once and writes residual' and normed, and the backward reads the two incoming
gradients and residual' once and writes the two outgoing ones.

Rows are the B*L tokens, each normalised on its own: a program takes a tile of ROWS rows at a
time, all D features of a row in it. The backward kernel's programs each walk a fixed range of
rows and leave their sum of the weight gradient in a row of partial sums, summed afterwards in
a fixed order (the result does not change between runs).

Set TRITON_INTERPRET=1 before importing this module to run the kernels on CPU tensors.
"""
import torch
import triton
import triton.language as tl

TILE = 4096          # elements per tile: ROWS = TILE / D rows (D padded to a power of 2)
BWD_PROGRAMS = 2048  # the backward kernel's programs at most (rows of weight-gradient partial sums)
WARPS = 4


def _meta(D):
    block_d = triton.next_power_of_2(D)
    return dict(ROWS=max(1, TILE // block_d), BLOCK_D=block_d, num_warps=WARPS)


@triton.jit
def _tile(row0, L, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, rows):
    """Rows row0.. of a (rows, D) tensor: row and column indices, masks, the batch of each row."""
    row = row0 + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK_D)
    row_ok, col_ok = row < rows, col < D
    offsets = row.to(tl.int64)[:, None] * D + col[None, :]
    return row, col_ok, row_ok, offsets, row_ok[:, None] & col_ok[None, :], row // L


@triton.jit
def _add_norm_fwd_kernel(h_ptr, r_ptr, keep_ptr, w_ptr, normed_ptr, r_out_ptr, rstd_ptr, rows, L, D, eps,
                         HAS_RESIDUAL: tl.constexpr, HAS_KEEP: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    row, col_ok, row_ok, offsets, mask, batch = _tile(tl.program_id(0) * ROWS, L, D, ROWS, BLOCK_D, rows)
    x = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_KEEP:
        x *= tl.load(keep_ptr + batch, mask=row_ok, other=0.0)[:, None]
    if HAS_RESIDUAL:
        x += tl.load(r_ptr + offsets, mask=mask, other=0.0)
    tl.store(r_out_ptr + offsets, x, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    tl.store(rstd_ptr + row, rstd, mask=row_ok)
    w = tl.load(w_ptr + tl.arange(0, BLOCK_D), mask=col_ok, other=0.0)
    tl.store(normed_ptr + offsets, (x * rstd[:, None] * w[None, :]).to(normed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_bwd_kernel(dn_ptr, dr_ptr, x_ptr, rstd_ptr, w_ptr, keep_ptr, dh_ptr, dr_in_ptr, dw_ptr,
                         rows, L, D, rows_per_program,
                         HAS_DR: tl.constexpr, HAS_KEEP: tl.constexpr, WRITE_DR_IN: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # dx = rstd (dn w - xhat mean(dn w xhat)) + dr, xhat = x rstd; dweight = sum over rows of dn xhat
    pid = tl.program_id(0)
    w = tl.load(w_ptr + tl.arange(0, BLOCK_D), mask=tl.arange(0, BLOCK_D) < D, other=0.0)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid * rows_per_program
    end = tl.minimum(first + rows_per_program, rows)
    for row0 in range(first, end, ROWS):
        row, col_ok, row_ok, offsets, mask, batch = _tile(row0, L, D, ROWS, BLOCK_D, end)
        dn = tl.load(dn_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        xhat = tl.load(x_ptr + offsets, mask=mask, other=0.0) * rstd[:, None]
        dw += tl.sum(dn * xhat, axis=0)
        dnw = dn * w[None, :]
        dx = rstd[:, None] * (dnw - xhat * (tl.sum(dnw * xhat, axis=1) / D)[:, None])
        if HAS_DR:
            dx += tl.load(dr_ptr + offsets, mask=mask, other=0.0)
        if WRITE_DR_IN:
            tl.store(dr_in_ptr + offsets, dx, mask=mask)
        if HAS_KEEP:
            dx *= tl.load(keep_ptr + batch, mask=row_ok, other=0.0)[:, None]
        tl.store(dh_ptr + offsets, dx.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * D + tl.arange(0, BLOCK_D), dw, mask=tl.arange(0, BLOCK_D) < D)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, residual, weight, keep, eps, out_dtype):
        B, L, D = hidden.shape
        hidden = hidden.contiguous()
        rows = B * L
        r_out = torch.empty(B, L, D, device=hidden.device, dtype=torch.float32)
        normed = torch.empty(B, L, D, device=hidden.device, dtype=out_dtype)
        rstd = torch.empty(rows, device=hidden.device, dtype=torch.float32)
        meta = _meta(D)
        _add_norm_fwd_kernel[(triton.cdiv(rows, meta["ROWS"]),)](
            hidden, residual.contiguous() if residual is not None else hidden, keep if keep is not None else rstd,
            weight, normed, r_out, rstd, rows, L, D, eps, HAS_RESIDUAL=residual is not None,
            HAS_KEEP=keep is not None, **meta)
        ctx.save_for_backward(r_out, rstd, weight, keep)
        ctx.hidden_dtype, ctx.has_residual = hidden.dtype, residual is not None
        return normed, r_out

    @staticmethod
    def backward(ctx, d_normed, d_residual):
        r_out, rstd, weight, keep = ctx.saved_tensors
        B, L, D = r_out.shape
        rows = B * L
        meta = _meta(D)
        rows_per_program = triton.cdiv(triton.cdiv(rows, BWD_PROGRAMS), meta["ROWS"]) * meta["ROWS"]
        programs = triton.cdiv(rows, rows_per_program)
        d_hidden = torch.empty(B, L, D, device=r_out.device, dtype=ctx.hidden_dtype)
        d_residual_in = torch.empty_like(r_out) if ctx.has_residual else None
        dw = torch.empty(programs, D, device=r_out.device, dtype=torch.float32)
        d_normed = torch.zeros_like(r_out) if d_normed is None else d_normed.contiguous()
        if d_residual is not None:
            d_residual = d_residual.contiguous()
        _add_norm_bwd_kernel[(programs,)](
            d_normed, d_residual if d_residual is not None else r_out, r_out, rstd, weight,
            keep if keep is not None else rstd, d_hidden, d_residual_in if ctx.has_residual else d_hidden, dw,
            rows, L, D, rows_per_program, HAS_DR=d_residual is not None, HAS_KEEP=keep is not None,
            WRITE_DR_IN=ctx.has_residual, **meta)
        return d_hidden, d_residual_in, dw.sum(0).to(weight.dtype), None, None, None


def add_rms_norm(hidden, residual, weight, eps, keep=None, out_dtype=torch.float32):
    """(normed, residual') of the formula at the top of this file.

    hidden: (B, L, D), any float dtype; residual: (B, L, D) float32, or None (the first block);
    weight: (D,) float32; keep: (B,) float32 per-sample scale of hidden (drop_path), or None.
    normed comes out in out_dtype, residual' in float32; gradients flow to hidden, residual and
    weight.
    """
    return _AddRMSNorm.apply(hidden, residual, weight, keep, eps, out_dtype)
