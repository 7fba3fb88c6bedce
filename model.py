"""DiS: the diffusion state space model of "Scalable Diffusion Models with State Space Backbone".

Figure 1, top to bottom, is the order of this file:
  image (B, C, H, W) -> patch tokens (B, J, D)                          PatchEmbed      (sec. 2.2)
  time t -> one token; class y -> one token; prepended to the patches   timestep_embedding, LabelEmbedder
  + learnable positional embedding over all tokens
  depth//2 "in" blocks, 1 "mid" block, depth//2 "out" blocks            Block, BiMamba  (sec. 2.2)
    each block: add, norm, bidirectional Mamba mixer; each out block first
    merges the mixer output of its mirror in block (long skip, Linear(concat))
  final norm, linear decoder to noise (and variance) per patch, unpatchify  FinalLayer

Shape letters:
  B  batch                     J  patch tokens, (H / p) * (W / p)
  L  tokens a block sees: J plus the time (and class) tokens
  D  hidden size (embed_dim)   E  the mixer's inner width, expand * D
  N  states per channel of the selective scan (d_state)
  R  rank of Delta's low-rank projection (dt_rank, ceil(D / 16))

Names and shapes of every parameter follow the authors' implementation, so its checkpoints
load with strict=True. The ablations of sec. 3.2 are constructor options: `skip` = "concat" |
"add" | "none" and `cond` = "token" | "adaln".

`python model.py` prints Table 1 (parameters and GFLOPs of every size).
"""
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import scan
from recompute import Recomputed


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t: (B,) -> (B, dim), cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> J = HW/p^2 tokens (B, J, D): a p x p convolution with stride p."""

    def __init__(self, patch_size, channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D). Row `num_classes` is the "null" class of classifier-free
    guidance; in training, labels are replaced by it with probability `dropout_prob`."""

    def __init__(self, num_classes, dim, dropout_prob=0.1):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32; (..., D) -> (..., D) in x's dtype."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) * weight, one fused kernel each way on CUDA
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class BiMamba(nn.Module):
    """The bidirectional Mamba mixer (Vision Mamba "v2", sec. 2.2 "SSM block"): (B, L, D) -> (B, L, D).

    One in_proj gives x and the gate z (each E = expand * D wide). Each direction runs its own
    depthwise conv1d -> SiLU -> x_proj (to Delta, B, C) -> selective scan gated by SiLU(z); the
    forward direction reads the tokens in order, the backward one (weights with suffix _b) in
    reverse. The two outputs are added and projected back by one out_proj.

    scan_backend, scan_save_every: how the scans run (scan.resolve_backend's names; save_every of
    scan.bimamba_scan); recompute_scan_inputs: recompute u in the backward pass rather than keep
    it, as Delta always is (recompute.py; less memory, more time). Runtime options, not part of
    the weights.
    """

    def __init__(self, dim, d_state=16, d_conv=4, expand=2, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 dt_init="symmetric", scan_backend="auto", scan_save_every=0, recompute_scan_inputs=False):
        super().__init__()
        inner = expand * dim
        self.d_state, self.dt_rank = d_state, math.ceil(dim / 16)
        self.scan_backend, self.scan_save_every = scan_backend, scan_save_every
        self.recompute_scan_inputs = recompute_scan_inputs
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1)  # S4D-real
        self.A_log = nn.Parameter(A_log)
        self.D = nn.Parameter(torch.ones(inner))
        self.A_b_log = nn.Parameter(A_log.clone())
        self.D_b = nn.Parameter(torch.ones(inner))
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv1d, self.x_proj, self.dt_proj = self._direction(inner, d_conv)
        self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._direction(inner, d_conv)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        # Delta starts log-uniform in [dt_min, dt_max] (Mamba's init). The original code gives this
        # init to the forward direction only and zeroes the backward one's bias (dt_init="original",
        # a quirk kept for comparisons).
        for dt_proj in (self.dt_proj, self.dt_proj_b)[: 1 if dt_init == "original" else 2]:
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        if dt_init == "original":
            nn.init.zeros_(self.dt_proj_b.bias)

    def _direction(self, inner, d_conv):
        conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        x_proj = nn.Linear(inner, self.dt_rank + 2 * self.d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        return conv1d, x_proj, dt_proj

    def backend(self, device):
        return scan.resolve_backend(device, self.scan_backend)

    def triton_kernels(self, device):
        """Whether the scan backend is one of ours (Triton or CUDA); with these the block's add and norm
        also run on our Triton kernels (norm_triton.py), as the conv does (scan.biconv_silu)."""
        return self.backend(device) in scan.OUR_KERNELS

    def projection_weights(self, dtype):
        """x_proj's and dt_proj's weights of both directions as one matrix each, in `dtype`: x_proj
        (2 Rp + 4N, 2E), rows Delta's R ranks of direction 0 (then zeros to Rp), of direction 1, then
        B and C (N each) of direction 0, of direction 1; dt_proj (2E, 2 Rp), the transpose's layout.

        Each is one GEMM with block-diagonal weights: the zero blocks double these small GEMMs'
        FLOPs, but a GEMM batched over the two directions gets slow cuBLAS kernels for its weight
        gradients (a reduction over all B*L tokens). The zero padding gives every operand of these
        GEMMs and of their gradients rows of a multiple of 8 values (16 bytes in 16 bits), without
        which cuBLAS runs them on kernels for unaligned data, several times slower."""
        R, N, E, Rp = self.dt_rank, self.d_state, self.D.shape[0], self.dt_rank_padded()
        w, w_b = self.x_proj.weight, self.x_proj_b.weight
        x_proj = placed((2 * Rp + 4 * N, 2 * E), dtype, [(w, 0, R, 0, 0), (w_b, 0, R, Rp, E),
                                                          (w, R, R + 2 * N, 2 * Rp, 0),
                                                          (w_b, R, R + 2 * N, 2 * Rp + 2 * N, E)])
        dt, dt_b = self.dt_proj.weight, self.dt_proj_b.weight
        dt_proj = placed((2 * E, 2 * Rp), dtype, [(dt, 0, E, 0, 0), (dt_b, 0, E, E, Rp)])
        return x_proj, dt_proj

    def conv_and_x_proj(self, xz, x_proj):
        """xz (B, L, 2E), in_proj's output; x_proj (2 Rp + 4N, 2E) (projection_weights) -> u (B, L, 2, E),
        x_dbl (B, L, 2 Rp + 4N), z (B, L, E): both directions' conv + SiLU of x (xz's first half),
        then x_proj; z is xz's second half."""
        E = self.D.shape[0]
        weight = torch.stack([self.conv1d.weight.view(E, -1), self.conv1d_b.weight.view(E, -1)])  # (2, E, W)
        return scan.mixer_input(xz, weight, torch.stack([self.conv1d.bias, self.conv1d_b.bias]), x_proj,
                                backend=self.backend(xz.device))

    def dt_rank_padded(self):
        """Rp: Delta's rank R rounded up to a multiple of 8 (see projection_weights)."""
        return -(-self.dt_rank // 8) * 8

    def dt_proj_of(self, ranks, dt_proj):
        """Both directions' ranks (B, L, 2 Rp), dt_proj (2E, 2 Rp) -> (Delta (B, L, 2, E),) before
        dt_proj's bias (added in the scan)."""
        return F.linear(ranks, dt_proj).unflatten(-1, (2, self.D.shape[0])),

    def forward(self, h):
        xz = self.in_proj(h)  # (B, L, 2E): x, then the gate z
        x_proj, dt_proj = self.projection_weights(autocast_dtype(xz.device) or xz.dtype)
        # Delta is recomputed from its ranks (part of x_dbl) in the backward pass rather than kept,
        # and u from xz when asked (recompute.py): less memory
        with Recomputed() as saved:
            u, x_dbl, z = saved.compute(self.conv_and_x_proj, xz, x_proj,
                                        drop=(0,) if self.recompute_scan_inputs else ())
            ranks, B, C = x_dbl_parts(x_dbl, self.dt_rank_padded(), self.d_state)
            delta, = saved.compute(self.dt_proj_of, ranks, dt_proj, drop=(0,))
            y = scan.bimamba_scan(u, delta, -torch.exp(torch.stack([self.A_log, self.A_b_log]).float()), B, C,
                                  torch.stack([self.D, self.D_b]).float(), z,
                                  torch.stack([self.dt_proj.bias, self.dt_proj_b.bias]).float(),
                                  delta_softplus=True, backend=self.backend(xz.device),
                                  save_every=self.scan_save_every)  # (B, L, E)
        return self.out_proj(y)


class Block(nn.Module):
    """"Add, norm, mixer": residual += hidden; hidden = mixer(norm(residual)); both (B, L, D).

    The residual stream is kept in float32. An out block first merges the long skip (sec. 2.2,
    "Skip connection"): Linear(concat(hidden, skip)) ("concat"), hidden + skip ("add").
    With cond="adaln" the norm's scale and shift are regressed from the condition c (sec. 3.2).
    """

    def __init__(self, dim, drop_path=0.0, skip="none", adaln=False, dt_init="symmetric", **scan_options):
        super().__init__()
        self.mixer = BiMamba(dim, dt_init=dt_init, **scan_options)
        self.norm = RMSNorm(dim)
        self.skip = skip
        if skip == "concat":
            self.skip_linear = nn.Linear(2 * dim, dim)
        if adaln:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.drop_path = drop_path

    def forward(self, hidden, residual, skip=None, c=None):
        if self.skip == "concat":
            hidden = self.skip_linear(torch.cat([hidden, skip], dim=-1))
        elif self.skip == "add":
            hidden = hidden + skip
        # normed straight in the autocast dtype, which the mixer's in_proj would cast it to
        autocast = autocast_dtype(hidden.device)
        out_dtype = autocast if autocast is not None and c is None else torch.float32
        normed, residual = add_norm(self.norm, hidden, residual, drop_path_scale(hidden, self.drop_path, self.training),
                                    self.mixer.triton_kernels(hidden.device), out_dtype)
        if c is not None:
            normed = modulate(normed, c, self.adaLN_modulation)
        return self.mixer(normed), residual


def add_norm(norm, hidden, residual, keep, fused, out_dtype):
    """The block's "add, norm": residual' = residual + keep * hidden in float32 (hidden alone in
    the first block), normed = norm(residual') in out_dtype; both (B, L, D). keep: drop_path's
    per-sample scale (B,) or None. fused: norm_triton.py's kernel, one each way (the fast
    backends), instead of these PyTorch operations."""
    if fused:
        import norm_triton
        return norm_triton.add_rms_norm(hidden, residual, norm.weight, norm.eps, keep, out_dtype)
    branch = hidden.float() if keep is None else hidden * keep[:, None, None]
    residual = branch if residual is None else residual + branch
    return norm(residual).to(out_dtype), residual


def modulate(x, c, modulation):
    """AdaLN (sec. 3.2): x (B, L, D) * (1 + scale) + shift, with shift and scale (B, 1, D) each
    regressed from the condition c (B, D) by `modulation`."""
    shift, scale = modulation(c).unsqueeze(1).chunk(2, dim=-1)
    return x * (1 + scale) + shift


def drop_path_scale(x, p, training):
    """Stochastic depth: a float32 factor per sample (B,) for the branch x (B, ...): 0 with
    probability p, else 1 / (1 - p); None when off (p = 0, or not training)."""
    if p == 0.0 or not training:
        return None
    return torch.empty(x.shape[0], device=x.device).bernoulli_(1 - p) / (1 - p)


def autocast_dtype(device):
    """The dtype autocast runs matrix products in on `device`'s type, or None where it is off."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


class FinalLayer(nn.Module):
    """LayerNorm (no affine), optional adaLN shift/scale from c, then Linear: (B, L, D) -> (B, L, p*p*C_out)."""

    def __init__(self, dim, patch_size, out_channels, conditioned):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        if conditioned:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c=None):
        x = self.norm_final(x)
        if c is not None:
            x = modulate(x, c, self.adaLN_modulation)
        return self.linear(x)


class DiS(nn.Module):
    """The noise predictor eps_theta(x_t, t, y): (B, C, H, W), (B,), (B,) -> (B, C_out, H, W).

    C_out = 2C with learn_sigma (noise and the variance interpolation of improved DDPM), else C.
    num_classes <= 0 makes it unconditional (then y must be None). depth is even: depth/2 in
    blocks, a mid block and depth/2 out blocks (Table 1's depth + 1 blocks).
    scan_backend ("auto", "ref", "mamba", "triton", "cuda"), scan_save_every and
    recompute_scan_inputs choose how the selective scans run and what their backward pass keeps
    (see BiMamba); they are runtime options, not part of the architecture.
    """

    def __init__(self, img_size=32, patch_size=2, channels=3, embed_dim=368, depth=24, num_classes=-1,
                 learn_sigma=True, drop_path_rate=0.1, class_dropout_prob=0.1, skip="concat", cond="token",
                 dt_init="symmetric", scan_backend="auto", scan_save_every=0, recompute_scan_inputs=False):
        super().__init__()
        _check_config(img_size, patch_size, channels, embed_dim, depth, num_classes, drop_path_rate,
                      class_dropout_prob, skip, cond, dt_init, scan_backend, scan_save_every, recompute_scan_inputs)
        self.img_size, self.patch_size, self.in_channels = img_size, patch_size, channels
        self.out_channels = 2 * channels if learn_sigma else channels
        self.num_classes = max(num_classes, 0)
        self.embed_dim, self.depth, self.cond = embed_dim, depth, cond
        # Extra tokens in front of the patches: [class, time] (sec. 2.2 "Condition incorporation").
        self.extras = 0 if cond == "adaln" else 1 + (self.num_classes > 0)
        num_patches = (img_size // patch_size) ** 2

        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, channels, embed_dim)
        self.time_embed = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                        nn.Linear(4 * embed_dim, embed_dim))
        if self.num_classes:
            self.label_emb = LabelEmbedder(self.num_classes, embed_dim, class_dropout_prob)
        # Stochastic depth rises linearly over the blocks, the first block at 0, as in the original.
        rates = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        block = dict(adaln=cond == "adaln", dt_init=dt_init, scan_backend=scan_backend, scan_save_every=scan_save_every,
                     recompute_scan_inputs=recompute_scan_inputs)
        half = depth // 2
        self.in_blocks = nn.ModuleList(Block(embed_dim, rates[i], **block) for i in range(half))
        self.mid_block = Block(embed_dim, rates[half], **block)
        self.out_blocks = nn.ModuleList(Block(embed_dim, rates[half + 1 + i], skip, **block) for i in range(half))
        self.drop_path_rate = drop_path_rate
        self.norm_f = RMSNorm(embed_dim)
        self.final_layer = FinalLayer(embed_dim, patch_size, self.out_channels, self.num_classes > 0 or cond == "adaln")
        self.initialize_weights()

    def initialize_weights(self):
        """The original's init: zero Linear biases (but Delta's, which BiMamba initialises), N(0, 0.02)
        embeddings, out_proj rescaled by 1/sqrt(depth) (GPT-2), the adaLN ablation's modulations
        zero (identity)."""
        mixers = [m for m in self.modules() if isinstance(m, BiMamba)]
        delta_projections = {proj for m in mixers for proj in (m.dt_proj, m.dt_proj_b)}
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and module not in delta_projections:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, BiMamba):
                nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.out_proj.weight /= math.sqrt(self.depth)
        for block in self.blocks():
            if hasattr(block, "adaLN_modulation"):
                nn.init.zeros_(block.adaLN_modulation[1].weight)

    def blocks(self):
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def embed(self, x, t, y):
        """Tokens (B, extras + J, D) and the condition vector c (B, D) (None when unused)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected images of shape (B, {self.in_channels}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(x.shape)}; the model was built for this image size and channel count")
        if (y is None) != (self.num_classes == 0):
            raise ValueError("class-conditional models need labels y (use num_classes for the null class); "
                             "unconditional models take y=None")
        tokens = self.patch_embed(x)
        t_emb = self.time_embed(timestep_embedding(t, self.embed_dim))
        y_emb = self.label_emb(y) if y is not None else None
        c = t_emb if y_emb is None else t_emb + y_emb
        if self.cond == "token":
            extras = [t_emb] if y_emb is None else [y_emb, t_emb]
            tokens = torch.cat([e[:, None] for e in extras] + [tokens], dim=1)
            c = None if y_emb is None else c
        return tokens + self.pos_embed, c

    def unpatchify(self, x):
        """(B, J, p*p*C_out) -> (B, C_out, H, W)."""
        p, c, h = self.patch_size, self.out_channels, self.img_size // self.patch_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y=None):
        hidden, c = self.embed(x, t, y)
        block_c = c if self.cond == "adaln" else None
        residual, skips = None, []
        for block in self.in_blocks:
            hidden, residual = block(hidden, residual, c=block_c)
            skips.append(hidden)
        hidden, residual = self.mid_block(hidden, residual, c=block_c)
        for block in self.out_blocks:
            hidden, residual = block(hidden, residual, skip=skips.pop(), c=block_c)
        hidden, _ = add_norm(self.norm_f, hidden, residual, drop_path_scale(hidden, self.drop_path_rate, self.training),
                             self.mid_block.mixer.triton_kernels(hidden.device), torch.float32)
        out = self.final_layer(hidden, c)[:, self.extras:]
        return self.unpatchify(out)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=None):
        """Classifier-free guidance (Ho & Salimans 2022) on a batch whose second half holds the
        same images with the null class: eps = eps_uncond + s * (eps_cond - eps_uncond).

        Guidance applies to all C noise channels; cfg_channels=3 reproduces the original code,
        which guided only the first 3 channels, also for 4-channel latents.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        k = self.in_channels if cfg_channels is None else cfg_channels
        eps, rest = out[:, :k], out[:, k:]
        cond_eps, uncond_eps = eps.chunk(2)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


# ---- the mixer's weights and x_dbl's parts as single autograd operations (fewer small kernels) ----

class _Placed(torch.autograd.Function):
    """See placed: one fill and one copy per block forwards, one copy per block backwards, where
    slicing, F.pad, torch.block_diag and torch.cat launch several kernels per block each way and
    zero-fill a gradient for every slice of a weight."""

    @staticmethod
    def forward(ctx, shape, dtype, blocks, *sources):
        out = sources[0].new_zeros(shape, dtype=dtype)
        for s, first, last, row, col in blocks:
            out[row:row + last - first, col:col + sources[s].shape[1]].copy_(sources[s][first:last])
        ctx.blocks, ctx.sources = blocks, [(x.shape, x.dtype) for x in sources]
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = [grad.new_empty(shape, dtype=dtype) for shape, dtype in ctx.sources]
        for s, first, last, row, col in ctx.blocks:
            grads[s][first:last].copy_(grad[row:row + last - first, col:col + grads[s].shape[1]])
        return (None, None, None, *grads)


def placed(shape, dtype, blocks):
    """A matrix of `shape` in `dtype`, zero but for the blocks (x, first, last, row, col): rows
    first:last of the matrix x placed at (row, col). Differentiable in each x; every row of each
    x must be placed once."""
    sources = list({id(x): x for x, *_ in blocks}.values())
    index = {id(x): i for i, x in enumerate(sources)}
    for x in sources:
        rows = sorted((first, last) for y, first, last, _, _ in blocks if y is x)
        starts = [0] + [last for _, last in rows[:-1]]  # each block starts where the one before ends
        if [first for first, _ in rows] != starts or rows[-1][1] != x.shape[0]:
            raise ValueError(f"placed: the blocks must take every row of each matrix once, got rows {rows} "
                             f"of a matrix of {x.shape[0]}")
    return _Placed.apply(shape, dtype, [(index[id(x)], first, last, row, col) for x, first, last, row, col in blocks],
                         *sources)


class _XdblParts(torch.autograd.Function):
    """See x_dbl_parts: the parts are views; their gradients go into one tensor, one copy each,
    where autograd would zero-fill and add a tensor of x_dbl's size per part."""

    @staticmethod
    def forward(ctx, x_dbl, Rp, N):
        BC = x_dbl[..., 2 * Rp:].unflatten(-1, (2, 2 * N))  # (B, L, 2, 2N)
        ctx.shape, ctx.dtype, ctx.Rp, ctx.N = x_dbl.shape, x_dbl.dtype, Rp, N
        return x_dbl[..., :2 * Rp], BC[..., :N], BC[..., N:]

    @staticmethod
    def backward(ctx, d_ranks, dB, dC):
        Rp, N = ctx.Rp, ctx.N
        grad = d_ranks.new_empty(ctx.shape, dtype=ctx.dtype)  # autograd gives zeros for a part not used
        BC = grad[..., 2 * Rp:].unflatten(-1, (2, 2 * N))
        for part, g in ((grad[..., :2 * Rp], d_ranks), (BC[..., :N], dB), (BC[..., N:], dC)):
            part.copy_(g)
        return grad, None, None


def x_dbl_parts(x_dbl, Rp, N):
    """x_dbl (B, L, 2 Rp + 4N) -> Delta's ranks of both directions (B, L, 2 Rp), B and C (B, L, 2, N)."""
    return _XdblParts.apply(x_dbl, Rp, N)


def _check_config(img_size, patch_size, channels, embed_dim, depth, num_classes, drop_path_rate, class_dropout_prob,
                  skip, cond, dt_init, scan_backend, scan_save_every, recompute_scan_inputs):
    """ValueError naming the first constructor argument of DiS that is out of its range."""
    def positive_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1
    for name, value in (("img_size", img_size), ("patch_size", patch_size), ("channels", channels),
                        ("embed_dim", embed_dim)):
        if not positive_int(value):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(scan_save_every, int) or isinstance(scan_save_every, bool) or scan_save_every < 0:
        raise ValueError(f"scan_save_every must be an integer >= 0, got {scan_save_every!r}")
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not divisible by the patch size {patch_size} (patch_size)")
    if not positive_int(depth) or depth % 2:
        raise ValueError(f"depth must be an even integer >= 2 (depth/2 in blocks, a mid block, depth/2 out blocks), "
                         f"got {depth!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise ValueError(f"num_classes must be an integer (0 or less: unconditional), got {num_classes!r}")
    if not 0 <= drop_path_rate < 1:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    if not 0 <= class_dropout_prob <= 1:
        raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob!r}")
    for name, value, choices in (("skip", skip, ("concat", "add", "none")), ("cond", cond, ("token", "adaln")),
                                 ("dt_init", dt_init, ("symmetric", "original")),
                                 ("scan_backend", scan_backend, ("auto", *scan.BACKENDS))):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    if not isinstance(recompute_scan_inputs, bool):
        raise ValueError(f"recompute_scan_inputs must be True or False, got {recompute_scan_inputs!r}")


# Table 1: hidden size D and depth (blocks = depth + 1). S uses D=368 (the table prints 384;
# the original code and the parameter count use 368).
SIZES = {"S": (368, 24), "B": (768, 24), "M": (768, 48), "L": (1024, 48), "H": (1536, 48)}


def _builder(size, patch):
    dim, depth = SIZES[size]
    fixed = {"patch_size": patch, "embed_dim": dim, "depth": depth}

    def build(**kwargs):
        given = sorted(set(kwargs) & set(fixed))
        if given:
            raise ValueError(f"DiS-{size}/{patch} fixes {', '.join(given)}; build DiS(...) to choose them")
        unknown = sorted(set(kwargs) - set(inspect.signature(DiS).parameters))
        if unknown:
            raise ValueError(f"unknown argument {unknown[0]!r} of DiS-{size}/{patch}; accepted: "
                             f"{', '.join(p for p in inspect.signature(DiS).parameters if p not in fixed)}")
        return DiS(**fixed, **kwargs)
    build.__name__ = f"DiS_{size}_{patch}"
    return build


DiS_models = {f"DiS-{s}/{p}": _builder(s, p) for s in SIZES for p in (2, 4, 8)}


def thop_style_gflops(model, batch=1):
    """The paper's GFLOPs column: 2 x multiply-adds of the nn.Linear and nn.Conv2d layers that
    thop can see, i.e. all but those inside the mixers (which the original calls through fused
    functions). See README, "GFLOPs"."""
    macs = []

    def count(module, inputs, output):
        if isinstance(module, nn.Linear):
            macs.append(module.in_features * output.numel())
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs.append(k * output.numel())

    hooks = [m.register_forward_hook(count) for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and ".mixer." not in f".{name}."]
    _run_forward(model, batch)
    for hook in hooks:
        hook.remove()
    return 2 * sum(macs) / 1e9


def scan_flops(batch, channels, length, d_state):
    """Analytic cost of one selective scan direction: per state element Delta*A, exp, (Delta u)*B,
    dA*h + dBu, C*h and its sum (7); per channel step bias, softplus, Delta*u, D*u + y, SiLU(z)
    and the gate (11). Transcendentals count as one flop."""
    return batch * channels * length * (7 * d_state + 11)


def true_gflops(model, batch=1):
    """Forward FLOPs: matmuls and convolutions counted by PyTorch's FlopCounterMode, plus the
    analytic cost of the scans (whose reference implementation uses only elementwise ops)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        _run_forward(model, batch)
    tokens = model.extras + (model.img_size // model.patch_size) ** 2
    mixers = [m for m in model.modules() if isinstance(m, BiMamba)]
    scans = sum(2 * scan_flops(batch, m.D.shape[0], tokens, m.d_state) for m in mixers)
    return (counter.get_total_flops() + scans) / 1e9


def _run_forward(model, batch):
    device = model.pos_embed.device
    x = torch.randn(batch, model.in_channels, model.img_size, model.img_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device) if model.num_classes else None
    with torch.no_grad():
        model.eval()(x, t, y)


def print_table():
    """Table 1 at 32x32, patch 4, unconditional, learned sigma (the paper's setting)."""
    print(f"{'model':8} {'params':>13} {'blocks':>6} {'D':>5} {'GFLOPs (true)':>14} {'GFLOPs (thop, paper)':>21}")
    for size, (dim, depth) in SIZES.items():
        with torch.device("meta"):
            model = DiS_models[f"DiS-{size}/4"](img_size=32)
        params = sum(p.numel() for p in model.parameters())
        print(f"DiS-{size}/4 {params:13,d} {depth + 1:6d} {dim:5d} {true_gflops(model):14.2f} "
              f"{thop_style_gflops(model):21.3f}")


if __name__ == "__main__":
    print_table()
