"""The three Diff-Prompt stages and the tiny host chained through their recipes (micro sizes), then `icd infer` / `icd eval`."""

import json

import pytest
import torch

from incontext_diffusion.cli import EvalOptions, InferOptions
from incontext_diffusion.core.head import load_head
from incontext_diffusion.core.images import load_rgb, save_image
from incontext_diffusion.core.trainer import train
from incontext_diffusion.data.synthscenes import render_scene
from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.diff_prompt import commands
from incontext_diffusion.heads.diff_prompt.pipeline import GroundingPipeline
from incontext_diffusion.recipes import load_recipe

torch.set_num_threads(1)  # the 2 shared cores are busy: one thread is much faster here
MICRO = ["data.size=32", "data.num_samples=4", "train.max_steps=2", "train.batch_size=2", "train.validate_every=2", "train.checkpoint_every=2", "train.log_every=1"]


def run_recipe(name: str, out, *overrides: str):
    return train(load_head(load_recipe(name, [*MICRO, f"output_dir={out}", *overrides])))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    vae = run_recipe("diff_prompt_mask_vae-tiny", root / "vae", "model.block_out_channels=[4, 8]")
    dit = run_recipe("diff_prompt_dit-tiny", root / "dit", f"model.mask_vae={vae}", "model.hidden_size=16", "model.clip_width=16", "model.depth=1",
                     "model.num_heads=2", "model.patch_size=4", "model.ddim_steps=4")
    host = run_recipe("grounding_host-tiny", root / "host", "model.embed_dim=8", "model.num_heads=[2, 2]", "model.bert_width=8", "model.bert_layers=2", "model.head_dim=8")
    stage3 = run_recipe("diff_prompt_grounding-tiny", root / "dp", f"model.host={host}", f"model.prompt_generator={dit}", "model.depth=2",
                        "model.base_channels=2", "model.ddim_steps=4")
    vpt = run_recipe("diff_prompt_grounding-tiny", root / "vpt", f"model.host={host}", "model.method=vpt_deep", "model.depth=2")
    return {"root": root, "vae": vae, "dit": dit, "host": host, "dp": stage3, "vpt": vpt}


def test_exports_chain(chain):
    assert json.loads((chain["vae"] / "model_index.json").read_text())["_class_name"] == "DiffPromptMaskVAE"
    assert {p.name for p in chain["dit"].iterdir()} >= {"mask_vae", "dit", "clip", "scheduler", "model_index.json"}
    assert {p.name for p in chain["dp"].iterdir()} >= {"host", "prompts.safetensors", "dit", "mask_vae", "clip"}
    assert not (chain["vpt"] / "dit").exists()  # static prompts need no generator
    pipe = GroundingPipeline.from_pretrained(chain["dp"])
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    vision, text, masks = pipe.prompt_tensors(images, ["the cube", "the red sphere"], torch.Generator().manual_seed(0))
    assert len(masks) == 2 and not masks[0].requires_grad  # the frozen sampler runs under no_grad
    assert [v.shape for v in vision] == [(2, 4, 8)] * 2 and [t.shape for t in text] == [(2, 4, 8)] * 2


def test_stage_2_needs_stage_1(tmp_path):
    with pytest.raises(UserError, match="train stage 1 first"):
        load_head(load_recipe("diff_prompt_dit-tiny", [*MICRO, f"model.mask_vae={tmp_path}", f"output_dir={tmp_path / 'x'}"])).build()


def test_infer_and_eval(chain, tmp_path):
    scene = render_scene(1_000_003, 32)
    save_image(load_rgb(scene.rgb), tmp_path / "scene.png")
    out = tmp_path / "out" / "grounding.png"
    commands.infer_grounding(InferOptions(model=chain["dp"], out=out, prompt=scene.referring[0].text, images=[tmp_path / "scene.png"], grid=True))
    result = json.loads(out.with_suffix(".json").read_text())
    assert len(result["boxes_xyxy"]) == 5 and result["scores"] == sorted(result["scores"], reverse=True)
    assert load_rgb(out).size == (32, 32) and (out.parent / "grounding_mask.png").is_file() and (out.parent / "grounding_trajectory.png").is_file()
    with pytest.raises(UserError, match="--text"):
        commands.infer_grounding(InferOptions(model=chain["dp"], out=out, images=[tmp_path / "scene.png"]))
    table = commands.eval_grounding(EvalOptions(model=chain["vpt"], out=tmp_path / "eval", num_samples=2, tasks=["all", "unique"]))
    assert table["method"] == "vpt_deep" and {"all R@1", "all R@5", "all UB", "all R@1_iou", "unique R@1"} <= set(table)
    assert 0 <= table["all R@1"] <= table["all R@5"] <= table["all UB"] <= 1
    masks = commands.eval_mask_generation(EvalOptions(model=chain["dit"], out=tmp_path / "eval2", num_samples=2, steps=4, tasks=["all"]))
    assert 0 <= masks["all mask IoU"] <= 1 and masks["all expressions"] > 0
    vae = commands.eval_mask_vae(EvalOptions(model=chain["vae"], out=tmp_path / "eval3", num_samples=2, tasks=["all"]))
    assert 0 <= vae["all reconstruction IoU"] <= 1


def test_validation_keeps_the_trainable_parts_trainable(chain, tmp_path):
    """A validation picture must not freeze what the optimiser updates (DiT, tiny CLIP)."""
    recipe = load_recipe("diff_prompt_dit-tiny", [*MICRO, f"model.mask_vae={chain['vae']}", f"output_dir={tmp_path}", "model.hidden_size=16",
                                                 "model.clip_width=16", "model.depth=1", "model.num_heads=2", "model.ddim_steps=4"])
    head = load_head(recipe)
    head.build()
    model = head.trainable()
    assert head.validate(model, 1) is not None
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in head.vae.parameters())
