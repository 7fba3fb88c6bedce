"""The training data: datasets, the order they are visited in, and the latent space.

Datasets (train.py --dataset, --data-path; default image size and classes in brackets)
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

Data order. Epoch e visits the images in a permutation seeded by (seed, e), with a flip bit per
image; global batch i of the epoch is its i-th slice of the global batch size, of which rank r
takes the r-th part; an epoch's last partial batch is dropped. So the data of a step does not
depend on the number of processes, and a resumed run reads exactly what the uninterrupted one
would.

Latent space (--vae): 'auto' trains in the latent space of Stable Diffusion's VAE
(stabilityai/sd-vae-ft-ema, downsampling 8, latents times 0.18215) from --image-size 256 up, in
pixel space below; 'none', 'ema', 'mse', a hub id or a local directory choose explicitly.
Without a cache each batch is encoded on the fly (a posterior sample, as DiT). --cache-latents
encodes the dataset once, every rank its share in parallel, into one memory-mapped float16
array: the posterior means (not a frozen sample, so the cache is deterministic) of each image
and of its mirror image, so that flips keep their 50% chance per step.
"""
import functools
import gzip
import json
import logging
import math
import os
import signal
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from distributed import barrier, derived_seed

# name: (default image size, default classes); None: from the data
DATASETS = {"fashion-mnist": (32, 10), "cifar10": (32, 0), "celeba": (64, 0), "imagenet": (256, None),
            "folder": (None, None), "latents": (None, None)}
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
DOWNLOAD_ROOT = "data"
CELEBA_BOX = (25, 57, 153, 185)  # (left, top, right, bottom) of the face crop in an aligned 178x218 image
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SD_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}  # DiT's --vae choices
LATENT_FROM = 256  # --vae auto: latent space from this image size up, as in the paper (ImageNet 256/512)

log = logging.getLogger("dis.data")


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
            except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ... for broken files
                log.warning(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
        else:
            raise OSError(f"none of the {len(self.paths)} images is readable (the last: {path})")
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1)
        label = int(self.labels[index % len(self.paths)]) if self.labels is not None else 0
        return (x.flip(-1) if flip else x), label


def read_idx(path):
    """An IDX file (the MNIST format, gzipped) -> uint8 numpy array of the shape in its header."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        if data[:3] != b"\x00\x00\x08":
            raise ValueError("no IDX header of unsigned bytes")
        ndim = data[3]
        shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise SystemExit(f"{path} is not a gzipped IDX file of unsigned bytes ({type(e).__name__}: {e})")


def resize_uint8(images, size):
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8 by antialiased bilinear resampling."""
    if images.shape[-1] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def load_fashion_mnist(data_path, image_size, download):
    """Fashion-MNIST training set -> (60000, 1, S, S) uint8 (28x28 padded to 32 with black, then
    resized to S), labels (60000,) and the folder it was read from."""
    if data_path:
        roots = [data_path, os.path.join(data_path, "FashionMNIST", "raw")]
    else:
        roots = [FASHION_MNIST_DEBIAN, os.path.join(DOWNLOAD_ROOT, "FashionMNIST", "raw")]
    found = next((r for r in roots if all(os.path.isfile(os.path.join(r, f)) for f in FASHION_MNIST_FILES)), None)
    if found is None and download:
        import torchvision
        root = data_path or DOWNLOAD_ROOT
        try:
            torchvision.datasets.FashionMNIST(root, train=True, download=True)
            found = os.path.join(root, "FashionMNIST", "raw")
        except (OSError, RuntimeError):  # no network (URLError is an OSError) or a failed checksum
            pass
    if found is None:
        raise SystemExit(f"Fashion-MNIST not found: looked for {' and '.join(FASHION_MNIST_FILES)} in "
                         f"{' and '.join(roots)}{' and the download failed' if download else ''}; install it with "
                         f"`apt-get install dataset-fashion-mnist` or pass --data-path DIR with the IDX .gz files")
    images = torch.from_numpy(read_idx(os.path.join(found, FASHION_MNIST_FILES[0])).copy())[:, None]
    labels = torch.from_numpy(read_idx(os.path.join(found, FASHION_MNIST_FILES[1])).copy())
    if images.dim() != 4 or images.shape[-2:] != (28, 28) or labels.shape != images.shape[:1]:
        raise SystemExit(f"{found} holds images {tuple(images.shape[:1] + images.shape[2:])} and labels "
                         f"{tuple(labels.shape)}; Fashion-MNIST has (N, 28, 28) and (N,)")
    return resize_uint8(F.pad(images, (2, 2, 2, 2)), image_size), labels, found


def load_cifar10(data_path, image_size, download):
    """CIFAR-10 training set -> (50000, 3, S, S) uint8, labels (50000,) and its folder."""
    import torchvision
    root = data_path or DOWNLOAD_ROOT
    try:
        data = torchvision.datasets.CIFAR10(root, train=True, download=download)
    except Exception as e:  # missing, a failed download, or a damaged pickle
        raise SystemExit(f"CIFAR-10 not found or unreadable in {os.path.abspath(root)} (cifar-10-batches-py) "
                         f"{'and the download failed' if download else 'and --no-download'} ({type(e).__name__}); "
                         f"pass --data-path to the folder that holds cifar-10-batches-py")
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2)
    return resize_uint8(images, image_size), torch.tensor(data.targets), root


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


