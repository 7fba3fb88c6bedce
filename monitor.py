"""Watching a training run: log lines (terminal and log.txt), the images/s meter, the TensorBoard
dashboard and the quality of EMA samples (FID, and the Fashion-MNIST yardstick). Rank 0 writes
all of them; other ranks print warnings only.

    tensorboard --logdir results        # every run's RUN/tensorboard, side by side

The dashboard (RUN/tensorboard, through torch.utils.tensorboard) holds
  train/loss, train/grad_norm   means over the steps since the previous log line (--log-every)
  train/lr                      the learning rate after that step
  speed/img_per_s               images per second of training time (checkpoints and grids excluded)
  memory/peak_gb                peak CUDA memory allocated (CUDA only)
  fid/fid, fid/sfid, ...        of EMA samples, every --fid-every steps and at the end
  yardstick/fd, .../accuracy    the same samples on the Fashion-MNIST yardstick (yardstick.py)
  samples                       the sample grid (one class per row) every --sample-every steps
A resumed run hides what the interrupted one logged after its checkpoint (SummaryWriter's
purge_step), so every curve stays a function of the step. The numbers are in log.txt too, and
the loss curve in every checkpoint (loss_curve).
"""
import importlib.util
import json
import logging
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusion import create_diffusion
from distributed import barrier
from storage import write_samples_npz, write_text

FID_BATCH = 64  # sample.py's --per-proc-batch-size: the batches, and so the noise, of sample.py's .npz

LOG_FORMAT = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")

log = logging.getLogger("dis.monitor")


# ----------------------------------------------------------------------------- log lines

class TqdmHandler(logging.StreamHandler):
    """Prints log lines above the progress bar instead of through it."""

    def emit(self, record):
        tqdm.write(self.format(record))


def setup_logging(rank):
    """Rank 0 logs (train.py's and data.py's lines) to stdout and, once log_to_file is called,
    log.txt; other ranks print warnings."""
    root = logging.getLogger("dis")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    root.propagate = False
    handler = TqdmHandler() if rank == 0 else logging.StreamHandler(sys.stderr)
    handler.setFormatter(LOG_FORMAT)
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(handler)


def log_to_file(run_dir, rank):
    if rank == 0:
        handler = logging.FileHandler(os.path.join(run_dir, "log.txt"))
        handler.setFormatter(LOG_FORMAT)
        logging.getLogger("dis").addHandler(handler)


class Meter:
    """Mean loss and gradient norm since the last log line; images/s over training time only."""

    def __init__(self, step):
        self.loss = self.norm = 0.0
        self.steps = 0
        self.restart(step)

    def add(self, loss, norm):
        self.loss, self.norm, self.steps = self.loss + loss, self.norm + norm, self.steps + 1

    def restart(self, step):
        """Start timing anew (after a log line, a checkpoint, a grid or an FID)."""
        self.time, self.step = time.time(), step

    def read(self, step, batch):
        """(mean loss, mean gradient norm, images/s) since the last read; resets the means."""
        means = (self.loss / self.steps, self.norm / self.steps) if self.steps else (math.nan, math.nan)
        images_per_s = (step - self.step) * batch / (time.time() - self.time)
        self.loss = self.norm = 0.0
        self.steps = 0
        self.restart(step)
        return (*means, images_per_s)


def log_progress(run, meter, bar, device, board):
    """The log line of the steps since the last one, also on the dashboard; appends their mean
    loss to the loss curve."""
    mean_loss, mean_norm, images_per_s = meter.read(run.step, run.args.global_batch_size)
    lr = run.scheduler.get_last_lr()[0]
    values = {"train/loss": mean_loss, "train/grad_norm": mean_norm, "train/lr": lr, "speed/img_per_s": images_per_s}
    memory = ""
    if device.type == "cuda":
        values["memory/peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        memory = f" peak_mem={values['memory/peak_gb']:.2f}GB"
    log.info(f"step={run.step:07d} loss={mean_loss:.4f} grad_norm={mean_norm:.4f} "
             f"lr={lr:.3e} img/s={images_per_s:.1f}{memory} nonfinite={run.nonfinite}")
    board.scalars(run.step, values)
    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_per_s:.0f}")
    if math.isfinite(mean_loss):
        run.loss_curve.append([run.step, mean_loss])


# ----------------------------------------------------------------------------- the dashboard

def tensorboard_installed():
    return importlib.util.find_spec("tensorboard") is not None


class Dashboard:
    """TensorBoard event files in `folder`, or nothing when folder is None (ranks other than 0,
    --no-tensorboard). start_step: the step a resumed run continues from; what an earlier launch
    logged after it is hidden."""

    def __init__(self, folder, start_step=0):
        self.writer = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is optional
            self.writer = SummaryWriter(folder, purge_step=start_step + 1 if start_step else None)

    def scalars(self, step, values):
        """values: {tag: number or None}; None and non-finite numbers are left out."""
        if self.writer is not None:
            for tag, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def image(self, tag, path, step):
        """The PNG at `path` (grayscale or RGB), as the image `tag` at `step`."""
        if self.writer is not None:
            with Image.open(path) as image:
                self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- quality during training

