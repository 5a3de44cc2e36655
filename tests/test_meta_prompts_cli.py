"""MetaPrompts end to end on a micro backbone: parameter groups, training, export, infer, eval, convert."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from incontext_diffusion.cli import app
from ldm_names import ldm_unet_state
from incontext_diffusion.core.components import save_components
from incontext_diffusion.core.head import load_head
from incontext_diffusion.core.tiny import micro_components
from incontext_diffusion.data.synthscenes import caption_vocabulary
from incontext_diffusion.core.trainer import train
from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.meta_prompts.convert import convert_checkpoint, head_state_dict
from incontext_diffusion.heads.meta_prompts.pipeline import MetaPromptsDepthOutput, MetaPromptsDepthPipeline
from incontext_diffusion.recipes import load_recipe

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("micro") / "backbone"
    save_components(micro_components(caption_vocabulary(), tmp_path_factory.mktemp("tok")), folder)
    return folder


TASK_KEYS = {"depth": {"resize_scale": 0, "num_deconv": 2, "decoder_channels": 8}, "segmentation": {"num_classes": 5, "channels": 8, "auxiliary_channels": 8}}


def recipe_file(tmp_path: Path, backbone: Path, task: str, **model) -> Path:
    recipe = {
        "description": "micro", "head": "meta_prompts", "backbone": str(backbone), "output_dir": str(tmp_path / f"run-{task}"),
        "data": {"size": 64, "num_samples": 4, "held_out": 2, "max_objects": 1},
        "model": {"task": task, "num_prompts": 4, **TASK_KEYS[task], **model},
        "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 2, "validate_every": 2, "log_every": 1},
    }
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def groups_of(recipe_path) -> tuple:
    """The trainable model of a recipe and, per parameter id, its group's lr and weight decay (at base lr 1e-3)."""
    head = load_head(load_recipe(str(recipe_path)))
    head.build()
    model = head.trainable()
    groups = head.parameter_groups(model, 1e-3)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g.get("weight_decay") for g in groups for p in g["params"]}
    return model, lr_of, decay_of


def test_parameter_groups_give_the_unet_the_reduced_lr(tmp_path, backbone):
    for task, scale in (("depth", 0.01), ("segmentation", 0.1)):
        model, lr_of, decay_of = groups_of(recipe_file(tmp_path, backbone, task))
        unet = model.backbone.unet
        assert lr_of[id(unet.conv_in.weight)] == pytest.approx(1e-3 * scale)
        assert lr_of[id(unet.up_blocks[1].attentions[0].norm.weight)] == pytest.approx(1e-3 * scale)  # norms too (official quirk fixed)
        assert lr_of[id(model.head.time_embeddings)] == pytest.approx(1e-3)
        assert decay_of[id(unet.conv_in.bias)] == 0.0 and decay_of[id(model.head.time_embeddings)] is None  # 2-D: the recipe's decay
        assert id(unet.time_embedding.linear_1.weight) not in lr_of  # bypassed
        assert not any(id(p) in lr_of for p in model.backbone.vae.parameters())  # frozen


def test_mmcv_parameter_groups_as_the_official_segmentation(tmp_path, backbone):
    model, lr_of, decay_of = groups_of(recipe_file(tmp_path, backbone, "segmentation", parameter_groups="mmcv"))
    unet = model.backbone.unet
    attention = unet.up_blocks[1].attentions[0]
    for norm in (attention.norm.weight, attention.transformer_blocks[0].norm2.bias):  # "norm" in their ldm names
        assert lr_of[id(norm)] == pytest.approx(1e-3) and decay_of[id(norm)] == 0.0
    for plain in (unet.conv_in.bias, unet.up_blocks[1].resnets[0].norm1.weight):  # ldm in_layers.0: no "norm"
        assert lr_of[id(plain)] == pytest.approx(1e-4) and decay_of[id(plain)] is None  # decayed, biases too
    assert lr_of[id(model.head.meta_prompts)] == pytest.approx(1e-3) and decay_of[id(model.head.meta_prompts)] is None


