"""Perception dataset readers on few-sample fixtures written in each dataset's own format."""

import numpy as np
import pytest
import torch
from PIL import Image

from incontext_diffusion.data.perception import ADE20K, Cityscapes, KITTIDepth, NYUv2Depth, SynthDepth, SynthSegmentation
from incontext_diffusion.errors import UserError


def write_rgb(path, size, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_nyu_split_file(tmp_path):
    depth_mm = np.full((480, 640), 2500, np.uint16)
    depth_mm[0, 0] = 0
    (tmp_path / "kitchen").mkdir()
    write_rgb(tmp_path / "kitchen" / "rgb_00001.jpg", (640, 480))
    Image.fromarray(depth_mm).save(tmp_path / "kitchen" / "sync_depth_00001.png")
    (tmp_path / "nyu_test.txt").write_text("/kitchen/rgb_00001.jpg /kitchen/sync_depth_00001.png 518.8579\n")
    sample = NYUv2Depth(tmp_path / "nyu_test.txt")[0]
    assert sample["image"].shape == (3, 480, 640) and -1 <= sample["image"].min() <= sample["image"].max() <= 1
    assert sample["depth"].shape == (1, 480, 640)
    assert sample["depth"][0, 1, 1].item() == pytest.approx(2.5) and sample["depth"][0, 0, 0] == 0


def test_kitti_split_file_kb_crop_and_none_lines(tmp_path):
    h, w = 375, 1242
    depth = np.zeros((h, w), np.uint16)
    depth[-1, (w - 1216) // 2] = 256 * 20  # bottom-left corner of the KB crop: 20 m
    write_rgb(tmp_path / "2011_09_26" / "img.png", (w, h))
    (tmp_path / "gt").mkdir()
    Image.fromarray(depth).save(tmp_path / "gt" / "d.png")
    (tmp_path / "eigen_test.txt").write_text("2011_09_26/img.png gt/d.png 721.5\n2011_09_26/img.png None 721.5\n")
    dataset = KITTIDepth(tmp_path / "eigen_test.txt")
    assert len(dataset) == 1  # the line without ground truth is skipped
    sample = dataset[0]
    assert sample["image"].shape == (3, 352, 1216) and sample["depth"].shape == (1, 352, 1216)
    assert sample["depth"][0, -1, 0].item() == pytest.approx(20.0)


def test_ade20k_reduce_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    write_rgb(root / "images" / "validation" / "ADE_val_00000001.jpg", (8, 6))
    labels = np.array([[0, 1, 150, 7]] * 6, np.uint8).repeat(2, axis=1)
    (root / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(labels).save(root / "annotations" / "validation" / "ADE_val_00000001.png")
    sample = ADE20K(tmp_path, "validation")[0]
    assert sample["labels"][0].tolist() == [255, 255, 0, 0, 149, 149, 6, 6]
    assert sample["image"].shape == (3, 6, 8)
    resized = ADE20K(tmp_path, "validation", short_side=12)[0]
    assert resized["image"].shape == (3, 12, 16) and set(resized["labels"].unique().tolist()) == {255, 0, 149, 6}


def test_cityscapes_train_ids(tmp_path):
    write_rgb(tmp_path / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png", (4, 2))
    (tmp_path / "gtFine" / "val" / "frankfurt").mkdir(parents=True)
    Image.fromarray(np.array([[0, 18, 255, 3]] * 2, np.uint8)).save(tmp_path / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelTrainIds.png")
    dataset = Cityscapes(tmp_path, "val")
    assert len(dataset) == 1 and dataset.num_classes == 19
    assert dataset[0]["labels"][0].tolist() == [0, 18, 255, 3]


def test_missing_datasets_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="split file"):
        NYUv2Depth(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="ADEChallengeData2016"):
        ADE20K(tmp_path)
    with pytest.raises(UserError, match="leftImg8bit"):
        Cityscapes(tmp_path)


def test_synthetic_scenes_are_deterministic():
    depth, seg = SynthDepth(3, size=32, seed=5), SynthSegmentation(3, size=32, seed=5)
    a, b = depth[1], depth[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["depth"], b["depth"])
    assert a["depth"].shape == (1, 32, 32) and 0 < a["depth"].min() and a["depth"].max() < 10
    labels = seg[1]["labels"]
    assert labels.dtype == torch.int64 and labels.max() < 5 and torch.equal(seg[1]["image"], a["image"])
