"""Stage-3 prompt modules: the two modality adaptors of Diff-Prompt and the static deep-prompt baselines.

`MaskPromptAdaptor` (the official `DiT_Prompt`): a shared trunk of 5 x (Conv3x3 stride 2, SiLU),
channels 1 -> c -> 2c -> 4c -> 8c -> 16c, flattened into a Linear that makes L/2 input-specific
tokens of width D from each decoded soft mask; per layer, L/2 learnable "global" tokens
(kaiming-normal, fan_out) complete the L tokens. The trunk and Linear are shared by all layers; the
layer index selects the decoded mask (a point of the DDIM trajectory) and the global tokens.

`StaticDeepPrompts`: L learnable tokens per layer, the same for every sample: VPT-deep on the vision
side, CoOp-deep on the text side.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UserError


class MaskPromptAdaptor(nn.Module):
    """Decoded masks, one per prompted layer, -> per-layer prompts (B, L, D)."""

    def __init__(self, mask_size: int, dim: int, depth: int, prompt_length: int = 8, base_channels: int = 8,
                 use_specific: bool = True, use_global: bool = True):
        super().__init__()
        if prompt_length % 2:
            raise UserError(f"prompt length {prompt_length} must be even (half input-specific, half global tokens)")
        if not (use_specific or use_global):
            raise UserError("an adaptor needs input-specific or global tokens (or both)")
        self.dim, self.depth, self.half = dim, depth, prompt_length // 2
        self.use_specific, self.use_global = use_specific, use_global
        channels = [1] + [base_channels * 2**i for i in range(5)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        side = mask_size
        for _ in range(5):
            side = (side - 1) // 2 + 1
        self.to_tokens = nn.Linear(channels[-1] * side * side, self.half * dim) if use_specific else None
        self.global_tokens = nn.Parameter(torch.empty(depth, self.half, dim)) if use_global else None
        if use_global:
            for layer in self.global_tokens.data:  # per layer, as the official VPT_Prompt
                nn.init.kaiming_normal_(layer, mode="fan_out")

    def forward(self, masks: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(masks) != self.depth:
            raise ValueError(f"{len(masks)} masks for {self.depth} prompted layers")
        prompts = []
        for layer, mask in enumerate(masks):
            parts = []
            if self.use_specific:
                parts.append(self.to_tokens(self.trunk(mask).flatten(1)).view(mask.shape[0], self.half, self.dim))
            if self.use_global:
                parts.append(self.global_tokens[layer].expand(mask.shape[0], -1, -1))
            prompts.append(torch.cat(parts, dim=1))
        return prompts


class StaticDeepPrompts(nn.Module):
    """L learnable tokens per layer, shared by all samples (VPT-deep / CoOp-deep)."""

    def __init__(self, dim: int, depth: int, prompt_length: int = 8):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(depth, prompt_length, dim))
        for layer in self.tokens.data:
            nn.init.kaiming_normal_(layer, mode="fan_out")

    def forward(self, batch_size: int) -> list[torch.Tensor]:
        return [layer.expand(batch_size, -1, -1) for layer in self.tokens]
