"""The research workflow of train.py on tiny CPU runs: gradient accumulation (against the
gradient of the whole batch, one micro-batch and an uninterrupted run), the TensorBoard
dashboard (read back with tensorboard's own event reader), the FID every N steps (a random
Inception network against samples drawn by sample.py), and two "nodes" joined by torchrun's
c10d rendezvous, one of them with a NaN loss, against one process."""
import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import model as dis
import monitor
import train
from conftest import (DEVICES, REPO, TINY, fashion_arrays, load, one_line_error, tiny_on, write_fashion_subset,
                      write_idx)
from diffusion import create_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")

# Drop path and label dropout draw from each process's own generator, so they are off wherever
# runs that split the batch differently are compared.
DETERMINISTIC = ["--warmup-steps", "0", "--drop-path-rate", "0", "--class-dropout-prob", "0"]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return write_fashion_subset(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="module")
def one_batch(fashion, tmp_path_factory):
    """3 steps of the global batch 8 in one process and one micro-batch: the final checkpoint."""
    results = tmp_path_factory.mktemp("one_batch")
    torch.set_num_threads(1)
    folder = train.main(["--data-path", fashion, *TINY, *DETERMINISTIC, "--max-steps", "3", "--ckpt-every", "3",
                         "--no-tensorboard", "--results-dir", str(results)])
    return load(os.path.join(folder, "checkpoints", "0000003.pt"))


