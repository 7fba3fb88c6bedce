"""A training run and its folder: checkpoints, resuming, the launch record and the sample grids.

A run lives in results/NNN-DiS-S-2/ (DiT's layout): checkpoints/SSSSSSS.pt, log.txt, run.json
(arguments, seeds and library versions of every launch), samples/SSSSSSS.png and tensorboard/.
Checkpoints are written atomically and are plain dicts, loadable with torch.load(weights_only=True):
  model, ema            state dicts (EMA in float32)
  opt, scheduler        AdamW and LambdaLR state dicts
  step                  optimizer steps taken
  args                  vars(args) with the defaults resolved (image size, classes, VAE, ...)
  config                model.DiS(**config) rebuilds the network (sample.py uses it)
  rng                   per rank: {"cpu": ByteTensor, "cuda": ByteTensor or None}
  data                  {seed, epoch, batch_in_epoch, dataset_size, global_batch_size}
  loss_curve, nonfinite [[step, mean loss], ...] at step 1 and every --log-every; skipped steps
Resuming restores all of it; only the operational flags (RESUME_FROM_COMMAND_LINE) may change.
"""
import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import sys
import time
from glob import escape, glob
from importlib import metadata

import torch
import torch.distributed as dist

from diffusion import create_diffusion, generate
from distributed import barrier, derived_seed, rank_seed, rng_states, set_rng_state
from storage import grid_labels, load_checkpoint, save_grid, to_uint8, write_atomically, write_text

GRID_RESPACING = "ddim25"
RESUME_FROM_COMMAND_LINE = {  # may differ from the checkpoint's values; everything else is the run's
    "resume", "results_dir", "data_path", "download", "num_workers", "cache_dir", "max_steps", "epochs",
    "max_minutes", "log_every", "ckpt_every", "sample_every", "sample_cfg", "precision", "compile", "compile_mode",
    "grad_checkpointing", "recompute_scan_inputs", "scan_backend", "scan_save_every", "device", "max_nonfinite",
    "fid_ref", "fid_samples", "inception_weights", "grad_accum_steps", "tensorboard", "fid_every",
    "fid_sampling_steps", "preset", "memory_check", "cuda_graphs"}

log = logging.getLogger("dis.train")


