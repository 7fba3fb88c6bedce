"""Train DiS, in one process or under torchrun with DDP (NCCL on GPUs, gloo on CPU).

    python train.py                 # with CUDA the paper's DiS-S/2 on Fashion-MNIST, else a small DiS in minutes
    python train.py --resume auto   # continue the newest run in --results-dir
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data-path DIR --model DiS-H/2 --image-size 256
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id RUN train.py ...

A step: this rank's share of the global batch (data.py) -> timesteps and noise -> in
--grad-accum-steps micro-batches: the loss of diffusion.training_losses (L_simple + L_vlb) ->
backward, gradients summed (DDP all-reduces after the last) -> gradient norm clipped -> AdamW
with warm-up and cosine decay -> EMA. On one GPU the forward and backward passes are captured
once as a CUDA graph and replayed (graphs.py; --no-cuda-graphs: launched op by op), with the
same results bit for bit. --preset paper (the default with CUDA) is the paper's
section 3.1: DiS-S/2, AdamW with lr 1e-4 and no weight decay, EMA 0.9999, batch 128, gradient
norm clipped to 1, T = 1000 linear betas, learned sigma, horizontal flips only. --preset small
(the default without CUDA) is SMALL_PRESET, to see the whole pipeline on a CPU. Flags given win
over either. A run that clearly needs more memory than is available is refused before it starts.

Randomness and resuming. The model is initialised from --global-seed; the data order depends
on (seed, epoch) only (data.py); timesteps and noise of the global batch on (seed, step); drop
path and label dropout draw from each rank's generator, seeded global_seed * world_size + rank
as in DiT and saved in checkpoints. So a step does not depend on the number of processes (ranks
are global: several machines under torchrun are one world) or of micro-batches, and a resumed
run draws exactly what the uninterrupted one would.

The run's folder, results/NNN-DiS-S-2 (runs.py): checkpoints/SSSSSSS.pt (plain dicts, written
atomically; their keys in runs.py), log.txt, run.json, samples/SSSSSSS.png (EMA model, DDIM 25
steps, guidance --sample-cfg, a class per row; every --sample-every steps and at the end),
tensorboard/ (the dashboard, monitor.py) and, with --fid-ref, fid/ (the FID of EMA samples after
training and every --fid-every steps). --resume restores the whole state; only operational flags
(runs.RESUME_FROM_COMMAND_LINE) may change. A step whose loss or gradient is not finite on any
rank is skipped on all; more than --max-nonfinite in a row stop the run with a checkpoint.

Stopping. The first Ctrl-C (SIGINT) or SIGTERM is acknowledged at once and the run stops after
the step with a checkpoint; a second one stops at once (the previous checkpoint stays complete).
Exit status: 0 done (or --max-minutes reached); 1 the run failed (non-finite losses, out of
memory, a failed write); 2 a flag, or the data, checkpoint or folder it names, cannot be used
(one line, before training); 130 / 143 stopped by SIGINT / SIGTERM (continue with --resume).
"""
import argparse
import contextlib
import functools
import logging
import math
import os
import signal
import sys
import time
from copy import deepcopy

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

import model as dis
from cli import OneLineParser, at_least, check_exist, check_ranges, input_errors, nearest_existing
from data import DATASETS, batch_plan, data_stream, encode, prepare_data
from diffusion import create_diffusion
from distributed import StopSignals, agree, derived_seed, process_group
from graphs import GraphedPasses
from memory import check_memory, keep_scan_states, out_of_memory
from monitor import Dashboard, Meter, QualityProbe, log_progress, log_to_file, setup_logging, tensorboard_installed
from runs import Run, SampleGrid, open_run_dir, record_launch, restore_rng, resume_or_new, writing
from scan import BACKENDS, OUR_KERNELS, resolve_backend
from scan_cuda import default_states_dtype
from storage import model_config

