"""A quality yardstick for Fashion-MNIST samples that needs no download: the Frechet distance and the
class accuracy of samples in the feature space of a small classifier trained on Fashion-MNIST's
training split. It stands in for FID where the Inception weights are out of reach, and it sees
what Inception, trained on photographs, does not: garments.

    python yardstick.py samples/NAME.npz      # sample.py's .npz: arr_0 uint8 (N, 32, 32, 1), arr_1 labels
    python yardstick.py --train               # train and cache the classifier, print its numbers

The classifier is trained once, on first use (seconds on a GPU, minutes on a CPU), and cached with
the statistics of its features on the test split under $XDG_CACHE_HOME/dis (else ~/.cache/dis), in
a file named by a hash of its training settings and of the device type it is evaluated on, which
is the one it was trained on: a classifier trained on a GPU has other weights than one trained on
a CPU (other kernels, other rounding), and so gives other numbers. Numbers are comparable only
between runs with the same cache file.

Data flow: uint8 images (N, 32, 32) -> [-1, 1] as train.py feeds the model -> CNN -> features
(N, 256) and class predictions -> mean and covariance (float64) -> Frechet distance to the test
split's features (fid.frechet_distance), and the fraction of predictions equal to the labels.
"""
import contextlib
import gzip
import hashlib
import json
import os
import pickle
import sys
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from fid import (FIDError, OneLineParser, check_device, checked, default_device, fp32_precision, frechet_distance,
                 int_at_least, mean_and_covariance, named)

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SIZE = 32
SETTINGS = {  # everything that decides the classifier's weights; its hash names the cache file
    "width": 32,  # channels of the first convolution, doubled twice
    "features": 256,  # size of the embedding the Frechet distance is measured in
    "steps": 1200,  # about 2.6 epochs of the 60,000 training images
    "batch_size": 128,
    "lr": 3e-3,  # AdamW, one-cycle schedule (Smith & Topin 2019)
    "weight_decay": 5e-4,
    "flips": True,  # horizontal flips, as train.py's diffusion model sees its data
    "seed": 0,
    "train_images": 60000,  # the first N of the training split
    "test_images": 10000,  # the first N of the test split: the reference of the Frechet distance
}


class YardstickError(FIDError):
    """A problem with an argument, the data or the cache that the user can fix; the message names it."""


# ----------------------------------------------------------------------------------------------
# Data: Fashion-MNIST's IDX files, 28x28 padded to 32x32 with black, as train.py prepares them


