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
from incontext_diffusion.heads.diff_prompt.head import _as_batch
from incontext_diffusion.core.tiny import micro_components
from incontext_diffusion.data.synthscenes import caption_vocabulary
from incontext_diffusion.heads.diff_prompt.pipeline import GroundingPipeline, MaskGenerationPipeline
from incontext_diffusion.heads.diff_prompt.tiny import tiny_clip_with_backbone_text
from incontext_diffusion.recipes import load_recipe

torch.set_num_threads(1)  # the 2 shared cores are busy: one thread is much faster here
MICRO = ["data.size=32", "data.num_samples=4", "train.max_steps=2", "train.batch_size=2", "train.validate_every=2", "train.checkpoint_every=2", "train.log_every=1"]


def run_recipe(name: str, out, *overrides: str):
    return train(load_head(load_recipe(name, [*MICRO, f"output_dir={out}", *overrides])))


def micro_backbone(folder):
    """A random micro stand-in for assets/tiny-ldm: text_encoder/, tokenizer/ and vae/ (x4)."""
    parts = micro_components(caption_vocabulary(), folder / "tokenizer_src")
    parts.text_encoder.save_pretrained(str(folder / "text_encoder"))
    parts.tokenizer.save_pretrained(str(folder / "tokenizer"))
    parts.vae.save_pretrained(str(folder / "vae"))
    return folder, parts


def micro_dit_overrides(backbone) -> list[str]:
    return ["model.hidden_size=16", "model.clip_width=16", "model.depth=1", "model.num_heads=2", "model.ddim_steps=4",
            f"model.clip_text_from={backbone}", f"model.image_latents_from={backbone}"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    backbone, _ = micro_backbone(root / "backbone")
    vae = run_recipe("diff_prompt_mask_vae-tiny", root / "vae", "model.block_out_channels=[4, 8]")
    dit = run_recipe("diff_prompt_dit-tiny", root / "dit", f"model.mask_vae={vae}", "model.patch_size=4", *micro_dit_overrides(backbone))
    host = run_recipe("grounding_host-tiny", root / "host", "model.embed_dim=8", "model.num_heads=[2, 2]", "model.bert_width=8", "model.bert_layers=2", "model.head_dim=8")
    stage3 = run_recipe("diff_prompt_grounding-tiny", root / "dp", f"model.host={host}", f"model.prompt_generator={dit}", "model.depth=2",
                        "model.base_channels=2", "model.ddim_steps=4")
    vpt = run_recipe("diff_prompt_grounding-tiny", root / "vpt", f"model.host={host}", "model.method=vpt_deep", "model.depth=2")
    return {"root": root, "backbone": backbone, "vae": vae, "dit": dit, "host": host, "dp": stage3, "vpt": vpt}


def test_exports_chain(chain):
    assert json.loads((chain["vae"] / "model_index.json").read_text())["_class_name"] == "DiffPromptMaskVAE"
    assert {p.name for p in chain["dit"].iterdir()} >= {"mask_vae", "dit", "clip", "scheduler", "image_vae", "model_index.json"}
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
    """A validation picture must not freeze what the optimiser updates (DiT, the tiny CLIP's vision tower and projections);
    the pre-trained text tower and the image VAE stay frozen."""
    recipe = load_recipe("diff_prompt_dit-tiny", [*MICRO, f"model.mask_vae={chain['vae']}", f"output_dir={tmp_path}", *micro_dit_overrides(chain["backbone"]),
                                                  "model.train_clip=true", "model.encode_once=false"])
    head = load_head(recipe)
    head.build()
    model = head.trainable()
    assert head.validate(model, 1) is not None
    frozen = ("conditioner.clip.text_model.", "conditioner.image_vae.")
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen)), name
    assert not any(p.requires_grad for p in head.vae.parameters())


def test_condition_reaches_the_dit(chain):
    """The probe behind the stage-2 fix: the generated latents change when only the text, or only the image, changes."""
    pipe = MaskGenerationPipeline.from_pretrained(chain["dit"])
    for p in pipe.dit.parameters():  # two training steps leave adaLN almost zero: give every weight a value
        torch.nn.init.normal_(p, std=0.1)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    def sample(images, text):
        return pipe(images, [text], 4, torch.Generator().manual_seed(0)).trajectory[-1]
    base = sample(images, "the red cube")
    assert not torch.allclose(sample(images, "the blue sphere"), base)
    assert not torch.allclose(sample(-images, "the red cube"), base)
    assert pipe.conditioner.image_latents(images).shape[-2:] == base.shape[-2:]  # the image latent is on the mask latent's grid


