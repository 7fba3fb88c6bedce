"""Train DiS, in one process or under torchrun with DDP (NCCL on GPUs, gloo on CPU).

    python train.py          # the main job: class-conditional DiS-S/2 on Fashion-MNIST, 28x28 padded to 32x32
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data-path DIR --model DiS-H/2 --image-size 256
    python train.py --resume auto      # continue the latest run of --model in --results-dir

Data flow: images -> this rank's share of the global batch, horizontally flipped or not ->
(latent space: the SD VAE's scaled latents) -> diffusion.training_losses (noise, DiS, L_simple
+ L_vlb) -> AdamW step with warm-up and cosine decay -> EMA. Settings default to the paper's
section 3.1: AdamW with lr 1e-4 and no weight decay, cosine schedule, EMA 0.9999, batch 128,
gradient norm clipped to 1, T = 1000 linear betas, learned sigma, horizontal flips only.

Datasets (--dataset, --data-path; default image size and classes in brackets)
  fashion-mnist  [32, 10]  the IDX files train-{images-idx3,labels-idx1}-ubyte.gz in --data-path,
                 else /usr/share/datasets/fashion-mnist (Debian: apt-get install dataset-fashion-mnist),
                 else downloaded by torchvision into ./data. 28x28 is padded to 32x32 with black
                 (-1), then resized if --image-size is not 32. Held on the device as uint8.
  cifar10        [32, 0]   torchvision's CIFAR10 in --data-path (default ./data), downloaded if missing.
                 Unconditional as in the paper; --num-classes 10 makes it class-conditional.
  celeba         [64, 0]   a folder of CelebA's aligned 178x218 images (img_align_celeba). As in the
                 DDIM / U-ViT code the paper builds on: the 128x128 box with top-left corner
                 (x=25, y=57) (centred on (89, 121), around the face), resized to the image size.
                 With list_eval_partition.txt in or beside the folder, only its train split
                 (162,770 images, the paper's count) is used.
  imagenet, folder  [256 / required, class count]  ImageFolder layout DIR/CLASS/IMAGE, ADM's
                 center crop (box-downsample, bicubic resize, center crop).
  latents        [from the data]  a folder with latents.npy, float (N, 2, C, h, w) (axis 1: the
                 image and its mirror image) or (N, C, h, w), already multiplied by the VAE's
                 scaling factor, and optionally labels.npy, int (N,). --cache-latents writes such
                 a folder; random arrays of this shape stand in for ImageNet latents in tests of
                 scale (e.g. N x 2 x 4 x 32 x 32 float16 with labels in 0..999 for --image-size 256).
  Unreadable image files are skipped with a warning naming them (the next image takes their place).

Latent space (--vae): 'auto' trains in the latent space of Stable Diffusion's VAE
(stabilityai/sd-vae-ft-ema, downsampling 8, latents times 0.18215) from --image-size 256 up, in
pixel space below; 'none', 'ema', 'mse', a hub id or a local directory choose explicitly.
Without a cache each batch is encoded on the fly (a posterior sample, as DiT). --cache-latents
encodes the dataset once, every rank its share in parallel, into one memory-mapped float16
array in --cache-dir: the posterior means (not a frozen sample, so the cache is deterministic)
of each image and of its mirror image, so that flips keep their 50% chance per step.

Randomness and resuming. The model is initialised from --global-seed (the same for any
number of processes). Epoch e visits the images in a permutation seeded by (seed, e), with a
flip bit per image; global batch i of the epoch is its i-th slice of --global-batch-size
images, of which rank r takes the r-th part. Timesteps and noise of the whole global batch
come from a generator seeded by (seed, step). So the data and noise of a step do not depend
on the number of processes, and a resumed run draws exactly what the uninterrupted one would.
Drop path and label dropout use each rank's default generator, seeded with
global_seed * world_size + rank as in DiT, whose states are saved in checkpoints.

Checkpoints (results/NNN-DiS-S-2/checkpoints/SSSSSSS.pt, written atomically) are plain dicts,
loadable with torch.load(weights_only=True):
  model, ema            state dicts (EMA in float32)
  opt, scheduler        AdamW and LambdaLR state dicts
  step                  optimizer steps taken
  args                  vars(args) with the defaults resolved (image size, classes, VAE, ...)
  config                model.DiS(**config) rebuilds the network (sample.py uses it)
  rng                   per rank: {"cpu": ByteTensor, "cuda": ByteTensor or None}
  data                  {seed, epoch, batch_in_epoch, dataset_size, global_batch_size}
  loss_curve, nonfinite [[step, mean loss], ...] per --log-every, and the count of skipped steps
--resume PATH|auto restores all of it (the run's folder is reused), so the run continues as if
never stopped; only operational flags (RESUME_FROM_COMMAND_LINE) may change. SIGTERM and
SIGINT save a checkpoint at the next step boundary and exit; --max-minutes stops cleanly
with a checkpoint and a final grid. A step whose loss or gradient is not finite on any rank
is skipped on all ranks (its batch is consumed; weights, optimizer, EMA and learning-rate
schedule stay); more than --max-nonfinite in a row stop the run with a checkpoint.

The run folder also holds log.txt (loss, gradient norm, lr, img/s, peak memory), run.json
(arguments, seeds per rank, library versions of every launch), samples/SSSSSSS.png (EMA
model, DDIM 25 steps, classifier-free guidance --sample-cfg, one class per row; every
--sample-every steps and at the end) and loss.png.
"""
import argparse
import functools
import gzip
import json
import logging
import math
import os
import platform
import signal
import sys
import time
from copy import deepcopy
from glob import glob
from importlib import metadata

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import model as dis
from diffusion import create_diffusion
from data import load_vae, resolve_vae, vae_downsampling
from diffusion import generate
from distributed import barrier, derived_seed, process_group
from scan import BACKENDS, OUR_KERNELS, active_scan_backend, set_scan_backend
from storage import grid_labels, load_checkpoint, model_config, save_grid, to_uint8, write_atomically, write_text

