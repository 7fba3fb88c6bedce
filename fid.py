"""FID, sFID, Inception Score, precision and recall from one pass of one Inception-v3.

Numbers follow the ADM evaluator (guided-diffusion, evaluations/evaluator.py), which the DiS paper
uses for its tables (Sec. 4, "Evaluation metrics"): the 2015-12-05 TensorFlow Inception graph, here
in its PyTorch port (the weights file of pytorch-fid), fed the same TF1-style resize, with the same
features (pool_3, the first 7 channels of mixed_6/conv, the unbiased logits) and the same metric
definitions.

    python fid.py SAMPLES REFERENCE          # folders of png/jpg, ADM .npz image batches, or .npz statistics
    python fid.py REFERENCE --save-stats ref_stats.npz

Data flow: images (N, H, W, 3) uint8, or grayscale (N, H, W, 1) replicated to 3 channels -> resize
to 299 -> Inception -> pool (N, 2048), spatial (N, 2023) -> mean and covariance (float64) -> metrics.
Both inputs are checked before the network's weights are looked for.
"""
import argparse
import contextlib
import hashlib
import os
import warnings
import zipfile
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE
from tqdm import tqdm

from cli import OneLineParser

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
WEIGHTS_SHA256_PREFIX = "6726825d"
MODES = ("adm", "pytorch-fid")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MIN_UNBIASED_IMAGES = 2048  # below the feature dimension the covariance is rank-deficient and FID is biased up
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
PR_NEIGHBOURS = 3  # k of the k-NN manifolds (Kynkaanniemi et al. 2019; ADM's nhood_sizes)


class FIDError(ValueError):
    """A problem with an argument, an input or the weights that the user can fix; the message names
    the argument and says what is accepted."""


# ----------------------------------------------------------------------------------------------
# Preprocessing: uint8 images -> (B, 3, 299, 299) float32 in [-1, 1]


def tf1_resize_matrix(in_size, out_size):
    """(out_size, in_size) float32 matrix of TF1 ResizeBilinear with align_corners=False.

    TF1 maps destination index x to source coordinate x * in/out (no half-pixel centres), taking
    both in float32, and clamps the upper neighbour at the border.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = src - lower.astype(np.float32)
    rows = np.arange(out_size)
    weights = np.zeros((out_size, in_size), dtype=np.float32)
    np.add.at(weights, (rows, lower), 1 - frac)
    np.add.at(weights, (rows, upper), frac)
    return torch.from_numpy(weights)


def tf1_resize(x, size):
    """(B, C, H, W) float -> (B, C, size, size), TF1 bilinear resize applied as two matrices."""
    rows = tf1_resize_matrix(x.shape[-2], size).to(x.device, x.dtype)
    cols = tf1_resize_matrix(x.shape[-1], size).to(x.device, x.dtype)
    return rows @ x @ cols.T


def preprocess(images, mode="adm"):
    """(B, H, W, 3) or grayscale (B, H, W, 1) uint8 images -> (B, 3, 299, 299) float32 network input.

    Grayscale is replicated to the three channels the network was trained on.
    adm: the graph's own ResizeBilinear then (x - 128) / 128, as the ADM evaluator feeds it.
    pytorch-fid: x / 255, F.interpolate (bilinear, half-pixel centres), then 2x - 1.
    """
    x = images.permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)
    if mode == "adm":
        return (tf1_resize(x, 299) - 128) / 128
    x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


# ----------------------------------------------------------------------------------------------
# The network: Inception-v3 as in the 2015-12-05 TF graph (pytorch-fid's port of it)


def tf_avg_pool(x):
    """3x3 average pool that, like TensorFlow's, divides by the number of non-padding inputs."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))]