def test_image_pixels_follow_the_image_latent_and_survive_export(chain, tmp_path):
    """model.image_pixels (on in the tiny recipe): the spatial condition is [image latent ; the pixels, space-to-depth onto
    its grid], and the exported pipeline rebuilds it from the DiT's config."""
    import torch.nn.functional as F

    pipe = MaskGenerationPipeline.from_pretrained(chain["dit"])
    assert pipe.dit.config.image_pixels and pipe.conditioner.image_pixels
    images = torch.rand(2, 3, 64, 64) * 2 - 1  # the size the x4 micro VAE turns into the 16x16 mask-latent grid: no resize
    condition = pipe.conditioner.image_latents(images)
    image_vae = pipe.conditioner.image_vae
    latent_channels = image_vae.config.latent_channels
    assert pipe.dit.config.image_channels == latent_channels + 3 * 4 * 4 == condition.shape[1]  # 4x4 pixels per latent cell
    assert torch.equal(condition[:, latent_channels:], F.pixel_unshuffle(images, 4))
    with torch.no_grad():
        latents = image_vae.encode(images).latent_dist.mode() * image_vae.config.scaling_factor
    assert torch.allclose(condition[:, :latent_channels], latents, atol=1e-6)
    with pytest.raises(UserError, match="image_latents_from"):
        load_head(load_recipe("diff_prompt_dit-tiny", [*MICRO, f"model.mask_vae={chain['vae']}", f"output_dir={tmp_path}",
                                                       *micro_dit_overrides(chain["backbone"]), "model.image_latents_from=null"])).build()


def test_backbone_text_tower_is_copied(tmp_path):
    backbone, parts = micro_backbone(tmp_path / "backbone")
    clip, tokenizer = tiny_clip_with_backbone_text(backbone, projection_dim=16, image_size=32, width=16)
    ids = tokenizer(["the small red cube"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(clip.text_model(**ids).last_hidden_state, parts.text_encoder(**ids).last_hidden_state)
    with pytest.raises(UserError, match="text_encoder"):
        tiny_clip_with_backbone_text(tmp_path, 16, 32)



def test_backbone_text_tower_needs_the_tiny_clip(chain, tmp_path):
    with pytest.raises(UserError, match="clip: tiny"):
        load_head(load_recipe("diff_prompt_dit-tiny", [*MICRO, f"model.mask_vae={chain['vae']}", f"output_dir={tmp_path}", "model.clip=some/clip"])).build()


def test_mask_latents_mode_is_the_posterior_mean(chain, tmp_path):
    """model.mask_latents: mode trains on the Mask-VAE posterior mean, sample (the paper) on a draw from it."""
    losses = {}
    for choice in ("mode", "sample"):
        head = load_head(load_recipe("diff_prompt_dit-tiny", [*MICRO, f"model.mask_vae={chain['vae']}", f"output_dir={tmp_path / choice}",
                                                              *micro_dit_overrides(chain["backbone"]), f"model.mask_latents={choice}"]))
        head.build()
        batch = head.collate(head.train_dataset()[:2])
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(head.loss(head.trainable(), batch, 0).item())
        losses[choice] = runs
    assert losses["mode"][0] == losses["mode"][1] and losses["sample"][0] == losses["sample"][1]  # the global RNG drives both
    assert losses["mode"][0] != losses["sample"][0]


def test_frozen_conditioner_is_encoded_once_with_the_same_loss(chain, tmp_path):
    """With train_clip false nothing before the DiT trains: the head encodes every expression at build time, and a
    training step on the pre-encoded batch gives the loss of encoding that batch on the fly."""
    head = load_head(load_recipe("diff_prompt_dit-tiny", [*MICRO, f"model.mask_vae={chain['vae']}", f"output_dir={tmp_path}",
                                                          *micro_dit_overrides(chain["backbone"]), "model.train_clip=false", "model.encode_once=true"]))
    head.build()
    assert len(head.train_dataset()) == len(head.samples) and head.trainable().conditioner is None
    assert not any(p.requires_grad for p in head.conditioner.parameters())
    encoded = head.collate(head.train_dataset()[:2])
    raw = _as_batch(head.samples[:2])  # the on-the-fly batch of the same expressions
    with torch.no_grad():
        latents = head.vae.encode(raw["masks"]).latent_dist.mode().contiguous()  # randn_like follows the memory layout
        features = head.conditioner(raw["images"], raw["texts"])
    torch.manual_seed(0)
    expected = head.trainable()(latents, None, None, features)
    torch.manual_seed(0)
    assert torch.allclose(head.loss(head.trainable(), encoded, 0), expected, atol=1e-6)
    assert encoded["image_latents"].shape[-2:] == latents.shape[-2:] and encoded["text_features"].shape == (2, 16)
    head.encoded = None  # the per-step path (encode_once false) gives the same loss
    torch.manual_seed(0)
    assert torch.allclose(head.loss(head.trainable(), raw, 0), expected, atol=1e-6)
    with pytest.raises(UserError, match="encode_once"):
        load_head(load_recipe("diff_prompt_dit-tiny", [*MICRO, f"model.mask_vae={chain['vae']}", f"output_dir={tmp_path / 'b'}",
                                                      *micro_dit_overrides(chain["backbone"]), "model.train_clip=true", "model.encode_once=true"])).build()
