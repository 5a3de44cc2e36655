"""Stage 2 of Diff-Prompt: the adaLN-Zero DiT that generates Mask-VAE latents (diff_prompt.md §3).

The DiT follows facebookresearch/DiT with one change: the class embedding is replaced by two CLIP
features, each with the timestep embedding added, concatenated into c = [image + t ; text + t]
(2 x hidden), which drives adaLN-Zero in every block and in the final layer. No cross-attention, no
classifier-free guidance. With `learn_sigma` the output has 2 x in_channels: the prediction and
the interpolation weight of the learned variance.

Optional spatial image condition (`image_channels` > 0, a toolkit addition): a pooled CLIP image
vector cannot say WHERE the referred object is, so an image latent on the mask latent's grid (from
a frozen image VAE) can be concatenated to the DiT input, as image-conditioned diffusion models
(e.g. InstructPix2Pix) do; the text vector then selects, through adaLN, which of its regions to draw.
With `image_pixels` the image's own pixels follow the latent channels, moved onto the same grid by
space-to-depth (`pixel_unshuffle`): a small object's colour and outline survive there better than in a
4-channel latent.

`ClipConditioner` is the one CLIP preprocessing used by stages 2 and 3 (bug 4 of the official code
fixed): images in [-1, 1] are resized to CLIP's input size and normalised with CLIP's mean and std.
It also encodes the image latent when an image VAE is given.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ...errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2D sine-cosine position embedding (grid*grid, dim), token order row-major, in MAE/DiT's
    layout: the first half of the channels encodes the column (x), the second half the row (y), so
    weights trained by the official code (and the released `oaaoaa/mask_dit`) see the positions they learned."""
    coords = np.arange(grid, dtype=np.float64)
    ys, xs = np.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each; token k = (row k // grid, column k % grid)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def embed(positions: np.ndarray) -> np.ndarray:
        angles = positions.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([embed(xs), embed(ys)], axis=1).astype(np.float32)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (256) -> MLP -> hidden."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are shifted, scaled and gated by the condition (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, condition_size: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(condition_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, condition_size: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(condition_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MaskDiT(ModelMixin, ConfigMixin):
    """adaLN-Zero DiT over Mask-VAE latents, conditioned on CLIP image and text features.

    `forward(latents, timesteps, image_features, text_features, image_latents=None)` -> (B, out_channels, H, W);
    both features have `hidden_size` dims (CLIP's projection_dim must equal it: they are added to t);
    `image_latents` (B, image_channels, H, W) is required exactly when `image_channels` > 0;
    `image_pixels` records that its last channels are the image's pixels (space-to-depth), which
    `ClipConditioner` then appends.
    """

    @register_to_config
    def __init__(
        self,
        input_size: int = 28,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        image_channels: int = 0,
        image_pixels: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = nn.Conv2d(in_channels + image_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid))[None], persistent=False)
        condition_size = 2 * hidden_size  # [image + t ; text + t]
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, condition_size) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, condition_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, zeroed adaLN and output layers, so the initial output is zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        for block in [*self.blocks, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.config.patch_size, self.out_channels
        grid = self.config.input_size // p
        x = x.view(x.shape[0], grid, grid, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, grid * p, grid * p)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, image_features: torch.Tensor, text_features: torch.Tensor,
                image_latents: torch.Tensor | None = None) -> torch.Tensor:
        if (image_latents is not None) != (self.config.image_channels > 0):
            raise ValueError(f"this DiT takes image_channels={self.config.image_channels}: pass image_latents exactly when it is > 0")
        if image_latents is not None:
            latents = torch.cat([latents, image_latents.to(latents.dtype)], dim=1)
        x = self.x_embedder(latents).flatten(2).transpose(1, 2) + self.pos_embed
        t = self.t_embedder(timesteps.expand(latents.shape[0]) if timesteps.ndim == 0 else timesteps)
        c = torch.cat([image_features + t, text_features + t], dim=1)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


class ClipConditioner(nn.Module):
    """CLIP image and text features (and, with `image_vae`, the image latent) for the DiT: one
    preprocessing for training and stage 3. `image_vae_size` is the pixel size that the image VAE
    turns into the DiT's latent grid; `image_pixels` appends those pixels, space-to-depth, to the latent."""

    def __init__(self, clip, tokenizer, image_vae=None, image_vae_size: int | None = None, image_pixels: bool = False):
        super().__init__()
        if image_pixels and image_vae is None:
            raise UserError("image_pixels puts the pixels beside the image latent: set model.image_latents_from too")
        self.clip, self.tokenizer = clip, tokenizer
        self.image_vae, self.image_vae_size, self.image_pixels = image_vae, image_vae_size, image_pixels
        self.image_size = clip.config.vision_config.image_size

    @property
    def image_channels(self) -> int:
        """Channels of `image_latents`: the image VAE's latent, then 3 per pixel of a latent cell with `image_pixels`."""
        if self.image_vae is None:
            return 0
        pixels_per_side = 2 ** (len(self.image_vae.config.block_out_channels) - 1)
        return self.image_vae.config.latent_channels + (3 * pixels_per_side**2 if self.image_pixels else 0)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        max_length = min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        tokens = self.tokenizer([t.lower() for t in texts], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        device = self.clip.device
        return {"input_ids": tokens.input_ids.to(device), "attention_mask": tokens.attention_mask.to(device)}

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP input (B, 3, S, S)."""
        images = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True)
        # no buffers: the pipeline's `.to()` moves its registered components (CLIP, VAEs), not this helper
        mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        return ((images.clamp(-1, 1) + 1) / 2 - mean) / std

    @torch.no_grad()
    def image_latents(self, images: torch.Tensor) -> torch.Tensor | None:
        """The frozen image VAE's latent (posterior mode, scaled) on the DiT's grid, then with `image_pixels` the
        pixels it was encoded from (space-to-depth onto that grid), or None without an image VAE."""
        if self.image_vae is None:
            return None
        size = (self.image_vae_size, self.image_vae_size)
        images = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True) if images.shape[-2:] != size else images
        images = images.clamp(-1, 1)
        latents = self.image_vae.encode(images.to(self.image_vae.dtype)).latent_dist.mode().float() * self.image_vae.config.scaling_factor
        if not self.image_pixels:
            return latents
        return torch.cat([latents, F.pixel_unshuffle(images.float(), self.image_vae_size // latents.shape[-1])], dim=1)

    def forward(self, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(image features, text features, image latents or None)."""
        image_features = self.clip.get_image_features(pixel_values=self.pixel_values(images)).pooler_output
        text_features = self.clip.get_text_features(**self.tokenize(texts)).pooler_output
        return image_features, text_features, self.image_latents(images)
