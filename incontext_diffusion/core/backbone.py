"""What a latent-diffusion backbone is: the frozen pieces every head builds on.

`core/components.py` loads one (hub id, folder, single file, `tiny`); `core/tiny.py` builds the
embedded architecture. Both use this dataclass, so neither imports the other's module for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class Components:
    """The frozen pieces every head builds on."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # the training noise schedule (eps-prediction unless the config says otherwise)
    source: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Last hidden state of the text encoder for `token_ids(texts)` (SD convention)."""
        return self.text_encoder(token_ids(self.tokenizer, texts).to(self.text_encoder.device))[0]

def token_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids padded (and truncated) to the tokenizer's max length: the SD convention."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids

