"""Tests for diffusion.py against independent references: diffusers' schedulers, scipy
densities and float64 numpy recomputations from the definitions (DDPM / improved DDPM / DDIM)."""
import inspect
import math

import diffusers
import numpy as np
import pytest
import torch
from scipy import integrate, stats

import model as dis
from diffusion import (create_diffusion, discretized_gaussian_log_likelihood, generate, normal_kl, sampler_respacing,
                       space_timesteps)

T = 1000
LOG2 = math.log(2.0)


pytestmark = [pytest.mark.usefixtures("one_thread"),
              # diffusers' DPMSolverMultistepScheduler.set_timesteps calls np.array on a tensor
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


def diffusers_linear(scheduler, **kwargs):
    """A diffusers scheduler on DiS's linear schedule (T steps, betas 1e-4..2e-2)."""
    return scheduler(beta_schedule="linear", beta_start=1e-4, beta_end=2e-2, num_train_timesteps=T, **kwargs)


def reference_alphas_cumprod():
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) for DiS's linear betas, float64."""
    return np.cumprod(1.0 - np.linspace(1e-4, 2e-2, T))


def iddpm_space_timesteps(num_timesteps, section_counts):
    """IDDPM's / DiT's respace.space_timesteps for a list of per-section counts, restated: the
    fractional stride is accumulated, then each position rounded."""
    size_per, extra = num_timesteps // len(section_counts), num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def iddpm_decoder_log_likelihood(x, means, log_scales):
    """IDDPM's / DiT's discretized_gaussian_log_likelihood restated in float64 numpy: the
    normal CDF approximated by 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), logs clamped at 1e-12."""
    cdf = lambda v: 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))
    inv_stdv = np.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_stdv * (x - means + 1 / 255)), cdf(inv_stdv * (x - means - 1 / 255))
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1 - cdf_min, 1e-12))
    log_delta = np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
    return np.where(x < -0.999, log_cdf_plus, np.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def grid_images(shape, seed):
    """Random images on the 256-level grid of [-1, 1], including both edge values."""
    levels = np.random.default_rng(seed).integers(0, 256, size=shape)
    levels.flat[0], levels.flat[1] = 0, 255
    return torch.tensor(levels / 127.5 - 1.0, dtype=torch.float32)


class TinyNet(torch.nn.Module):
    """Conv net taking (x, t) with the timestep as an extra input channel; outputs 2C channels."""

    def __init__(self, channels=1, width=32, out_scale=1.0):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels + 1, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, 2 * channels, 3, padding=1))
        self.out_scale = out_scale

    def forward(self, x, t):
        t_channel = (t.float() / T).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.out_scale * self.net(torch.cat([x, t_channel], dim=1))


# ----------------------------------------------------------------------------- schedules

def test_linear_schedule_matches_diffusers():
    ours = create_diffusion("")
    ref = diffusers_linear(diffusers.DDPMScheduler)
    assert ours.num_timesteps == T and ours.betas.dtype == np.float64
    np.testing.assert_allclose(ours.betas, ref.betas.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=1e-5)
    np.testing.assert_array_equal(ours.timestep_map, np.arange(T))


def test_cosine_schedule_matches_diffusers():
    ours = create_diffusion("", noise_schedule="cosine")
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=T)
    np.testing.assert_allclose(ours.betas, ref.betas.double().numpy(), rtol=1e-5, atol=1e-7)