DEFAULT_STEPS = 500_000  # the paper's CIFAR-10 / CelebA schedule
SMALL_PRESET = dict(model="DiS-S/4", image_size=16, embed_dim=64, depth=4, global_batch_size=32, max_steps=1200,
                    warmup_steps=50, lr=1e-3, log_every=25, ckpt_every=400, sample_every=400)
PRESETS = {"paper": {}, "small": SMALL_PRESET}

log = logging.getLogger("dis.train")


# ----------------------------------------------------------------------------- set-up

def check_run(args, world, device):
    """Settings that depend on the processes and the device."""
    if args.global_batch_size % world:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} processes")
    if args.global_batch_size % (world * args.grad_accum_steps):
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by --grad-accum-steps "
                         f"{args.grad_accum_steps} x {world} process(es): every micro-batch must split evenly")
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.cuda_graphs and (device.type != "cuda" or world > 1):
        raise SystemExit(f"--cuda-graphs needs one process on a CUDA device; this run has {world} process(es) "
                         f"on {device.type}")
    if args.fid_ref:
        import fid
        try:
            fid.find_weights(args.inception_weights)
        except fid.FIDError as e:
            raise SystemExit(f"--fid-ref needs the Inception weights: {e}")


def use_cuda_graphs(args, world, device, encode_batches):
    """Whether the steps replay a CUDA graph (graphs.py): --cuda-graphs on, off, or by default
    (None) wherever a graph can hold the step: one process on a CUDA device, without --compile,
    --grad-checkpointing (both refused with an explicit --cuda-graphs) or the VAE's encoding of
    each batch."""
    if args.cuda_graphs is None:
        return device.type == "cuda" and world == 1 and not (args.compile or args.grad_checkpointing or encode_batches)
    if args.cuda_graphs and encode_batches:
        raise SystemExit("--cuda-graphs does not capture the VAE's encoding of each batch; add --cache-latents")
    return args.cuda_graphs


def scan_backend(args, device):
    """The scan backend of this run (scan.resolve_backend: 'auto' is the fastest on the device)."""
    try:
        backend = resolve_backend(device, args.scan_backend)
    except ValueError as e:
        raise SystemExit(f"--scan-backend {args.scan_backend}: {e}")
    if args.scan_save_every not in ("auto", 0, 1) and backend not in OUR_KERNELS:
        raise SystemExit(f"--scan-save-every applies to our Triton and CUDA scans; this run uses the {backend} scan")
    return backend


def total_steps(args, dataset_size):
    """The step at which the run ends: --max-steps or --epochs, the earlier; neither: DEFAULT_STEPS."""
    per_epoch = dataset_size // args.global_batch_size
    if per_epoch == 0:
        raise SystemExit(f"the dataset has {dataset_size} images, fewer than --global-batch-size "
                         f"{args.global_batch_size}")
    ends = [s for s in (args.max_steps, args.epochs and args.epochs * per_epoch) if s]
    return min(ends) if ends else DEFAULT_STEPS


def kept_every(args):
    """N of --scan-save-every N when the forward pass keeps chunk states from the start, else 0."""
    return 0 if args.scan_save_every == "auto" else args.scan_save_every


def log_settings(args, config, model, data, run, end, world, device, backend):
    """Two log lines: the model, then the data, the steps, the processes and the speed settings."""
    log.info(f"{args.model} (D={config['embed_dim']}, depth {config['depth']}), "
             f"{sum(p.numel() for p in model.parameters()):,} parameters, input {data.channels}x{data.side}x"
             f"{data.side}, {args.num_classes} classes, {f'latent space ({args.vae})' if data.vae else 'pixel space'}")
    log.info(f"Data: {args.dataset}, {len(data.source):,} images from {data.where}; {run.per_epoch:,} steps per epoch; "
             f"{end:,} steps of {args.global_batch_size} on {world} process(es)"
             f"{f' in {args.grad_accum_steps} micro-batches' if args.grad_accum_steps > 1 else ''}, {device}; "
             f"scan backend {backend}; {args.precision}{', gradient checkpointing' if args.grad_checkpointing else ''}"
             f"{f', scan states kept every {args.scan_save_every} chunks' if kept_every(args) else ''}"
             f"{', u recomputed' if args.recompute_scan_inputs else ''}"
             f"{', compiled' if args.compile else ''}{', CUDA graphs' if args.cuda_graphs else ''}")


