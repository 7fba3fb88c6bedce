"""model.py against the original implementation's state dicts and the paper's Table 1."""
import json
import math
from pathlib import Path

import pytest
import torch

import model as model_lib
import scan
from model import DiS, DiS_models, thop_style_gflops

# Keys, shapes and parameter counts of the authors' implementation for five configurations.
REFERENCE = Path(__file__).resolve().parent / "data" / "official_state_dicts.json"
TABLE1 = {"S": (28_457_168, 0.43), "B": (119_139_168, 1.86), "M": (229_390_176, 3.70),
          "L": (404_026_464, 6.58), "H": (900_558_432, 14.79)}


def tiny(**kwargs):
    """A DiS small enough for CPU tests: 8x8 images, width 32, 3 blocks."""
    kwargs = {"img_size": 8, "patch_size": 2, "channels": 3, "embed_dim": 32, "depth": 2, **kwargs}
    return DiS(**kwargs)


def inputs(m, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, m.in_channels, m.img_size, m.img_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, m.num_classes, (batch,), generator=g) if m.num_classes else None
    return x, t, y


@pytest.fixture
def scan_of_one_token(monkeypatch):
    """The mixers' scan run on the first token only, its output repeated along the sequence: the
    same shapes, and the same counted FLOPs (the reference scan is elementwise, which neither
    counter sees; true_gflops adds it analytically), without the per-token loop that takes
    seconds per forward pass on the meta device."""
    real = scan.bimamba_scan

    def first_token(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, **kwargs):
        y = real(u[:, :1], delta[:, :1], A, B[:, :1], C[:, :1], D, None if z is None else z[:, :1], delta_bias,
                 delta_softplus, **kwargs)
        return y.expand(-1, u.shape[1], -1)
    monkeypatch.setattr(scan, "bimamba_scan", first_token)


@pytest.mark.parametrize("entry", list(json.loads(REFERENCE.read_text())))
def test_state_dict_matches_original(entry):
    ref = json.loads(REFERENCE.read_text())[entry]
    with torch.device("meta"):
        m = DiS_models[entry.split()[0]](**ref["kwargs"])
    ours = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert list(ours) == list(ref["state_dict"])  # same keys, same order
    assert ours == ref["state_dict"]
    assert sum(p.numel() for p in m.parameters()) == ref["n_params"]


@pytest.mark.parametrize("size", list(TABLE1))
def test_table1_parameter_counts(size):
    with torch.device("meta"):
        m = DiS_models[f"DiS-{size}/4"](img_size=32)
    assert sum(p.numel() for p in m.parameters()) == TABLE1[size][0]
    assert len(m.blocks()) == m.depth + 1


@pytest.mark.parametrize("size", ["S", "L", "H"])
def test_table1_thop_gflops(size, scan_of_one_token):
    with torch.device("meta"):
        m = DiS_models[f"DiS-{size}/4"](img_size=32)
    assert round(thop_style_gflops(m), 2) == TABLE1[size][1]


def test_true_gflops_counts_the_mixers(scan_of_one_token):
    with torch.device("meta"):
        m = DiS_models["DiS-S/4"](img_size=32)
    true, thop = model_lib.true_gflops(m), thop_style_gflops(m)
    # in_proj alone: 25 blocks x 65 tokens x 368 x 1472 multiply-adds, 2 flops each.
    in_proj = 2 * 25 * 65 * 368 * 1472 / 1e9
    assert true > thop + in_proj and 6 < true / thop < 12


@pytest.mark.parametrize("name", list(DiS_models))
def test_registry_output_shapes(name, scan_of_one_token):
    p = int(name.split("/")[1])
    with torch.device("meta"):  # 2 x 2 patches keep the scans short
        m = DiS_models[name](img_size=2 * p, channels=4, num_classes=1000)
        x = torch.empty(2, 4, 2 * p, 2 * p)
        out = m(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 8, 2 * p, 2 * p)
    assert m.patch_size == p


