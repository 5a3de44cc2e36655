"""Losses of MetaPrompts: scale-invariant log loss for depth; CE + Lovász-softmax for segmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def silog_loss(pred: torch.Tensor, gt: torch.Tensor, lam: float = 0.5, eps: float = 1e-7) -> torch.Tensor:
    """sqrt(mean(d^2) - lam * mean(d)^2), d = ln gt - ln pred over pixels with gt > 0 (official: lam 0.5, no x10)."""
    valid = gt > 0
    d = torch.log(gt[valid]) - torch.log(pred[valid].clamp_min(eps))
    return torch.sqrt((d.square().mean() - lam * d.mean().square()).clamp_min(0) + eps)


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted in decreasing order."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return jaccard


def lovasz_softmax(probabilities: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Lovász-softmax (Berman et al. 2018) over all pixels of the batch, averaged over the classes present.

    probabilities (B, C, H, W) after softmax; labels (B, H, W). As mmseg's LovaszLoss with
    multi_class, classes='present', per_image=False.
    """
    num_classes = probabilities.shape[1]
    probabilities = probabilities.permute(0, 2, 3, 1).reshape(-1, num_classes)
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    probabilities, labels = probabilities[valid], labels[valid]
    if labels.numel() == 0:
        return probabilities.sum() * 0.0
    losses = []
    for c in range(num_classes):
        foreground = (labels == c).to(probabilities.dtype)
        if foreground.sum() == 0:
            continue
        errors = (foreground - probabilities[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(foreground[order])))
    return torch.stack(losses).mean()


def segmentation_loss(logits: torch.Tensor, aux_logits: torch.Tensor, labels: torch.Tensor, aux_weight: float = 0.4,
                      ce_average: str = "valid") -> dict[str, torch.Tensor]:
    """Decode head CE + Lovász-softmax (weight 1 each) and auxiliary FCN CE (weight `aux_weight`).

    ce_average "valid" divides the CE sum by the labelled pixels; "all" by every pixel (ignored
    ones add 0), as mmseg 0.30's default does, so the CE weighs less where much is ignored.
    """
    def cross_entropy(x: torch.Tensor) -> torch.Tensor:
        per_pixel = F.cross_entropy(x.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")  # 0 where ignored
        return per_pixel.mean() if ce_average == "all" else per_pixel.sum() / (labels != IGNORE_INDEX).sum().clamp_min(1)

    ce = cross_entropy(logits)
    lovasz = lovasz_softmax(logits.float().softmax(dim=1), labels)
    aux = cross_entropy(aux_logits)
    return {"loss": ce + lovasz + aux_weight * aux, "ce": ce, "lovasz": lovasz, "aux_ce": aux}
