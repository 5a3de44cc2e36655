"""Annotators (offline message, cache hit, resume) and the InstructPix2Pix reader, on tiny folders the tests write."""

import json

import numpy as np
import pytest
from PIL import Image

from incontext_diffusion.data import annotators
from incontext_diffusion.data.annotators import annotate_folder, load_annotator, map_path
from incontext_diffusion.data.ip2p import IP2PTriplets, split_folders
from incontext_diffusion.errors import UserError
from incontext_diffusion.recipes import load_task


def write_ip2p(root, folders=20, seeds=(11, 12), size=24):
    """An InstructPix2Pix-shaped folder: seeds.json, prompt.json and {seed}_{0,1}.jpg per folder."""
    rng = np.random.default_rng(0)
    entries = []
    for f in range(folders):
        folder = root / f"{f:04d}"
        folder.mkdir(parents=True)
        (folder / "prompt.json").write_text(json.dumps({"input": "a cat", "edit": "make it red", "output": f"a red cat {f}"}))
        for seed in seeds:
            for i in (0, 1):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{seed}_{i}.jpg")
        entries.append([folder.name, list(seeds)])
    (root / "seeds.json").write_text(json.dumps(entries))
    return root


def test_offline_annotator_fails_with_one_line_naming_the_weights(monkeypatch):
    import controlnet_aux

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.")

    monkeypatch.setattr(controlnet_aux.MidasDetector, "from_pretrained", offline)
    with pytest.raises(UserError) as err:
        load_annotator("depth")
    message = str(err.value)
    assert "\n" not in message and "dpt_hybrid-midas" in message and "synthscenes" in message
    with pytest.raises(UserError, match="unknown annotation task 'normals'"):
        load_annotator("normals")


def test_annotation_is_cached_and_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    root = write_ip2p(tmp_path / "ip2p", folders=2)
    calls = []

    def counting_canny(rgb):
        calls.append(rgb.shape)
        return annotators.canny(rgb)

    monkeypatch.setattr(annotators, "load_annotator", lambda task: counting_canny)
    images = sorted(root.rglob("*.jpg"))
    assert len(images) == 8  # _0 and _1 of two seeds in two folders
    # An interrupted earlier run left two maps behind: only the other six are computed.
    for image in images[:2]:
        map_path(image, "canny", root, None).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(map_path(image, "canny", root, None))
    annotate_folder(root, ["canny"])
    assert len(calls) == 6
    for image in images[2:]:
        expected = annotators.canny(np.asarray(Image.open(image).convert("RGB")))
        assert np.array_equal(np.asarray(Image.open(map_path(image, "canny", root, None))), expected)
    # A second run finds every map cached and computes nothing (map files are not annotated again).
    annotate_folder(root, ["canny"])
    assert len(calls) == 6 and "all 8 maps already cached" in capsys.readouterr().out
    cache = tmp_path / "cache"
    annotate_folder(root, ["canny"], cache)
    assert (cache / "0000" / "11_1_canny.png").is_file() and len(calls) == 14


def test_ip2p_triplets_follow_the_papers_sampling_and_split(tmp_path):
    root = write_ip2p(tmp_path / "ip2p")
    for image in root.rglob("*.jpg"):  # depth maps as `icd data annotate` writes them
        Image.fromarray(np.full((24, 24, 3), 7, np.uint8)).save(map_path(image, "depth", root, None))
    assert [len(split_folders([(str(i), [1]) for i in range(20)], s)) for s in ("train", "val", "test")] == [18, 1, 1]
    forward = IP2PTriplets(root, [load_task("image_to_depth")], "train", size=16)
    inverse = IP2PTriplets(root, [load_task("depth_to_image")], "test", size=16)
    assert len(forward) == 18 and len(inverse) == 1
    item = forward[3]
    assert item["caption"] == "depth map" and item["task"] == "image_to_depth"
    assert item["query"].shape == (16, 16, 3) and (item["target"] == 7).all()
    assert inverse[0]["caption"] == "a red cat 19" and (inverse[0]["query"] == 7).all()  # the last folder is the test split
    again = IP2PTriplets(root, [load_task("image_to_depth")], "train", size=16)[3]
    assert all(np.array_equal(item[k], again[k]) for k in ("example_source", "example_target", "query", "target"))
    with pytest.raises(IndexError):
        forward[18]
    for depth_map in (root / "0000").glob("*_depth.png"):
        depth_map.unlink()
    with pytest.raises(UserError, match="icd data annotate"):
        forward[0]
    with pytest.raises(UserError, match="no seeds.json"):
        IP2PTriplets(tmp_path, [load_task("image_to_depth")])
