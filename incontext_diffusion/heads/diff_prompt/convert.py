"""Convert the released Diff-Prompt checkpoints into this toolkit's model folders (diff_prompt.md §7, item 11).

Mask-VAE (stage 1): the hub folder `oaaoaa/mask_vae` (a diffusers `AutoencoderKL`: config.json +
diffusion_pytorch_model.safetensors) or the Lightning checkpoint `epoch=157-step=13113.ckpt`
(`state_dict` keys `model.vae.<diffusers key>`, the official `MaskVanillaVAE_V2` config) -> a stage-1
folder (mask_vae/, model_index.json).

DiT (stage 2): the hub folder `oaaoaa/mask_dit` (the official `MaskDiT`, a transformers model:
config.json + model.safetensors, EMA weights) or the training checkpoint `0094200.pt` ({"model",
"ema", "opt", "args"}: the EMA weights are taken) -> a stage-2 folder with a converted Mask-VAE and a
CLIP. Official names -> ours: `x_embedder.proj.` -> `x_embedder.` (timm's PatchEmbed wraps the conv),
`mlp.fc1` / `mlp.fc2` -> `mlp.0` / `mlp.2` (timm's Mlp); the rest keeps its name. `pos_embed` is a
frozen sine-cosine table in the official state dict and a fixed buffer here: it is checked against ours
(column half first, as the official code) instead of copied. Every tensor must find its place and every
parameter of ours must be filled, or nothing is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...core.checkpoints import atomic_export
from ...core.components import read_checkpoint_tensors
from ...errors import UserError
from .dit import MaskDiT

LIGHTNING_PREFIX = "model.vae."  # VAEXperiment.model (MaskVanillaVAE_V2) .vae (AutoencoderKL)
OFFICIAL_MASK_VAE = dict(  # unique_vae/models/mask_vanilla_vae_v2.py
    in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(4, 8, 16, 16), layers_per_block=2, latent_channels=4, norm_num_groups=2, sample_size=256,
)
DIT_RENAMES = [(re.compile(r"^x_embedder\.proj\."), "x_embedder."), (re.compile(r"\.mlp\.fc1\."), ".mlp.0."), (re.compile(r"\.mlp\.fc2\."), ".mlp.2.")]


def _folder_weights(folder: Path, names: tuple[str, ...]) -> tuple[dict, Path]:
    for name in names:
        if (folder / name).is_file():
            config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
            return config, folder / name
    raise UserError(f"{folder} holds none of {', '.join(names)}: pass the downloaded hub folder or the .ckpt/.pt file")


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    leftover = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if leftover or missing:
        raise UserError(f"{what}: {len(leftover)} tensors have no place ({', '.join(leftover[:3])}) and {len(missing)} are missing "
                        f"({', '.join(missing[:3])}): not a released Diff-Prompt checkpoint of this layout")
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise UserError(f"{what}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}: check the config")
    module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------ Mask-VAE


def mask_vae_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Mask-VAE tensors -> diffusers AutoencoderKL names (the Lightning prefix removed, if any)."""
    if any(k.startswith(LIGHTNING_PREFIX) for k in state):
        return {k[len(LIGHTNING_PREFIX):]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
    return dict(state)


def convert_mask_vae(source: Path, trust_pickle: bool = False):
    """The released Mask-VAE as a diffusers AutoencoderKL, every tensor checked into place."""
    from diffusers import AutoencoderKL

    source = Path(source)
    if source.is_dir():
        config, weights = _folder_weights(source, ("diffusion_pytorch_model.safetensors",))
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        config, weights = OFFICIAL_MASK_VAE, source
    if config.get("in_channels") != 1 or config.get("out_channels") != 1:
        raise UserError(f"{source} is not a one-channel Mask-VAE (in/out channels {config.get('in_channels')}/{config.get('out_channels')}): pass oaaoaa/mask_vae")
    vae = AutoencoderKL(**config)
    _load_strict(vae, mask_vae_state(read_checkpoint_tensors(weights, trust_pickle, ("state_dict",))), f"Mask-VAE {source}")
    return vae.eval()


def write_mask_vae_folder(vae, out: Path, mask_size: int = 224) -> Path:
    """A stage-1 folder; `mask_size` is the side the masks were trained at (224 for the released one)."""
    from .pipeline import write_model_index

    def write(folder: Path) -> None:
        vae.save_pretrained(str(folder / "mask_vae"))
        write_model_index(folder, "DiffPromptMaskVAE", mask_size=mask_size)

    return atomic_export(out, write)


# ------------------------------------------------------------------------------ DiT


def dit_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Official DiT tensors -> our MaskDiT names, and the official pos_embed (checked, not loaded)."""
    converted = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue
        for pattern, replacement in DIT_RENAMES:
            key = pattern.sub(replacement, key)
        converted[key] = value
    return converted, state.get("pos_embed")


def dit_config(state: dict[str, torch.Tensor], num_heads: int) -> dict:
    """MaskDiT's config read off the official tensors' shapes (only the head count is not in them)."""
    patch = state["x_embedder.proj.weight"]  # (hidden, in_channels, p, p)
    hidden, in_channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    out_channels = state["final_layer.linear.weight"].shape[0] // patch_size**2
    grid = round(state["pos_embed"].shape[1] ** 0.5) if "pos_embed" in state else None
    if grid is None:
        raise UserError("the DiT checkpoint has no pos_embed, so its latent size is unknown: pass the released oaaoaa/mask_dit or 0094200.pt")
    return dict(input_size=grid * patch_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden, depth=depth, num_heads=num_heads,
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden, learn_sigma=out_channels == 2 * in_channels)


def convert_dit(source: Path, trust_pickle: bool = False, num_heads: int | None = None) -> MaskDiT:
    """The released DiT as our MaskDiT; its position table must equal ours (the official, column-first order)."""
    source = Path(source)
    config = {}
    if source.is_dir():
        config, weights = _folder_weights(source, ("model.safetensors",))
    else:
        weights = source
    state = read_checkpoint_tensors(weights, trust_pickle, ("ema", "model"))  # find_model in the official code prefers "ema"
    if "x_embedder.proj.weight" not in state:
        raise UserError(f"{source} has no x_embedder.proj.weight: not an official Diff-Prompt DiT (oaaoaa/mask_dit or a DiT-main checkpoint)")
    heads = num_heads or config.get("num_heads") or 8  # DiT-My/2 has 8
    dit = MaskDiT(**dit_config(state, heads))
    converted, pos_embed = dit_state(state)
    _load_strict(dit, converted, f"DiT {source}")
    if pos_embed is not None and not torch.allclose(pos_embed.float().reshape(dit.pos_embed.shape), dit.pos_embed, atol=1e-5):
        raise UserError(f"{source}: its position embedding is not the sine-cosine table of a {dit.config.input_size // dit.config.patch_size}² grid "
                        "(column half first): not an official DiT checkpoint")
    return dit.eval()


def write_dit_folder(dit: MaskDiT, mask_vae_folder: Path, clip: str, out: Path, schedule: str = "cosine", ddim_steps: int = 25) -> Path:
    """A complete stage-2 folder: the converted DiT, the Mask-VAE of `mask_vae_folder`, CLIP, the scheduler."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTokenizer

    from .diffusion import noise_scheduler
    from .pipeline import DiffPromptMaskPipeline, write_model_index

    vae_dir = Path(mask_vae_folder) / "mask_vae"
    if not vae_dir.is_dir():
        raise UserError(f"{mask_vae_folder} has no mask_vae/: convert the Mask-VAE first (icd convert diff-prompt-mask-vae) and pass that folder")
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    if vae.config.latent_channels != dit.config.in_channels:
        raise UserError(f"the Mask-VAE has {vae.config.latent_channels} latent channels, the DiT {dit.config.in_channels}: pass the matching Mask-VAE")
    clip_model, tokenizer = CLIPModel.from_pretrained(clip), CLIPTokenizer.from_pretrained(clip)
    if clip_model.config.projection_dim != dit.config.hidden_size:
        raise UserError(f"CLIP {clip} projects to {clip_model.config.projection_dim}, the DiT is {dit.config.hidden_size} wide: pass openai/clip-vit-base-patch32")
    mask_size = dit.config.input_size * 2 ** (len(vae.config.block_out_channels) - 1)

    def write(folder: Path) -> None:
        # The released DiT predicts epsilon with a learned variance (T = 100); its training schedule is undetermined (docs).
        DiffPromptMaskPipeline(vae, dit, clip_model, tokenizer, noise_scheduler(100, schedule, "epsilon"), ddim_steps=ddim_steps).save_pretrained(folder)
        write_model_index(folder, "DiffPromptMaskPipeline", mask_size=mask_size, ddim_steps=ddim_steps)

    return atomic_export(out, write)