def metric_tag(name):
    """A metric's dashboard tag: 'fid' -> 'fid/fid', 'yardstick_fd' -> 'yardstick/fd'."""
    return "yardstick/" + name.removeprefix("yardstick_") if name.startswith("yardstick_") else "fid/" + name


class QualityProbe:
    """The quality of --fid-samples EMA samples: FID against --fid-ref (if given) and, with
    `yardstick_data` (the Fashion-MNIST folder, for 32x32 grayscale pixel-space runs), the
    offline yardstick: Frechet distance and class accuracy in a small Fashion-MNIST classifier's
    features (yardstick.py). The samples are those that `sample.py --num-samples N
    --num-sampling-steps S --seed GLOBAL_SEED --precision P` draws (DDPM, no guidance: the
    paper's FID setting; S = --fid-sampling-steps, 250 by default; P the run's --precision),
    written to fid/SSSSSSS-...npz with its .json (settings and metrics) and .png. Every rank
    samples its share; rank 0 evaluates, logs and puts the metrics on the dashboard. The FID
    reference's statistics are computed once per launch (fid/reference-stats.npz)."""

    def __init__(self, args, learn_sigma, vae, device, yardstick_data=None):
        self.args, self.vae, self.device, self.net, self.reference = args, vae, device, None, args.fid_ref
        self.yardstick_data = yardstick_data
        self.diffusion = create_diffusion(str(args.fid_sampling_steps), learn_sigma=learn_sigma)

    @classmethod
    def for_run(cls, args, data, learn_sigma, device):
        """The probe of train.py's run: --fid-ref and, with --fid-every on 32x32 Fashion-MNIST in pixel
        space (what yardstick.py measures), the yardstick; None when neither is asked for. data is
        data.prepare_data's."""
        pixels_32 = args.dataset == "fashion-mnist" and data.vae is None and data.side == 32
        yardstick_data = data.where if pixels_32 else None
        if args.fid_every and not (args.fid_ref or yardstick_data):
            raise SystemExit(f"--fid-every without --fid-ref measures the Fashion-MNIST yardstick, which takes 32x32 "
                             f"images in pixel space, not {data.side}x{data.side}{' latents' if data.vae else ''}; "
                             f"add --fid-ref")
        if not (args.fid_ref or args.fid_every):
            return None
        return cls(args, learn_sigma, data.vae, device, yardstick_data if args.fid_every else None)

    def measure(self, run, rank, world, board, keep):
        """Sample and evaluate the EMA model at run.step (every rank must call this); keep=False
        deletes the .npz once its metrics are recorded. A failed evaluation (a ValueError of fid.py
        or yardstick.py) stops the run if keep, else it is logged and training goes on."""
        args, failure = self.args, None
        steps = args.fid_sampling_steps
        info = dict(step=run.step, weights="ema", sampler="ddpm", num_sampling_steps=steps, cfg_scale=1.0,
                    seed=args.global_seed, precision=args.precision, num_samples=args.fid_samples)
        name = f"{run.step:07d}-ema-ddpm{steps}-cfg1-seed{args.global_seed}-n{args.fid_samples}"
        # Sampling and building the Inception network draw from the default generators: forked, so
        # that training's drop path and label dropout go on as without them.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            path = write_samples_npz(run.ema, self.diffusion, self.vae, args.fid_samples, FID_BATCH,
                                     os.path.join(run.folder, "fid"), name, args.global_seed, precision=args.precision,
                                     info=info, rank=rank, world=world, device=self.device, progress=False)
            try:
                metrics = self.evaluate(path) if rank == 0 else None
            except ValueError as e:
                metrics, failure = None, f"sample quality at step {run.step}: {e}"
        if metrics is not None:
            log.info(f"step={run.step:07d} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if v is not None)
                     + f" ({args.fid_samples} EMA samples, DDPM {steps} steps)")
            board.scalars(run.step, {metric_tag(k): v for k, v in metrics.items()})
            write_text(path[: -len(".npz")] + ".json", json.dumps(dict(info, metrics=metrics)) + "\n")
        if rank == 0 and not keep:
            os.remove(path)
        barrier()
        if failure and keep:
            raise SystemExit(failure)
        if failure:
            log.warning(failure)

    def evaluate(self, samples):
        """The metrics of the .npz `samples`: fid.evaluate's (fid, sfid, ...), with one Inception
        network and the reference's statistics kept between calls; yardstick_fd, yardstick_accuracy."""
        metrics = {}
        if self.reference is not None:
            import fid  # torchvision's Inception modules load only when FID is asked for
            if self.net is None:
                self.net = fid.load_inception(self.args.inception_weights, device=self.device)
            stats = os.path.join(os.path.dirname(samples), "reference-stats.npz")
            metrics = fid.evaluate(samples, self.reference, net=self.net, progress=False,
                                   save_stats=stats if self.reference != stats else None)
            self.reference = stats
        if self.yardstick_data is not None:
            import yardstick  # trains and caches its classifier on first use
            with np.load(samples) as npz:
                images, labels = npz["arr_0"], npz["arr_1"] if "arr_1" in npz.files else None
            result = yardstick.evaluate(images, labels, device=self.device, data_path=self.yardstick_data,
                                        progress=False)
            metrics.update(yardstick_fd=result["fd"], yardstick_accuracy=result["accuracy"])
        return metrics
