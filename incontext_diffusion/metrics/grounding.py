"""Referring-expression grounding metrics: box IoU/GIoU, R@k and the upper bound UB (diff_prompt.md §1).

The official evaluator (GLIP's `RefExpEvaluator`, inherited from MDETR) sorts a sample's boxes by
score and counts a hit at rank k when the best GIoU of the top k boxes against the ground truth is
>= 0.5; UB ("upper bound") counts a hit when any returned box reaches it. GIoU <= IoU, so this is
slightly stricter than the IoU >= 0.5 rule of the Flickr30k evaluator, which is reported alongside.
With several ground-truth boxes (Flickr30k "separate" GT) a box scores its best overlap with any.
"""

import numpy as np
import torch
from torchmetrics import Metric

from incontext_diffusion.errors import UserError
from incontext_diffusion.metrics.shapes import check_same_shape


def _as_boxes(boxes: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """(4,) or (N, 4) xyxy -> (N, 4) float64, checking x2 >= x1 and y2 >= y1."""
    boxes = torch.as_tensor(boxes, dtype=torch.float64)
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise UserError(f"{name} boxes have shape {tuple(boxes.shape)}: pass (4,) or (N, 4) xyxy boxes")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise UserError(
            f"{name} boxes must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1: "
            "convert COCO (x, y, w, h) boxes with x2 = x + w, y2 = y + h"
        )
    return boxes


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou_and_union(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = _area(boxes1)[:, None] + _area(boxes2)[None, :] - intersection
    # Two zero-area boxes have no overlap to speak of: IoU 0 rather than 0/0.
    return intersection / union.clamp(min=torch.finfo(union.dtype).tiny), union


def box_iou(boxes1: torch.Tensor | np.ndarray, boxes2: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M)."""
    boxes1 = _as_boxes(boxes1, "first")
    iou, _ = _iou_and_union(boxes1, _as_boxes(boxes2, "second").to(boxes1.device))
    return iou


def generalized_box_iou(boxes1: torch.Tensor | np.ndarray, boxes2: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes: IoU - (C - U) / C, C the smallest enclosing box; (N, M) in [-1, 1]."""
    boxes1 = _as_boxes(boxes1, "first")
    boxes2 = _as_boxes(boxes2, "second").to(boxes1.device)
    iou, union = _iou_and_union(boxes1, boxes2)
    top_left = torch.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    enclosing = (bottom_right - top_left).prod(dim=-1)
    return iou - (enclosing - union) / enclosing.clamp(min=torch.finfo(enclosing.dtype).tiny)


def mask_iou(pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray, threshold: float = 0.5) -> float:
    """Mean IoU of binary masks, (H, W) or (B, H, W) / (B, 1, H, W), each mask weighted equally.

    Float masks (e.g. a Mask-VAE reconstruction in [0, 1]) are binarised at `threshold`. Two empty
    masks agree perfectly and score 1.
    """
    pred = torch.as_tensor(pred)
    gt = torch.as_tensor(gt, device=pred.device)
    check_same_shape(pred, gt, "predicted mask", "resize the prediction to the ground-truth resolution")
    pred, gt = pred.float() > threshold, gt.float() > threshold
    if pred.ndim == 2:
        pred, gt = pred[None], gt[None]
    pred, gt = pred.flatten(1), gt.flatten(1)
    intersection = (pred & gt).sum(dim=1).double()
    union = (pred | gt).sum(dim=1).double()
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    return iou.mean().item()


class GroundingRecall(Metric):
    """R@k and UB over referring expressions, with GIoU >= threshold (official) and IoU >= threshold.

    `update` takes one sample: its predicted boxes (N, 4) xyxy, their scores (N,) or None when the
    boxes are already ranked best first, and its ground-truth box(es) (4,) or (M, 4). `compute`
    returns fractions in [0, 1]: "R@1", "R@5", "UB" (GIoU, the paper's numbers) and "R@1_iou",
    "R@5_iou", "UB_iou" (plain IoU). UB looks at every box given; the official head keeps 100.
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5), threshold: float = 0.5) -> None:
        super().__init__()
        self.ks = tuple(ks)
        self.threshold = threshold
        self.names = [f"R@{k}" for k in self.ks] + ["UB"]
        # hits[0] with GIoU, hits[1] with IoU; one column per k, then UB.
        self.add_state("hits", torch.zeros(2, len(self.names), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        pred_boxes: torch.Tensor | np.ndarray,
        gt_boxes: torch.Tensor | np.ndarray,
        scores: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        pred = _as_boxes(pred_boxes, "predicted")
        gt = _as_boxes(gt_boxes, "ground-truth").to(pred.device)
        if len(gt) == 0:
            raise UserError("a grounding sample has no ground-truth box: drop it from the evaluation set")
        if scores is not None:
            scores = torch.as_tensor(scores, device=pred.device).reshape(-1)
            if len(scores) != len(pred):
                raise UserError(f"{len(pred)} predicted boxes but {len(scores)} scores: pass one score per box")
            pred = pred[torch.argsort(scores, descending=True, stable=True)]
        hits = torch.zeros(2, len(self.names), dtype=torch.long, device=pred.device)
        if len(pred):
            for row, overlap in enumerate((generalized_box_iou(pred, gt), box_iou(pred, gt))):
                # A box scores its best overlap with any ground-truth box; a hit at k = any of the top k.
                is_hit = overlap.max(dim=1).values >= self.threshold
                for col, k in enumerate(self.ks):
                    hits[row, col] = is_hit[:k].any()
                hits[row, -1] = is_hit.any()
        self.hits += hits.to(self.hits.device)
        self.num_samples += 1

    def compute(self) -> dict[str, float]:
        if self.num_samples == 0:
            raise UserError("no grounding sample was evaluated: call update(...) before compute()")
        recall = (self.hits.double() / self.num_samples).tolist()
        return {**dict(zip(self.names, recall[0])), **{f"{name}_iou": r for name, r in zip(self.names, recall[1])}}