class FIDInceptionC(InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        b7d = self.branch7x7dbl_5(self.branch7x7dbl_4(b7d))
        return [self.branch1x1(x), b7, b7d, self.branch_pool(tf_avg_pool(x))]


class FIDInceptionE(InceptionE):
    """The last two blocks; the graph's final one (mixed_10) max-pools its pool branch."""

    def __init__(self, in_channels, max_pool=False):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return [self.branch1x1(x), b3, b3d, self.branch_pool(pool)]


@contextlib.contextmanager
def fp32_precision(precision):
    """Float32 math without autocast, CUDA matmuls and convolutions in 'ieee' or 'tf32'; settings restored after."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = precision
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID graph: 1008 logits, no aux head; module names match the weights file.

    Built with PyTorch's default random init; `load_inception` loads the real weights.
    forward: (B, H, W, 3) or (B, H, W, 1) uint8 images -> dict of
        pool (B, 2048): pool_3, the FID and precision/recall features;
        spatial (B, 2023): mixed_6/conv[..., :7] flattened in (H, W, C) order, the sFID features;
        logits (B, 1008): pool @ fc.weight.T, without bias, as ADM's softmax graph computes them.
    """

    def __init__(self, mode="adm"):
        super().__init__()
        if mode not in MODES:
            raise FIDError(f"mode: {mode!r} is not one of {MODES}")
        self.mode = mode
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def logits(self, pool):
        """(B, 2048) pool features -> (B, 1008) logits without the bias (ADM's softmax/logits/MatMul)."""
        return pool @ self.fc.weight.T

    def forward(self, images):
        # IEEE float32 throughout: cuDNN's default TF32 would round every convolution input to 10 mantissa bits.
        with fp32_precision("ieee"):
            x = preprocess(images, self.mode)
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
                x = block(x)
            x = self.Mixed_6d(x)
            # An Inception block's output starts with its 1x1 branch: channels :7 are mixed_6/conv's first 7.
            spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)
            for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
                x = block(x)
            pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return {"pool": pool, "spatial": spatial, "logits": self.logits(pool)}


def one_line(error):
    """An exception's message on one line, for messages that quote it."""
    return " ".join(str(error).split())