def read_idx(path):
    """An IDX file of unsigned bytes (the MNIST format; gzipped if the name ends in .gz) -> uint8
    numpy array of the shape in its header."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise YardstickError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != 4 + 4 * ndim + int(np.prod(shape)):
        raise YardstickError(f"{path}: the IDX header says {shape}, the file holds another size")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_data(data_path=None):
    """The folder with Fashion-MNIST's four IDX .gz files: `data_path`, else the Debian package's."""
    folder = data_path or FASHION_MNIST_DEBIAN
    missing = [name for files in SPLITS.values() for name in files if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise YardstickError(f"Fashion-MNIST's {', '.join(missing)} not in {folder}; install dataset-fashion-mnist "
                             "(apt) or give the folder of the four IDX .gz files (--data-path DIR, data_path=)")
    return folder


def load_split(folder, split, count=None):
    """Fashion-MNIST `split` ('train' or 'test') -> images (N, 32, 32) uint8, 28x28 centred on black
    as train.py pads them, and labels (N,) int64; the first `count` only if given."""
    images, labels = (read_idx(os.path.join(folder, name)) for name in SPLITS[split])
    images, labels = images[:count], labels[:count].astype(np.int64)
    pad = (IMAGE_SIZE - images.shape[-1]) // 2
    return np.pad(images, ((0, 0), (pad, pad), (pad, pad))), labels


def to_input(images):
    """(B, 32, 32) uint8 tensor -> (B, 1, 32, 32) float32 in [-1, 1], as train.py scales images."""
    return images[:, None].float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------
# The classifier


def conv_bn_relu(c_in, c_out, kernel, stride):
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class Classifier(nn.Module):
    """A small CNN: (B, 1, 32, 32) in [-1, 1] -> features (B, F) -> logits (B, 10).

    32x32 -> 16x16 (4x4 stride-2 convolution) -> 8x8 -> 8x8 -> 4x4 (3x3 convolutions), each with
    batch norm and ReLU; the (B, 4 * width * 16) map -> a ReLU embedding of F features (the space of
    the Frechet distance) -> 10 classes.
    """

    def __init__(self, width=32, features=256):
        super().__init__()
        self.convs = nn.Sequential(*conv_bn_relu(1, width, 4, 2), *conv_bn_relu(width, 2 * width, 3, 2),
                                   *conv_bn_relu(2 * width, 2 * width, 3, 1), *conv_bn_relu(2 * width, 4 * width, 3, 2))
        self.embed = nn.Linear(4 * width * 16, features)
        self.head = nn.Linear(features, 10)

    def features(self, x):
        return F.relu(self.embed(self.convs(x).flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


@contextlib.contextmanager
def deterministic_cudnn():
    """cuDNN's deterministic convolutions, no autotuning; settings restored after."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def train_classifier(images, labels, settings, device="cpu", progress=True):
    """A Classifier trained on uint8 images (N, 32, 32) and labels (N,) with `settings` (see SETTINGS),
    in eval mode, in IEEE float32. The same settings give the same weights on the same device and
    thread count."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model = Classifier(settings["width"], settings["features"]).to(device)
    generator = torch.Generator().manual_seed(settings["seed"])
    images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    opt = torch.optim.AdamW(model.parameters(), settings["lr"], weight_decay=settings["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, settings["lr"], total_steps=settings["steps"], pct_start=0.15)
    batch, order = settings["batch_size"], torch.empty(0, dtype=torch.long)
    model.train()
    with deterministic_cudnn(), fp32_precision("ieee"), tqdm(range(settings["steps"]), desc="training the yardstick classifier",
                                     disable=None if progress else True) as steps:
        for _ in steps:
            if len(order) < batch:  # a new epoch in a new order
                order = torch.randperm(len(images), generator=generator)
            idx, order = order[:batch].to(device), order[batch:]
            x = to_input(images[idx])
            if settings["flips"]:
                flip = (torch.rand(len(idx), generator=generator) < 0.5).to(device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            steps.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.no_grad()
def classify(model, images, device="cpu", batch_size=1000, progress=True):
    """uint8 images (N, 32, 32) -> features (N, F) float32 numpy and predicted classes (N,) int64,
    in IEEE float32 on every device (no TF32)."""
    features, classes = [], []
    with fp32_precision("ieee"), tqdm(total=len(images), unit="img", desc="yardstick features", disable=None if progress else True) as bar:
        for start in range(0, len(images), batch_size):
            x = to_input(torch.from_numpy(images[start : start + batch_size]).to(device))
            f = model.features(x)
            features.append(f.float().cpu())
            classes.append(model.head(f).argmax(1).cpu())
            bar.update(len(x))
    return torch.cat(features).numpy(), torch.cat(classes).numpy()


# ----------------------------------------------------------------------------------------------
# The cache: the classifier's weights and its reference statistics, trained on first use


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dis")


def cache_path(settings, cache_dir=None, device="cpu"):
    """<cache_dir>/yardstick-<12 hex digits of the SHA-256 of the settings and the device type>.pt;
    the device type (cpu, cuda, mps), not its index: GPUs of one type train the same weights."""
    key = json.dumps({**settings, "device": torch.device(device).type}, sort_keys=True)
    key = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(cache_dir or default_cache_dir(), f"yardstick-{key}.pt")


def build_yardstick(settings, data_path=None, device="cpu", progress=True):
    """Train the classifier and measure it -> the cache's plain dict: settings (JSON), state_dict,
    mu and sigma of the test split's features, its test accuracy, the train/test floor, train_seconds."""
    folder = find_data(data_path)
    train_x, train_y = load_split(folder, "train", settings["train_images"])
    test_x, test_y = load_split(folder, "test", settings["test_images"])
    start = time.perf_counter()
    model = train_classifier(train_x, train_y, settings, device, progress)
    seconds = time.perf_counter() - start
    test_features, test_pred = classify(model, test_x, device, progress=progress)
    # The floor: real images against the test split, as many as the test split holds.
    train_features, _ = classify(model, train_x[: len(test_x)], device, progress=progress)
    mu, sigma = mean_and_covariance(test_features)
    floor = frechet_distance(*mean_and_covariance(train_features), mu, sigma)
    return {"settings": json.dumps(settings, sort_keys=True), "state_dict": model.cpu().state_dict(),
            "mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma),
            "test_accuracy": float((test_pred == test_y).mean()), "fd_train_test": floor,
            "train_seconds": seconds, "trained_on": str(device)}


