"""Semantic segmentation metrics: dataset-level mIoU as mmseg computes it (meta_prompts.md §3.2).

torchmetrics' `MulticlassJaccardIndex(average="macro", ignore_index=255)` accumulates one
confusion matrix over the whole set; classes absent from both predictions and ground truth are left
out of the mean (ecosystem.md §4.2). Not `torchmetrics.segmentation.MeanIoU`, which averages
per-image IoUs and has no ignore index.

torchmetrics 1.9 does not check label ranges the way a user would hope: a prediction label
>= num_classes is silently counted as another class (e.g. label 5 with 3 classes lands on class 2),
and out-of-range ground truth or a 255 prediction on a valid pixel fails with an opaque reshape
error. `SegmentationMetrics.update` therefore checks the ranges itself.
"""

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from incontext_diffusion.errors import UserError
from incontext_diffusion.metrics.shapes import check_same_shape


class SegmentationMetrics:
    """mIoU, pixel accuracy and per-class IoU over an evaluation set, from integer label maps.

    Values are fractions in [0, 1] (papers print x100). Ground-truth pixels equal to `ignore_index`
    are excluded. The confusion matrix is reduced across processes under DDP/accelerate.

    Example (ADE20K, labels already reduced to 0..149 with 255 = void):
        metrics = SegmentationMetrics(num_classes=150)
        for pred, gt in loader: metrics.update(pred.argmax(1), gt)
        metrics.compute()  # {"mIoU": ..., "aAcc": ...}
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        # An ignore index inside [0, num_classes) would also drop that class from the macro mean.
        if 0 <= ignore_index < num_classes:
            raise UserError(
                f"ignore_index {ignore_index} is a class id with num_classes={num_classes}: "
                "use an ignore index outside [0, num_classes), e.g. 255 with fewer than 255 classes"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # The two Jaccard metrics share one confusion-matrix state (a torchmetrics compute group).
        self.metrics = MetricCollection(
            {
                "mIoU": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
                "per_class_iou": MulticlassJaccardIndex(
                    num_classes, average="none", ignore_index=ignore_index, zero_division=float("nan")
                ),
                "aAcc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
            }
        )

    def update(self, pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray) -> None:
        """Add a batch of predicted and ground-truth label maps, both (H, W) or (B, H, W) integers."""
        pred = torch.as_tensor(pred)
        gt = torch.as_tensor(gt, device=pred.device)
        check_same_shape(pred, gt, "predicted labels", "pass class labels (argmax over the class dimension) at the ground-truth resolution")
        if pred.is_floating_point() or gt.is_floating_point():
            raise UserError("segmentation labels must be integer tensors: pass argmax labels, not logits or images")
        valid = gt != self.ignore_index
        pred_valid, gt_valid = pred[valid], gt[valid]
        if pred_valid.numel() == 0:
            return  # every pixel is ignored: nothing to count
        if pred_valid.min() < 0 or pred_valid.max() >= self.num_classes:
            raise UserError(
                f"predicted labels outside [0, {self.num_classes}) on valid pixels: "
                "check num_classes and that the prediction is an argmax over the class dimension"
            )
        if gt_valid.min() < 0 or gt_valid.max() >= self.num_classes:
            raise UserError(
                f"ground-truth labels outside [0, {self.num_classes}) and != {self.ignore_index}: "
                "check num_classes and the label mapping (e.g. ADE20K's reduce_zero_label: 0 -> 255, c -> c-1)"
            )
        self.metrics.to(pred.device)
        self.metrics.update(pred.long(), gt.long())

    def compute(self) -> dict[str, float]:
        """{"mIoU": mean IoU over the classes present, "aAcc": pixel accuracy}."""
        values = self.metrics.compute()
        return {"mIoU": values["mIoU"].item(), "aAcc": values["aAcc"].item()}

    def per_class_iou(self) -> list[float]:
        """IoU of each class; NaN for a class absent from both predictions and ground truth."""
        return self.metrics["per_class_iou"].compute().tolist()

    def reset(self) -> None:
        self.metrics.reset()
