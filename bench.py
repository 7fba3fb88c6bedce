"""Benchmarks: the selective scan backends against their memory floor, and DiS against DiT.

    python bench.py                       # everything, on the first CUDA device
    python bench.py --only scan           # scan backends only (also: model, fid)
    python bench.py --device cpu --quick  # a smoke run of the script itself
    python bench.py --only model --cases 0 --profile   # + where DiS-S/2's and DiT-S/2's training steps go

bench.md and bench.json (--out) are rewritten after each part, so a run stopped by a time
limit keeps the parts it finished. The summary at the end gives the ratios of DiS to DiT
(training and sampling throughput, peak memory, matmul work per image and the rate a training
step does it at) and of the scan to its memory floor, each from this run.

Every backend is checked against the reference (selective_scan_ref) in the same run before
it is timed. Times are medians over repeated runs measured with CUDA events after warm-up.
The DiT below is the yardstick: adaLN-Zero DiT (Peebles & Xie, 2023) with PyTorch's SDPA.
"""
import argparse
import contextlib
import json
import os
import re
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import scan
from model import BiMamba, DiS_models, RMSNorm, add_norm, timestep_embedding
from storage import write_text
from timing import (kernel_time, leaves_of, measure, random_batch, scan_inputs, step_functions, throughput,
                    token_major)


# ----------------------------------------------------------------------------- timing

def copy_bandwidth(device):
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / measure(lambda: dst.copy_(src), device, repeat=10)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- scan

SCAN_SHAPES = [  # (label, batch, channels E, length L) of one scan direction
    ("DiS-S/2 32x32, batch 128", 128, 736, 257),
    ("DiS-S/2 64x64, batch 64", 64, 736, 1025),
    ("DiS-H/2 256 latent, batch 32", 32, 3072, 258),
    ("E 768, 1026 tokens, batch 32", 32, 768, 1026),
]
QUICK_SCAN_SHAPES = [("tiny", 2, 8, 9)]
# fwd_bwd_ms times each call alone, synchronised after it: that includes the host's time to the
# first launch (Python, allocations). fwd_bwd_back_to_back_ms times SCAN_RUN calls launched one
# after another: the GPU's time.
SCAN_RUN = 10


def single(kw, d=0):
    """One direction's arguments for selective_scan(...)."""
    return dict(u=kw["u"][d], delta=kw["delta"][d], A=kw["A"][d], B=kw["B"][d], C=kw["C"][d], D=kw["D"][d],
                z=kw["z"], delta_bias=kw["delta_bias"][d], delta_softplus=True)


def reversed_in_time(args):
    """The original DiS feeds its backward direction time-reversed tensors (flipped before the conv)."""
    return {k: v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v for k, v in args.items()}


def token_major_single(kw):
    """Direction 0 alone in the token-major layout: what a one-direction Mamba built like DiS's
    mixer would hand the kernels (no transposes), u: (batch, L, 1, E)."""
    first = {k: v[:1] if k in ("u", "delta", "A", "B", "C", "D", "delta_bias") else v for k, v in kw.items()}
    return token_major(first)


def bidirectional_ref(kw):
    """Both directions by the reference, the second on the time-reversed sequence: (batch, E, L)."""
    return (scan.selective_scan_ref(**single(kw, 0))
            + scan.selective_scan_ref(**reversed_in_time(single(kw, 1))).flip(-1))


def scan_backends(device, quick):
    """name -> (directions, prepare: mamba-layout inputs -> call arguments, run: arguments -> output,
    canonical: output -> (batch, E, L)). prepare is differentiable, so gradients reach the inputs.
    "<backend> bidirectional" is what DiS's mixer runs (scan.bimamba_scan, its chunk states
    recomputed in the backward pass); the reference, a loop over time, only in --quick runs."""
    same = lambda y: y  # noqa: E731
    to_mamba_layout = lambda y: y.transpose(1, 2)  # noqa: E731
    available = scan.available_backends(device)
    out = {}
    if "mamba" in available:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        out["mamba"] = (1, single, lambda a: selective_scan_fn(**a), same)
        out["mamba x2 (original DiS)"] = (
            2, lambda kw: [single(kw, 0), reversed_in_time(single(kw, 1))],
            lambda a: selective_scan_fn(**a[0]) + selective_scan_fn(**a[1]).flip(-1), same)
    for name in ("triton", "cuda", "ref"):
        if name not in available or (name == "ref" and not quick):
            continue
        if name != "cuda":  # selective_scan's one direction runs the Triton kernels for "cuda" too
            out[name] = (1, single, lambda a, b=name: scan.selective_scan(**a, backend=b), same)
        out[f"{name} bidirectional"] = (2, token_major, lambda a, b=name: scan.bimamba_scan(**a, backend=b),
                                        to_mamba_layout)
        if name == "cuda":  # the chunk states kept from the forward pass rather than recomputed
            out["cuda bidirectional (save_every 1)"] = (
                2, token_major, lambda a: scan.bimamba_scan(**a, backend="cuda", save_every=1), to_mamba_layout)
        if name != "ref":  # the one direction above without the transposes of selective_scan's layout
            out[f"{name} one direction, token-major"] = (
                1, token_major_single, lambda a, b=name: scan.bimamba_scan(**a, backend=b), to_mamba_layout)
    return out


GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def check_scan(backend, dtype, device, E, L):
    """Relative errors of the forward and of every gradient against the reference, 2 sequences."""
    n_dir, prepare, run, canonical = backend
    kw = scan_inputs(2, E, L, dtype, device, n_dir=2, seed=1)
    ours = {k: v.clone().requires_grad_(True) for k, v in kw.items()}
    ref = {k: v.clone().requires_grad_(True) for k, v in kw.items()}
    y = canonical(run(prepare(ours)))
    y_ref = scan.selective_scan_ref(**single(ref)) if n_dir == 1 else bidirectional_ref(ref)
    g = torch.randn(y_ref.shape, device=device, dtype=torch.float32)
    (y.float() * g).sum().backward()
    (y_ref.float() * g).sum().backward()
    errors = {"y": rel_err(y, y_ref)}
    errors.update({"d" + k: rel_err(ours[k].grad, ref[k].grad) for k in GRAD_NAMES})
    return errors


def time_scan(run, args, device):
    """Seconds of run(args): the forward pass, forward and backward, and forward and backward of
    SCAN_RUN calls launched back to back (per call)."""
    with torch.no_grad():
        t_fwd = measure(lambda: run(args), device)
    y = run(args)
    g = torch.randn_like(y)
    grads_of = [t for a in (args if isinstance(args, list) else [args]) for t in a.values()
                if torch.is_tensor(t) and t.requires_grad]
    del y

    def fwd_bwd():
        for t in grads_of:
            t.grad = None
        run(args).backward(g)
    t_fb = measure(fwd_bwd, device)
    t_run = measure(lambda: [fwd_bwd() for _ in range(SCAN_RUN)], device, warmup=1, repeat=5) / SCAN_RUN
    return t_fwd, t_fb, t_run


def bench_scan(device, quick, dtypes, only_backends=None, shapes=None):
    backends = scan_backends(device, quick)
    if only_backends:
        unknown = set(only_backends) - set(backends)
        if unknown:
            raise SystemExit(f"--backends: {sorted(unknown)} not available here; available: {sorted(backends)}")
        backends = {k: v for k, v in backends.items() if k in only_backends}
    bandwidth = copy_bandwidth(device)
    rows, checks = [], []
    for dtype in dtypes:
        for label, batch, E, L in (QUICK_SCAN_SHAPES if quick else shapes or SCAN_SHAPES):
            size = dtype.itemsize * batch * E * L
            small = 2 * 16 * batch * L * dtype.itemsize
            floor_f = (4 * size + small) / bandwidth  # read u, delta, z; write y
            floor_fb = (11 * size + 3 * small) / bandwidth  # + read u, delta, z, dy; write du, ddelta, dz
            for name, backend in backends.items():
                n_dir, prepare, run, _ = backend
                checks.append({"dtype": str(dtype).replace("torch.", ""), "shape": label, "backend": name,
                               **check_scan(backend, dtype, device, E, L)})
                print(checks[-1], flush=True)
                args = leaves_of(prepare(scan_inputs(batch, E, L, dtype, device, n_dir=2)))
                t_fwd, t_fb, t_run = time_scan(run, args, device)
                rows.append({"dtype": str(dtype).replace("torch.", ""), "shape": f"{label} ({batch}, {E}, {L})",
                             "backend": name, "fwd_ms": 1e3 * t_fwd, "fwd_bwd_ms": 1e3 * t_fb,
                             "fwd_bwd_back_to_back_ms": 1e3 * t_run,
                             "floor_fwd_ms": 1e3 * floor_f * n_dir, "floor_fwd_bwd_ms": 1e3 * floor_fb * n_dir})
                print(rows[-1], flush=True)
                del args
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows, checks, bandwidth


