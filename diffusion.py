"""Gaussian diffusion for DiS (paper sections 2.1 and 3.1), following DiT / improved DDPM / ADM.

DiS keeps DiT's diffusion hyper-parameters: T = 1000 steps, linear betas from 1e-4 to 2e-2,
a model that predicts the noise eps together with a learned-range variance, and the hybrid
loss L_simple + L_vlb of improved DDPM. References used in the comments:
  [DDPM]   Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models".
  [iDDPM]  Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models".
  [DDIM]   Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models".
  [DPM-Solver++] Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for Guided
           Sampling of Diffusion Probabilistic Models".

Usage:
    diffusion = create_diffusion("")           # training: all 1000 steps
    terms = diffusion.training_losses(model, x0, t, dict(y=y))   # t: (B,) in [0, num_timesteps)
    sampler = create_diffusion("250")          # sampling with 250 evenly spaced steps
    x = sampler.p_sample_loop(model, (B, C, H, W), model_kwargs=dict(y=y), device=device)

Models are callables model(x, t, **model_kwargs) -> (B, 2C, ...) with learned sigma (noise,
then variance interpolation in [-1, 1]) or (B, C, ...) without. t is always given in the
ORIGINAL 1000-step indices, also when the process is respaced. `generate` samples images
from a DiS with any of the samplers (DDPM, DDIM, DPM-Solver++ and its SDE form), classifier-free guidance
(optionally in an interval of noise levels) and the VAE decoder.

All schedule constants are float64 numpy arrays; per-step values are gathered into float32
tensors on the data's device by `extract`. Randomness comes only from torch (randn_like), so
sampling is reproducible under torch.manual_seed.
"""
import functools
import math
import re

import numpy as np
import torch
from tqdm.auto import tqdm

from graphs import GraphedSampling


# ----------------------------------------------------------------------------- schedules

def get_named_beta_schedule(name, num_timesteps):
    """Betas (T,) float64. "linear": [DDPM] section 4, 1e-4 to 2e-2 for T = 1000, scaled by
    1000/T for other T as in [iDDPM]'s code; "cosine": [iDDPM] eq. 17 (diffusers' squaredcos_cap_v2)."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 2e-2, num_timesteps, dtype=np.float64)
    if name == "cosine":
        # alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) with s = 0.008, betas capped at 0.999.
        def alpha_bar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                 for i in range(num_timesteps)]
        return np.array(betas, dtype=np.float64)
    raise ValueError(f"unknown noise_schedule {name!r}; use 'linear' or 'cosine'")


def space_timesteps(num_timesteps, section_counts):
    """Set of kept step indices. section_counts: "ddimN" (the smallest integer stride that gives
    exactly N steps, [DDIM] section 4.2), or ints / a comma string like "10,15,20": split the T
    steps into equal sections and keep that many evenly spaced steps in each ([iDDPM] section 4)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            if not section_counts[len("ddim"):].isdigit():
                raise ValueError("'ddim' must be followed by a step count")
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"no integer stride gives {wanted} steps out of {num_timesteps}; "
                             f"pick another ddim step count")
        if not re.fullmatch(r"\d+(,\d+)*", section_counts):
            raise ValueError("use 'ddimN' or comma-separated step counts")
        section_counts = [int(n) for n in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept, start = set(), 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot keep {count} steps from a section of {size}; "
                             f"ask for 1 to {size} steps per section")
        # The fractional stride is accumulated before rounding, as in [iDDPM]'s and DiT's code, so
        # that every step count keeps their set of steps (rounding stride * j differs for some).
        stride, position = ((size - 1) / (count - 1) if count > 1 else 1), 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return kept


def respace_betas(betas, use_timesteps):
    """Betas of the process that visits only `use_timesteps`, and the map respaced index ->
    original step. Chosen so that alpha_bar at each kept step equals the original ([iDDPM]
    section 4): beta'_i = 1 - alpha_bar[s_i] / alpha_bar[s_{i-1}]."""
    alphas_cumprod = np.cumprod(1.0 - betas)
    timestep_map = sorted(use_timesteps)
    kept = alphas_cumprod[timestep_map]
    new_betas = 1.0 - kept / np.append(1.0, kept[:-1])
    return new_betas, np.array(timestep_map, dtype=np.int64)


# ----------------------------------------------------------------------------- densities

