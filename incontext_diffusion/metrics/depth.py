"""Monocular depth metrics, MetaPrompts/GLPDepth convention (meta_prompts.md §3.1, ecosystem.md §4.1).

Every metric is computed per image over its valid pixels, then averaged over images. Depths are
metric (metres). Valid pixels: `min_depth < gt < max_depth` (strict), intersected with an optional
evaluation crop:

- "nyu_eigen": rows 45:471, cols 41:601 of a 480x640 map;
- "kitti_garg": rows [0.40810811 H, 0.99189189 H), cols [0.03594771 W, 0.96405229 W);
- "kitti_eigen": rows [0.3324324 H, 0.91351351 H), cols [0.0359477 W, 0.96405229 W).

The KITTI crops are fractions of the map they are given, i.e. of the 352x1216 KB-cropped map in
the MetaPrompts loader; the KB crop itself belongs to the data reader.

silog = scale * sqrt(mean(d^2) - lam * mean(d)^2), d = ln pred - ln gt. MetaPrompts uses lam = 0.5
and scale = 1 (the defaults); many papers (and Marigold/ZoeDepth) use lam = 1 and scale = 100.
"""

import numpy as np
import torch
from torchmetrics import Metric

from incontext_diffusion.errors import UserError
from incontext_diffusion.metrics.shapes import check_same_shape

METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "d1", "d2", "d3", "silog")
CROPS = ("nyu_eigen", "kitti_garg", "kitti_eigen")

# (top, bottom, left, right) as fractions of (H, H, W, W), as in the MetaPrompts evaluation code.
_KITTI_CROP_FRACTIONS = {
    "kitti_garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
    "kitti_eigen": (0.3324324, 0.91351351, 0.0359477, 0.96405229),
}


def _check_crop(crop: str | None) -> None:
    if crop is not None and crop not in CROPS:
        raise UserError(f"unknown depth crop {crop!r}: use one of {', '.join(CROPS)} or None")