@pytest.mark.parametrize("skip", ["concat", "add", "none"])
@pytest.mark.parametrize("cond", ["token", "adaln"])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_ablation_variants_forward_backward(skip, cond, num_classes):
    torch.manual_seed(0)
    m = tiny(skip=skip, cond=cond, num_classes=num_classes)
    x, t, y = inputs(m)
    out = m(x, t, y)
    assert out.shape == (3, 6, 8, 8) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)
    assert hasattr(m.out_blocks[0], "skip_linear") == (skip == "concat")
    assert (m.extras, m.pos_embed.shape[1]) == ((0, 16) if cond == "adaln" else (1 + (num_classes > 0), 16 + 1 + (num_classes > 0)))


def test_fixed_sigma_and_other_channel_counts():
    m = tiny(learn_sigma=False, channels=1, img_size=12, patch_size=4)
    x, t, _ = inputs(m)
    assert m(x, t).shape == (3, 1, 12, 12)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_samples_are_independent_of_the_batch(batch):
    torch.manual_seed(0)
    m = tiny(num_classes=4).eval()
    x, t, y = inputs(m, batch=batch)
    together = m(x, t, y)
    alone = torch.cat([m(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(batch)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_mixer_directions_mirror_each_other():
    """Reversing the tokens and swapping the forward and backward weights reverses the output."""
    torch.manual_seed(0)
    mixer = model_lib.BiMamba(16)
    swapped = model_lib.BiMamba(16)
    pairs = {"A_log": "A_b_log", "D": "D_b", "conv1d": "conv1d_b", "x_proj": "x_proj_b", "dt_proj": "dt_proj_b"}
    pairs.update({b: f for f, b in pairs.items()})

    def swap(key):
        head, dot, tail = key.partition(".")
        return pairs.get(head, head) + dot + tail
    swapped.load_state_dict({swap(k): v for k, v in mixer.state_dict().items()})
    h = torch.randn(2, 9, 16)
    assert torch.allclose(swapped(h.flip(1)), mixer(h).flip(1), atol=1e-5)


def test_cfg_guides_all_noise_channels():
    torch.manual_seed(0)
    m = tiny(num_classes=4, channels=4).eval()
    x, t, y = inputs(m, batch=2)
    null = torch.full_like(y, m.num_classes)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    cond, uncond = m(x, t, y), m(x, t, null)
    out = m.forward_with_cfg(xx, tt, yy, cfg_scale=1.5)
    guided = uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4])
    assert torch.allclose(out[:2, :4], guided, atol=1e-5) and torch.allclose(out[2:, :4], guided, atol=1e-5)
    assert torch.allclose(out[:2, 4:], cond[:, 4:], atol=1e-5)  # variance channels: unguided
    quirk = m.forward_with_cfg(xx, tt, yy, cfg_scale=1.5, cfg_channels=3)
    assert torch.allclose(quirk[:2, :3], guided[:, :3], atol=1e-5)
    assert torch.allclose(quirk[:2, 3], cond[:, 3], atol=1e-5)  # the original left channel 4 unguided
    assert torch.allclose(m.forward_with_cfg(xx, tt, yy, cfg_scale=1.0)[:2], cond, atol=1e-5)


def test_class_dropout_uses_the_null_class():
    m = tiny(num_classes=4, class_dropout_prob=1.0).train()
    y = torch.tensor([0, 1, 2])
    assert torch.equal(m.label_emb(y), m.label_emb.embedding_table.weight[[4, 4, 4]])
    assert torch.equal(m.label_emb.eval()(y), m.label_emb.embedding_table.weight[[0, 1, 2]])


@pytest.mark.parametrize("dt_init", ["symmetric", "original"])
def test_initialisation(dt_init):
    torch.manual_seed(0)
    m = tiny(dt_init=dt_init, depth=4)
    mixer = m.mid_block.mixer
    assert torch.allclose(mixer.A_log.exp(), torch.arange(1, 17.0).repeat(64, 1))
    assert torch.equal(mixer.D, torch.ones(64)) and torch.equal(mixer.D_b, torch.ones(64))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    dt_b = torch.nn.functional.softplus(mixer.dt_proj_b.bias)
    if dt_init == "symmetric":
        assert dt_b.min() >= 1e-4 and dt_b.max() <= 0.1 + 1e-6
    else:  # the original zeroes this bias: softplus(0) = log 2
        assert torch.allclose(dt_b, torch.full_like(dt_b, math.log(2)))
    assert torch.equal(m.pos_embed, torch.zeros_like(m.pos_embed))
    bound = 1 / math.sqrt(64) / math.sqrt(4)  # kaiming_uniform(a=sqrt 5) bound 1/sqrt(fan_in), / sqrt(depth)
    assert mixer.out_proj.weight.abs().max() <= bound and mixer.out_proj.weight.abs().max() > 0.8 * bound
    assert torch.equal(m.time_embed[0].bias, torch.zeros(128))


def test_drop_path_rates_rise_linearly():
    m = tiny(depth=4, drop_path_rate=0.3)
    assert [b.drop_path for b in m.blocks()] == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3])


