"""Evaluation metrics shared by the heads: depth, segmentation, grounding and generation."""

from incontext_diffusion.metrics.depth import DepthMetrics, depth_eval_mask, depth_metrics
from incontext_diffusion.metrics.generation import FID, GenerationMetrics, PixelRMSE, pixel_rmse
from incontext_diffusion.metrics.grounding import GroundingRecall, box_iou, generalized_box_iou, mask_iou
from incontext_diffusion.metrics.segmentation import SegmentationMetrics

__all__ = [
    "FID",
    "DepthMetrics",
    "GenerationMetrics",
    "GroundingRecall",
    "PixelRMSE",
    "SegmentationMetrics",
    "box_iou",
    "depth_eval_mask",
    "depth_metrics",
    "generalized_box_iou",
    "mask_iou",
    "pixel_rmse",
]
