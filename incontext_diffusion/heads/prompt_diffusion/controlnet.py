"""The Prompt Diffusion ControlNet: a ControlNet with two hint encoders, one for the example pair
and one for the query (Wang et al., "In-Context Learning Unlocked for Diffusion Models", 2023).

The 6-channel example pair ([source, target] on the channel axis) goes through
`controlnet_cond_embedding`, the 3-channel query through `controlnet_query_cond_embedding`; both
embeddings are added to the output of `conv_in`, and the rest is diffusers' ControlNet (its blocks,
zero convolutions and conditioning scale). The two embeddings depend on the images only, so a
pipeline computes them once per call (`embed_conditions`) and passes the sum to every denoising
step (`conditioning_embedding=`). The state-dict keys equal those of diffusers' research port
(`examples/research_projects/promptdiffusion`), so its hub weights load with `strict=True`.
"""

from __future__ import annotations

import functools

import torch
from diffusers import ControlNetModel, ModelMixin, UNet2DConditionModel  # noqa: F401
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding, ControlNetOutput

PAIR_CHANNELS = 6  # example source and example target, RGB each
QUERY_CHANNELS = 3
# `ModelMixin` is imported above on purpose: a pipeline's from_pretrained looks up the loading
# method of a component in the module model_index.json names (this one).


def conditioning_channels_for(vae_scale_factor: int, sd_channels: tuple[int, ...] = (16, 32, 96, 256)) -> tuple[int, ...]:
    """Hint-encoder widths whose down-sampling (2 ** (len - 1)) equals the VAE's: SD's (16, 32, 96, 256)
    for a x8 VAE, its first three for the tiny backbone's x4 VAE."""
    levels = vae_scale_factor.bit_length()  # x8 -> 4 levels, x4 -> 3
    if 2 ** (levels - 1) != vae_scale_factor or levels > len(sd_channels):
        raise ValueError(f"the VAE scale factor must be a power of two up to 8, got {vae_scale_factor}")
    return sd_channels[:levels]


class PromptDiffusionControlNetModel(ControlNetModel):
    """A diffusers `ControlNetModel` whose conditioning is an example pair plus a query image.

    Construct it like a `ControlNetModel` (same config keys, `conditioning_channels=6`), or with
    `from_unet(unet)`. `forward(sample, timestep, encoder_hidden_states, controlnet_cond,
    controlnet_query_cond, ...)` takes the pair (B, 6, H, W) and the query (B, 3, H, W) and returns
    the usual `ControlNetOutput` (down residuals and mid residual).
    """

    @functools.wraps(ControlNetModel.__init__)  # keeps the config signature that ConfigMixin reads
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("conditioning_channels", PAIR_CHANNELS)
        super().__init__(*args, **kwargs)
        if self.config.conditioning_channels != PAIR_CHANNELS:
            raise ValueError(f"the example pair has {PAIR_CHANNELS} channels, got conditioning_channels={self.config.conditioning_channels}")
        # `forward` implements SD's ControlNet: no class or added embeddings, RGB order, no pooling.
        unsupported = {"class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
                       "global_pool_conditions": False, "controlnet_conditioning_channel_order": "rgb"}
        for key, expected in unsupported.items():
            if self.config.get(key, expected) != expected:
                raise ValueError(f"PromptDiffusionControlNetModel supports {key}={expected!r} only, got {self.config[key]!r}")
        # The same layout as the pair encoder, for one RGB image; its conv_out starts at zero.
        self.controlnet_query_cond_embedding = ControlNetConditioningEmbedding(
            conditioning_embedding_channels=self.config.block_out_channels[0],
            block_out_channels=self.config.conditioning_embedding_out_channels,
            conditioning_channels=QUERY_CHANNELS,
        )

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        **kwargs,
    ) -> "PromptDiffusionControlNetModel":
        """A new ControlNet whose encoder copies `unet`'s (the hint encoders and zero convs are new)."""
        return super().from_unet(
            unet,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            load_weights_from_unet=load_weights_from_unet,
            conditioning_channels=PAIR_CHANNELS,
            **kwargs,
        )

    def embed_conditions(self, controlnet_cond: torch.Tensor, controlnet_query_cond: torch.Tensor) -> torch.Tensor:
        """Pair (B, 6, H, W) and query (B, 3, H, W) -> the summed embedding (B, C, H / f, W / f) that
        `forward` adds to `conv_in(sample)`; f is the VAE's down-sampling factor."""
        if controlnet_cond.shape[1] != PAIR_CHANNELS or controlnet_query_cond.shape[1] != QUERY_CHANNELS:
            raise ValueError(
                f"expected the pair with {PAIR_CHANNELS} channels and the query with {QUERY_CHANNELS}, "
                f"got {tuple(controlnet_cond.shape)} and {tuple(controlnet_query_cond.shape)}"
            )
        if controlnet_cond.shape[-2:] != controlnet_query_cond.shape[-2:]:
            raise ValueError(f"the pair {tuple(controlnet_cond.shape[-2:])} and the query {tuple(controlnet_query_cond.shape[-2:])} must have the same size")
        return self.controlnet_cond_embedding(controlnet_cond) + self.controlnet_query_cond_embedding(controlnet_query_cond)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor | None = None,
        controlnet_query_cond: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        return_dict: bool = True,
        conditioning_embedding: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
    ) -> ControlNetOutput | tuple:
        """The residuals for the UNet, from the pair and the query or from their `embed_conditions`."""
        if conditioning_embedding is None:
            if controlnet_cond is None or controlnet_query_cond is None:
                raise ValueError("pass controlnet_cond and controlnet_query_cond, or their conditioning_embedding")
            conditioning_embedding = self.embed_conditions(controlnet_cond, controlnet_query_cond)
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.expand(sample.shape[0]) if timesteps.ndim == 0 else timesteps
        # time_proj returns float32 whatever the model's dtype: cast before the embedding MLP.
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))

        sample = self.conv_in(sample) + conditioning_embedding
        residuals = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, block_residuals = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                                cross_attention_kwargs=cross_attention_kwargs)
            else:
                sample, block_residuals = block(hidden_states=sample, temb=emb)
            residuals += block_residuals
        if getattr(self.mid_block, "has_cross_attention", False):
            sample = self.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)
        else:
            sample = self.mid_block(sample, emb)

        # The zero convolutions, then the conditioning scale.
        down = [zero_conv(residual) * conditioning_scale for residual, zero_conv in zip(residuals, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(sample) * conditioning_scale
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)