class Run:
    """What a checkpoint holds (the model, its EMA, the optimizer and its schedule, the step, the
    loss curve) and the folder it is saved to."""

    def __init__(self, folder, args, config, model, ema, opt, scheduler, dataset_size):
        self.folder, self.args, self.config = folder, args, config
        self.model, self.ema, self.opt, self.scheduler = model, ema, opt, scheduler
        self.dataset_size, self.per_epoch = dataset_size, dataset_size // args.global_batch_size
        self.step, self.loss_curve, self.nonfinite, self.saved_at = 0, [], 0, None

    def restore(self, ckpt):
        self.opt.load_state_dict(ckpt["opt"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.loss_curve, self.nonfinite = ckpt["step"], ckpt["loss_curve"], ckpt["nonfinite"]
        self.saved_at = self.step
        if ckpt["data"]["dataset_size"] != self.dataset_size:
            log.warning(f"the dataset has {self.dataset_size} images, the run had {ckpt['data']['dataset_size']}: "
                        f"the data order changes")

    def checkpoint_path(self, step=None):
        return os.path.join(self.folder, "checkpoints", f"{self.step if step is None else step:07d}.pt")

    def save(self, rank, world, device):
        """Write the checkpoint (plus every rank's RNG state) atomically from rank 0."""
        state = dict(model=self.model.state_dict(), ema=self.ema.state_dict(), opt=self.opt.state_dict(),
                     scheduler=self.scheduler.state_dict(), step=self.step, args=vars(self.args), config=self.config,
                     data=dict(seed=self.args.global_seed, epoch=self.step // self.per_epoch,
                               batch_in_epoch=self.step % self.per_epoch, dataset_size=self.dataset_size,
                               global_batch_size=self.args.global_batch_size),
                     loss_curve=self.loss_curve, nonfinite=self.nonfinite, rng=rng_states(world, device))
        if rank == 0:
            with writing(self.checkpoint_path(), self.last_saved()):
                write_atomically(self.checkpoint_path(), functools.partial(torch.save, state))
            log.info(f"Saved checkpoint {self.checkpoint_path()}")
        barrier()
        self.saved_at = self.step

    def last_saved(self):
        return "none" if self.saved_at is None else self.checkpoint_path(self.saved_at)


@contextlib.contextmanager
def writing(path, last_checkpoint):
    """An OSError while writing `path` (a full disk, a folder made read-only or removed) ends the
    run with one line naming the last complete checkpoint; the unfinished path.tmp is removed."""
    try:
        yield
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise SystemExit(f"cannot write {path}: {e.strerror}; the last complete checkpoint: {last_checkpoint}")


class SampleGrid:
    """The grid drawn while training: the EMA model, DDIM 25 steps, guidance --sample-cfg, fixed
    noise and labels (one class per row); written to samples/SSSSSSS.png and the dashboard."""

    def __init__(self, args, channels, side, learn_sigma, vae, device):
        self.labels, count = grid_labels(args.num_classes)
        self.noise = torch.randn(count, channels, side, side, generator=torch.Generator().manual_seed(args.global_seed))
        self.diffusion = create_diffusion(GRID_RESPACING, learn_sigma=learn_sigma)
        self.cfg, self.vae, self.device, self.bf16 = args.sample_cfg, vae, device, args.precision == "bf16"

    def draw(self, run, rank, board):
        if rank == 0:
            labels = None if self.labels is None else self.labels.to(self.device)
            images = generate(run.ema, self.diffusion, self.noise.to(self.device), labels, self.cfg, "ddim", self.vae,
                              bf16=self.bf16, progress=self.device.type == "cpu")
            text = json.dumps(dict(step=run.step, sampler=GRID_RESPACING, cfg_scale=self.cfg, weights="ema"))
            path = os.path.join(run.folder, "samples", f"{run.step:07d}.png")
            with writing(path, run.last_saved()):
                save_grid(to_uint8(images), path, 10, text)
            board.image("samples", path, run.step)
        barrier()


def open_run_dir(args, resume_path, rank, world):
    """The resumed run's folder (when its checkpoint sits in RUN/checkpoints/), else a new
    results_dir/NNN-DiS-S-2 with NNN one above the highest existing index (DiT's layout)."""
    if resume_path and os.path.basename(os.path.dirname(resume_path)) == "checkpoints":
        return os.path.dirname(os.path.dirname(resume_path))
    run_dir = None
    if rank == 0:
        try:
            os.makedirs(args.results_dir, exist_ok=True)
            taken = [int(d[:3]) for d in os.listdir(args.results_dir) if d[:3].isdigit()]
            run_dir = os.path.join(args.results_dir, f"{max(taken, default=-1) + 1:03d}-{args.model.replace('/', '-')}")
            os.makedirs(os.path.join(run_dir, "samples"))
            os.makedirs(os.path.join(run_dir, "checkpoints"))
        except OSError as e:
            raise SystemExit(f"--results-dir {args.results_dir}: cannot create {e.filename}: {e.strerror}")
    if world > 1:
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    return run_dir


def find_resume(results_dir, model_name):
    """The newest checkpoint of the newest run (the highest NNN) in results_dir that has one, of
    the model `model_name` or, if None, of any; None when there is none."""
    pattern = "*" if model_name is None else model_name.replace("/", "-")
    runs = sorted(glob(os.path.join(escape(results_dir), f"[0-9][0-9][0-9]-{pattern}")), reverse=True)
    for run in runs:
        found = sorted(glob(os.path.join(escape(run), "checkpoints", "[0-9]*.pt")))
        if found:
            return found[-1]
    return None


def read_resume(path):
    """The checkpoint --resume names, checked to be one of train.py's."""
    ckpt = load_checkpoint(path, mmap=True)
    missing = [k for k in ("model", "ema", "opt", "scheduler", "step", "args", "config", "rng") if k not in ckpt]
    if missing:
        raise SystemExit(f"--resume {path} is not a train.py checkpoint (it has no {', '.join(missing)}; a bare state "
                         f"dict?): sample.py --ckpt reads such weights; to train anew, leave out --resume")
    return ckpt


def resume_or_new(args, parser):
    """(args, the checkpoint or None, its path or None, the flags ignored): with --resume, the
    run's arguments with the operational ones from the command line."""
    path = find_resume(args.results_dir, args.model) if args.resume == "auto" else args.resume
    if args.resume == "auto":
        log.info(f"--resume auto: resuming {path}" if path else
                 f"--resume auto: no checkpoint in {args.results_dir}, starting a new run")
    ckpt = read_resume(path) if path else None
    args, ignored = resumed_args(args, ckpt["args"], parser) if ckpt else (args, [])
    args.model = args.model or parser.get_default("model")
    return args, ckpt, path, ignored


def resumed_args(args, saved, parser):
    """The checkpoint's arguments, with the operational ones from the command line; returns them
    and the command-line values that were ignored."""
    merged, ignored = dict(saved), []
    for key, value in vars(args).items():
        if key in RESUME_FROM_COMMAND_LINE or key not in saved:
            merged[key] = value
        elif value is not None and value != parser.get_default(key) and value != saved[key]:
            ignored.append(f"--{key.replace('_', '-')} {value} (the run's value: {saved[key]})")
    return argparse.Namespace(**merged), ignored


def restore_rng(ckpt, args, rank, world, device, step):
    """Drop path and label dropout draw from each rank's default generator: restore it from the
    checkpoint, else seed it with DiT's per-rank seed."""
    if ckpt is not None and len(ckpt["rng"]) == world:
        return set_rng_state(ckpt["rng"][rank], device)
    if ckpt is not None:
        log.warning(f"the run had {len(ckpt['rng'])} processes, now {world}: drop path and label dropout are reseeded")
    seed = rank_seed(args.global_seed, rank, world)
    torch.manual_seed(seed if step == 0 else derived_seed(seed, step))


def record_launch(run_dir, args, world, device, backend, step):
    """Append this launch (arguments, seeds per rank, device, library versions) to run_dir/run.json."""
    path, launches = os.path.join(run_dir, "run.json"), []
    if os.path.isfile(path):
        with open(path) as f:
            launches = json.load(f)
    versions = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for name in ("torch", "torchvision", "numpy", "pillow", "diffusers", "triton", "mamba-ssm", "causal-conv1d"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    launches.append(dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv, start_step=step, args=vars(args),
                         world_size=world, model_init_seed=args.global_seed,
                         rank_seeds=[rank_seed(args.global_seed, r, world) for r in range(world)], device=str(device),
                         gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                         scan_backend=backend, versions=versions))
    write_text(path, json.dumps(launches, indent=1))