CONV_SHAPES = [SCAN_SHAPES[0], SCAN_SHAPES[2]]  # the mixer's x at the DiS-S/2 and DiS-H/2 shapes


def bench_conv(device, quick, bandwidth, backend, width=4):
    """scan.biconv_silu (both directions' depthwise conv + SiLU, DiS's d_conv = 4) in bf16
    (float32 on CPU) against its memory floor: the forward reads x and writes u (two rows per
    step), the backward reads x and du and writes dx. x is the strided x half of in_proj's output,
    as in the mixer. Times are of SCAN_RUN calls launched back to back: the GPU's time."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for label, batch, E, L in (QUICK_SCAN_SHAPES if quick else CONV_SHAPES):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(batch, L, 2 * E, generator=g, device=device).to(dtype)[..., :E].requires_grad_(True)
        weight = (0.5 * torch.randn(2, E, width, generator=g, device=device)).requires_grad_(True)
        bias = torch.randn(2, E, generator=g, device=device).requires_grad_(True)
        du = torch.randn(batch, L, 2, E, generator=g, device=device).to(dtype)

        def run():
            return scan.biconv_silu(x, weight, bias, backend=backend)

        def back_to_back(fn):
            return measure(lambda: [fn() for _ in range(SCAN_RUN)], device, warmup=1, repeat=5) / SCAN_RUN
        with torch.no_grad():
            t_fwd = back_to_back(run)
        t_fb = back_to_back(lambda: torch.autograd.grad(run(), (x, weight, bias), du))
        size = dtype.itemsize * batch * L * E
        floor_fb = 7 * size / bandwidth
        rows.append({"shape": f"{label} ({batch}, {L}, {E})", "dtype": str(dtype).replace("torch.", ""),
                     "fwd_ms": 1e3 * t_fwd, "fwd_bwd_ms": 1e3 * t_fb, "floor_fwd_ms": 1e3 * 3 * size / bandwidth,
                     "floor_fwd_bwd_ms": 1e3 * floor_fb, "fwd_bwd_over_floor": t_fb / floor_fb})
        print(rows[-1], flush=True)
    return rows


NORM_SHAPES = [("DiS-S/2 32x32, batch 128", 128, 257, 368), ("DiS-H/2 256 latent, batch 32", 32, 258, 1536)]


def bench_norm(device, quick, bandwidth, fused):
    """A block's add-and-norm (model.add_norm: residual + drop_path scale * hidden, then RMSNorm) as
    in training under bf16 autocast (float32 on CPU): on norm_triton.py's kernels (`fused`) and as
    PyTorch operations, against its memory floor: the forward reads hidden and the residual and
    writes residual' and normed, the backward reads both incoming gradients and residual' and
    writes both outgoing ones. Times are the GPU's time in the kernels (kernel_time)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for label, batch, L, D in ([("tiny", 2, 9, 16)] if quick else NORM_SHAPES):
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(batch, L, D, generator=g, device=device).to(dtype).requires_grad_(True)
        residual = torch.randn(batch, L, D, generator=g, device=device).requires_grad_(True)
        norm = RMSNorm(D).to(device)
        keep = torch.full((batch,), 1 / 0.9, device=device)
        d_normed = torch.randn(batch, L, D, generator=g, device=device).to(dtype)
        d_residual = torch.randn(batch, L, D, generator=g, device=device)
        big = dtype.itemsize * batch * L * D  # bytes of a 16-bit (B, L, D) tensor; float32 is twice that
        floor_fwd, floor_fb = (3 * big + 3 * big) / bandwidth, (6 * big + 8 * big) / bandwidth
        for name, use_fused in [("PyTorch", False)] + [("Triton", True)] * fused:
            def run():
                return add_norm(norm, hidden, residual, keep, use_fused, dtype)
            with torch.no_grad():
                t_fwd = kernel_time(run, device)
            t_fb = kernel_time(lambda: torch.autograd.grad(run(), (hidden, residual, norm.weight),
                                                           (d_normed, d_residual)), device)
            rows.append({"shape": f"{label} ({batch}, {L}, {D})", "kernels": name, "fwd_ms": 1e3 * t_fwd,
                         "fwd_bwd_ms": 1e3 * t_fb, "floor_fwd_ms": 1e3 * floor_fwd, "floor_fwd_bwd_ms": 1e3 * floor_fb,
                         "fwd_bwd_over_floor": t_fb / floor_fb})
            print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- DiT yardstick