def assert_same_state(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def assert_matches_one_batch(ckpt, one_batch):
    """Weights and EMA equal up to float rounding (the order of the sums differs), and far from
    the initial weights, so the tolerance is not what makes them equal."""
    assert_same_state(ckpt["model"], one_batch["model"], atol=1e-6)
    assert_same_state(ckpt["ema"], one_batch["ema"], atol=1e-6)
    np.testing.assert_allclose(np.array(ckpt["loss_curve"]), np.array(one_batch["loss_curve"]), rtol=1e-5)
    torch.manual_seed(0)
    initial = dis.DiS(**one_batch["config"]).state_dict()
    assert max((one_batch["model"][k] - initial[k]).abs().max().item() for k in initial) > 1e-4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- gradient accumulation

def test_micro_batches_give_the_gradient_of_the_whole_batch():
    """accumulate_gradients under DDP (one gloo process): the mean loss and the gradient of the
    whole batch's mean loss, computed directly, and DDP's all-reduce only in the last backward."""
    torch.manual_seed(0)
    config = dict(img_size=8, patch_size=2, channels=1, embed_dim=16, depth=2, num_classes=10, drop_path_rate=0.0,
                  class_dropout_prob=0.0)
    net, reference = dis.DiS(**config), dis.DiS(**config)
    reference.load_state_dict(net.state_dict())
    diffusion = create_diffusion("", learn_sigma=True)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 3, 9, 1, 4, 4])
    t, noise = torch.tensor([0, 999, 500, 17, 250, 731]), torch.randn(6, 1, 8, 8)
    whole = diffusion.training_losses(reference, x, t, dict(y=y), noise)["loss"].mean()
    whole.backward()

    backwards, reduced_after = [], []
    original = diffusion.training_losses

    def counted(*args, **kwargs):
        backwards.append(1)
        return original(*args, **kwargs)

    def hook(state, bucket):  # records how many micro-batches had run when DDP reduced
        reduced_after.append(len(backwards))
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DDP(net)
        ddp.register_comm_hook(None, hook)
        diffusion.training_losses = counted
        loss = train.accumulate_gradients(ddp, diffusion, (x, y, t, noise), 3)
    finally:
        dist.destroy_process_group()
    assert len(backwards) == 3 and reduced_after and set(reduced_after) == {3}
    torch.testing.assert_close(loss, whole.detach(), rtol=1e-6, atol=0)
    for (name, a), b in zip(reference.named_parameters(), net.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_two_micro_batches_match_one_batch(fashion, tmp_path, one_batch):
    folder = train.main(["--data-path", fashion, *TINY, *DETERMINISTIC, "--max-steps", "3", "--ckpt-every", "3",
                         "--grad-accum-steps", "2", "--no-tensorboard", "--results-dir", str(tmp_path)])
    ckpt = load(os.path.join(folder, "checkpoints", "0000003.pt"))
    assert ckpt["args"]["grad_accum_steps"] == 2 and ckpt["args"]["global_batch_size"] == 8
    assert_matches_one_batch(ckpt, one_batch)
    assert "3 steps of 8 on 1 process(es) in 2 micro-batches" in open(os.path.join(folder, "log.txt")).read()


@pytest.mark.parametrize("device", DEVICES)
def test_resume_with_micro_batches_is_bitexact(fashion, tmp_path, device):
    """4 steps of 2 micro-batches in one go vs 2, a checkpoint and 2 more (drop path and label
    dropout on): the same weights, EMA, optimizer state and generator state, bit for bit (on a
    GPU, with the micro-batches' passes in one CUDA graph)."""
    args = ["--data-path", fashion, *tiny_on(device), "--max-steps", "4", "--ckpt-every", "2",
            "--grad-accum-steps", "2", "--no-tensorboard"]
    whole_dir = train.main(args + ["--results-dir", str(tmp_path / "a")])
    whole = load(os.path.join(whole_dir, "checkpoints", "0000004.pt"))
    half = load(os.path.join(whole_dir, "checkpoints", "0000002.pt"))
    os.remove(os.path.join(whole_dir, "checkpoints", "0000004.pt"))
    resumed_dir = train.main(args + ["--results-dir", str(tmp_path / "a"), "--resume", "auto"])
    resumed = load(os.path.join(resumed_dir, "checkpoints", "0000004.pt"))
    assert resumed_dir == whole_dir and half["step"] == 2 and resumed["step"] == 4
    for key in ("model", "ema"):
        assert_same_state(resumed[key], whole[key])
    for a, b in zip(resumed["opt"]["state"].values(), whole["opt"]["state"].values()):
        assert_same_state(a, b)
    for where in ("cpu", device):
        assert torch.equal(resumed["rng"][0][where], whole["rng"][0][where])
    assert resumed["loss_curve"] == whole["loss_curve"]
    assert ("replay a CUDA graph" in open(os.path.join(whole_dir, "log.txt")).read()) == (device == "cuda")


def test_batch_not_divisible_by_micro_batches_and_processes(fashion, tmp_path, capsys):
    message = one_line_error(["--data-path", fashion, *TINY, "--grad-accum-steps", "3",
                              "--results-dir", str(tmp_path)], train.main)
    assert message.startswith("--global-batch-size 8 is not divisible by --grad-accum-steps 3 x 1 process")
    for flags, words in ((["--grad-accum-steps", "0"], "--grad-accum-steps must be positive"),
                         (["--dataset", "cifar10", "--fid-every", "5"], "--fid-every needs --fid-ref"),
                         (["--fid-every", "-1"], "--fid-every must be >= 0"),
                         (["--fid-sampling-steps", "1"], "--fid-sampling-steps must be in 2..1000, not 1")):
        with pytest.raises(SystemExit) as error:
            train.parse_args(["--data-path", fashion, *TINY, *flags])
        assert error.value.code == 2 and words in capsys.readouterr().err


# ----------------------------------------------------------------------------- the dashboard

def dashboard(run_dir):
    """tensorboard's reader of the run's event files (everything kept, not a sample of it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalars(events, tag):
    return {e.step: e.value for e in events.Scalars(tag)}


def test_dashboard_holds_the_log_and_the_grid(fashion, tmp_path, quick_grids):
    pytest.importorskip("tensorboard")
    args = ["--data-path", fashion, *TINY, "--max-steps", "3", "--sample-every", "3", "--tensorboard",
            "--results-dir", str(tmp_path)]
    folder = train.main(args + ["--ckpt-every", "1"])
    ckpt = load(os.path.join(folder, "checkpoints", "0000003.pt"))
    events = dashboard(folder)
    loss = scalars(events, "train/loss")
    assert list(loss) == [1, 2, 3]
    np.testing.assert_allclose([loss[s] for s, _ in ckpt["loss_curve"]], [v for _, v in ckpt["loss_curve"]],
                               rtol=1e-6)
    log = open(os.path.join(folder, "log.txt")).read()
    for step, value in loss.items():
        assert f"step={step:07d} loss={value:.4f}" in log
    # --warmup-steps 1 of TINY, then the cosine from 1e-4 at step 1 to 0 at step 3.
    np.testing.assert_allclose(list(scalars(events, "train/lr").values()), [1e-4, 0.5e-4, 0], atol=1e-12)
    assert all(v > 0 for v in scalars(events, "train/grad_norm").values())
    assert all(v > 0 for v in scalars(events, "speed/img_per_s").values())
    (image,) = events.Images("samples")
    png = np.asarray(Image.open(os.path.join(folder, "samples", "0000003.png")))
    shown = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    assert image.step == 3 and shown.shape == png.shape + (3,)
    np.testing.assert_array_equal(shown[..., 0], png)

    # Resumed from step 1, logging at step 3 only: what the first launch logged after step 1 is hidden.
    for name in ("0000002.pt", "0000003.pt"):
        os.remove(os.path.join(folder, "checkpoints", name))
    train.main(args + ["--resume", "auto", "--ckpt-every", "3", "--log-every", "3", "--sample-every", "0"])
    assert len(os.listdir(os.path.join(folder, "tensorboard"))) == 2
    resumed = scalars(dashboard(folder), "train/loss")
    assert list(resumed) == [1, 3] and resumed[1] == loss[1]


def test_tensorboard_flag_needs_the_package(fashion, monkeypatch, capsys):
    monkeypatch.setattr(train, "tensorboard_installed", lambda: False)
    assert train.parse_args(["--data-path", fashion, *TINY])[0].tensorboard is False
    with pytest.raises(SystemExit) as error:
        train.parse_args(["--data-path", fashion, *TINY, "--tensorboard"])
    assert error.value.code == 2 and "--tensorboard needs the tensorboard package" in capsys.readouterr().err


# ----------------------------------------------------------------------------- FID during training

def low_rank_trace_sqrt_product(sigma1, sigma2):
    """tr sqrt(sigma1 sigma2), exactly, for a sigma1 of rank below 8 (the covariance of 4 samples),
    in 8 dimensions instead of 2048: with Q an orthonormal basis of sigma1's range, sigma1 = Q B Q^T,
    and sqrt(sigma1) sigma2 sqrt(sigma1) has the eigenvalues of sqrt(B) Q^T sigma2 Q sqrt(B) and zeros."""
    q, _ = np.linalg.qr(sigma1 @ np.random.default_rng(0).standard_normal((len(sigma1), 8)))
    w, v = np.linalg.eigh(q.T @ sigma1 @ q)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ q.T @ sigma2 @ q @ root)
    return np.sqrt(np.clip(eig, 0, None)).sum()


def test_low_rank_trace_matches_fid_py():
    import fid
    rng = np.random.default_rng(3)
    features = rng.standard_normal((4, 300))
    sigma1, sigma2 = np.cov(features, rowvar=False), np.cov(rng.standard_normal((6, 300)), rowvar=False)
    # fid.py sums the square roots of ~296 rounding-level eigenvalues too: ~1e-7 each
    assert low_rank_trace_sqrt_product(sigma1, sigma2) == pytest.approx(fid.trace_sqrt_product(sigma1, sigma2),
                                                                          rel=1e-6)


def test_fid_every_n_steps(fashion, tmp_path, monkeypatch):
    """--fid-every 1 over 2 steps, with a random Inception network (the real weights are a
    download) and a reference of FID statistics only (mu, sigma: one Frechet distance per
    evaluation, no sFID), computed by fid.py from the samples sample.py draws from an identical
    run's last checkpoint: the last FID is 0, the first is not, and training is as without FID."""
    import fid
    import sample
    from test_fid import random_state_dict  # activations of O(1) through the network: features that differ
    inception = random_state_dict(fid.FIDInceptionV3("adm"))

    def random_inception(weights=None, mode="adm", device="cpu"):
        net = fid.FIDInceptionV3(mode)
        net.load_state_dict(inception)
        return net.eval().to(device)
    monkeypatch.setattr(fid, "find_weights", lambda path=None: "unused")
    monkeypatch.setattr(fid, "load_inception", random_inception)
    monkeypatch.setattr(fid, "trace_sqrt_product", low_rank_trace_sqrt_product)  # 2048-dim eigh: minutes on 2 cores
    args = ["--data-path", fashion, *TINY, "--max-steps", "2", "--ckpt-every", "2", "--lr", "1e-2",
            "--fid-samples", "4", "--fid-sampling-steps", "10"]
    plain = train.main(args + ["--no-tensorboard", "--results-dir", str(tmp_path / "plain")])
    drawn = sample.main(["--ckpt", os.path.join(plain, "checkpoints", "0000002.pt"), "--device", "cpu",
                         "--num-samples", "4", "--num-sampling-steps", "10", "--sample-dir", str(tmp_path / "drawn")])
    with np.load(drawn) as npz:
        reference = npz["arr_0"]
    with pytest.warns(UserWarning, match="biased"):
        stats = fid.compute_statistics(reference, random_inception(), progress=False)
    np.savez(tmp_path / "reference.npz", mu=stats["mu"], sigma=stats["sigma"])

    with pytest.warns(UserWarning, match="biased"):
        folder = train.main(args + ["--fid-ref", str(tmp_path / "reference.npz"), "--fid-every", "1",
                                    "--results-dir", str(tmp_path / "fid")])
    for key in ("model", "ema"):
        assert_same_state(load(os.path.join(folder, "checkpoints", "0000002.pt"))[key],
                          load(os.path.join(plain, "checkpoints", "0000002.pt"))[key])
    name = "ema-ddpm10-cfg1-seed0-n4"
    saved = sorted(os.listdir(os.path.join(folder, "fid")))
    assert saved == [f"0000001-{name}.json", f"0000001-{name}.png", f"0000002-{name}.json", f"0000002-{name}.npz",
                     f"0000002-{name}.png", "reference-stats.npz"]  # the periodic .npz is deleted once measured
    with np.load(os.path.join(folder, "fid", f"0000002-{name}.npz")) as npz:
        np.testing.assert_array_equal(npz["arr_0"], reference)
    metrics = {step: json.load(open(os.path.join(folder, "fid", f"{step:07d}-{name}.json")))["metrics"]
               for step in (1, 2)}
    assert metrics[2]["fid"] == pytest.approx(0, abs=1e-3) and metrics[1]["fid"] > 1e-2
    log = open(os.path.join(folder, "log.txt")).read()
    for step in (1, 2):
        assert f"step={step:07d} fid={metrics[step]['fid']:.4f}" in log
    if train.tensorboard_installed():  # on by default then: the dashboard shows them too
        np.testing.assert_allclose(list(scalars(dashboard(folder), "fid/fid").values()),
                                   [metrics[1]["fid"], metrics[2]["fid"]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_yardstick_every_n_steps(tmp_path, monkeypatch, device):
    """On 32x32 Fashion-MNIST, --fid-every without --fid-ref measures the yardstick of the EMA
    samples (a classifier of 150 steps here, trained once and cached), every step and at the end
    (on a GPU, between the replays of the steps' CUDA graph)."""
    yardstick = pytest.importorskip("yardstick")
    folder = write_fashion_subset(tmp_path / "fashion")
    images, labels = fashion_arrays(32)  # stand in for the test split, the yardstick's reference
    write_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), labels)
    small = {**yardstick.SETTINGS, "width": 8, "features": 8, "steps": 150, "batch_size": 16, "train_images": 32,
             "test_images": 32}
    original = yardstick.evaluate
    monkeypatch.setattr(yardstick, "evaluate", lambda *args, **kwargs: original(
        *args, **kwargs, settings=small, cache_dir=str(tmp_path / "cache")))
    args = ["--data-path", folder, *tiny_on(device), "--image-size", "32", "--model", "DiS-S/8",  # 16 tokens
            "--global-batch-size", "2", "--max-steps", "2",
            "--fid-samples", "4", "--fid-sampling-steps", "2", "--no-tensorboard", "--results-dir", str(tmp_path / "r")]
    message = one_line_error(args + ["--fid-every", "1", "--image-size", "16"], train.main)
    assert "yardstick, which takes 32x32 images in pixel space, not 16x16" in message
    run = train.main(args + ["--fid-every", "1"])
    name = "ema-ddpm2-cfg1-seed0-n4"
    assert sorted(os.listdir(os.path.join(run, "fid"))) == [
        f"0000001-{name}.json", f"0000001-{name}.png", f"0000002-{name}.json", f"0000002-{name}.npz",
        f"0000002-{name}.png"]
    with np.load(os.path.join(run, "fid", f"0000002-{name}.npz")) as npz:
        expected = original(npz["arr_0"], npz["arr_1"], settings=small, cache_dir=str(tmp_path / "cache"),
                            progress=False)
    metrics = json.load(open(os.path.join(run, "fid", f"0000002-{name}.json")))["metrics"]
    assert metrics == {"yardstick_fd": expected["fd"], "yardstick_accuracy": expected["accuracy"]}
    assert metrics["yardstick_fd"] > 0 and 0 <= metrics["yardstick_accuracy"] <= 1
    log = open(os.path.join(run, "log.txt")).read()
    assert f"step=0000002 yardstick_fd={expected['fd']:.4f} yardstick_accuracy={expected['accuracy']:.4f}" in log
    assert "step=0000001 yardstick_fd=" in log and " fid=" not in log
    assert ("Step 2 on: the forward and backward passes replay a CUDA graph" in log) == (device == "cuda")


# ----------------------------------------------------------------------------- several machines

@pytest.mark.slow
def test_two_nodes_match_one_process(fashion, tmp_path, monkeypatch):
    """Two torchrun agents, each a "node" with one gloo process, joined by a c10d rendezvous on
    localhost (as on two machines: global ranks 0 and 1, LOCAL_RANK 0 on both), each process
    taking its half of the global batch of 8 in 2 micro-batches, against one process with the
    whole batch at once: the same weights after 3 steps. Step 2 has a NaN loss in one micro-batch
    of rank 1 only (on the whole batch in one process): every rank must skip the step."""
    from test_train import poison_step
    args = ["--data-path", fashion, *TINY, *DETERMINISTIC, "--max-steps", "3", "--ckpt-every", "3",
            "--no-tensorboard"]
    wrapper = tmp_path / "poisoned_train.py"
    wrapper.write_text(
        "import sys\n"
        f"sys.path[:0] = [{REPO!r}, {os.path.dirname(os.path.abspath(__file__))!r}]\n"
        "import pytest, test_train, train\n"
        "with pytest.MonkeyPatch.context() as mp:\n"
        "    test_train.poison_step(mp, 3, ranks={'1'})  # step 2's first micro-batch\n"
        "    train.main(sys.argv[1:])\n")
    endpoint = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
         "--rdzv-conf", f"is_host={int(node == 0)}", str(wrapper), *args, "--grad-accum-steps", "2",
         "--results-dir", str(tmp_path / "two")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    poison_step(monkeypatch, 2, ranks={"0"})
    one = load(os.path.join(train.main(args + ["--results-dir", str(tmp_path / "one")]), "checkpoints", "0000003.pt"))
    (name,) = os.listdir(tmp_path / "two")
    two = load(os.path.join(tmp_path, "two", name, "checkpoints", "0000003.pt"))
    assert one["nonfinite"] == two["nonfinite"] == 1 and len(two["rng"]) == 2
    assert_matches_one_batch(two, one)
    (launch,) = json.load(open(os.path.join(tmp_path, "two", name, "run.json")))
    assert launch["world_size"] == 2 and launch["rank_seeds"] == [0, 1]


BARRIER_SCRIPT = """
import datetime, sys, time
import torch.distributed as dist
import distributed
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=3))
distributed.barrier()
if rank == 0:
    time.sleep(6)  # working alone, as rank 0 does on the first FID evaluation
distributed.barrier()
dist.destroy_process_group()
"""


def test_barrier_outlasts_the_process_groups_timeout(tmp_path):
    """A rank waiting at distributed.barrier() while rank 0 works alone for longer than the process
    group's timeout (3 s here; NCCL's default is 10 minutes) goes on waiting instead of ending
    the run: the barrier has a gloo group of its own with a timeout of hours."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER_SCRIPT, str(rank), str(tmp_path / "store")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