def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats; broadcasts."""
    tensor = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor))
    logvar1, logvar2 = (torch.as_tensor(v, dtype=tensor.dtype, device=tensor.device) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF that [iDDPM]'s and DiT's code use
    (absolute error below 2e-4): 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales, exact_cdf=False):
    """Elementwise log-probability (nats) of images x in [-1, 1] with 256 levels under a
    Gaussian integrated over each pixel's bin of width 2/255 ([DDPM] eq. 13); the edge bins
    extend to -inf and +inf. x, means, log_scales: same shape.

    By default the normal CDF is [iDDPM]'s tanh approximation, so that bits/dim match theirs and
    DiT's; exact_cdf=True integrates the Gaussian exactly (the t = 0 term then differs by about
    0.01 bits/dim)."""
    inv_scale = torch.exp(-log_scales)
    upper, lower = inv_scale * (x - means + 1.0 / 255.0), inv_scale * (x - means - 1.0 / 255.0)
    if exact_cdf:
        log_cdf_upper = torch.special.log_ndtr(upper)               # bin at -1: (-inf, upper]
        log_sf_lower = torch.special.log_ndtr(-lower)               # bin at +1: [lower, inf)
        delta = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    else:
        cdf_upper, cdf_lower = approx_standard_normal_cdf(upper), approx_standard_normal_cdf(lower)
        log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
        log_sf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
        delta = cdf_upper - cdf_lower
    log_delta = torch.log(delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_delta))


def mean_flat(x):
    """(B, ...) -> (B,): mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def extract(arr, t, shape):
    """arr[t] for a float64 numpy array (T,) (or its float32 copy on t's device) and t (B,) long,
    as float32 on t's device, shaped (B, 1, ..., 1) to broadcast against `shape`."""
    values = torch.as_tensor(arr, dtype=torch.float32, device=t.device)[t]
    return values.view(-1, *([1] * (len(shape) - 1)))


# ----------------------------------------------------------------------------- process