# name: (default image size, default classes); None: from the data
DATASETS = {"fashion-mnist": (32, 10), "cifar10": (32, 0), "celeba": (64, 0), "imagenet": (256, None),
            "folder": (None, None), "latents": (None, None)}
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
DOWNLOAD_ROOT = "data"
CELEBA_BOX = (25, 57, 153, 185)  # (left, top, right, bottom) of the face crop in an aligned 178x218 image
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_STEPS = 500_000  # the paper's CIFAR-10 / CelebA schedule
GRID_RESPACING = "ddim25"
RESUME_FROM_COMMAND_LINE = {  # may differ from the checkpoint's values; everything else is the run's
    "resume", "results_dir", "data_path", "download", "num_workers", "cache_dir", "max_steps", "epochs",
    "max_minutes", "log_every", "ckpt_every", "sample_every", "sample_cfg", "precision", "compile", "compile_mode",
    "grad_checkpointing", "scan_backend", "scan_save_every", "device", "max_nonfinite", "fid_ref", "fid_samples",
    "inception_weights"}

log = logging.getLogger("dis.train")


# ----------------------------------------------------------------------------- datasets

class TensorImages:
    """Images kept as uint8 (N, C, H, W) on the training device, with labels (N,) or None.
    Batches are gathered, flipped and scaled to [-1, 1] there: no loader processes."""

    def __init__(self, images, labels, device):
        self.images = images.to(device)
        self.labels = None if labels is None else labels.long()
        self.device_labels = None if labels is None else self.labels.to(device)

    def __len__(self):
        return len(self.images)

    def get(self, idx, flip, device):
        idx = idx.to(device)
        x = self.images[idx].float().div_(127.5).sub_(1)
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        return x, (self.device_labels[idx] if self.labels is not None else torch.zeros_like(idx))


class LatentArray:
    """Latents (N, 2, C, h, w) (axis 1: image, mirror image) or (N, C, h, w), memory-mapped,
    with labels (N,) or None. A batch reads only its rows."""

    def __init__(self, latents, labels):
        self.latents, self.labels = latents, labels

    def __len__(self):
        return len(self.latents)

    def get(self, idx, flip, device):
        rows = idx.numpy()
        z = self.latents[rows, flip.long().numpy()] if self.latents.ndim == 5 else self.latents[rows]
        y = self.labels[idx] if self.labels is not None else torch.zeros_like(idx)
        return torch.from_numpy(np.asarray(z, dtype=np.float32)).to(device), y.to(device)


class ImageFiles(Dataset):
    """Image files, read by DataLoader workers: item (index, flip) -> ((3, S, S) in [-1, 1], label).
    `crop` maps an RGB PIL image to the S x S training image."""

    def __init__(self, paths, labels, crop):
        self.paths, self.crop = paths, crop
        self.labels = None if labels is None else torch.tensor(labels)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, flip = item
        for index in range(index, index + len(self.paths)):  # an unreadable file: take the next one
            path = self.paths[index % len(self.paths)]
            try:
                with Image.open(path) as image:
                    arr = np.asarray(self.crop(image.convert("RGB")))
                break
            except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
                log.warning(f"skipping unreadable image {path}: {e}")
        else:
            raise OSError(f"none of the {len(self.paths)} images is readable")
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1)
        label = int(self.labels[index % len(self.paths)]) if self.labels is not None else 0
        return (x.flip(-1) if flip else x), label


def read_idx(path):
    """An IDX file (the MNIST format, gzipped) -> uint8 numpy array of the shape in its header."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise SystemExit(f"{path} is not a gzipped IDX file of unsigned bytes")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def resize_uint8(images, size):
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8 by antialiased bilinear resampling."""
    if images.shape[-1] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def load_fashion_mnist(args):
    """Fashion-MNIST training set -> (60000, 1, S, S) uint8 (28x28 padded to 32 with black, then
    resized to S) and labels (60000,)."""
    if args.data_path:
        roots = [args.data_path, os.path.join(args.data_path, "FashionMNIST", "raw")]
    else:
        roots = [FASHION_MNIST_DEBIAN, os.path.join(DOWNLOAD_ROOT, "FashionMNIST", "raw")]
    found = next((r for r in roots if all(os.path.isfile(os.path.join(r, f)) for f in FASHION_MNIST_FILES)), None)
    if found is None and args.download:
        import torchvision
        root = args.data_path or DOWNLOAD_ROOT
        try:
            torchvision.datasets.FashionMNIST(root, train=True, download=True)
            found = os.path.join(root, "FashionMNIST", "raw")
        except (OSError, RuntimeError):  # no network (URLError is an OSError) or a failed checksum
            pass
    if found is None:
        raise SystemExit(f"Fashion-MNIST not found: looked for {' and '.join(FASHION_MNIST_FILES)} in "
                         f"{' and '.join(roots)}{' and the download failed' if args.download else ''}; install it with "
                         f"`apt-get install dataset-fashion-mnist` or pass --data-path DIR with the IDX .gz files")
    images = torch.from_numpy(read_idx(os.path.join(found, FASHION_MNIST_FILES[0])).copy())[:, None]
    labels = torch.from_numpy(read_idx(os.path.join(found, FASHION_MNIST_FILES[1])).copy())
    return resize_uint8(F.pad(images, (2, 2, 2, 2)), args.image_size), labels, found


def load_cifar10(args):
    """CIFAR-10 training set -> (50000, 3, S, S) uint8 and labels (50000,)."""
    import torchvision
    root = args.data_path or DOWNLOAD_ROOT
    try:
        data = torchvision.datasets.CIFAR10(root, train=True, download=args.download)
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"CIFAR-10 not found in {os.path.abspath(root)} (cifar-10-batches-py) "
                         f"{'and the download failed' if args.download else 'and --no-download'} ({type(e).__name__}); "
                         f"pass --data-path to the folder that holds cifar-10-batches-py")
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2)
    return resize_uint8(images, args.image_size), torch.tensor(data.targets), root