def test_bf16_autocast_keeps_the_residual_in_float32():
    torch.manual_seed(0)
    m = tiny(num_classes=4).eval()
    x, t, y = inputs(m)
    seen = []
    m.mid_block.register_forward_hook(lambda mod, args, out: seen.append(out[1].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, y)
    assert seen == [torch.float32]
    ref = m(x, t, y)
    assert ((out.float() - ref).norm() / ref.norm()) < 5e-2


def test_bad_forward_inputs_raise_clear_errors():
    m = tiny(num_classes=4)
    x, t, y = inputs(m)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 8, 8\)"):
        m(x[:, :1], t, y)
    with pytest.raises(ValueError, match=r"expected images of shape"):
        m(torch.randn(3, 3, 16, 16), t, y)
    with pytest.raises(ValueError, match="need labels"):
        m(x, t)
    with pytest.raises(ValueError, match="unconditional models take y=None"):
        tiny()(x, t, y)


BAD_CONFIGS = [  # (keyword arguments of tiny(), message)
    (dict(img_size=30, patch_size=4), "img_size 30 is not divisible by the patch size 4"),
    (dict(img_size=0), "img_size must be an integer >= 1, got 0"),
    (dict(patch_size=0), "patch_size must be an integer >= 1, got 0"),
    (dict(channels=0), "channels must be an integer >= 1, got 0"),
    (dict(embed_dim=0), "embed_dim must be an integer >= 1, got 0"),
    (dict(embed_dim=32.0), "embed_dim must be an integer >= 1, got 32.0"),
    (dict(depth=0), "depth must be an even integer >= 2"),
    (dict(depth=3), r"depth must be an even integer >= 2 \(depth/2 in blocks, a mid block, .*\), got 3"),
    (dict(num_classes=2.5), "num_classes must be an integer"),
    (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
    (dict(drop_path_rate=-0.1), r"drop_path_rate must be in \[0, 1\), got -0.1"),
    (dict(class_dropout_prob=1.5), r"class_dropout_prob must be in \[0, 1\], got 1.5"),
    (dict(skip="sum"), "skip must be one of concat, add, none; got 'sum'"),
    (dict(cond="cross"), "cond must be one of token, adaln; got 'cross'"),
    (dict(dt_init="random"), "dt_init must be one of symmetric, original; got 'random'"),
    (dict(scan_backend="fast"), "scan_backend must be one of auto, ref, mamba, triton, cuda; got 'fast'"),
    (dict(scan_save_every=-1), "scan_save_every must be an integer >= 0, got -1"),
    (dict(recompute_scan_inputs=1), "recompute_scan_inputs must be True or False, got 1"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CONFIGS)
def test_bad_config_is_one_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message) as raised:
        tiny(**kwargs)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=12), "DiS-S/2 fixes depth; build DiS"),
    (dict(patch_size=4, embed_dim=8), "DiS-S/2 fixes embed_dim, patch_size"),
    (dict(image_size=32), "unknown argument 'image_size' of DiS-S/2; accepted: img_size, channels"),
    (dict(img_size=31), "img_size 31 is not divisible by the patch size 2"),
])
def test_registry_bad_arguments(kwargs, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        DiS_models["DiS-S/2"](**kwargs)


def test_scan_options_are_not_weights():
    """The scan's backend and checkpoint spacing change neither the parameters nor the function."""
    torch.manual_seed(0)
    plain = tiny(num_classes=4)
    torch.manual_seed(0)
    light = tiny(num_classes=4, scan_backend="ref", scan_save_every=2)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), light.state_dict().values()))
    x, t, y = inputs(plain)
    torch.testing.assert_close(light.eval()(x, t, y), plain.eval()(x, t, y))


