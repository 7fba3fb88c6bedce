"""sample.py on a tiny trained checkpoint (CPU): the grid PNG, the ADM-format .npz and its
resumption, torchrun splitting, checkpoints of the original implementation, errors, and the
--fid-ref wiring through fid.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import REPO, TINY, load, one_line_error, write_fashion_subset  # noqa: E402

import model as dis  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

FAST = ["--device", "cpu", "--num-sampling-steps", "4"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A class-conditional DiS (D=16, depth 2) on 8x8 Fashion-MNIST after 2 steps."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    folder = train.main(["--data-path", write_fashion_subset(root / "fashion"), *TINY, "--max-steps", "2",
                         "--results-dir", str(root / "results")])
    return os.path.join(folder, "checkpoints", "0000002.pt")


def pixels(path):
    return np.asarray(Image.open(path))


def test_grid_uses_ema_weights_and_records_settings(ckpt, tmp_path):
    out = sample.main(["--ckpt", ckpt, "--cfg", "1.5", *FAST, "--class-labels", "0", "1", "2", "3",
                       "--out", str(tmp_path / "grid.png")])
    image = Image.open(out)
    assert image.mode == "L" and image.size == (2 + 4 * 10, 2 + 10)  # one row of four 8x8 images
    meta = json.loads(image.text["dis"])
    assert (meta["cfg_scale"], meta["sampler"], meta["num_sampling_steps"], meta["weights"]) == (1.5, "ddpm", 4, "ema")
    # The same EMA weights as a bare state dict (the original implementation's format) give the same grid.
    saved = load(ckpt)
    torch.save(saved["ema"], tmp_path / "ema_only.pth")
    bare = ["--model", "DiS-S/2", "--embed-dim", "16", "--depth", "2", "--image-size", "8", "--num-classes", "10",
            "--channels", "1"]
    sample.main(["--ckpt", str(tmp_path / "ema_only.pth"), *bare, "--cfg", "1.5", *FAST, "--class-labels", "0", "1",
                 "2", "3", "--out", str(tmp_path / "bare.png")])
    np.testing.assert_array_equal(pixels(tmp_path / "bare.png"), pixels(out))
    sample.main(["--ckpt", ckpt, "--no-use-ema", "--cfg", "1.5", *FAST, "--class-labels", "0", "1", "2", "3",
                 "--out", str(tmp_path / "raw.png")])
    assert not np.array_equal(pixels(tmp_path / "raw.png"), pixels(out))


def test_npz_format_and_resume_from_batches(ckpt, tmp_path):
    args = ["--ckpt", ckpt, *FAST, "--num-samples", "10", "--per-proc-batch-size", "4", "--sampler", "ddim"]
    path = sample.main(args + ["--sample-dir", str(tmp_path / "a")])
    with np.load(path) as npz:
        images, labels, meta = npz["arr_0"], npz["arr_1"], json.loads(str(npz["meta"]))
    assert images.dtype == np.uint8 and images.shape == (10, 8, 8, 1)
    assert labels.dtype == np.int64 and labels.shape == (10,) and labels.min() >= 0 and labels.max() < 10
    assert (meta["num_samples"], meta["sampler"], meta["num_sampling_steps"], meta["cfg_scale"]) == (10, "ddim", 4, 1.0)
    assert json.load(open(path[:-4] + ".json")) == meta
    assert Image.open(path[:-4] + ".png").size == (2 + 10 * 10, 2 + 10)
    assert not os.path.exists(path[:-4])  # the batch files are gone once the .npz is written

    # An interrupted run: batch 1 (samples 4..7) is on disk already, and is kept.
    name = os.path.basename(path)[:-4]
    os.makedirs(tmp_path / "b" / name)
    sentinel = np.full((4, 8, 8, 1), 255, np.uint8)
    np.savez(tmp_path / "b" / name / "batch_000001.npz", images=sentinel, labels=np.full(4, 7))
    with np.load(sample.main(args + ["--sample-dir", str(tmp_path / "b")])) as npz:
        resumed, resumed_labels = npz["arr_0"], npz["arr_1"]
    np.testing.assert_array_equal(resumed[4:8], sentinel)
    np.testing.assert_array_equal(resumed_labels[4:8], 7)
    keep = [0, 1, 2, 3, 8, 9]
    np.testing.assert_array_equal(resumed[keep], images[keep])
    np.testing.assert_array_equal(resumed_labels[keep], labels[keep])


def test_torchrun_splits_batches_over_ranks(ckpt, tmp_path):
    args = ["--ckpt", ckpt, *FAST, "--num-samples", "7", "--per-proc-batch-size", "2", "--cfg", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(REPO, "sample.py"), *args, "--sample-dir", str(tmp_path / "two")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one = sample.main(args + ["--sample-dir", str(tmp_path / "one")])
    (two,) = [f for f in os.listdir(tmp_path / "two") if f.endswith(".npz")]
    with np.load(one) as a, np.load(tmp_path / "two" / two) as b:
        assert a["arr_0"].shape == (7, 8, 8, 1)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_latent_checkpoint_decodes_through_the_vae(tmp_path):
    from test_train import random_vae
    vae_dir = str(tmp_path / "vae")
    random_vae(vae_dir)
    folder = train.main(["--data-path", write_fashion_subset(tmp_path / "fashion"), *TINY, "--image-size", "32",
                         "--vae", vae_dir, "--max-steps", "1", "--results-dir", str(tmp_path / "r")])
    path = sample.main(["--ckpt", os.path.join(folder, "checkpoints", "0000001.pt"), *FAST, "--num-samples", "3",
                        "--sample-dir", str(tmp_path / "s")])
    with np.load(path) as npz:
        assert npz["arr_0"].shape == (3, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
        assert json.loads(str(npz["meta"]))["vae"] == vae_dir


def sample_error(argv):
    return one_line_error(argv, sample.main)


def test_error_checkpoint_of_another_model_size(ckpt, tmp_path):
    torch.save({"model": load(ckpt)["model"]}, tmp_path / "original.pth")
    message = sample_error(["--ckpt", str(tmp_path / "original.pth"), "--model", "DiS-S/2", "--depth", "4",
                              "--embed-dim", "16", "--image-size", "8", "--num-classes", "10", "--channels", "1"])
    assert "holds DiS (D=16, depth 2) at 8x8 with 1 channels, 10 classes" in message
    assert "ask for DiS (D=16, depth 4)" in message
    message = sample_error(["--ckpt", str(tmp_path / "original.pth"), "--model", "DiS-S/2", "--image-size", "8",
                              "--num-classes", "10", "--channels", "1"])
    assert "ask for DiS-S/2 (D=368, depth 24)" in message


def test_errors_on_labels_and_guidance(ckpt, tmp_path):
    assert "outside the model's classes 0..9" in sample_error(["--ckpt", ckpt, "--class-labels", "3", "10"])
    torch.manual_seed(0)
    unconditional = dis.DiS(img_size=8, patch_size=2, channels=1, embed_dim=16, depth=2, num_classes=0)
    torch.save(unconditional.state_dict(), tmp_path / "uncond.pth")
    message = sample_error(["--ckpt", str(tmp_path / "uncond.pth"), "--embed-dim", "16", "--depth", "2",
                              "--model", "DiS-S/2", "--image-size", "8", "--num-classes", "0", "--channels", "1",
                              "--cfg", "1.5"])
    assert "unconditional" in message
    assert "not found" in sample_error(["--ckpt", str(tmp_path / "missing.pt")])


def test_fid_ref_evaluates_the_written_samples(ckpt, tmp_path, monkeypatch):
    """fid.evaluate runs on the .npz (grayscale replicated to RGB) with a randomly initialised
    Inception (the real weights are a download): against the same images FID is 0."""
    import fid
    random_inception = lambda weights=None, mode="adm", device="cpu": fid.FIDInceptionV3(mode).eval().to(device)
    monkeypatch.setattr(fid, "load_inception", random_inception)
    args = ["--ckpt", ckpt, *FAST, "--num-samples", "4", "--per-proc-batch-size", "4"]
    first = sample.main(args + ["--sample-dir", str(tmp_path / "a")])
    with np.load(first) as npz:
        np.savez(tmp_path / "reference.npz", arr_0=np.repeat(npz["arr_0"], 3, axis=-1))
    with pytest.warns(UserWarning, match="FID is biased"):
        path = sample.main(args + ["--sample-dir", str(tmp_path / "b"), "--fid-ref", str(tmp_path / "reference.npz")])
    metrics = json.load(open(path[:-4] + ".json"))["metrics"]
    assert metrics["fid"] == pytest.approx(0, abs=1e-3) and metrics["precision"] == metrics["recall"] == 1.0
