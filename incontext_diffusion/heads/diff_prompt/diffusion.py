"""Noise schedules, the stage-2 training loss and the DDIM prompt trajectory (diff_prompt.md §3-4).

One schedule serves training and sampling (bug 2 of the official code fixed): `noise_scheduler`
builds the DDPMScheduler (T = 100, cosine by default; "linear" is IDDPM's rescaled linear schedule,
beta 0.001 -> 0.2 at T = 100) and `ddim_scheduler` the matching DDIMScheduler, which with 25 steps
visits timesteps 96, 92, ..., 0 like IDDPM's "ddim25".

The DiT predicts epsilon (the paper) or v = sqrt(a) * eps - sqrt(1 - a) * x0 ("v_prediction").
With epsilon, the error of the implied x0 is weighted by the signal-to-noise ratio, which vanishes
at the noisiest timesteps - exactly where only the condition can tell where the mask is - so a
short CPU run learns to denoise but not to use the condition; v weights those steps fully.

Loss: "hybrid" = MSE of the prediction + the variational bound term of the learned variance
(IDDPM's `_vb_terms_bpd`, with the mean frozen so that the VB term only trains the variance), or
"mse" = the prediction's MSE alone (the variance channels then get no signal and sampling, which
is DDIM with eta = 0, never uses them).
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ...errors import UserError


def noise_scheduler(num_train_timesteps: int = 100, schedule: str = "cosine", prediction_type: str = "epsilon") -> DDPMScheduler:
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"unknown prediction type {prediction_type!r}: choose epsilon or v_prediction")
    common = dict(num_train_timesteps=num_train_timesteps, variance_type="learned_range", clip_sample=False, prediction_type=prediction_type)
    if schedule == "cosine":
        return DDPMScheduler(beta_schedule="squaredcos_cap_v2", **common)
    if schedule == "linear":  # IDDPM: the 1000-step linear schedule rescaled to T steps
        scale = 1000 / num_train_timesteps
        return DDPMScheduler(beta_schedule="linear", beta_start=scale * 1e-4, beta_end=scale * 0.02, **common)
    raise UserError(f"unknown noise schedule {schedule!r}: choose cosine or linear")


def ddim_scheduler(train_scheduler: DDPMScheduler) -> DDIMScheduler:
    """The deterministic sampler on the same betas as training."""
    config = train_scheduler.config
    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule, beta_start=config.beta_start,
        beta_end=config.beta_end, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", prediction_type=config.prediction_type,
    )


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x under a Gaussian discretised into 256 bins over [-1, 1] (IDDPM's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def variational_bound(scheduler: DDPMScheduler, eps: torch.Tensor, variance_weight: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample VB term in bits per dim for a learned-range variance, given the (detached) predicted epsilon."""
    betas = scheduler.betas.to(x0.device, torch.float64)
    alphas_cumprod = scheduler.alphas_cumprod.to(x0.device, torch.float64)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
    coef_x0 = betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod)
    coef_xt = (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)

    def at(values):
        return values[t].float().view(-1, 1, 1, 1)

    pred_x0 = (xt - at((1 - alphas_cumprod).sqrt()) * eps) / at(alphas_cumprod.sqrt())
    true_mean = at(coef_x0) * x0 + at(coef_xt) * xt
    model_mean = at(coef_x0) * pred_x0 + at(coef_xt) * xt
    fraction = (variance_weight + 1) / 2
    model_log_variance = fraction * at(torch.log(betas)) + (1 - fraction) * at(posterior_log_variance)
    kl = _normal_kl(true_mean, at(posterior_log_variance), model_mean, model_log_variance).mean(dim=(1, 2, 3)) / math.log(2.0)
    decoder_nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance).mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t == 0, decoder_nll, kl)


def diffusion_loss(scheduler: DDPMScheduler, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, loss_type: str = "hybrid") -> torch.Tensor:
    """Mean over the batch of the prediction's MSE (epsilon or v, as the scheduler's prediction_type),
    plus the VB term when `loss_type` is hybrid and the model learns sigma."""
    channels = x0.shape[1]
    prediction = model_output[:, :channels].float()
    velocity = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(x0, noise, t) if velocity else noise
    mse = (prediction - target.float()).pow(2).mean(dim=(1, 2, 3))
    if loss_type == "mse" or model_output.shape[1] == channels:
        return mse.mean()
    eps = prediction.detach()
    if velocity:  # eps = sqrt(a) * v + sqrt(1 - a) * x_t
        alphas_cumprod = scheduler.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
        eps = alphas_cumprod.sqrt() * eps + (1 - alphas_cumprod).sqrt() * xt.float()
    return (mse + variational_bound(scheduler, eps, model_output[:, channels:].float(), x0.float(), xt.float(), t)).mean()


@torch.no_grad()
def ddim_trajectory(dit, scheduler: DDIMScheduler, image_features: torch.Tensor, text_features: torch.Tensor, num_steps: int = 25,
                    generator: torch.Generator | None = None, image_latents: torch.Tensor | None = None, on_step=None) -> list[torch.Tensor]:
    """DDIM (eta = 0) from z_T ~ N(0, I); returns x_{t-1} after every step (the last one is the sample).
    `on_step(index, timestep, latents) -> latents`, if given, sees (and may replace) the latents after each step."""
    config = dit.config
    shape = (image_features.shape[0], config.in_channels, config.input_size, config.input_size)
    latents = torch.randn(shape, generator=generator, device="cpu").to(image_features.device, image_features.dtype)
    scheduler.set_timesteps(num_steps)
    trajectory = []
    for index, t in enumerate(scheduler.timesteps):
        prediction = dit(latents, t.to(latents.device), image_features, text_features, image_latents)[:, : config.in_channels]
        latents = scheduler.step(prediction, t, latents, eta=0.0).prev_sample
        if on_step is not None:
            latents = on_step(index, t, latents)
        trajectory.append(latents)
    return trajectory


def prompt_indices(num_steps: int, depth: int) -> list[int]:
    """Trajectory indices feeding layers 0..depth-1: the final latent first, then every second one back
    ([24, 22, ..., 2][:depth] for 25 steps): shallow layers get the cleanest mask."""
    indices = list(range(num_steps - 1, 0, -2))
    if depth > len(indices):
        raise UserError(f"prompt depth {depth} needs {2 * depth} DDIM steps or more, got {num_steps}: raise model.ddim_steps or lower model.depth")
    return indices[:depth]