def test_a_key_of_the_other_task_is_refused(tmp_path, backbone):
    with pytest.raises(UserError, match=r"'model.max_depth' in recipe .* is a depth key, and this recipe's model.task is segmentation"):
        load_head(load_recipe(str(recipe_file(tmp_path, backbone, "segmentation", max_depth=80.0))))
    depth = recipe_file(tmp_path, backbone, "depth")
    recipe = yaml.safe_load(depth.read_text())
    recipe["model"]["ce_average"] = "all"
    depth.write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match="'model.ce_average' .* is a segmentation key"):
        load_head(load_recipe(str(depth)))


def test_pipeline_right_after_a_training_step(tmp_path, backbone):
    head = load_head(load_recipe(str(recipe_file(tmp_path, backbone, "depth"))))
    head.build()
    model = head.trainable()
    batch = head.collate([head.train_dataset()[i] for i in range(2)])
    head.loss(model, batch, 0).backward()
    depth = head.pipeline(model)(np.zeros((40, 48, 3), np.uint8)).prediction
    assert depth.shape == (1, 40, 48, 1) and np.isfinite(depth).all()
    # ...and the UNet is a plain UNet again
    unet = model.backbone.unet
    assert all(not m._forward_hooks for m in unet.modules())


def export_untrained(tmp_path: Path, backbone: Path, task: str, **model) -> Path:
    """Build and export without training (the trainer itself is exercised by the depth case)."""
    head = load_head(load_recipe(str(recipe_file(tmp_path, backbone, task, **model))))
    head.build()
    out_dir = tmp_path / f"model-{task}"
    head.export(head.trainable(), out_dir)
    return out_dir


