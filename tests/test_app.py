"""`icd app`: each tab's function on micro models made by the recipes, then the app through Gradio's own client."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

pytest.importorskip("gradio", reason="the app's extra is not installed: pip install 'incontext_diffusion[app]'")

from cli_helpers import free_port  # noqa: E402
from incontext_diffusion import app  # noqa: E402
from incontext_diffusion.core.components import save_components  # noqa: E402
from incontext_diffusion.core.head import load_head  # noqa: E402
from incontext_diffusion.core.images import depth_to_uint16, load_map, load_rgb, save_image  # noqa: E402
from incontext_diffusion.core.tiny import micro_components  # noqa: E402
from incontext_diffusion.data.synthscenes import caption_vocabulary  # noqa: E402
from incontext_diffusion.core.trainer import train  # noqa: E402
from incontext_diffusion.data.synthscenes import render_scene  # noqa: E402
from incontext_diffusion.errors import UserError  # noqa: E402
from incontext_diffusion.heads.prompt_diffusion.data import synthetic_triplet  # noqa: E402
from incontext_diffusion.recipes import list_tasks, load_recipe, load_task  # noqa: E402

torch.set_num_threads(1)  # the 2 shared cores are busy: one thread is faster here
MICRO = ["data.num_samples=8", "train.max_steps=1", "train.batch_size=2", "train.validate_every=100", "train.checkpoint_every=1", "train.log_every=1"]


def build_micro_models(root: Path) -> dict[str, Path]:
    """One micro model per tab, each made by its head's tiny recipe on a random micro backbone."""
    def run(recipe: str, name: str, *overrides: str) -> Path:
        out = train(load_head(load_recipe(recipe, [*MICRO, f"output_dir={root / name}", *overrides])))
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return out

    backbone = root / "backbone"  # a StableDiffusionPipeline folder: the text-to-image tab's model too
    save_components(micro_components(caption_vocabulary(), root / "tokenizer"), backbone)
    mp = [f"backbone={backbone}", "data.held_out=2", "model.num_prompts=4"]
    mask_vae = run("diff_prompt_mask_vae-tiny", "mask_vae", "model.block_out_channels=[4, 8]")
    dit = run("diff_prompt_dit-tiny", "dit", f"model.mask_vae={mask_vae}", "model.patch_size=4", "model.hidden_size=16", "model.clip_width=16",
              "model.depth=1", "model.num_heads=2", "model.ddim_steps=4")
    host = run("grounding_host-tiny", "host", "model.embed_dim=8", "model.num_heads=[2, 2]", "model.bert_width=8", "model.bert_layers=2", "model.head_dim=8")
    return {
        "text_to_image": backbone,
        "in_context": run("prompt_diffusion-tiny", "pd", f"backbone={backbone}", "data.size=64", "model.validation_steps=1"),
        "depth": run("meta_prompts_depth-tiny", "depth", *mp, "model.decoder_channels=8", "model.deconv_filters=8"),
        "segmentation": run("meta_prompts_seg-tiny", "seg", *mp, "model.channels=8", "model.auxiliary_channels=8"),
        "grounding": run("diff_prompt_grounding-tiny", "dp", f"model.host={host}", f"model.prompt_generator={dit}", "model.depth=2",
                         "model.base_channels=2", "model.ddim_steps=4"),
    }


@pytest.fixture(scope="session")
def micro_models(tmp_path_factory) -> dict[str, Path]:
    return build_micro_models(tmp_path_factory.mktemp("app_models"))


@pytest.fixture(scope="module")
def models(micro_models) -> app.Models:
    return app.Models(app.find_models(list(micro_models.values())))


@pytest.fixture()
def scene_png(tmp_path) -> Path:
    """A held-out scene, 64x64 (the depth and segmentation models' training size)."""
    path = tmp_path / "scene.png"
    save_image(Image.fromarray(render_scene(1_000_007, 64).rgb), path)
    return path