class GaussianDiffusion:
    """The forward process q and the learned reverse process p over num_timesteps steps.

    betas: (T,) float64, already respaced; timestep_map: (T,) original step of each index.
    var_type: "learned_range" ([iDDPM] eq. 15), "fixed_large" (beta_t) or "fixed_small" (the
    posterior variance beta~_t), both fixed choices of [DDPM] section 3.2.
    exact_decoder_cdf: the decoder likelihood at t = 0 with the exact normal CDF instead of
    [iDDPM]'s tanh approximation (see discretized_gaussian_log_likelihood).
    original_num_timesteps: T of the process before respacing (default: the last kept step + 1).
    """

    def __init__(self, betas, timestep_map=None, predict_xstart=False, var_type="learned_range",
                 use_kl=False, rescale_learned_sigmas=False, exact_decoder_cdf=False, original_num_timesteps=None):
        if var_type not in ("learned_range", "fixed_large", "fixed_small"):
            raise ValueError(f"unknown var_type {var_type!r}; use learned_range, fixed_large or fixed_small")
        self.betas = np.asarray(betas, dtype=np.float64)
        if self.betas.ndim != 1 or len(self.betas) < 2 or not ((self.betas > 0) & (self.betas <= 1)).all():
            raise ValueError("betas must be a 1-D array of at least 2 values in (0, 1]")
        self.num_timesteps = len(self.betas)
        self.timestep_map = (np.arange(self.num_timesteps) if timestep_map is None
                             else np.asarray(timestep_map, dtype=np.int64))
        self.original_num_timesteps = original_num_timesteps or int(self.timestep_map[-1]) + 1
        self.predict_xstart = predict_xstart
        self.var_type = var_type
        self.learn_sigma = var_type == "learned_range"
        self.use_kl = use_kl
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.exact_decoder_cdf = exact_decoder_cdf

        # [DDPM] eq. 4: q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        # x_0 = x_t / sqrt(alpha_bar_t) - sqrt(1/alpha_bar_t - 1) eps (eq. 4 solved for x_0).
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # [DDPM] eq. 6-7: q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I).
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0, so its log is clipped to beta~_1 ([iDDPM] code).
        posterior_variance_clipped = np.append(self.posterior_variance[1], self.posterior_variance[1:])
        self.posterior_log_variance_clipped = np.log(posterior_variance_clipped)
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(self.betas)
        # Fixed large variance: beta_t, but beta~_1 at t = 0 so the decoder keeps a sensible width ([iDDPM] code).
        self.log_betas_clipped = np.log(np.append(self.posterior_variance[1], self.betas[1:]))

    def keep_schedule_on(self, device):
        """Hold the schedule's arrays (T,) as tensors on `device`, float32 as extract reads them, so
        that training_losses copies nothing from the host: a CUDA graph cannot capture such a copy.
        For a process used in training only: sampling does numpy arithmetic on some arrays."""
        for name, value in list(vars(self).items()):
            if isinstance(value, np.ndarray):
                dtype = torch.int64 if value.dtype.kind in "iu" else torch.float32
                setattr(self, name, torch.as_tensor(value, dtype=dtype, device=device))

    # --- forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0) ([DDPM] eq. 4), each broadcast to x_start."""
        mean = extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) by reparameterization ([DDPM] eq. 4). x_start: (B, ...)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) ([DDPM] eq. 6-7)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 implied by x_t and a noise estimate ([DDPM] eq. 4 solved for x_0; eq. 15)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """Noise implied by x_t and an x_0 estimate (inverse of predict_xstart_from_eps)."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    # --- reverse process

    def run_model(self, model, x, t, model_kwargs=None):
        """model(x, original step of t, **model_kwargs) as float32 (bf16 outputs are upcast)."""
        original_t = torch.as_tensor(self.timestep_map, device=t.device)[t]
        output = model(x, original_t, **(model_kwargs or {})).float()
        expected = 2 * x.shape[1] if self.learn_sigma else x.shape[1]
        if output.shape[1] != expected:
            raise ValueError(f"model returned {output.shape[1]} channels for a {x.shape[1]}-channel input; "
                             f"with learn_sigma={self.learn_sigma} it must return {expected}")
        return output

    def p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True):
        """Mean, variance, log-variance and predicted x_0 of p(x_{t-1} | x_t) given the raw
        model output (B, 2C, ...) with learned sigma or (B, C, ...) without; x: (B, C, ...)."""
        if self.learn_sigma:
            model_output, var_values = model_output.split(x.shape[1], dim=1)
            # [iDDPM] eq. 15: Sigma = exp(v log beta_t + (1 - v) log beta~_t), v = (output + 1) / 2.
            frac = (var_values + 1) / 2
            min_log = extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = extract(self.log_betas, t, x.shape)
            log_variance = frac * max_log + (1 - frac) * min_log
        elif self.var_type == "fixed_large":
            log_variance = extract(self.log_betas_clipped, t, x.shape)
        else:
            log_variance = extract(self.posterior_log_variance_clipped, t, x.shape)
        log_variance = log_variance.expand_as(x)

        pred_xstart = model_output if self.predict_xstart else self.predict_xstart_from_eps(x, t, model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        # [DDPM] eq. 11-12: the model mean is the posterior mean at the predicted x_0.
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_kwargs=None):
        """Run the model on x_t (B, C, ...) at respaced steps t (B,) and return the dict of
        p_mean_variance_from_output."""
        return self.p_mean_variance_from_output(self.run_model(model, x, t, model_kwargs), x, t, clip_denoised)

    # --- losses

    def vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=False):
        """One term of the variational bound ([DDPM] eq. 5) per sample, in bits per dimension:
        the decoder NLL -log p(x_0 | x_1) at t = 0, KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) else.
        Returns {"output": (B,), "pred_xstart": (B, C, ...)}."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, out["mean"], 0.5 * out["log_variance"], self.exact_decoder_cdf)) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample losses at respaced steps t (B,) for clean data x_start (B, C, ...).

        Returns a dict of (B,) tensors: "mse" (||eps - eps_theta||^2 averaged over dims, [DDPM]
        eq. 14; x_0 error with predict_xstart), "vb" (with learned sigma or use_kl) and "loss".
        Default: loss = mse + vb with the mean detached inside vb, so the bound trains only the
        variance ([iDDPM] section 3.1, L_hybrid with lambda = 1/1000 once averaged over t).
        use_kl: loss = num_timesteps * vb, the full bound with gradients to both outputs."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = self.run_model(model, x_t, t, model_kwargs)
        prediction = model_output[:, :x_start.shape[1]]
        target = x_start if self.predict_xstart else noise
        terms = {"mse": mean_flat((target.float() - prediction) ** 2)}
        if self.use_kl:
            terms["vb"] = self.vb_terms_bpd(model_output, x_start, x_t, t)["output"]
            terms["loss"] = terms["vb"] * self.num_timesteps
            return terms
        terms["loss"] = terms["mse"]
        if self.learn_sigma:
            frozen = torch.cat([prediction.detach(), model_output[:, x_start.shape[1]:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)["output"]
            if self.rescale_learned_sigmas:
                # Keep the bound's weight per step as with 1000 steps when training respaced ([iDDPM] code).
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            terms["loss"] = terms["loss"] + terms["vb"]
        return terms

    # --- sampling

    def p_sample(self, model, x, t, clip_denoised=True, model_kwargs=None):
        """One ancestral step x_{t-1} ~ p(x_{t-1} | x_t) ([DDPM] Algorithm 2); no noise at t = 0.
        Returns {"sample", "pred_xstart"}, each (B, C, ...)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * torch.randn_like(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, eta=0.0):
        """One DDIM step ([DDIM] eq. 12, sigma from eq. 16); eta = 0 is deterministic, eta = 1 is
        DDPM-like. The noise estimate is re-derived from the (clipped) x_0 estimate."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        direction = torch.sqrt((1 - alpha_bar_prev - sigma ** 2).clamp(min=0)) * eps   # "direction pointing to x_t"
        sample = torch.sqrt(alpha_bar_prev) * out["pred_xstart"] + direction
        if eta > 0:
            nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
            sample = sample + nonzero * sigma * torch.randn_like(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _sample_loop_progressive(self, step, model, shape, noise, device, progress):
        device = noise.device if noise is not None else (device or _model_device(model))
        x = noise if noise is not None else torch.randn(*shape, device=device)
        indices = range(self.num_timesteps - 1, -1, -1)
        for i in steps_bar(indices, progress):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, x, t)
            yield out
            x = out["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                                  device=None, progress=False):
        """Yield {"sample", "pred_xstart"} after each ancestral step, from x_T = noise (or N(0, I))."""
        step = lambda m, x, t: self.p_sample(m, x, t, clip_denoised, model_kwargs)
        yield from self._sample_loop_progressive(step, model, shape, noise, device, progress)

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                      device=None, progress=False):
        """Ancestral sampling over all num_timesteps steps; returns x_0 of `shape` (B, C, ...)."""
        for out in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, model_kwargs, device, progress):
            final = out
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                                     device=None, progress=False, eta=0.0):
        """Yield {"sample", "pred_xstart"} after each DDIM step, from x_T = noise (or N(0, I))."""
        step = lambda m, x, t: self.ddim_sample(m, x, t, clip_denoised, model_kwargs, eta)
        yield from self._sample_loop_progressive(step, model, shape, noise, device, progress)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                         device=None, progress=False, eta=0.0):
        """DDIM sampling over all num_timesteps steps; returns x_0 of `shape` (B, C, ...)."""
        for out in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, model_kwargs,
                                                     device, progress, eta):
            final = out
        return final["sample"]

    def dpm_solver_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                               device=None, progress=False, stochastic=False):
        """DPM-Solver++(2M) ([DPM-Solver++] Algorithm 2, multistep second order, on the data
        prediction) over this process's steps; returns x_0 of `shape` (B, C, ...). stochastic:
        SDE-DPM-Solver++(2M) ([DPM-Solver++] section 5, the reverse SDE's solver), which adds
        fresh noise at every step like DDPM and can correct the model's errors as DDPM does,
        where the ODE solver carries them to the end.

        The model is evaluated once at each of the num_timesteps steps, from the noisiest to
        t = 0 (the steps DDPM visits), with diffusers' DPMSolverMultistepScheduler stepping
        between them: first order at the first step (no history yet) and at the last, which goes
        from t = 0 to sigma = 0 and returns the x_0 estimate there, as DDPM's last step does.
        The scheduler sees this respaced process as its own (betas of the kept steps), so its
        alpha_bar at every step is ours. It is given our x_0 estimate (variance channels dropped,
        clipped to [-1, 1] with clip_denoised)."""
        from diffusers import DPMSolverMultistepScheduler
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=self.num_timesteps, trained_betas=self.betas,
                                                solver_order=2, prediction_type="sample",
                                                algorithm_type="sde-dpmsolver++" if stochastic else "dpmsolver++",
                                                lower_order_final=True, final_sigmas_type="zero")
        indices = list(range(self.num_timesteps - 1, -1, -1))
        scheduler.set_timesteps(timesteps=indices)
        device = noise.device if noise is not None else (device or _model_device(model))
        x = noise if noise is not None else torch.randn(*shape, device=device)
        for i in steps_bar(indices, progress):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                pred_xstart = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)["pred_xstart"]
            step_noise = torch.randn_like(x) if stochastic else None  # drawn as p_sample draws DDPM's
            x = scheduler.step(pred_xstart, i, x, variance_noise=step_noise).prev_sample
        return x

    # --- likelihood

    def prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, (B,); [DDPM] eq. 5's L_T."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, progress=False):
        """Negative log-likelihood bound in bits per dimension ([iDDPM] section 2, eq. 4-6) for
        data x_start (B, C, ...) in [-1, 1]. Returns total_bpd (B,) = prior_bpd (B,) + vb.sum(1),
        vb (B, T) with column t the term of step t, and per-step xstart_mse and eps mse (B, T)."""
        B = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        indices = range(self.num_timesteps - 1, -1, -1)
        for i in steps_bar(indices, progress, "likelihood terms"):
            t = torch.full((B,), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise)
            with torch.no_grad():
                model_output = self.run_model(model, x_t, t, model_kwargs)
                out = self.vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            mse.append(mean_flat((self.predict_eps_from_xstart(x_t, t, out["pred_xstart"]) - noise) ** 2))
        vb, xstart_mse, mse = (torch.stack(v[::-1], dim=1) for v in (vb, xstart_mse, mse))
        prior_bpd = self.prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb,
                "xstart_mse": xstart_mse, "mse": mse}