def save_atomically(obj, path):
    """torch.save to a temporary file, then rename: a crash leaves the old file or none, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # an OSError, or Ctrl-C: no .tmp file left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        raise YardstickError(f"cannot write the cache {path} ({e.strerror or e}); give another folder "
                             "(--cache-dir DIR, cache_dir=)") from e


def load_yardstick(data_path=None, cache_dir=None, device="cpu", settings=SETTINGS, progress=True):
    """(Classifier in eval mode on `device`, the cache's dict): read from the cache, or trained,
    measured and cached first. The data is needed only for that first time."""
    path = cache_path(settings, cache_dir, device)
    cached = None
    if os.path.isfile(path):
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # rebuilt, not fatal
            warnings.warn(f"yardstick cache {path} is unreadable ({type(e).__name__}); training again")
        if cached is not None and json.loads(cached.get("settings", "null")) != settings:
            warnings.warn(f"yardstick cache {path} holds other settings; training again")
            cached = None
    if cached is None:
        print(f"Training the yardstick classifier once; it will be cached at {path}", file=sys.stderr)
        cached = build_yardstick(settings, data_path, device, progress)
        save_atomically(cached, path)
    model = Classifier(settings["width"], settings["features"])
    model.load_state_dict(cached["state_dict"])
    return model.to(device).eval(), cached


# ----------------------------------------------------------------------------------------------
# The measurement


def check_samples(samples, labels, names=("samples", "labels")):
    """-> images (N, 32, 32) uint8 and labels (N,) int64 or None; YardstickError naming the argument
    by `names`."""
    if not isinstance(samples, np.ndarray) or samples.dtype != np.uint8:
        raise YardstickError(f"{names[0]}: must be a uint8 numpy array, got "
                             f"{getattr(samples, 'dtype', type(samples).__name__)}")
    if samples.ndim == 4 and samples.shape[-1] == 1:
        samples = samples[..., 0]
    if samples.ndim != 3 or samples.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise YardstickError(f"{names[0]}: must be Fashion-MNIST-sized grayscale images (N, 32, 32, 1) or "
                             f"(N, 32, 32), got {samples.shape}")
    if len(samples) < 2:
        raise YardstickError(f"{names[0]}: need at least 2 images for a covariance, got {len(samples)}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(samples),) or not np.issubdtype(labels.dtype, np.integer):
            raise YardstickError(f"{names[1]}: must be integers (N,) = ({len(samples)},), got {labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() >= len(CLASSES):
            raise YardstickError(f"{names[1]}: must be classes 0..{len(CLASSES) - 1}, got {labels.min()}..{labels.max()}")
        labels = labels.astype(np.int64)
    return samples, labels


def distance_to_reference(features, reference):
    """Frechet distance between features (N, F) and the Gaussian of the cache's mu (F,), sigma (F, F)."""
    mu, sigma = mean_and_covariance(np.ascontiguousarray(features))
    return frechet_distance(mu, sigma, reference["mu"].numpy(), reference["sigma"].numpy())


def evaluate(samples, labels=None, device=None, data_path=None, cache_dir=None, batch_size=1000,
             settings=SETTINGS, progress=True):
    """The yardstick of Fashion-MNIST samples.

    samples: uint8 (N, 32, 32, 1) or (N, 32, 32); labels: the classes they were conditioned on (N,),
    or None. Returns a dict:
        fd: Frechet distance between the samples' features and the test split's (lower is better);
        accuracy: fraction of samples the classifier assigns to their label (None without labels);
        num_samples: N;
        fd_train_test: the same distance for as many real training images as the test split holds,
            a floor for the fd of that many samples;
        classifier_test_accuracy: the classifier's own accuracy on the test split.
    """
    samples, labels = check_samples(samples, labels)
    batch_size = named("batch_size", int_at_least(1), batch_size)
    device = named("device", check_device, device if device is not None else default_device())
    model, reference = load_yardstick(data_path, cache_dir, device, settings, progress)
    if len(samples) <= settings["features"]:
        warnings.warn(f"only {len(samples)} samples for {settings['features']} features: the covariance is "
                      "singular and the Frechet distance biased upward")
    features, predicted = classify(model, samples, device, batch_size, progress)
    return {"fd": distance_to_reference(features, reference),
            "accuracy": None if labels is None else float((predicted == labels).mean()),
            "num_samples": len(samples), "fd_train_test": float(reference["fd_train_test"]),
            "classifier_test_accuracy": float(reference["test_accuracy"])}


# ----------------------------------------------------------------------------------------------
# Command line


def read_samples(path):
    """sample.py's .npz -> (arr_0 images, arr_1 labels or None); YardstickError naming SAMPLES."""
    if not os.path.isfile(path):
        raise YardstickError(f"SAMPLES {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise YardstickError(f"SAMPLES {path}: not an .npz file (a zip archive of .npy arrays)")
    try:
        with np.load(path) as npz:
            if "arr_0" not in npz.files:
                raise YardstickError(f"SAMPLES {path}: no arr_0 (images); give sample.py's .npz")
            return npz["arr_0"], npz["arr_1"] if "arr_1" in npz.files else None
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, YardstickError):
            raise
        raise YardstickError(f"SAMPLES {path}: not a readable .npz ({' '.join(str(e).split())})") from e


def existing_folder(path):
    if not os.path.isdir(path):
        raise FIDError(f"{path} is not a folder")
    return path


def cache_folder(path):
    """A folder that exists, or that can be made (on first use)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FIDError(f"{path} is not a folder")
    return path


def main(argv=None):
    parser = OneLineParser(prog="yardstick.py", description="Frechet distance and class accuracy of Fashion-MNIST "
                           "samples in the features of a small classifier trained on Fashion-MNIST (cached). "
                           "Exit status 2: a bad argument or input, said in one line.")
    what = parser.add_argument_group("what to measure")
    what.add_argument("samples", nargs="?", metavar="SAMPLES",
                      help="sample.py's .npz: arr_0 uint8 (N, 32, 32, 1), arr_1 labels (optional)")
    what.add_argument("--train", action="store_true", help="only train and cache the classifier (if not cached)")
    where = parser.add_argument_group("data and cache")
    where.add_argument("--data-path", type=checked(existing_folder), default=None,
                       help=f"folder of Fashion-MNIST's IDX .gz files (default: {FASHION_MNIST_DEBIAN})")
    where.add_argument("--cache-dir", type=checked(cache_folder), default=None, help="default: $XDG_CACHE_HOME/dis or ~/.cache/dis")
    execution = parser.add_argument_group("execution")
    execution.add_argument("--device", type=checked(check_device), default=default_device(), help="default: cuda if there is one")
    execution.add_argument("--batch-size", type=checked(int_at_least(1)), default=1000, help="images per forward pass")
    args = parser.parse_args(argv)
    if (args.samples is None) == (not args.train):
        parser.error("give either SAMPLES (an .npz of samples) or --train")
    try:
        if args.train:
            _, reference = load_yardstick(args.data_path, args.cache_dir, args.device)
            print(f"Cached: {cache_path(SETTINGS, args.cache_dir, args.device)}")
            print(f"Trained in: {reference['train_seconds']:.0f} s on {reference['trained_on']}")
            result = {"classifier_test_accuracy": reference["test_accuracy"], "fd_train_test": reference["fd_train_test"]}
        else:
            images, labels = read_samples(args.samples)
            check_samples(images, labels, (f"SAMPLES {args.samples} arr_0", f"SAMPLES {args.samples} arr_1"))
            result = evaluate(images, labels, args.device, args.data_path, args.cache_dir, args.batch_size)
    except FIDError as e:  # YardstickError too
        parser.error(str(e))
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
    names = {"fd": "FD", "accuracy": "Accuracy", "num_samples": "Samples", "fd_train_test": "FD train vs test (floor)",
             "classifier_test_accuracy": "Classifier test accuracy"}
    for key, name in names.items():
        if key in result:
            value = result[key]
            text = "n/a (no labels)" if value is None else str(value) if isinstance(value, int) else f"{value:.4f}"
            print(f"{name}: {text}")


if __name__ == "__main__":
    main()
