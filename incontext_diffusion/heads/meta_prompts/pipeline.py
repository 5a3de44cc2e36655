"""Inference pipelines for MetaPrompts, with the habits of diffusers' Marigold pipelines.

`MetaPromptsDepthPipeline(image).prediction` is metric depth in metres (N x H x W x 1 numpy, or
N x 1 x H x W with output_type="pt"); `MetaPromptsSegmentationPipeline(image).prediction` is class
ids (N x H x W). Predictions come back at the input's size whatever `processing_resolution` the
model ran at. `pipe.image_processor` colours depth, exports 16-bit PNGs and paints class maps.

Test-time augmentation (`tta=True`) is the official evaluation's (meta_prompts.md §3.1-3.2):
- depth: `shift_windows` square windows of side H at the official positions i * ((W - H) // (n - 1))
  (NYU 2, KITTI 16), each window averaged with the flipped-back prediction of its flip, windows
  averaged where they overlap; columns no official window reaches (the last 9 of KITTI) take an
  extra window at the right edge instead of the official NaN;
- segmentation: for each scale and for the image and its horizontal flip, logits summed over sliding
  windows (`window`/`stride`, mmseg's positions; ADE20K 512/341, Cityscapes 1024/512) and divided by
  the count, resized to the input, softmax, flipped back; the probabilities averaged.
Defaults for both (and the processing resolution) are in the pipeline's config (model_index.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.marigold.marigold_image_processing import MarigoldImageProcessor
from diffusers.utils import BaseOutput
from PIL import Image

from ...core.images import depth_to_uint16, load_rgb, to_tensor
from ...errors import UserError
from .decoders import MetaPromptsDepthHead, MetaPromptsSegmentationHead
from .model import build_model

ImageInput = Image.Image | str | Path | np.ndarray | torch.Tensor | list

# The official test settings of each paper dataset (meta_prompts.md §3): what `icd convert
# meta-prompts --dataset` and the export of a model trained on that dataset write into the config.
# processing_resolution is the short side the model sees: the training crop side (NYU 480x640 and
# KITTI 352x1216 stay native; ADE20K is resized to short side 512 as mmseg's test pipeline does).
DATASET_SETTINGS = {
    "nyu": {"task": "depth", "max_depth": 10.0, "resize_scale": 1, "processing_resolution": 480, "shift_windows": 2},
    "kitti": {"task": "depth", "max_depth": 80.0, "resize_scale": 2, "processing_resolution": 352, "shift_windows": 16},
    "ade20k": {"task": "segmentation", "num_classes": 150, "processing_resolution": 512, "window": 512, "stride": 341},
    "cityscapes": {"task": "segmentation", "num_classes": 19, "processing_resolution": 1024, "window": 1024, "stride": 512},
}


@dataclass
class MetaPromptsDepthOutput(BaseOutput):
    """prediction: metric depth in metres, N x H x W x 1 (np) or N x 1 x H x W (pt)."""

    prediction: np.ndarray | torch.Tensor


@dataclass
class MetaPromptsSegmentationOutput(BaseOutput):
    """prediction: class ids, N x H x W (np int64 or pt long)."""

    prediction: np.ndarray | torch.Tensor


def images_to_tensor(image: ImageInput) -> torch.Tensor:
    """PIL image(s), path(s), HxWx3 uint8 array(s), or a (3, H, W) / (B, 3, H, W) tensor in [0, 1] -> (B, 3, H, W) in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        image = image[None] if image.ndim == 3 else image
        if image.ndim != 4 or image.shape[1] != 3 or image.min() < 0 or image.max() > 1:
            raise UserError(f"image tensors must be (B, 3, H, W) in [0, 1], got {tuple(image.shape)}: divide uint8 pixels by 255")
        return image.float() * 2 - 1
    images = image if isinstance(image, list) else [image]
    tensors = [to_tensor(load_rgb(item)) for item in images]
    if len({t.shape for t in tensors}) != 1:
        raise UserError("images of one call must share a size: call the pipeline once per size")
    return torch.stack(tensors)


def processing_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) with the short side at `resolution`, the aspect ratio kept; 0 keeps the size."""
    if not resolution:
        return height, width
    scale = resolution / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def shift_window_starts(width: int, height: int, count: int) -> list[int]:
    """The official depth windows: `count` squares of side `height` at i * ((width - height) // (count - 1))."""
    if count < 2 or width <= height:
        return [0]
    step = (width - height) // (count - 1)
    return [i * step for i in range(count)]


def slide_window_starts(length: int, window: int, stride: int) -> list[int]:
    """mmseg's slide positions along one side: ceil((length - window) / stride) + 1 windows, the last
    one moved back to end at the edge; one window (the whole side) when the side is not longer."""
    count = max(length - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, length) - window, 0) for i in range(count)]


