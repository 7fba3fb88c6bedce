"""train.py end to end on tiny configurations (CPU): data pipeline against numpy/PIL, resume
equals an uninterrupted run, the latent path with a random SD-architecture VAE against
diffusers' own encoder, stopping, and the errors. torchrun's processes against one process:
test_workflow.py."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import diffusion
import memory
import model as dis
import recompute
import train
from conftest import (DEVICES, REPO, TINY, fashion_arrays, load, one_line_error, tiny_on,  # noqa: F401
                      write_fashion_subset)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return write_fashion_subset(tmp_path_factory.mktemp("fashion"))


def run_dir(results):
    (name,) = os.listdir(results)
    return os.path.join(results, name)


def assert_same_state(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def poison_step(monkeypatch, call, ranks):
    """Make the loss of the `call`-th training step NaN on the given ranks ('0' in one process)."""
    original = diffusion.GaussianDiffusion.training_losses
    calls = []

    def poisoned(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == call and os.environ.get("RANK", "0") in ranks:
            terms["loss"] = terms["loss"] * float("nan")
        return terms
    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_losses", poisoned)


# ----------------------------------------------------------------------------- data

def test_fashion_mnist_pipeline_matches_numpy_and_pil(fashion):
    images, labels = fashion_arrays(32)
    source, where = data.load_dataset("fashion-mnist", fashion, 32, torch.device("cpu"), download=False)
    assert where == fashion and len(source) == 32
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # 28 -> 32 with black
    np.testing.assert_array_equal(source.images[:, 0].numpy(), padded)
    np.testing.assert_array_equal(source.labels.numpy(), labels)
    # Batches: scaled to [-1, 1], mirrored where asked.
    idx, flip = torch.tensor([3, 0, 7]), torch.tensor([True, False, True])
    x, y = source.get(idx, flip, torch.device("cpu"))
    expected = padded[[3, 0, 7]].astype(np.float32) / 127.5 - 1
    expected[[0, 2]] = expected[[0, 2], :, ::-1]
    np.testing.assert_allclose(x[:, 0].numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), labels[[3, 0, 7]])
    # Other sizes: antialiased bilinear like PIL's, to one grey level.
    small = data.load_dataset("fashion-mnist", fashion, 16, torch.device("cpu"))[0].images[:, 0].numpy().astype(int)
    pil = np.stack([np.asarray(Image.fromarray(p).resize((16, 16), Image.BILINEAR)) for p in padded]).astype(int)
    assert np.abs(small - pil).max() <= 1


def test_batch_plan_covers_each_epoch_and_splits_over_ranks():
    n, batch = 20, 6  # 3 steps per epoch, 2 images dropped
    single = data.batch_plan(n, batch, 0, 1, seed=5, start_step=0)
    halves = [data.batch_plan(n, batch, r, 2, seed=5, start_step=0) for r in range(2)]
    for step in range(7):
        idx, flip = next(single)
        parts = [next(h) for h in halves]
        assert torch.equal(idx, torch.cat([p[0] for p in parts]))
        assert torch.equal(flip, torch.cat([p[1] for p in parts]))
        if step % 3 == 0:
            seen = []
        seen += idx.tolist()
        if step % 3 == 2:
            assert len(set(seen)) == 18  # no image twice in an epoch
    resumed = data.batch_plan(n, batch, 0, 1, seed=5, start_step=4)
    fresh = data.batch_plan(n, batch, 0, 1, seed=5, start_step=0)
    for _ in range(4):
        next(fresh)
    assert torch.equal(next(resumed)[0], next(fresh)[0])


def test_lr_and_ema_schedules():
    lrs = [train.lr_factor(s, warmup=4, total=12) for s in range(13)]
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(lrs[4:], 0.5 * (1 + np.cos(np.pi * np.arange(9) / 8)), atol=1e-12)
    assert train.ema_decay(0, 0.9999) == pytest.approx(0.1) and train.ema_decay(10 ** 6, 0.9999) == 0.9999


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = dis.DiS(img_size=8, patch_size=2, channels=1, embed_dim=16, depth=4, num_classes=10, drop_path_rate=0.2)
    checkpointed = dis.DiS(img_size=8, patch_size=2, channels=1, embed_dim=16, depth=4, num_classes=10,
                           drop_path_rate=0.2)
    checkpointed.load_state_dict(plain.state_dict())
    train.checkpoint_blocks(checkpointed)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 200, 500, 999]), torch.tensor([0, 3, 9, 10])
    for net in (plain, checkpointed):
        torch.manual_seed(1)  # the same drop-path masks; the recomputation replays them
        net(x, t, y).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("device", DEVICES)
def test_resume_equals_uninterrupted_run(fashion, tmp_path, quick_grids, device):
    """6 steps in one go vs 3 steps, checkpoint, resume for 3 more: same losses, weights, EMA,
    optimizer and RNG states, bitwise (drop path and label dropout on, an epoch boundary at 4).
    On a GPU the steps replay a CUDA graph from the second of each process on."""
    args = ["--data-path", fashion, *tiny_on(device), "--max-steps", "6", "--ckpt-every", "3", "--sample-every", "6"]
    first = train.main(args + ["--results-dir", str(tmp_path / "a")])
    assert os.path.basename(first) == "000-DiS-S-2"
    whole = load(os.path.join(first, "checkpoints", "0000006.pt"))
    copy_dir = tmp_path / "b" / "000-DiS-S-2" / "checkpoints"
    copy_dir.mkdir(parents=True)
    shutil.copy(os.path.join(first, "checkpoints", "0000003.pt"), copy_dir)
    second = train.main(args + ["--results-dir", str(tmp_path / "b"), "--resume", "auto"])
    assert second == str(tmp_path / "b" / "000-DiS-S-2")
    resumed = load(os.path.join(second, "checkpoints", "0000006.pt"))

    assert resumed["step"] == whole["step"] == 6
    assert [s for s, _ in whole["loss_curve"]] == list(range(1, 7))
    assert resumed["loss_curve"] == whole["loss_curve"]
    for key in ("model", "ema"):
        assert_same_state(resumed[key], whole[key])
    for a, b in zip(resumed["opt"]["state"].values(), whole["opt"]["state"].values()):
        assert_same_state(a, b)
    assert resumed["scheduler"] == whole["scheduler"]
    for where in ("cpu", device):
        assert torch.equal(resumed["rng"][0][where], whole["rng"][0][where])
    assert whole["data"] == dict(seed=0, epoch=1, batch_in_epoch=2, dataset_size=32, global_batch_size=8)
    assert not torch.equal(whole["ema"]["pos_embed"], whole["model"]["pos_embed"])

    # The run folder: DiT's layout, the log, the final grid, the launch record.
    assert sorted(os.listdir(os.path.join(first, "checkpoints"))) == ["0000003.pt", "0000006.pt"]
    log = open(os.path.join(first, "log.txt")).read()
    for field in ("step=0000006 loss=", "grad_norm=", "lr=", "img/s="):
        assert field in log
    assert ("Step 2 on: the forward and backward passes replay a CUDA graph" in log) == (device == "cuda")
    grid = Image.open(os.path.join(first, "samples", "0000006.png"))
    assert grid.mode == "L" and grid.size == (2 + 10 * 10, 2 + 10 * 10)  # 10 classes x 10, 8x8 each
    (launch,) = json.load(open(os.path.join(first, "run.json")))
    assert launch["rank_seeds"] == [0] and torch.__version__.startswith(launch["versions"]["torch"])
    assert len(json.load(open(os.path.join(second, "run.json")))) == 1  # the copied folder had none


def random_vae(folder):
    """A randomly initialised AutoencoderKL of Stable Diffusion's architecture, tiny: 3 levels
    (downsampling 4), 4 latent channels."""
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(folder)
    return vae.eval()


@pytest.mark.parametrize("device", DEVICES)
def test_latent_space_with_random_vae(fashion, tmp_path, quick_grids, device):
    """--cache-latents holds the diffusers posterior means of every image and of its mirror image;
    training runs from the cache, on the fly, and from the cache folder as --dataset latents. On a
    GPU the steps from the cache replay a CUDA graph, those that encode each batch do not."""
    vae_dir = str(tmp_path / "vae")
    vae = random_vae(vae_dir)
    common = ["--data-path", fashion, *tiny_on(device), "--image-size", "32", "--vae", vae_dir, "--max-steps", "2",
              "--ckpt-every", "2"]
    cache = tmp_path / "cache"
    cached_run = train.main(common + ["--cache-latents", "--cache-dir", str(cache), "--sample-every", "2",
                                      "--results-dir", str(tmp_path / "r")])
    latents = np.load(cache / "latents.npy")
    assert latents.shape == (32, 2, 4, 8, 8) and latents.dtype == np.float16
    images, labels = fashion_arrays(32)
    np.testing.assert_array_equal(np.load(cache / "labels.npy"), labels)
    x = torch.from_numpy(np.pad(images[:6], ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 127.5 - 1)
    x = x[:, None].repeat(1, 3, 1, 1)  # grayscale as RGB
    with torch.no_grad():
        for mirrored in (0, 1):
            mean = vae.encode(x.flip(-1) if mirrored else x).latent_dist.mean * vae.config.scaling_factor
            np.testing.assert_allclose(latents[:6, mirrored].astype(np.float32), mean.numpy(), rtol=2e-3, atol=2e-3)
    ckpt = load(os.path.join(cached_run, "checkpoints", "0000002.pt"))
    assert ckpt["config"]["channels"] == 4 and ckpt["config"]["img_size"] == 8 and ckpt["args"]["vae"] == vae_dir
    grid = Image.open(os.path.join(cached_run, "samples", "0000002.png"))
    assert grid.mode == "RGB" and grid.size == (2 + 10 * 34, 2 + 10 * 34)  # decoded to 32x32 RGB

    on_the_fly = train.main(common + ["--results-dir", str(tmp_path / "fly")])  # encoding each batch
    for run, graphed in ((cached_run, device == "cuda"), (on_the_fly, False)):
        assert ("replay a CUDA graph" in open(os.path.join(run, "log.txt")).read()) == graphed
    latents_run = train.main(["--dataset", "latents", "--data-path", str(cache), *tiny_on(device), "--image-size", "32",
                              "--max-steps", "1", "--results-dir", str(tmp_path / "lat")])  # no VAE needed
    ckpt = load(os.path.join(latents_run, "checkpoints", "0000001.pt"))
    assert ckpt["args"]["num_classes"] == 10 and ckpt["config"]["channels"] == 4


def slow_step(monkeypatch, call, seconds, signal_self=None):
    """Make the `call`-th training step take `seconds` longer (a sleep, which signals interrupt
    as they would a long computation), sending this process `signal_self` first."""
    original = diffusion.GaussianDiffusion.training_losses
    calls = []

    def slow(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if signal_self:
                os.kill(os.getpid(), signal_self)
            time.sleep(seconds)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_losses", slow)


def test_first_signal_is_acknowledged_and_stops_after_the_step(fashion, tmp_path, monkeypatch, capfd):
    """SIGTERM during step 2: acknowledged at once, step 2 completes, its checkpoint is saved,
    exit status 143 (128 + SIGTERM) and the command that continues the run."""
    slow_step(monkeypatch, 2, 1.0, signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        train.main(["--data-path", fashion, *TINY, "--max-steps", "1000", "--results-dir", str(tmp_path)])
    out, err = capfd.readouterr()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "SIGTERM: stopping after this step, saving a checkpoint in" in err
    checkpoint = os.path.join(run_dir(tmp_path), "checkpoints", "0000002.pt")
    assert os.listdir(os.path.dirname(checkpoint)) == ["0000002.pt"] and load(checkpoint)["step"] == 2
    assert f"Stopped by SIGTERM at step 2; continue with: python train.py --resume {checkpoint}" in out
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are given back


def test_second_signal_stops_at_once(fashion, tmp_path):
    """Two SIGINTs (Ctrl-C twice) during a step that would take a minute: both acknowledged at
    once, exit status 130 without finishing the step; the previous checkpoint stays complete."""
    wrapper = tmp_path / "slow_train.py"
    wrapper.write_text(
        "import sys\n"
        f"sys.path[:0] = [{REPO!r}, {os.path.dirname(os.path.abspath(__file__))!r}]\n"
        "import pytest, test_train, train\n"
        "with pytest.MonkeyPatch.context() as mp:\n"
        "    test_train.slow_step(mp, 2, 60)\n"
        "    train.main(sys.argv[1:])\n")
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(wrapper), "--data-path", fashion, *TINY, "--max-steps", "1000",
                                 "--ckpt-every", "1", "--log-every", "1000", "--results-dir", str(tmp_path / "r")],
                                cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
    for line in proc.stdout:
        if "Saved checkpoint" in line and "0000001.pt" in line:  # step 2 is sleeping now
            break
    proc.send_signal(signal.SIGINT)
    started = time.time()
    while "SIGINT: stopping after this step" not in err.read_text():
        assert time.time() - started < 30, err.read_text()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=50)
    assert proc.returncode == 130 and "SIGINT again: stopping at once" in err.read_text()
    folder = os.path.join(run_dir(tmp_path / "r"), "checkpoints")
    assert os.listdir(folder) == ["0000001.pt"] and load(os.path.join(folder, "0000001.pt"))["step"] == 1


def test_resume_auto_takes_the_newest_run_and_says_so(fashion, tmp_path, capsys):
    common = ["--data-path", fashion, *TINY, "--results-dir", str(tmp_path), "--max-steps", "1"]
    capsys.readouterr()
    train.main(common + ["--resume", "auto"])
    assert f"--resume auto: no checkpoint in {tmp_path}, starting a new run" in capsys.readouterr().out
    other = train.main(common + ["--model", "DiS-S/4"])
    resumed = train.main(common + ["--resume", "auto", "--max-steps", "2"])  # any model: the newest run
    assert resumed == other and os.path.basename(other) == "001-DiS-S-4"
    assert f"--resume auto: resuming {os.path.join(other, 'checkpoints', '0000001.pt')}" in capsys.readouterr().out
    first = train.main(common + ["--resume", "auto", "--max-steps", "2", "--model", "DiS-S/2"])
    assert os.path.basename(first) == "000-DiS-S-2"
    assert sorted(os.listdir(os.path.join(first, "checkpoints"))) == ["0000001.pt", "0000002.pt"]


def test_cpu_defaults_are_the_small_preset_and_flags_win():
    args, parser = train.parse_args(["--device", "cpu"])
    assert args.preset == "small" and parser.get_default("model") == train.SMALL_PRESET["model"]
    assert {k: getattr(args, k) for k in train.SMALL_PRESET if k != "model"} == {
        k: v for k, v in train.SMALL_PRESET.items() if k != "model"}
    args, parser = train.parse_args(["--device", "cpu", "--global-batch-size", "7", "--model", "DiS-B/2"])
    assert args.global_batch_size == 7 and args.model == "DiS-B/2" and args.lr == train.SMALL_PRESET["lr"]
    args, parser = train.parse_args(["--device", "cpu", "--preset", "paper"])
    paper = (parser.get_default("model"), args.global_batch_size, args.lr, args.max_steps)
    assert paper == ("DiS-S/2", 128, 1e-4, None)


def test_max_minutes_stops_cleanly_with_checkpoint_and_grid(fashion, tmp_path, quick_grids):
    folder = train.main(["--data-path", fashion, *TINY, "--max-steps", "1000", "--max-minutes", "0",
                         "--sample-every", "500", "--results-dir", str(tmp_path)])
    assert os.listdir(os.path.join(folder, "checkpoints")) == ["0000001.pt"]
    assert os.listdir(os.path.join(folder, "samples")) == ["0000001.png"]
    assert "Time budget of --max-minutes reached at step 1" in open(os.path.join(folder, "log.txt")).read()


def test_recompute_scan_inputs_runs_and_is_logged(fashion, tmp_path):
    folder = train.main(["--data-path", fashion, *TINY, "--max-steps", "1", "--recompute-scan-inputs",
                         "--results-dir", str(tmp_path)])
    assert ", u recomputed" in open(os.path.join(folder, "log.txt")).read()
    assert os.listdir(os.path.join(folder, "checkpoints")) == ["0000001.pt"]


def test_repeated_nonfinite_losses_stop_with_a_checkpoint(fashion, tmp_path, monkeypatch):
    for call in range(1, 5):
        poison_step(monkeypatch, call, ranks={"0"})
    with pytest.raises(SystemExit, match=r"3 non-finite steps in a row \(more than --max-nonfinite 2\)"):
        train.main(["--data-path", fashion, *TINY, "--max-steps", "10", "--max-nonfinite", "2",
                    "--results-dir", str(tmp_path)])
    ckpt = load(os.path.join(run_dir(tmp_path), "checkpoints", "0000003.pt"))
    torch.manual_seed(0)
    assert_same_state(ckpt["model"], dis.DiS(**ckpt["config"]).state_dict())  # no update was applied
    assert ckpt["nonfinite"] == 3


def test_corrupt_image_is_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(folder / f"{i:06d}.jpg")
    (folder / "000007.jpg").write_bytes(b"not a jpeg")
    run = train.main(["--dataset", "celeba", "--data-path", str(folder), *TINY, "--max-steps", "1",
                      "--results-dir", str(tmp_path / "r")])
    assert f"skipping unreadable image {folder / '000007.jpg'}" in open(os.path.join(run, "log.txt")).read()


def test_error_vae_missing_offline(fashion, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--data-path", fashion, *TINY,
                           "--vae", "ema", "--results-dir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot load the VAE 'stabilityai/sd-vae-ft-ema'" in done.stderr and "--vae DIR" in done.stderr


def test_out_of_memory_gives_a_hint(fashion, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_losses", out_of_memory)
    message = one_line_error(["--data-path", fashion, *TINY, "--results-dir", str(tmp_path)], train.main)
    assert "--global-batch-size" in message and "--grad-checkpointing" in message and "bf16" in message
    assert "--recompute-scan-inputs" in message and "--no-cuda-graphs" not in message  # a CPU run has no graph
    graphed = train.argparse.Namespace(scan_save_every="auto", cuda_graphs=True, recompute_scan_inputs=False,
                                       grad_checkpointing=False, compile=False, precision="bf16")
    assert memory.oom_advice(graphed, "cuda") == ("lower --global-batch-size, use --scan-save-every 0, use "
                                                  "--no-cuda-graphs, add --recompute-scan-inputs or add "
                                                  "--grad-checkpointing")


def test_activation_estimate_counts_what_autograd_keeps(monkeypatch):
    """The memory check's estimate (meta device, two shallow models, extrapolated) against the
    tensors a real CPU forward keeps for its backward pass, counted by their storage through a
    pack hook with the mixers' Recomputed blocks disabled (they stand down under outer hooks);
    with them, less each mixer's Delta, and with recompute_scan_inputs its u too (each
    (batch, L, 2, E) float32)."""
    config = dict(img_size=8, patch_size=2, channels=1, embed_dim=16, depth=6, num_classes=10)
    torch.manual_seed(0)
    model = dis.DiS(**config)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(5, 1, 8, 8), torch.tensor([1, 500, 999, 0, 3]), torch.tensor([0, 3, 10, 9, 9]))
    mixers, tokens, E = 6 + 1, 2 + (8 // 2) ** 2, 2 * 16
    per_mixer = 5 * tokens * 2 * E * 4  # Delta, or u
    with monkeypatch.context() as m:
        m.setattr(dis, "Recomputed", lambda: recompute.Recomputed(enabled=False))
        memory._probe.cache_clear()
        assert memory.activation_bytes(config, 5) == sum(kept.values())
    memory._probe.cache_clear()
    assert memory.activation_bytes(config, 5) == sum(kept.values()) - mixers * per_mixer
    recomputed = memory.activation_bytes({**config, "recompute_scan_inputs": True}, 5)
    assert recomputed == sum(kept.values()) - 2 * mixers * per_mixer


def test_scan_states_bytes_are_what_the_cuda_scan_allocates():
    """--scan-save-every auto's figure for the chunk states against the CUDA scan's own allocation
    rule (the shape its fake implementation gives torch.compile), summed over the mixers."""
    import scan_cuda
    model = dis.DiS(img_size=8, patch_size=2, channels=1, embed_dim=16, depth=4, num_classes=10)
    L, E = 2 + (8 // 2) ** 2, 2 * 16
    u = torch.empty(3, L, 2, E, dtype=torch.bfloat16, device="meta")
    _, states = scan_cuda._fwd_fake(u, u, None, None, None, None, None, None, True, 1, torch.bfloat16, False)
    assert memory.scan_states_bytes(model, 3, 2) == 5 * states.numel() * 2


@pytest.mark.parametrize("free_gib, checkpointed, kept", [(30, False, True), (12, False, False), (12, True, True)])
def test_auto_decides_from_the_peak_and_the_states(monkeypatch, free_gib, checkpointed, kept):
    """keep_scan_states against the rule stated: keep (save_every=1 on every mixer) when the
    first step's peak plus the states (one of the 3 blocks' with gradient checkpointing) fit in
    80% of free plus reserved memory (the CUDA queries stood in for: a 10 GiB peak, 2 GiB
    reserved)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_gib * gib, 40 * gib))
    model = dis.DiS(img_size=8, patch_size=2, channels=1, embed_dim=16, depth=2, num_classes=10)
    states = memory.scan_states_bytes(model, 2**16, 2) // (3 if checkpointed else 1)  # batch 65,536: 1.9 GiB
    assert (10 * gib + states <= 0.8 * (free_gib + 2) * gib) == kept
    line = memory.keep_scan_states(model, 2**16, 2, torch.device("cpu"), checkpointed)
    assert ("kept from now on" in line) == kept and f"{states / gib:.1f} GiB" in line
    assert all(m.scan_save_every == (1 if kept else 0) for m in model.modules() if isinstance(m, dis.BiMamba))