def _as_batch(depth: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """(H, W), (B, H, W) or (B, 1, H, W) -> (B, H, W), dtype kept."""
    depth = torch.as_tensor(depth)
    if depth.ndim == 2:
        depth = depth.unsqueeze(0)
    elif depth.ndim == 4 and depth.shape[1] == 1:
        depth = depth.squeeze(1)
    if depth.ndim != 3:
        raise UserError(
            f"{name} depth has shape {tuple(depth.shape)}: pass (H, W), (B, H, W) or (B, 1, H, W) depth maps"
        )
    return depth


def depth_eval_mask(
    gt: torch.Tensor | np.ndarray,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    crop: str | None = None,
) -> torch.Tensor:
    """Boolean mask of the pixels that count: min_depth < gt < max_depth, inside `crop`.

    `gt` is (H, W) or batched like `depth_metrics`; the mask has the shape of `gt` as (B, H, W).
    """
    _check_crop(crop)
    gt = _as_batch(gt, "ground-truth")
    mask = (gt > min_depth) & (gt < max_depth)
    if crop is None:
        return mask
    height, width = gt.shape[-2:]
    crop_mask = torch.zeros_like(mask)
    if crop == "nyu_eigen":
        if (height, width) != (480, 640):
            raise UserError(
                f"the NYU Eigen crop needs 480x640 depth maps, got {height}x{width}: "
                "evaluate at the original NYUv2 resolution or pass crop=None"
            )
        crop_mask[:, 45:471, 41:601] = True
    else:
        top, bottom, left, right = _KITTI_CROP_FRACTIONS[crop]
        crop_mask[:, int(top * height) : int(bottom * height), int(left * width) : int(right * width)] = True
    return mask & crop_mask


def _image_errors(pred: torch.Tensor, gt: torch.Tensor, silog_lambda: float, silog_scale: float) -> torch.Tensor:
    """The metrics of one image from its valid pixels (1-D tensors), in METRIC_NAMES order."""
    ratio = torch.maximum(pred / gt, gt / pred)
    diff = pred - gt
    diff_log = torch.log(pred) - torch.log(gt)
    silog = torch.sqrt(diff_log.square().mean() - silog_lambda * diff_log.mean().square())
    return torch.stack(
        [
            (diff.abs() / gt).mean(),
            (diff.square() / gt).mean(),
            diff.square().mean().sqrt(),
            diff_log.square().mean().sqrt(),
            (torch.log10(pred) - torch.log10(gt)).abs().mean(),
            (ratio < 1.25).double().mean(),
            (ratio < 1.25**2).double().mean(),
            (ratio < 1.25**3).double().mean(),
            silog_scale * silog,
        ]
    )


def _per_image_errors(
    pred: torch.Tensor | np.ndarray,
    gt: torch.Tensor | np.ndarray,
    min_depth: float,
    max_depth: float,
    crop: str | None,
    clamp: bool,
    silog_lambda: float,
    silog_scale: float,
) -> torch.Tensor:
    """(B, len(METRIC_NAMES)) metrics, one row per image."""
    pred = _as_batch(pred, "predicted")
    gt = _as_batch(gt, "ground-truth").to(pred.device)
    check_same_shape(pred, gt, "predicted depth", "resize the prediction to the ground-truth resolution before evaluating")
    # As in MetaPrompts: inf -> max_depth, NaN -> min_depth, nothing else. The optional clamp
    # (ZoeDepth/Marigold) changes predictions outside [min_depth, max_depth] and keeps log(pred) finite.
    pred = torch.nan_to_num(pred.double(), nan=min_depth, posinf=max_depth, neginf=min_depth)
    if clamp:
        pred = pred.clamp(min_depth, max_depth)
    # The valid mask compares gt in its own dtype, as the official code does (float32 1e-3 is not
    # > 1e-3 in float32, but it is once cast to float64); the errors are then summed in float64.
    mask = depth_eval_mask(gt, min_depth, max_depth, crop)
    gt = gt.double()
    rows = []
    for i in range(gt.shape[0]):
        if not mask[i].any():
            raise UserError(
                f"depth image {i} has no valid ground-truth pixel in ({min_depth}, {max_depth}) m inside the "
                "crop: check that the ground truth is in metres and that min_depth/max_depth fit the dataset"
            )
        rows.append(_image_errors(pred[i][mask[i]], gt[i][mask[i]], silog_lambda, silog_scale))
    return torch.stack(rows)


def depth_metrics(
    pred: torch.Tensor | np.ndarray,
    gt: torch.Tensor | np.ndarray,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    crop: str | None = None,
    clamp: bool = False,
    silog_lambda: float = 0.5,
    silog_scale: float = 1.0,
) -> dict[str, float]:
    """Depth metrics of one map or a batch of maps (metres), each image weighted equally.

    Keys: abs_rel, sq_rel, rmse, rmse_log, log10, d1, d2, d3, silog. `crop` is None or one of
    CROPS; `clamp` clamps predictions to [min_depth, max_depth] (off by default, as in the
    official code: a prediction outside the range counts as it is).
    """
    errors = _per_image_errors(pred, gt, min_depth, max_depth, crop, clamp, silog_lambda, silog_scale)
    return dict(zip(METRIC_NAMES, errors.mean(dim=0).tolist()))


class DepthMetrics(Metric):
    """Accumulates per-image depth metrics over an evaluation set; `compute()` averages over images.

    A torchmetrics `Metric`, so the sums are reduced across processes under DDP/accelerate. Each
    image must be evaluated exactly once (a padded DistributedSampler counts duplicates).

    Example (NYUv2, MetaPrompts protocol):
        metrics = DepthMetrics(min_depth=1e-3, max_depth=10.0, crop="nyu_eigen")
        for pred, gt in loader: metrics.update(pred, gt)
        metrics.compute()  # {"abs_rel": ..., "rmse": ..., "d1": ..., ...}
    """

    full_state_update = False

    def __init__(
        self,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        crop: str | None = None,
        clamp: bool = False,
        silog_lambda: float = 0.5,
        silog_scale: float = 1.0,
    ) -> None:
        super().__init__()
        _check_crop(crop)
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.crop = crop
        self.clamp = clamp
        self.silog_lambda = silog_lambda
        self.silog_scale = silog_scale
        self.add_state("sums", torch.zeros(len(METRIC_NAMES), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray) -> None:
        errors = _per_image_errors(
            pred, gt, self.min_depth, self.max_depth, self.crop, self.clamp, self.silog_lambda, self.silog_scale
        )
        self.sums += errors.sum(dim=0).to(self.sums.device)
        self.num_images += errors.shape[0]

    def compute(self) -> dict[str, float]:
        if self.num_images == 0:
            raise UserError("no depth image was evaluated: call update(pred, gt) before compute()")
        return dict(zip(METRIC_NAMES, (self.sums / self.num_images).tolist()))
