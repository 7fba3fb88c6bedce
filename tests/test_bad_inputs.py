"""train.py refuses bad input before it trains: exit status 2 and one line naming the flag and
what it accepts (argparse's convention), and a failed write keeps the previous checkpoint."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from conftest import REPO, TINY, load, refusal, write_fashion_subset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A Fashion-MNIST subset of 32 images, and files and folders that are the wrong thing."""
    root = tmp_path_factory.mktemp("inputs")
    for name in ("empty", "empty2", "folder"):
        (root / name).mkdir()
    (root / "a_file").write_text("not a folder")
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"pos_embed": torch.zeros(1)}, root / "state_dict.pt")  # a bare state dict, no train.py record
    broken = root / "broken_idx"
    broken.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (broken / name).write_bytes(b"\x1f\x8b not really gzip")
    return dict(fashion=write_fashion_subset(root / "fashion"), root=str(root))


# (extra flags, words the message must hold); {root}: the folder of the files above
PARSE_ROWS = [
    (["--max-grad-norm", "0"], ["--max-grad-norm must be positive (inf: no clipping), not 0"]),
    (["--max-steps", "0"], ["--max-steps must be positive, not 0"]),
    (["--sample-every", "-1"], ["--sample-every must be >= 0 (0: no sample grids), not -1"]),
    (["--image-size", "0"], ["--image-size must be positive, not 0"]),
    (["--embed-dim", "0"], ["--embed-dim must be positive, not 0"]),
    (["--depth", "0"], ["--depth must be even and >= 2"]),
    (["--depth", "3"], ["--depth must be even and >= 2"]),
    (["--lr", "-1"], ["--lr must be positive and finite, not -1"]),
    (["--lr", "nan"], ["--lr must be positive and finite, not nan"]),
    (["--lr", "fast"], ["--lr", "invalid float value"]),
    (["--drop-path-rate", "2"], ["--drop-path-rate must be in [0, 1), not 2"]),
    (["--class-dropout-prob", "-0.1"], ["--class-dropout-prob must be in [0, 1], not -0.1"]),
    (["--global-batch-size", "0"], ["--global-batch-size must be positive, not 0"]),
    (["--num-workers", "-1"], ["--num-workers must be >= 0, not -1"]),
    (["--warmup-steps", "-1"], ["--warmup-steps must be >= 0, not -1"]),
    (["--ema-decay", "1"], ["--ema-decay must be in [0, 1), not 1"]),
    (["--ema-decay", "-0.5"], ["--ema-decay must be in [0, 1), not -0.5"]),
    (["--sample-cfg", "-1"], ["--sample-cfg must be >= 0 and finite (1: no guidance), not -1"]),
    (["--log-every", "0"], ["--log-every must be positive, not 0"]),
    (["--ckpt-every", "0"], ["--ckpt-every must be positive, not 0"]),
    (["--epochs", "0"], ["--epochs must be positive, not 0"]),
    (["--max-minutes", "-1"], ["--max-minutes must be >= 0 and finite, not -1"]),
    (["--num-classes", "-1"], ["--num-classes must be >= 0 (0: unconditional), not -1"]),
    (["--scan-save-every", "-1"], ["--scan-save-every must be auto or >= 0, not -1"]),
    (["--scan-save-every", "some"], ["--scan-save-every: must be auto or an integer >= 0, not 'some'"]),
    (["--recompute-scan-inputs", "--compile"], ["--recompute-scan-inputs has no effect with --compile"]),
    (["--recompute-scan-inputs", "--grad-checkpointing"], ["--recompute-scan-inputs has no effect with --grad-chec"]),
    (["--grad-accum-steps", "0"], ["--grad-accum-steps must be positive, not 0"]),
    (["--fid-every", "-1"], ["--fid-every must be >= 0 (0: only after training), not -1"]),
    (["--fid-sampling-steps", "1"], ["--fid-sampling-steps must be in 2..1000, not 1"]),
    (["--max-minutes", "inf"], ["--max-minutes must be >= 0 and finite, not inf"]),
    (["--dataset", "cifar10", "--fid-every", "5"], ["--fid-every needs --fid-ref"]),
    (["--global-seed", "-1"], ["--global-seed must be in [0, 2^63), not -1"]),
    (["--fid-samples", "1"], ["--fid-samples must be >= 2, not 1"]),
    (["--max-nonfinite", "-1"], ["--max-nonfinite must be >= 0, not -1"]),
    (["--model", "DiS-X/2"], ["--model", "invalid choice"]),
    (["--preset", "huge"], ["--preset", "invalid choice"]),
    (["--compile-mode", "reduce-overhead"], ["--compile-mode", "add --compile"]),
    (["--cuda-graphs", "--compile"], ["--cuda-graphs does not combine with --compile"]),
    (["--cuda-graphs", "--grad-checkpointing"], ["--cuda-graphs does not combine with --grad-checkpointing"]),
    (["--data-path", "{root}/nowhere"], ["--data-path", "nowhere", "no such file or folder"]),
    (["--resume", "{root}/nowhere.pt"], ["--resume", "no such file or folder"]),
    (["--resume", "{root}/folder"], ["--resume", "is a folder"]),
    (["--results-dir", "{root}/a_file"], ["--results-dir", "is a file"]),
    (["--results-dir", "{root}/a_file/runs"], ["--results-dir", "is a file"]),
    (["--cache-dir", "{root}/a_file"], ["--cache-dir", "is a file"]),
    (["--fid-ref", "{root}/nowhere.npz"], ["--fid-ref", "no such file or folder"]),
    (["--inception-weights", "{root}/nowhere.pth"], ["--inception-weights", "no such file or folder"]),
]