@pytest.mark.gpu
def test_auto_keeps_the_scan_states_when_they_fit():
    """After a step without kept states, keep_scan_states sets save_every=1 on every mixer when
    the peak plus the states fit in the share of the GPU given, and leaves 0 when they do not."""
    model = dis.DiS(img_size=8, patch_size=2, channels=1, embed_dim=16, depth=2, num_classes=10).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.randn(4, 1, 8, 8, device="cuda"), torch.tensor([1, 2, 3, 4]).cuda(),
              torch.tensor([0, 1, 2, 3]).cuda()).float().sum().backward()
    mixers = [m for m in model.modules() if isinstance(m, dis.BiMamba)]
    assert "do not fit" in memory.keep_scan_states(model, 4, 2, torch.device("cuda"), share=1e-9)
    assert all(m.scan_save_every == 0 for m in mixers)
    assert "kept from now on" in memory.keep_scan_states(model, 4, 2, torch.device("cuda"))
    assert all(m.scan_save_every == 1 for m in mixers)


def test_cuda_graphs_by_default_where_a_graph_holds_the_step():
    """--cuda-graphs unset: on with one process on a GPU, off with several processes, on a CPU, with
    --compile, --grad-checkpointing or the VAE encoding each batch; set, it is obeyed or refused."""
    def graphs(flag=None, world=1, device="cuda", encode_batches=False, **flags):
        args = train.argparse.Namespace(cuda_graphs=flag, **{"compile": False, "grad_checkpointing": False, **flags})
        return train.use_cuda_graphs(args, world, torch.device(device), encode_batches)
    assert graphs() and not graphs(world=2) and not graphs(device="cpu") and not graphs(encode_batches=True)
    assert not graphs(compile=True) and not graphs(grad_checkpointing=True) and not graphs(False)
    assert graphs(True)
    with pytest.raises(SystemExit, match="add --cache-latents"):
        graphs(True, encode_batches=True)


@pytest.mark.gpu
def test_cuda_graphs_train_as_eager_steps(fashion, tmp_path):
    """On one GPU the steps replay their forward and backward passes as a CUDA graph (from step 2,
    once --scan-save-every auto has settled): the same losses, weights and EMA as eager steps
    (--no-cuda-graphs), bit for bit (new inputs and new dropout draws at every replay)."""
    common = ["--data-path", fashion, *tiny_on("cuda"), "--max-steps", "6", "--ckpt-every", "6"]
    eager = train.main(common + ["--no-cuda-graphs", "--results-dir", str(tmp_path / "eager")])
    graphed = train.main(common + ["--results-dir", str(tmp_path / "graphed")])
    for run, replayed in ((eager, False), (graphed, True)):
        log = open(os.path.join(run, "log.txt")).read()
        assert ("Step 2 on: the forward and backward passes replay a CUDA graph" in log) == replayed
    a, b = (load(os.path.join(r, "checkpoints", "0000006.pt")) for r in (eager, graphed))
    assert len({v for _, v in a["loss_curve"]}) == 6  # different batches every step
    assert b["loss_curve"] == a["loss_curve"]
    for key in ("model", "ema"):
        assert_same_state(b[key], a[key])
