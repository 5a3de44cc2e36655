"""RefCOCO readers (MDETR json, parquet), the polygon rasteriser, the pickle guard, synthetic expressions."""

import json
import pickle

import numpy as np
import pytest

from incontext_diffusion.core.images import save_image
from incontext_diffusion.data.refcoco import (
    MdetrRefExp,
    ParquetRefExp,
    expression_kind,
    load_refexp,
    load_refs_pickle,
    rasterize_polygons,
    synthetic_referring,
)
from incontext_diffusion.errors import UserError
from PIL import Image
from typer.testing import CliRunner

from incontext_diffusion.cli import app


class Canary:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture()
def refcoco_dir(tmp_path):
    """A 2-expression MDETR-style RefCOCO val split over two fake COCO images."""
    (tmp_path / "train2014").mkdir()
    save_image(Image.new("RGB", (40, 20), (255, 0, 0)), tmp_path / "train2014" / "COCO_train2014_000000000001.jpg")
    save_image(Image.new("RGB", (30, 30), (0, 0, 255)), tmp_path / "train2014" / "COCO_train2014_000000000002.jpg")
    data = {
        "images": [
            {"id": 0, "file_name": "COCO_train2014_000000000001.jpg", "height": 20, "width": 40, "caption": "the left half", "original_id": 1},
            {"id": 1, "file_name": "COCO_train2014_000000000002.jpg", "height": 30, "width": 30, "caption": "Middle square", "original_id": 2},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "bbox": [0, 0, 20, 20], "segmentation": [[0, 0, 20, 0, 20, 20, 0, 20]], "category_id": 1},
            {"id": 1, "image_id": 1, "bbox": [10, 10, 10, 10], "segmentation": [[10, 10, 20, 10, 20, 20, 10, 20]], "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "finetune_refcoco_val.json").write_text(json.dumps(data))
    return tmp_path


def test_rasterize_square_polygon():
    mask = rasterize_polygons([[0, 0, 10, 0, 10, 10, 0, 10]], height=20, width=20, size=20)
    # PIL fills the closed polygon including its edges: 11 x 11 pixels.
    assert mask.dtype == bool and mask.sum() == 121 and mask[0, 0] and not mask[11, 11]
    scaled = rasterize_polygons([[0, 0, 20, 0, 20, 20, 0, 20]], height=20, width=40, size=8)
    assert scaled[:, :4].all() and not scaled[:, 5:].any()  # left half of the square-resized image


def test_mdetr_reader(refcoco_dir):
    data = load_refexp("refcoco", str(refcoco_dir), "val", size=16)
    assert isinstance(data, MdetrRefExp) and len(data) == 2
    first, second = data[0], data[1]
    assert first.text == "the left half" and first.image.shape == (16, 16, 3) and np.abs(first.image[0, 0].astype(int) - [255, 0, 0]).max() <= 3  # JPEG
    assert first.box == (0.0, 0.0, 0.5, 1.0)
    assert first.mask[:, :8].mean() > 0.9 and not first.mask[:, 9:].any()
    assert second.box == pytest.approx((1 / 3, 1 / 3, 2 / 3, 2 / 3))
    with pytest.raises(UserError, match="finetune_refcoco"):
        load_refexp("refcoco", str(refcoco_dir), "testA", size=16)
    with pytest.raises(UserError, match="data.path"):
        load_refexp("refcoco", None, "val", size=16)


def test_parquet_reader(tmp_path):
    import datasets

    image = Image.new("RGB", (20, 10), (0, 255, 0))
    table = datasets.Dataset.from_dict(
        {"image": [image], "sentence": ["the green thing"], "bbox": [[5, 0, 10, 10]], "segmentation": [[[5, 0, 15, 0, 15, 10, 5, 10]]]},
        features=datasets.Features({
            "image": datasets.Image(), "sentence": datasets.Value("string"), "bbox": datasets.Sequence(datasets.Value("float32")),
            "segmentation": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
        }),
    )
    table.to_parquet(str(tmp_path / "val.parquet"))
    data = load_refexp("refcoco", str(tmp_path / "val.parquet"), "val", size=8)
    assert isinstance(data, ParquetRefExp) and len(data) == 1
    sample = data[0]
    assert sample.text == "the green thing" and sample.box == (0.25, 0.0, 0.75, 1.0) and sample.mask[:, 2:6].all()
    datasets.Dataset.from_dict({"image": [image], "bbox": [[0, 0, 1, 1]]}).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(UserError, match="lacks column"):
        ParquetRefExp(tmp_path / "bad.parquet")


def test_pickle_is_never_loaded_without_the_flag(tmp_path):
    canary = tmp_path / "code_ran"
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps(Canary(canary)))
    with pytest.raises(UserError, match="--trust-pickle"):
        load_refs_pickle(refs)
    assert not canary.exists()
    result = CliRunner().invoke(app, ["data", "refcoco-check", str(refs)])
    assert isinstance(result.exception, UserError) and "--trust-pickle" in str(result.exception) and not canary.exists()
    load_refs_pickle(refs, trust_pickle=True)
    assert canary.exists()  # with the flag the file is unpickled (and its code runs)


def test_synthetic_expressions_and_splits():
    samples = synthetic_referring(6, size=32, seed=1_000_000)
    assert samples and all(s.image.shape == (32, 32, 3) and s.mask.shape == (32, 32) for s in samples)
    for s in samples:
        x1, y1, x2, y2 = s.box
        rows, cols = np.nonzero(s.mask)
        assert (x1, y1) == (cols.min() / 32, rows.min() / 32) and (x2, y2) == ((cols.max() + 1) / 32, (rows.max() + 1) / 32)
    kinds = {s.kind for s in samples}
    assert kinds <= {"unique", "extreme", "relation"}
    unique = synthetic_referring(6, size=32, seed=1_000_000, split="unique")
    assert len(unique) == sum(s.kind == "unique" for s in samples)
    assert expression_kind("the cube left of the red sphere") == "relation" and expression_kind("the leftmost cube") == "extreme"
    with pytest.raises(UserError, match="split"):
        synthetic_referring(1, split="testA")
