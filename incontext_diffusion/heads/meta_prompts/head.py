"""The training head of MetaPrompts (`head: meta_prompts`, `model.task: depth | segmentation`).

The trainable module is the whole model (VAE frozen inside it); the optimiser groups give the UNet
a reduced learning rate (x0.01 depth, x0.1 segmentation) and no weight decay to biases and norms.
Augmentation (random scale, crop, flip, photometric jitter) is drawn in the training step from the
global torch RNG, so datasets stay deterministic by index.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ...core.components import load_components
from ...core.head import Head
from ...core.images import make_grid, to_pil
from ...data import perception
from ...errors import UserError
from .decoders import MetaPromptsDepthHead, MetaPromptsSegmentationHead
from .losses import IGNORE_INDEX, segmentation_loss, silog_loss
from .model import build_model, feature_channels, time_embedding_dim
from .pipeline import DATASET_SETTINGS, MetaPromptsDepthPipeline, MetaPromptsImageProcessor, MetaPromptsSegmentationPipeline

# diffusers names of the UNet norms whose ldm names contain "norm" (the resnets' GroupNorms are
# in_layers.0 / out_layers.0 in ldm, conv_norm_out is out.0): attentions.i.norm, transformer_blocks.j.norm1..3
ATTENTION_NORM = re.compile(r"\.attentions\.\d+\.(norm|transformer_blocks\.\d+\.norm\d)\.")
HELD_OUT_SEED = 1_000_000  # synthetic evaluation scenes; training uses data.seed .. data.seed + num_samples


class MetaPromptsOptions(BaseModel):
    """The recipe's `model:` keys both tasks read."""

    model_config = ConfigDict(extra="forbid")
    task: Literal["depth", "segmentation"]
    num_loops: int = Field(3, ge=1)
    num_prompts: int | None = Field(None, ge=1)  # default: 50 (depth), 150 (segmentation)
    unet_lr_scale: float | None = Field(None, ge=0)  # default: 0.01 (depth), 0.1 (segmentation)
    scale_latents: bool = False  # official: the UNet sees unscaled VAE latents
    input_multiple: int = Field(64, ge=8)
    # official_depth: the depth code's schedule, replacing train.lr_scheduler: from min_learning_rate up to
    # train.learning_rate at half the run ((s/half)^0.9), then back down, min_learning_rate at the end
    lr_schedule: Literal["recipe", "official_depth"] = "recipe"
    min_learning_rate: float = Field(3e-5, ge=0)
    # augmentation in the training step
    crop_size: int | None = Field(None, ge=16)  # random crop (square); None: whole images
    scale_range: tuple[float, float] = (1.0, 1.0)
    flip: bool = True
    photometric: bool = True


class DepthOptions(MetaPromptsOptions):
    """`model:` of a depth recipe."""

    task: Literal["depth"]
    max_depth: float = Field(10.0, gt=0)
    resize_scale: int = Field(1, ge=0)
    num_deconv: int = Field(3, ge=0)
    deconv_filters: int = Field(32, ge=1)
    decoder_channels: int = Field(192, ge=1)
    silog_lambda: float = Field(0.5, ge=0, le=1)