def sha256_prefix(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[: len(WEIGHTS_SHA256_PREFIX)]


def find_weights(path=None):
    """Path of the weights file: `path`, else the torch hub cache, else downloaded into that cache."""
    if path is not None:
        if not os.path.isfile(path):
            raise FIDError(f"weights {path}: no such file; download {WEIGHTS_URL}")
    else:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)
        if not os.path.isfile(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(WEIGHTS_URL, path, hash_prefix=WEIGHTS_SHA256_PREFIX)
            except Exception as e:
                raise FIDError(
                    f"Inception weights missing and could not be downloaded ({type(e).__name__}: {one_line(e)}); "
                    f"download {WEIGHTS_URL} and put it at {path}, or pass --inception-weights PATH"
                ) from e
    try:
        found = sha256_prefix(path)
    except OSError as e:
        raise FIDError(f"weights {path}: cannot be read ({e.strerror})") from e
    if found != WEIGHTS_SHA256_PREFIX:
        raise FIDError(f"weights {path}: not {WEIGHTS_NAME} (SHA-256 starts {found}, not {WEIGHTS_SHA256_PREFIX})")
    return path


def load_inception(weights=None, mode="adm", device="cpu"):
    """FIDInceptionV3 with the 2015-12-05 weights (see find_weights), in eval mode on `device`."""
    net = FIDInceptionV3(mode)
    net.load_state_dict(torch.load(find_weights(weights), map_location="cpu", weights_only=True))
    return net.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------
# Inputs: each is checked when opened, before any weights are looked for, then read as an iterator
# of (B, H, W, C) uint8 numpy batches, C = 3 (RGB) or 1 (grayscale)


class Source(NamedTuple):
    """An opened input. label: the argument and path, for messages; stats: statistics stored in the
    file (mu, sigma, mu_s, sigma_s, pool, mode; maybe none); count, batches: None for a statistics file."""

    label: str
    stats: dict
    count: int | None
    batches: Iterator[np.ndarray] | None


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> (H, W, 3) uint8 arrays (grayscale and palette images converted to RGB), or, for
    a file that cannot be decoded, a message naming it, raised in the main process as one line."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return f"{self.files[i]} is not a readable image ({one_line(e)})"


def list_images(folder, label):
    """Sorted paths of the png/jpg files under `folder`, recursively."""
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise FIDError(f"{label}: no {'/'.join(IMAGE_EXTENSIONS)} images in the folder or below")
    return files


def folder_batches(files, batch_size, num_workers, label):
    """Decoded images in `files` order, (B, H, W, 3) uint8; all must have one size."""
    loader = torch.utils.data.DataLoader(ImageFiles(files), batch_size, num_workers=num_workers, collate_fn=list)
    size = None
    for batch in loader:
        for image in batch:
            if isinstance(image, str):
                raise FIDError(f"{label}: {image}")
            size = size or image.shape
            if image.shape != size:
                raise FIDError(f"{label}: images differ in size ({size[:2]} and {image.shape[:2]}); "
                               "resize them to one size")
        yield np.stack(batch)


def read_npy_header(f, label):
    """Read the header of an open .npy stream -> (shape, fortran_order, dtype); f is left at the data."""
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise FIDError(f"{label}: unsupported .npy format version {version} of arr_0; re-save it with np.savez")
    return readers[version](f)


def check_images(shape, dtype, label, fortran=False):
    """Images must be uint8 (N, H, W, 3) or grayscale (N, H, W, 1), at least 2 of them."""
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
        raise FIDError(f"{label}: images must be uint8 (N, H, W, 3) or (N, H, W, 1), got {dtype} {tuple(shape)}")
    if shape[0] < 2:
        raise FIDError(f"{label}: need at least 2 images for a covariance, got {shape[0]}")


def npz_image_shape(path, label):
    """Shape (N, H, W, C) of arr_0 in an .npz, read from its header without loading the images."""
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        shape, fortran, dtype = read_npy_header(f, label)
    check_images(shape, dtype, label + " arr_0", fortran)
    return shape


def npz_batches(path, shape, batch_size, label):
    """Stream arr_0 from the zip member (an ADM batch of 50k 256x256 images is 9.8 GB)."""
    per_image = int(np.prod(shape[1:]))
    try:
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            read_npy_header(f, label)
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                data = bytearray(f.read(count * per_image))
                if len(data) != count * per_image:
                    raise FIDError(f"{label}: arr_0 ends after {start + len(data) // per_image} of {shape[0]} images")
                yield np.frombuffer(data, np.uint8).reshape(count, *shape[1:])
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise FIDError(f"{label}: arr_0 cannot be read ({one_line(e)})") from e


def array_batches(images, batch_size):
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def check_statistics(stats, label):
    """Stored statistics: mu (D,) with sigma (D, D), optionally mu_s with sigma_s, pool (N, D), mode."""
    for mean, cov in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mean in stats) != (cov in stats):
            raise FIDError(f"{label}: has {mean if mean in stats else cov} without {cov if mean in stats else mean}")
        if mean in stats:
            mu, sigma = stats[mean], stats[cov]
            numeric = all(np.issubdtype(a.dtype, np.number) for a in (mu, sigma))
            if not numeric or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                raise FIDError(f"{label}: {mean} must be a numeric (D,) array and {cov} (D, D), "
                               f"got {mu.dtype} {mu.shape} and {sigma.dtype} {sigma.shape}")
    if "pool" in stats and (stats["pool"].ndim != 2 or not np.issubdtype(stats["pool"].dtype, np.number)):
        raise FIDError(f"{label}: pool must be numeric (N, D) features, got {stats['pool'].dtype} {stats['pool'].shape}")
    if "mode" in stats and str(stats["mode"]) not in MODES:
        raise FIDError(f"{label}: mode must be one of {MODES}, got {stats['mode']}")