SETUP_ROWS = [  # refused after the data or the checkpoint is read, before the first step
    (["--resume", "{root}/state_dict.pt"], ["--resume", "not a train.py checkpoint", "bare state dict"]),
    (["--resume", "{root}/garbage.pt"], ["cannot read checkpoint", "garbage.pt"]),
    (["--data-path", "{root}/empty"], ["Fashion-MNIST not found", "empty", "apt-get install dataset-fashion-mnist"]),
    (["--data-path", "{root}/broken_idx"], ["broken_idx", "not a gzipped IDX file"]),
    (["--dataset", "folder", "--data-path", "{root}/empty"], ["no images", "empty"]),
    (["--dataset", "latents", "--data-path", "{root}/empty"], ["--dataset latents", "latents.npy"]),
    (["--dataset", "cifar10", "--data-path", "{root}/empty2"], ["CIFAR-10 not found", "--data-path"]),
    (["--model", "DiS-S/4", "--image-size", "10"], ["patch size 4 of DiS-S/4", "10x10", "--image-size"]),
    (["--global-batch-size", "64"], ["32 images", "--global-batch-size 64"]),
    (["--grad-accum-steps", "3"], ["--global-batch-size 8 is not divisible by --grad-accum-steps 3"]),
    (["--num-classes", "5"], ["labels go up to 9", "--num-classes 5"]),
    (["--scan-save-every", "2"], ["--scan-save-every", "Triton and CUDA"]),
    (["--cuda-graphs"], ["--cuda-graphs needs one process on a CUDA device", "on cpu"]),
    (["--model", "DiS-S/8", "--embed-dim", "65536"], ["needs about", "GiB", "--global-batch-size", "--embed-dim",
                                                      "--no-memory-check"]),
]


def command(flags, files, tmp_path):
    flags = [f.format(root=files["root"]) for f in flags]
    data = [] if "--data-path" in flags else ["--data-path", files["fashion"]]
    return [*TINY, *data, "--results-dir", str(tmp_path / "results"), "--max-steps", "1", *flags]


@pytest.mark.parametrize("flags, words", PARSE_ROWS + SETUP_ROWS, ids=lambda v: " ".join(v) if v and
                         v[0].startswith("--") else None)
def test_bad_input_is_refused_in_one_line(flags, words, files, tmp_path, capsys):
    message = refusal(train.main, command(flags, files, tmp_path), capsys)
    assert message.startswith("train.py: error: ")
    for word in words:
        assert word.format(root=files["root"]) in message, message
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(files, tmp_path, capsys):
    assert "--device cuda" in refusal(train.main, command(["--device", "cuda"], files, tmp_path), capsys)


def test_refusal_end_to_end_has_no_traceback(files, tmp_path):
    """As a user sees it: a separate process, exit status 2, one line on stderr."""
    done = subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                           *command(["--resume", "{root}/state_dict.pt"], files, tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("train.py: error: --resume") and "Traceback" not in done.stderr


def test_full_disk_keeps_the_previous_checkpoint(files, tmp_path):
    """A checkpoint that cannot be written (here: its temporary file leads to /dev/full) ends
    the run with one line; the previous checkpoint stays complete and nothing half-written is left."""
    run = train.main(command(["--ckpt-every", "1"], files, tmp_path))
    before = load(os.path.join(run, "checkpoints", "0000001.pt"))
    os.symlink("/dev/full", os.path.join(run, "checkpoints", "0000002.pt.tmp"))
    with pytest.raises(SystemExit) as error:
        train.main(command(["--ckpt-every", "1", "--max-steps", "3", "--resume", "auto"], files, tmp_path))
    message = str(error.value.code)
    assert "\n" not in message and "0000002.pt" in message and "No space left on device" in message
    assert message.endswith(os.path.join(run, "checkpoints", "0000001.pt"))
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0000001.pt"]
    after = load(os.path.join(run, "checkpoints", "0000001.pt"))
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_corrupt_latents_name_their_file(files, tmp_path, capsys):
    folder = tmp_path / "latents"
    folder.mkdir()
    (folder / "latents.npy").write_bytes(b"\x93NUMPY broken")
    flags = ["--dataset", "latents", "--data-path", str(folder)]
    message = refusal(train.main, command(flags, files, tmp_path), capsys)
    assert f"{folder / 'latents.npy'} is not a readable .npy array" in message
    np.save(folder / "latents.npy", np.zeros((4, 3, 5, 6), np.float16))  # latents are square: (N, [2,] C, h, h)
    message = refusal(train.main, command(flags, files, tmp_path), capsys)
    assert "latents.npy has shape (4, 3, 5, 6)" in message
