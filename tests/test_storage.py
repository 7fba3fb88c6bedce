"""storage.py as a library: write_samples_npz's arguments and output, the export folder's round
trip, hub ids and the one-line errors of checkpoints that cannot be used."""
import json
import os

import numpy as np
import pytest
import torch

import model as dis
import storage
from diffusion import create_diffusion

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # diffusers' DPMSolverMultistepScheduler.set_timesteps calls np.array on a tensor
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

CONFIG = dict(img_size=8, patch_size=2, channels=1, embed_dim=16, depth=2, num_classes=10)


@pytest.fixture(scope="module")
def tiny():
    """A class-conditional DiS with random weights everywhere (the output layer is zero at init)."""
    torch.manual_seed(0)
    model = dis.DiS(**CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def train_checkpoint(path, model):
    """A checkpoint as train.py writes it, reduced to what loading reads."""
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": CONFIG,
                "args": dict(model="DiS-S/2", image_size=8, vae="none")}, path)
    return str(path)


def test_write_samples_npz_split_over_ranks_equals_one_process(tiny, tmp_path):
    """Two ranks, called one after the other (no process group: barriers are no-ops), write the
    batches of their share; rank 0 then gathers. The result equals a single process's."""
    diffusion = create_diffusion("4")
    common = dict(num_samples=7, batch_size=3, name="s", seed=5, cfg_scale=2.0, sampler="dpm++",
                  class_labels=[2, 7], progress=False, cfg_interval=(0.2, 0.9))
    single = storage.write_samples_npz(tiny, diffusion, None, out_dir=str(tmp_path / "one"), info={"a": 1}, **common)
    storage.write_samples_npz(tiny, diffusion, None, out_dir=str(tmp_path / "two"), rank=1, world=2, **common)
    assert sorted(os.listdir(tmp_path / "two" / "s")) == ["batch_000001.npz"]
    split = storage.write_samples_npz(tiny, diffusion, None, out_dir=str(tmp_path / "two"), rank=0, world=2,
                                      info={"a": 1}, **common)
    with np.load(single) as a, np.load(split) as b:
        assert a["arr_0"].shape == (7, 8, 8, 1) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], [2, 7, 2, 7, 2, 7, 2])
        assert json.loads(str(a["meta"])) == {"a": 1}


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_samples=0), "num_samples"), (dict(num_samples=2.5), "num_samples"), (dict(batch_size=0), "batch_size"),
    (dict(cfg_scale=-1.0), "cfg_scale"), (dict(precision="fp16"), "precision"), (dict(rank=2, world=2), "rank"),
    (dict(class_labels=[10]), "class_labels"), (dict(sampler="euler"), "sampler"),
    (dict(cfg_interval=(0.9, 0.1)), "cfg_interval")])
def test_write_samples_npz_names_a_bad_argument(tiny, tmp_path, kwargs, name):
    arguments = {**dict(num_samples=2, batch_size=2, out_dir=str(tmp_path), name="x"), **kwargs}
    with pytest.raises(ValueError, match=name):
        storage.write_samples_npz(tiny, create_diffusion("2"), None, **arguments)
    assert not os.listdir(tmp_path)          # refused before anything is written


def test_export_round_trip(tiny, tmp_path):
    source = train_checkpoint(tmp_path / "ckpt.pt", tiny)
    model, vae, info = storage.load_model(source)
    assert vae is None and info["weights"] == "ema" and info["config"] == CONFIG
    folder = storage.export_model(str(tmp_path / "export"), model, info)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    loaded, _, loaded_info = storage.load_model(folder)
    assert {k: loaded_info[k] for k in ("model", "image_size", "vae", "weights", "num_classes", "config")} == \
        {k: info[k] for k in ("model", "image_size", "vae", "weights", "num_classes", "config")}
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), tiny(x, t, y))


@pytest.mark.parametrize("source,hub", [("owner/name", True), ("owner/name.v1", True), ("owner/model.pt", False),
                                        ("a/b/c", False), ("name", False), ("/abs/path", False), ("./x/y", False)])
def test_hub_ids(source, hub):
    assert storage.is_hub_id(source) == hub


def test_unusable_checkpoints_are_one_line_errors(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    (tmp_path / "export" / "model.safetensors").write_bytes(b"")
    with pytest.raises(storage.CheckpointError, match="cannot read the export"):
        storage.load_weights(str(tmp_path / "export"))
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04 truncated")
    for path, message in [(tmp_path / "garbage.pt", "cannot read checkpoint"), (tmp_path / "none.pt", "not found"),
                          (tmp_path, "holds no model.safetensors and config.json")]:
        with pytest.raises(storage.CheckpointError, match=message) as error:
            storage.load_weights(str(path))
        assert "\n" not in str(error.value)
    with pytest.raises(SystemExit, match="not found"):     # the scripts' form
        storage.load_checkpoint(str(tmp_path / "none.pt"))


def test_write_atomically_keeps_the_old_file_and_no_tmp_when_writing_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    storage.write_atomically(path, lambda f: f.write(b"old"))
    for error in (OSError, KeyboardInterrupt):  # a full disk, Ctrl-C
        def write(f, error=error):
            f.write(b"half")
            raise error()
        with pytest.raises(error):
            storage.write_atomically(path, write)
        assert os.listdir(tmp_path) == ["ckpt.pt"] and open(path, "rb").read() == b"old"