def test_posterior_constants_from_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1-abar_{t-1}):
    precision and mean of a product of Gaussians, step by step in float64."""
    d = create_diffusion("")
    betas = np.linspace(1e-4, 2e-2, T)
    abar = reference_alphas_cumprod()
    for t in range(1, T):
        precision = (1 - betas[t]) / betas[t] + 1 / (1 - abar[t - 1])
        var = 1 / precision
        assert d.posterior_variance[t] == pytest.approx(var, rel=1e-10)
        assert d.posterior_mean_coef1[t] == pytest.approx(var * math.sqrt(abar[t - 1]) / (1 - abar[t - 1]), rel=1e-10)
        assert d.posterior_mean_coef2[t] == pytest.approx(var * math.sqrt(1 - betas[t]) / betas[t], rel=1e-10)
    # At t = 0 the posterior is a point mass at x_0; its log-variance is clipped to that of t = 1.
    assert d.posterior_variance[0] == 0 and d.posterior_mean_coef2[0] == 0
    assert d.posterior_mean_coef1[0] == pytest.approx(1)
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(d.posterior_variance[1]))


def test_q_sample_matches_diffusers_add_noise():
    d = create_diffusion("")
    ref = diffusers_linear(diffusers.DDPMScheduler)
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(d.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- densities

@pytest.mark.parametrize("m1,lv1,m2,lv2", [(0.3, -1.0, -0.2, 0.5), (0.0, 0.0, 0.0, 0.0), (1.5, -4.0, 0.0, -3.0)])
def test_normal_kl_matches_numeric_integral(m1, lv1, m2, lv2):
    p = stats.norm(m1, math.exp(0.5 * lv1))
    q = stats.norm(m2, math.exp(0.5 * lv2))
    ref, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -np.inf, np.inf, epsabs=1e-12)
    ours = normal_kl(torch.tensor(m1, dtype=torch.float64), lv1, m2, torch.tensor(lv2, dtype=torch.float64))
    assert ours.item() == pytest.approx(ref, rel=1e-6, abs=1e-10)


def test_discretized_gaussian_log_likelihood_matches_scipy():
    x = grid_images((6, 50), seed=0).double()
    rng = np.random.default_rng(1)
    means = x + torch.tensor(rng.normal(0.0, 0.05, x.shape))
    log_scales = torch.tensor(rng.uniform(-6.0, -1.0, x.shape))
    ours = discretized_gaussian_log_likelihood(x, means, log_scales, exact_cdf=True).numpy()
    xn, mn, sn = x.numpy(), means.numpy(), np.exp(log_scales.numpy())
    upper, lower = (xn + 1 / 255 - mn) / sn, (xn - 1 / 255 - mn) / sn
    ref = np.where(xn == -1, stats.norm.logcdf(upper),
                   np.where(xn == 1, stats.norm.logsf(lower),
                            np.log(np.maximum(stats.norm.cdf(upper) - stats.norm.cdf(lower), 1e-12))))
    assert (xn == -1).any() and (xn == 1).any()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_decoder_likelihood_is_iddpms_by_default():
    x = grid_images((6, 50), seed=0).double()
    rng = np.random.default_rng(1)
    means = x + torch.tensor(rng.normal(0.0, 0.05, x.shape))
    log_scales = torch.tensor(rng.uniform(-6.0, -1.0, x.shape))
    ours = discretized_gaussian_log_likelihood(x, means, log_scales).numpy()
    ref = iddpm_decoder_log_likelihood(x.numpy(), means.numpy(), log_scales.numpy())
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)   # float64 cancellation in 1 - cdf
    exact = discretized_gaussian_log_likelihood(x, means, log_scales, exact_cdf=True).numpy()
    assert np.abs(exact - ref).max() > 1e-3     # the two CDFs are distinguishable here


@pytest.mark.parametrize("exact_cdf", [False, True])
def test_discretized_gaussian_bins_sum_to_one(exact_cdf):
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    for mean, log_scale in [(0.1, -2.0), (-0.97, -5.0), (1.2, -1.0)]:
        means, log_scales = torch.full_like(levels, mean), torch.full_like(levels, log_scale)
        logp = discretized_gaussian_log_likelihood(levels, means, log_scales, exact_cdf)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- respacing

@pytest.mark.parametrize("spacing,count", [("250", 250), ("ddim50", 50), ("10", 10), ("10,15,20", 45), ("", T)])
def test_respacing_keeps_alphas_cumprod(spacing, count):
    d = create_diffusion(spacing)
    assert d.num_timesteps == count and len(set(d.timestep_map.tolist())) == count
    np.testing.assert_allclose(d.alphas_cumprod, reference_alphas_cumprod()[d.timestep_map], rtol=1e-12)


def test_respaced_step_sets():
    np.testing.assert_array_equal(create_diffusion("ddim50").timestep_map, np.arange(0, T, 20))
    np.testing.assert_array_equal(create_diffusion("ddim10").timestep_map, np.arange(0, T, 100))
    steps = create_diffusion("250").timestep_map
    assert steps[0] == 0 and steps[-1] == T - 1 and set(np.diff(steps).tolist()) <= {4, 5}
    steps = create_diffusion("10,15,20").timestep_map     # sections [0, 334), [334, 667), [667, 1000)
    assert [((steps >= a) & (steps < b)).sum() for a, b in [(0, 334), (334, 667), (667, 1000)]] == [10, 15, 20]
    assert {0, 333, 334, 666, 667, 999} <= set(steps.tolist())


def test_respacing_is_iddpms_for_every_step_count():
    assert space_timesteps(T, "1") == iddpm_space_timesteps(T, [1]) == {0}
    for count in range(2, T + 1):
        kept = set(create_diffusion(str(count)).timestep_map.tolist())
        assert kept == iddpm_space_timesteps(T, [count]), count
    assert {499, 500} & set(create_diffusion(21).timestep_map.tolist()) == {499}
    for sections in ([10, 15, 20], [7, 1, 33], [3, 100, 9, 250]):
        assert set(create_diffusion(sections).timestep_map.tolist()) == iddpm_space_timesteps(T, sections)
        assert set(create_diffusion(",".join(map(str, sections))).timestep_map.tolist()) == \
            iddpm_space_timesteps(T, sections)


@pytest.mark.parametrize("spacing", ["ddim999", "2000", "ddimx", "fifty", "10,,5", "0", "1", 2.5, [10, "5"]])
def test_bad_respacing_raises(spacing):
    with pytest.raises(ValueError, match="timestep_respacing"):
        create_diffusion(spacing)


@pytest.mark.parametrize("kwargs,name", [(dict(noise_schedule="quadratic"), "noise_schedule"),
                                         (dict(diffusion_steps=0), "diffusion_steps"),
                                         (dict(diffusion_steps=1000.0), "diffusion_steps")])
def test_bad_create_diffusion_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        create_diffusion("", **kwargs)


def test_create_diffusion_defaults_are_dits():
    """DiT's diffusion/__init__.py: create_diffusion(timestep_respacing, noise_schedule="linear",
    use_kl=False, sigma_small=False, predict_xstart=False, learn_sigma=True,
    rescale_learned_sigmas=False, diffusion_steps=1000), the loss then being LossType.MSE."""
    dit = dict(noise_schedule="linear", use_kl=False, sigma_small=False, predict_xstart=False, learn_sigma=True,
               rescale_learned_sigmas=False, diffusion_steps=1000)
    defaults = {name: p.default for name, p in inspect.signature(create_diffusion).parameters.items()}
    assert {name: defaults[name] for name in dit} == dit
    # MSE (not RESCALED_MSE) on a respaced process: the vb term is the bound itself, unscaled.
    d = create_diffusion("100")
    B, C = 2, 1
    x0, noise = grid_images((B, C, 4, 4), seed=8), torch.randn(B, C, 4, 4)
    output = torch.cat([torch.randn(B, C, 4, 4), torch.rand(B, C, 4, 4) * 2 - 1], dim=1)
    t = torch.tensor([3, 60])
    vb = d.training_losses(lambda x, s: output, x0, t, noise=noise)["vb"]
    frozen_vb = d.vb_terms_bpd(output, x0, d.q_sample(x0, t, noise), t)["output"]
    torch.testing.assert_close(vb, frozen_vb)
    rescaled = create_diffusion("100", rescale_learned_sigmas=True).training_losses(lambda x, s: output, x0, t,
                                                                                    noise=noise)["vb"]
    torch.testing.assert_close(rescaled, 0.1 * frozen_vb)


def test_respaced_ddpm_step_matches_diffusers():
    """One ancestral step of the 10-step process vs diffusers' DDPMScheduler (learned_range,
    leading spacing 900, 800, ..., 0), with the same noise; also checks the model sees original t."""
    d = create_diffusion("ddim10")
    ref = diffusers_linear(diffusers.DDPMScheduler, variance_type="learned_range", clip_sample=True)
    ref.set_timesteps(10)
    B, C = 3, 2
    x = torch.randn(B, C, 4, 4) * 1.5
    output = torch.cat([torch.randn(B, C, 4, 4), torch.rand(B, C, 4, 4) * 2 - 1], dim=1)
    seen = []

    def model(x_in, t_in):
        seen.append(t_in.clone())
        return output

    for i, t_orig in enumerate(range(0, T, 100)):
        out = d.p_mean_variance(model, x, torch.full((B,), i), clip_denoised=True)
        assert torch.equal(seen[-1], torch.full((B,), t_orig))
        gen = torch.Generator().manual_seed(i)
        ref_prev = ref.step(output, t_orig, x, generator=gen).prev_sample
        noise = torch.randn(B, C, 4, 4, generator=torch.Generator().manual_seed(i)) if i > 0 else 0.0
        torch.testing.assert_close(out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise, ref_prev,
                                   rtol=1e-4, atol=1e-5)


def test_ddim_loop_matches_diffusers():
    d = create_diffusion("ddim10")
    ref = diffusers_linear(diffusers.DDIMScheduler, clip_sample=True, set_alpha_to_one=True)
    ref.set_timesteps(10)
    torch.manual_seed(0)
    model = TinyNet(channels=1, out_scale=3.0)
    noise = torch.randn(2, 1, 6, 6)
    ours = d.ddim_sample_loop(model, noise.shape, noise=noise, eta=0.0)
    x = noise
    with torch.no_grad():
        for t in ref.timesteps:
            eps = model(x, t.expand(2))[:, :1]
            x = ref.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)


def test_ddim_stochastic_step_matches_diffusers():
    """eta = 1: the DDIM step's noise scale sigma_t (DDIM eq. 16) against diffusers with the same noise."""
    d = create_diffusion("ddim10")
    ref = diffusers_linear(diffusers.DDIMScheduler, clip_sample=True, set_alpha_to_one=True)
    ref.set_timesteps(10)
    x = torch.randn(2, 1, 5, 5)
    output = torch.cat([torch.randn(2, 1, 5, 5), torch.zeros(2, 1, 5, 5)], dim=1)
    for i in (3, 7):
        torch.manual_seed(i)
        ours = d.ddim_sample(lambda x_in, t_in: output, x, torch.full((2,), i), eta=1.0)["sample"]
        torch.manual_seed(i)
        noise = torch.randn_like(x)
        expected = ref.step(output[:, :1], 100 * i, x, eta=1.0, use_clipped_model_output=True,
                            variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- training loss

def reference_losses(x0, t, noise, output):
    """float64 numpy hybrid loss of improved DDPM for a fixed model output (B, 2C, ...):
    per-sample eps MSE and the bound term in bits (decoder NLL at t = 0, Gaussian KL else)."""
    x0, noise, output = (a.double().numpy() for a in (x0, noise, output))
    C = x0.shape[1]
    betas = np.linspace(1e-4, 2e-2, T)
    abar = reference_alphas_cumprod()
    mse, vb = [], []
    for b, s in enumerate(t.tolist()):
        a, a_prev, beta = abar[s], (abar[s - 1] if s > 0 else 1.0), betas[s]
        x_t = math.sqrt(a) * x0[b] + math.sqrt(1 - a) * noise[b]
        eps, v = output[b, :C], output[b, C:]

        def posterior_mean(start):   # DDPM eq. 7
            return (beta * math.sqrt(a_prev) * start + (1 - a_prev) * math.sqrt(1 - beta) * x_t) / (1 - a)

        k = max(s, 1)                 # the posterior log-variance at t = 0 is clipped to that of t = 1
        log_post = math.log(betas[k] * (1 - abar[k - 1]) / (1 - abar[k]))
        log_var = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * log_post
        mean = posterior_mean((x_t - math.sqrt(1 - a) * eps) / math.sqrt(a))
        mse.append(np.mean((noise[b] - eps) ** 2))
        if s == 0:
            logp = iddpm_decoder_log_likelihood(x0[b], mean, 0.5 * log_var)
            vb.append(-np.mean(logp) / LOG2)
        else:
            var, true_mean = np.exp(log_var), posterior_mean(x0[b])
            kl = 0.5 * (log_var - log_post + (math.exp(log_post) + (true_mean - mean) ** 2) / var - 1)
            vb.append(np.mean(kl) / LOG2)
    return np.array(mse), np.array(vb)


def test_training_losses_match_reference():
    d = create_diffusion("")
    B, C = 4, 2
    x0 = grid_images((B, C, 4, 4), seed=2)
    noise = torch.randn(B, C, 4, 4)
    output = torch.cat([noise + 0.3 * torch.randn(B, C, 4, 4), torch.rand(B, C, 4, 4) * 2 - 1], dim=1)
    t = torch.tensor([0, 1, 500, 999])
    terms = d.training_losses(lambda x, s: output, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"} and all(v.shape == (B,) for v in terms.values())
    ref_mse, ref_vb = reference_losses(x0, t, noise, output)
    np.testing.assert_allclose(terms["mse"].numpy(), ref_mse, rtol=1e-5)
    np.testing.assert_allclose(terms["vb"].numpy(), ref_vb, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(terms["loss"].numpy(), ref_mse + ref_vb, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("respacing", ["", "25"])
def test_schedule_kept_as_tensors_gives_the_same_losses(respacing):
    """keep_schedule_on (for CUDA graphs: no host copies in a training step) changes no loss bit,
    respaced (timestep_map) or not; a host copy of the tables would now fail on a device mismatch."""
    B, C = 4, 2
    x0, noise = grid_images((B, C, 4, 4), seed=3), torch.randn(B, C, 4, 4)
    output = torch.cat([noise + 0.3 * torch.randn(B, C, 4, 4), torch.rand(B, C, 4, 4) * 2 - 1], dim=1)
    seen = []

    def model(x, s):
        seen.append(s)
        return output
    t = torch.tensor([0, 1, 7, 24])
    numpy_tables = create_diffusion(respacing).training_losses(model, x0, t, noise=noise)
    kept = create_diffusion(respacing)
    kept.keep_schedule_on(torch.device("cpu"))
    assert isinstance(kept.sqrt_alphas_cumprod, torch.Tensor) and kept.sqrt_alphas_cumprod.dtype == torch.float32
    assert kept.timestep_map.dtype == torch.int64
    tensor_tables = kept.training_losses(model, x0, t, noise=noise)
    for key in numpy_tables:
        assert torch.equal(numpy_tables[key], tensor_tables[key]), key
    assert torch.equal(seen[0], seen[1])  # the original steps the model sees


def test_fixed_variance_has_no_vb_and_checks_channels():
    d = create_diffusion("", learn_sigma=False)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    terms = d.training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([3, 7]))
    assert set(terms) == {"loss", "mse"} and terms["loss"].shape == (2,)
    with pytest.raises(ValueError, match="channels"):
        create_diffusion("").training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([3, 7]))
    with pytest.raises(ValueError, match="channels"):
        d.training_losses(lambda x, t: torch.cat([x, x], dim=1), x0, torch.tensor([3, 7]))


def test_vb_gradient_reaches_only_the_variance():
    B, C = 4, 2
    x0 = grid_images((B, C, 4, 4), seed=3)
    t = torch.tensor([0, 5, 300, 900])
    grads = {}
    for use_kl in (False, True):
        d = create_diffusion("", use_kl=use_kl)
        output = torch.nn.Parameter(torch.randn(B, 2 * C, 4, 4) * 0.5)
        d.training_losses(lambda x, s: output, x0, t)["vb"].sum().backward()
        grads[use_kl] = output.grad
    assert torch.count_nonzero(grads[False][:, :C]) == 0
    assert torch.count_nonzero(grads[False][:, C:]) > 0
    assert torch.count_nonzero(grads[True][:, :C]) > 0     # the full bound does train the mean


def test_bf16_model_output_is_upcast():
    d = create_diffusion("")
    x0 = grid_images((2, 1, 4, 4), seed=4)
    model = lambda x, t: torch.cat([torch.randn_like(x), torch.zeros_like(x)], dim=1).bfloat16()
    terms = d.training_losses(model, x0, torch.tensor([0, 400]))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in terms.values())


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    d = create_diffusion("")
    model = TinyNet(channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x0 = grid_images((8, 1, 8, 8), seed=5)
    t = torch.randint(0, T, (8,))
    noise = torch.randn_like(x0)
    losses = []
    for _ in range(100):
        loss = d.training_losses(model, x0, t, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# ----------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_sampling_is_seeded(loop):
    d = create_diffusion("10")
    torch.manual_seed(0)
    model = TinyNet(channels=1)
    shape = (2, 1, 6, 6)
    kwargs = dict(eta=1.0) if loop == "ddim_sample_loop" else {}
    samples = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        samples.append(getattr(d, loop)(model, shape, **kwargs))
    assert samples[0].shape == shape and torch.isfinite(samples[0]).all()
    assert torch.equal(samples[0], samples[1])
    assert not torch.allclose(samples[0], samples[2])


def test_ddim_eta0_deterministic_given_noise():
    d = create_diffusion("10")
    torch.manual_seed(0)
    model = TinyNet(channels=1)
    noise = torch.randn(2, 1, 6, 6)
    torch.manual_seed(1)
    a = d.ddim_sample_loop(model, noise.shape, noise=noise)
    torch.manual_seed(2)
    b = d.ddim_sample_loop(model, noise.shape, noise=noise)
    assert torch.equal(a, b) and a.abs().max() <= 1.0 + 1e-6


def reference_dpm_solver_2m(eps_fn, x, steps, clip, draw=None):
    """[DPM-Solver++] Algorithm 2 (multistep, second order) in float64 numpy, restated from the
    paper: time points `steps` (original indices, descending) and then sigma = 0, where the
    last update returns the data prediction; first order at the first and the last update.
    With draw, its SDE form (section 5, midpoint form): draw() gives the fresh standard normal
    noise of each update (one per step, the last one unused)."""
    abar = reference_alphas_cumprod()[steps]
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    lam = np.log(alpha / sigma)
    x, prev_x0, prev_h = x.double().numpy(), None, None
    for i, t in enumerate(steps):
        x0 = (x - sigma[i] * eps_fn(x, t)) / alpha[i]
        if clip:
            x0 = np.clip(x0, -1, 1)
        z = draw() if draw else None
        if i == len(steps) - 1:
            return x0
        h = lam[i + 1] - lam[i]
        D = x0 if prev_x0 is None else x0 + h / (2 * prev_h) * (x0 - prev_x0)
        if draw is None:
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (np.exp(-h) - 1) * D
        else:
            x = (sigma[i + 1] / sigma[i] * np.exp(-h) * x + alpha[i + 1] * (1 - np.exp(-2 * h)) * D
                 + sigma[i + 1] * np.sqrt(1 - np.exp(-2 * h)) * z)
        prev_x0, prev_h = x0, h


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_matches_the_papers_algorithm(clip, stochastic):
    d = create_diffusion("12")
    torch.manual_seed(0)
    model = TinyNet(channels=1, out_scale=3.0)          # 2C outputs: the variance half is ignored
    noise = torch.randn(2, 1, 6, 6)
    torch.manual_seed(5)                                # the SDE's noise
    ours = d.dpm_solver_sample_loop(model, noise.shape, noise=noise, clip_denoised=clip, stochastic=stochastic)

    def eps_fn(x, t):
        with torch.no_grad():
            return model(torch.tensor(x, dtype=torch.float32), torch.full((2,), t))[:, :1].double().numpy()
    torch.manual_seed(5)
    draw = (lambda: torch.randn(noise.shape).double().numpy()) if stochastic else None
    expected = reference_dpm_solver_2m(eps_fn, noise, d.timestep_map[::-1], clip, draw)
    # float32 against float64; the SDE's noise term carries the rounding of every step further
    assert np.abs(ours.numpy() - expected).max() < (1e-4 if stochastic else 1e-5) * np.abs(expected).max()
    if stochastic:  # fresh noise at every step: another seed, another sample
        torch.manual_seed(6)
        other = d.dpm_solver_sample_loop(model, noise.shape, noise=noise, clip_denoised=clip, stochastic=True)
        assert (other - ours).abs().max() > 1e-3


def test_fast_samplers_converge_to_the_ode_solution_of_gaussian_data():
    """Data N(mu, s^2) per pixel: the exact noise prediction is sigma_t (x - a_t mu) / (a_t^2 s^2 +
    sigma_t^2), and the probability-flow ODE keeps z = (x_t - a_t mu) / sqrt(a_t^2 s^2 + sigma_t^2)
    constant. Both samplers end with the x_0 estimate at t = 0, E[x_0 | x_{t=0}], so the exact
    answer is that estimate at the ODE's x_{t=0}. DPM-Solver++(2M) must converge at second order,
    DDIM at first order."""
    mu, s = 0.3, 0.5
    abar = torch.tensor(reference_alphas_cumprod())

    def oracle(x, t):
        a, var = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).view(-1, 1, 1, 1)
        return (var.sqrt() * (x.double() - a * mu) / (a ** 2 * s ** 2 + var)).float()

    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a_T, a_0 = abar[T - 1].sqrt(), abar[0].sqrt()
    z = (noise.double() - a_T * mu) / (a_T ** 2 * s ** 2 + 1 - abar[T - 1]).sqrt()
    x_at_0 = a_0 * mu + (a_0 ** 2 * s ** 2 + 1 - abar[0]).sqrt() * z
    exact = mu + a_0 * s ** 2 / (a_0 ** 2 * s ** 2 + 1 - abar[0]) * (x_at_0 - a_0 * mu)

    def error(loop, steps):
        d = create_diffusion(str(steps), learn_sigma=False)
        return (getattr(d, loop)(oracle, noise.shape, noise=noise, clip_denoised=False).double() - exact).abs().max()
    dpm = {n: error("dpm_solver_sample_loop", n) for n in (50, 100, 200)}
    ddim = {n: error("ddim_sample_loop", n) for n in (50, 100, 200)}
    assert dpm[50] / dpm[100] > 3.5 and dpm[100] / dpm[200] > 3.5                # error ~ steps^-2
    assert 1.8 < ddim[50] / ddim[100] < 2.2 and 1.8 < ddim[100] / ddim[200] < 2.2  # error ~ steps^-1
    assert dpm[200] < 0.01 and dpm[200] < ddim[200] / 3


# ----------------------------------------------------------------------------- generate and guidance

@pytest.fixture(scope="module")
def tiny_dis():
    """A class-conditional DiS (D=16, depth 2, 8x8, 1 channel) with random weights everywhere
    (the initialisation zeroes the output layer), in eval mode."""
    torch.manual_seed(0)
    model = dis.DiS(img_size=8, patch_size=2, channels=1, embed_dim=16, depth=2, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def sample_with(model, sampler, seed=0, **kwargs):
    d = create_diffusion(sampler_respacing(sampler, 6))
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed + 1)                                        # the DDPM noise
    return generate(model, d, noise, torch.tensor([1, 4, 7]), sampler=sampler, **kwargs)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++", "dpm++sde"])
def test_guidance_interval_outside_is_the_conditional_model_inside_is_guided(tiny_dis, sampler):
    conditional = sample_with(tiny_dis, sampler, cfg_scale=1.0)
    guided = sample_with(tiny_dis, sampler, cfg_scale=4.0)
    assert not torch.equal(conditional, guided)
    assert torch.equal(sample_with(tiny_dis, sampler, cfg_scale=4.0, cfg_interval=(0.9995, 1.0)), conditional)
    assert torch.equal(sample_with(tiny_dis, sampler, cfg_scale=4.0, cfg_interval=(0.0, 1.0)), guided)


def test_guidance_interval_guides_exactly_the_steps_inside(tiny_dis, monkeypatch):
    """Steps of "6": 0, 200, 400, 599, 799, 999 (IDDPM's rule); the interval [0.3, 0.8] holds
    t/T = 0.4, 0.599, 0.799: those three run on the doubled batch, the others on the batch."""
    calls = []
    forward = tiny_dis.forward
    monkeypatch.setattr(tiny_dis, "forward", lambda x, t, y=None: calls.append((len(x), t[0].item())) or forward(x, t, y))
    mixed = sample_with(tiny_dis, "dpm++", cfg_scale=4.0, cfg_interval=(0.3, 0.8))
    assert calls == [(3, 999), (6, 799), (6, 599), (6, 400), (3, 200), (3, 0)]
    monkeypatch.undo()
    assert not torch.equal(mixed, sample_with(tiny_dis, "dpm++", cfg_scale=4.0))
    assert not torch.equal(mixed, sample_with(tiny_dis, "dpm++", cfg_scale=1.0))


@pytest.mark.parametrize("kwargs,name", [(dict(sampler="euler"), "sampler"), (dict(cfg_interval=(0.5, 0.2)), "cfg_interval"),
                                         (dict(cfg_interval=(-0.1, 0.5)), "cfg_interval"),
                                         (dict(cfg_interval=(0.5,)), "cfg_interval")])
def test_generate_rejects_bad_arguments(tiny_dis, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate(tiny_dis, create_diffusion("4"), torch.randn(1, 1, 8, 8), torch.tensor([0]), 2.0, **kwargs)


# ----------------------------------------------------------------------------- likelihood

def test_calc_bpd_loop_shapes():
    d = create_diffusion("10")
    torch.manual_seed(0)
    out = d.calc_bpd_loop(TinyNet(channels=1), grid_images((3, 1, 6, 6), seed=6))
    assert out["total_bpd"].shape == (3,) and out["prior_bpd"].shape == (3,)
    assert out["vb"].shape == out["xstart_mse"].shape == out["mse"].shape == (3, 10)
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("exact_cdf", [False, True])
def test_calc_bpd_loop_with_exact_posterior(exact_cdf):
    """A model that knows x_0 predicts the true noise; with the posterior variance (fixed_small)
    every KL term vanishes and the bound is prior + decoder NLL, both in closed form (the
    decoder's with IDDPM's CDF approximation by default, scipy's exact CDF with exact_decoder_cdf)."""
    d = create_diffusion("10", learn_sigma=False, sigma_small=True, exact_decoder_cdf=exact_cdf)
    abar_all = reference_alphas_cumprod()
    abar_torch = torch.tensor(abar_all, dtype=torch.float64)

    def oracle(x_t, t, x0):
        a = abar_torch[t].view(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()

    x0 = grid_images((3, 1, 6, 6), seed=7)
    out = d.calc_bpd_loop(oracle, x0, model_kwargs=dict(x0=x0))

    xn = x0.double().numpy()
    a_T = abar_all[-1]
    prior = np.mean(0.5 * (-1 - math.log(1 - a_T) + (1 - a_T) + a_T * xn ** 2), axis=(1, 2, 3)) / LOG2
    np.testing.assert_allclose(out["prior_bpd"].numpy(), prior, rtol=1e-3)   # float32 cancellation

    s1 = d.timestep_map[1]                        # decoder variance = posterior variance of respaced step 1
    beta1 = 1 - abar_all[s1] / abar_all[0]
    sd = math.sqrt(beta1 * (1 - abar_all[0]) / (1 - abar_all[s1]))
    if exact_cdf:
        upper, lower = stats.norm.cdf(1 / 255 / sd), stats.norm.cdf(-1 / 255 / sd)
        logp = np.where(xn == -1, np.log(upper), np.where(xn == 1, np.log(1 - lower), np.log(upper - lower)))
    else:
        logp = iddpm_decoder_log_likelihood(xn, xn, np.full_like(xn, math.log(sd)))
    decoder = -logp.mean(axis=(1, 2, 3)) / LOG2
    np.testing.assert_allclose(out["vb"][:, 0].numpy(), decoder, rtol=1e-4)
    assert out["vb"][:, 1:].abs().max() < 1e-4
    assert out["xstart_mse"].max() < 1e-8
    np.testing.assert_allclose(out["total_bpd"].numpy(), prior + decoder, rtol=1e-4)
