"""Timing on the GPU and the workloads timed: what bench.py and tools/triton_versions.py measure.

measure() is the median of repeated runs after warm-up (CUDA events on a GPU). The scan
workloads are random inputs shaped like DiS's scans, in mamba-ssm's layout (one tensor per
direction, u: (directions, batch, E, L)) and in the token-major layout of DiS's mixer
(u: (batch, L, directions, E)); throughput() times a whole training step of a model.
"""
import math
import statistics
import time

import torch

from graphs import GraphedPasses


def measure(fn, device, warmup=3, repeat=20):
    """Median seconds of fn() after warm-up (CUDA events on GPU, the wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def scan_inputs(batch, E, L, dtype, device, n_dir=1, N=16, seed=0):
    """Random inputs shaped like DiS's scans, in mamba layout (u: (batch, E, L)) per direction."""
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
    dt = torch.exp(torch.rand(n_dir, E, generator=g, device=device) * math.log(100) + math.log(1e-3))
    return dict(u=r(n_dir, batch, E, L), delta=r(n_dir, batch, E, L, scale=0.1),
                A=-torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(n_dir, E, 1),
                B=r(n_dir, batch, N, L), C=r(n_dir, batch, N, L), D=torch.ones(n_dir, E, device=device),
                z=r(batch, E, L), delta_bias=dt + torch.log(-torch.expm1(-dt)))


def token_major(kw):
    """Both directions in the layout DiS's mixer hands to scan.bimamba_scan:
    u, delta: (batch, L, 2, E); B, C: (batch, L, 2, N); z: a (batch, L, E) slice of in_proj's output."""
    batch, E, L = kw["z"].shape
    xz = torch.cat([kw["z"], kw["z"]], dim=1).transpose(1, 2).contiguous()
    return dict(u=kw["u"].permute(1, 3, 0, 2).contiguous(), delta=kw["delta"].permute(1, 3, 0, 2).contiguous(),
                A=kw["A"], B=kw["B"].permute(1, 3, 0, 2).contiguous(), C=kw["C"].permute(1, 3, 0, 2).contiguous(),
                D=kw["D"], z=xz[..., E:], delta_bias=kw["delta_bias"], delta_softplus=True)


def leaves_of(args):
    """Detached copies of the call arguments' activations (not the parameters A, D, bias) that
    require grad, as in training."""
    if isinstance(args, list):
        return [leaves_of(a) for a in args]
    return {k: v.detach().requires_grad_(k in ("u", "delta", "B", "C", "z")) if torch.is_tensor(v) else v
            for k, v in args.items()}


def random_batch(img, ch, classes, batch, device):
    """(x, t, y): random images (batch, ch, img, img), timesteps and class labels (batch,)."""
    x = torch.randn(batch, ch, img, img, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    return x, t, y


def step_functions(model, img, ch, classes, batch, device):
    """(train_step, forward) closures over one random batch: a training step (bf16 autocast on
    CUDA, fused AdamW) and a no-grad forward. The caller sets train or eval mode."""
    x, t, y = random_batch(img, ch, classes, batch, device)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def train_step():
        with autocast:
            loss = model(x, t, y).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad(), autocast:
            model(x, t, y)
    return train_step, forward


def graphed_train_step(model, img, ch, classes, batch, device):
    """A training step as train.py runs it on one GPU: the forward and backward passes replayed
    as a CUDA graph (graphs.py), then fused AdamW, on one random batch (bf16 autocast)."""
    x, t, y = random_batch(img, ch, classes, batch, device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=True)

    def passes(x, t, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = model(x, t, y).float().pow(2).mean()
        loss.backward()
        return loss.detach()
    graphed = GraphedPasses(passes, params, (x, t, y))

    def train_step():
        graphed(x, t, y)
        opt.step()
    return train_step


def throughput(model, img, ch, classes, batch, device, run=5, graph=True):
    """(train img/s, train img/s back to back, GPU ms per training step, train img/s with CUDA
    graphs, forward img/s, GPU ms per forward, peak GB) with bf16 autocast on CUDA, fused AdamW.
    The first times each step alone (synchronised after it, as train.py's steps are); the second
    times `run` steps launched back to back, the host running ahead of the GPU; the third is the
    time in the step's kernels (kernel_time); the fourth times each step alone with its passes
    replayed as a CUDA graph (graphed_train_step; nan without CUDA or `graph`). The forward is
    one no-grad call (a sampling step), timed alone and, as the time in its kernels, the figure
    that sampling from CUDA graphs (sample.py) approaches. The peak is of the eager steps."""
    train_step, forward = step_functions(model, img, ch, classes, batch, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    t_train = measure(train_step, device, warmup=3, repeat=10)
    t_run = measure(lambda: [train_step() for _ in range(run)], device, warmup=1, repeat=3) / run
    t_kernels = kernel_time(train_step, device, calls=3)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else float("nan")
    t_graphed = float("nan")
    if cuda and graph:
        t_graphed = measure(graphed_train_step(model, img, ch, classes, batch, device), device, warmup=3, repeat=10)
        for p in model.parameters():  # the graph's gradient buffers, and with them the graph's memory
            p.grad = None
        torch.cuda.empty_cache()
    model.eval()
    t_fwd = measure(forward, device, warmup=2, repeat=10)
    t_fwd_kernels = kernel_time(forward, device, calls=3)
    return batch / t_train, batch / t_run, 1e3 * t_kernels, batch / t_graphed, batch / t_fwd, 1e3 * t_fwd_kernels, peak


def kernel_time(fn, device, calls=10):
    """Seconds per call of fn that the device spends in kernels (the profiler's self time, on a
    GPU; wall time on a CPU): small operations launched from Python leave the GPU idle between
    kernels, which a wall-clock time of back-to-back calls would count."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    if device.type != "cuda":
        return measure(lambda: [fn() for _ in range(calls)], device, warmup=1, repeat=3) / calls
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 / calls
