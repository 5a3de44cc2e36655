"""Inference pipelines for MetaPrompts, with the habits of diffusers' Marigold pipelines.

`MetaPromptsDepthPipeline(image).prediction` is metric depth in metres (N x H x W x 1 numpy, or
N x 1 x H x W with output_type="pt"); `MetaPromptsSegmentationPipeline(image).prediction` is class
ids (N x H x W). Optional test-time augmentation as in the official evaluation: horizontal flip
(predictions averaged with the un-flipped prediction of the flipped image) and sliding windows
averaged where they overlap (windows always cover the whole image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.marigold.marigold_image_processing import MarigoldImageProcessor
from diffusers.utils import BaseOutput
from PIL import Image

from ...core.images import depth_to_uint16, load_rgb, to_tensor
from ...errors import UserError
from .decoders import MetaPromptsDepthHead, MetaPromptsSegmentationHead
from .model import build_model

ImageInput = Image.Image | np.ndarray | torch.Tensor | list


@dataclass
class MetaPromptsDepthOutput(BaseOutput):
    """prediction: metric depth in metres, N x H x W x 1 (np) or N x 1 x H x W (pt)."""

    prediction: np.ndarray | torch.Tensor


@dataclass
class MetaPromptsSegmentationOutput(BaseOutput):
    """prediction: class ids, N x H x W (np int64 or pt long)."""

    prediction: np.ndarray | torch.Tensor


def images_to_tensor(image: ImageInput) -> torch.Tensor:
    """PIL image(s), HxWx3 uint8 array(s), or a (B, 3, H, W) tensor in [0, 1] -> (B, 3, H, W) in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        image = image[None] if image.ndim == 3 else image
        if image.ndim != 4 or image.shape[1] != 3 or image.min() < 0 or image.max() > 1:
            raise UserError(f"image tensors must be (B, 3, H, W) in [0, 1], got {tuple(image.shape)}")
        return image.float() * 2 - 1
    images = image if isinstance(image, list) else [image]
    tensors = [to_tensor(load_rgb(item)) for item in images]
    if len({t.shape for t in tensors}) != 1:
        raise UserError("images of one call must share a size: call the pipeline once per size")
    return torch.stack(tensors)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets at `stride` whose union covers [0, length) (the last one ends at the edge)."""
    if window >= length:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def sliding_window(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, window: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Average `predict` over windows; each pixel is the mean of the windows covering it."""
    height, width = images.shape[-2:]
    total, count = None, torch.zeros(1, 1, height, width, device=images.device)
    for top in window_starts(height, window[0], stride[0]):
        for left in window_starts(width, window[1], stride[1]):
            out = predict(images[..., top : top + window[0], left : left + window[1]])
            if total is None:
                total = torch.zeros(*out.shape[:2], height, width, device=out.device, dtype=out.dtype)
            total[..., top : top + out.shape[-2], left : left + out.shape[-1]] += out
            count[..., top : top + out.shape[-2], left : left + out.shape[-1]] += 1
    return total / count


def with_flip(predict: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """predict(x) averaged with the flipped-back prediction of the flipped x."""
    return lambda x: (predict(x) + predict(x.flip(-1)).flip(-1)) / 2


def visualize_depth(depth, val_min: float = 0.0, val_max: float = 10.0, color_map: str = "Spectral") -> list[Image.Image]:
    """Depth in metres (N x H x W x 1, N x 1 x H x W or H x W) coloured over [val_min, val_max] metres."""
    if isinstance(depth, torch.Tensor) and depth.ndim == 2:
        depth = depth[None, None]
    elif isinstance(depth, np.ndarray) and depth.ndim == 2:
        depth = depth[None, :, :, None]
    return MarigoldImageProcessor.visualize_depth(depth, val_min=val_min, val_max=val_max, color_map=color_map)


class _MetaPromptsPipeline(DiffusionPipeline):
    head_class: type = MetaPromptsDepthHead

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, head):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, head=head)
        self._model = None

    @property
    def model(self):
        """VAE + hooked UNet + head, built on first use (building registers the UNet hooks)."""
        if self._model is None:
            self._model = build_model(self.vae, self.unet, self.head).eval()
        return self._model

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None, **kwargs):
        """Load an exported model folder (vae/, unet/, head/ and model_index.json)."""
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is not an exported MetaPrompts model (no model_index.json): pass RUN_DIR/model")
        dtype = {"torch_dtype": torch_dtype} if torch_dtype else {}
        return cls(
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **dtype),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **dtype),
            head=cls.head_class.from_pretrained(path, subfolder="head", **dtype),
        )

    def _predict(self, predict, images: torch.Tensor, window: int | None, stride: int | None, flip: bool, batch_size: int) -> torch.Tensor:
        if flip:
            predict = with_flip(predict)
        outputs = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(self.device, self.unet.dtype)
            if window:
                outputs.append(sliding_window(predict, batch, (window, window), (stride or window, stride or window)))
            else:
                outputs.append(predict(batch))
        return torch.cat(outputs).float()


