"""The one reader of exported folders (core/model_folder.py) and the speed every eval records (metrics/speed.py)."""

import json

import pytest

from incontext_diffusion.core import model_folder
from incontext_diffusion.core.model_folder import ASSETS, load_pipeline, read_model_folder, resolve_model, shipped_models
from incontext_diffusion.errors import UserError
from incontext_diffusion.metrics import speed
from incontext_diffusion.metrics.speed import SpeedMeter


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_a_folder_without_model_index_is_refused(tmp_path):
    one_line_error(lambda: read_model_folder(tmp_path), f"{tmp_path} is not an exported model folder (no model_index.json)")


def test_broken_json_and_a_missing_class_name_are_refused(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "X",')
    one_line_error(lambda: read_model_folder(tmp_path), "model_index.json is not valid JSON", "re-export the model")
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    one_line_error(lambda: read_model_folder(tmp_path), "names no pipeline class (`_class_name`)")


def test_broken_recipe_yaml_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "recipe.yaml").write_text("head: tiny_ldm\ntrain: [unclosed\n")
    one_line_error(lambda: read_model_folder(tmp_path), "recipe.yaml is not valid YAML")
    (tmp_path / "recipe.yaml").write_text("description: d\nhead: tiny_ldm\ntrain: {max_stepz: 3}\n")
    one_line_error(lambda: read_model_folder(tmp_path), "unknown key 'train.max_stepz'", "did you mean 'train.max_steps'")


def test_the_recipe_comes_back_validated_with_its_defaults(tmp_path):
    index = {"_class_name": "StableDiffusionPipeline", "_inference_defaults": {"num_inference_steps": 9}}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "recipe.yaml").write_text("description: d\nhead: tiny_ldm\ndata: {size: 32}\ntrain: {max_steps: 7}\n")
    folder = read_model_folder(tmp_path)
    assert (folder.path, folder.class_name, folder.index) == (tmp_path, "StableDiffusionPipeline", index)
    assert (folder.recipe.head, folder.recipe.data.size, folder.recipe.train.max_steps) == ("tiny_ldm", 32, 7)
    assert (folder.recipe.data.source, folder.recipe.train.batch_size) == ("synthscenes", 8)  # the schema's defaults
    (tmp_path / "recipe.yaml").unlink()
    assert read_model_folder(tmp_path).recipe is None  # a folder made elsewhere


def test_short_names_resolve_to_assets_and_the_error_lists_the_shipped_ones(tmp_path, monkeypatch):
    assert "tiny-ldm" in shipped_models()
    assert resolve_model("tiny-ldm") == ASSETS / "tiny-ldm"
    assert resolve_model(tmp_path) == tmp_path  # an existing folder is itself
    one_line_error(lambda: resolve_model("tiny-ldn"), "model 'tiny-ldn' is neither a folder nor a shipped model", "tiny-ldm")
    # A folder under assets/ without model_index.json is not a shipped model.
    fake_assets = tmp_path / "assets"
    (fake_assets / "a-model").mkdir(parents=True)
    (fake_assets / "a-model" / "model_index.json").write_text("{}")
    (fake_assets / "samples").mkdir()
    monkeypatch.setattr(model_folder, "ASSETS", fake_assets)
    assert shipped_models() == ["a-model"]
    one_line_error(lambda: resolve_model("samples"), "pass RUN_DIR/model or one of a-model")


def test_load_pipeline_gives_the_class_the_folder_names():
    pipe = load_pipeline("tiny-ldm")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.config.in_channels == 4
    one_line_error(lambda: load_pipeline(ASSETS / "samples"), "no model_index.json")


def test_images_per_second_with_a_patched_clock(monkeypatch):
    ticks = iter([10.0, 12.0, 20.0, 21.0])  # two timed calls: 2 s and 1 s
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(ticks))
    meter = SpeedMeter("cpu", batch_size=4)
    with meter.timed(4):
        pass
    with meter.timed(2):
        pass
    results = meter.results()
    assert results["images_per_second"] == pytest.approx(6 / 3)
    assert (results["device"], results["dtype"], results["batch_size"]) == ("cpu", "float32", 4)
    assert results["peak_memory_mb"] > 0
    assert SpeedMeter().results()["images_per_second"] == 0.0  # nothing timed
