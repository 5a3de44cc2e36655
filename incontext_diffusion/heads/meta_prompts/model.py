"""MetaPrompts (Wan et al., arXiv 2312.14733) on diffusers: a UNet2DConditionModel as a feature extractor.

The image goes through the frozen VAE encoder (posterior mean, unscaled by default), then through
the UNet `num_loops` times. Learned meta prompts replace the text as cross-attention context, and a
learned vector per loop replaces the timestep embedding (`temb`). Four decoder features are read
through forward hooks (meta_prompts.md §6.1):

    f0  output of up_blocks[3]                    finest (1/8 of the image for SD1.5)
    f1  output of up_blocks[2].attentions[1]      1/16
    f2  output of up_blocks[1].attentions[1]      1/32
    f3  output of up_blocks[0].resnets[1]         1/64

The UNet's own output, conv_out(conv_act(conv_norm_out(f0))), is the input of the next loop
(recurrent refinement). Only the last loop's features reach the task head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from ...errors import UserError
from .decoders import MetaPromptsDepthHead, MetaPromptsSegmentationHead

TAPS = ("f0", "f1", "f2", "f3")


def tap_modules(unet: UNet2DConditionModel) -> list[nn.Module]:
    """The modules whose outputs are f0..f3; a UNet without them gets a one-line error."""
    blocks = unet.up_blocks
    try:
        if len(blocks) != 4:
            raise IndexError
        return [blocks[3], blocks[2].attentions[1], blocks[1].attentions[1], blocks[0].resnets[1]]
    except (IndexError, AttributeError, TypeError):
        raise UserError(
            "MetaPrompts needs a UNet with 4 up blocks, cross-attention in up_blocks[1] and [2] and at least 2 layers per block "
            f"(got up blocks {[type(b).__name__ for b in blocks]}): use an SD1.x/2.x-shaped UNet or backbone: tiny"
        ) from None


def feature_channels(unet: UNet2DConditionModel) -> list[int]:
    """Channels of f0..f3 (SD1.5: 320, 640, 1280, 1280)."""
    reversed_channels = list(reversed(unet.config.block_out_channels))
    return [reversed_channels[3], reversed_channels[2], reversed_channels[1], reversed_channels[0]]


def time_embedding_dim(unet: UNet2DConditionModel) -> int:
    return unet.time_embedding.linear_2.out_features


class UNetFeatureTaps:
    """Forward hooks on a UNet for one forward pass: record f0..f3 and replace the time-MLP output by `temb`.

    A context manager: the hooks exist only inside `with UNetFeatureTaps(unet, temb) as taps:`, so
    the same UNet still works as a plain UNet, and several models can share it.
    """

    def __init__(self, unet: UNet2DConditionModel, temb: torch.Tensor):
        self.unet, self.temb = unet, temb
        self.features: list[torch.Tensor | None] = [None] * 4
        self.handles: list = []

    def __enter__(self) -> "UNetFeatureTaps":
        self.handles = [module.register_forward_hook(self._recorder(i)) for i, module in enumerate(tap_modules(self.unet))]
        self.handles.append(self.unet.time_embedding.register_forward_hook(lambda module, inputs, output: self.temb.to(output.dtype)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _recorder(self, index: int):
        def hook(module, inputs, output):
            # Transformer2DModel returns a tuple when called with return_dict=False.
            self.features[index] = output[0] if isinstance(output, tuple) else output

        return hook


class MetaPromptsBackbone(nn.Module):
    """VAE encoder + looped UNet; `forward(images, time_embeddings, contexts)` -> features per loop."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, scale_latents: bool = False):
        super().__init__()
        self.vae, self.unet, self.scale_latents = vae, unet, scale_latents
        self.vae.requires_grad_(False)
        # The time MLP is bypassed (its output is replaced), so it never gets a gradient.
        self.unet.time_embedding.requires_grad_(False)
        tap_modules(unet)  # refuse a UNet without the taps when the model is built, not at its first call

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the VAE posterior mean (x scaling_factor only if scale_latents)."""
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()
        return latents * self.vae.config.scaling_factor if self.scale_latents else latents

    def forward(self, images: torch.Tensor, time_embeddings: torch.Tensor, contexts: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """time_embeddings (num_loops, D); contexts: per loop (B, N, C). Returns [f0, f1, f2, f3] of every loop."""
        x = self.encode(images).to(self.unet.dtype)
        batch = x.shape[0]
        timestep = torch.zeros(batch, device=x.device, dtype=torch.long)  # ignored: its embedding is replaced
        loops = []
        for k, context in enumerate(contexts):
            with UNetFeatureTaps(self.unet, time_embeddings[k : k + 1].expand(batch, -1)) as taps:
                x = self.unet(x, timestep, encoder_hidden_states=context.to(x.dtype)).sample  # feedback for loop k + 1
            # Cloned: under CUDA graphs (compile_mode reduce-overhead) the next loop's replay of the
            # same UNet graph overwrites its output buffers, and these features are read after it.
            loops.append([feature.clone() for feature in taps.features])
        return loops


def resize_to_multiple(images: torch.Tensor, multiple: int, extra: int) -> torch.Tensor:
    """Resize (not pad) to ((h // multiple) + extra) * multiple per side, as the official depth model does."""
    h, w = images.shape[-2:]
    size = (max(1, h // multiple + extra) * multiple, max(1, w // multiple + extra) * multiple)  # never below one multiple
    if size == (h, w):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


class MetaPromptsDepthModel(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> metric depth (B, 1, H, W) in metres."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, head: MetaPromptsDepthHead):
        super().__init__()
        self.backbone = MetaPromptsBackbone(vae, unet, head.config.scale_latents)
        self.head = head

    def features(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        x = resize_to_multiple(images, self.head.config.input_multiple, self.head.config.resize_scale)
        return self.backbone(x, self.head.time_embeddings, self.head.contexts(images.shape[0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)[-1], images.shape[-2:])


class MetaPromptsSegmentationModel(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> class logits (B, K, H, W) and auxiliary logits (training)."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, head: MetaPromptsSegmentationHead):
        super().__init__()
        self.backbone = MetaPromptsBackbone(vae, unet, head.config.scale_latents)
        self.head = head

    def features(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        # Crops are fed as they are when their sides are multiples of `input_multiple` (512, 1024);
        # other sizes are resized up to the next multiple, and the logits back.
        multiple = self.head.config.input_multiple
        h, w = images.shape[-2:]
        x = images if h % multiple == 0 and w % multiple == 0 else resize_to_multiple(images, multiple, 1)
        return self.backbone(x, self.head.time_embeddings, self.head.contexts(images.shape[0]))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, aux_logits = self.head(self.features(images)[-1])
        size = images.shape[-2:]
        return (
            F.interpolate(logits, size=size, mode="bilinear", align_corners=False),
            F.interpolate(aux_logits, size=size, mode="bilinear", align_corners=False),
        )


def build_model(vae: AutoencoderKL, unet: UNet2DConditionModel, head: nn.Module) -> nn.Module:
    """The full model for a depth or segmentation head."""
    if isinstance(head, MetaPromptsDepthHead):
        return MetaPromptsDepthModel(vae, unet, head)
    return MetaPromptsSegmentationModel(vae, unet, head)
