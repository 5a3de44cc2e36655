"""Diff-Prompt stages 1-2: Mask-VAE loss, adaLN-Zero DiT, schedules, hybrid loss, DDIM prompt trajectory."""

import math

import pytest
import torch

from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.diff_prompt.diffusion import (
    ddim_scheduler,
    ddim_trajectory,
    diffusion_loss,
    noise_scheduler,
    prompt_indices,
    variational_bound,
)
from incontext_diffusion.heads.diff_prompt.dit import MaskDiT
from incontext_diffusion.heads.diff_prompt.mask_vae import build_mask_vae, kl_channel_sum, mask_vae_loss, reconstruct
from incontext_diffusion.heads.diff_prompt.prompts import MaskPromptAdaptor, StaticDeepPrompts

torch.set_num_threads(1)  # the 2 shared cores are busy: one thread is much faster here


def micro_dit(**kw) -> MaskDiT:
    return MaskDiT(**{"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 16, "depth": 2, "num_heads": 2, **kw})


def square_masks(n: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        x, y = torch.randint(0, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(3, size // 2, (2,), generator=g).tolist()
        masks[i, 0, y : y + h, x : x + w] = 1
    return masks


def test_kl_channel_sum_hand_computed():
    zeros = torch.zeros(2, 4, 3, 3)
    assert kl_channel_sum(zeros, zeros).item() == 0.0
    # mean 1, var 1: 0.5 per channel, summed over 4 channels, averaged over batch and positions.
    assert kl_channel_sum(torch.ones(2, 4, 3, 3), zeros).item() == pytest.approx(2.0)
    # logvar log 2 at mean 0: 0.5 * (2 - 1 - log 2) per channel.
    logvar = torch.full((1, 4, 1, 1), math.log(2.0))
    assert kl_channel_sum(torch.zeros(1, 4, 1, 1), logvar).item() == pytest.approx(4 * 0.5 * (1 - math.log(2.0)), rel=1e-5)


def test_mask_vae_shapes_and_learning():
    torch.manual_seed(0)
    vae = build_mask_vae((4, 8, 8), latent_channels=4, norm_num_groups=2)
    masks = square_masks(16)
    assert vae.encode(masks).latent_dist.mean.shape == (16, 4, 4, 4)
    optimizer = torch.optim.Adam(vae.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
        loss, mse, kl = mask_vae_loss(vae, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(mse.item())
    assert losses[-1] < 0.5 * losses[0]
    assert reconstruct(vae, masks).shape == masks.shape


def test_adaln_zero_init_gives_zero_output():
    dit = micro_dit()
    x = torch.randn(3, 4, 8, 8)
    out = dit(x, torch.tensor([0, 5, 99]), torch.randn(3, 16), torch.randn(3, 16))
    assert out.shape == (3, 8, 8, 8)  # learn_sigma: epsilon and variance channels
    assert torch.count_nonzero(out) == 0
    torch.nn.init.normal_(dit.final_layer.linear.weight)
    for block in [*dit.blocks, dit.final_layer]:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    assert dit(x, torch.tensor([0, 5, 99]), torch.randn(3, 16), torch.randn(3, 16)).abs().sum() > 0
    assert micro_dit(learn_sigma=False)(x, torch.tensor(3), torch.randn(3, 16), torch.randn(3, 16)).shape == (3, 4, 8, 8)


def test_schedules_match_the_spec():
    linear = noise_scheduler(100, "linear")
    assert linear.betas[0].item() == pytest.approx(0.001) and linear.betas[-1].item() == pytest.approx(0.2)
    cosine = noise_scheduler(100, "cosine")
    assert cosine.config.beta_schedule == "squaredcos_cap_v2"
    sampler = ddim_scheduler(cosine)
    sampler.set_timesteps(25)
    assert sampler.timesteps.tolist() == list(range(96, -1, -4))
    assert torch.allclose(sampler.alphas_cumprod, cosine.alphas_cumprod)
    with pytest.raises(UserError, match="cosine or linear"):
        noise_scheduler(100, "sigmoid")


def test_prompt_indices():
    assert prompt_indices(25, 9) == [24, 22, 20, 18, 16, 14, 12, 10, 8]
    assert prompt_indices(25, 12) == list(range(24, 0, -2))
    assert prompt_indices(10, 4) == [9, 7, 5, 3]
    with pytest.raises(UserError, match="ddim_steps"):
        prompt_indices(25, 13)


def test_ddim_trajectory_matches_hand_written_ddim():
    torch.manual_seed(0)
    dit = micro_dit().eval()
    for p in dit.parameters():  # leave the zero init so the model predicts something
        torch.nn.init.normal_(p, std=0.05)
    train = noise_scheduler(100, "cosine")
    img, txt = torch.randn(2, 16), torch.randn(2, 16)
    trajectory = ddim_trajectory(dit, ddim_scheduler(train), img, txt, 25, torch.Generator().manual_seed(7))
    assert len(trajectory) == 25
    # The same loop by hand: x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t); x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
    alphas = train.alphas_cumprod.double()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)).double()
    for i, t in enumerate(range(96, -1, -4)):
        with torch.no_grad():
            eps = dit(x.float(), torch.tensor(t), img, txt)[:, :4].double()
        a_t = alphas[t]
        a_prev = alphas[t - 4] if t >= 4 else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        assert torch.allclose(trajectory[i].double(), x, atol=1e-4), f"step {i}"
    again = ddim_trajectory(dit, ddim_scheduler(train), img, txt, 25, torch.Generator().manual_seed(7))
    assert torch.equal(again[-1], trajectory[-1])


def test_hybrid_loss_is_zero_for_a_perfect_model_and_trains_the_variance():
    scheduler = noise_scheduler(100, "cosine")
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([1, 40, 99])
    xt = scheduler.add_noise(x0, noise, t)
    # Exact epsilon and variance weight -1 (= the true posterior variance): MSE 0 and KL 0.
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    assert diffusion_loss(scheduler, perfect, x0, xt, noise, t, "hybrid").item() == pytest.approx(0.0, abs=1e-5)
    wrong_variance = torch.cat([noise, torch.ones_like(noise)], dim=1).requires_grad_(True)
    vb = diffusion_loss(scheduler, wrong_variance, x0, xt, noise, t, "hybrid")
    assert vb.item() > 0
    vb.backward()
    assert wrong_variance.grad[:, :4].abs().sum() == 0  # the VB term does not train the mean (and the MSE is 0 here)
    assert wrong_variance.grad[:, 4:].abs().sum() > 0
    assert (variational_bound(scheduler, noise, torch.ones_like(noise), x0, xt, t) > 0).all()
    mse_only = diffusion_loss(scheduler, wrong_variance, x0, xt, noise, t, "mse")
    assert mse_only.item() == pytest.approx(0.0, abs=1e-6)


def test_v_prediction_loss_targets_velocity_and_its_vb_term_uses_the_implied_epsilon():
    scheduler = noise_scheduler(100, "cosine", "v_prediction")
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([1, 40, 99])
    xt = scheduler.add_noise(x0, noise, t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = a.sqrt() * noise - (1 - a).sqrt() * x0  # by hand
    perfect = torch.cat([velocity, -torch.ones_like(noise)], dim=1)
    assert diffusion_loss(scheduler, perfect, x0, xt, noise, t, "hybrid").item() == pytest.approx(0.0, abs=1e-5)
    as_if_epsilon = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # the epsilon target is wrong now
    assert diffusion_loss(scheduler, as_if_epsilon, x0, xt, noise, t, "mse").item() > 0.1
    assert ddim_scheduler(scheduler).config.prediction_type == "v_prediction"
    with pytest.raises(UserError, match="prediction type"):
        noise_scheduler(100, "cosine", "sample")


def test_ddim_with_v_prediction_matches_hand_written_ddim():
    torch.manual_seed(0)
    dit = micro_dit(learn_sigma=False).eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    train = noise_scheduler(100, "cosine", "v_prediction")
    img, txt = torch.randn(2, 16), torch.randn(2, 16)
    trajectory = ddim_trajectory(dit, ddim_scheduler(train), img, txt, 5, torch.Generator().manual_seed(3))
    alphas = train.alphas_cumprod.double()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)).double()
    for i, t in enumerate(range(80, -1, -20)):
        with torch.no_grad():
            v = dit(x.float(), torch.tensor(t), img, txt).double()
        a_t = alphas[t]
        a_prev = alphas[t - 20] if t >= 20 else torch.tensor(1.0, dtype=torch.float64)
        x0, eps = a_t.sqrt() * x - (1 - a_t).sqrt() * v, a_t.sqrt() * v + (1 - a_t).sqrt() * x
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        assert torch.allclose(trajectory[i].double(), x, atol=1e-4), f"step {i}"


def test_dit_spatial_image_condition():
    torch.manual_seed(0)
    dit = micro_dit(image_channels=3)
    for p in dit.parameters():  # leave the zero init so that the output depends on the inputs
        torch.nn.init.normal_(p, std=0.1)
    x, t, img, txt = torch.randn(2, 4, 8, 8), torch.tensor([5, 50]), torch.randn(2, 16), torch.randn(2, 16)
    image_latents = torch.randn(2, 3, 8, 8)
    out = dit(x, t, img, txt, image_latents)
    assert out.shape == (2, 8, 8, 8)  # prediction + variance channels of the 4 mask channels only
    moved = image_latents.clone()
    moved[:, :, :4, :4] = torch.randn(2, 3, 4, 4)  # change the top-left image quarter only
    delta = (dit(x, t, img, txt, moved) - out).abs()
    assert delta[..., :4, :4].sum() > 0 and not torch.allclose(dit(x, t, img, txt, moved), out)
    with pytest.raises(ValueError, match="image_latents"):
        dit(x, t, img, txt)
    with pytest.raises(ValueError, match="image_latents"):
        micro_dit()(x, t, img, txt, image_latents)


def test_adaptor_and_static_prompts():
    torch.manual_seed(0)
    adaptor = MaskPromptAdaptor(mask_size=32, dim=8, depth=3, prompt_length=4, base_channels=2)
    masks = [torch.rand(2, 1, 32, 32) for _ in range(3)]
    prompts = adaptor(masks)
    assert [p.shape for p in prompts] == [(2, 4, 8)] * 3
    # Tokens 0-1 are input-specific (differ per sample), 2-3 global (the layer's own, shared).
    assert not torch.allclose(prompts[0][0, :2], prompts[0][1, :2])
    assert torch.equal(prompts[1][0, 2:], prompts[1][1, 2:]) and torch.equal(prompts[1][0, 2:], adaptor.global_tokens[1])
    assert not torch.equal(prompts[0][0, 2:], prompts[1][0, 2:])
    with pytest.raises(UserError, match="even"):
        MaskPromptAdaptor(32, 8, 3, prompt_length=3)
    static = StaticDeepPrompts(dim=8, depth=2, prompt_length=4)(batch_size=3)
    assert len(static) == 2 and static[0].shape == (3, 4, 8) and torch.equal(static[0][0], static[0][2])
