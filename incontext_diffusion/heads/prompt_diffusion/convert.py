"""Convert an original Prompt Diffusion checkpoint (ldm layout) into a complete diffusers model folder.

The original `network-step=04999.ckpt` holds the whole ControlLDM: `control_model.*` (the ControlNet,
with `input_hint_block` for the example pair and `input_cond_block` for the query),
`model.diffusion_model.*` (the UNet, whose decoder the official run trained), `first_stage_model.*`
(VAE) and `cond_stage_model.transformer.*` (CLIP). The UNet, VAE and CLIP go through diffusers'
own single-file converters; the ControlNet through diffusers' ControlNet converter plus the two hint
encoders mapped here (spec §5.2: convs at ldm indices 0, 2, ..., 2k -> conv_in, blocks.0.., conv_out).
Component configs, the tokenizer and the scheduler come from `config` (SD1.5's by default); a
component missing from the checkpoint is taken from there too. Every converted group is checked:
as many tensors out as in, and a strict load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from ...core.checkpoints import atomic_export
from ...core.components import Components, load_components, read_checkpoint_tensors
from ...errors import UserError
from .controlnet import PromptDiffusionControlNetModel
from .head import make_pipeline

CONTROL, UNET, VAE, CLIP = "control_model.", "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
HINT_BLOCKS = {"input_hint_block": "controlnet_cond_embedding", "input_cond_block": "controlnet_query_cond_embedding"}


def load_state_dict(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a `.ckpt` (its `state_dict`) read with weights_only unless trusted."""
    return read_checkpoint_tensors(path, trust_pickle, ("state_dict",))


def with_prefix(state: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def convert_hint_block(block: dict[str, torch.Tensor], ldm_name: str) -> dict[str, torch.Tensor]:
    """ldm `{ldm_name}.{0,2,...,2k}` convs (SiLUs at odd indices) -> conv_in, blocks.0..k-2, conv_out."""
    indices = sorted({int(key.split(".")[1]) for key in block})
    if indices != list(range(0, 2 * len(indices), 2)):
        raise UserError(f"{ldm_name} has convs at indices {indices}; expected 0, 2, 4, ...: not a Prompt Diffusion checkpoint")
    names = {0: "conv_in", indices[-1]: "conv_out"} | {index: f"blocks.{i}" for i, index in enumerate(indices[1:-1])}
    converted = {}
    for key, value in block.items():
        _, index, param = key.split(".")
        converted[f"{HINT_BLOCKS[ldm_name]}.{names[int(index)]}.{param}"] = value
    return converted


def convert_controlnet_state(control: dict[str, torch.Tensor], unet_config: dict) -> dict[str, torch.Tensor]:
    """The `control_model.` tensors (prefix removed) in the PromptDiffusionControlNetModel layout."""
    hints = {key: value for key, value in control.items() if key.split(".")[0] in HINT_BLOCKS}
    encoder = {key: value for key, value in control.items() if key not in hints}
    converted = convert_controlnet_checkpoint(encoder, unet_config)
    for ldm_name in HINT_BLOCKS:
        converted |= convert_hint_block({k: v for k, v in hints.items() if k.startswith(ldm_name + ".")}, ldm_name)
    return {key: value for key, value in converted.items() if value is not None}


def load_complete(model: torch.nn.Module, converted: dict, source_count: int, what: str) -> None:
    """Every source tensor mapped once (counts equal) and every model tensor filled (strict load)."""
    if len(converted) != source_count:
        raise UserError(f"{what}: {source_count} tensors in the checkpoint but {len(converted)} converted: the checkpoint layout is not the expected one")
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as err:
        raise UserError(f"{what} does not fit the configuration: {str(err).splitlines()[1].strip()}") from None


def convert_state(state: dict[str, torch.Tensor], base: Components) -> tuple[Components, PromptDiffusionControlNetModel]:
    """Components and ControlNet with the checkpoint's weights (configs from `base`)."""
    control = with_prefix(state, CONTROL)
    if not control:
        raise UserError("the checkpoint has no control_model.* weights: pass an original Prompt Diffusion checkpoint")
    unet_config = dict(base.unet.config)
    # Hint-encoder widths from its conv outputs: conv_in, then pairs (same width, next width), conv_out.
    outputs = [control[f"input_hint_block.{i}.weight"].shape[0] for i in range(0, 64, 2) if f"input_hint_block.{i}.weight" in control]
    hint_widths = [outputs[0], *outputs[2:-1:2]]
    controlnet = PromptDiffusionControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=tuple(hint_widths), load_weights_from_unet=False)
    load_complete(controlnet, convert_controlnet_state(control, unet_config), len(control), "control_model")

    if with_prefix(state, UNET):
        unet_keys = with_prefix(state, UNET)
        load_complete(base.unet, convert_ldm_unet_checkpoint(state, unet_config), len(unet_keys), "model.diffusion_model")
    if with_prefix(state, VAE):
        vae_keys = {k: v for k, v in with_prefix(state, VAE).items() if not k.startswith("loss.")}
        load_complete(base.vae, convert_ldm_vae_checkpoint(state, dict(base.vae.config)), len(vae_keys), "first_stage_model")
    if with_prefix(state, CLIP):
        clip = {k: v for k, v in convert_ldm_clip_checkpoint(state).items() if not k.endswith("position_ids")}
        clip_count = sum(1 for k in with_prefix(state, CLIP) if not k.endswith("position_ids"))
        load_complete(base.text_encoder, clip, clip_count, "cond_stage_model")
    return base, controlnet


def convert_checkpoint(checkpoint: Path, out: Path, config: str = "stable-diffusion-v1-5/stable-diffusion-v1-5", trust_pickle: bool = False,
                       conditioning_range: str = "[-1, 1]") -> Path:
    """Write a complete PromptDiffusionPipeline folder converted from an original checkpoint."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: choose a new output folder")
    state = load_state_dict(checkpoint, trust_pickle)
    base = load_components(config)
    components, controlnet = convert_state(state, base)
    atomic_export(out, lambda temp: make_pipeline(components, controlnet, conditioning_range).save_pretrained(str(temp), safe_serialization=True))
    return out
