"""Stage 1 of Diff-Prompt: the Mask-VAE, a one-channel diffusers `AutoencoderKL` (diff_prompt.md §2).

It compresses a referred-object mask (values in {0, 1}) into a small latent that the stage-2 DiT
learns to generate. The loss is the official one: pixel MSE plus `kl_weight` times the KL
divergence summed over the latent *channels* and averaged over batch and latent positions
("channel-sum convention"); the latent scaling factor is not used anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

PAPER_KL_WEIGHT = 3.7732e-4


def build_mask_vae(block_out_channels: tuple[int, ...] = (4, 8, 16, 16), latent_channels: int = 4, norm_num_groups: int = 2,
                   layers_per_block: int = 2) -> AutoencoderKL:
    """A 1-in/1-out AutoencoderKL; each block after the first halves the mask side (224 -> 28 for 4 blocks).
    The defaults are the official `mask_vanilla_vae_v2` (85,529 parameters), so `oaaoaa/mask_vae` loads into it."""
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
    )


def kl_channel_sum(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over channels (dim 1), averaged over batch and positions."""
    kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp())
    return kl.sum(dim=1).mean()


def mask_vae_loss(vae: AutoencoderKL, masks: torch.Tensor, kl_weight: float = PAPER_KL_WEIGHT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction MSE, KL) of a batch of masks (B, 1, H, W) in [0, 1]."""
    posterior = vae.encode(masks).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    mse = F.mse_loss(reconstruction.float(), masks.float())
    kl = kl_channel_sum(posterior.mean.float(), posterior.logvar.float())
    return mse + kl_weight * kl, mse, kl


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, masks: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction (posterior mean), (B, 1, H, W) soft masks."""
    return vae.decode(vae.encode(masks).latent_dist.mode()).sample
