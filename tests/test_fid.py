"""Tests for fid.py against independent references: pytorch-fid's network, a loop TF1 resize,
scipy's sqrtm, closed forms, numpy brute force, and the ADM evaluator's printed numbers."""
import math
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fid  # noqa: E402

pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
pytestmark = pytest.mark.usefixtures("one_thread")


def random_state_dict(net, seed=0):
    """Random weights that keep activations O(1) through 90+ layers: He-scaled convs, BN near identity."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value.clone()
        elif key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=g) * math.sqrt(2 / fan_in)
        elif key.endswith(("bn.weight", "running_var")):
            state[key] = 0.8 + 0.4 * torch.rand(value.shape, generator=g)
        elif key == "fc.weight":
            state[key] = torch.randn(value.shape, generator=g) / math.sqrt(value.shape[1])
        else:
            state[key] = 0.1 * torch.randn(value.shape, generator=g)
    return state


def build_pytorch_fid(monkeypatch, state):
    """pytorch-fid's InceptionV3 (FID blocks) with `state` loaded instead of the downloaded weights."""
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    return pytorch_fid_inception.InceptionV3([3], use_fid_inception=True).eval()


@pytest.fixture(scope="module")
def nets():
    """(ours in pytorch-fid mode, ours in adm mode, pytorch-fid's, the shared random state dict)."""
    ours = fid.FIDInceptionV3("pytorch-fid").eval()
    state = random_state_dict(ours)
    ours.load_state_dict(state)
    adm = fid.FIDInceptionV3("adm").eval()
    adm.load_state_dict(state)
    with pytest.MonkeyPatch.context() as mp:
        theirs = build_pytorch_fid(mp, state)
    return ours, adm, theirs, state


def random_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def assert_rel_close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.abs(expected).max() > 1e-3, "reference features vanished; the test would be vacuous"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


# ----------------------------------------------------------------------------------------------
# The network


def test_state_dict_matches_pytorch_fid_layout(monkeypatch):
    built = []
    real = pytorch_fid_inception._inception_v3
    record = lambda *a, **k: built.append(real(*a, **k)) or built[-1]  # noqa: E731
    monkeypatch.setattr(pytorch_fid_inception, "_inception_v3", record)
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: built[-1].state_dict())
    pytorch_fid_inception.fid_inception_v3()
    theirs = {k: tuple(v.shape) for k, v in built[-1].state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in fid.FIDInceptionV3().state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("size", [32, 64, 299])
def test_pytorch_fid_mode_matches_pytorch_fid(nets, size):
    ours, _, theirs, state = nets
    images = random_images(2, size, size, seed=size)
    with torch.no_grad():
        out = ours(torch.from_numpy(images))
        x01 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        pool_ref = theirs(x01)[0].flatten(1)
    assert_rel_close(out["pool"], pool_ref, 1e-5)
    logits_ref = pool_ref.double() @ state["fc.weight"].double().T
    assert_rel_close(out["logits"], logits_ref, 1e-5)
    if size == 64:  # sFID features: mixed_6/conv = Mixed_6d.branch1x1, first 7 channels, (H, W, C) order
        with torch.no_grad():
            x = 2 * F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False) - 1
            x = theirs.blocks[2][:6](theirs.blocks[1](theirs.blocks[0](x)))
            conv = theirs.blocks[2][6].branch1x1(x)
        assert conv.shape[1:] == (192, 17, 17)
        spatial_ref = conv[:, :7].permute(0, 2, 3, 1).reshape(2, 17 * 17 * 7)
        assert_rel_close(out["spatial"], spatial_ref, 1e-5)


def tf1_resize_loop(img, out_h, out_w):
    """TF1 ResizeBilinear by its definition: source = dst * in/out, no half-pixel offset, clamped border."""
    in_h, in_w = img.shape[-2:]
    out = np.zeros(img.shape[:-2] + (out_h, out_w))
    for y in range(out_h):
        sy = y * in_h / out_h
        y0 = int(math.floor(sy))
        y1, fy = min(y0 + 1, in_h - 1), sy - y0
        for x in range(out_w):
            sx = x * in_w / out_w
            x0 = int(math.floor(sx))
            x1, fx = min(x0 + 1, in_w - 1), sx - x0
            top = img[..., y0, x0] + (img[..., y0, x1] - img[..., y0, x0]) * fx
            bottom = img[..., y1, x0] + (img[..., y1, x1] - img[..., y1, x0]) * fx
            out[..., y, x] = top + (bottom - top) * fy
    return out


