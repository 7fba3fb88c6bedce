"""Tests for yardstick.py: its IDX reader against hand-made files, its Frechet distance against scipy,
and a short real training on a subset of Fashion-MNIST (the full one is not run here)."""
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

import yardstick

pytestmark = pytest.mark.usefixtures("one_thread")

FASHION_MNIST = yardstick.FASHION_MNIST_DEBIAN
needs_data = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="needs Fashion-MNIST's IDX files")
TINY = {**yardstick.SETTINGS, "width": 8, "features": 32, "steps": 150, "batch_size": 64,
        "train_images": 4000, "test_images": 1000}


def idx_bytes(array):
    """The IDX format by its definition: 0, 0, type 0x08 (unsigned byte), ndim, big-endian uint32 sizes, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_hand_made(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "b").write_bytes(idx_bytes(np.array([7, 0, 9])))
    np.testing.assert_array_equal(yardstick.read_idx(str(tmp_path / "a.gz")), images)
    np.testing.assert_array_equal(yardstick.read_idx(str(tmp_path / "b")), [7, 0, 9])
    (tmp_path / "short").write_bytes(idx_bytes(images)[:-1])
    (tmp_path / "float").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0")
    for bad in ("short", "float"):
        with pytest.raises(ValueError, match=bad):
            yardstick.read_idx(str(tmp_path / bad))


def test_split_is_padded_with_black_as_training_sees_it(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(1, 256, (5, 28, 28)).astype(np.uint8), np.array([3, 1, 4, 1, 5])
    for files in yardstick.SPLITS.values():
        (tmp_path / files[0]).write_bytes(gzip.compress(idx_bytes(images)))
        (tmp_path / files[1]).write_bytes(gzip.compress(idx_bytes(labels)))
    padded, got_labels = yardstick.load_split(yardstick.find_data(str(tmp_path)), "test", count=4)
    expected = np.zeros((4, 32, 32), np.uint8)
    expected[:, 2:30, 2:30] = images[:4]
    np.testing.assert_array_equal(padded, expected)
    np.testing.assert_array_equal(got_labels, labels[:4])
    x = yardstick.to_input(torch.from_numpy(padded)).numpy()
    np.testing.assert_allclose(x[:, 0], expected / 127.5 - 1, rtol=0, atol=1e-6)  # black border: -1
    os.remove(tmp_path / yardstick.SPLITS["train"][1])
    with pytest.raises(ValueError, match="train-labels"):
        yardstick.find_data(str(tmp_path))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(2)
    reference_features = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))
    features = rng.standard_normal((200, 12)) * 1.5 + 0.3
    mu_r, sigma_r = reference_features.mean(0), np.cov(reference_features, rowvar=False)
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    expected = np.sum((mu - mu_r) ** 2) + np.trace(sigma + sigma_r - 2 * scipy.linalg.sqrtm(sigma @ sigma_r).real)
    reference = {"mu": torch.from_numpy(mu_r), "sigma": torch.from_numpy(sigma_r)}
    assert yardstick.distance_to_reference(features, reference) == pytest.approx(expected, rel=1e-8)


def test_cache_file_is_named_by_the_settings_and_the_device_type(tmp_path):
    """A classifier trained on a GPU has other weights than one trained on the CPU, so it gives
    other numbers: their caches must not be taken for each other. GPUs of one type share one."""
    path = yardstick.cache_path(TINY, str(tmp_path), "cpu")
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith("yardstick-")
    assert yardstick.cache_path(TINY, str(tmp_path), "cuda") != path
    assert yardstick.cache_path(TINY, str(tmp_path), "cuda:1") == yardstick.cache_path(TINY, str(tmp_path), "cuda")
    assert yardstick.cache_path({**TINY, "steps": 151}, str(tmp_path), "cpu") != path
    assert yardstick.cache_path(dict(reversed(TINY.items())), str(tmp_path), torch.device("cpu")) == path


@needs_data
def test_short_training_beats_chance_and_is_cached(tmp_path, recwarn):
    (tmp_path / os.path.basename(yardstick.cache_path(TINY, str(tmp_path), "cuda"))).write_bytes(b"a GPU's cache")
    model, cached = yardstick.load_yardstick(cache_dir=str(tmp_path), settings=TINY, progress=False)
    assert not [w for w in recwarn if "yardstick cache" in str(w.message)]  # the GPU's file is not read
    assert cached["test_accuracy"] > 0.6  # 10 classes: chance is 0.1
    assert cached["fd_train_test"] >= 0 and os.path.isfile(yardstick.cache_path(TINY, str(tmp_path), "cpu"))
    # From the cache, without the data (an empty folder as data_path would fail any training).
    (tmp_path / "no-data").mkdir()
    again, cached_again = yardstick.load_yardstick(str(tmp_path / "no-data"), str(tmp_path), settings=TINY, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    images, labels = yardstick.load_split(FASHION_MNIST, "test", 500)
    kwargs = {"data_path": str(tmp_path / "no-data"), "cache_dir": str(tmp_path), "settings": TINY, "progress": False}
    real = yardstick.evaluate(images[..., None], labels, device="cpu", **kwargs)
    wrong = yardstick.evaluate(images, (labels + 1) % 10, device="cpu", **kwargs)
    noise = np.random.default_rng(3).integers(0, 256, images.shape, dtype=np.uint8)
    assert real["accuracy"] > 0.6 and wrong["accuracy"] < 0.2 and real["fd"] == wrong["fd"]
    assert real["fd"] < 0.2 * yardstick.evaluate(noise, None, device="cpu", **kwargs)["fd"]
    assert real["classifier_test_accuracy"] == cached_again["test_accuracy"] and real["num_samples"] == 500


@needs_data
def test_training_is_deterministic_given_the_seed():
    images, labels = yardstick.load_split(FASHION_MNIST, "train", 256)
    settings = {**TINY, "steps": 6}
    first, second = (yardstick.train_classifier(images, labels, settings, progress=False) for _ in range(2))
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    other = yardstick.train_classifier(images, labels, {**settings, "seed": 1}, progress=False)
    assert not torch.equal(other.embed.weight, first.embed.weight)


@needs_data
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_is_deterministic_and_beats_chance(tmp_path):
    images, labels = yardstick.load_split(FASHION_MNIST, "train", TINY["train_images"])
    first, second = (yardstick.train_classifier(images, labels, TINY, "cuda", progress=False) for _ in range(2))
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    test_images, test_labels = yardstick.load_split(FASHION_MNIST, "test", TINY["test_images"])
    _, predicted = yardstick.classify(first, test_images, "cuda", progress=False)
    assert (predicted == test_labels).mean() > 0.6


# ----------------------------------------------------------------------------------------------
# Bad arguments: exit status 2 and one line naming the argument, before any training


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = np.zeros((4, 32, 32, 1), np.uint8)
    np.savez("good.npz", images, np.arange(4))
    np.savez("float.npz", images.astype(np.float32), np.arange(4))
    np.savez("small.npz", np.zeros((4, 28, 28, 1), np.uint8))
    np.savez("rgb.npz", np.zeros((4, 32, 32, 3), np.uint8))
    np.savez("labels.npz", images, np.array([0, 1, 2, 10]))
    np.savez("nolabels.npz", images, np.arange(3))
    np.savez("noimages.npz", labels=np.arange(4))
    (tmp_path / "text.npz").write_text("not a zip")
    (tmp_path / "afile").write_text("")
    return tmp_path


BAD_ARGUMENTS = [  # (argv, words the one line must contain)
    ("missing.npz", "SAMPLES missing.npz"),
    ("text.npz", "SAMPLES text.npz"),
    ("noimages.npz", "SAMPLES noimages.npz"),
    ("float.npz", "SAMPLES float.npz arr_0"),
    ("small.npz", "(N, 32, 32, 1)"),
    ("rgb.npz", "SAMPLES rgb.npz arr_0"),
    ("labels.npz", "SAMPLES labels.npz arr_1"),
    ("nolabels.npz", "SAMPLES nolabels.npz arr_1"),
    ("", "SAMPLES"),
    ("good.npz --train", "--train"),
    ("good.npz --batch-size 0", "--batch-size"),
    ("good.npz --device cuda:5", "--device"),
    ("good.npz --device tpu-ish", "--device"),
    ("good.npz --data-path nowhere", "--data-path"),
    ("good.npz --cache-dir afile", "--cache-dir"),
]


@pytest.mark.parametrize("argv, words", BAD_ARGUMENTS)
def test_bad_argument_is_one_line_exit_2(inputs, capsys, argv, words):
    argv = argv.split() + ([] if "--cache-dir" in argv else ["--cache-dir", str(inputs / "cache")])
    with pytest.raises(SystemExit) as stop:
        yardstick.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("yardstick.py: error: ") and err.count("\n") == 1
    assert words in err
    assert not (inputs / "cache").exists()


def test_bad_samples_end_to_end_have_no_traceback(inputs):
    script = os.path.join(os.path.dirname(__file__), "..", "yardstick.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, script, "small.npz"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()] and "SAMPLES small.npz arr_0" in done.stderr


@pytest.mark.parametrize("kwargs, name", [
    ({"samples": np.zeros((4, 32, 32), np.float32)}, "samples"), ({"samples": np.zeros((1, 32, 32), np.uint8)}, "samples"),
    ({"labels": np.arange(3)}, "labels"), ({"labels": np.array([0, 1, 2, -1])}, "labels"),
    ({"batch_size": 0}, "batch_size"), ({"device": "cuda:5"}, "device"),
])
def test_evaluate_bad_argument_raises_value_error_naming_it(tmp_path, kwargs, name):
    args = {"samples": np.zeros((4, 32, 32, 1), np.uint8), "labels": None, "cache_dir": str(tmp_path), **kwargs}
    with pytest.raises(ValueError, match=f"^{name}"):
        yardstick.evaluate(**args)
    assert not os.listdir(tmp_path)