def steps_bar(indices, progress, desc="sampling steps"):
    """indices, behind a progress bar that disappears when done if `progress`."""
    return tqdm(indices, desc=desc, unit="step", leave=False) if progress else indices


def _model_device(model):
    """Device of a module or of the module behind a bound method (e.g. forward_with_cfg); CPU otherwise."""
    owner = getattr(model, "__self__", model)
    if isinstance(owner, torch.nn.Module):
        return next(owner.parameters(), torch.empty(0)).device
    return torch.device("cpu")


DIFFUSION_STEPS = 1000  # T, the steps DiS (like DiT) trains with


def create_diffusion(timestep_respacing="", noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False,
                     diffusion_steps=DIFFUSION_STEPS, exact_decoder_cdf=False):
    """The diffusion DiS trains and samples with: DiT's factory, with DiT's defaults.

    timestep_respacing: "" or None for all steps, "250" or 250 for 250 evenly spaced steps,
    "ddim50" for DDIM's stride rule, or "10,15,20" / [10, 15, 20] for per-section counts (see
    space_timesteps). sigma_small selects the fixed variance used when learn_sigma is False
    (beta~_t instead of beta_t). rescale_learned_sigmas scales the vb term by
    num_timesteps / 1000 (for respaced training; no effect at 1000 steps). exact_decoder_cdf:
    see GaussianDiffusion (not in DiT, whose decoder uses the tanh approximation)."""
    if not (isinstance(diffusion_steps, int) and diffusion_steps >= 2):
        raise ValueError(f"diffusion_steps must be an integer >= 2, not {diffusion_steps!r}")
    if timestep_respacing in (None, ""):
        timestep_respacing = [diffusion_steps]
    elif isinstance(timestep_respacing, int) and not isinstance(timestep_respacing, bool):
        timestep_respacing = [timestep_respacing]
    elif not (isinstance(timestep_respacing, str) or (isinstance(timestep_respacing, (list, tuple))
                                                      and all(isinstance(n, int) for n in timestep_respacing))):
        raise ValueError(f"timestep_respacing must be a step count, a string like '250', 'ddim50' or '10,15,20', "
                         f"or a list of counts, not {timestep_respacing!r}")
    if noise_schedule not in ("linear", "cosine"):
        raise ValueError(f"noise_schedule must be 'linear' or 'cosine', not {noise_schedule!r}")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    try:
        kept = space_timesteps(diffusion_steps, timestep_respacing)
    except ValueError as e:
        raise ValueError(f"timestep_respacing {timestep_respacing!r}: {e}") from None
    if len(kept) < 2:
        raise ValueError(f"timestep_respacing {timestep_respacing!r} keeps {len(kept)} step; at least 2 are needed")
    betas, timestep_map = respace_betas(betas, kept)
    var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    return GaussianDiffusion(betas, timestep_map, predict_xstart=predict_xstart, var_type=var_type, use_kl=use_kl,
                             rescale_learned_sigmas=rescale_learned_sigmas, exact_decoder_cdf=exact_decoder_cdf,
                             original_num_timesteps=diffusion_steps)


SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde")


def sampler_respacing(sampler, steps):
    """timestep_respacing of `steps` model evaluations for a sampler: DDIM's stride rule for
    "ddim" (IDDPM's and ADM's convention), evenly spaced steps from T - 1 to 0 for the others."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
    return f"ddim{steps}" if sampler == "ddim" else str(steps)


def guided_model(model, labels, cfg_scale, cfg_channels=None, cfg_interval=None, num_timesteps=1000):
    """The callable (x (B, C, h, w), t (B,)) -> output (B, C_out, h, w) a sampler runs for
    class-conditional sampling with classifier-free guidance (Ho & Salimans 2022).

    The guided output is that of model.forward_with_cfg on the batch doubled with the null class
    (its first half). cfg_interval (low, high): guidance only at steps with low <= t / T <= high,
    where t is the step of the T-step process (0: the data, T - 1: pure noise); elsewhere the
    conditional model alone runs, at half the cost (guidance in a limited interval, Kynkaenniemi
    et al. 2024). None guides every step."""
    null = torch.full_like(labels, model.num_classes)

    def denoise(x, t):
        if cfg_interval is not None and not cfg_interval[0] <= t[0].item() / num_timesteps <= cfg_interval[1]:
            return model(x, t, labels)
        doubled = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), cfg_scale,
                                         cfg_channels)
        return doubled[: len(x)]
    return denoise


def check_cfg_interval(cfg_interval):
    """ValueError unless cfg_interval is None or (low, high) with 0 <= low <= high <= 1."""
    if cfg_interval is None:
        return
    if len(cfg_interval) != 2 or not 0 <= cfg_interval[0] <= cfg_interval[1] <= 1:
        raise ValueError(f"cfg_interval must be (low, high) with 0 <= low <= high <= 1, not {cfg_interval!r}")


@torch.no_grad()
def generate(model, diffusion, noise, labels=None, cfg_scale=1.0, sampler="ddpm", vae=None, cfg_channels=None,
             bf16=False, cfg_interval=None, progress=False, cuda_graphs=False):
    """noise (B, C, h, w), labels (B,) or None -> images (B, C_img, H, W) in [-1, 1].

    sampler: "ddpm" (ancestral), "ddim" (eta = 0), "dpm++" (DPM-Solver++(2M)) or "dpm++sde"
    (SDE-DPM-Solver++(2M), drawing noise at each step like ddpm), each running the
    model once per step of `diffusion` (see sampler_respacing). With labels and cfg_scale != 1
    the model is guided (see guided_model for cfg_interval). Pixel-space samples have x_0
    clipped to [-1, 1] at each step (ADM); latents are not clipped and go through the VAE decoder
    in float32. bf16: autocast of the model; progress: a bar over the steps. cuda_graphs: the
    model's calls replayed from CUDA graphs (graphs.GraphedSampling; same samples, less time
    launching kernels), on a CUDA device only.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
    check_cfg_interval(cfg_interval)
    if cuda_graphs:
        if noise.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, not {noise.device.type}")
        model = GraphedSampling(model)
    if labels is not None and cfg_scale != 1:
        fn = guided_model(model, labels, cfg_scale, cfg_channels, cfg_interval, diffusion.original_num_timesteps)
    else:
        fn = model if labels is None else (lambda x, t: model(x, t, labels))
    loop = {"ddpm": diffusion.p_sample_loop, "ddim": diffusion.ddim_sample_loop,
            "dpm++": diffusion.dpm_solver_sample_loop,
            "dpm++sde": functools.partial(diffusion.dpm_solver_sample_loop, stochastic=True)}[sampler]
    with torch.autocast(noise.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not cuda_graphs):
        x = loop(fn, noise.shape, noise=noise, clip_denoised=vae is None, device=noise.device, progress=progress)
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor).sample
    return x.clamp(-1, 1)