def test_models_are_sorted_into_tabs_by_their_pipeline(micro_models, tmp_path):
    found = app.find_models(list(micro_models.values()))
    assert {capability: folder.path for capability, folder in found.items()} == micro_models
    with pytest.raises(UserError, match="two depth models"):
        app.find_models([micro_models["depth"], micro_models["depth"]])
    mask_vae = micro_models["grounding"].parent.parent / "mask_vae" / "model"  # a stage-1 folder: no tab shows it
    with pytest.raises(UserError, match="DiffPromptMaskVAE, which the app does not show"):
        app.find_models([mask_vae])
    with pytest.raises(UserError, match="neither a folder nor a shipped model"):
        app.find_models(["no-such-model"])
    only_depth = app.Models(app.find_models([micro_models["depth"]]))
    assert only_depth.missing("depth") is None
    assert "icd train --recipe prompt_diffusion-tiny" in only_depth.missing("in_context")
    with pytest.raises(UserError, match="No grounding model loaded"):
        app.grounding(only_depth, Path(__file__).parents[1] / "assets" / "samples" / "coffee_cc0.png", "the cube")


def test_depth_tab_files_hold_the_pipelines_predictions(models, scene_png, tmp_path):
    result = app.depth_and_segmentation(models, scene_png, tmp_path / "out")
    photo = load_rgb(scene_png)
    depth = models.pipeline("depth")(photo).prediction[0, :, :, 0]  # the pipeline itself
    np.testing.assert_array_equal(load_map(result.depth_png), depth_to_uint16(depth, 1000.0))  # millimetres, 16 bit
    assert load_map(result.depth_png).dtype == np.uint16 and result.depth_colored.size == (64, 64)
    labels = models.pipeline("segmentation")(photo).prediction[0]
    np.testing.assert_array_equal(load_map(result.labels_png), labels)
    assert np.array_equal(np.asarray(result.overlay), np.asarray(models.pipeline("segmentation").image_processor.overlay_segmentation(photo, labels)))


def test_depth_tab_answers_at_the_inputs_size(models, tmp_path):
    wide = tmp_path / "wide.png"
    save_image(Image.fromarray(render_scene(1_000_008, 96).rgb).resize((120, 80)), wide)
    result = app.depth_and_segmentation(models, wide, tmp_path / "out")
    assert result.depth.shape == (80, 120) and load_map(result.depth_png).shape == (80, 120)
    assert load_map(result.labels_png).shape == (80, 120) and result.overlay.size == (120, 80)