def center_crop_arr(image, size):
    """ADM's center crop: halve with a box filter while the short side is >= 2 size, resize the
    short side to `size` (bicubic), cut the central size x size square."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top: top + size, left: left + size])


def celeba_crop(image, size):
    """The CelebA 64x64 crop (see the module docstring); other image sizes get ADM's center crop."""
    if image.size != (178, 218):
        return center_crop_arr(image, size)
    return image.crop(CELEBA_BOX).resize((size, size), resample=Image.BILINEAR)


def list_images(root):
    """Sorted image paths under root, recursively."""
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS))


def load_image_files(args):
    """celeba / imagenet / folder -> ImageFiles (labels from the class folders for the latter two)."""
    root = args.data_path
    if not root or not os.path.isdir(root):
        raise SystemExit(f"--dataset {args.dataset} needs --data-path, a folder of images"
                         f"{' in class subfolders (DIR/CLASS/IMAGE)' if args.dataset != 'celeba' else ''}; "
                         f"{root!r} is not a folder")
    if args.dataset == "celeba":
        paths, labels = list_images(root), None
        for partition in (os.path.join(root, "list_eval_partition.txt"),
                          os.path.join(os.path.dirname(os.path.abspath(root)), "list_eval_partition.txt")):
            if os.path.isfile(partition):
                with open(partition) as f:
                    train = {line.split()[0] for line in f if line.split()[1:] == ["0"]}
                paths = [p for p in paths if os.path.basename(p) in train]
                break
        crop = functools.partial(celeba_crop, size=args.image_size)
    else:
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        files = [(p, c) for c, name in enumerate(classes) for p in list_images(os.path.join(root, name))]
        paths, labels = [p for p, _ in files], [c for _, c in files]
        crop = functools.partial(center_crop_arr, size=args.image_size)
    if not paths:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}"
                         f"{'' if args.dataset == 'celeba' else ' in class subfolders DIR/CLASS/IMAGE'}")
    return ImageFiles(paths, labels, crop)


def load_latent_array(folder):
    """A folder with latents.npy (and labels.npy) -> LatentArray (memory-mapped)."""
    path = os.path.join(folder or "", "latents.npy")
    if not folder or not os.path.isfile(path):
        raise SystemExit(f"--dataset latents needs --data-path DIR with latents.npy, float (N, 2, C, h, w) or "
                         f"(N, C, h, w), and optionally labels.npy (N,); none at {path!r} (--cache-latents writes one)")
    latents = np.load(path, mmap_mode="r")
    square = latents.ndim in (4, 5) and latents.shape[-1] == latents.shape[-2]
    if not square or (latents.ndim == 5 and latents.shape[1] != 2):
        raise SystemExit(f"{path} has shape {latents.shape}; expected (N, 2, C, h, h) or (N, C, h, h)")
    labels_path = os.path.join(folder, "labels.npy")
    labels = torch.from_numpy(np.load(labels_path).astype(np.int64)) if os.path.isfile(labels_path) else None
    if labels is not None and labels.shape != (len(latents),):
        raise SystemExit(f"{labels_path} has shape {tuple(labels.shape)}; expected ({len(latents)},)")
    return LatentArray(latents, labels)


def load_dataset(args, device):
    """The training set at args.image_size: TensorImages, LatentArray or ImageFiles, and where it came from."""
    if args.dataset == "fashion-mnist":
        images, labels, where = load_fashion_mnist(args)
        return TensorImages(images, labels, device), where
    if args.dataset == "cifar10":
        images, labels, where = load_cifar10(args)
        return TensorImages(images, labels, device), where
    if args.dataset == "latents":
        return load_latent_array(args.data_path), args.data_path
    return load_image_files(args), args.data_path


# ----------------------------------------------------------------------------- data order

def epoch_order(n, seed, epoch):
    """The visiting order of one epoch, the same on every rank: a permutation (n,) and flip bits (n,)."""
    g = torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch))
    return torch.randperm(n, generator=g), torch.randint(0, 2, (n,), generator=g).bool()


