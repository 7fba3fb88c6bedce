"""Shared by the test modules: the repository on sys.path, a tiny training configuration, a
Fashion-MNIST subset, checkpoint loading and the one-line error check."""
import contextlib
import gzip
import io
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

FASHION = "/usr/share/datasets/fashion-mnist"
# The paper's DiS-S/2 shrunk to D=16 and 2 blocks + mid, on 8x8 images: a step takes milliseconds.
TINY = ["--device", "cpu", "--preset", "paper", "--embed-dim", "16", "--depth", "2", "--image-size", "8",
        "--global-batch-size", "8", "--warmup-steps", "1", "--log-every", "1", "--sample-every", "0",
        "--num-workers", "0", "--no-download"]
# The end-to-end tests that also run on a GPU, where train.py's steps replay a CUDA graph.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def tiny_on(device):
    """TINY on `device`."""
    return [device if a == "cpu" else a for a in TINY]


@pytest.fixture
def one_thread():
    """One intra-op thread: the tensors in these tests are tiny, and on 2 cores shared with other
    jobs OpenMP's spinning threads oversubscribe. Test modules opt in with pytestmark."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Subprocesses started once the tests are collected, by test node id; their tests wait for them.
STARTED = {}


def start_interpreter_suite(path):
    """The test_interp_* tests of the file `path` in a pytest subprocess with TRITON_INTERPRET=1
    (it must be set before triton is imported), started and not waited for: (process, file of its
    output). Started when the session's tests are collected, so that it runs on the second core
    while the other tests run; at a lower priority (nice), so that it yields that core to tests
    that use two threads."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    output = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "-k", "test_interp_", os.path.abspath(path)], cwd=REPO, env=env, stdout=output,
                               stderr=subprocess.STDOUT, text=True)
    return process, output


def run_interpreter_suite(request, path):
    """The body of a module's test_interpreter_suite: wait for its subprocess, which must pass."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already inside the interpreter subprocess")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the compiled kernels are tested instead of the interpreter")
    process, output = STARTED.pop(request.node.nodeid, None) or start_interpreter_suite(path)
    with output:
        process.wait(timeout=600)
        output.seek(0)
        text = output.read()
    assert process.returncode == 0, text[-6000:]
    assert " passed" in text and " failed" not in text


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: only the tests that will run
def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
        # Triton's interpreter runs the kernels in Python, single-threaded, for half a minute:
        # started now, it runs on the second core while the tests before it run on the first.
        if (item.name == "test_interpreter_suite" and os.environ.get("TRITON_INTERPRET") != "1"
                and not config.option.collectonly):
            STARTED[item.nodeid] = start_interpreter_suite(item.path)


def pytest_sessionfinish(session):
    """Stop the subprocesses whose tests did not run (-x, Ctrl-C)."""
    for process, output in STARTED.values():
        process.kill()
        process.wait()
        output.close()
    STARTED.clear()


@pytest.fixture
def quick_grids(monkeypatch):
    """The sample grids of training drawn in 2 DDIM steps instead of 25 (100 images, guided): the
    tests that ask for it check a grid's layout and where it goes, not what it shows."""
    import runs
    monkeypatch.setattr(runs, "GRID_RESPACING", "ddim2")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def one_line_error(argv, main):
    """The message main(argv) stops with, checked to be a single line: a SystemExit's message,
    or (exit status 2) MESSAGE of the `PROG: error: MESSAGE` line it printed last on stderr."""
    err = io.StringIO()
    with pytest.raises(SystemExit) as error, contextlib.redirect_stderr(err):
        main(argv)
    if isinstance(error.value.code, str):
        message = error.value.code
    else:
        assert error.value.code == 2 and "Traceback" not in err.getvalue(), (error.value.code, err.getvalue())
        message = err.getvalue().rstrip("\n").splitlines()[-1].split(": error: ", 1)[-1]
    assert "\n" not in message
    return message


def refusal(main, argv, capsys):
    """The message of a command refused before it starts: exit status 2 and one line
    `PROG: error: MESSAGE` as the last line of stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as error:
        main(argv)
    err = capsys.readouterr().err
    assert error.value.code == 2, (error.value.code, err)
    assert "Traceback" not in err and [line for line in err.splitlines() if ": error: " in line] == [
        err.splitlines()[-1]], err
    return err.splitlines()[-1]


def fashion_arrays(count):
    """The first `count` Fashion-MNIST training images (count, 28, 28) and labels, read with the
    IDX layout's fixed header sizes (16 and 8 bytes); random images when the package is absent."""
    if os.path.isdir(FASHION):
        with gzip.open(os.path.join(FASHION, "train-images-idx3-ubyte.gz")) as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
        with gzip.open(os.path.join(FASHION, "train-labels-idx1-ubyte.gz")) as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)[:count]
        return images, labels
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), (np.arange(count) % 10).astype(np.uint8)


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fashion_subset(folder, count=32):
    """A Fashion-MNIST folder holding only the first `count` training images."""
    images, labels = fashion_arrays(count)
    os.makedirs(folder, exist_ok=True)
    write_idx(os.path.join(folder, "train-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"), labels)
    return str(folder)