class MetaPromptsImageProcessor(MarigoldImageProcessor):
    """Marigold's image helpers for metric depth (metres) and class maps."""

    @staticmethod
    def visualize_depth(depth, val_min: float = 0.0, val_max: float = 10.0, color_map: str = "Spectral") -> list[Image.Image]:
        """Depth in metres (N x H x W x 1, N x 1 x H x W or H x W) coloured over [val_min, val_max] metres."""
        if isinstance(depth, torch.Tensor) and depth.ndim == 2:
            depth = depth[None, None]
        elif isinstance(depth, np.ndarray) and depth.ndim == 2:
            depth = depth[None, :, :, None]
        return MarigoldImageProcessor.visualize_depth(depth, val_min=val_min, val_max=val_max, color_map=color_map)

    @staticmethod
    def export_depth_to_16bit_png(depth, scale: float = 1000.0) -> list[Image.Image]:
        """16-bit PNG images of round(depth * scale): millimetres by default, 0 = invalid (metric,
        unlike Marigold's [val_min, val_max] -> 0..65535)."""
        depth = depth.cpu().numpy() if isinstance(depth, torch.Tensor) else np.asarray(depth)
        depth = depth.reshape(-1, *depth.shape[-3:-1]) if depth.shape[-1] == 1 else depth.reshape(-1, *depth.shape[-2:])
        return [Image.fromarray(v) for v in depth_to_uint16(depth, scale)]

    @staticmethod
    def visualize_segmentation(labels) -> list[Image.Image]:
        """Class ids (H x W or N x H x W) -> palette colours (255 = ignore is black)."""
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        palette = PALETTE.copy()
        palette[255] = 0
        return [Image.fromarray(palette[np.asarray(item, dtype=np.int64).clip(0, 255)]) for item in labels.reshape(-1, *labels.shape[-2:])]

    @staticmethod
    def overlay_segmentation(image: ImageInput, labels, alpha: float = 0.5) -> Image.Image:
        """The class colours of one H x W label map blended over the image."""
        colours = MetaPromptsImageProcessor.visualize_segmentation(np.asarray(labels)[None])[0]
        return Image.blend(load_rgb(image).resize(colours.size), colours, alpha)


# Class colours: the synthetic-scene classes first, then a fixed pseudo-random palette.
PALETTE = np.concatenate(
    [np.array([[140, 140, 140], [225, 212, 185], [230, 60, 60], [60, 120, 230], [60, 190, 90]], np.uint8),
     np.random.default_rng(0).integers(0, 256, size=(251, 3), dtype=np.uint8)]
)