# ----------------------------------------------------------------------------- model

def build_model(config, ckpt, args, backend, device, world):
    """(the DiS, its EMA copy, the module to call: DDP-wrapped with several processes). Initialised
    from the global seed, so identically for any number of processes; or loaded from ckpt."""
    torch.manual_seed(args.global_seed)
    model = dis.DiS(**config, scan_backend=backend, scan_save_every=kept_every(args),  # auto: keep_scan_states
                    recompute_scan_inputs=args.recompute_scan_inputs)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    ema = deepcopy(model).requires_grad_(False).eval()
    if ckpt is not None:
        ema.load_state_dict(ckpt["ema"])
    model.to(device).train()
    ema.to(device)
    if args.grad_checkpointing:
        checkpoint_blocks(model)
    if args.compile:
        model.compile(mode=args.compile_mode)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    return model, ema, ddp


def checkpoint_blocks(model):
    """Gradient checkpointing: each block's activations are recomputed in the backward pass
    instead of kept (the module tree and state dict stay as they are)."""
    for block in model.blocks():
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


# ----------------------------------------------------------------------------- the step and what follows it

def step_noise(step, seed, global_batch, rank, world, shape, num_timesteps, device):
    """Timesteps (B,) and noise (B, *shape) of this rank's slice of the global batch at `step`;
    drawn for the whole global batch from a generator seeded by (seed, step)."""
    g = torch.Generator(device).manual_seed(derived_seed(seed, "noise", step))
    t = torch.randint(0, num_timesteps, (global_batch,), generator=g, device=device)
    noise = torch.randn(global_batch, *shape, generator=g, device=device)
    part = slice(rank * global_batch // world, (rank + 1) * global_batch // world)
    return t[part], noise[part]


def accumulate_gradients(ddp, diffusion, batch, steps, vae=None, conditional=True, bf16=False, cast_cache=True):
    """Forward and backward passes of this rank's share of the global batch, (x, y, t, noise)
    with leading dimension B, in `steps` micro-batches of B / steps; returns the mean loss.
    Each micro-batch's mean loss is scaled by 1 / steps, so the accumulated gradients are those
    of the mean over the whole share; DDP all-reduces them only in the last backward pass.
    cast_cache: autocast's cache of bf16 weights (off in a CUDA graph, which must own them)."""
    total = 0
    for i, (x, y, t, noise) in enumerate(zip(*(part.chunk(steps) for part in batch))):
        if vae is not None:
            x = encode(vae, x)
        last = i == steps - 1 or not isinstance(ddp, DDP)
        with contextlib.nullcontext() if last else ddp.no_sync():
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cast_cache):
                terms = diffusion.training_losses(ddp, x, t, dict(y=y) if conditional else None, noise)
                loss = terms["loss"].mean() / steps
            loss.backward()
        total = total + loss.detach()
    return total


def step_passes(ddp, diffusion, args, data, x, y, t, noise, cast_cache=True):
    """accumulate_gradients with this run's settings: the forward and backward passes of a step."""
    return accumulate_gradients(ddp, diffusion, (x, y, t, noise), args.grad_accum_steps,
                                data.vae if data.encode_batches else None, args.num_classes > 0,
                                args.precision == "bf16", cast_cache)