def gpu_model(seed=0, **options):
    torch.manual_seed(seed)
    return DiS_models["DiS-S/2"](img_size=32, num_classes=10, **options).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["mamba", "triton", "cuda"])
def test_fused_dis_matches_reference_under_bf16(backend):
    import scan
    if backend not in scan.available_backends("cuda"):
        pytest.skip(f"{backend} backend not installed")
    x, t = torch.randn(4, 3, 32, 32, device="cuda"), torch.randint(0, 1000, (4,), device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    results = {}
    for name in ("ref", backend):
        m = gpu_model(scan_backend=name)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m.eval()(x, t, y)
        out.float().pow(2).mean().backward()
        results[name] = (out.float(), [p.grad.float().clone() for p in m.parameters()])
    (o_ref, g_ref), (o, g) = results["ref"], results[backend]
    assert ((o - o_ref).norm() / o_ref.norm()) < 2e-2
    for a, b in zip(g, g_ref):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)) < 5e-2


def test_padded_x_proj_and_dt_proj_are_the_plain_projections():
    """At D = 368 (Delta's rank 23) the mixer pads x_proj and dt_proj so that every row of their
    GEMMs' operands is a multiple of 8 values (16 bytes in 16 bits); the padded products must be
    each direction's plain Linear layers, with zeros in the padding."""
    torch.manual_seed(0)
    mixer = model_lib.BiMamba(368).double()
    xz = torch.randn(2, 5, 2 * 736, dtype=torch.float64)
    x_proj_w, dt_proj_w = mixer.projection_weights(torch.float64)
    u, x_dbl, z = mixer.conv_and_x_proj(xz, x_proj_w)
    assert torch.equal(z, xz[..., 736:])
    R, N, Rp = mixer.dt_rank, mixer.d_state, mixer.dt_rank_padded()
    delta, = mixer.dt_proj_of(x_dbl[..., :2 * Rp], dt_proj_w)
    assert (R, Rp) == (23, 24) and x_dbl.shape[-1] % 8 == 0
    directions = [(mixer.x_proj, mixer.dt_proj), (mixer.x_proj_b, mixer.dt_proj_b)]
    for d, (x_proj, dt_proj) in enumerate(directions):
        plain = x_proj(u[:, :, d])  # (B, L, R + 2N): Delta's ranks, B, C
        torch.testing.assert_close(x_dbl[..., d * Rp:d * Rp + R], plain[..., :R])
        assert (x_dbl[..., d * Rp + R:(d + 1) * Rp] == 0).all()
        torch.testing.assert_close(x_dbl[..., 2 * Rp + 2 * N * d:2 * Rp + 2 * N * (d + 1)], plain[..., R:])
        torch.testing.assert_close(delta[:, :, d], plain[..., :R] @ dt_proj.weight.T)


