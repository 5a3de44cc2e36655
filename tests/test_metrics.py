"""Metrics against small cases whose expected values are worked out by hand below."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from incontext_diffusion.errors import UserError
from incontext_diffusion.metrics import (
    FID,
    DepthMetrics,
    GenerationMetrics,
    GroundingRecall,
    SegmentationMetrics,
    box_iou,
    depth_eval_mask,
    depth_metrics,
    generalized_box_iou,
    mask_iou,
    pixel_rmse,
)

# ---------------------------------------------------------------------------------------------
# depth

# gt 1, 2, 4, 5 m; pred 1, 1, 5, 5 m -> errors 0, -1, +1, 0; ratios max(p/g, g/p) = 1, 2, 1.25, 1.
DEPTH_GT = torch.tensor([[1.0, 2.0], [4.0, 5.0]])
DEPTH_PRED = torch.tensor([[1.0, 1.0], [5.0, 5.0]])
LOG_DIFFS = [0.0, math.log(1 / 2), math.log(5 / 4), 0.0]
MEAN_SQ_LOG = (math.log(2) ** 2 + math.log(1.25) ** 2) / 4
MEAN_LOG = (math.log(1.25) - math.log(2)) / 4
EXPECTED_DEPTH = {
    "abs_rel": (0 + 1 / 2 + 1 / 4 + 0) / 4,
    "sq_rel": (0 + 1 / 2 + 1 / 4 + 0) / 4,
    "rmse": math.sqrt((0 + 1 + 1 + 0) / 4),
    "rmse_log": math.sqrt(MEAN_SQ_LOG),
    "log10": (math.log10(2) + math.log10(1.25)) / 4,
    "d1": 2 / 4,  # ratio 1.25 is not < 1.25 (strict), ratio 2 fails too
    "d2": 3 / 4,  # 1.25 < 1.5625, 2 is not
    "d3": 3 / 4,  # 2 >= 1.953125
    "silog": math.sqrt(MEAN_SQ_LOG - 0.5 * MEAN_LOG**2),  # MetaPrompts: lambda 0.5, no x100
}


def test_depth_metrics_hand_computed():
    result = depth_metrics(DEPTH_PRED, DEPTH_GT, max_depth=10.0)
    assert result.keys() == EXPECTED_DEPTH.keys()
    for name, expected in EXPECTED_DEPTH.items():
        assert result[name] == pytest.approx(expected, abs=1e-12), name
    assert MEAN_LOG == pytest.approx(sum(LOG_DIFFS) / 4)


def test_depth_silog_convention_is_a_parameter():
    result = depth_metrics(DEPTH_PRED, DEPTH_GT, max_depth=10.0, silog_lambda=1.0, silog_scale=100.0)
    assert result["silog"] == pytest.approx(100 * math.sqrt(MEAN_SQ_LOG - MEAN_LOG**2))


def test_depth_accepts_numpy_and_channel_dim():
    result = depth_metrics(DEPTH_PRED.numpy()[None, None], DEPTH_GT.numpy()[None, None], max_depth=10.0)
    assert result["abs_rel"] == pytest.approx(EXPECTED_DEPTH["abs_rel"])


def test_depth_averages_per_image_not_per_pixel():
    # Image B (1x3): only gt = 2 is valid (0 <= min_depth, 20 >= max_depth); pred 4 there.
    gt_b = torch.tensor([[2.0, 0.0, 20.0]])
    pred_b = torch.tensor([[4.0, 1.0, 1.0]])
    # B alone: abs_rel = |4 - 2| / 2 = 1, rmse = 2.
    metrics = DepthMetrics(max_depth=10.0)
    metrics.update(DEPTH_PRED, DEPTH_GT)
    metrics.update(pred_b, gt_b)
    result = metrics.compute()
    assert result["abs_rel"] == pytest.approx((0.1875 + 1.0) / 2)  # pooled over 5 pixels it would be 0.35
    assert result["rmse"] == pytest.approx((math.sqrt(0.5) + 2.0) / 2)
    # The functional form averages a batch the same way.
    batched = depth_metrics(torch.stack([DEPTH_PRED, torch.tensor([[4.0, 1.0], [1.0, 1.0]])]),
                            torch.stack([DEPTH_GT, torch.tensor([[2.0, 0.0], [0.0, 20.0]])]), max_depth=10.0)
    assert batched["abs_rel"] == pytest.approx((0.1875 + 1.0) / 2)


def test_depth_valid_range_is_strict():
    # float32 gt is compared in float32, as the official code does: 1e-3 is not > 1e-3 there.
    gt = torch.tensor([[1e-3, 0.5, 10.0]], dtype=torch.float32)
    mask = depth_eval_mask(gt, min_depth=1e-3, max_depth=10.0)
    assert mask.tolist() == [[[False, True, False]]]
    pred = torch.tensor([[5.0, 0.5, 5.0]])
    assert depth_metrics(pred, gt, max_depth=10.0)["abs_rel"] == 0.0


def test_depth_prediction_cleaning_and_clamp():
    gt = torch.tensor([[1.0, 2.0, 3.0]])
    pred = torch.tensor([[float("nan"), float("inf"), 0.1]])
    # As the official code: nan -> min 0.5, inf -> max 4, 0.1 kept: errors 0.5, 2, 2.9.
    result = depth_metrics(pred, gt, min_depth=0.5, max_depth=4.0)
    assert result["abs_rel"] == pytest.approx((0.5 / 1 + 2 / 2 + 2.9 / 3) / 3)
    # The optional clamp lifts 0.1 to 0.5: errors 0.5, 2, 2.5.
    clamped = depth_metrics(pred, gt, min_depth=0.5, max_depth=4.0, clamp=True)
    assert clamped["abs_rel"] == pytest.approx((0.5 / 1 + 2 / 2 + 2.5 / 3) / 3)


def test_depth_metrics_count_out_of_range_predictions_as_they_are():
    # gt 5 and 2 m inside (1e-3, 10); predictions 12 m (above max_depth) and 1 m.
    gt = torch.tensor([[5.0, 2.0]])
    pred = torch.tensor([[12.0, 1.0]])
    result = DepthMetrics(max_depth=10.0)
    result.update(pred, gt)
    values = result.compute()
    assert values["abs_rel"] == pytest.approx((7 / 5 + 1 / 2) / 2)  # clamped to 10 it would be (5/5 + 1/2) / 2
    assert values["sq_rel"] == pytest.approx((49 / 5 + 1 / 2) / 2)
    assert values["rmse"] == pytest.approx(math.sqrt((49 + 1) / 2))
    assert values["d3"] == pytest.approx(0.0)  # 12 / 5 = 2.4 and 2 / 1 = 2 are both >= 1.25^3 = 1.953
    assert depth_metrics(pred, gt, max_depth=10.0, clamp=True)["abs_rel"] == pytest.approx((5 / 5 + 1 / 2) / 2)


def test_nyu_eigen_crop():
    mask = depth_eval_mask(torch.ones(480, 640), max_depth=10.0, crop="nyu_eigen")[0]
    expected = torch.zeros(480, 640, dtype=torch.bool)
    expected[45:471, 41:601] = True
    assert torch.equal(mask, expected)
    assert mask.sum() == 426 * 560
    with pytest.raises(UserError, match="480x640"):
        depth_eval_mask(torch.ones(240, 320), crop="nyu_eigen")


def test_kitti_crops():
    gt = torch.ones(352, 1216)
    garg = depth_eval_mask(gt, max_depth=80.0, crop="kitti_garg")[0]
    # int(0.40810811 * 352) = int(143.65) = 143, int(0.99189189 * 352) = int(349.15) = 349,
    # int(0.03594771 * 1216) = int(43.71) = 43, int(0.96405229 * 1216) = int(1172.29) = 1172.
    expected = torch.zeros(352, 1216, dtype=torch.bool)
    expected[143:349, 43:1172] = True
    assert torch.equal(garg, expected)
    eigen = depth_eval_mask(gt, max_depth=80.0, crop="kitti_eigen")[0]
    # int(0.3324324 * 352) = int(117.02) = 117, int(0.91351351 * 352) = int(321.56) = 321.
    expected = torch.zeros(352, 1216, dtype=torch.bool)
    expected[117:321, 43:1172] = True
    assert torch.equal(eigen, expected)


def test_crop_and_valid_range_combine():
    gt = torch.ones(352, 1216)
    gt[200, 500] = 0.0  # invalid pixel inside the crop
    mask = depth_eval_mask(gt, max_depth=80.0, crop="kitti_garg")
    assert mask.sum() == 206 * 1129 - 1


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_depth_user_errors():
    with pytest.raises(UserError, match="differ in shape"):
        depth_metrics(torch.ones(2, 2), torch.ones(2, 3))
    with pytest.raises(UserError, match="no valid ground-truth pixel"):
        depth_metrics(torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(UserError, match="unknown depth crop"):
        DepthMetrics(crop="garg")
    with pytest.raises(UserError, match="call update"):
        DepthMetrics().compute()


# ---------------------------------------------------------------------------------------------
# segmentation

# Valid pixels (gt != 255), as (gt, pred): (0,0) (0,1) (1,1) | (2,2) (2,0) (1,1).
# class 0: TP 1, gt 2, pred 2 -> IoU 1/3;  class 1: TP 2, gt 2, pred 3 -> 2/3;
# class 2: TP 1, gt 2, pred 1 -> 1/2.  mIoU = 1/2, pixel accuracy 4/6.
SEG_GT = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 255]])
SEG_PRED = torch.tensor([[0, 1, 1, 0], [2, 0, 1, 2]])


def test_miou_hand_computed_and_ignore_index():
    metrics = SegmentationMetrics(num_classes=3)
    metrics.update(SEG_PRED, SEG_GT)
    result = metrics.compute()
    assert result["mIoU"] == pytest.approx(0.5)
    assert result["aAcc"] == pytest.approx(4 / 6)
    assert metrics.per_class_iou() == pytest.approx([1 / 3, 2 / 3, 1 / 2])


def test_installed_torchmetrics_ignores_255_with_few_classes():
    # The fact the wrapper builds on: 255 > num_classes is dropped, not an error.
    jaccard = MulticlassJaccardIndex(num_classes=3, average="macro", ignore_index=255)
    assert jaccard(SEG_PRED, SEG_GT).item() == pytest.approx(0.5)


def test_miou_is_dataset_level_and_skips_absent_classes():
    # image 1 (4 px): gt 0 0 0 0, pred 0 0 0 1;  image 2 (1 px): gt 1, pred 1.
    # Whole set: class 0 TP 3, gt 4, pred 3 -> 3/4; class 1 TP 1, gt 1, pred 2 -> 1/2; mIoU 5/8.
    # (Per-image averaging would give (3/8 + 1) / 2 = 11/16.) Class 2 never appears: not averaged.
    metrics = SegmentationMetrics(num_classes=3)
    metrics.update(np.array([[0, 0, 0, 1]]), np.array([[0, 0, 0, 0]]))
    metrics.update(torch.tensor([[1]]), torch.tensor([[1]]))
    assert metrics.compute()["mIoU"] == pytest.approx(5 / 8)
    per_class = metrics.per_class_iou()
    assert per_class[:2] == pytest.approx([3 / 4, 1 / 2]) and math.isnan(per_class[2])
    metrics.reset()
    metrics.update(SEG_PRED, SEG_GT)
    assert metrics.compute()["mIoU"] == pytest.approx(0.5)


def test_segmentation_user_errors():
    metrics = SegmentationMetrics(num_classes=3)
    # torchmetrics would silently count label 5 as class 2; the wrapper refuses it.
    with pytest.raises(UserError, match="predicted labels outside"):
        metrics.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(UserError, match="ground-truth labels outside"):
        metrics.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(UserError, match="differ in shape"):
        metrics.update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(UserError, match="integer"):
        metrics.update(torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(UserError, match="is a class id"):
        SegmentationMetrics(num_classes=300)
    # A prediction of 255 on an ignored pixel is fine.
    metrics.update(torch.tensor([0, 255]), torch.tensor([0, 255]))
    assert metrics.compute()["mIoU"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# grounding


def test_box_iou_and_giou_hand_computed():
    boxes1 = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    boxes2 = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    iou = box_iou(boxes1, boxes2)
    giou = generalized_box_iou(boxes1, boxes2)
    assert iou.shape == giou.shape == (2, 2)
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7, enclosing 3x3 = 9.
    assert iou[0, 0].item() == pytest.approx(1 / 7)
    assert giou[0, 0].item() == pytest.approx(1 / 7 - (9 - 7) / 9)
    # [0,0,1,1] vs [2,0,3,1]: disjoint, union 2, enclosing 3x1 = 3.
    assert iou[1, 1].item() == 0.0
    assert giou[1, 1].item() == pytest.approx(-1 / 3)
    assert generalized_box_iou([0, 0, 5, 5], [0, 0, 5, 5]).item() == pytest.approx(1.0)


# gt [0,0,10,10] vs [2,2,12,11]: intersection 8x8 = 64, union 100 + 90 - 64 = 126, enclosing 12x11 = 132:
# IoU 64/126 = 0.508 >= 0.5 but GIoU 64/126 - 6/132 = 0.462 < 0.5.
GT = [0.0, 0.0, 10.0, 10.0]
BORDERLINE = [2.0, 2.0, 12.0, 11.0]
HIT = [0.0, 0.0, 10.0, 9.0]  # IoU = GIoU = 0.9
MISS = [20.0, 20.0, 30.0, 30.0]


def test_borderline_box_iou_vs_giou():
    assert box_iou([BORDERLINE], [GT]).item() == pytest.approx(64 / 126)
    assert generalized_box_iou([BORDERLINE], [GT]).item() == pytest.approx(64 / 126 - 6 / 132)


def test_grounding_recall_hand_computed():
    recall = GroundingRecall()
    # 1: hit at rank 2 (boxes given out of order: the scores rank MISS first) -> R@1 no, R@5 yes.
    recall.update([HIT, MISS], GT, scores=[0.8, 0.9])
    # 2: hit at rank 6 only -> UB only.
    recall.update([MISS] * 5 + [HIT], GT, scores=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # 3: hit at rank 1; no scores = already ranked.
    recall.update([HIT, MISS], GT)
    # 4: only the borderline box: a hit with IoU, a miss with GIoU.
    recall.update([BORDERLINE], GT, scores=[0.9])
    result = recall.compute()
    assert result == pytest.approx(
        {"R@1": 1 / 4, "R@5": 2 / 4, "UB": 3 / 4, "R@1_iou": 2 / 4, "R@5_iou": 3 / 4, "UB_iou": 4 / 4}
    )


def test_grounding_multiple_gt_and_empty_predictions():
    recall = GroundingRecall(ks=(1,))
    recall.update([HIT], [MISS, GT])  # best overlap over all ground-truth boxes
    recall.update(torch.zeros(0, 4), GT)  # nothing predicted: a miss
    assert recall.compute() == pytest.approx({"R@1": 0.5, "UB": 0.5, "R@1_iou": 0.5, "UB_iou": 0.5})


def test_grounding_user_errors():
    with pytest.raises(UserError, match="x2 >= x1"):
        box_iou([[5.0, 0.0, 1.0, 1.0]], [GT])
    with pytest.raises(UserError, match="scores"):
        GroundingRecall().update([HIT, MISS], GT, scores=[0.5])
    with pytest.raises(UserError, match="shape"):
        box_iou([[0.0, 0.0, 1.0]], [GT])


def test_mask_iou():
    pred = torch.tensor([[1, 1], [0, 0]])
    gt = torch.tensor([[1, 0], [1, 0]])
    assert mask_iou(pred, gt) == pytest.approx(1 / 3)  # intersection 1, union 3
    reconstruction = torch.tensor([[0.9, 0.6], [0.2, 0.4]])  # binarised at 0.5 -> same as pred
    assert mask_iou(reconstruction, gt) == pytest.approx(1 / 3)
    # batch: (1/3 + 1) / 2, the second pair being two empty masks
    assert mask_iou(torch.stack([pred, torch.zeros(2, 2)]), torch.stack([gt, torch.zeros(2, 2)])) == pytest.approx(2 / 3)
    with pytest.raises(UserError, match="differ in shape"):
        mask_iou(torch.zeros(2, 2), torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------
# generation


def _constant(value: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.uint8)


def test_pixel_rmse_is_sqrt_of_mean_per_image_mse():
    # 51/255 = 0.2 everywhere -> MSE 0.04; 102/255 = 0.4 -> 0.16.
    generated = torch.stack([_constant(51, (1, 2, 2)), _constant(102, (1, 2, 2))])
    assert pixel_rmse(generated, torch.zeros_like(generated)) == pytest.approx(math.sqrt((0.04 + 0.16) / 2))
    # all channels: one channel off by 0.2 out of three -> MSE 0.04 / 3
    rgb = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    rgb[:, 0] = 51
    assert pixel_rmse(rgb, torch.zeros_like(rgb)) == pytest.approx(math.sqrt(0.04 / 3))


def test_generation_metrics_per_image_over_batches_of_different_sizes():
    metrics = GenerationMetrics()
    # image 1 (16x16): 0.4 vs 0.2 -> MSE 0.04; image 2 (32x32): 0.4 vs 0 -> MSE 0.16.
    metrics.update(_constant(102, (1, 1, 16, 16)), _constant(51, (1, 1, 16, 16)))
    metrics.update(_constant(102, (1, 1, 32, 32)), _constant(0, (1, 1, 32, 32)))
    result = metrics.compute()
    # Pooled over pixels it would be sqrt((0.04 * 256 + 0.16 * 1024) / 1280) = 0.369.
    assert result["rmse"] == pytest.approx(math.sqrt((0.04 + 0.16) / 2))
    assert result["psnr"] == pytest.approx((10 * math.log10(1 / 0.04) + 10 * math.log10(1 / 0.16)) / 2, rel=1e-5)
    # SSIM of constant images a, b: (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2; the contrast term is 1.
    ssim_1 = (2 * 0.4 * 0.2 + 1e-4) / (0.4**2 + 0.2**2 + 1e-4)
    ssim_2 = (2 * 0.4 * 0.0 + 1e-4) / (0.4**2 + 0.0**2 + 1e-4)
    assert result["ssim"] == pytest.approx((ssim_1 + ssim_2) / 2, abs=1e-4)


def test_generation_user_errors():
    with pytest.raises(UserError, match="uint8"):
        pixel_rmse(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.raises(UserError, match="differ in shape"):
        pixel_rmse(_constant(0, (1, 3, 4, 4)), _constant(0, (1, 3, 4, 5)))


def test_fid_without_weights_fails_fast_and_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("FID tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(UserError, match=r"^FID needs Inception weights: pass --inception-weights PATH \("):
        FID()
    with pytest.raises(UserError, match="not found"):
        FID(feature_extractor_weights_path=tmp_path / "missing.pth")


class MeanPixel(torch.nn.Module):
    """One feature per image: its mean pixel value."""

    num_features = 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3))[:, None]


def test_fid_plumbing_with_injected_extractor():
    # 1-d features: FID = (mu_r - mu_g)^2 + (sigma_r - sigma_g)^2.
    # real means 0, 2 -> mu 1, var 2; generated means 4, 8 -> mu 6, var 8: 25 + (sqrt 2 - sqrt 8)^2 = 27.
    fid = FID(feature_extractor=MeanPixel())
    fid.update(torch.stack([_constant(0, (3, 8, 8)), _constant(2, (3, 8, 8))]), real=True)
    fid.update(_constant(4, (1, 3, 8, 8)), real=False)
    with pytest.raises(UserError, match="at least 2"):
        fid.compute()
    fid.update(_constant(8, (1, 3, 8, 8)), real=False)
    assert fid.compute() == pytest.approx(27.0, rel=1e-5)


def test_drawn_shape_counts_object_pixels_only():
    from incontext_diffusion.metrics.generation import drawn_shape, shape_agreement

    classes = ("floor", "wall", "sphere", "cube", "cylinder")
    labels = np.zeros((4, 4), np.uint8)  # all floor
    assert drawn_shape(labels, classes) is None
    labels[0, :3] = 1  # wall pixels never count, however many
    labels[1, :2] = 3  # two cube pixels
    labels[2, :1] = 4  # one cylinder pixel
    assert drawn_shape(labels, classes) == "cube"
    cylinder = np.full((4, 4), 4, np.uint8)
    # one of the two captions is met: 0.5
    assert shape_agreement([labels, cylinder], ["cube", "sphere"], classes) == 0.5
    with pytest.raises(ValueError):
        shape_agreement([labels], ["cube", "sphere"], classes)