class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: attention and MLP, each modulated by c and gated."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + gate1 * self.proj(h)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(nn.Module):
    """Class-conditional DiT with learned sigma: (B, C, H, W), (B,), (B,) -> (B, 2C, H, W)."""

    def __init__(self, img_size, patch_size, channels, dim, depth, heads, num_classes):
        super().__init__()
        self.p, self.c = patch_size, channels
        self.patch = nn.Conv2d(channels, dim, patch_size, patch_size)
        self.pos = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, dim), requires_grad=False)
        self.t_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_emb = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, patch_size * patch_size * 2 * channels)

    def forward(self, x, t, y):
        n, _, hh, ww = x.shape
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        c = self.t_mlp(timestep_embedding(t, 256)) + self.y_emb(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_mod(c)[:, None].chunk(2, dim=-1)
        h = self.out(self.norm(h) * (1 + scale) + shift)
        p, gh = self.p, hh // self.p
        h = h.reshape(n, gh, gh, p, p, 2 * self.c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(n, 2 * self.c, hh, ww)


DIT_SIZES = {"DiT-S/2": (384, 12, 6), "DiT-XL/2": (1152, 28, 16), "DiT-tiny": (32, 2, 2)}


# ----------------------------------------------------------------------------- whole models

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's; reduce-overhead: CUDA graphs
MODEL_CASES = [  # (DiS name, DiT name, image size, channels, classes, batch)
    ("DiS-S/2", "DiT-S/2", 32, 3, 10, 128),
    ("DiS-S/2", "DiT-S/2", 64, 3, 10, 64),
    ("DiS-H/2", "DiT-XL/2", 32, 4, 1000, 32),
]
QUICK_MODEL_CASES = [("DiS-tiny", "DiT-tiny", 8, 3, 10, 4)]
# train.py's options that trade time and memory, timed on the default scan backend: (label, mixer
# settings). --scan-save-every 1 is what train.py's default (auto) runs where the GPU has room.
MEMORY_OPTIONS = [("--scan-save-every 1", dict(scan_save_every=1)),
                  ("--recompute-scan-inputs", dict(recompute_scan_inputs=True))]


def build(name, img, ch, classes, device):
    if name == "DiS-tiny":
        from model import DiS
        return DiS(img_size=img, patch_size=2, channels=ch, embed_dim=32, depth=2, num_classes=classes).to(device)
    if name.startswith("DiT"):
        dim, depth, heads = DIT_SIZES[name]
        return DiT(img, 2, ch, dim, depth, heads, classes).to(device)
    return DiS_models[name](img_size=img, channels=ch, num_classes=classes).to(device)


def use_scan(model, backend, recompute_scan_inputs=False, scan_save_every=0):
    """Run `model`'s selective scans on `backend`, with the memory options (runtime options of each mixer)."""
    for module in model.modules():
        if isinstance(module, BiMamba):
            module.scan_backend, module.scan_save_every = backend, scan_save_every
            module.recompute_scan_inputs = recompute_scan_inputs


def model_parity(model, img, ch, classes, backend, device, batch=2, mixer_forward=None):
    """Relative error of the output and of all parameter gradients (as one vector) of one
    bf16-autocast forward+backward with `backend` (and BiMamba.forward replaced by
    `mixer_forward` if given) against the reference scan path."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, ch, img, img, generator=g, device=device)
    t = torch.randint(0, 1000, (batch,), generator=g, device=device)
    y = torch.randint(0, classes, (batch,), generator=g, device=device)
    results = []
    for name in ("ref", backend):
        use_scan(model, name)
        model.zero_grad(set_to_none=True)
        with mixer_replaced(mixer_forward if name != "ref" else None), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.eval()(x, t, y)
        out.float().pow(2).mean().backward()
        results.append((out.float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])))
    model.zero_grad(set_to_none=True)
    (o_ref, g_ref), (o, g) = results
    return rel_err(o, o_ref), rel_err(g, g_ref)


def mixer_replaced(mixer_forward):
    """Context in which BiMamba.forward is `mixer_forward` (unchanged if None)."""
    return mock.patch.object(BiMamba, "forward", mixer_forward) if mixer_forward else contextlib.nullcontext()


def original_mixer_forward(mixer, h):
    """model.BiMamba's function computed as the authors' code runs it (the "original
    structure"): mamba-ssm's fused mamba_inner_fn (conv1d, x_proj, dt_proj, scan, gate,
    out_proj) once per direction, the second on the time-reversed sequence. (B, L, D) -> (B, L, D);
    out_proj(y) + out_proj(y_b) is out_proj(y + y_b), so the function is BiMamba's own."""
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    xz = mixer.in_proj(h).transpose(1, 2)  # (B, 2E, L)

    def direction(xz, conv1d, x_proj, dt_proj, A_log, D):
        return mamba_inner_fn(xz, conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight, mixer.out_proj.weight,
                              None, -torch.exp(A_log.float()), D=D.float(), delta_bias=dt_proj.bias.float(),
                              delta_softplus=True)
    return (direction(xz, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
            + direction(xz.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log,
                        mixer.D_b).flip(1))


def throughput_row(name, label, model, img, ch, classes, batch, device):
    """One table row: parameters (M), train and forward img/s, peak GB, and the GPU's time in the
    kernels of a training step (ms; kernel_time), the figure that moves least between runs. A
    compiled model's steps are not captured in a graph of ours (torch.compile has its own)."""
    train, train_run, gpu_ms, graphed, fwd, fwd_gpu_ms, peak = throughput(model, img, ch, classes, batch, device,
                                                                          graph=not hasattr(model, "_orig_mod"))
    return {"model": name, "input": label, "params_M": params(model), "train_img_s": train,
            "train_back_to_back_img_s": train_run, "train_gpu_ms": gpu_ms, "train_graphed_img_s": graphed,
            "fwd_img_s": fwd, "fwd_gpu_ms": fwd_gpu_ms, "peak_GB": peak}


def matmul_gflops(model, img, ch, classes, device):
    """GFLOPs of one image's forward pass in matrix products, convolutions and attention, as
    PyTorch's FlopCounterMode counts them (2 per multiply-add). The scan is not among them: it is
    elementwise work, about 7% of a DiS model's true count (model.true_gflops)."""
    from torch.utils.flop_counter import FlopCounterMode
    x, t, y = random_batch(img, ch, classes, 1, device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    return counter.get_total_flops() / 1e9


def profile_events(model, img, ch, classes, batch, device, steps=3):
    """(name, calls per step, ms per step) of the kernels (CUDA) or operators (CPU) of a training
    step of `model`, by self time over `steps` profiled steps after warm-up, largest first."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    train_step, _ = step_functions(model, img, ch, classes, batch, device)
    model.train()
    train_step()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step()
        if cuda:
            torch.cuda.synchronize(device)
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    return [(e.key, e.count / steps, self_us(e) / steps / 1e3) for e in events]


def top_kernels(events, top=25):
    """The `top` kernels of profile_events, as table rows with their share of the step."""
    total = sum(ms for *_, ms in events) or 1.0
    return [{"kernel": name[:90], "calls_per_step": calls, "ms_per_step": ms, "share": ms / total}
            for name, calls, ms in events[:top]]


# What a kernel (or, on CPU, an operator) computes, by its name: the first pattern that matches.
KERNEL_KINDS = [("GEMM", r"nvjet|gemm|cutlass|xmma|^aten::(mm|addmm|bmm|matmul)$"),
                ("scan", r"dis::|scan|selective"),
                ("convolution", r"conv"),
                ("norm", r"norm"),
                ("attention", r"flash|fmha|attention"),
                ("optimizer", r"FusedOptim|adam"),
                ("other", r"")]


def kernel_kind(name):
    return next(kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.IGNORECASE))


def step_kinds(events):
    """profile_events summed by kernel_kind: table rows in KERNEL_KINDS's order."""
    total = sum(ms for *_, ms in events) or 1.0
    sums = {kind: [0.0, 0.0] for kind, _ in KERNEL_KINDS}
    for name, calls, ms in events:
        kind = sums[kernel_kind(name)]
        kind[0] += calls
        kind[1] += ms
    return [{"kind": kind, "kernels_per_step": calls, "ms_per_step": ms, "share": ms / total}
            for kind, (calls, ms) in sums.items()]


def bench_models(device, cases, compile_too=False, profile_too=False, compile_mode="default", rounds=1):
    """Rows of throughput and peak memory, parity checks, profile rows (the DiS step's top kernels;
    DiS's and DiT's GPU time by kind of kernel), and per case the DiS row on the default ("auto")
    scan backend with its DiT row: (rows, checks, profiles, kinds, pairs).
    rounds > 1 times a case's models that many times in turn and gives the mean of each figure:
    on a GPU, the order of the runs moves single figures by several percent."""
    rows, checks, profiles, kinds, pairs = [], [], [], [], []
    available = scan.available_backends(device)
    backends = [b for b in ("mamba", "triton", "cuda") if b in available] or ["ref"]
    default = scan.resolve_backend(device)
    for dis_name, dit_name, img, ch, classes, batch in cases:
        label = f"{img}x{img}x{ch}, batch {batch}"
        torch.manual_seed(0)
        dis = build(dis_name, img, ch, classes, device)
        # (check label, row label, scan backend, replacement of BiMamba.forward)
        variants = [(backend, f"{backend} scan", backend, None) for backend in backends]
        if "mamba" in backends:  # the authors' structure, the yardstick of our own, in the same run
            variants.append(("original structure", "original structure: mamba_inner_fn x2", "mamba",
                             original_mixer_forward))
        # every check before any timing: the timed training steps change the weights, and each
        # backend's errors should be those of the same model
        for check_label, _, backend, mixer_forward in variants:
            out_err, grad_err = model_parity(dis, img, ch, classes, backend, device, mixer_forward=mixer_forward)
            checks.append({"model": dis_name, "input": label, "backend": check_label,
                           "output_rel_err": out_err, "grads_rel_err": grad_err})
        # what is timed: (row name, model, the DiS mixers' scan options or None for DiT, mixer forward)
        timed = [(f"{dis_name} ({row_label})", dis, dict(backend=backend), mixer_forward)
                 for _, row_label, backend, mixer_forward in variants]
        timed += [(f"{dis_name} ({default} scan, {label_options})", dis, dict(backend=default, **options), None)
                  for label_options, options in MEMORY_OPTIONS]
        if compile_too:  # the glue around the scan (norms, residual adds, projections) by torch.compile
            name = "torch.compile" + ("" if compile_mode == "default" else f" {compile_mode}")
            timed.append((f"{dis_name} ({default} scan, {name})", torch.compile(dis, mode=compile_mode),
                          dict(backend=default), None))
        dit = build(dit_name, img, ch, classes, device).cpu()
        timed.append((dit_name, dit, None, None))
        runs = {name: [] for name, *_ in timed}
        for _ in range(rounds):
            for name, model, options, mixer_forward in timed:
                # the other model waits in host memory: each peak is of one model alone
                (dis if options is None else dit).cpu()
                (dit if options is None else dis).to(device)
                if options is not None:
                    use_scan(dis, **options)
                with mixer_replaced(mixer_forward):
                    runs[name].append(throughput_row(name, label, model, img, ch, classes, batch, device))
        case_rows = {name: mean_row(r) for name, r in runs.items()}
        dis.to(device)
        use_scan(dis, default)
        # each model's work, the same whichever scan or options run it: GFLOPs per image, and the
        # TFLOP/s of a training step's GPU time (a step counted as 3 forward passes)
        work = {dit_name: matmul_gflops(dit, img, ch, classes, device),
                dis_name: matmul_gflops(dis, img, ch, classes, device)}
        for name, row in case_rows.items():
            row["fwd_gflops"] = work[dit_name if name == dit_name else dis_name]
            row["train_tflops"] = 3 * row["fwd_gflops"] * batch / row["train_gpu_ms"]
        rows += case_rows.values()
        if profile_too:
            events = profile_events(dis, img, ch, classes, batch, device)
            dis_label = f"{dis_name} ({default} scan), {label}"
            profiles += [{"model": dis_label, **r} for r in top_kernels(events)]
            kinds += [{"model": dis_label, **r} for r in step_kinds(events)]
            dis.cpu()
            kinds += [{"model": f"{dit_name}, {label}", **r}
                      for r in step_kinds(profile_events(dit.to(device), img, ch, classes, batch, device))]
        dis_row = case_rows[f"{dis_name} ({default} scan)"]
        option_rows = [case_rows[f"{dis_name} ({default} scan, {o})"] for o, _ in MEMORY_OPTIONS]
        pairs += [(r, case_rows[dit_name]) for r in (dis_row, *option_rows)]
        del dis, dit, timed, runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, checks, profiles, kinds, pairs


def mean_row(runs):
    """One row from the rows of repeated runs of a model: each number their mean."""
    return {k: sum(r[k] for r in runs) / len(runs) if isinstance(v, float) else v for k, v in runs[0].items()}


def model_summary(pairs):
    """DiS / DiT ratios of training img/s (eager and CUDA-graphed steps; also as DiT's GPU time per
    step over DiS's), sampling-forward img/s (op by op; also as DiT's GPU time per forward over
    DiS's) and peak memory, per input; and of the matmul GFLOPs per image and the matmul TFLOP/s a
    training step achieves: img/s ratios compare models of unequal work, these say how much of
    a gap that work accounts for."""
    return [{"models": f"{dis['model']} / {dit['model']}", "input": dis["input"],
             "fwd_gflops_ratio": dis["fwd_gflops"] / dit["fwd_gflops"],
             "train_tflops_ratio": dis["train_tflops"] / dit["train_tflops"],
             "train_img_s_ratio": dis["train_img_s"] / dit["train_img_s"],
             "train_graphed_img_s_ratio": dis["train_graphed_img_s"] / dit["train_graphed_img_s"],
             "train_gpu_time_ratio": dit["train_gpu_ms"] / dis["train_gpu_ms"],
             "sampling_fwd_img_s_ratio": dis["fwd_img_s"] / dit["fwd_img_s"],
             "sampling_fwd_gpu_time_ratio": dit["fwd_gpu_ms"] / dis["fwd_gpu_ms"],
             "peak_memory_ratio": dis["peak_GB"] / dit["peak_GB"]} for dis, dit in pairs]


def scan_summary(rows, backend):
    """fwd+bwd time of both directions on `backend` over the memory floor, per dtype and shape."""
    return [{"backend": r["backend"], "dtype": r["dtype"], "shape": r["shape"],
             "fwd_bwd_over_floor": r["fwd_bwd_ms"] / r["floor_fwd_bwd_ms"],
             "back_to_back_over_floor": r["fwd_bwd_back_to_back_ms"] / r["floor_fwd_bwd_ms"]}
            for r in rows if r["backend"] == f"{backend} bidirectional"]


def params(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


# ----------------------------------------------------------------------------- FID network

def pytorch_fid_network(state_dict, device):
    """pytorch-fid's InceptionV3 (pool features) with the given weights instead of a download."""
    import pytorch_fid.inception as pf
    with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: state_dict):
        return pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()


def bench_fid(device, quick):
    """Feature-extraction images/s of fid.py's network (all five metrics' features in one pass)
    and of pytorch-fid's (pool features only), same random weights, same uint8 images."""
    import fid
    torch.manual_seed(0)
    ours = fid.FIDInceptionV3().to(device).eval()
    theirs = pytorch_fid_network(ours.state_dict(), device)
    count, batch = (8, 4) if quick else (10_000, 500)
    rows = []
    for size in (32, 256):
        images = torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, device=device)

        def run_ours():
            for i in range(0, count, batch):
                ours(images[i:i + batch])

        def run_theirs():
            for i in range(0, count, batch):
                theirs(images[i:i + batch].permute(0, 3, 1, 2).float() / 255)
        with torch.no_grad():
            for name, fn in (("fid.py (adm mode; pool, spatial, logits)", run_ours),
                             ("pytorch-fid InceptionV3 (pool)", run_theirs)):
                rows.append({"network": name, "images": f"{count} x {size}x{size}",
                             "img_s": count / measure(fn, device, warmup=1, repeat=2)})
    return rows


# ----------------------------------------------------------------------------- report

def table(rows):
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def index_list(text, items, flag, parser):
    """The items at the comma-separated indices `text` (None: all), or parser.error naming `flag`."""
    if text is None:
        return items
    try:
        return [items[int(i)] for i in text.split(",")]
    except (ValueError, IndexError):
        parser.error(f"{flag} takes a comma list of indices 0..{len(items) - 1}, got {text!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to run")
    what.add_argument("--only", default="scan,model,fid", help="comma list of: scan, model, fid")
    what.add_argument("--quick", action="store_true", help="tiny shapes: checks that the script runs")
    what.add_argument("--dtypes", default="bf16,fp32", help="scan dtypes, comma list of bf16, fp32")
    what.add_argument("--shapes", default=None, help="scan shapes to run, comma list of indices into SCAN_SHAPES")
    what.add_argument("--backends", default=None,
                      help="scan rows to time, comma list of their names (e.g. 'triton bidirectional,mamba'); "
                           "default: all available")
    what.add_argument("--cases", default=None, help="model cases to run, comma list of indices into MODEL_CASES")
    extra = parser.add_argument_group("extra measurements")
    extra.add_argument("--compile", action="store_true", help="also time each DiS under torch.compile")
    extra.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                       help="torch.compile's mode for --compile (reduce-overhead: CUDA graphs)")
    extra.add_argument("--rounds", type=int, default=1,
                       help="time each case's models this many times in turn; the tables give the means")
    extra.add_argument("--profile", action="store_true",
                       help="also list the kernels a DiS training step spends its time in, and DiS's and "
                            "DiT's steps by kind of kernel (torch.profiler)")
    where = parser.add_argument_group("device and output")
    where.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    where.add_argument("--out", default=None, help="also write the tables (markdown) and raw numbers (JSON) here")
    args = parser.parse_args(argv)
    parts = args.only.split(",")
    if not set(parts) <= {"scan", "model", "fid"}:
        parser.error(f"--only takes a comma list of scan, model, fid; got {args.only!r}")
    names = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if not set(args.dtypes.split(",")) <= set(names):
        parser.error(f"--dtypes takes a comma list of bf16, fp32; got {args.dtypes!r}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    shapes = index_list(args.shapes, SCAN_SHAPES, "--shapes", parser)
    cases = index_list(args.cases, QUICK_MODEL_CASES if args.quick else MODEL_CASES, "--cases", parser)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        header = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    else:
        header = f"CPU, torch {torch.__version__}"
    default = scan.resolve_backend(device)
    report = [f"Device: {header}; scan backends: {scan.available_backends(device)}, default {default}"]
    raw = {"device": header, "default_scan_backend": default}
    summary = []
    if "scan" in parts:
        dtypes = [torch.float32] if args.quick else [names[d] for d in args.dtypes.split(",")]
        backends = args.backends.split(",") if args.backends else None
        rows, checks, bandwidth = bench_scan(device, args.quick, dtypes, backends, shapes)
        raw.update(scan=rows, scan_checks=checks, copy_bandwidth=bandwidth)
        report += [f"\n## Selective scan (copy bandwidth {bandwidth / 1e12:.2f} TB/s read+write)\n",
                   "fwd_bwd_ms times each call alone, synchronised after it; fwd_bwd_back_to_back_ms times "
                   f"{SCAN_RUN} calls launched one after another.\n", table(rows),
                   "\nRelative error against the reference (forward y and each gradient), 2 sequences:\n",
                   table(checks)]
        raw["scan_summary"] = scan_summary(rows, default)
        summary += ["\nBoth directions' scan, forward+backward, over its memory floor:\n", table(raw["scan_summary"])]
        raw["conv"] = bench_conv(device, args.quick, bandwidth, default)
        report += [f"\n## Both directions' depthwise conv + SiLU ({default} backend), {SCAN_RUN} calls back to back\n",
                   table(raw["conv"])]
        raw["norm"] = bench_norm(device, args.quick, bandwidth, default in scan.OUR_KERNELS)
        report += ["\n## A block's add and RMSNorm, the GPU's time in its kernels per call\n", table(raw["norm"])]
        write_report(args.out, report, raw)
    if "model" in parts:
        rows, checks, profiles, kinds, pairs = bench_models(device, cases, args.compile, args.profile,
                                                            args.compile_mode, args.rounds)
        raw.update(model=rows, model_checks=checks, model_profile=profiles, model_profile_kinds=kinds)
        report += ["\n## Training step (bf16 autocast, fused AdamW) and forward throughput\n",
                   "train_img_s times each step alone, synchronised after it (as train.py runs); "
                   "train_back_to_back_img_s times steps launched one after another; train_graphed_img_s "
                   "times each step alone with its forward and backward passes replayed as a CUDA graph "
                   "(train.py's default on one GPU).\n", table(rows),
                   "\nDiS forward+backward (bf16 autocast, batch 2) against the reference scan path:\n", table(checks)]
        if profiles:
            report += ["\n## Where a DiS training step goes (self time per step, top kernels)\n", table(profiles),
                       "\n## DiS and DiT training steps by kind of kernel (self time per step)\n", table(kinds)]
        raw["model_summary"] = model_summary(pairs)
        summary += [f"\nDiS ({default} scan; the model's defaults, and with train.py's options) against DiT: "
                    "matmul GFLOPs per image and the matmul TFLOP/s of a training step's GPU time, training "
                    "img/s (eager, with CUDA graphs, and GPU time per step), sampling forward img/s (op by op, "
                    "and GPU time per forward), peak memory:\n",
                    table(raw["model_summary"])]
        write_report(args.out, report, raw)
    if "fid" in parts:
        rows = bench_fid(device, args.quick)
        raw["fid"] = rows
        report += ["\n## FID feature extraction (random weights, batch 500)\n", table(rows)]
        write_report(args.out, report, raw)
    if summary:
        report += ["\n## Summary (ratios from this run)", *summary]
        write_report(args.out, report, raw)
    print("\n".join(report))


def write_report(out, report, raw):
    """(Re)write bench.md and bench.json under `out` with what has run so far, so that a run
    stopped by a time limit keeps its finished parts."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "bench.md"), "\n".join(report) + "\n")
    write_text(os.path.join(out, "bench.json"), json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