def celeba_train_split(root, paths):
    """The paths in list_eval_partition.txt's train split (in or beside root), or all of them."""
    for partition in (os.path.join(root, "list_eval_partition.txt"),
                      os.path.join(os.path.dirname(os.path.abspath(root)), "list_eval_partition.txt")):
        if os.path.isfile(partition):
            with open(partition) as f:
                train = {line.split()[0] for line in f if line.split()[1:] == ["0"]}
            return [p for p in paths if os.path.basename(p) in train]
    return paths


def load_image_files(dataset, root, image_size):
    """celeba / imagenet / folder -> ImageFiles (labels from the class folders for the latter two)."""
    if not root or not os.path.isdir(root):
        raise SystemExit(f"--dataset {dataset} needs --data-path, a folder of images"
                         f"{' in class subfolders (DIR/CLASS/IMAGE)' if dataset != 'celeba' else ''}; "
                         f"{root!r} is not a folder")
    if dataset == "celeba":
        paths, labels = celeba_train_split(root, list_images(root)), None
        crop = functools.partial(celeba_crop, size=image_size)
    else:
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        files = [(p, c) for c, name in enumerate(classes) for p in list_images(os.path.join(root, name))]
        paths, labels = [p for p, _ in files], [c for _, c in files]
        crop = functools.partial(center_crop_arr, size=image_size)
    if not paths:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}"
                         f"{'' if dataset == 'celeba' else ' in class subfolders DIR/CLASS/IMAGE'}")
    return ImageFiles(paths, labels, crop)


def load_latent_array(folder):
    """A folder with latents.npy (and labels.npy) -> LatentArray (memory-mapped)."""
    path = os.path.join(folder or "", "latents.npy")
    if not folder or not os.path.isfile(path):
        raise SystemExit(f"--dataset latents needs --data-path DIR with latents.npy, float (N, 2, C, h, w) or "
                         f"(N, C, h, w), and optionally labels.npy (N,); none at {path!r} (--cache-latents writes one)")
    try:
        latents = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path} is not a readable .npy array ({type(e).__name__}: {e})")
    square = latents.ndim in (4, 5) and latents.shape[-1] == latents.shape[-2]
    if not square or (latents.ndim == 5 and latents.shape[1] != 2):
        raise SystemExit(f"{path} has shape {latents.shape}; expected (N, 2, C, h, h) or (N, C, h, h)")
    labels_path = os.path.join(folder, "labels.npy")
    labels = torch.from_numpy(np.load(labels_path).astype(np.int64)) if os.path.isfile(labels_path) else None
    if labels is not None and labels.shape != (len(latents),):
        raise SystemExit(f"{labels_path} has shape {tuple(labels.shape)}; expected ({len(latents)},)")
    return LatentArray(latents, labels)


def load_dataset(name, data_path, image_size, device, download=True):
    """The training set `name` (a key of DATASETS) at image_size: TensorImages, LatentArray or
    ImageFiles, and where it came from."""
    if name == "fashion-mnist":
        images, labels, where = load_fashion_mnist(data_path, image_size, download)
        return TensorImages(images, labels, device), where
    if name == "cifar10":
        images, labels, where = load_cifar10(data_path, image_size, download)
        return TensorImages(images, labels, device), where
    if name == "latents":
        return load_latent_array(data_path), data_path
    return load_image_files(name, data_path, image_size), data_path


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


# ----------------------------------------------------------------------------- latent space

def resolve_vae(name, image_size):
    """--vae value -> hub id or local directory of an AutoencoderKL, or 'none' for pixel space."""
    if name in (None, "auto"):
        return SD_VAES["ema"] if image_size >= LATENT_FROM else "none"
    return SD_VAES.get(name, name)