def batch_plan(n, global_batch, rank, world, seed, start_step):
    """This rank's (indices, flips), each (B,), for every step from start_step on, forever.
    Rank r takes the r-th of `world` slices of each global batch; an epoch's last partial batch is dropped."""
    local, per_epoch = global_batch // world, n // global_batch
    loaded, step = None, start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        if loaded != epoch:
            (order, flips), loaded = epoch_order(n, seed, epoch), epoch
        start = i * global_batch + rank * local
        yield order[start: start + local], flips[start: start + local]
        step += 1


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGTERM/SIGINT to the main process, which stops at a step boundary."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def data_stream(source, plan, device, num_workers):
    """(x (B, C, H, W), labels (B,)) on `device` for each (indices, flips) of `plan`."""
    if not isinstance(source, ImageFiles):
        for idx, flip in plan:
            yield source.get(idx, flip, device)
        return
    batches = ([(int(i), bool(f)) for i, f in zip(idx, flip)] for idx, flip in plan)
    loader = DataLoader(source, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals)
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def step_noise(step, seed, global_batch, rank, world, shape, num_timesteps, device):
    """Timesteps (B,) and noise (B, *shape) of this rank's slice of the global batch at `step`;
    drawn for the whole global batch from a generator seeded by (seed, step)."""
    g = torch.Generator(device).manual_seed(derived_seed(seed, "noise", step))
    t = torch.randint(0, num_timesteps, (global_batch,), generator=g, device=device)
    noise = torch.randn(global_batch, *shape, generator=g, device=device)
    part = slice(rank * global_batch // world, (rank + 1) * global_batch // world)
    return t[part], noise[part]


# ----------------------------------------------------------------------------- latent space

@torch.no_grad()
def encode(vae, x, sample=True):
    """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, c, H/f, W/f): a posterior sample, or
    the posterior mean with sample=False. Grayscale images are replicated to RGB."""
    if x.shape[1] == 1 and vae.config.in_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    posterior = vae.encode(x).latent_dist
    return (posterior.sample() if sample else posterior.mean) * vae.config.scaling_factor


def build_latent_cache(source, vae, folder, args, rank, world, device):
    """Encode the dataset once into `folder` (latents.npy, labels.npy, meta.json; see the module
    docstring) unless it holds this exact cache already; returns a LatentArray over it. Rank r
    encodes chunks r, r + world, ... of the images into the shared memory-mapped array."""
    meta = dict(dataset=args.dataset, data_path=os.path.abspath(args.data_path or ""), image_size=args.image_size,
                vae=args.vae, count=len(source))
    meta_path, final = os.path.join(folder, "meta.json"), os.path.join(folder, "latents.npy")
    if os.path.isfile(meta_path) and read_json(meta_path) == meta:
        log.info(f"Using the latent cache in {folder}")
        return load_latent_array(folder)
    side = args.image_size // vae_downsampling(vae)
    partial_path = os.path.join(folder, "latents.partial.npy")
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        shape = (len(source), 2, vae.config.latent_channels, side, side)
        np.lib.format.open_memmap(partial_path, "w+", np.float16, shape)
    barrier()
    out = np.load(partial_path, mmap_mode="r+")
    chunk = args.global_batch_size // world
    starts = range(rank * chunk, len(source), world * chunk)
    plan = ((torch.arange(s, min(s + chunk, len(source))), torch.zeros(min(chunk, len(source) - s), dtype=torch.bool))
            for s in starts)
    stream = data_stream(source, plan, device, args.num_workers)
    for start, (x, _) in zip(starts, tqdm(stream, total=len(starts), desc="encoding latents", disable=rank != 0)):
        for mirrored in (0, 1):
            z = encode(vae, x.flip(-1) if mirrored else x, sample=False)
            out[start: start + len(x), mirrored] = z.cpu().numpy()
    out.flush()
    del out
    barrier()
    if rank == 0:
        if source.labels is not None:
            np.save(os.path.join(folder, "labels.npy"), source.labels.numpy())
        os.replace(partial_path, final)
        write_text(meta_path, json.dumps(meta))
        log.info(f"Encoded {len(source):,} images (and their mirror images) into {final}")
    barrier()
    return load_latent_array(folder)


# ----------------------------------------------------------------------------- optimisation

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


def checkpoint_blocks(model):
    """Gradient checkpointing: each block's activations are recomputed in the backward pass
    instead of kept (the module tree and state dict stay as they are)."""
    for block in model.blocks():
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


# ----------------------------------------------------------------------------- the run folder

def read_json(path):
    with open(path) as f:
        return json.load(f)


def new_run_dir(results_dir, model_name):
    """results_dir/NNN-DiS-S-2 with NNN one above the highest existing index (DiT's layout)."""
    os.makedirs(results_dir, exist_ok=True)
    taken = [int(d[:3]) for d in os.listdir(results_dir) if d[:3].isdigit()]
    path = os.path.join(results_dir, f"{max(taken, default=-1) + 1:03d}-{model_name.replace('/', '-')}")
    os.makedirs(os.path.join(path, "checkpoints"))
    return path


def find_resume(args):
    """--resume PATH, or with 'auto' the newest checkpoint of the newest run of --model in
    --results-dir (None when there is none yet)."""
    if args.resume != "auto":
        if not os.path.isfile(args.resume):
            raise SystemExit(f"--resume {args.resume}: no such checkpoint")
        return args.resume
    found = sorted(glob(os.path.join(args.results_dir, f"[0-9][0-9][0-9]-{args.model.replace('/', '-')}",
                                     "checkpoints", "[0-9]*.pt")))
    return found[-1] if found else None


def resumed_args(args, saved, parser):
    """The checkpoint's arguments, with the operational ones from the command line; returns them
    and the command-line values that were ignored."""
    merged, ignored = dict(saved), []
    for key, value in vars(args).items():
        if key in RESUME_FROM_COMMAND_LINE or key not in saved:
            merged[key] = value
        elif value != parser.get_default(key) and value != saved[key]:
            ignored.append(f"--{key.replace('_', '-')} {value} (the run's value: {saved[key]})")
    return argparse.Namespace(**merged), ignored


class TqdmHandler(logging.StreamHandler):
    """Prints log lines above the progress bar instead of through it."""

    def emit(self, record):
        tqdm.write(self.format(record))


LOG_FORMAT = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")


def setup_logging(rank):
    """Rank 0 logs to stdout (and, once log_to_file is called, log.txt); other ranks print warnings."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = TqdmHandler() if rank == 0 else logging.StreamHandler(sys.stderr)
    handler.setFormatter(LOG_FORMAT)
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.addHandler(handler)


def log_to_file(run_dir, rank):
    if rank == 0:
        handler = logging.FileHandler(os.path.join(run_dir, "log.txt"))
        handler.setFormatter(LOG_FORMAT)
        log.addHandler(handler)


def library_versions():
    versions = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for name in ("torch", "torchvision", "numpy", "pillow", "diffusers", "triton", "mamba-ssm", "causal-conv1d"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def record_launch(run_dir, args, world, device, backend, step):
    """Append this launch (arguments, seeds per rank, device, library versions) to run_dir/run.json."""
    path = os.path.join(run_dir, "run.json")
    launches = read_json(path) if os.path.isfile(path) else []
    launches.append(dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv, start_step=step, args=vars(args),
                         world_size=world, model_init_seed=args.global_seed,
                         rank_seeds=[rank_seed(args.global_seed, r, world) for r in range(world)], device=str(device),
                         gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                         scan_backend=backend, versions=library_versions()))
    write_text(path, json.dumps(launches, indent=1))


def rng_states(world, device):
    """Every rank's default generator states, gathered on all ranks: [{"cpu", "cuda"}] by rank."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(path, state, rank, world, device):
    """Write the checkpoint dict (plus every rank's RNG state) atomically from rank 0."""
    state["rng"] = rng_states(world, device)
    if rank == 0:
        write_atomically(path, lambda f: torch.save(state, f))
        log.info(f"Saved checkpoint {path}")
    barrier()


def draw_loss_curve(points, path, width=720, height=400):
    """Mean training loss against step, loss on a log scale, drawn with PIL into a PNG."""
    points = [(s, v) for s, v in points if v > 0 and math.isfinite(v)]
    if len(points) < 2:
        return
    left, right, top, bottom = 64, 16, 28, 36
    s0, s1 = points[0][0], points[-1][0]
    logs = [math.log10(v) for _, v in points]
    lo, hi = min(logs), max(logs) + 1e-9
    x_of = lambda s: left + (s - s0) / max(1, s1 - s0) * (width - left - right)
    y_of = lambda v: top + (hi - v) / (hi - lo) * (height - top - bottom)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for v in (lo, (lo + hi) / 2, hi):
        draw.line([(left - 4, y_of(v)), (left, y_of(v))], fill="black")
        draw.text((4, y_of(v) - 6), f"{10 ** v:.3g}", fill="black")
    for s in (s0, (s0 + s1) // 2, s1):
        draw.line([(x_of(s), height - bottom), (x_of(s), height - bottom + 4)], fill="black")
        draw.text((x_of(s) - 12, height - bottom + 8), str(s), fill="black")
    draw.line([(x_of(s), y_of(v)) for (s, _), v in zip(points, logs)], fill=(31, 119, 180), width=2)
    draw.text((left, 8), "training loss (log scale) against step", fill="black")
    write_atomically(path, lambda f: image.save(f, format="PNG"))


class StopSignals:
    """Remembers a SIGTERM/SIGINT; the training loop stops at the next step boundary, on every
    rank at once, and saves a checkpoint. A second signal acts as it normally would."""

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        self.received = signum
        self.restore()

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- training

def resolve_data_args(args, source):
    """Fill in the dataset-dependent defaults (--num-classes) and check labels against them."""
    default_classes = DATASETS[args.dataset][1]
    available = 0 if source.labels is None else int(source.labels.max()) + 1
    if args.num_classes is None:
        args.num_classes = available if default_classes is None else default_classes
    if args.num_classes > 0 and source.labels is None:
        raise SystemExit(f"--num-classes {args.num_classes}, but --dataset {args.dataset} at {args.data_path} has no "
                         f"labels; pass --num-classes 0 for an unconditional model")
    if 0 < args.num_classes < available:
        raise SystemExit(f"the labels go up to {available - 1}, more than --num-classes {args.num_classes} allows")


def prepare_data(args, rank, world, device):
    """Load the data and the VAE, resolve the data-dependent arguments; returns (source, vae,
    model input (channels, side), whether to encode batches on the fly, where the data came from)."""
    default_size = DATASETS[args.dataset][0]
    if args.dataset == "latents":
        args.vae = resolve_vae(args.vae, math.inf)  # latents imply latent space
        if args.vae == "none":
            raise SystemExit("--dataset latents is latent space: pass --vae auto, ema, mse, a hub id or a folder")
    else:
        args.image_size = args.image_size or default_size
        if args.image_size is None:
            raise SystemExit(f"--dataset {args.dataset} needs --image-size")
        args.vae = resolve_vae(args.vae, args.image_size)
    latent = args.vae != "none"
    # The VAE: to encode images, and to decode the sample grids (which --dataset latents may skip).
    needs_vae = latent and (args.dataset != "latents" or args.sample_every or args.fid_ref)
    vae = load_vae(args.vae, device) if needs_vae else None
    factor = vae_downsampling(vae) if vae else 8  # without a VAE (--dataset latents): assume Stable Diffusion's
    source, where = load_dataset(args, device)
    resolve_data_args(args, source)
    if args.dataset == "latents":
        channels, side = source.latents.shape[-3], source.latents.shape[-1]
        if vae is not None and args.image_size not in (None, side * factor):
            raise SystemExit(f"the latents are {side}x{side}, which decode to {side * factor}x{side * factor} images, "
                             f"not --image-size {args.image_size}")
        args.image_size = args.image_size or side * factor
        if vae is not None and vae.config.latent_channels != channels:
            raise SystemExit(f"the latents have {channels} channels but the VAE {args.vae} makes "
                             f"{vae.config.latent_channels}")
        return source, vae, (channels, side), False, where
    channels = source.images.shape[1] if isinstance(source, TensorImages) else 3
    if not latent:
        return source, None, (channels, args.image_size), False, where
    if args.image_size % factor:
        raise SystemExit(f"--image-size {args.image_size} is not divisible by the VAE's downsampling factor {factor}")
    if channels != vae.config.in_channels and not (channels == 1 and vae.config.in_channels == 3):
        raise SystemExit(f"the images have {channels} channels but the VAE {args.vae} takes {vae.config.in_channels}")
    latent_shape = (vae.config.latent_channels, args.image_size // factor)
    if not args.cache_latents:
        return source, vae, latent_shape, True, where
    folder = args.cache_dir or os.path.join(
        args.results_dir, "latent-cache", f"{args.dataset}-{args.image_size}-{os.path.basename(args.vae.rstrip('/'))}")
    return build_latent_cache(source, vae, folder, args, rank, world, device), vae, latent_shape, False, folder


def resolve_run(args, parser, world, device):
    """The run's arguments (the checkpoint's when resuming), the checkpoint or None, its path,
    and the command-line values a resumed run ignores. Checks what can fail before training."""
    resume_path = find_resume(args) if args.resume else None
    ckpt = load_checkpoint(resume_path, mmap=True) if resume_path else None
    ignored = []
    if ckpt is not None:
        args, ignored = resumed_args(args, ckpt["args"], parser)
    if args.global_batch_size % world:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} processes")
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.fid_ref:
        import fid
        if not os.path.exists(args.fid_ref):
            raise SystemExit(f"--fid-ref {args.fid_ref}: no such file or folder")
        try:
            fid.find_weights(args.inception_weights)
        except fid.FIDError as e:
            raise SystemExit(f"--fid-ref needs the Inception weights: {e}")
    return args, ckpt, resume_path, ignored


def open_run_dir(args, resume_path, rank, world):
    """The resumed run's folder (when its checkpoint sits in RUN/checkpoints/), else a new one."""
    if resume_path and os.path.basename(os.path.dirname(resume_path)) == "checkpoints":
        return os.path.dirname(os.path.dirname(resume_path))
    run_dir = new_run_dir(args.results_dir, args.model) if rank == 0 else None
    if world > 1:
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    return run_dir


def oom_advice(args, backend):
    """What to change after running out of GPU memory, for this run's settings. Our scans (Triton,
    CUDA) keep float32 chunk states for their backward pass: on an H100, DiS-H/2 at 32 images needs
    --scan-save-every 2 (64 GB) or --grad-checkpointing (25 GB, slower); mamba-ssm's kernel saves
    less but runs slower (BENCHMARKS.md)."""
    advice = ["lower --global-batch-size"]
    if backend in OUR_KERNELS and args.scan_save_every == 1:
        advice.append("add --scan-save-every 2")
    if not args.grad_checkpointing:
        advice.append("add --grad-checkpointing")
    if args.precision == "fp32":
        advice.append("use --precision bf16")
    if backend in OUR_KERNELS:
        advice.append("use --scan-backend mamba (slower, less memory)")
    return ", ".join(advice[:-1]) + " or " + advice[-1] if len(advice) > 1 else advice[0]


def build_model(config, ckpt, args, device, world):
    """(the DiS, its EMA copy, the module to call: DDP-wrapped with several processes). Initialised
    from the global seed, so identically for any number of processes; or loaded from ckpt."""
    torch.manual_seed(args.global_seed)
    model = dis.DiS(**config)
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


def rank_seed(global_seed, rank, world):
    """DiT's per-rank seed, global_seed * world_size + rank."""
    return global_seed * world + rank


def restore_rng(ckpt, args, rank, world, device, step):
    """Drop path and label dropout draw from each rank's default generator: restore it from the
    checkpoint, else seed it with rank_seed (DiT's per-rank seed)."""
    if ckpt is not None and len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
        return
    if ckpt is not None:
        log.warning(f"the run had {len(ckpt['rng'])} processes, now {world}: drop path and label dropout are reseeded")
    seed = rank_seed(args.global_seed, rank, world)
    torch.manual_seed(seed if step == 0 else derived_seed(seed, step))


class Meter:
    """Mean loss and gradient norm since the last log line; images/s over training time only."""

    def __init__(self, step):
        self.loss = self.norm = 0.0
        self.steps = 0
        self.restart(step)

    def add(self, loss, norm):
        self.loss, self.norm, self.steps = self.loss + loss, self.norm + norm, self.steps + 1

    def restart(self, step):
        """Start timing anew (after a log line, a checkpoint or a grid)."""
        self.time, self.step = time.time(), step

    def read(self, step, batch):
        """(mean loss, mean gradient norm, images/s) since the last read; resets the means."""
        means = (self.loss / self.steps, self.norm / self.steps) if self.steps else (math.nan, math.nan)
        images_per_s = (step - self.step) * batch / (time.time() - self.time)
        self.loss = self.norm = 0.0
        self.steps = 0
        self.restart(step)
        return (*means, images_per_s)


def set_scan_save_every(every, device):
    """--scan-save-every: our scans (Triton, CUDA) keep the state of every `every`-th chunk for their
    backward pass (1/every of that memory, for recomputing the chunks in between)."""
    if every < 1:
        raise SystemExit(f"--scan-save-every must be at least 1, got {every}")
    if every == 1:
        return
    backend = active_scan_backend(device, say=log.info)
    if backend not in OUR_KERNELS:
        raise SystemExit(f"--scan-save-every applies to our Triton and CUDA scans; this run uses the {backend} scan")
    import scan_triton
    scan_triton.SCAN_SAVE_EVERY = every


def train(args, parser, rank, world, device):
    setup_logging(rank)
    set_scan_backend(args.scan_backend)
    set_scan_save_every(args.scan_save_every, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    args, ckpt, resume_path, ignored = resolve_run(args, parser, world, device)
    source, vae, (channels, side), encode_batches, data_where = prepare_data(args, rank, world, device)
    config = ckpt["config"] if ckpt else model_config(
        args.model, side, channels, args.num_classes, args.embed_dim, args.depth, learn_sigma=args.learn_sigma,
        drop_path_rate=args.drop_path_rate, class_dropout_prob=args.class_dropout_prob, skip=args.skip,
        cond=args.cond, dt_init=args.dt_init)
    n, batch = len(source), args.global_batch_size
    per_epoch = n // batch
    if per_epoch == 0:
        raise SystemExit(f"the dataset has {n} images, fewer than --global-batch-size {batch}")
    ends = [s for s in (args.max_steps, args.epochs and args.epochs * per_epoch) if s]
    total_steps = min(ends) if ends else DEFAULT_STEPS

    run_dir = open_run_dir(args, resume_path, rank, world)
    log_to_file(run_dir, rank)
    log.info(f"{'Resuming ' + resume_path if ckpt else 'New run'} in {run_dir}")
    for flag in ignored:
        log.warning(f"ignoring {flag}: a resumed run keeps its settings")
    model, ema, ddp = build_model(config, ckpt, args, device, world)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, warmup=args.warmup_steps, total=total_steps))
    step, curve, nonfinite = 0, [], 0
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, curve, nonfinite = ckpt["step"], ckpt["loss_curve"], ckpt["nonfinite"]
        if ckpt["data"]["dataset_size"] != n:
            log.warning(f"the dataset has {n} images, the run had {ckpt['data']['dataset_size']}: "
                        f"the data order changes")
    restore_rng(ckpt, args, rank, world, device, step)
    del ckpt  # its tensors are copied into the model and optimizer
    diffusion = create_diffusion("", learn_sigma=config["learn_sigma"])
    grid_diffusion = create_diffusion(GRID_RESPACING, learn_sigma=config["learn_sigma"])

    backend = active_scan_backend(device, say=log.info)
    params = sum(p.numel() for p in model.parameters())
    space = f"latent space ({args.vae})" if args.vae != "none" else "pixel space"
    log.info(f"{args.model} (D={config['embed_dim']}, depth {config['depth']}), {params:,} parameters, "
             f"input {channels}x{side}x{side}, {args.num_classes} classes, {space}")
    log.info(f"Data: {args.dataset}, {n:,} images from {data_where}; {per_epoch:,} steps per epoch; "
             f"{total_steps:,} steps of {batch} on {world} process(es), {device}; scan backend {backend}; "
             f"{args.precision}{', gradient checkpointing' if args.grad_checkpointing else ''}"
             f"{f', scan states every {args.scan_save_every} chunks' if args.scan_save_every > 1 else ''}"
             f"{', compiled' if args.compile else ''}")
    if rank == 0:
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        record_launch(run_dir, args, world, device, backend, step)

    def state():
        return dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                    scheduler=scheduler.state_dict(), step=step, args=vars(args), config=config,
                    data=dict(seed=args.global_seed, epoch=step // per_epoch, batch_in_epoch=step % per_epoch,
                              dataset_size=n, global_batch_size=batch),
                    loss_curve=curve, nonfinite=nonfinite)

    ckpt_path = lambda: os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
    labels, count = grid_labels(args.num_classes)
    grid_noise = torch.randn(count, channels, side, side, generator=torch.Generator().manual_seed(args.global_seed))
    bf16 = args.precision == "bf16"

    def write_grid():
        if rank == 0:
            images = generate(ema, grid_diffusion, grid_noise.to(device), None if labels is None else labels.to(device),
                              args.sample_cfg, "ddim", vae, bf16=bf16)
            text = json.dumps(dict(step=step, sampler=GRID_RESPACING, cfg_scale=args.sample_cfg, weights="ema"))
            save_grid(to_uint8(images), os.path.join(run_dir, "samples", f"{step:07d}.png"), 10, text)
            draw_loss_curve(curve, os.path.join(run_dir, "loss.png"))
        barrier()

    stream = data_stream(source, batch_plan(n, batch, rank, world, args.global_seed, step), device, args.num_workers)
    model_params, ema_params = list(model.parameters()), list(ema.parameters())
    stop, meter = StopSignals(), Meter(step)
    stop_reason, in_a_row, saved_at, started = None, 0, None, time.time()
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, unit="step", dynamic_ncols=True)
    try:
        while step < total_steps:
            x, y = next(stream)
            if encode_batches:
                x = encode(vae, x)
            t, noise = step_noise(step, args.global_seed, batch, rank, world, (channels, side, side),
                                  diffusion.num_timesteps, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                terms = diffusion.training_losses(ddp, x, t, dict(y=y) if args.num_classes else None, noise)
            loss = terms["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model_params, args.max_grad_norm)
            # One all-reduce per step makes every rank agree on skipping and on stopping.
            over_time = args.max_minutes is not None and time.time() - started > 60 * args.max_minutes
            nonfinite_here = ~torch.isfinite(loss) | ~torch.isfinite(norm)
            flags = torch.cat([torch.stack([loss.detach(), norm, nonfinite_here]).float(),
                               torch.tensor([stop.received is not None, over_time], dtype=torch.float, device=device)])
            if world > 1:
                dist.all_reduce(flags)
            loss_sum, norm_sum, bad, signalled, timed_out = flags.tolist()
            if bad:
                nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
                log.warning(f"non-finite loss or gradient at step {step} ({in_a_row} in a row, {nonfinite} in all): "
                            f"update skipped on every rank")
            else:
                opt.step()
                scheduler.step()
                update_ema(ema_params, model_params, ema_decay(step, args.ema_decay))
                in_a_row = 0
                meter.add(loss_sum / world, norm_sum / world)
            step += 1
            bar.update(1)
            if in_a_row > args.max_nonfinite:
                save_checkpoint(ckpt_path(), state(), rank, world, device)
                raise SystemExit(f"{in_a_row} non-finite steps in a row (more than --max-nonfinite "
                                 f"{args.max_nonfinite}) at step {step}; checkpoint {ckpt_path()} holds the weights "
                                 f"before them; lower --lr or use --precision fp32, then --resume {ckpt_path()}")
            if step % args.log_every == 0 or step == total_steps:
                mean_loss, mean_norm, images_per_s = meter.read(step, batch)
                memory = f" peak_mem={torch.cuda.max_memory_allocated(device) / 1e9:.2f}GB" \
                    if device.type == "cuda" else ""
                log.info(f"step={step:07d} loss={mean_loss:.4f} grad_norm={mean_norm:.4f} "
                         f"lr={scheduler.get_last_lr()[0]:.3e} img/s={images_per_s:.1f}{memory} nonfinite={nonfinite}")
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_per_s:.0f}")
                if math.isfinite(mean_loss):
                    curve.append([step, mean_loss])
            stop_reason = "signal" if signalled else "time" if timed_out else None
            if step % args.ckpt_every == 0 or stop_reason:
                save_checkpoint(ckpt_path(), state(), rank, world, device)
                saved_at = step
            if args.sample_every and step % args.sample_every == 0 and stop_reason != "signal":
                write_grid()
            if stop_reason:
                break
            if saved_at == step or (args.sample_every and step % args.sample_every == 0):
                meter.restart(step)
    except torch.OutOfMemoryError:
        raise SystemExit(f"CUDA out of memory with {batch // world} images per GPU ({args.model}, {args.precision}, "
                         f"{backend} scan): {oom_advice(args, backend)}")
    finally:
        bar.close()
        stop.restore()
    if stop_reason == "signal":
        raise SystemExit(f"stopped by a signal at step {step}; continue with --resume {ckpt_path()}")
    if saved_at != step:
        save_checkpoint(ckpt_path(), state(), rank, world, device)
    if args.sample_every and step % args.sample_every:
        write_grid()
    if rank == 0:
        draw_loss_curve(curve, os.path.join(run_dir, "loss.png"))
    log.info(f"{'Time budget of --max-minutes reached' if stop_reason else 'Done'} at step {step} "
             f"after {(time.time() - started) / 60:.1f} minutes")
    if args.fid_ref:
        import sample
        sample.main(["--ckpt", ckpt_path(), "--num-samples", str(args.fid_samples), "--fid-ref", args.fid_ref,
                     "--sample-dir", os.path.join(run_dir, "fid"), "--scan-backend", args.scan_backend,
                     "--precision", args.precision, "--seed", str(args.global_seed)]
                    + (["--inception-weights", args.inception_weights] if args.inception_weights else []))
    return run_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=list(DATASETS), default="fashion-mnist")
    data.add_argument("--data-path", default=None, help="see the module docstring for what each dataset expects")
    data.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                      help="download fashion-mnist / cifar10 when missing")
    data.add_argument("--image-size", type=int, default=None, help="default: the dataset's (see the docstring)")
    data.add_argument("--num-classes", type=int, default=None, help="0 for unconditional; default: the dataset's")
    data.add_argument("--num-workers", type=int, default=4, help="loader processes for image files")
    data.add_argument("--vae", default="auto",
                      help="auto (latent space from 256 px), none, ema, mse, a hub id or an AutoencoderKL folder")
    data.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=False,
                      help="encode the dataset to latents once and train from that cache")
    data.add_argument("--cache-dir", default=None, help="default: RESULTS_DIR/latent-cache/DATASET-SIZE-VAE")
    net = parser.add_argument_group("model")
    net.add_argument("--model", choices=list(dis.DiS_models), default="DiS-S/2")
    net.add_argument("--embed-dim", type=int, default=None, help="override the hidden size of --model")
    net.add_argument("--depth", type=int, default=None, help="override the depth of --model")
    net.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True)
    net.add_argument("--skip", choices=["concat", "add", "none"], default="concat")
    net.add_argument("--cond", choices=["token", "adaln"], default="token")
    net.add_argument("--dt-init", choices=["symmetric", "original"], default="symmetric")
    net.add_argument("--drop-path-rate", type=float, default=0.1)
    net.add_argument("--class-dropout-prob", type=float, default=0.1)
    net.add_argument("--scan-backend", choices=["auto", *BACKENDS], default="auto")
    net.add_argument("--scan-save-every", type=int, default=1,
                     help="our scans (Triton, CUDA): keep the states of every Nth chunk for the backward pass (1/N of their "
                          "memory, more recomputation; 2 fits DiS-H/2 at 32 images on an 80 GB card)")
    net.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto: CUDA when available (one GPU per process under torchrun)")
    net.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    net.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    net.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                     help="torch.compile's mode with --compile; reduce-overhead adds CUDA graphs (see README)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--global-batch-size", type=int, default=128)
    optim.add_argument("--global-seed", type=int, default=0)
    optim.add_argument("--epochs", type=int, default=None)
    optim.add_argument("--max-steps", type=int, default=None,
                       help=f"with --epochs the earlier end wins; neither: {DEFAULT_STEPS:,} steps (the paper's)")
    optim.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this much training time")
    optim.add_argument("--lr", type=float, default=1e-4)
    optim.add_argument("--warmup-steps", type=int, default=1000, help="linear warm-up before the cosine decay")
    optim.add_argument("--max-grad-norm", type=float, default=1.0)
    optim.add_argument("--ema-decay", type=float, default=0.9999)
    optim.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    optim.add_argument("--max-nonfinite", type=int, default=10, help="stop after more non-finite steps in a row")
    run = parser.add_argument_group("run")
    run.add_argument("--results-dir", default="results")
    run.add_argument("--resume", default=None, metavar="PATH|auto")
    run.add_argument("--log-every", type=int, default=100)
    run.add_argument("--ckpt-every", type=int, default=50_000)
    run.add_argument("--sample-every", type=int, default=5_000, help="and at the end; 0: no sample grids")
    run.add_argument("--sample-cfg", type=float, default=1.5, help="guidance scale of the sample grids")
    run.add_argument("--fid-ref", default=None, help="after training, FID of --fid-samples EMA samples against this")
    run.add_argument("--fid-samples", type=int, default=10_000)
    run.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth for --fid-ref")
    args = parser.parse_args(argv)
    for name in ("global_batch_size", "log_every", "ckpt_every", "fid_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.compile_mode != "default" and not args.compile:
        parser.error(f"--compile-mode {args.compile_mode} takes effect with --compile; add --compile")
    return args, parser


def main(argv=None):
    args, parser = parse_args(argv)
    with process_group(args.device) as (rank, world, device):
        return train(args, parser, rank, world, device)


if __name__ == "__main__":
    main()