class MetaPromptsDepthPipeline(_MetaPromptsPipeline):
    """Metric depth from images with a trained MetaPrompts depth model."""

    head_class = MetaPromptsDepthHead

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        flip_test: bool = False,
        shift_windows: int | None = None,
        batch_size: int = 1,
        output_type: str = "np",
    ) -> MetaPromptsDepthOutput:
        """Depth in metres. `shift_windows=n`: n square windows of side H across the width (official: NYU 2, KITTI 16)."""
        images = images_to_tensor(image)
        height, width = images.shape[-2:]
        window = stride = None
        if shift_windows and shift_windows > 1 and width > height:
            window, stride = height, math.ceil((width - height) / (shift_windows - 1))
        # The windows span the full height, so only the column stride matters.
        depth = self._predict(self.model, images, window, stride, flip_test, batch_size)
        return MetaPromptsDepthOutput(prediction=depth if output_type == "pt" else depth.permute(0, 2, 3, 1).cpu().numpy())

    def visualize_depth(self, depth, val_min: float = 0.0, val_max: float | None = None, color_map: str = "Spectral") -> list[Image.Image]:
        """Colourised depth; the range defaults to [0, max_depth] of the model (metres)."""
        return visualize_depth(depth, val_min, val_max or self.head.config.max_depth, color_map)

    @staticmethod
    def export_depth_to_16bit_png(depth, scale: float = 1000.0) -> list[Image.Image]:
        """16-bit PNG images of round(depth * scale): millimetres by default, 0 = invalid."""
        depth = depth.cpu().numpy() if isinstance(depth, torch.Tensor) else np.asarray(depth)
        depth = depth.reshape(-1, *depth.shape[-3:-1]) if depth.shape[-1] == 1 else depth.reshape(-1, *depth.shape[-2:])
        return [Image.fromarray(v) for v in depth_to_uint16(depth, scale)]


# Class colours: the synthetic-scene classes first, then a fixed pseudo-random palette.
PALETTE = np.concatenate(
    [np.array([[140, 140, 140], [225, 212, 185], [230, 60, 60], [60, 120, 230], [60, 190, 90]], np.uint8),
     np.random.default_rng(0).integers(0, 256, size=(251, 3), dtype=np.uint8)]
)


class MetaPromptsSegmentationPipeline(_MetaPromptsPipeline):
    """Semantic segmentation from images with a trained MetaPrompts segmentation model."""

    head_class = MetaPromptsSegmentationHead

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        flip_test: bool = False,
        window: int | None = None,
        stride: int | None = None,
        batch_size: int = 1,
        output_type: str = "np",
    ) -> MetaPromptsSegmentationOutput:
        """Class ids; `window`/`stride` give sliding-window inference (official ADE20K 512/341, Cityscapes 1024/512)."""
        images = images_to_tensor(image)

        def probabilities(x: torch.Tensor) -> torch.Tensor:
            return self.model(x)[0].softmax(dim=1)

        labels = self._predict(probabilities, images, window, stride, flip_test, batch_size).argmax(dim=1)
        return MetaPromptsSegmentationOutput(prediction=labels if output_type == "pt" else labels.cpu().numpy())

    @staticmethod
    def visualize_segmentation(labels) -> list[Image.Image]:
        """Class ids -> palette colours (255 = ignore is black)."""
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        palette = PALETTE.copy()
        palette[255] = 0
        return [Image.fromarray(palette[np.asarray(item, dtype=np.int64).clip(0, 255)]) for item in labels.reshape(-1, *labels.shape[-2:])]

    @staticmethod
    def overlay(image: Image.Image, labels: np.ndarray, alpha: float = 0.5) -> Image.Image:
        """The class colours blended over the image."""
        colours = MetaPromptsSegmentationPipeline.visualize_segmentation(np.asarray(labels)[None])[0]
        return Image.blend(load_rgb(image).resize(colours.size), colours, alpha)