def read_npz(path, label):
    """An .npz -> (stored statistics, arr_0's shape or None), all checked."""
    if not zipfile.is_zipfile(path):
        raise FIDError(f"{label}: not an .npz file (a zip archive of .npy arrays)")
    try:
        with np.load(path) as npz:
            stats = {key: npz[key] for key in npz.files if key in STAT_KEYS + ("pool", "mode")}
            shape = npz_image_shape(path, label) if "arr_0" in npz.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, FIDError):
            raise
        raise FIDError(f"{label}: not a readable .npz file ({one_line(e)})") from e
    check_statistics(stats, label)
    if shape is None and "mu" not in stats:
        raise FIDError(f"{label}: holds neither images (arr_0) nor statistics (mu, sigma)")
    return stats, shape


def open_source(source, name="source", batch_size=64, num_workers=0):
    """Check one input and open it -> Source; FIDError naming `name` if it is not usable.

    source: uint8 (N, H, W, 3) or (N, H, W, 1) array; a folder of images (png/jpg, searched
    recursively, grayscale converted to RGB); an ADM .npz (arr_0 images, and optionally precomputed
    mu/sigma/mu_s/sigma_s, which then take precedence, as in ADM's read_statistics); or a statistics
    .npz (mu, sigma, optionally mu_s, sigma_s, pool, mode).
    """
    if isinstance(source, np.ndarray):
        check_images(source.shape, source.dtype, name)
        return Source(name, {}, len(source), array_batches(source, batch_size))
    if not isinstance(source, (str, os.PathLike)):
        raise FIDError(f"{name}: expected a path or a uint8 image array, got {type(source).__name__}")
    path = os.fspath(source)
    label = f"{name} {path}"
    if os.path.isdir(path):
        files = list_images(path, label)
        if len(files) < 2:
            raise FIDError(f"{label}: need at least 2 images for a covariance, got 1")
        return Source(label, {}, len(files), folder_batches(files, batch_size, num_workers, label))
    if not os.path.exists(path):
        raise FIDError(f"{label}: no such file or folder; give a folder of images, an ADM .npz or a statistics .npz")
    if not path.endswith(".npz"):
        raise FIDError(f"{label}: not a folder of images nor an .npz file")
    stats, shape = read_npz(path, label)
    if shape is None:
        return Source(label, stats, None, None)
    return Source(label, stats, shape[0], npz_batches(path, shape, batch_size, label))


def feature_sizes(source):
    """(FID, sFID) feature sizes the source's statistics will have; sFID None if it has none."""
    stats, images = source.stats, source.batches is not None
    pool = len(stats["mu"]) if "mu" in stats else 2048
    spatial = len(stats["mu_s"]) if "mu_s" in stats else 2023 if images else None
    return pool, spatial


def check_mode(source, mode):
    """Stored statistics must come from the same preprocessing `mode`."""
    if "mode" in source.stats and str(source.stats["mode"]) != mode:
        saved = str(source.stats["mode"])
        raise FIDError(f"{source.label}: holds {saved}-mode statistics; use mode {saved} (--mode {saved})")


def check_compatible(samples, reference, mode):
    """Both sides' statistics must be of `mode` and of one size; checked before the network runs."""
    check_mode(samples, mode)
    check_mode(reference, mode)
    (pool_a, spatial_a), (pool_b, spatial_b) = feature_sizes(samples), feature_sizes(reference)
    if pool_a != pool_b or (None not in (spatial_a, spatial_b) and spatial_a != spatial_b):
        raise FIDError(f"{samples.label} and {reference.label}: statistics differ in size "
                       f"({pool_a} vs {pool_b} features; sFID {spatial_a} vs {spatial_b})")


# ----------------------------------------------------------------------------------------------
# Features and their statistics


@torch.no_grad()
def extract_features(net, batches, count, device, progress=True):
    """Run `net` over uint8 batches -> {'pool': (N, 2048), 'spatial': (N, 2023)} float32 numpy.

    progress: a tqdm bar (shown on a terminal only)."""
    pools, spatials = [], []
    with tqdm(total=count, unit="img", disable=None if progress else True, desc="inception") as bar:
        for batch in batches:
            out = net(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
            pools.append(out["pool"].cpu())
            spatials.append(out["spatial"].cpu())
            bar.update(len(batch))
    return {"pool": torch.cat(pools).numpy(), "spatial": torch.cat(spatials).numpy()}


def mean_and_covariance(features, device="cpu", block=8192):
    """(N, D) features -> mean (D,) and covariance (D, D) float64 numpy, as np.cov(rowvar=False)."""
    x = torch.from_numpy(features)
    if len(x) < 2:
        raise FIDError(f"features: need at least 2 for a covariance, got {len(x)}")
    mu = sum(b.to(device, torch.float64).sum(0) for b in x.split(block)) / len(x)
    sigma = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=device)
    for b in x.split(block):
        b = b.to(device, torch.float64) - mu
        sigma += b.T @ b
    return mu.cpu().numpy(), (sigma / (len(x) - 1)).cpu().numpy()


