"""The tiny backbone's head: inference defaults stored in the exported folder, read alike by `icd infer` and `icd eval`."""

import json
from pathlib import Path

import pytest

from incontext_diffusion.cli import EvalOptions, InferOptions
from incontext_diffusion.core.head import load_head
from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.tiny_ldm import head as tiny_ldm_head
from incontext_diffusion.heads.tiny_ldm.commands import eval_text_to_image, infer_text_to_image
from incontext_diffusion.heads.tiny_ldm.head import INFERENCE_DEFAULTS_KEY, VAE_MODALITIES, vae_reconstruction_rmse
from incontext_diffusion.recipes import load_recipe


def write_index(folder: Path, defaults: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline"} | ({INFERENCE_DEFAULTS_KEY: defaults} if defaults is not None else {})
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def calls(monkeypatch):
    """The steps and guidance the infer and eval handlers pass on (the pipeline itself is not run)."""
    seen = {}
    monkeypatch.setattr(tiny_ldm_head, "text_to_image", lambda model, prompt, out, steps, guidance, **kw: seen.update(infer=(steps, guidance)))
    monkeypatch.setattr(tiny_ldm_head, "evaluate_text_to_image", lambda model, num_samples, steps, guidance, **kw: seen.update(eval=(steps, guidance)) or {})
    return seen


def run_both(folder: Path, calls: dict, **flags) -> tuple:
    infer_text_to_image(InferOptions(folder, prompt="a red cube", **flags))
    eval_text_to_image(EvalOptions(folder, Path("unused"), **flags))
    return calls["infer"], calls["eval"]


def test_infer_and_eval_use_the_folders_defaults(tmp_path, calls):
    folder = write_index(tmp_path / "model", {"num_inference_steps": 25, "guidance_scale": 4.0})
    assert run_both(folder, calls) == ((25, 4.0), (25, 4.0))
    write_index(folder, {"num_inference_steps": 7, "guidance_scale": 2.5})  # edited defaults change both
    assert run_both(folder, calls) == ((7, 2.5), (7, 2.5))
    assert run_both(folder, calls, steps=3, guidance=1.5) == ((3, 1.5), (3, 1.5))  # flags override
    write_index(folder, None)  # a folder exported before the defaults were stored
    assert run_both(folder, calls) == ((25, 4.0), (25, 4.0))
    write_index(folder, {"num_inference_step": 7})
    with pytest.raises(UserError, match="_inference_defaults holds num_inference_step: keep only num_inference_steps, guidance_scale"):
        run_both(folder, calls)


def test_flags_the_text_to_image_model_does_not_read_are_refused(tmp_path, calls):
    folder = write_index(tmp_path / "model", None)
    with pytest.raises(UserError, match="^--image is not used by a text-to-image model: drop it"):
        infer_text_to_image(InferOptions(folder, prompt="a red cube", images=[Path("x.png")]))
    with pytest.raises(UserError, match="^--protocol is not used by a text-to-image model"):
        eval_text_to_image(EvalOptions(folder, Path("unused"), protocol="paper"))
    assert calls == {}


def test_export_stores_the_recipes_defaults_and_eval_adds_vae_rmse_and_speed(tmp_path):
    recipe = load_recipe("tiny_ldm-micro", [f"output_dir={tmp_path / 'run'}", "model.inference_steps=7", "model.guidance_scale=2.5", "data.num_samples=4"])
    head = load_head(recipe)
    head.build()
    head.model.latent_scale.fill_(1.0)  # as after the first UNet step
    out = tmp_path / "model"
    out.mkdir()
    head.export(head.model, out)
    index = json.loads((out / "model_index.json").read_text())
    assert index[INFERENCE_DEFAULTS_KEY] == {"num_inference_steps": 7, "guidance_scale": 2.5}

    results = eval_text_to_image(EvalOptions(out, tmp_path / "eval", num_samples=2, steps=1))
    assert (results["steps"], results["guidance_scale"], results["num_samples"]) == (1, 2.5, 2)
    expected = vae_reconstruction_rmse(head.model.vae, num_scenes=2)
    assert {m: results[f"vae_reconstruction_rmse/{m}"] for m in VAE_MODALITIES} == pytest.approx(expected)
    assert results["images_per_second"] > 0 and results["batch_size"] == 2 and results["device"] == "cpu"


def test_continuing_a_backbone_keeps_its_latent_scale_unless_the_vae_trains_again(tmp_path):
    source = load_head(load_recipe("tiny_ldm-micro", [f"output_dir={tmp_path / 'run'}", "data.num_samples=4"]))
    source.build()
    source.model.latent_scale.fill_(0.37)  # as measured on its first UNet step
    (tmp_path / "source").mkdir()
    source.export(source.model, tmp_path / "source")

    def continued(vae_steps: int) -> float:
        head = load_head(load_recipe("tiny_ldm-micro", [f"output_dir={tmp_path / 'next'}", f"backbone={tmp_path / 'source'}", f"model.vae_steps={vae_steps}", "data.num_samples=4"]))
        head.build()
        return float(head.model.latent_scale)

    assert continued(vae_steps=0) == pytest.approx(0.37)  # the UNet goes on learning on the same latents
    assert continued(vae_steps=3) == 0.0  # a VAE that trains again is measured again on the first UNet step
