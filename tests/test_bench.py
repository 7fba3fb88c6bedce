"""bench.py on CPU: its smoke run writes the tables, the --profile breakdowns and the summary's
ratios (on a GPU also of CUDA-graphed steps), and the original-structure row computes BiMamba's
function (checked with a stand-in for mamba-ssm's mamba_inner_fn)."""
import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import bench
import scan
from model import BiMamba

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def tf32_restored():
    """bench.main turns TF32 on for its GPU runs, process-wide: put back after each test, so that
    the float32 checks of the test modules after this one run in full precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_quick_run_writes_tables(tmp_path):
    bench.main(["--device", "cpu", "--quick", "--only", "scan,model", "--profile", "--out", str(tmp_path)])
    raw = json.loads((tmp_path / "bench.json").read_text())
    assert raw["scan"] and raw["model"]
    assert all(math.isfinite(r["fwd_bwd_ms"]) and r["fwd_bwd_back_to_back_ms"] > 0 for r in raw["scan"])
    assert all(r["train_img_s"] > 0 and r["train_back_to_back_img_s"] > 0 for r in raw["model"])
    assert all(math.isnan(r["train_graphed_img_s"]) for r in raw["model"])  # CUDA graphs need CUDA
    shares = [r["share"] for r in raw["model_profile"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    kinds = raw["model_profile_kinds"]
    assert [r["model"] for r in kinds] == (["DiS-tiny (ref scan), 8x8x3, batch 4"] * len(bench.KERNEL_KINDS)
                                           + ["DiT-tiny, 8x8x3, batch 4"] * len(bench.KERNEL_KINDS))
    for model in ("DiS-tiny", "DiT-tiny"):
        of_model = {r["kind"]: r for r in kinds if r["model"].startswith(model)}
        assert sum(r["share"] for r in of_model.values()) == pytest.approx(1.0)
        assert of_model["GEMM"]["ms_per_step"] > 0  # CPU operators: aten::mm, aten::addmm
    pair, *options = raw["model_summary"]  # the model's defaults, then train.py's options
    assert pair["models"] == "DiS-tiny (ref scan) / DiT-tiny" and pair["train_img_s_ratio"] > 0
    assert pair["sampling_fwd_img_s_ratio"] > 0
    dis, dit = (next(r for r in raw["model"] if r["model"] == m) for m in ("DiS-tiny (ref scan)", "DiT-tiny"))
    assert pair["train_gpu_time_ratio"] == dit["train_gpu_ms"] / dis["train_gpu_ms"] and dis["train_gpu_ms"] > 0
    assert pair["sampling_fwd_gpu_time_ratio"] == dit["fwd_gpu_ms"] / dis["fwd_gpu_ms"] and dis["fwd_gpu_ms"] > 0
    assert pair["fwd_gflops_ratio"] == dis["fwd_gflops"] / dit["fwd_gflops"] and dit["fwd_gflops"] > 0
    batch = bench.QUICK_MODEL_CASES[0][-1]
    assert dis["train_tflops"] == 3 * dis["fwd_gflops"] * batch / dis["train_gpu_ms"]
    assert pair["train_tflops_ratio"] == pytest.approx(pair["fwd_gflops_ratio"] * pair["train_gpu_time_ratio"])
    assert [p["models"] for p in options] == [f"DiS-tiny (ref scan, {label}) / DiT-tiny" for label, _ in
                                              bench.MEMORY_OPTIONS]
    assert [r["backend"] for r in raw["scan_summary"]] == ["ref bidirectional"]
    text = (tmp_path / "bench.md").read_text()
    assert "| model |" in text and "Where a DiS training step goes" in text and "## Summary" in text


@pytest.mark.gpu
def test_quick_run_times_graphed_steps_on_a_gpu(tmp_path):
    bench.main(["--device", "cuda", "--quick", "--only", "model", "--out", str(tmp_path)])
    raw = json.loads((tmp_path / "bench.json").read_text())
    assert all(r["train_graphed_img_s"] > 0 for r in raw["model"])
    assert all(p["train_graphed_img_s_ratio"] > 0 for p in raw["model_summary"])


def inner_fn_standin(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                     out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, delta_softplus=True):
    """mamba_inner_fn's documented computation on xz (B, 2E, L): x, z halves; causal depthwise
    conv1d + SiLU; x_proj to (dt, B, C); delta = dt_proj(dt); selective scan gated by SiLU(z);
    out_proj. Returns (B, L, D)."""
    L = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv1d_weight, conv1d_bias, padding=conv1d_weight.shape[-1] - 1,
                        groups=x.shape[1])[..., :L])
    rank, n = delta_proj_weight.shape[1], A.shape[1]
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)
    delta = F.linear(x_dbl[..., :rank], delta_proj_weight).transpose(1, 2)
    y = scan.selective_scan_ref(x, delta, A, x_dbl[..., rank:rank + n].transpose(1, 2),
                                x_dbl[..., rank + n:].transpose(1, 2), D, z, delta_bias, delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


class TwoLinears(torch.nn.Module):
    """A model with bench's forward signature whose work is known: (x flattened) @ (48, 20) then
    @ (20, 5), per image 2 * (48 * 20 + 20 * 5) = 2,120 flops."""
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(48, 20), torch.nn.Linear(20, 5)

    def forward(self, x, t, y):
        return self.b(self.a(x.flatten(1)))


def test_matmul_gflops_counts_two_flops_per_multiply_add():
    assert bench.matmul_gflops(TwoLinears(), 4, 3, 10, torch.device("cpu")) == 2 * (48 * 20 + 20 * 5) / 1e9


def test_original_structure_is_bimamba(monkeypatch):
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.mamba_inner_fn = inner_fn_standin
    for name, module in (("mamba_ssm", types.ModuleType("mamba_ssm")), ("mamba_ssm.ops", types.ModuleType("ops")),
                         ("mamba_ssm.ops.selective_scan_interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    torch.manual_seed(0)
    mixer = BiMamba(16, scan_backend="ref").double()
    with torch.no_grad():
        for p in mixer.parameters():  # break the symmetric init, so that a swapped direction shows
            p.add_(0.05 * torch.randn_like(p))
    h = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(bench.original_mixer_forward(mixer, h), mixer(h), rtol=1e-10, atol=1e-12)


def test_a_stopped_run_keeps_its_finished_parts(tmp_path, monkeypatch):
    def time_limit(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "bench_models", time_limit)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--quick", "--only", "scan,model", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "bench.json").read_text())["scan"]
    assert "## Selective scan" in (tmp_path / "bench.md").read_text()


def test_rounds_alternate_the_models_and_average(monkeypatch):
    order = []

    def fake_row(name, label, model, img, ch, classes, batch, device):
        order.append(name)
        k = float(order.count(name))  # 1 in the first round, 2 in the second
        return {"model": name, "input": label, "params_M": 0.1, "train_img_s": 10 * k,
                "train_back_to_back_img_s": k, "train_gpu_ms": 1.0, "fwd_img_s": 3 * k, "peak_GB": 1.0}
    monkeypatch.setattr(bench, "throughput_row", fake_row)
    rows, _, _, _, pairs = bench.bench_models(torch.device("cpu"), bench.QUICK_MODEL_CASES, rounds=2)
    names = [r["model"] for r in rows]
    assert order == names + names  # every model once per round, in the same order
    assert names[-1] == "DiT-tiny" and len(pairs) == 1 + len(bench.MEMORY_OPTIONS)
    assert all(r["train_img_s"] == 15 and r["train_back_to_back_img_s"] == 1.5 and r["fwd_img_s"] == 4.5
               for r in rows)


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "GEMM"),
    ("void dis::scan_bwd_kernel<dis::bf16, dis::bf16, 1, 128, 2>(dis::Params)", "scan"),
    ("void dis::finish_bwd_kernel<dis::bf16>(dis::Sums)", "scan"),
    ("_scan_bwd_kernel", "scan"),
    ("_conv_bwd_kernel", "convolution"),
    ("_add_norm_fwd_kernel", "norm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, true>", "norm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>",
     "optimizer"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<>>", "other"),
    ("aten::addmm", "GEMM"),
    ("aten::add", "other"),
])
def test_kernel_kinds(name, kind):
    assert bench.kernel_kind(name) == kind


def test_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", "--quick", "--only", "model", "--rounds", "0"])
    assert e.value.code == 2
    assert "--rounds must be at least 1, not 0" in capsys.readouterr().err