def compute_statistics(source, net, batch_size=64, device="cpu", num_workers=0, progress=True):
    """Statistics of one side: dict with mu, sigma (FID), mu_s, sigma_s (sFID), pool (N, 2048) where known.

    source: an opened Source, or anything open_source takes. net: None only for a statistics file."""
    if not isinstance(source, Source):
        source = open_source(source, "source", batch_size, num_workers)
    if net is not None:
        check_mode(source, net.mode)
    stats = dict(source.stats)
    if source.batches is None:
        return stats
    if source.count < MIN_UNBIASED_IMAGES:
        warnings.warn(f"only {source.count} images in {source.label}: "
                      f"FID is biased upward below {MIN_UNBIASED_IMAGES} images")
    features = extract_features(net, source.batches, source.count, device, progress)
    stats["pool"] = features["pool"]
    if "mu" not in stats:
        stats["mu"], stats["sigma"] = mean_and_covariance(features["pool"], device)
    if "mu_s" not in stats:
        stats["mu_s"], stats["sigma_s"] = mean_and_covariance(features["spatial"], device)
    return stats


def check_save_path(path):
    """A path an .npz can be written to (its folder is created if missing) -> the path with .npz."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    if os.path.isdir(path):
        raise FIDError(f"{path} is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise FIDError(f"{path}: {parent} is not a writable folder")
    return path


def save_statistics(path, stats, mode, name="save_stats"):
    """Write stats (mu, sigma, mu_s, sigma_s, pool) and the mode to `path` (.npz), atomically.
    name: the argument that gave the path, for messages."""
    path = named(name, check_save_path, path)
    arrays = {key: stats[key] for key in STAT_KEYS + ("pool",) if key in stats}
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, mode=np.array(mode), **arrays)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise FIDError(f"{name}: {path} cannot be written ({e.strerror or one_line(e)})") from e
    return path


# ----------------------------------------------------------------------------------------------
# Metrics


def trace_sqrt_product(sigma1, sigma2):
    """tr sqrt(sigma1 sigma2) for covariances, by a symmetric float64 eigen route.

    sigma1 sigma2 is similar to the symmetric M = sqrt(sigma1) sigma2 sqrt(sigma1), so the trace is the
    sum of square roots of M's eigenvalues, with sqrt(sigma1) from eigh. Eigenvalues that rounding made
    slightly negative count as 0: that is taking the real part of the complex sqrtm, as ADM does. A
    negative eigenvalue whose square root exceeds ADM's 1e-3 tolerance on imaginary parts raises.
    """
    try:
        w, v = np.linalg.eigh(sigma1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        m = root1 @ sigma2 @ root1
        eig = np.linalg.eigvalsh((m + m.T) / 2)
    except np.linalg.LinAlgError:  # no convergence, e.g. on non-finite entries
        return np.nan
    imaginary = np.sqrt(max(-eig.min(), 0.0))
    if imaginary > 1e-3:
        raise ValueError(f"covariances are not positive semi-definite (imaginary component {imaginary:.3g})")
    return np.sqrt(np.clip(eig, 0, None)).sum()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)) in float64 (Heusel et al. 2017).

    The square-root trace goes through `trace_sqrt_product` (symmetric eigen route; scipy's
    sqrtm(disp=False), which ADM and pytorch-fid call, is gone from current scipy). As in ADM, a
    non-finite result is retried with eps added to both diagonals, with a warning; if that fails too,
    ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FIDError(f"statistics differ in size: mean {mu1.shape} vs {mu2.shape}, "
                       f"covariance {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2)
    if not np.isfinite(tr_covmean):
        warnings.warn(f"Frechet distance: product of covariances is singular; adding {eps} to their diagonals")
        offset = eps * np.eye(len(sigma1))
        tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
        if not np.isfinite(tr_covmean):
            raise ValueError("Frechet distance is not finite even with eps on the diagonals; "
                             "check the statistics for NaN/inf")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, split_size=5000):
    """exp E_x KL(p(y|x) || p(y)) over consecutive splits of `split_size`, averaged (ADM, Salimans et al. 2016).

    logits: (N, C); softmax and the score are taken in float64.
    """
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    scores = []
    for part in log_p.split(split_size):
        log_marginal = torch.logsumexp(part, 0) - np.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def squared_distances(a, b):
    """(A, D), (B, D) -> (A, B) squared Euclidean distances, float32.

    Computed like ADM's DistanceBlock: float16 features, norms and sums, clamped at 0; the dot
    products accumulate in float32 as TF's float16 matmul does (float16 values are exact in TF32, so
    a TF32 matmul multiplies them exactly). A block that overflows float16 is redone in float32.
    """
    a16, b16 = a.half(), b.half()
    norm_a = (a16 * a16).float().sum(1).half()
    norm_b = (b16 * b16).float().sum(1).half()
    with fp32_precision("tf32"):
        dot = (a16.float() @ b16.float().T).half()
    d = (norm_a[:, None] - 2 * dot + norm_b[None, :]).clamp_min(0)
    if torch.isfinite(d).all():
        return d.float()
    with fp32_precision("ieee"):
        a, b = a.float(), b.float()
        return (a.square().sum(1)[:, None] - 2 * a @ b.T + b.square().sum(1)[None, :]).clamp_min(0)


def manifold_radii(features, k=PR_NEIGHBOURS, block=4096, bar=None):
    """(N, D) -> (N,) squared distance of each feature to its k-th nearest neighbour in the set.

    The point itself is neighbour 0, as in ADM's ManifoldEstimator. Distances are taken block by
    block, keeping the k + 1 smallest per row; `bar` (tqdm) counts the blocks.
    """
    if len(features) <= k:
        raise FIDError(f"features: precision/recall needs more than k={k} per side, got {len(features)}")
    radii = []
    for rows in features.split(block):
        nearest = rows.new_empty(len(rows), 0, dtype=torch.float32)
        for cols in features.split(block):
            d = torch.cat([nearest, squared_distances(rows, cols)], 1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
            if bar is not None:
                bar.update()
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(ref_features, sample_features, k=PR_NEIGHBOURS, block=4096, progress=False):
    """Improved precision and recall (Kynkaanniemi et al. 2019) with ADM's evaluate_pr semantics.

    precision: fraction of samples within the k-NN ball of some reference feature;
    recall: fraction of reference features within the k-NN ball of some sample.
    Features (N, 2048), numpy or torch; computed on the features' device when given tensors.
    progress: a tqdm bar over the distance blocks (shown on a terminal only).
    """
    ref, sam = torch.as_tensor(ref_features), torch.as_tensor(sample_features)
    blocks_ref, blocks_sam = -(-len(ref) // block), -(-len(sam) // block)
    total = blocks_ref**2 + blocks_sam**2 + blocks_ref * blocks_sam
    with tqdm(total=total, desc="precision/recall", disable=None if progress else True) as bar:
        ref_radii, sam_radii = manifold_radii(ref, k, block, bar), manifold_radii(sam, k, block, bar)
        ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
        sam_in = torch.zeros(len(sam), dtype=torch.bool, device=sam.device)
        for i in range(0, len(ref), block):
            for j in range(0, len(sam), block):
                d = squared_distances(ref[i : i + block], sam[j : j + block])
                ref_in[i : i + block] |= (d <= sam_radii[None, j : j + block]).any(1)
                sam_in[j : j + block] |= (d <= ref_radii[i : i + block, None]).any(0)
                bar.update()
    return sam_in.double().mean().item(), ref_in.double().mean().item()


# ----------------------------------------------------------------------------------------------
# Everything at once


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def named(name, check, *args):
    """check(*args), its FIDError prefixed with the argument's name."""
    try:
        return check(*args)
    except FIDError as e:
        raise FIDError(f"{name}: {e}") from None