def test_placed_projection_weights_match_block_diag_and_pad_with_their_gradients():
    """projection_weights builds x_proj's and dt_proj's block-diagonal, zero-padded matrices with
    one custom autograd op (model.placed); the same matrices from slicing, F.pad, torch.block_diag
    and torch.cat, and the gradients autograd gives those, are the reference."""
    torch.manual_seed(0)
    mixer = model_lib.BiMamba(368).double()
    R, N, Rp = mixer.dt_rank, mixer.d_state, mixer.dt_rank_padded()
    w, w_b = mixer.x_proj.weight, mixer.x_proj_b.weight
    dt, dt_b = mixer.dt_proj.weight, mixer.dt_proj_b.weight
    rows = lambda m: torch.nn.functional.pad(m, (0, 0, 0, Rp - R))  # noqa: E731
    cols = lambda m: torch.nn.functional.pad(m, (0, Rp - R))  # noqa: E731
    reference = (torch.cat([torch.block_diag(rows(w[:R]), rows(w_b[:R])), torch.block_diag(w[R:], w_b[R:])]),
                 torch.block_diag(cols(dt), cols(dt_b)))
    placed = mixer.projection_weights(torch.float64)
    params = [w, w_b, dt, dt_b]
    upstream = [torch.randn_like(m) for m in reference]
    grads = [torch.autograd.grad(sum((m * g).sum() for m, g in zip(ms, upstream)), params)
             for ms in (reference, placed)]
    for a, b in zip(placed, reference):
        assert torch.equal(a, b)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    low = mixer.projection_weights(torch.bfloat16)[0]
    assert low.dtype == torch.bfloat16 and torch.equal(low, reference[0].detach().to(torch.bfloat16))


def test_placed_refuses_blocks_that_miss_or_repeat_rows():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="every row of each matrix once"):
        model_lib.placed((8, 3), x.dtype, [(x, 0, 2, 0, 0)])
    with pytest.raises(ValueError, match="every row of each matrix once"):
        model_lib.placed((8, 3), x.dtype, [(x, 0, 3, 0, 0), (x, 2, 4, 4, 0)])


def test_x_dbl_parts_are_views_with_the_gradients_of_plain_slicing():
    torch.manual_seed(0)
    Rp, N = 8, 4
    x_dbl = torch.randn(2, 5, 2 * Rp + 4 * N, dtype=torch.float64, requires_grad=True)
    parts = model_lib.x_dbl_parts(x_dbl, Rp, N)
    BC = x_dbl[..., 2 * Rp:].unflatten(-1, (2, 2 * N))
    plain = (x_dbl[..., :2 * Rp], BC[..., :N], BC[..., N:])
    upstream = [torch.randn_like(p) for p in plain]
    for a, b in zip(parts, plain):
        assert torch.equal(a, b) and a.data_ptr() == b.data_ptr()
    for used in ([0, 1, 2], [1, 2], [0]):  # a part without a gradient counts as zeros
        grads = [torch.autograd.grad(sum((ps[i] * upstream[i]).sum() for i in used), x_dbl)[0]
                 for ps in (model_lib.x_dbl_parts(x_dbl, Rp, N), plain)]
        assert torch.equal(*grads)


def test_placed_and_x_dbl_parts_trace_whole_under_torch_compile():
    """train.py --compile: the mixer's two custom autograd ops trace without a graph break, with
    the eager values and gradients."""
    torch.manual_seed(0)
    mixer = model_lib.BiMamba(64)
    Rp, N = mixer.dt_rank_padded(), mixer.d_state
    x_dbl = torch.randn(2, 5, 2 * Rp + 4 * N, requires_grad=True)

    def loss(x_dbl):
        x_proj, dt_proj = mixer.projection_weights(torch.float32)
        parts = model_lib.x_dbl_parts(x_dbl, Rp, N)
        return sum((k + 1) * m.square().sum() for k, m in enumerate((x_proj, dt_proj, *parts)))

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        torch._dynamo.reset()
        value = fn(x_dbl)
        inputs = [x_dbl, *mixer.parameters()]
        grads = torch.autograd.grad(value, inputs, allow_unused=True)
        results.append((value, [g for g in grads if g is not None]))
    (v0, g0), (v1, g1) = results
    assert torch.equal(v0, v1) and len(g0) == len(g1) == 5
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
