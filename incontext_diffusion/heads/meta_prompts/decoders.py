"""The task heads of MetaPrompts: meta prompts, per-loop time vectors and the decoders.

Each head is a diffusers `ModelMixin`/`ConfigMixin`, so `save_pretrained`/`from_pretrained` write
and read it (config.json + safetensors) beside the VAE and UNet of the exported model. Module names
follow the official code (layer1..4, out_layer, decoder, last_layer_depth, decode_head,
auxiliary_head), which keeps the checkpoint converter a list of prefixes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(16) as in the official heads; fewer groups where tiny widths are not multiples of 16."""
    return nn.GroupNorm(math.gcd(16, channels), channels)


class Deconvolutions(nn.Module):
    """`num_deconv` x [ConvTranspose stride 2, BN, ReLU] then conv3x3 + BN + ReLU (GLPDepth's Decoder)."""

    def __init__(self, in_channels: int, out_channels: int, num_deconv: int, filters: int, kernel: int):
        super().__init__()
        padding = {4: 1, 2: 0}[kernel]
        layers: list[nn.Module] = []
        for i in range(num_deconv):
            layers += [nn.ConvTranspose2d(in_channels if i == 0 else filters, filters, kernel, stride=2, padding=padding, bias=False),
                       nn.BatchNorm2d(filters), nn.ReLU()]
        self.deconv_layers = nn.Sequential(*layers)
        self.conv_layers = nn.Sequential(nn.Conv2d(filters if num_deconv else in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_layers(self.deconv_layers(x))


def reweight(features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Plain channel dot product with each prompt: (B, C, H, W) x (B, N, C) -> (B, N, H, W)."""
    return torch.einsum("bchw,bnc->bnhw", features, prompts)


class MetaPromptsDepthHead(ModelMixin, ConfigMixin):
    """Per-loop meta prompts (each through its MLP adapter), per-loop time vectors and the depth decoder."""

    @register_to_config
    def __init__(
        self,
        feature_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        prompt_dim: int = 768,  # = the UNet's cross_attention_dim
        time_embedding_dim: int = 1280,
        num_prompts: int = 50,
        num_loops: int = 3,
        max_depth: float = 10.0,
        num_deconv: int = 3,  # the prompt map is resized to 1 / 2**num_deconv of the input, then deconvolved back
        deconv_filters: int = 32,
        decoder_channels: int = 192,
        input_multiple: int = 64,
        resize_scale: int = 1,  # the UNet input side is (side // 64 + resize_scale) * 64 (NYU 1, KITTI 2)
        scale_latents: bool = False,  # official: unscaled VAE latents
    ):
        super().__init__()
        c0, c1, c2, c3 = feature_channels
        self.meta_prompts = nn.ParameterList([nn.Parameter(torch.randn(num_prompts, prompt_dim)) for _ in range(num_loops)])
        self.prompt_adapters = nn.ModuleList(
            [nn.Sequential(nn.Linear(prompt_dim, prompt_dim), nn.GELU(), nn.Linear(prompt_dim, prompt_dim)) for _ in range(num_loops)]
        )
        self.time_embeddings = nn.Parameter(torch.randn(num_loops, time_embedding_dim))
        # Every level is brought to the resolution of f0 and concatenated.
        self.layer1 = nn.Sequential(nn.Conv2d(c0, c0, 3, padding=1), group_norm(c0), nn.ReLU())
        self.layer2 = Deconvolutions(c1, c1, 1, 32, 4)
        self.layer3 = Deconvolutions(c2, c2, 2, 32, 4)
        self.layer4 = Deconvolutions(c3, c3, 3, 32, 4)
        self.out_layer = nn.Sequential(nn.Conv2d(sum(feature_channels), prompt_dim, 3, padding=1), group_norm(prompt_dim), nn.ReLU())
        self._init_encoder_head()
        self.decoder = Deconvolutions(num_prompts, decoder_channels, num_deconv, deconv_filters, 2)
        self.last_layer_depth = nn.Sequential(
            nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1), nn.ReLU(), nn.Conv2d(decoder_channels, 1, 3, padding=1)
        )
        self._init_decoder()

    def _init_encoder_head(self) -> None:
        for module in [self.layer1, self.layer2, self.layer3, self.layer4, self.out_layer]:
            for m in module.modules():
                if isinstance(m, nn.Conv2d):  # trunc_normal(0.02), as the official encoder's _init_weights
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def _init_decoder(self) -> None:
        # N(0, 0.001) weights: the first prediction is about max_depth / 2 everywhere.
        for m in [*self.decoder.modules(), *self.last_layer_depth.modules()]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def contexts(self, batch: int) -> list[torch.Tensor]:
        """The cross-attention context of each loop: adapter_k(prompts_k), broadcast to (B, N, C)."""
        return [adapter(prompts).unsqueeze(0).expand(batch, -1, -1) for prompts, adapter in zip(self.meta_prompts, self.prompt_adapters)]

    def forward(self, features: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """Last-loop features [f0..f3] -> depth (B, 1, H, W) in (0, max_depth)."""
        f0, f1, f2, f3 = features
        fused = torch.cat([self.layer1(f0), self.layer2(f1), self.layer3(f2), self.layer4(f3)], dim=1)
        prompts = self.prompt_adapters[-1](self.meta_prompts[-1])  # the last loop's adapted prompts
        prompt_map = reweight(self.out_layer(fused), prompts.unsqueeze(0).expand(f0.shape[0], -1, -1).to(fused.dtype))
        scale = 2**self.config.num_deconv
        prompt_map = F.interpolate(prompt_map, size=(image_size[0] // scale, image_size[1] // scale), mode="bilinear", align_corners=False)
        depth = torch.sigmoid(self.last_layer_depth(self.decoder(prompt_map))) * self.config.max_depth
        if depth.shape[-2:] != tuple(image_size):  # sides not multiples of 2**num_deconv
            depth = F.interpolate(depth, size=tuple(image_size), mode="bilinear", align_corners=False)
        return depth


class MetaPromptsSegmentationHead(ModelMixin, ConfigMixin):
    """One shared set of meta prompts, per-loop time vectors, the prompt pyramid and UperNet + FCN heads."""

    @register_to_config
    def __init__(
        self,
        feature_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        prompt_dim: int = 768,
        time_embedding_dim: int = 1280,
        num_prompts: int = 150,  # 150 also for 19-class Cityscapes, as in the official configs
        num_classes: int = 150,
        num_loops: int = 3,
        channels: int = 512,  # UperNet width
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        auxiliary_channels: int = 512,
        dropout: float = 0.0,  # before the classifier (0.1 for Cityscapes)
        input_multiple: int = 64,
        scale_latents: bool = False,
    ):
        super().__init__()
        self.meta_prompts = nn.Parameter(torch.randn(num_prompts, prompt_dim))
        self.time_embeddings = nn.Parameter(torch.randn(num_loops, time_embedding_dim))
        # f_i -> x2 bilinear -> conv3x3 to prompt_dim -> GN -> ReLU: a 1/4..1/32 pyramid for SD1.5.
        self.upconvs = nn.ModuleList([nn.Sequential(nn.Conv2d(c, prompt_dim, 3, padding=1), group_norm(prompt_dim), nn.ReLU()) for c in feature_channels])
        upernet = UperNetConfig(
            hidden_size=channels,
            pool_scales=list(pool_scales),
            num_labels=num_classes,
            auxiliary_channels=auxiliary_channels,
            auxiliary_num_convs=1,
            auxiliary_concat_input=False,
        )
        self.decode_head = UperNetHead(upernet, in_channels=[num_prompts] * 4)
        self.auxiliary_head = UperNetFCNHead(upernet, in_channels=[num_prompts] * 4, in_index=2)
        if dropout > 0:  # transformers' UperNetHead has no dropout layer; mmseg puts Dropout2d before conv_seg
            self.decode_head.classifier = nn.Sequential(nn.Dropout2d(dropout), self.decode_head.classifier)
        for m in self.upconvs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for classifier in [self.decode_head.classifier, self.auxiliary_head.classifier]:
            conv = classifier[-1] if isinstance(classifier, nn.Sequential) else classifier
            nn.init.normal_(conv.weight, std=0.01)  # mmseg's conv_seg init
            nn.init.zeros_(conv.bias)

    def contexts(self, batch: int) -> list[torch.Tensor]:
        prompts = self.meta_prompts.unsqueeze(0).expand(batch, -1, -1)
        return [prompts] * self.config.num_loops

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-loop features [f0..f3] -> (logits, auxiliary logits), both at the resolution of upsampled f0."""
        prompts = self.meta_prompts.unsqueeze(0).expand(features[0].shape[0], -1, -1)
        pyramid = []
        for feature, upconv in zip(features, self.upconvs):
            feature = F.interpolate(feature, scale_factor=2, mode="bilinear", align_corners=False)
            pyramid.append(reweight(upconv(feature), prompts.to(feature.dtype)))
        logits = self.decode_head(pyramid)
        aux_logits = F.interpolate(self.auxiliary_head(pyramid), size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return logits, aux_logits
