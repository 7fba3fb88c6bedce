"""sample.py on a tiny trained checkpoint (CPU): the grid PNG, the ADM-format .npz and its
resumption, torchrun splitting, checkpoints of the original implementation, export to and
loading from a safetensors folder, bad inputs, and the --fid-ref wiring through fid.py."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY, load, refusal, write_fashion_subset

import model as dis
from diffusion import create_diffusion, generate, sampler_respacing
import sample
import train

FAST = ["--device", "cpu", "--num-sampling-steps", "4"]
pytestmark = [pytest.mark.usefixtures("one_thread"),
              # diffusers' DPMSolverMultistepScheduler.set_timesteps calls np.array on a tensor
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


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


def test_export_round_trip_and_hub_id(ckpt, tmp_path, monkeypatch):
    """--export writes safetensors + config.json; --ckpt FOLDER and --ckpt owner/name (the hub's
    download replaced by the folder: no network here) sample the same grid as the checkpoint."""
    grid = ["--cfg", "2", *FAST, "--class-labels", "0", "5", "9"]
    reference = pixels(sample.main(["--ckpt", ckpt, *grid, "--out", str(tmp_path / "ckpt.png")]))
    folder = sample.main(["--ckpt", ckpt, "--export", str(tmp_path / "export")])
    config = json.load(open(os.path.join(folder, "config.json")))
    assert (config["model"], config["image_size"], config["num_classes"], config["vae"], config["weights"]) == \
        ("DiS-S/2", 8, 10, "none", "ema")
    assert config["config"] == load(ckpt)["config"]
    from safetensors.torch import load_file
    exported = load_file(os.path.join(folder, "model.safetensors"))
    assert exported.keys() == load(ckpt)["ema"].keys()
    assert all(torch.equal(exported[k], v) for k, v in load(ckpt)["ema"].items())
    sample.main(["--ckpt", folder, *grid, "--out", str(tmp_path / "folder.png")])
    np.testing.assert_array_equal(pixels(tmp_path / "folder.png"), reference)

    import huggingface_hub
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or folder)
    sample.main(["--ckpt", "someone/dis-tiny", *grid, "--out", str(tmp_path / "hub.png")])
    assert asked == ["someone/dis-tiny"]
    np.testing.assert_array_equal(pixels(tmp_path / "hub.png"), reference)


def test_export_of_an_original_checkpoint_needs_no_flags_afterwards(ckpt, tmp_path):
    torch.save(load(ckpt)["ema"], tmp_path / "ema_only.pth")
    bare = ["--model", "DiS-S/2", "--embed-dim", "16", "--depth", "2", "--image-size", "8", "--num-classes", "10",
            "--channels", "1"]
    folder = sample.main(["--ckpt", str(tmp_path / "ema_only.pth"), *bare, "--export", str(tmp_path / "export")])
    grid = [*FAST, "--class-labels", "3", "--cfg", "1.5"]
    sample.main(["--ckpt", str(tmp_path / "ema_only.pth"), *bare, *grid, "--out", str(tmp_path / "bare.png")])
    sample.main(["--ckpt", folder, *grid, "--out", str(tmp_path / "folder.png")])
    np.testing.assert_array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "bare.png"))


def test_fast_sampler_and_guidance_interval_are_recorded(ckpt, tmp_path, capsys):
    out = sample.main(["--ckpt", ckpt, "--device", "cpu", "--sampler", "dpm++", "--num-sampling-steps", "5",
                       "--cfg", "2", "--cfg-interval", "0.3", "0.8", "--class-labels", "1", "2",
                       "--out", str(tmp_path / "grid.png")])
    meta = json.loads(Image.open(out).text["dis"])
    assert (meta["sampler"], meta["num_sampling_steps"], meta["cfg_interval"]) == ("dpm++", 5, [0.3, 0.8])
    assert "sampling steps" in capsys.readouterr().err          # the grid's progress bar


def usage_error(argv, capsys):
    """The one error line (exit code 2) that sample.main(argv) writes to stderr."""
    with pytest.raises(SystemExit) as exit_:
        sample.main(argv)
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("sample.py: error: ")
    return line


BAD_INPUTS = [  # (arguments after --ckpt CKPT, what the error line must say)
    (["--num-sampling-steps", "0"], "--num-sampling-steps must be in 2..1000, not 0"),
    (["--num-sampling-steps", "1001"], "--num-sampling-steps must be in 2..1000"),
    (["--sampler", "ddim", "--num-sampling-steps", "999"], "--num-sampling-steps 999 with --sampler ddim"),
    (["--sampler", "euler"], "--sampler: invalid choice"),
    (["--cfg-scale", "-1"], "--cfg-scale must be >= 0"),
    (["--cfg-scale", "nan"], "--cfg-scale must be >= 0"),
    (["--cfg-interval", "0.8", "0.2"], "--cfg-interval LOW HIGH needs 0 <= LOW <= HIGH <= 1"),
    (["--cfg-interval", "0", "1.5"], "--cfg-interval LOW HIGH needs 0 <= LOW <= HIGH <= 1"),
    (["--cfg-interval", "0.5"], "--cfg-interval: expected 2 arguments"),
    (["--cfg-channels", "0"], "--cfg-channels must be positive"),
    (["--cfg-channels", "2"], "--cfg-channels must be in 1..1"),
    (["--num-samples", "0"], "--num-samples must be positive"),
    (["--num-samples", "many"], "--num-samples: invalid int value"),
    (["--num-samples", "4", "--per-proc-batch-size", "0"], "--per-proc-batch-size must be positive"),
    (["--class-labels", "3", "10"], "--class-labels [10] are outside the model's classes 0..9"),
    (["--class-labels", "-1"], "--class-labels must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--fid-ref", "{tmp}/missing.npz", "--num-samples", "4"], "--fid-ref {tmp}/missing.npz: no such file"),
    (["--fid-ref", "{tmp}/a-file"], "--fid-ref needs --num-samples"),
    (["--fid-ref", "{tmp}/a-file", "--num-samples", "4", "--inception-weights", "{tmp}/a-file"],
     "--inception-weights: weights {tmp}/a-file: not pt_inception"),
    (["--num-samples", "4", "--sample-dir", "{tmp}/a-file"], "--sample-dir {tmp}/a-file is a file"),
    (["--export", "{tmp}/a-file"], "--export {tmp}/a-file is a file"),
    (["--out", "{tmp}"], "--out {tmp} is a folder"),
    (["--depth", "3"], "--depth must be even"),
    (["--image-size", "0"], "--image-size must be positive"),
    (["--num-classes", "-1"], "--num-classes must be >= 0"),
    (["--cuda-graphs"], "--cuda-graphs needs a CUDA device; this run is on cpu"),
]
BAD_CHECKPOINTS = [  # (--ckpt value, what the error line must say)
    ("{tmp}/missing.pt", "--ckpt {tmp}/missing.pt: no such file or folder"),
    ("{tmp}/a-file", "--ckpt: cannot read checkpoint {tmp}/a-file (UnpicklingError): not a PyTorch checkpoint"),
    ("{tmp}", "--ckpt: folder {tmp} holds no model.safetensors and config.json"),
    ("{tmp}/not-dis.pt", "--ckpt: {tmp}/not-dis.pt holds no DiS weights"),
]


def test_cuda_graphs_refused_off_a_cuda_device():
    model = dis.DiS(img_size=4, patch_size=2, channels=1, embed_dim=16, depth=2, num_classes=0).eval()
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device, not cpu"):
        generate(model, create_diffusion("4"), torch.randn(1, 1, 4, 4), cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler,cfg,interval,bf16", [("ddpm", 1.5, None, True), ("dpm++", 1.5, (0.2, 0.7), True),
                                                         ("ddim", 1.0, None, False), ("dpm++sde", 1.0, None, True)])
def test_cuda_graphs_sample_as_eager_calls(sampler, cfg, interval, bf16):
    """The model's calls replayed from CUDA graphs give the eager samples bit for bit: guided
    (every step, and in an interval, where plain and guided calls interleave), unguided, bf16 and
    float32, and a second batch of another size (a graph of its own)."""
    torch.manual_seed(0)
    model = dis.DiS(img_size=8, patch_size=2, channels=3, embed_dim=32, depth=2, num_classes=10).cuda().eval()
    diffusion = create_diffusion(sampler_respacing(sampler, 25))
    for count in (6, 4):
        noise = torch.randn(count, 3, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(count))
        labels = torch.arange(count, device="cuda") % 10
        runs = []
        for graphs in (False, True):
            torch.manual_seed(1)  # the samplers' own noise (ddpm, dpm++sde)
            runs.append(generate(model, diffusion, noise, labels, cfg, sampler, None, None, bf16, interval,
                                 cuda_graphs=graphs))
        assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(argv) for argv, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_flag(ckpt, tmp_path, capsys, argv, message):
    (tmp_path / "a-file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = usage_error(["--ckpt", ckpt, "--device", "cpu", *argv], capsys)
    assert message.replace("{tmp}", str(tmp_path)) in line


@pytest.mark.parametrize("path,message", BAD_CHECKPOINTS, ids=[m.split(":")[1] for _, m in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_one_line(tmp_path, capsys, path, message):
    (tmp_path / "a-file").write_bytes(b"\x80\x04 not a pickle")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "not-dis.pt")
    line = usage_error(["--ckpt", path.replace("{tmp}", str(tmp_path)), "--device", "cpu"], capsys)
    assert message.replace("{tmp}", str(tmp_path)) in line


def test_offline_hub_id_is_one_line_without_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--ckpt", "someone/dis-s2", "--device",
                           "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "--ckpt: someone/dis-s2 is no local file or folder" in line and "offline?" in line


def test_guidance_below_one_warns(ckpt, tmp_path, capsys):
    sample.main(["--ckpt", ckpt, *FAST, "--cfg", "0.5", "--class-labels", "1", "--out", str(tmp_path / "g.png")])
    assert "warning: --cfg-scale 0.5 < 1" in capsys.readouterr().err


def test_error_checkpoint_of_another_model_size(ckpt, tmp_path, capsys):
    torch.save({"model": load(ckpt)["model"]}, tmp_path / "original.pth")
    message = usage_error(["--ckpt", str(tmp_path / "original.pth"), "--model", "DiS-S/2", "--depth", "4",
                           "--embed-dim", "16", "--image-size", "8", "--num-classes", "10", "--channels", "1"], capsys)
    assert "holds DiS (D=16, depth 2) at 8x8 with 1 channels, 10 classes" in message
    assert "ask for DiS (D=16, depth 4)" in message
    message = usage_error(["--ckpt", str(tmp_path / "original.pth"), "--model", "DiS-S/2", "--image-size", "8",
                           "--num-classes", "10", "--channels", "1"], capsys)
    assert "ask for DiS-S/2 (D=368, depth 24)" in message


def test_unusable_model_size_or_vae_is_a_usage_error(ckpt, tmp_path, capsys):
    """Settings that storage.model_config or data.load_vae refuse end as the parser's errors do:
    one line, exit status 2."""
    torch.save({"model": load(ckpt)["model"]}, tmp_path / "original.pth")
    message = refusal(sample.main, ["--ckpt", str(tmp_path / "original.pth"), "--model", "DiS-S/2", "--image-size",
                                    "7", "--num-classes", "10", "--channels", "1", "--device", "cpu"], capsys)
    assert "7x7, which the patch size 2 of DiS-S/2 does not divide" in message
    (tmp_path / "no-vae").mkdir()
    message = refusal(sample.main, ["--ckpt", ckpt, "--vae", str(tmp_path / "no-vae"), "--device", "cpu"], capsys)
    assert message.startswith(f"sample.py: error: cannot load the VAE '{tmp_path / 'no-vae'}'")


def test_error_guidance_of_an_unconditional_model(tmp_path, capsys):
    torch.manual_seed(0)
    unconditional = dis.DiS(img_size=8, patch_size=2, channels=1, embed_dim=16, depth=2, num_classes=0)
    torch.save(unconditional.state_dict(), tmp_path / "uncond.pth")
    message = usage_error(["--ckpt", str(tmp_path / "uncond.pth"), "--embed-dim", "16", "--depth", "2",
                           "--model", "DiS-S/2", "--image-size", "8", "--num-classes", "0", "--channels", "1",
                           "--cfg", "1.5", "--device", "cpu"], capsys)
    assert "--class-labels and --cfg-scale need a class-conditional model" in message


def test_fid_ref_evaluates_the_written_samples(ckpt, tmp_path, monkeypatch):
    """fid.evaluate runs on the grayscale .npz with a randomly initialised Inception (the real
    weights are a download): against the same images FID is 0. The square-root trace of the
    2048-dimensional covariances is taken in the 8 dimensions that hold 4 samples' covariance
    (test_fid.py's end-to-end test takes it in 2048)."""
    import fid
    from test_workflow import low_rank_trace_sqrt_product
    random_inception = lambda weights=None, mode="adm", device="cpu": fid.FIDInceptionV3(mode).eval().to(device)
    monkeypatch.setattr(fid, "load_inception", random_inception)
    monkeypatch.setattr(fid, "find_weights", lambda path=None: "random weights")
    monkeypatch.setattr(fid, "trace_sqrt_product", low_rank_trace_sqrt_product)
    args = ["--ckpt", ckpt, *FAST, "--num-samples", "4", "--per-proc-batch-size", "4"]
    first = sample.main(args + ["--sample-dir", str(tmp_path / "a")])
    with pytest.warns(UserWarning, match="FID is biased"):
        path = sample.main(args + ["--sample-dir", str(tmp_path / "b"), "--fid-ref", first])
    metrics = json.load(open(path[:-4] + ".json"))["metrics"]
    assert metrics["fid"] == pytest.approx(0, abs=1e-3) and metrics["precision"] == metrics["recall"] == 1.0


# ----------------------------------------------------------------------------- tools/sampler_table.py

def sampler_table_module():
    spec = importlib.util.spec_from_file_location("sampler_table", os.path.join(REPO, "tools", "sampler_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_yardstick(tmp_path, monkeypatch):
    """The real yardstick, its classifier trained briefly on a subset (seconds) and cached in tmp_path."""
    import yardstick
    if not os.path.isdir(yardstick.FASHION_MNIST_DEBIAN):
        pytest.skip("needs Fashion-MNIST's IDX files")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for key, value in dict(width=8, features=16, steps=40, batch_size=64, train_images=1000, test_images=300).items():
        monkeypatch.setitem(yardstick.SETTINGS, key, value)
    return yardstick


def fashion_checkpoint(path, num_classes=10, side=32):
    """A train.py-style checkpoint of a tiny pixel-space grayscale DiS with random weights, in
    patches of 8 (16 tokens at 32x32: the scans are short)."""
    torch.manual_seed(0)
    config = dict(img_size=side, patch_size=8, channels=1, embed_dim=16, depth=2, num_classes=num_classes)
    model = dis.DiS(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    torch.save({"ema": model.state_dict(), "config": config, "args": dict(model="DiS-S/8", image_size=side, vae="none")},
               path)
    return str(path)


@pytest.mark.filterwarnings("ignore:only .* samples for .* features")
def test_sampler_table(tiny_yardstick, tmp_path, monkeypatch):
    """Every setting sees the same noise and labels (the 10 classes in turn); the model evaluations
    per image follow from the steps: "25" keeps steps round(41.625 j), j = 0..24, of which
    j = 3..16 (t = 125..666) lie in t/T [0.1, 0.7], so 25 + 14 guided evaluations."""
    seen, evaluate = [], tiny_yardstick.evaluate

    def recording(images, labels, **kwargs):
        seen.append((images, labels))
        return evaluate(images, labels, **kwargs)
    monkeypatch.setattr(tiny_yardstick, "evaluate", recording)
    settings = ["dpm++10", "dpm++25-cfg2-in0.1-0.7", "dpm++25-bf16"]
    rows = sampler_table_module().main(["--ckpt", fashion_checkpoint(tmp_path / "ckpt.pt"), "--num-samples", "10",
                                        "--batch-size", "10", "--device", "cpu", "--settings", *settings,
                                        "--out", str(tmp_path / "table.md")])
    assert [name for name, _, _ in rows] == settings
    assert [result["evals"] for _, _, result in rows] == [10, 39, 25]
    assert all(result["fd"] > 0 and 0 <= result["accuracy"] <= 1 for _, _, result in rows)
    for images, labels in seen:
        assert images.shape == (10, 32, 32, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, np.arange(10))
    assert not np.array_equal(seen[0][0], seen[1][0])
    text = open(tmp_path / "table.md").read()
    assert "| dpm++25-cfg2-in0.1-0.7 | dpm++ | 25 | 2 | [0.1, 0.7] | fp32 |" in text
    assert "| dpm++25-bf16 | dpm++ | 25 | 1 | all | bf16 |" in text


def test_sampler_table_setting_names():
    parse = sampler_table_module().parse_setting
    assert parse("ddpm250") == dict(sampler="ddpm", steps=250, cfg=1.0, interval=None, precision="fp32")
    assert parse("dpm++sde25-cfg1.5-bf16") == dict(sampler="dpm++sde", steps=25, cfg=1.5, interval=None,
                                                   precision="bf16")
    assert parse("dpm++10-cfg3-in0-0.5") == dict(sampler="dpm++", steps=10, cfg=3.0, interval=(0.0, 0.5),
                                                 precision="fp32")


@pytest.mark.parametrize("name,message", [("ddpm", "expected SAMPLER STEPS"), ("euler25", "expected SAMPLER STEPS"),
                                          ("ddim25-cfg", "expected SAMPLER STEPS"), ("ddpm1001", "cannot keep 1001 steps from a section of 1000"),
                                          ("dpm++25-in0.1-0.7", "needs a guidance scale"),
                                          ("dpm++25-cfg2-in0.7-0.1", "0 <= LOW <= HIGH <= 1"),
                                          ("dpm++25-cfg2-in0.1-1.5", "0 <= LOW <= HIGH <= 1"),
                                          ("dpm++25-cfg2-in0.1.1-0.7", "expected SAMPLER STEPS")])
def test_sampler_table_refuses_bad_setting_names(capsys, name, message):
    with pytest.raises(SystemExit) as exit_:
        sampler_table_module().main(["--ckpt", "unused.pt", "--settings", name])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--settings" in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("classes,side", [(0, 32), (10, 8)])
def test_sampler_table_refuses_other_models(tmp_path, capsys, classes, side):
    with pytest.raises(SystemExit) as exit_:
        sampler_table_module().main(["--ckpt", fashion_checkpoint(tmp_path / "other.pt", classes, side),
                                     "--device", "cpu"])
    assert exit_.value.code == 2
    assert "class-conditional (10 classes) grayscale pixel-space Fashion-MNIST model at 32x32" in \
        capsys.readouterr().err