def lr_factor(step, warmup, total):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def ema_decay(step, target):
    """min(target, (1 + step) / (10 + step)): a fixed 0.9999 would keep 90% of the initial weights
    after 1,000 steps, so short runs would sample noise."""
    return min(target, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param, for lists of float32 tensors."""
    torch._foreach_lerp_(ema_params, params, 1 - decay)  # a few fused kernels instead of one per tensor


def stop_if_diverged(run, in_a_row, args, rank, world, device):
    """More than --max-nonfinite skipped steps in a row end the run, with a checkpoint."""
    if in_a_row > args.max_nonfinite:
        run.save(rank, world, device)
        raise SystemExit(f"{in_a_row} non-finite steps in a row (more than --max-nonfinite {args.max_nonfinite}) "
                         f"at step {run.step}; checkpoint {run.checkpoint_path()} holds the weights before them; "
                         f"lower --lr or use --precision fp32, then --resume {run.checkpoint_path()}")


def after_step(run, args, end, stop_reason, meter, bar, grid, probe, board, rank, world, device):
    """What runs every so many steps: the log line, the checkpoint, the sample grid, the FID."""
    if run.step % args.log_every == 0 or run.step in (1, end):
        log_progress(run, meter, bar, device, board)
    if run.step % args.ckpt_every == 0 or stop_reason:
        run.save(rank, world, device)
    drew = args.sample_every and run.step % args.sample_every == 0 and stop_reason != "signal"
    if drew:
        grid.draw(run, rank, board)
    measured = args.fid_every and run.step % args.fid_every == 0 and run.step < end and not stop_reason
    if measured:  # the last step's FID follows the loop
        probe.measure(run, rank, world, board, keep=False)
    if run.saved_at == run.step or drew or measured:
        meter.restart(run.step)  # the time spent on them is not training throughput


# ----------------------------------------------------------------------------- training

def train(args, parser, rank, world, device):
    """Set-up, model, data, loop, save; returns the run's folder."""
    with input_errors(parser):  # up to the first step, a problem is the input's: one line, exit status 2
        setup_logging(rank)
        args, ckpt, resume_path, ignored = resume_or_new(args, parser)
        check_run(args, world, device)
        backend = scan_backend(args, device)
        data = prepare_data(args, rank, world, device)  # the data decides the model's input (channels, side)
        args.cuda_graphs = use_cuda_graphs(args, world, device, data.encode_batches)
        end = total_steps(args, len(data.source))
        config = ckpt["config"] if ckpt else model_config(
            args.model, data.side, data.channels, args.num_classes, args.embed_dim, args.depth,
            learn_sigma=args.learn_sigma, drop_path_rate=args.drop_path_rate,
            class_dropout_prob=args.class_dropout_prob, skip=args.skip, cond=args.cond, dt_init=args.dt_init)
        check_memory(config, args, world, device, data)
        probe = QualityProbe.for_run(args, data, config["learn_sigma"], device)
        run_dir = open_run_dir(args, resume_path, rank, world)
    log_to_file(run_dir, rank)
    log.info(f"{'Resuming ' + resume_path if ckpt else 'New run'} in {run_dir}")
    for flag in ignored:
        log.warning(f"ignoring {flag}: a resumed run keeps its settings")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls

    # Model, optimizer, schedule and the run's state (restored with --resume)
    model, ema, ddp = build_model(config, ckpt, args, backend, device, world)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, warmup=args.warmup_steps,
                                                                         total=end))
    run = Run(run_dir, args, config, model, ema, opt, scheduler, len(data.source))
    if ckpt is not None:
        run.restore(ckpt)
    restore_rng(ckpt, args, rank, world, device, run.step)
    del ckpt  # its tensors are copied into the model and optimizer
    diffusion = create_diffusion("", learn_sigma=config["learn_sigma"])
    if args.cuda_graphs:
        diffusion.keep_schedule_on(device)
    grid = SampleGrid(args, data.channels, data.side, config["learn_sigma"], data.vae, device)
    board = Dashboard(os.path.join(run_dir, "tensorboard") if rank == 0 and args.tensorboard else None, run.step)
    log_settings(args, config, model, data, run, end, world, device, backend)
    if rank == 0:
        with writing(os.path.join(run_dir, "run.json"), run.last_saved()):
            record_launch(run_dir, args, world, device, backend, run.step)

    # Data: this rank's share of each global batch, in the order of (seed, epoch), from run.step on
    batches = data_stream(data.source, batch_plan(len(data.source), args.global_batch_size, rank, world,
                                                  args.global_seed, run.step), device, args.num_workers)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    meter, started, in_a_row, stop_reason = Meter(run.step), time.time(), 0, None
    settle_states = args.scan_save_every == "auto" and device.type == "cuda" and backend in OUR_KERNELS
    passes = functools.partial(step_passes, ddp, diffusion, args, data)
    graphed = None  # --cuda-graphs: the step's passes as a CUDA graph, once their work is fixed
    bar = tqdm(total=end, initial=run.step, disable=rank != 0, unit="step", dynamic_ncols=True)
    with StopSignals(f"stopping after this step, saving a checkpoint in {run_dir}/checkpoints") as stop, bar:
        try:
            while run.step < end and stop_reason is None:
                x, y = next(batches)
                t, noise = step_noise(run.step, args.global_seed, args.global_batch_size, rank, world,
                                      (data.channels, data.side, data.side), diffusion.num_timesteps, device)
                if args.cuda_graphs and graphed is None and not settle_states:
                    graphed = GraphedPasses(functools.partial(passes, cast_cache=False), params, (x, y, t, noise))
                    log.info(f"Step {run.step + 1} on: the forward and backward passes replay a CUDA graph")
                if graphed is not None:
                    loss = graphed(x, y, t, noise)
                else:
                    opt.zero_grad(set_to_none=True)
                    loss = passes(x, y, t, noise)
                norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                over_time = args.max_minutes is not None and time.time() - started > 60 * args.max_minutes
                agreed = agree(loss, norm, stop.received is not None, over_time, world, device)
                if agreed.finite:
                    opt.step()
                    scheduler.step()
                    update_ema(ema_params, params, ema_decay(run.step, args.ema_decay))
                    meter.add(agreed.loss, agreed.norm)
                    in_a_row = 0
                else:
                    run.nonfinite, in_a_row = run.nonfinite + 1, in_a_row + 1
                    log.warning(f"non-finite loss or gradient at step {run.step} ({in_a_row} in a row, "
                                f"{run.nonfinite} in all): update skipped on every rank")
                run.step += 1
                bar.update(1)
                if settle_states:  # --scan-save-every auto: keep the chunk states if they fit
                    settle_states = False
                    micro = args.global_batch_size // (world * args.grad_accum_steps)
                    inputs = torch.bfloat16 if args.precision == "bf16" else torch.float32
                    state_bytes = default_states_dtype(inputs).itemsize if backend == "cuda" else 4  # Triton: float32
                    log.info(keep_scan_states(model, micro, state_bytes, device, args.grad_checkpointing))
                stop_if_diverged(run, in_a_row, args, rank, world, device)
                stop_reason = "signal" if agreed.signalled else "time" if agreed.timed_out else None
                after_step(run, args, end, stop_reason, meter, bar, grid, probe, board, rank, world, device)

            # Save: the last checkpoint and grid (a second signal skips them: the previous checkpoint stays)
            if stop_reason != "signal":
                if run.saved_at != run.step:
                    run.save(rank, world, device)
                if args.sample_every and run.step % args.sample_every:
                    grid.draw(run, rank, board)
        except torch.OutOfMemoryError:
            raise out_of_memory(args, world, backend)
    if stop_reason == "signal":
        log.info(f"Stopped by {signal.Signals(stop.received).name} at step {run.step}; continue with: "
                 f"python train.py --resume {run.checkpoint_path()}")
        board.close()
        raise SystemExit(128 + stop.received)
    log.info(f"{'Time budget of --max-minutes reached' if stop_reason else 'Done'} at step {run.step} "
             f"after {(time.time() - started) / 60:.1f} minutes")
    if probe:
        probe.measure(run, rank, world, board, keep=True)
    board.close()
    return run_dir