@pytest.mark.parametrize("in_h, in_w, out", [(5, 7, 11), (13, 9, 4), (8, 8, 8), (3, 16, 16), (16, 16, 6)])
def test_tf1_resize_matches_definition(in_h, in_w, out):
    img = np.random.default_rng(in_h * in_w).uniform(0, 255, (2, 3, in_h, in_w))
    ours = fid.tf1_resize(torch.from_numpy(img).float(), out).numpy()
    np.testing.assert_allclose(ours, tf1_resize_loop(img, out, out), atol=2e-3)


def test_adm_mode_matches_pytorch_fid_network_on_tf1_input(nets):
    _, adm, theirs, _ = nets
    images = random_images(1, 24, 24, seed=5)
    x = (tf1_resize_loop(images.transpose(0, 3, 1, 2).astype(np.float64), 299, 299) - 128) / 128
    theirs.resize_input = theirs.normalize_input = False
    try:
        with torch.no_grad():
            pool_ref = theirs(torch.from_numpy(x).float())[0].flatten(1)
    finally:
        theirs.resize_input = theirs.normalize_input = True
    with torch.no_grad():
        pool = adm(torch.from_numpy(images))["pool"]
    assert_rel_close(pool, pool_ref, 1e-4)


# ----------------------------------------------------------------------------------------------
# Metrics


def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def test_frechet_equal_covariances_is_squared_mean_difference():
    rng = np.random.default_rng(0)
    sigma, mu1, mu2 = random_spd(20, rng), rng.standard_normal(20), rng.standard_normal(20)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9, abs=1e-9)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 15), rng.uniform(0.1, 3, 15)
    mu1, mu2 = rng.standard_normal(15), rng.standard_normal(15)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_frechet_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    s1, s2 = random_spd(40, rng), random_spd(40, rng)
    mu1, mu2 = rng.standard_normal(40), rng.standard_normal(40)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_rank_deficient_identical_is_zero():
    feats = np.random.default_rng(5).standard_normal((10, 64))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_frechet_non_finite_retries_with_warning_and_non_psd_raises():
    sigma = np.eye(3)
    bad = np.array([[np.nan, 0, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.warns(UserWarning, match="singular"), pytest.raises(ValueError, match="not finite"):
        fid.frechet_distance(np.zeros(3), bad, np.zeros(3), sigma)
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(3), sigma, np.zeros(3), -sigma)
    with pytest.raises(fid.FIDError, match="differ in size"):
        fid.frechet_distance(np.zeros(3), sigma, np.zeros(4), np.eye(4))


def test_inception_score_extremes():
    classes = 8
    same = np.full((40, classes), -30.0)
    same[:, 3] = 30
    assert fid.inception_score(same, split_size=10) == pytest.approx(1.0, abs=1e-9)
    spread = np.full((4 * classes, classes), -30.0)
    spread[np.arange(4 * classes), np.arange(4 * classes) % classes] = 30
    assert fid.inception_score(spread, split_size=2 * classes) == pytest.approx(classes, rel=1e-9)


def test_inception_score_matches_numpy_formula_with_uneven_splits():
    logits = np.random.default_rng(6).standard_normal((23, 5)) * 3
    scores = []
    for start in range(0, 23, 10):
        p = scipy.special.softmax(logits[start : start + 10], axis=1)
        kl = np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), axis=1).mean()
        scores.append(np.exp(kl))
    assert fid.inception_score(logits, split_size=10) == pytest.approx(np.mean(scores), rel=1e-12)