class _MetaPromptsPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "vae->unet->head"

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, head):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, head=head)
        self.image_processor = MetaPromptsImageProcessor()
        self._model = None

    @property
    def model(self) -> torch.nn.Module:
        """VAE + UNet + head as one module (the UNet hooks live only inside its forward calls)."""
        if self._model is None:
            self._model = build_model(self.vae, self.unet, self.head).eval()
        return self._model

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs):
        """Load an exported model folder (vae/, unet/, head/ and model_index.json); kwargs as diffusers'."""
        if not (Path(path) / "model_index.json").is_file():
            raise UserError(f"{path} is not an exported MetaPrompts model (no model_index.json): pass RUN_DIR/model")
        return super().from_pretrained(path, **kwargs)

    def _run(self, predict: Callable[[torch.Tensor], torch.Tensor], crops: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
        """`predict` over a list of equally-sized (B, 3, h, w) crops, `batch_size` images per forward."""
        stacked = torch.cat(crops)
        outputs = []
        chunks = range(0, stacked.shape[0], batch_size)
        with self.progress_bar(total=len(chunks)) as bar:
            for start in chunks:
                outputs.append(predict(stacked[start : start + batch_size].to(self._execution_device, self.unet.dtype)).float())
                bar.update()
        return list(torch.cat(outputs).split(crops[0].shape[0]))


class MetaPromptsDepthPipeline(_MetaPromptsPipeline):
    """Metric depth from images with a trained MetaPrompts depth model."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, head: MetaPromptsDepthHead,
                 default_processing_resolution: int = 0, default_tta: bool = False, shift_windows: int = 0):
        super().__init__(vae, unet, head)
        self.register_to_config(default_processing_resolution=default_processing_resolution, default_tta=default_tta, shift_windows=shift_windows)

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        processing_resolution: int | None = None,
        tta: bool | None = None,
        shift_windows: int | None = None,
        batch_size: int = 1,
        output_type: Literal["np", "pt"] = "np",
    ) -> MetaPromptsDepthOutput:
        """Depth in metres at the input's size.

        processing_resolution: short side the model sees (0: native; None: the config's);
        tta: flip, and the config's shift windows (None: the config's); shift_windows: windows
        across the width, with or without tta (official NYU 2, KITTI 16); batch_size: crops per
        forward pass.
        """
        config = self.config
        resolution = config.default_processing_resolution if processing_resolution is None else processing_resolution
        tta = config.default_tta if tta is None else tta
        count = shift_windows if shift_windows is not None else (config.shift_windows if tta else 0)
        images = images_to_tensor(image)
        height, width = images.shape[-2:]
        x = resize(images, processing_size(height, width, resolution))  # (B, 3, h, w)
        h, w = x.shape[-2:]
        starts = shift_window_starts(w, h, count) if count else [0]
        side = h if len(starts) > 1 else w
        # Columns past the last official window (KITTI: 9) take a window at the right edge.
        extra = w - side if starts[-1] + side < w else None
        lefts = starts + ([extra] if extra is not None else [])
        crops = [x[..., left : left + side] for left in lefts]
        if tta:
            crops += [crop.flip(-1) for crop in crops]
        predictions = self._run(self.model, crops, batch_size)
        if tta:
            half = len(lefts)
            predictions = [(p + q.flip(-1)) / 2 for p, q in zip(predictions[:half], predictions[half:])]
        total = torch.zeros(images.shape[0], 1, h, w)
        count_map = torch.zeros(1, 1, 1, w)
        for left, prediction in zip(starts, predictions):
            total[..., left : left + side] += prediction.cpu()
            count_map[..., left : left + side] += 1
        if extra is not None:
            uncovered = count_map[..., extra:] == 0
            total[..., extra:] += predictions[-1].cpu() * uncovered
            count_map[..., extra:] += uncovered
        depth = resize(total / count_map, (height, width))  # (B, 1, H, W) at the input's size
        return MetaPromptsDepthOutput(prediction=depth if output_type == "pt" else depth.permute(0, 2, 3, 1).numpy())


class MetaPromptsSegmentationPipeline(_MetaPromptsPipeline):
    """Semantic segmentation from images with a trained MetaPrompts segmentation model."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, head: MetaPromptsSegmentationHead,
                 default_processing_resolution: int = 0, default_tta: bool = False, window: int = 0, stride: int = 0):
        super().__init__(vae, unet, head)
        self.register_to_config(default_processing_resolution=default_processing_resolution, default_tta=default_tta, window=window, stride=stride)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        processing_resolution: int | None = None,
        tta: bool | None = None,
        window: int | None = None,
        stride: int | None = None,
        scales: list[float] | tuple[float, ...] = (1.0,),
        batch_size: int = 1,
        output_type: Literal["np", "pt"] = "np",
    ) -> MetaPromptsSegmentationOutput:
        """Class ids at the input's size.

        processing_resolution: short side the model sees (0: native; None: the config's); tta:
        whole-image flip, and the config's sliding window (None: the config's); window/stride:
        a sliding window with or without tta (0: the whole image; official ADE20K 512/341,
        Cityscapes 1024/512); scales: multi-scale test, factors of the processed size (the
        paper's 0.5 ... 1.75); batch_size: crops per forward pass.
        """
        config = self.config
        resolution = config.default_processing_resolution if processing_resolution is None else processing_resolution
        tta = config.default_tta if tta is None else tta
        window = window if window is not None else (config.window if tta else 0)
        stride = (stride if stride is not None else config.stride) or window
        if not scales or any(s <= 0 for s in scales):
            raise UserError(f"scales {list(scales)} must be positive factors: pass e.g. scales=(0.5, 1.0, 1.5)")
        images = images_to_tensor(image)
        height, width = images.shape[-2:]
        base = processing_size(height, width, resolution)
        probabilities = None
        for scale in scales:
            x = resize(images, (max(1, round(base[0] * scale)), max(1, round(base[1] * scale))))
            for flip in (False, True) if tta else (False,):
                logits = self._slide(x.flip(-1) if flip else x, window, stride, batch_size)
                p = resize(logits, (height, width)).softmax(dim=1)  # (B, K, H, W) at the input's size
                p = p.flip(-1) if flip else p
                probabilities = p if probabilities is None else probabilities + p
        labels = probabilities.argmax(dim=1)
        return MetaPromptsSegmentationOutput(prediction=labels if output_type == "pt" else labels.numpy())

    def _slide(self, x: torch.Tensor, window: int, stride: int, batch_size: int) -> torch.Tensor:
        """Logits summed over the windows covering each pixel, divided by their count (mmseg slide)."""
        h, w = x.shape[-2:]
        if not window:
            return self._run(self._logits, [x], batch_size)[0].cpu()
        boxes = [(top, left) for top in slide_window_starts(h, window, stride) for left in slide_window_starts(w, window, stride)]
        crops = [x[..., top : top + window, left : left + window] for top, left in boxes]
        logits = self._run(self._logits, crops, batch_size)
        total = torch.zeros(x.shape[0], logits[0].shape[1], h, w)
        count = torch.zeros(1, 1, h, w)
        for (top, left), crop_logits in zip(boxes, logits):
            ch, cw = crop_logits.shape[-2:]
            total[..., top : top + ch, left : left + cw] += crop_logits.cpu()
            count[..., top : top + ch, left : left + cw] += 1
        return total / count