# ----------------------------------------------------------------------------- command line

def auto_or_int(text):
    """--scan-save-every's value: "auto" or an integer."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or an integer >= 0, not {text!r}") from None


CHECKS = {  # flag: (test, what it accepts); a flag left out (None) is not tested
    "image_size": at_least(1, "positive"), "num_classes": at_least(0, ">= 0 (0: unconditional)"),
    "num_workers": at_least(0, ">= 0"), "embed_dim": at_least(1, "positive"),
    "depth": (lambda v: v >= 2 and v % 2 == 0, "even and >= 2 (depth/2 blocks on each side of the mid block)"),
    "drop_path_rate": (lambda v: 0 <= v < 1, "in [0, 1)"), "class_dropout_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "global_batch_size": at_least(1, "positive"), "grad_accum_steps": at_least(1, "positive"),
    "global_seed": (lambda v: 0 <= v < 2**63, "in [0, 2^63)"), "epochs": at_least(1, "positive"),
    "max_steps": at_least(1, "positive"), "lr": (lambda v: 0 < v < math.inf, "positive and finite"),
    "warmup_steps": at_least(0, ">= 0"), "max_grad_norm": (lambda v: v > 0, "positive (inf: no clipping)"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"), "max_nonfinite": at_least(0, ">= 0"),
    "scan_save_every": (lambda v: v == "auto" or v >= 0, "auto or >= 0"),
    "max_minutes": (lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    "log_every": at_least(1, "positive"), "ckpt_every": at_least(1, "positive"),
    "sample_every": at_least(0, ">= 0 (0: no sample grids)"),
    "sample_cfg": (lambda v: 0 <= v < math.inf, ">= 0 and finite (1: no guidance)"),
    "fid_samples": at_least(2, ">= 2"), "fid_every": at_least(0, ">= 0 (0: only after training)"),
    "fid_sampling_steps": (lambda v: 2 <= v <= 1000, "in 2..1000"),
}


def check_args(args, parser):
    """Every numeric and path argument in its range, or parser.error naming it (exit status 2)."""
    check_ranges(args, parser, CHECKS)
    check_exist(parser, (("--data-path", args.data_path), ("--fid-ref", args.fid_ref),
                         ("--inception-weights", args.inception_weights),
                         ("--resume", None if args.resume == "auto" else args.resume)))
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        parser.error(f"--resume {args.resume} is a folder; give a checkpoint file or auto")
    for flag, folder in (("--results-dir", args.results_dir), ("--cache-dir", args.cache_dir)):
        existing = folder and nearest_existing(folder)
        if existing and not os.path.isdir(existing):
            parser.error(f"{flag} {folder}: {existing} is a file, not a folder")
        if existing and not os.access(existing, os.W_OK | os.X_OK):
            parser.error(f"{flag} {folder}: {existing} is not writable")
    if args.fid_every and not args.fid_ref and args.dataset != "fashion-mnist":
        parser.error("--fid-every needs --fid-ref (on --dataset fashion-mnist it measures the yardstick without one)")
    if args.tensorboard and not tensorboard_installed():
        parser.error("--tensorboard needs the tensorboard package (pip install tensorboard), or use --no-tensorboard")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if args.compile_mode != "default" and not args.compile:
        parser.error(f"--compile-mode {args.compile_mode} takes effect with --compile; add --compile")
    if args.recompute_scan_inputs and args.compile:
        parser.error("--recompute-scan-inputs has no effect with --compile (torch.compile chooses what to recompute); "
                     "drop one of them")
    for flag, other in (("--compile", args.compile), ("--grad-checkpointing", args.grad_checkpointing)):
        if args.cuda_graphs and other:
            parser.error(f"--cuda-graphs does not combine with {flag}; drop one of them")
    if args.recompute_scan_inputs and args.grad_checkpointing:
        parser.error("--recompute-scan-inputs has no effect with --grad-checkpointing (each block is recomputed "
                     "whole); drop one of them")


def parse_args(argv=None):
    """(args, parser): the command line over the preset's defaults; args.model is None when
    --model is not given (so that --resume auto takes the newest run of any model)."""
    parser = OneLineParser(prog="train.py", description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=list(DATASETS), default="fashion-mnist")
    data.add_argument("--data-path", default=None, help="see data.py's docstring for what each dataset expects")
    data.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                      help="download fashion-mnist / cifar10 when missing")
    data.add_argument("--image-size", type=int, default=None, help="default: the dataset's (see data.py)")
    data.add_argument("--num-classes", type=int, default=None, help="0 for unconditional; default: the dataset's")
    data.add_argument("--num-workers", type=int, default=4, help="loader processes for image files")
    data.add_argument("--vae", default="auto",
                      help="auto (latent space from 256 px), none, ema, mse, a hub id or an AutoencoderKL folder")
    data.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=False,
                      help="encode the dataset to latents once and train from that cache")
    data.add_argument("--cache-dir", default=None, help="default: RESULTS_DIR/latent-cache/DATASET-SIZE-VAE")
    net = parser.add_argument_group("model")
    net.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                     help="the defaults of the flags: paper (section 3.1, DiS-S/2) or small (a DiS that trains in "
                          "minutes on a CPU: %s); auto: paper with CUDA, else small" %
                          " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMALL_PRESET.items()))
    net.add_argument("--model", choices=list(dis.DiS_models), default="DiS-S/2")
    net.add_argument("--embed-dim", type=int, default=None, help="override the hidden size of --model")
    net.add_argument("--depth", type=int, default=None, help="override the depth of --model (even)")
    net.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True)
    net.add_argument("--skip", choices=["concat", "add", "none"], default="concat")
    net.add_argument("--cond", choices=["token", "adaln"], default="token")
    net.add_argument("--dt-init", choices=["symmetric", "original"], default="symmetric")
    net.add_argument("--drop-path-rate", type=float, default=0.1)
    net.add_argument("--class-dropout-prob", type=float, default=0.1)
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--global-batch-size", type=int, default=128)
    optim.add_argument("--grad-accum-steps", type=int, default=1, metavar="K",
                       help="micro-batches per optimiser step: each process takes --global-batch-size / (processes "
                            "x K) images at a time, and the step sees the same global batch")
    optim.add_argument("--global-seed", type=int, default=0)
    optim.add_argument("--epochs", type=int, default=None)
    optim.add_argument("--max-steps", type=int, default=None,
                       help=f"with --epochs the earlier end wins; neither: {DEFAULT_STEPS:,} steps (the paper's)")
    optim.add_argument("--lr", type=float, default=1e-4)
    optim.add_argument("--warmup-steps", type=int, default=1000, help="linear warm-up before the cosine decay")
    optim.add_argument("--max-grad-norm", type=float, default=1.0)
    optim.add_argument("--ema-decay", type=float, default=0.9999)
    optim.add_argument("--max-nonfinite", type=int, default=10, help="stop after more non-finite steps in a row")
    speed = parser.add_argument_group("speed and memory")
    speed.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="auto: CUDA when available (one GPU per process under torchrun)")
    speed.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    speed.add_argument("--scan-backend", choices=["auto", *BACKENDS], default="auto",
                       help="the selective scan's implementation (scan.py); auto: the fastest on the device")
    speed.add_argument("--scan-save-every", type=auto_or_int, default="auto", metavar="{auto,N}",
                       help="our scans (Triton, CUDA): keep the states of every Nth chunk of 4 steps from the "
                            "forward pass for the backward pass (1: the fastest step); 0: keep none, the backward "
                            "pass recomputes them (the least memory); auto: 0 for the first step, then 1 if "
                            "the GPU has room for them")
    speed.add_argument("--recompute-scan-inputs", action=argparse.BooleanOptionalAction, default=False,
                       help="recompute the mixers' u (the convolution's output) in the backward pass rather "
                            "than keep it, as Delta always is (less memory, slower; not with --compile or "
                            "--grad-checkpointing)")
    speed.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the model")
    speed.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                       help="torch.compile's mode with --compile; reduce-overhead adds CUDA graphs (see README)")
    speed.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="replay each step's forward and backward passes as one CUDA graph, captured at the "
                            "first step whose work is fixed (see graphs.py); default: on with one process on a "
                            "GPU, unless --compile, --grad-checkpointing or the VAE encodes each batch")
    speed.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=True,
                       help="refuse a run that clearly needs more memory than is available")
    run = parser.add_argument_group("run and logging")
    run.add_argument("--results-dir", default="results")
    run.add_argument("--resume", default=None, metavar="PATH|auto",
                     help="a checkpoint, or auto: the newest of the newest run in --results-dir (of --model if given)")
    run.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this much training time")
    run.add_argument("--log-every", type=int, default=100, help="and at the first step")
    run.add_argument("--ckpt-every", type=int, default=50_000)
    run.add_argument("--sample-every", type=int, default=5_000, help="and at the end; 0: no sample grids")
    run.add_argument("--sample-cfg", type=float, default=1.5, help="guidance scale of the sample grids")
    run.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=tensorboard_installed(),
                     help="the dashboard in RUN/tensorboard (default: on when the tensorboard package is installed)")
    run.add_argument("--fid-ref", default=None, help="after training, FID of --fid-samples EMA samples against this")
    run.add_argument("--fid-every", type=int, default=0, metavar="N",
                     help="the FID (--fid-ref) and, on 32x32 Fashion-MNIST, the yardstick (yardstick.py) every N "
                          "steps and after training (0: only the FID after training)")
    run.add_argument("--fid-samples", type=int, default=10_000)
    run.add_argument("--fid-sampling-steps", type=int, default=250, help="DDPM steps of the FID samples")
    run.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth for --fid-ref")
    known, _ = parser.parse_known_args(argv)
    if known.preset == "auto":
        known.preset = "paper" if known.device != "cpu" and torch.cuda.is_available() else "small"
    parser.set_defaults(preset=known.preset, **PRESETS[known.preset])
    args = parser.parse_args(argv, argparse.Namespace(model=None))
    check_args(args, parser)
    return args, parser


def first_line(args, parser):
    """What this command runs, and the command for the paper's configuration."""
    if args.resume:
        return f"train.py: resuming ({args.resume}) with --preset {args.preset}; a resumed run keeps its settings"
    model = args.model or parser.get_default("model")
    dim, depth = dis.SIZES[model.split("-")[1].split("/")[0]]
    steps = f"{args.max_steps or DEFAULT_STEPS:,} steps"
    if args.epochs and not args.max_steps:
        steps = f"{args.epochs} epochs"
    size = args.image_size or DATASETS[args.dataset][0]
    what = (f"{model} (D={args.embed_dim or dim}, depth {args.depth or depth}) on {args.dataset}"
            f"{f' at {size}x{size}' if size else ''}, batch {args.global_batch_size}, {steps}")
    if args.preset == "paper":
        return f"train.py: {what}, the paper's settings otherwise (--preset paper)"
    why = "" if args.device != "cpu" and torch.cuda.is_available() else "no CUDA device, so "
    return (f"train.py: {why}a small DiS that shows the whole pipeline (--preset small, about 10 minutes on 2 CPU "
            f"cores): {what}. The paper's DiS-S/2: python train.py --preset paper (on a GPU)")


def main(argv=None):
    args, parser = parse_args(argv)
    if os.environ.get("RANK", "0") == "0":
        print(first_line(args, parser), flush=True)
    try:
        with process_group(args.device) as (rank, world, device):
            return train(args, parser, rank, world, device)
    except KeyboardInterrupt:  # outside the step loop (which stops cleanly on its own): set-up, the final FID
        print("train.py: interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    main()