def test_in_context_tab_is_the_pipeline_with_progress(models, tmp_path):
    triplet = synthetic_triplet(1_000_000, load_task("image_to_depth"), 64, "layout")
    paths = []
    for key in ("example_source", "example_target", "query"):
        paths.append(tmp_path / f"{key}.png")
        save_image(Image.fromarray(triplet[key]), paths[-1])
    seen = []
    output = app.in_context(models, *paths, prompt="", steps=3, guidance=2.0, seed=5, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    pipe = models.pipeline("in_context")
    direct = pipe("", triplet["query"], [triplet["example_source"], triplet["example_target"]], num_inference_steps=3, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(5)).images[0]
    assert output.size == (64, 64) and np.array_equal(np.asarray(output), np.asarray(direct))
    other_seed = app.in_context(models, *paths, prompt="", steps=3, guidance=2.0, seed=6)
    assert not np.array_equal(np.asarray(other_seed), np.asarray(output))


def test_grounding_tab_gives_the_box_score_mask_and_trajectory(models, tmp_path):
    scene = render_scene(1_000_003, 32)
    photo = tmp_path / "scene.png"
    save_image(Image.fromarray(scene.rgb).resize((48, 40)), photo)
    result = app.grounding(models, photo, scene.referring[0].text, seed=1)
    x1, y1, x2, y2 = result.box
    assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 40 and 0 <= result.score <= 1
    assert result.mask.shape == (40, 48) and 0 <= result.mask.min() <= result.mask.max() <= 1
    assert result.trajectory.width > result.trajectory.height  # the 2 prompt layers' masks side by side
    with pytest.raises(UserError, match="no referring expression"):
        app.grounding(models, photo, "  ")


def test_text_to_image_tab(models):
    seen = []
    image = app.text_to_image(models, "a large red sphere", steps=2, guidance=3.0, progress=lambda done, total: seen.append(done))
    unet = models.pipeline("text_to_image").unet
    assert seen == [1, 2] and image.size == (unet.config.sample_size * 4,) * 2  # the micro VAE is x4
    with pytest.raises(UserError, match="no text"):
        app.text_to_image(models, "")


def test_bad_uploads_get_one_clear_message(models, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 4000)).save(huge)  # 20 MP of black: a small file, too many pixels
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (8, 8), "red").save(tiny)
    cases = [(not_image, "photo: 'notes.png' is not an image"), (huge, "5000x4000 = 20.0 MP, above the limit of 16.0 MP"),
             (tiny, "photo is 8x8 pixels: the models need at least 16 a side"), (None, "photo: no image given")]
    for path, message in cases:
        with pytest.raises(UserError, match=message.replace(".", r"\.")):
            app.depth_and_segmentation(models, path, tmp_path / "out")
        assert str(tmp_path) not in str(pytest.raises(UserError, app.grounding, models, path, "the cube").value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_gallery_has_held_out_pairs_for_every_task(models, tmp_path):
    pairs = app.write_gallery(models, tmp_path)
    assert [p.task for p in pairs[:: app.GALLERY_SEEDS]] == sorted(list_tasks(), key=lambda n: (n not in load_recipe("prompt_diffusion-tiny").tasks, n))
    assert {p.seen_in_training for p in pairs} == {True, False}  # the six trained tasks and the unseen ones
    first = synthetic_triplet(1_000_000, load_task(pairs[0].task), 64, "layout")  # the PD model's size
    assert np.array_equal(load_map(pairs[0].source), first["example_source"]) and np.array_equal(load_map(pairs[0].query), first["query"])
    seg = next(p for p in pairs if p.task == "image_to_seg")
    assert seg.text == ""  # the tiny recipe's text for forward tasks


def test_the_app_through_gradios_client(micro_models, scene_png, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    with app.serve([micro_models["depth"], micro_models["segmentation"]], port=free_port()) as url:
        assert url.startswith("http://127.0.0.1:")
        work_dir = Path(os.environ["GRADIO_TEMP_DIR"])
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        _, _, depth_png, labels_png = client.predict(handle_file(str(scene_png)), api_name="/depth")
        models = app.Models(app.find_models([micro_models["depth"]]))
        depth = models.pipeline("depth")(load_rgb(scene_png)).prediction[0, :, :, 0]
        np.testing.assert_array_equal(load_map(depth_png), depth_to_uint16(depth, 1000.0))
        assert load_map(labels_png).shape == (64, 64)
        not_image = tmp_path / "notes.png"
        not_image.write_text("not a picture")
        with pytest.raises(AppError, match="photo: 'notes.png' is not an image Pillow can read"):
            client.predict(handle_file(str(not_image)), api_name="/depth")
        again = client.predict(handle_file(str(scene_png)), api_name="/depth")  # still serving
        np.testing.assert_array_equal(load_map(again[2]), load_map(depth_png))
        assert any(work_dir.rglob("scene.png"))  # the upload went to the app's temporary folder ...
        with pytest.raises(ValueError):  # ... and the tabs without models have no endpoint
            client.predict("a red sphere", 2, 4.0, 0, api_name="/text_to_image")
    assert not work_dir.exists()  # ... which is removed when the app stops


def test_cli_refuses_a_folder_that_is_not_a_model(tmp_path):
    from typer.testing import CliRunner

    from incontext_diffusion.cli import app as cli

    result = CliRunner().invoke(cli, ["app", "--model-dir", str(tmp_path)])
    assert isinstance(result.exception, UserError) and "is not an exported model folder" in str(result.exception)