class SegmentationOptions(MetaPromptsOptions):
    """`model:` of a segmentation recipe."""

    task: Literal["segmentation"]
    num_classes: int = Field(150, ge=2)
    channels: int = Field(512, ge=1)
    auxiliary_channels: int = Field(512, ge=1)
    auxiliary_weight: float = Field(0.4, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    short_side: int | None = Field(None, ge=16)  # segmentation datasets: resize to this short side first
    # valid: cross-entropy averaged over the labelled pixels; all: over every pixel, ignored ones
    # counting 0 (the official mmseg 0.30 default, avg_non_ignore=False)
    ce_average: Literal["valid", "all"] = "valid"
    # toolkit: the UNet at unet_lr_scale, no decay on 1-D parameters; mmcv: the official custom_keys
    # grouping (UNet parameters named "norm" in ldm at lr x1 without decay, every other parameter decayed)
    parameter_groups: Literal["toolkit", "mmcv"] = "toolkit"


OPTIONS = {"depth": DepthOptions, "segmentation": SegmentationOptions}


def task_options(model: dict, where: str) -> type[MetaPromptsOptions]:
    """The schema of `model.task`; a key of the other task is refused with one line."""
    task = model.get("task")
    if task not in OPTIONS:
        raise UserError(f"'model.task' in {where} must be depth or segmentation (got {task!r}): set model.task")
    other = "segmentation" if task == "depth" else "depth"
    foreign = sorted(set(model) & (set(OPTIONS[other].model_fields) - set(MetaPromptsOptions.model_fields)))
    if foreign:
        raise UserError(f"'model.{foreign[0]}' in {where} is a {other} key, and this recipe's model.task is {task}: drop it")
    return OPTIONS[task]


class MetaPromptsHead(Head):
    """Depth or semantic segmentation from a diffusion UNet with meta prompts and recurrent refinement."""

    pipeline_classes = (MetaPromptsDepthPipeline, MetaPromptsSegmentationPipeline)
    data_keys = frozenset({"source", "path", "size", "seed", "num_samples", "min_objects", "max_objects", "held_out"})

    def __init__(self, recipe):
        self.Options = task_options(recipe.model, f"recipe {recipe.name}")
        super().__init__(recipe)
        # With one loop the UNet's conv_out output is never used, so it gets no gradient.
        self.has_unused_parameters = self.options.num_loops == 1
        self.is_depth = self.options.task == "depth"

    # --- building ---------------------------------------------------------------------------------
    def build(self) -> None:
        components = load_components(self.recipe.backbone or "tiny")
        self.components = components
        self.model = build_model(components.vae, components.unet, self.make_head(components.unet))

    def make_head(self, unet) -> torch.nn.Module:
        o = self.options
        common = dict(
            feature_channels=tuple(feature_channels(unet)),
            prompt_dim=unet.config.cross_attention_dim,
            time_embedding_dim=time_embedding_dim(unet),
            num_loops=o.num_loops,
            input_multiple=o.input_multiple,
            scale_latents=o.scale_latents,
        )
        if self.is_depth:
            return MetaPromptsDepthHead(
                **common, num_prompts=o.num_prompts or 50, max_depth=o.max_depth, num_deconv=o.num_deconv,
                deconv_filters=o.deconv_filters, decoder_channels=o.decoder_channels, resize_scale=o.resize_scale,
            )
        return MetaPromptsSegmentationHead(
            **common, num_prompts=o.num_prompts or 150, num_classes=o.num_classes, channels=o.channels,
            auxiliary_channels=o.auxiliary_channels, dropout=o.dropout,
        )

    def trainable(self) -> torch.nn.Module:
        return self.model

    def lr_lambda(self, max_steps: int):
        if self.options.lr_schedule == "recipe":
            return None
        low = self.options.min_learning_rate / self.recipe.train.learning_rate
        half = max(1, max_steps // 2)

        def factor(step: int) -> float:
            if step < half:
                return low + (1 - low) * (step / half) ** 0.9
            return max(low, 1 - (1 - low) * (step / half - 1) ** 0.9)

        return factor

    def parameter_groups(self, model: torch.nn.Module, learning_rate: float) -> list[dict]:
        """The UNet at lr x unet_lr_scale. toolkit: every UNet parameter (the official norm-key quirk is
        not kept), 1-D parameters without weight decay; mmcv (segmentation): the official grouping."""
        scale = self.options.unet_lr_scale if self.options.unet_lr_scale is not None else (0.01 if self.is_depth else 0.1)
        mmcv = not self.is_depth and self.options.parameter_groups == "mmcv"
        groups: dict[tuple[float, bool], list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            in_unet = name.startswith("backbone.unet.")
            if mmcv:
                # mmcv's custom_keys try "norm" before "unet": the UNet parameters whose ldm names hold
                # "norm" (SpatialTransformer.norm, BasicTransformerBlock.norm1..3) get lr x1 and no decay;
                # every other parameter (biases and 1-D included) the recipe's decay.
                ldm_norm = in_unet and ATTENTION_NORM.search(name) is not None
                key = (1.0 if ldm_norm or not in_unet else scale, not ldm_norm)
            else:
                key = (scale if in_unet else 1.0, param.ndim > 1)
            groups.setdefault(key, []).append(param)
        return [
            {"params": params, "lr": learning_rate * lr_scale, **({} if decay else {"weight_decay": 0.0})}
            for (lr_scale, decay), params in groups.items()
        ]

    # --- data -------------------------------------------------------------------------------------
    def train_dataset(self) -> torch.utils.data.Dataset:
        return self.dataset(train=True)

    def dataset(self, train: bool) -> torch.utils.data.Dataset:
        data, o = self.recipe.data, self.options
        if data.source == "synthscenes":
            kind = perception.SynthDepth if self.is_depth else perception.SynthSegmentation
            seed = data.seed if train else HELD_OUT_SEED
            return kind(data.num_samples if train else data.held_out, data.size, seed, data.min_objects, data.max_objects)
        if data.path is None:
            raise UserError(f"data.source {data.source} needs data.path (a split file for nyu/kitti, the dataset folder for ade20k/cityscapes)")
        readers = {
            "nyu": lambda: perception.NYUv2Depth(data.path),
            "kitti": lambda: perception.KITTIDepth(data.path),
            "ade20k": lambda: perception.ADE20K(data.path, "training" if train else "validation", o.short_side),
            "cityscapes": lambda: perception.Cityscapes(data.path, "train" if train else "val", o.short_side),
        }
        if data.source not in readers or (data.source in ("nyu", "kitti")) != self.is_depth:
            raise UserError(f"data.source {data.source} does not fit model.task {o.task}: depth uses nyu/kitti/synthscenes, segmentation ade20k/cityscapes/synthscenes")
        return readers[data.source]()

    def collate(self, samples: list[dict]) -> dict:
        """Stack, padding to the largest sample (image 0, labels 255, depth 0 = invalid)."""
        height = max(s["image"].shape[-2] for s in samples)
        width = max(s["image"].shape[-1] for s in samples)
        fill = {"image": 0.0, "depth": 0.0, "labels": IGNORE_INDEX}
        return {
            key: torch.stack([F.pad(s[key], (0, width - s[key].shape[-1], 0, height - s[key].shape[-2]), value=fill[key]) for s in samples])
            for key in samples[0]
        }

    # --- the training step ------------------------------------------------------------------------
    def augment(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random scale (one per batch), crop and flip (per sample), brightness/contrast/gamma jitter.
        Drawn from the CPU generator on every device (the same run on CPU and GPU), then moved."""
        o = self.options
        low, high = o.scale_range
        if high > low or low != 1.0:
            factor = low + (high - low) * torch.rand(()).item()
            size = [max(1, round(s * factor)) for s in images.shape[-2:]]
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            target = F.interpolate(target.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).to(target.dtype) if target.ndim == 3 else F.interpolate(target, size=size, mode="nearest")
        if o.crop_size:
            fill = 0.0 if self.is_depth else IGNORE_INDEX
            pad_h, pad_w = max(0, o.crop_size - images.shape[-2]), max(0, o.crop_size - images.shape[-1])
            images, target = F.pad(images, (0, pad_w, 0, pad_h)), F.pad(target, (0, pad_w, 0, pad_h), value=fill)
            tops = torch.randint(0, images.shape[-2] - o.crop_size + 1, (images.shape[0],)).tolist()
            lefts = torch.randint(0, images.shape[-1] - o.crop_size + 1, (images.shape[0],)).tolist()
            crop = o.crop_size
            images = torch.stack([x[..., t : t + crop, l : l + crop] for x, t, l in zip(images, tops, lefts)])
            target = torch.stack([y[..., t : t + crop, l : l + crop] for y, t, l in zip(target, tops, lefts)])
        if o.flip:
            flips = (torch.rand(images.shape[0]) < 0.5).to(images.device)
            images = torch.where(flips[:, None, None, None], images.flip(-1), images)
            target = torch.where(flips.view(-1, *[1] * (target.ndim - 1)), target.flip(-1), target)
        if o.photometric:
            b = images.shape[0]
            unit = (images + 1) / 2
            jitter = (torch.rand(3, b, 1, 1, 1) * 2 - 1).to(images.device)  # brightness, contrast, gamma
            unit = unit * (1 + 0.2 * jitter[0]) + 0.1 * jitter[1]
            unit = unit.clamp(0, 1) ** (1 + 0.2 * jitter[2])
            images = unit * 2 - 1
        return images, target

    def loss(self, model: torch.nn.Module, batch: dict, step: int) -> torch.Tensor:
        target_key = "depth" if self.is_depth else "labels"
        images, target = self.augment(batch["image"], batch[target_key])
        if self.is_depth:
            return silog_loss(model(images), target, self.options.silog_lambda)
        logits, aux_logits = model(images)
        return segmentation_loss(logits, aux_logits, target, self.options.auxiliary_weight, self.options.ce_average)["loss"]

    # --- validation and export --------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, model: torch.nn.Module, step: int):
        """RGB, prediction and ground truth of four samples (held-out scenes for synthetic data)."""
        dataset = self.dataset(train=self.recipe.data.source != "synthscenes")
        samples = [dataset[i] for i in range(min(4, len(dataset)))]
        device = next(model.parameters()).device
        rows = []
        for sample in samples:
            image = sample["image"][None].to(device)
            if self.is_depth:
                prediction = model(image)[0, 0].cpu()
                colour = [MetaPromptsImageProcessor.visualize_depth(d, 0.0, self.options.max_depth)[0] for d in (prediction, sample["depth"][0])]
                rows.append([to_pil(sample["image"]), *colour])
            else:
                labels = model(image)[0].argmax(1)[0].cpu()
                paint = MetaPromptsImageProcessor.visualize_segmentation
                rows.append([to_pil(sample["image"]), paint(labels[None])[0], paint(sample["labels"][None])[0]])
        return make_grid(rows)

    def pipeline(self, model: torch.nn.Module):
        """The inference pipeline on the trained modules, with the inference defaults of the training
        data: the official test settings for a paper dataset, the training size for synthetic scenes."""
        data = self.recipe.data
        settings = DATASET_SETTINGS.get(data.source, {"processing_resolution": self.options.crop_size or data.size})
        common = dict(vae=model.backbone.vae, unet=model.backbone.unet, head=model.head,
                      default_processing_resolution=settings["processing_resolution"], default_tta=data.source in DATASET_SETTINGS)
        if self.is_depth:
            return MetaPromptsDepthPipeline(**common, shift_windows=settings.get("shift_windows", 0))
        return MetaPromptsSegmentationPipeline(**common, window=settings.get("window", 0), stride=settings.get("stride", 0))

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        self.pipeline(model).save_pretrained(str(out_dir), safe_serialization=True)

    def model_card(self) -> str:
        kind = "MetaPromptsDepthPipeline" if self.is_depth else "MetaPromptsSegmentationPipeline"
        what = "metric depth in metres" if self.is_depth else "class ids"
        return (
            f"MetaPrompts ({self.options.task}, {self.options.num_loops} loops) on `{self.recipe.backbone}`. Predicts {what}.\n\n"
            f"```python\nfrom incontext_diffusion import {kind}\npipe = {kind}.from_pretrained(PATH)\n"
            "prediction = pipe(image).prediction\n```\n\nCommand line: `icd infer --model PATH --image IMAGE_OR_FOLDER --out FOLDER`.\n"
        )
