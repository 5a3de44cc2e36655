"""The embedded tiny backbone: its architecture, its tokenizer, and micro twins for unit tests.

The tiny backbone mirrors SD1.5's shape at a fraction of the size: a 3-level VAE (x4 down-sampling,
4 latent channels; 64x64 images -> 16x16 latents), a 4-level UNet2DConditionModel whose decoder
has SD1.5's blocks where heads tap it (cross-attention at the two middle levels), a
CLIP text encoder and a real CLIPTokenizer whose vocabulary is the synthetic-scene grammar.
`scale="micro"` gives the same structure with a few thousand parameters, for fast tests.
`random_sd15_components()` builds SD1.5's own architecture with random weights: benchmarks and
smoke tests at real size without a download (`backbone: random-sd15`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .backbone import Components

# (vae channels, unet channels, text width, text layers, attention head dim)
SCALES = {
    "tiny": ((16, 32, 64), (32, 64, 64, 64), 64, 3, 16),
    "micro": ((8, 8, 8), (8, 8, 8, 8), 8, 1, 4),
}
MAX_TEXT_TOKENS = 16  # the scene grammar's longest caption fits; SD uses 77
SCHEDULER_CONFIG = dict(  # SD1.5's training schedule
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False
)


def build_vae(scale: str = "tiny") -> AutoencoderKL:
    channels = SCALES[scale][0]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.0,  # set from the latents' std after the VAE is trained
    )


def build_unet(scale: str = "tiny", sample_size: int = 16) -> UNet2DConditionModel:
    _, channels, text_width, _, head_dim = SCALES[scale]
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        # SD1.5 also attends at the finest level; skipping it halves the CPU step time and keeps
        # the blocks that heads tap (up_blocks[1].attentions, up_blocks[2].attentions).
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=text_width,
        attention_head_dim=head_dim,
        norm_num_groups=8,
    )


def build_text_encoder(vocab_size: int, scale: str = "tiny") -> CLIPTextModel:
    _, _, width, layers, _ = SCALES[scale]
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 16),
        max_position_embeddings=MAX_TEXT_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def write_tokenizer(words: list[str], out_dir: Path) -> CLIPTokenizer:
    """Write a CLIPTokenizer (vocab.json + merges.txt) whose BPE merges spell out every word.

    CLIP's BPE splits a word into characters, the last marked `</w>`, then applies merges in
    rank order. Merges that rebuild each word left to right make most words one token; a word
    whose pieces collide with another word's merges stays split into valid sub-word tokens.
    """
    letters = sorted({c for word in words for c in word})
    vocab = letters + [c + "</w>" for c in letters]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words), key=lambda w: (len(w), w)):  # a fixed order: the same ids every run
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            if left not in vocab:
                vocab.append(left)
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # last two ids: bos, eos (= pad)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=MAX_TEXT_TOKENS, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_components(words: list[str], tokenizer_dir: Path, scale: str = "tiny") -> Components:
    """Fresh (untrained) components of the tiny architecture."""
    tokenizer = write_tokenizer(words, tokenizer_dir)
    return Components(
        vae=build_vae(scale),
        unet=build_unet(scale),
        text_encoder=build_text_encoder(len(tokenizer), scale),
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
        source=f"{scale} (untrained)",
    )


def micro_components(words: list[str], tokenizer_dir: Path, seed: int = 0) -> Components:
    """Random micro components with the tiny structure, for unit tests (a few thousand parameters each);
    `words` is the tokenizer's vocabulary (the scenes' `caption_vocabulary()`)."""
    torch.manual_seed(seed)
    return build_components(words, tokenizer_dir, scale="micro")


def inference_scheduler() -> DDIMScheduler:
    """DDIM with SD's settings (steps_offset 1, leading spacing, no alpha-to-one)."""
    return DDIMScheduler(**SCHEDULER_CONFIG, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def random_sd15_components(tokenizer_dir: Path) -> Components:
    """SD1.5's architecture (860 M UNet, 84 M VAE, CLIP-L text encoder) with random weights.

    The tokenizer is the tiny backbone's (from `tokenizer_dir`) padded to SD's 77 tokens: its ids
    are valid in CLIP-L's 49,408-word table, which is all a benchmark needs.
    """
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    unet = UNet2DConditionModel(  # the library defaults are SD1.5's except the text width
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       max_position_embeddings=77, hidden_act="quick_gelu")
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    return Components(vae, unet, text_encoder, tokenizer, DDPMScheduler(**SCHEDULER_CONFIG), source="random-sd15")