def brute_force_precision_recall(ref, sam, k):
    d = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # noqa: E731
    ref_radii = np.sort(d(ref, ref), axis=1)[:, k]
    sam_radii = np.sort(d(sam, sam), axis=1)[:, k]
    d_rs = d(ref, sam)
    precision = np.mean(np.any(d_rs <= ref_radii[:, None], axis=0))
    recall = np.mean(np.any(d_rs <= sam_radii[None, :], axis=1))
    return precision, recall, ref_radii


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_matches_brute_force(seed):
    # Small integers are exact in float16 and float64, so ties (<=) must agree too.
    rng = np.random.default_rng(seed)
    ref = rng.integers(-3, 4, (30, 6)).astype(np.float32)
    sam = (rng.integers(-3, 4, (37, 6)) + (seed == 2)).astype(np.float32)
    precision, recall, ref_radii = brute_force_precision_recall(ref.astype(np.float64), sam.astype(np.float64), 3)
    radii = fid.manifold_radii(torch.from_numpy(ref), k=3, block=7)
    np.testing.assert_array_equal(radii.numpy(), ref_radii)
    assert fid.precision_recall(ref, sam, k=3, block=7) == pytest.approx((precision, recall), abs=1e-12)
    assert 0 < precision < 1 or 0 < recall < 1


def test_precision_recall_identical_and_far_apart():
    feats = np.random.default_rng(7).standard_normal((50, 16)).astype(np.float32)
    assert fid.precision_recall(feats, feats.copy(), block=16) == (1.0, 1.0)
    assert fid.precision_recall(feats, feats + 1000, block=16) == (0.0, 0.0)  # float16 overflow: float32 path


def test_mean_and_covariance_matches_numpy():
    feats = np.random.default_rng(8).standard_normal((11, 5)).astype(np.float32)
    mu, sigma = fid.mean_and_covariance(feats, block=3)
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Readers and the statistics cache


def write_pngs(folder, images):
    for i, im in enumerate(images):
        sub = folder / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(sub / f"{i:03d}.png")


def test_folder_reader_recursive_sorted_and_checks(tmp_path):
    images = random_images(5, 9, 7, seed=9)
    write_pngs(tmp_path / "imgs", images)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    source = fid.open_source(tmp_path / "imgs", batch_size=2, num_workers=0)
    got = np.concatenate(list(source.batches))
    order = [0, 2, 4, 1, 3]  # part0/000, part0/002, part0/004, part1/001, part1/003
    assert source.count == 5 and np.array_equal(got, images[order])
    Image.fromarray(random_images(1, 4, 4)[0]).save(tmp_path / "imgs" / "part1" / "zz.png")
    with pytest.raises(fid.FIDError, match="differ in size"):
        list(fid.open_source(tmp_path / "imgs", batch_size=8, num_workers=0).batches)
    (tmp_path / "imgs" / "part1" / "zz.png").write_bytes(b"not a png")
    with pytest.raises(fid.FIDError, match="zz.png is not a readable image"):
        list(fid.open_source(tmp_path / "imgs", batch_size=8, num_workers=1).batches)


def test_grayscale_features_match_pytorch_fid_on_replicated_channels(nets, tmp_path):
    """sample.py's Fashion-MNIST .npz (arr_0 (N, 32, 32, 1)) gives pytorch-fid's features of the
    image repeated in R, G and B; a folder of 8-bit grayscale PNGs reads as those RGB images."""
    ours, _, theirs, _ = nets
    gray = random_images(2, 32, 32, seed=16)[..., :1]
    np.savez(tmp_path / "samples.npz", gray, np.arange(2))
    source = fid.open_source(str(tmp_path / "samples.npz"), "samples", batch_size=2)
    pool = fid.extract_features(ours, source.batches, source.count, "cpu", progress=False)["pool"]
    with torch.no_grad():
        x01 = torch.from_numpy(gray).permute(0, 3, 1, 2).float().repeat(1, 3, 1, 1) / 255
        assert_rel_close(pool, theirs(x01)[0].flatten(1), 1e-5)
    write_pngs(tmp_path / "pngs", np.concatenate([gray, gray[::-1]]))
    folder = np.concatenate(list(fid.open_source(tmp_path / "pngs", "samples", batch_size=3).batches))
    np.testing.assert_array_equal(folder, np.repeat(gray[[0, 1, 1, 0]], 3, axis=-1))  # part0/000, 002, part1/001, 003


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_reader_streams_arr_0(tmp_path, save):
    images = random_images(7, 5, 6, seed=10)
    save(tmp_path / "batch.npz", images, np.arange(7))
    source = fid.open_source(str(tmp_path / "batch.npz"), batch_size=3, num_workers=0)
    got = list(source.batches)
    assert source.stats == {} and source.count == 7 and [len(b) for b in got] == [3, 3, 1]
    assert np.array_equal(np.concatenate(got), images)


def test_statistics_cache_round_trips(tmp_path):
    rng = np.random.default_rng(11)
    stats = {"mu": rng.standard_normal(4), "sigma": random_spd(4, rng), "mu_s": rng.standard_normal(3),
             "sigma_s": random_spd(3, rng), "pool": rng.standard_normal((6, 4)).astype(np.float32)}
    path = fid.save_statistics(str(tmp_path / "ref"), stats, "adm")
    assert path.endswith("ref.npz") and not os.path.exists(path + ".tmp")
    loaded = fid.compute_statistics(path, fid.FIDInceptionV3("adm"))
    for key, value in stats.items():
        np.testing.assert_array_equal(loaded[key], value)
    with pytest.raises(fid.FIDError, match="--mode adm"):
        fid.compute_statistics(path, fid.FIDInceptionV3("pytorch-fid"))


def test_evaluate_end_to_end_and_from_cache(nets, tmp_path):
    _, adm, _, _ = nets
    images = random_images(4, 16, 16, seed=12)
    write_pngs(tmp_path / "samples", images)
    np.savez(tmp_path / "ref.npz", images)
    with pytest.warns(UserWarning, match="biased"):
        result = fid.evaluate(str(tmp_path / "samples"), str(tmp_path / "ref.npz"), net=adm, device="cpu",
                              batch_size=3, save_stats=str(tmp_path / "ref_stats.npz"), progress=False)
    cached = np.load(tmp_path / "ref_stats.npz")
    assert cached["pool"].shape == (4, 2048) and cached["sigma_s"].shape == (2023, 2023)
    # rank 3 in 2048 dims: square roots of rounding-level eigenvalues leave ~1e-5 of the trace
    assert abs(result["fid"]) < 1e-4 * np.trace(cached["sigma"])
    assert abs(result["sfid"]) < 1e-4 * np.trace(cached["sigma_s"])
    assert result["precision"] == result["recall"] == 1.0
    logits = cached["pool"].astype(np.float64) @ adm.fc.weight.detach().double().numpy().T
    assert result["inception_score"] == pytest.approx(fid.inception_score(logits), rel=1e-9)
    assert 1 <= result["inception_score"] <= 4
    # From statistics alone (small synthetic mu/sigma keep the eigen decompositions cheap): IS from cached pool.
    np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3), pool=cached["pool"])
    np.savez(tmp_path / "bare.npz", mu=np.ones(3), sigma=4 * np.eye(3))
    with pytest.warns(UserWarning, match="skipped"):
        cached_run = fid.evaluate(str(tmp_path / "small.npz"), str(tmp_path / "bare.npz"), net=adm, device="cpu")
    assert cached_run["fid"] == pytest.approx(3 + 3 * (2 - 1) ** 2, rel=1e-12)
    assert cached_run["inception_score"] == pytest.approx(result["inception_score"], rel=1e-9)
    assert cached_run["sfid"] is cached_run["precision"] is cached_run["recall"] is None