def int_at_least(low):
    """A check of an integer >= low (an int, or text for argparse)."""
    def check(value):
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise FIDError(f"must be an integer >= {low}, got {value!r}")
        return int(value)
    return check


def check_device(device):
    """A device this machine has -> torch.device."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FIDError(f"{device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if found.type == "cuda" and (found.index or 0) >= torch.cuda.device_count():
        raise FIDError(f"{device} is not on this machine ({torch.cuda.device_count()} CUDA devices); use cpu")
    if found.type == "mps" and not torch.backends.mps.is_available():
        raise FIDError("mps is not available on this machine; use cpu")
    return found


def check_weights_file(path):
    if not os.path.isfile(path):
        raise FIDError(f"{path}: no such file; download {WEIGHTS_URL}")
    return path


def check_mode_name(mode):
    if mode not in MODES:
        raise FIDError(f"{mode!r} is not one of {', '.join(MODES)}")
    return mode


def network_needed(samples, reference):
    """Images on either side need the network; so do the Inception Score's logits of stored sample features."""
    return samples.batches is not None or reference.batches is not None or "pool" in samples.stats


def compare(samples, reference, net, mode, device, save_stats=None, progress=True, save_name="save_stats"):
    """Metrics of two opened, compatible Sources (see evaluate); net may be None if not network_needed."""
    ref = compute_statistics(reference, net, device=device, progress=progress)
    if save_stats:
        save_statistics(save_stats, ref, mode, save_name)
    sam = compute_statistics(samples, net, device=device, progress=progress)
    result = {"fid": frechet_distance(sam["mu"], sam["sigma"], ref["mu"], ref["sigma"])}
    result["sfid"] = result["inception_score"] = result["precision"] = result["recall"] = None
    if all("mu_s" in side for side in (sam, ref)):
        result["sfid"] = frechet_distance(sam["mu_s"], sam["sigma_s"], ref["mu_s"], ref["sigma_s"])
    else:
        warnings.warn("sFID skipped: a statistics file lacks mu_s/sigma_s")
    if "pool" in sam:
        pool = torch.from_numpy(sam["pool"]).to(device, torch.float64)
        result["inception_score"] = inception_score(pool @ net.fc.weight.detach().to(device, torch.float64).T)
    else:
        warnings.warn("Inception Score skipped: the samples are statistics without pool features")
    if "pool" not in sam or "pool" not in ref:
        warnings.warn("precision/recall skipped: a side is statistics without pool features")
    elif min(len(sam["pool"]), len(ref["pool"])) <= PR_NEIGHBOURS:
        warnings.warn(f"precision/recall skipped: needs more than {PR_NEIGHBOURS} images per side")
    else:
        ref_pool, sam_pool = (torch.from_numpy(side["pool"]).to(device) for side in (ref, sam))
        result["precision"], result["recall"] = precision_recall(ref_pool, sam_pool, PR_NEIGHBOURS, progress=progress)
    return result


