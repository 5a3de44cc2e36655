"""Image generation metrics: pixel RMSE (Prompt Diffusion forward tasks), PSNR, SSIM and FID.

Images are uint8 tensors (B, C, H, W) in [0, 255], what the evaluated PNGs hold; numpy arrays in
the same layout are accepted.

- RMSE follows Prompt Diffusion's `eval/evaluate_mse.py` (prompt_diffusion.md §4.3): pixels / 255,
  all channels, MSE per image, RMSE = sqrt(mean over images of the per-image MSE).
- PSNR (per image, then averaged) and SSIM (torchmetrics defaults: Gaussian 11x11, sigma 1.5) on
  pixels / 255.
- FID is torchmetrics' `FrechetInceptionDistance` over the 2048-d Inception pool features
  (ecosystem.md §4.3). It never downloads: it needs a local torch-fidelity Inception weights file
  or an injected feature extractor.
"""

from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance

from incontext_diffusion.errors import UserError
from incontext_diffusion.metrics.shapes import check_same_shape

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def _as_images(images: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UserError(
            f"{name} images are {images.dtype} with shape {tuple(images.shape)}: pass uint8 (B, C, H, W) images "
            "in [0, 255], e.g. (x * 255).round().to(torch.uint8) for floats in [0, 1]"
        )
    return images


def _as_pairs(generated: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, ...]:
    """Two uint8 batches of equal shape -> float64 in [0, 1]."""
    generated = _as_images(generated, "generated")
    reference = _as_images(reference, "reference").to(generated.device)
    check_same_shape(generated, reference, "generated images", "resize the generated images to the reference resolution")
    return generated.double() / 255, reference.double() / 255


class PixelRMSE(Metric):
    """Prompt Diffusion forward-task RMSE: sqrt of the mean over images of each image's MSE on pixels / 255."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("sum_mse", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, generated: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> None:
        generated, reference = _as_pairs(generated, reference)
        per_image_mse = (generated - reference).square().flatten(1).mean(dim=1)
        self.sum_mse += per_image_mse.sum().to(self.sum_mse.device)
        self.num_images += len(per_image_mse)

    def compute(self) -> torch.Tensor:
        if self.num_images == 0:
            raise UserError("no image pair was evaluated: call update(generated, reference) before compute()")
        return (self.sum_mse / self.num_images).sqrt()


def pixel_rmse(generated: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """RMSE of one batch of uint8 images against their references (see `PixelRMSE`)."""
    metric = PixelRMSE()
    metric.update(generated, reference)
    return metric.compute().item()


class GenerationMetrics:
    """RMSE, PSNR (dB) and SSIM of generated images against references, over an evaluation set.

    Example (img -> depth forward task):
        metrics = GenerationMetrics()
        for generated, annotated in pairs: metrics.update(generated, annotated)
        metrics.compute()  # {"rmse": ..., "psnr": ..., "ssim": ...}
    """

    def __init__(self) -> None:
        self.metrics = MetricCollection(
            {
                "rmse": PixelRMSE(),
                # dim=(1, 2, 3): one PSNR per image, then the mean (not the PSNR of the pooled MSE).
                "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),
                "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            },
            compute_groups=False,
        )

    def update(self, generated: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> None:
        """Add a batch of uint8 (B, C, H, W) generated images and their references."""
        generated_unit, reference_unit = _as_pairs(generated, reference)
        self.metrics.to(generated_unit.device)
        self.metrics["rmse"].update(generated, reference)
        self.metrics["psnr"].update(generated_unit.float(), reference_unit.float())
        self.metrics["ssim"].update(generated_unit.float(), reference_unit.float())

    def compute(self) -> dict[str, float]:
        return {name: value.item() for name, value in self.metrics.compute().items()}

    def reset(self) -> None:
        self.metrics.reset()


class FID:
    """Fréchet Inception Distance between generated and reference image sets (torchmetrics).

    Give either `feature_extractor_weights_path`, a local copy of torch-fidelity's
    `weights-inception-2015-12-05-6726825d.pth` (needs `pip install torch-fidelity`), or
    `feature_extractor`, any module mapping uint8 (B, 3, H, W) images to (B, F) features with an
    int attribute `num_features`. Nothing is downloaded. At least 2 images per set.
    """

    def __init__(
        self,
        feature_extractor_weights_path: str | Path | None = None,
        feature_extractor: torch.nn.Module | None = None,
    ) -> None:
        if feature_extractor is not None:
            self.metric = FrechetInceptionDistance(feature=feature_extractor)
            return
        if feature_extractor_weights_path is None:
            raise UserError(
                f"FID needs Inception weights: pass --inception-weights PATH (a local copy of torch-fidelity's "
                f"{INCEPTION_WEIGHTS_FILE}; the toolkit never downloads it)"
            )
        path = Path(feature_extractor_weights_path)
        if not path.is_file():
            raise UserError(f"Inception weights file not found: {path}: pass the path of {INCEPTION_WEIGHTS_FILE}")
        try:
            self.metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
        except ModuleNotFoundError as error:
            raise UserError("FID with Inception weights needs torch-fidelity: pip install torch-fidelity") from error

    def update(self, images: torch.Tensor | np.ndarray, real: bool) -> None:
        """Add uint8 (B, 3, H, W) images to the reference set (`real=True`) or the generated set."""
        images = _as_images(images, "reference" if real else "generated")
        self.metric.to(images.device)
        self.metric.update(images, real=real)

    def compute(self) -> float:
        if self.metric.real_features_num_samples < 2 or self.metric.fake_features_num_samples < 2:
            raise UserError("FID needs at least 2 reference and 2 generated images: evaluate more images")
        return self.metric.compute().item()

    def reset(self) -> None:
        self.metric.reset()


def drawn_shape(labels: np.ndarray, class_names: tuple[str, ...], background: tuple[str, ...] = ("floor", "wall")) -> str | None:
    """The object class most pixels of a predicted label map (H x W class ids) belong to, background
    classes left out; None when no pixel is an object."""
    objects = [i for i, name in enumerate(class_names) if name not in background]
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=len(class_names))[objects]
    return class_names[objects[int(counts.argmax())]] if counts.sum() > 0 else None


def shape_agreement(label_maps: list[np.ndarray], named_shapes: list[str], class_names: tuple[str, ...]) -> float:
    """Fraction of generated images whose drawn shape (by a segmentation model's label map) is the one
    their caption names."""
    if len(label_maps) != len(named_shapes) or not label_maps:
        raise ValueError(f"shape_agreement needs one label map per caption, got {len(label_maps)} and {len(named_shapes)}")
    return float(np.mean([drawn_shape(labels, class_names) == shape for labels, shape in zip(label_maps, named_shapes)]))
