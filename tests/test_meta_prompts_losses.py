"""MetaPrompts losses against hand-computed values, the metrics it reports, and its parameter groups."""

import math

import pytest
import torch

from incontext_diffusion.heads.meta_prompts.losses import lovasz_grad, lovasz_softmax, segmentation_loss, silog_loss
from incontext_diffusion.metrics import SegmentationMetrics, depth_metrics


def test_silog_hand_example():
    # d = ln gt - ln pred = [1, 0] on the valid pixels; the gt = 0 pixel is ignored
    pred = torch.tensor([1.0, math.e, 3.0])
    gt = torch.tensor([math.e, math.e, 0.0])
    # mean(d^2) = 0.5, mean(d) = 0.5 -> sqrt(0.5 - 0.5 * 0.25) = sqrt(0.375)
    assert silog_loss(pred, gt, lam=0.5).item() == pytest.approx(math.sqrt(0.375), abs=1e-4)
    assert silog_loss(pred, gt, lam=1.0).item() == pytest.approx(math.sqrt(0.25), abs=1e-4)
    # scale invariance at lambda 1: a global factor costs nothing
    assert silog_loss(gt[:2] * 2, gt[:2], lam=1.0).item() == pytest.approx(0.0, abs=1e-3)


def test_lovasz_grad_hand_example():
    # gt sorted [0, 1]: jaccard [0.5, 1] -> differences [0.5, 0.5]
    assert lovasz_grad(torch.tensor([0.0, 1.0])).tolist() == [0.5, 0.5]
    assert lovasz_grad(torch.tensor([1.0, 0.0])).tolist() == [1.0, 0.0]


def test_lovasz_softmax_hand_example():
    # 3 pixels: labels 0, 1 and one ignored; class 2 is absent (left out of the mean).
    probs = torch.tensor([[0.8, 0.2, 0.0], [0.4, 0.6, 0.0], [0.1, 0.1, 0.8]]).T.reshape(1, 3, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    # class 0: errors [0.2, 0.4] -> sorted [0.4 (bg), 0.2 (fg)], grad [0.5, 0.5] -> 0.3
    # class 1: errors [0.2, 0.4] -> sorted [0.4 (fg), 0.2 (bg)], grad [1, 0]     -> 0.4
    assert lovasz_softmax(probs, labels).item() == pytest.approx(0.35, abs=1e-6)
    # a perfect prediction costs 0
    perfect = torch.nn.functional.one_hot(torch.tensor([[[0, 1, 2]]]), 3).permute(0, 3, 1, 2).float()
    assert lovasz_softmax(perfect, torch.tensor([[[0, 1, 2]]])).item() == pytest.approx(0.0)


def test_segmentation_loss_weights_and_ignore():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    aux = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0] = 255
    parts = segmentation_loss(logits, aux, labels, aux_weight=0.4)
    assert parts["loss"].item() == pytest.approx((parts["ce"] + parts["lovasz"] + 0.4 * parts["aux_ce"]).item())
    expected_ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    assert parts["ce"].item() == pytest.approx(expected_ce.item())
    parts["loss"].backward()
    assert logits.grad[0, :, 0].abs().sum() == 0  # ignored pixels give no gradient


def test_cross_entropy_averaged_over_all_pixels_as_mmseg():
    # 1x2x1x4 logits, labels [0, 1, 255, 255]: per-pixel CE ln(1 + e^-2) at pixels 0 and 1 (both right by 2).
    logits = torch.tensor([[[[2.0, 0.0, 5.0, 5.0]], [[0.0, 2.0, 0.0, 0.0]]]])
    labels = torch.tensor([[[0, 1, 255, 255]]])
    pixel = math.log(1 + math.exp(-2))
    valid = segmentation_loss(logits, logits, labels, ce_average="valid")
    everything = segmentation_loss(logits, logits, labels, ce_average="all")
    assert valid["ce"].item() == pytest.approx(2 * pixel / 2)  # over the 2 labelled pixels
    assert everything["ce"].item() == pytest.approx(2 * pixel / 4)  # over all 4 (the official mmseg 0.30 default)
    assert everything["aux_ce"].item() == pytest.approx(2 * pixel / 4)
    assert everything["lovasz"].item() == pytest.approx(valid["lovasz"].item())  # Lovász ignores them either way


def test_depth_metrics_hand_example():
    pred = torch.tensor([[1.0, 2.0], [4.0, 1.0]])
    gt = torch.tensor([[1.0, 1.0], [4.0, 0.0]])  # the 0 pixel is invalid
    m = depth_metrics(pred, gt, max_depth=10.0)
    assert m["abs_rel"] == pytest.approx((0 + 1 + 0) / 3)
    assert m["d1"] == pytest.approx(2 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(1 / 3))


def test_miou_hand_example():
    metrics = SegmentationMetrics(num_classes=2)
    metrics.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 1, 255]]))
    # class 0: I 1, U 2 -> 0.5; class 1: I 1, U 2 -> 0.5
    assert metrics.compute()["mIoU"] == pytest.approx(0.5)