def load_vae(name, device):
    """A frozen diffusers AutoencoderKL from a hub id or a local directory (diffusers is only
    needed here, so pixel-space runs work without it)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise SystemExit("latent space needs diffusers: pip install diffusers (or use pixel space: --vae none)")
    try:
        vae = AutoencoderKL.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "this directory has no AutoencoderKL" if os.path.isdir(name) else \
            "it is no local directory and the Hugging Face hub could not provide it (offline?)"
        raise SystemExit(f"cannot load the VAE {name!r}: {where} ({type(e).__name__}); download it where you are "
                         f"online (huggingface-cli download {name} --local-dir DIR) and pass --vae DIR")
    return vae.to(device).eval().requires_grad_(False)


def vae_downsampling(vae):
    """Image side / latent side of an AutoencoderKL (8 for Stable Diffusion's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode(vae, x, sample=True):
    """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, c, H/f, W/f): a posterior sample, or
    the posterior mean with sample=False. Grayscale images are replicated to RGB."""
    if x.shape[1] == 1 and vae.config.in_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    posterior = vae.encode(x).latent_dist
    return (posterior.sample() if sample else posterior.mean) * vae.config.scaling_factor


def build_latent_cache(source, vae, folder, meta, chunk, num_workers, rank, world, device):
    """Encode the dataset once into `folder` (latents.npy, labels.npy, meta.json; see the module
    docstring) unless it holds the cache described by `meta` already; returns a LatentArray over
    it. Rank r encodes chunks r, r + world, ... of `chunk` images into the shared memory-mapped array."""
    meta_path, final = os.path.join(folder, "meta.json"), os.path.join(folder, "latents.npy")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                log.info(f"Using the latent cache in {folder}")
                return load_latent_array(folder)
    side = meta["image_size"] // vae_downsampling(vae)
    partial_path = os.path.join(folder, "latents.partial.npy")
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        shape = (len(source), 2, vae.config.latent_channels, side, side)
        np.lib.format.open_memmap(partial_path, "w+", np.float16, shape)
    barrier()
    out = np.load(partial_path, mmap_mode="r+")
    starts = range(rank * chunk, len(source), world * chunk)
    plan = ((torch.arange(s, min(s + chunk, len(source))), torch.zeros(min(chunk, len(source) - s), dtype=torch.bool))
            for s in starts)
    stream = data_stream(source, plan, device, num_workers)
    for start, (x, _) in zip(starts, tqdm(stream, total=len(starts), desc="encoding latents", unit="batch",
                                          disable=rank != 0)):
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
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f)
        os.replace(meta_path + ".tmp", meta_path)
        log.info(f"Encoded {len(source):,} images (and their mirror images) into {final}")
    barrier()
    return load_latent_array(folder)


# ----------------------------------------------------------------------------- training data

@dataclass
class TrainingData:
    """What train.py trains on: `source` (TensorImages, LatentArray or ImageFiles), the VAE or
    None, the model input (channels, side), whether batches are encoded on the fly, and where
    the data came from."""
    source: object
    vae: object
    channels: int
    side: int
    encode_batches: bool
    where: str


def resolve_classes(args, source):
    """Fill in --num-classes from the dataset and check the labels against it."""
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
    """Load the data (and the VAE, or a latent cache) for train.py's arguments; fills in their
    data-dependent defaults (image_size, vae, num_classes) in place. Returns TrainingData."""
    if args.dataset == "latents":
        args.vae = resolve_vae(args.vae, math.inf)  # latents imply latent space
        if args.vae == "none":
            raise SystemExit("--dataset latents is latent space: pass --vae auto, ema, mse, a hub id or a folder")
    else:
        args.image_size = args.image_size or DATASETS[args.dataset][0]
        if args.image_size is None:
            raise SystemExit(f"--dataset {args.dataset} needs --image-size")
        args.vae = resolve_vae(args.vae, args.image_size)
    latent = args.vae != "none"
    # The VAE: to encode images, and to decode the sample grids (which --dataset latents may skip).
    needs_vae = latent and (args.dataset != "latents" or args.sample_every or args.fid_ref)
    vae = load_vae(args.vae, device) if needs_vae else None
    factor = vae_downsampling(vae) if vae else 8  # without a VAE (--dataset latents): assume Stable Diffusion's
    source, where = load_dataset(args.dataset, args.data_path, args.image_size, device, args.download)
    resolve_classes(args, source)
    if args.dataset == "latents":
        channels, side = source.latents.shape[-3], source.latents.shape[-1]
        if vae is not None and args.image_size not in (None, side * factor):
            raise SystemExit(f"the latents are {side}x{side}, which decode to {side * factor}x{side * factor} images, "
                             f"not --image-size {args.image_size}")
        args.image_size = args.image_size or side * factor
        if vae is not None and vae.config.latent_channels != channels:
            raise SystemExit(f"the latents have {channels} channels but the VAE {args.vae} makes "
                             f"{vae.config.latent_channels}")
        return TrainingData(source, vae, channels, side, False, where)
    channels = source.images.shape[1] if isinstance(source, TensorImages) else 3
    if not latent:
        return TrainingData(source, None, channels, args.image_size, False, where)
    if args.image_size % factor:
        raise SystemExit(f"--image-size {args.image_size} is not divisible by the VAE's downsampling factor {factor}")
    if channels != vae.config.in_channels and not (channels == 1 and vae.config.in_channels == 3):
        raise SystemExit(f"the images have {channels} channels but the VAE {args.vae} takes {vae.config.in_channels}")
    latent_channels, side = vae.config.latent_channels, args.image_size // factor
    if not args.cache_latents:
        return TrainingData(source, vae, latent_channels, side, True, where)
    folder = args.cache_dir or os.path.join(
        args.results_dir, "latent-cache", f"{args.dataset}-{args.image_size}-{os.path.basename(args.vae.rstrip('/'))}")
    meta = dict(dataset=args.dataset, data_path=os.path.abspath(args.data_path or ""), image_size=args.image_size,
                vae=args.vae, count=len(source))
    micro_batch = args.global_batch_size // (world * args.grad_accum_steps)  # what the run fits at once
    cache = build_latent_cache(source, vae, folder, meta, micro_batch, args.num_workers, rank, world, device)
    return TrainingData(cache, vae, latent_channels, side, False, folder)
