"""Convert official MetaPrompts checkpoints (fudan-zvg/meta-prompts, ldm module names) into a model folder.

The UNet and VAE weights go through diffusers' own ldm converters; the head weights are renamed
(meta_prompts.md §6.1). Depth checkpoints lack the UNet time MLP (deleted in the official model) and
the VAE decoder: those keep the backbone's weights, which the model never uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from ...core.components import check_no_pickle_needed, load_components
from ...errors import UserError
from .decoders import MetaPromptsDepthHead, MetaPromptsSegmentationHead
from .model import feature_channels, time_embedding_dim
from .pipeline import DATASET_SETTINGS, MetaPromptsDepthPipeline, MetaPromptsSegmentationPipeline

# (official prefix of the UNet, of the VAE) per task
PREFIXES = {"depth": ("encoder.unet.unet.diffusion_model.", "encoder.encoder_vq."), "segmentation": ("unet.unet.diffusion_model.", "encoder_vq.")}


def read_state_dict(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch checkpoint, unwrapped from 'state_dict'/'model' and DDP's 'module.'."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        check_no_pickle_needed(path, trust_pickle)
        state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def head_state_dict(state: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """Official head names -> MetaPrompts{Depth,Segmentation}Head names."""
    out: dict[str, torch.Tensor] = {}
    times = sorted((int(m.group(1)), v) for k, v in state.items() if (m := re.fullmatch(r"(?:encoder\.)?t(\d+)", k)))
    if times:
        out["time_embeddings"] = torch.cat([v.reshape(1, -1) for _, v in times])
    for key, value in state.items():
        if task == "depth":
            if m := re.fullmatch(r"encoder\.meta_prompts(\d+)", key):
                out[f"meta_prompts.{int(m.group(1)) - 1}"] = value
            elif m := re.fullmatch(r"encoder\.text_adapter(\d+)\.fc\.(.*)", key):
                out[f"prompt_adapters.{int(m.group(1)) - 1}.{m.group(2)}"] = value
            elif re.match(r"encoder\.(layer\d|out_layer)\.", key):
                out[key.removeprefix("encoder.")] = value
            elif key.startswith(("decoder.", "last_layer_depth.")):
                out[key] = value
        else:
            if key == "meta_prompts":
                out[key] = value
            elif m := re.fullmatch(r"upconv(\d)\.(.*)", key):
                out[f"upconvs.{int(m.group(1)) - 1}.{m.group(2)}"] = value
            elif key.startswith(("decode_head.", "auxiliary_head.")):  # mmseg ConvModule/conv_seg -> transformers names
                out[key.replace(".bn.", ".batch_norm.").replace("conv_seg.", "classifier.")] = value
    return out


def _load(module: torch.nn.Module, weights: dict[str, torch.Tensor], allowed_missing: tuple[str, ...], what: str) -> None:
    try:
        result = module.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise UserError(f"the checkpoint's {what} does not fit the backbone ({str(err).splitlines()[1].strip()}): pass the --backbone it was trained from") from None
    missing = [k for k in result.missing_keys if not k.startswith(allowed_missing)]
    if missing or result.unexpected_keys:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise UserError(f"the checkpoint's {what} does not fit the backbone ({problem}): pass the --backbone it was trained from and the right --dataset")


def convert_checkpoint(checkpoint: Path, out: Path, dataset: str = "nyu", backbone: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
                       trust_pickle: bool = False) -> Path:
    """Write a MetaPrompts model folder from an official checkpoint trained on `dataset`; returns `out`.

    The checkpoint does not say what it was trained for: `dataset` gives the task, max depth and
    resize scale (depth) or classes (segmentation), and the official test settings written into the
    pipeline's config (processing resolution, TTA on, NYU 2 / KITTI 16 shift windows, ADE20K 512/341
    and Cityscapes 1024/512 sliding windows).
    """
    if dataset not in DATASET_SETTINGS:
        raise UserError(f"--dataset {dataset!r} is not known: choose {', '.join(DATASET_SETTINGS)}")
    settings = DATASET_SETTINGS[dataset]
    task = settings["task"]
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: choose a new output folder")
    state = read_state_dict(checkpoint, trust_pickle)
    unet_prefix, vae_prefix = PREFIXES[task]
    if not any(k.startswith(unet_prefix) for k in state):
        raise UserError(f"{checkpoint} has no '{unet_prefix}*' weights: is it a MetaPrompts {task} checkpoint? (--dataset {dataset} is a {task} dataset)")
    components = load_components(backbone)
    unet, vae = components.unet, components.vae
    ldm = {"model.diffusion_model." + k[len(unet_prefix) :]: v for k, v in state.items() if k.startswith(unet_prefix)}
    _load(unet, convert_ldm_unet_checkpoint(ldm, dict(unet.config)), ("time_embedding.",), "UNet")
    ldm_vae = {"first_stage_model." + k[len(vae_prefix) :]: v for k, v in state.items() if k.startswith(vae_prefix)}
    if ldm_vae:
        _load(vae, convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config)), ("decoder.", "post_quant_conv."), "VAE")

    head_weights = head_state_dict(state, task)
    common = dict(feature_channels=tuple(feature_channels(unet)), prompt_dim=unet.config.cross_attention_dim,
                  time_embedding_dim=time_embedding_dim(unet), num_loops=int(head_weights["time_embeddings"].shape[0]))
    defaults = {"default_processing_resolution": settings["processing_resolution"], "default_tta": True}  # the paper's protocol
    if task == "depth":
        # The decoder's shape is read from the weights (official: 3 deconvolutions of 32 filters, 192 channels).
        deconvs = [k for k in head_weights if re.fullmatch(r"decoder\.deconv_layers\.\d+\.weight", k) and head_weights[k].ndim == 4]
        head = MetaPromptsDepthHead(
            **common, num_prompts=int(head_weights["meta_prompts.0"].shape[0]), max_depth=settings["max_depth"], resize_scale=settings["resize_scale"],
            num_deconv=len(deconvs), deconv_filters=int(head_weights["decoder.deconv_layers.0.weight"].shape[1]),
            decoder_channels=int(head_weights["last_layer_depth.0.weight"].shape[0]),
        )
        pipe = MetaPromptsDepthPipeline(vae=vae, unet=unet, head=head, shift_windows=settings["shift_windows"], **defaults)
    else:
        head = MetaPromptsSegmentationHead(**common, num_prompts=int(head_weights["meta_prompts"].shape[0]), num_classes=settings["num_classes"])
        pipe = MetaPromptsSegmentationPipeline(vae=vae, unet=unet, head=head, window=settings["window"], stride=settings["stride"], **defaults)
    _load(head, head_weights, (), "head")
    from ...core.checkpoints import atomic_export

    atomic_export(out, lambda temp: pipe.save_pretrained(str(temp), safe_serialization=True))
    return out