def evaluate(samples, reference, net=None, weights=None, mode="adm", batch_size=64, device=None,
             num_workers=0, save_stats=None, progress=True):
    """FID, sFID, IS, precision, recall of `samples` against `reference` (ADM conventions).

    samples, reference: uint8 (N, H, W, 3) or grayscale (N, H, W, 1) arrays, image folders, ADM .npz
    batches (arr_0 of either shape) or statistics .npz. Every argument and both inputs are checked
    first (ValueError, an FIDError, naming the argument); only then are the weights looked for.
    net: a loaded FIDInceptionV3 to reuse (its device and mode are used unless `device` is given);
    else loaded from `weights` (see find_weights) when images need it. save_stats: path to cache the
    reference's statistics at. progress: tqdm bars, shown on a terminal.
    Returns {fid, sfid, inception_score, precision, recall}; a metric whose inputs a statistics-only
    side lacks is None, with a warning.
    """
    batch_size = named("batch_size", int_at_least(1), batch_size)
    num_workers = named("num_workers", int_at_least(0), num_workers)
    mode = net.mode if net is not None else named("mode", check_mode_name, mode)
    if weights is not None:
        named("weights", check_weights_file, weights)
    if device is None:  # a given net decides, so that a CPU net works on a machine with a GPU
        device = next(net.parameters()).device if net is not None else default_device()
    device = named("device", check_device, device)
    if save_stats is not None:
        save_stats = named("save_stats", check_save_path, save_stats)
    sam = open_source(samples, "samples", batch_size, num_workers)
    ref = open_source(reference, "reference", batch_size, num_workers)
    check_compatible(sam, ref, mode)
    if net is None and network_needed(sam, ref):
        net = load_inception(weights, mode, device)
    return compare(sam, ref, net, mode, device, save_stats, progress)


def checked(check):
    """An argparse type from a check that raises FIDError: argparse names the flag in the message."""
    def parse(text):
        try:
            return check(text)
        except FIDError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def build_parser():
    parser = OneLineParser(prog="fid.py", description="FID, sFID, Inception Score, precision and recall "
                           "(ADM conventions). Exit status 2: a bad argument or input, said in one line.")
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("paths", nargs="+", metavar="PATH",
                    help="SAMPLES REFERENCE, or REFERENCE alone with --save-stats; each a folder of png/jpg, "
                         "an ADM .npz (arr_0 uint8 (N, H, W, 3), or (N, H, W, 1) grayscale) or a statistics .npz")
    io.add_argument("--save-stats", metavar="PATH", type=checked(check_save_path),
                    help="cache the reference statistics here (.npz)")
    network = parser.add_argument_group("network")
    network.add_argument("--mode", choices=MODES, default="adm",
                         help="adm: the ADM evaluator's TF1 resize (the paper's numbers); pytorch-fid: its resize")
    network.add_argument("--inception-weights", metavar="PATH", type=checked(check_weights_file),
                         help=f"{WEIGHTS_NAME} (default: $TORCH_HOME/hub/checkpoints, downloaded if missing)")
    execution = parser.add_argument_group("execution")
    execution.add_argument("--device", type=checked(check_device), default=default_device(),
                           help="cpu, cuda, cuda:N or mps (default: cuda if there is one)")
    execution.add_argument("--batch-size", type=checked(int_at_least(1)), default=64, help="images per network call")
    execution.add_argument("--num-workers", type=checked(int_at_least(0)), default=min(8, os.cpu_count() or 1),
                           help="image-decoding processes for folders (0: in the main process)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.paths) > 2 or (len(args.paths) == 1 and not args.save_stats):
        parser.error("give SAMPLES REFERENCE, or REFERENCE --save-stats PATH")
    names = ("SAMPLES", "REFERENCE")[-len(args.paths):]
    try:
        sources = [open_source(path, name, args.batch_size, args.num_workers) for path, name in zip(args.paths, names)]
        samples, reference = sources[0], sources[-1]
        check_compatible(samples, reference, args.mode)
        net = None
        if network_needed(samples, reference) if len(sources) == 2 else reference.batches is not None:
            net = load_inception(args.inception_weights, args.mode, args.device)
        if len(sources) == 1:
            stats = compute_statistics(reference, net, device=args.device)
            print(f"Statistics saved: {save_statistics(args.save_stats, stats, args.mode, '--save-stats')}")
            return
        result = compare(samples, reference, net, args.mode, args.device, args.save_stats, save_name="--save-stats")
    except FIDError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
    names = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score",
             "precision": "Precision", "recall": "Recall"}
    for key, name in names.items():
        print(f"{name}: {'skipped' if result[key] is None else f'{result[key]:.4f}'}")


if __name__ == "__main__":
    main()