@pytest.mark.parametrize("task", ["depth", "segmentation"])
def test_train_export_infer_eval(tmp_path, backbone, task):
    if task == "depth":
        out_dir = train(load_head(load_recipe(str(recipe_file(tmp_path, backbone, task)))))
        assert (out_dir.parent / "samples" / "step-000002.png").is_file()
    else:
        out_dir = export_untrained(tmp_path, backbone, task)
    index = json.loads((out_dir / "model_index.json").read_text())
    assert index["_class_name"] == ("MetaPromptsDepthPipeline" if task == "depth" else "MetaPromptsSegmentationPipeline")

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / "a.png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["infer", "--model", str(out_dir), "--image", str(images), "--out", str(out)])
    assert isinstance(result.exception, UserError) and "broken.png" in str(result.exception)  # reported...
    if task == "depth":  # ...and the good image still written
        depth = np.load(out / "a_depth.npy")
        assert depth.shape == (40, 48) and 0 < depth.min() and depth.max() < 10
        png = np.asarray(Image.open(out / "a_depth.png"))
        assert png.dtype == np.uint16 and abs(int(png[0, 0]) - round(depth[0, 0] * 1000)) <= 1
        assert Image.open(out / "a_depth_colored.png").mode == "RGB"
    else:
        labels = np.asarray(Image.open(out / "a_labels.png"))
        assert labels.shape == (40, 48) and labels.max() < 5
        assert Image.open(out / "a_overlay.png").size == (48, 40)

    result = CliRunner().invoke(app, ["eval", "--model", str(out_dir), "--num-samples", "2", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    # the same figures from the pipeline and the metrics by hand, on the same held-out scenes
    from incontext_diffusion.data.perception import SynthDepth, SynthSegmentation
    from incontext_diffusion.heads.meta_prompts.head import HELD_OUT_SEED
    from incontext_diffusion.heads.meta_prompts.pipeline import MetaPromptsSegmentationPipeline
    from incontext_diffusion.metrics import DepthMetrics, SegmentationMetrics

    max_objects = 1 if (out_dir / "recipe.yaml").is_file() else 3  # the training recipe's scenes, else the defaults
    scenes = (SynthDepth if task == "depth" else SynthSegmentation)(2, 64, HELD_OUT_SEED, 1, max_objects)
    pipe = (MetaPromptsDepthPipeline if task == "depth" else MetaPromptsSegmentationPipeline).from_pretrained(out_dir)
    metrics = DepthMetrics(max_depth=10.0) if task == "depth" else SegmentationMetrics(num_classes=5)
    for sample in (scenes[0], scenes[1]):
        prediction = pipe((sample["image"][None] + 1) / 2, output_type="pt").prediction
        metrics.update(prediction[:, 0], sample["depth"]) if task == "depth" else metrics.update(prediction, sample["labels"][None])
    for key, value in metrics.compute().items():
        assert results[key] == pytest.approx(value, abs=1e-6), key
    assert results["num_samples"] == 2 and results["protocol"] == "fast"  # synthetic scenes: one pass
    assert results["device"] == "cpu" and results["dtype"] == "float32" and results["batch_size"] == 1
    assert results["images_per_second"] > 0 and results["peak_memory_mb"] > 0
    assert "| protocol | fast |" in (tmp_path / "eval" / "results.md").read_text()
    if task == "segmentation":  # the mean of the per-class IoUs of the classes present is the mIoU
        per_class = [results[f"IoU_{name}"] for name in ("floor", "wall", "sphere", "cube", "cylinder")]
        assert np.nanmean(per_class) == pytest.approx(results["mIoU"], abs=1e-6)


def test_infer_and_eval_use_the_same_exported_defaults(tmp_path, backbone, monkeypatch):
    out_dir = export_untrained(tmp_path, backbone, "depth")
    index = json.loads((out_dir / "model_index.json").read_text())
    assert (index["default_processing_resolution"], index["default_tta"]) == (64, False)  # the training size; no TTA on synthetic scenes
    index.update(default_processing_resolution=48, default_tta=True)
    (out_dir / "model_index.json").write_text(json.dumps(index))
    calls = []

    def recording_call(self, image, **kwargs):
        calls.append({key: kwargs.get(key) for key in ("processing_resolution", "tta")})
        height, width = (image.shape[-2:] if isinstance(image, torch.Tensor) else (image.height, image.width))
        return MetaPromptsDepthOutput(prediction=torch.ones(1, 1, height, width) if kwargs.get("output_type") == "pt" else np.ones((1, height, width, 1)))

    monkeypatch.setattr(MetaPromptsDepthPipeline, "__call__", recording_call)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    runner = CliRunner()
    assert runner.invoke(app, ["infer", "--model", str(out_dir), "--image", str(tmp_path / "a.png"), "--out", str(tmp_path / "p")]).exit_code == 0
    assert runner.invoke(app, ["eval", "--model", str(out_dir), "--num-samples", "1", "--out", str(tmp_path / "e")]).exit_code == 0
    assert calls == [{"processing_resolution": 48, "tta": True}] * 2
    calls.clear()
    # the same outputs again: replacing them needs --overwrite
    assert runner.invoke(app, ["infer", "--model", str(out_dir), "--image", str(tmp_path / "a.png"), "--out", str(tmp_path / "p"), "--no-tta",
                               "--processing-resolution", "32", "--overwrite"]).exit_code == 0
    assert runner.invoke(app, ["eval", "--model", str(out_dir), "--num-samples", "1", "--out", str(tmp_path / "e"), "--protocol", "fast", "--overwrite"]).exit_code == 0
    assert calls == [{"processing_resolution": 32, "tta": False}, {"processing_resolution": 48, "tta": False}]
    assert json.loads((tmp_path / "e" / "results.json").read_text())["protocol"] == "fast"


def test_flags_a_meta_prompts_model_does_not_read_are_refused(tmp_path, backbone):
    out_dir = export_untrained(tmp_path, backbone, "segmentation")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["infer", "--model", str(out_dir), "--image", str(tmp_path / "a.png"), "--steps", "5"])
    assert isinstance(result.exception, UserError) and "--steps is not used by a Meta-Prompts segmentation model" in str(result.exception)
    result = CliRunner().invoke(app, ["eval", "--model", str(out_dir), "--protocol", "slow", "--out", str(tmp_path / "e")])
    assert isinstance(result.exception, UserError) and "--protocol 'slow' is not known" in str(result.exception)
    assert not (tmp_path / "e").exists()


def official_depth_state(pipe: MetaPromptsDepthPipeline) -> dict:
    """The head weights of `pipe` under the official depth checkpoint's names."""
    state = {}
    for key, value in pipe.head.state_dict().items():
        if key.startswith("meta_prompts."):
            state[f"encoder.meta_prompts{int(key.split('.')[1]) + 1}"] = value
        elif key.startswith("prompt_adapters."):
            _, k, rest = key.split(".", 2)
            state[f"encoder.text_adapter{int(k) + 1}.fc.{rest}"] = value
        elif key == "time_embeddings":
            state.update({f"encoder.t{k + 1}": value[k : k + 1] for k in range(value.shape[0])})
        elif key.startswith(("layer", "out_layer")):
            state[f"encoder.{key}"] = value
        else:
            state[key] = value
    return state


def test_head_names_of_official_checkpoints_map_back(tmp_path, backbone):
    pipe = MetaPromptsDepthPipeline.from_pretrained(export_untrained(tmp_path, backbone, "depth", num_loops=2))
    official = official_depth_state(pipe)
    assert "encoder.t2" in official and "encoder.text_adapter1.fc.0.weight" in official
    mapped = head_state_dict(official, "depth")
    expected = pipe.head.state_dict()
    assert mapped.keys() == expected.keys()
    assert all(torch.equal(mapped[k], expected[k]) for k in expected)
    # segmentation: mmseg ConvModule / conv_seg names become transformers' UperNet names
    seg = head_state_dict({"decode_head.lateral_convs.0.bn.weight": torch.ones(1), "auxiliary_head.conv_seg.bias": torch.ones(1),
                           "upconv2.1.weight": torch.ones(1), "t1": torch.ones(1, 4), "t2": torch.zeros(1, 4)}, "segmentation")
    assert set(seg) == {"decode_head.lateral_convs.0.batch_norm.weight", "auxiliary_head.classifier.bias", "upconvs.1.1.weight", "time_embeddings"}
    assert seg["time_embeddings"].tolist() == [[1.0] * 4, [0.0] * 4]


def test_convert_refuses_a_checkpoint_without_unet_weights(tmp_path, backbone):
    from safetensors.torch import save_file

    save_file({"decoder.conv_layers.0.weight": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="no 'encoder.unet.unet.diffusion_model"):
        convert_checkpoint(tmp_path / "x.safetensors", tmp_path / "out", dataset="nyu", backbone=str(backbone))
    assert not (tmp_path / "out").exists()


def test_convert_official_depth_checkpoint(tmp_path, backbone):
    """A state dict in the official depth naming (UNet in ldm names, no time MLP) becomes a working model folder."""
    from safetensors.torch import save_file

    source = MetaPromptsDepthPipeline.from_pretrained(export_untrained(tmp_path, backbone, "depth", num_loops=2, resize_scale=1))
    with torch.no_grad():
        for p in source.unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # differ from the backbone the converter starts from
    unet_ldm = {f"encoder.unet.unet.diffusion_model.{k}": v for k, v in ldm_unet_state(source.unet).items() if not k.startswith("time_embed.")}
    save_file({**unet_ldm, **official_depth_state(source)}, str(tmp_path / "official.safetensors"))

    out = convert_checkpoint(tmp_path / "official.safetensors", tmp_path / "converted", dataset="nyu", backbone=str(backbone))
    converted = MetaPromptsDepthPipeline.from_pretrained(out)
    # the NYU settings are carried into the exported config: max depth, resize scale, the paper's test settings
    assert (converted.head.config.max_depth, converted.head.config.resize_scale) == (10.0, 1)
    config = converted.config
    assert (config.default_processing_resolution, config.default_tta, config.shift_windows) == (480, True, 2)
    for key, value in source.unet.state_dict().items():
        if not key.startswith("time_embedding."):
            assert torch.equal(converted.unet.state_dict()[key], value), key
    image = torch.rand(1, 3, 64, 64)
    one_pass = {"processing_resolution": 0, "tta": False, "output_type": "pt"}
    assert torch.allclose(converted(image, **one_pass).prediction, source(image, **one_pass).prediction, atol=1e-5)