# ----------------------------------------------------------------------------------------------
# Bad arguments and inputs: exit status 2 and one line naming the argument, before any weights are
# looked for (the hub cache is empty and the network unreachable, so reaching them would say so).


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty $TORCH_HOME and no network; a folder of inputs good and bad."""
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    monkeypatch.chdir(tmp_path)
    np.savez("gray.npz", random_images(3, 8, 8)[..., :1], np.arange(3))
    np.savez("float.npz", np.zeros((3, 8, 8, 3), np.float32))
    np.savez("rgba.npz", np.zeros((3, 8, 8, 4), np.uint8))
    np.savez("one.npz", np.zeros((1, 8, 8, 3), np.uint8))
    np.savez("labels.npz", labels=np.arange(3))
    np.savez("stats3.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez("badstats.npz", mu=np.zeros(3), sigma=np.eye(4))
    np.savez("pytorch_fid_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048), mode=np.array("pytorch-fid"))
    (tmp_path / "text.npz").write_text("not a zip")
    os.mkdir("empty")
    return tmp_path


BAD_ARGUMENTS = [  # (argv, words the one line must contain)
    ("gray.npz missing.npz", "REFERENCE missing.npz"),
    ("missing gray.npz", "SAMPLES missing"),
    ("gray.npz empty", "REFERENCE empty"),
    ("float.npz gray.npz", "SAMPLES float.npz arr_0"),
    ("gray.npz rgba.npz", "(N, H, W, 1)"),
    ("gray.npz one.npz", "at least 2"),
    ("labels.npz gray.npz", "SAMPLES labels.npz"),
    ("gray.npz text.npz", "REFERENCE text.npz"),
    ("gray.npz badstats.npz", "REFERENCE badstats.npz"),
    ("gray.npz stats3.npz", "REFERENCE stats3.npz"),
    ("gray.npz pytorch_fid_stats.npz", "--mode pytorch-fid"),
    ("gray.npz", "--save-stats"),
    ("gray.npz gray.npz gray.npz", "SAMPLES REFERENCE"),
    ("gray.npz gray.npz --batch-size 0", "--batch-size"),
    ("gray.npz gray.npz --batch-size two", "--batch-size"),
    ("gray.npz gray.npz --num-workers -1", "--num-workers"),
    ("gray.npz gray.npz --device cuda:7", "--device"),
    ("gray.npz gray.npz --device gpu0", "--device"),
    ("gray.npz gray.npz --mode tf", "--mode"),
    ("gray.npz gray.npz --inception-weights missing.pth", "--inception-weights"),
    ("gray.npz gray.npz --save-stats empty", "--save-stats"),
    ("gray.npz gray.npz --save-stats gray.npz/ref.npz", "--save-stats"),
    ("gray.npz gray.npz", "--inception-weights PATH"),  # all inputs fine: now the missing weights
]


@pytest.mark.parametrize("argv, words", BAD_ARGUMENTS)
def test_bad_argument_is_one_line_exit_2(offline, capsys, argv, words):
    if argv.endswith("--save-stats empty"):
        os.mkdir("empty.npz")
    with pytest.raises(SystemExit) as stop:
        fid.main(argv.split())
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("fid.py: error: ") and err.count("\n") == 1
    assert words in err
    hub_path = os.path.join(str(offline), "torch", "hub", "checkpoints", fid.WEIGHTS_NAME)
    assert (hub_path in err and fid.WEIGHTS_URL in err) == (argv == "gray.npz gray.npz")


def test_bad_argument_end_to_end_has_no_traceback(offline):
    env = dict(os.environ, TORCH_HOME=str(offline / "torch"), OMP_NUM_THREADS="1")
    script = os.path.join(os.path.dirname(__file__), "..", "fid.py")
    done = subprocess.run([sys.executable, script, "float.npz", "gray.npz"], capture_output=True, text=True, env=env,
                          check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()] and "SAMPLES float.npz" in done.stderr


@pytest.mark.parametrize("kwargs, name", [
    ({"batch_size": 0}, "batch_size"), ({"num_workers": -2}, "num_workers"), ({"mode": "tf"}, "mode"),
    ({"device": "cuda:7"}, "device"), ({"weights": "missing.pth"}, "weights"), ({"save_stats": "empty"}, "save_stats"),
    ({"samples": np.zeros((3, 8, 8), np.uint8)}, "samples"), ({"reference": "missing.npz"}, "reference"),
])
def test_evaluate_bad_argument_raises_value_error_naming_it(offline, kwargs, name):
    os.mkdir("empty.npz")
    args = {"samples": "gray.npz", "reference": "gray.npz", **kwargs}
    with pytest.raises(ValueError, match=f"^{name}"):
        fid.evaluate(**args)


# ----------------------------------------------------------------------------------------------
# Weights


def test_weights_load_from_hub_cache_and_cli(nets, tmp_path, monkeypatch, capsys):
    _, _, _, state = nets
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / fid.WEIGHTS_NAME)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fid, "WEIGHTS_SHA256_PREFIX", fid.sha256_prefix(checkpoints / fid.WEIGHTS_NAME))
    net = fid.load_inception(mode="pytorch-fid")
    assert not net.training and net.mode == "pytorch-fid"
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    (tmp_path / "wrong.pth").write_bytes(b"not the weights")
    with pytest.raises(fid.FIDError, match="SHA-256"):
        fid.find_weights(str(tmp_path / "wrong.pth"))
    images = random_images(2, 8, 8, seed=13)
    np.savez(tmp_path / "tiny.npz", images)
    with pytest.warns(UserWarning, match="biased"):
        fid.main([str(tmp_path / "tiny.npz"), "--save-stats", str(tmp_path / "s.npz"), "--device", "cpu",
                  "--num-workers", "0", "--mode", "pytorch-fid"])
    saved = np.load(tmp_path / "s.npz")
    assert str(saved["mode"]) == "pytorch-fid" and saved["pool"].shape == (2, 2048) and saved["mu_s"].shape == (2023,)
    x01 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        pool_ref = build_pytorch_fid(mp, state)(x01)[0].flatten(1).numpy()
    assert_rel_close(saved["pool"], pool_ref, 1e-5)
    np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3), pool=pool_ref)
    np.savez(tmp_path / "bare.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.warns(UserWarning, match="skipped"):
        fid.main([str(tmp_path / "small.npz"), str(tmp_path / "bare.npz"), "--device", "cpu", "--mode", "pytorch-fid"])
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    logits = pool_ref.astype(np.float64) @ state["fc.weight"].double().numpy().T
    assert float(out["FID"]) == 0 and float(out["Inception Score"]) == pytest.approx(fid.inception_score(logits), abs=1e-4)
    assert out["sFID"] == out["Precision"] == out["Recall"] == "skipped"


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_match_pytorch_fid_on_cpu(nets):
    ours, _, theirs, _ = nets
    images = random_images(4, 64, 64, seed=14)
    with torch.no_grad():
        pool = ours.cuda()(torch.from_numpy(images).cuda())["pool"].cpu()
        ours.cpu()
        pool_ref = theirs(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    assert_rel_close(pool, pool_ref, 1e-4)  # IEEE float32 convolutions on the GPU, not TF32
    rng = np.random.default_rng(15)
    ref, sam = rng.integers(-3, 4, (300, 6)).astype(np.float32), rng.integers(-3, 4, (200, 6)).astype(np.float32)
    cuda = fid.precision_recall(torch.from_numpy(ref).cuda(), torch.from_numpy(sam).cuda(), block=64)
    expected = brute_force_precision_recall(ref.astype(np.float64), sam.astype(np.float64), 3)[:2]
    assert cuda == pytest.approx(expected, abs=1e-12)


ADM_PRINTED = {"fid": 3.9426, "sfid": 6.1404, "inception_score": 215.84, "precision": 0.8265, "recall": 0.5309}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_regression_against_adm_evaluator():
    weights, adm_dir = os.environ.get("DIS_FID_WEIGHTS"), os.environ.get("DIS_ADM_DIR")
    samples = os.path.join(adm_dir or "", "admnet_guided_upsampled_imagenet256.npz")
    reference = os.path.join(adm_dir or "", "VIRTUAL_imagenet256_labeled.npz")
    if not (weights and adm_dir and os.path.isfile(weights) and os.path.isfile(samples) and os.path.isfile(reference)):
        pytest.skip("set DIS_FID_WEIGHTS to the weights file and DIS_ADM_DIR to the folder of the ADM batches")
    result = fid.evaluate(samples, reference, weights=weights, device="cuda", batch_size=250, num_workers=0)
    assert result["fid"] == pytest.approx(ADM_PRINTED["fid"], abs=0.01)
    assert result["sfid"] == pytest.approx(ADM_PRINTED["sfid"], abs=0.05)
    assert result["inception_score"] == pytest.approx(ADM_PRINTED["inception_score"], abs=1.0)
    assert result["precision"] == pytest.approx(ADM_PRINTED["precision"], abs=0.002)
    assert result["recall"] == pytest.approx(ADM_PRINTED["recall"], abs=0.002)
