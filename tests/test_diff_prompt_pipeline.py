"""The three Diff-Prompt stages and the tiny host chained through their recipes (micro sizes), then `icd infer` / `icd eval`."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
from incontext_diffusion.heads.diff_prompt.pipeline import DiffPromptGroundingPipeline, DiffPromptMaskPipeline
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
    pipe = DiffPromptGroundingPipeline.from_pretrained(chain["dp"])
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
    fresh = tmp_path / "refused" / "grounding.png"  # the refusals must come before any output is written
    with pytest.raises(UserError, match="--text"):
        commands.infer_grounding(InferOptions(model=chain["dp"], out=fresh, images=[tmp_path / "scene.png"]))
    with pytest.raises(UserError, match="--guidance is not used by a Diff-Prompt grounding model"):
        commands.infer_grounding(InferOptions(model=chain["dp"], out=fresh, prompt="the cube", images=[tmp_path / "scene.png"], guidance=3.0))
    with pytest.raises(UserError, match="--steps is not used"):  # static prompts: no DDIM
        commands.infer_grounding(InferOptions(model=chain["vpt"], out=fresh, prompt="the cube", images=[tmp_path / "scene.png"], steps=4))
    assert not fresh.parent.exists()


def test_eval_tables_count_hits_by_hand(chain, tmp_path, monkeypatch):
    """The eval handlers on outputs fixed here: the right box (in the image's pixels) for every other expression."""
    from types import SimpleNamespace

    calls = []

    def fake_grounding(self, image, prompt, generator=None, top_k=None, num_inference_steps=None):
        size = image.shape[-1]
        first = len(calls)
        calls.extend(prompt)
        boxes = [FAKE_GT[first + i] * size if (first + i) % 2 == 0 else torch.tensor([0.0, 0.0, 1.0, 1.0]) for i in range(len(prompt))]
        # A Diff-Prompt model also returns the DiT's masks: right for the same expressions (once FAKE_MASKS is set).
        masks = torch.stack([FAKE_MASKS[first + i] if (first + i) % 2 == 0 else torch.zeros_like(FAKE_MASKS[0]) for i in range(len(prompt))]) if FAKE_MASKS else None
        return SimpleNamespace(boxes=torch.stack(boxes)[:, None], scores=torch.ones(len(prompt), 1), masks=masks)

    samples = commands._eval_splits(EvalOptions(model=chain["vpt"], out=tmp_path, num_samples=2, tasks=["all"]), 32)["all"]
    FAKE_GT[:], FAKE_MASKS[:] = [torch.tensor(s.box) for s in samples], []
    monkeypatch.setattr(DiffPromptGroundingPipeline, "__call__", fake_grounding)
    table = commands.eval_grounding(EvalOptions(model=chain["vpt"], out=tmp_path / "eval", num_samples=2, tasks=["all"], batch_size=3))
    hits = (len(samples) + 1) // 2  # expressions 0, 2, 4, ... get their own box; a 1-px box at the corner hits none
    assert table["all R@1"] == table["all UB"] == hits / len(samples) and table["all expressions"] == len(samples)
    assert table["method"] == "vpt_deep" and table["images_per_second"] > 0 and "all mask IoU" not in table  # no masks, no mask score

    def fake_masks(self, image, prompt, num_inference_steps=None, generator=None, **_):
        first = len(calls)
        calls.extend(prompt)
        masks = [FAKE_MASKS[first + i] if (first + i) % 2 == 0 else torch.zeros_like(FAKE_MASKS[0]) for i in range(len(prompt))]
        return SimpleNamespace(masks=torch.stack(masks))

    calls.clear()
    FAKE_MASKS[:] = [torch.from_numpy(s.mask).float()[None] for s in samples]
    monkeypatch.setattr(DiffPromptMaskPipeline, "__call__", fake_masks)
    masks = commands.eval_mask_generation(EvalOptions(model=chain["dit"], out=tmp_path / "eval2", num_samples=2, tasks=["all"], batch_size=3))
    assert masks["all mask IoU"] == pytest.approx(hits / len(samples)) and masks["ddim_steps"] == 4  # the exported default
    calls.clear()
    with_masks = commands.eval_grounding(EvalOptions(model=chain["vpt"], out=tmp_path / "eval4", num_samples=2, tasks=["all"], batch_size=3))
    assert with_masks["all mask IoU"] == pytest.approx(hits / len(samples))  # empty masks score 0 against a non-empty truth
    monkeypatch.setattr("incontext_diffusion.heads.diff_prompt.mask_vae.reconstruct", lambda vae, m: 1 - m)  # every pixel wrong
    vae = commands.eval_mask_vae(EvalOptions(model=chain["vae"], out=tmp_path / "eval3", num_samples=2, tasks=["all"]))
    assert vae["all reconstruction IoU"] == 0 and vae["all masks"] == len(samples)


FAKE_GT: list = []
FAKE_MASKS: list = []


def test_validation_keeps_the_trainable_parts_trainable(chain, tmp_path):
    """A validation picture must not freeze what the optimiser updates (DiT, the tiny CLIP's vision tower and projections);
    the pre-trained text tower and the image VAE stay frozen."""
    recipe = load_recipe("diff_prompt_dit-tiny", [*MICRO, f"model.mask_vae={chain['vae']}", f"output_dir={tmp_path}", *micro_dit_overrides(chain["backbone"]),
                                                  "model.train_clip=true", "model.encode_once=false"])
    head = load_head(recipe)
    head.build()
    model = head.trainable()
    # rows: 6 images, their true masks, the generated masks; 32 px masks drawn x6 (192 px cells), 4 px gaps
    picture = head.validate(model, 1)
    assert picture.width == 6 * 192 + 5 * 4
    label_h = (picture.height - 2 * 4) // 3 - 192
    pipe = head.pipeline(model)
    batch = _as_batch(head.validation)
    generated = pipe(batch["images"], batch["texts"], generator=torch.Generator().manual_seed(0)).masks.clamp(0, 1)
    top = 2 * (label_h + 192 + 4) + label_h
    cell = np.asarray(picture.crop((0, top, 192, top + 192)).convert("L"), dtype=np.float32)[::6, ::6] / 255
    assert np.abs(cell - generated[0, 0].numpy()).max() <= 1 / 255 + 1e-6
    frozen = ("conditioner.clip.text_model.", "conditioner.image_vae.")
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen)), name
    assert not any(p.requires_grad for p in head.vae.parameters())


def test_condition_reaches_the_dit(chain):
    """The probe behind the stage-2 fix: the generated latents change when only the text, or only the image, changes."""
    pipe = DiffPromptMaskPipeline.from_pretrained(chain["dit"])
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

    pipe = DiffPromptMaskPipeline.from_pretrained(chain["dit"])
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


def wide_photo(tmp_path):
    """A 50x30 RGB scene (not square, not the host's 32 px) as a file, a PIL image and an array."""
    from PIL import Image

    rgb = np.asarray(load_rgb(render_scene(1_000_003, 32).rgb).resize((50, 30)))
    save_image(Image.fromarray(rgb), tmp_path / "wide.png")
    return tmp_path / "wide.png", Image.fromarray(rgb), rgb


def test_pipelines_take_any_image_and_answer_at_its_size(chain, tmp_path):
    path, pil, array = wide_photo(tmp_path)
    pipe = DiffPromptGroundingPipeline.from_pretrained(chain["dp"]).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    outs = [pipe(x, "the cube", torch.Generator().manual_seed(0), top_k=None) for x in (path, pil, array, array.astype(np.float32) / 255)]
    for out in outs:
        assert out.masks.shape == (1, 1, 30, 50) and out.boxes.shape[0] == 1
        assert (out.boxes >= 0).all() and (out.boxes[..., 0::2] <= 50).all() and (out.boxes[..., 1::2] <= 30).all()
    assert torch.equal(outs[0].boxes, outs[1].boxes) and torch.equal(outs[0].boxes, outs[2].boxes)
    mixed = pipe([pil, torch.rand(3, 32, 32) * 2 - 1], ["the cube", "the sphere"], torch.Generator().manual_seed(0), output_type="pil")
    assert [m.size for m in mixed.masks] == [(50, 30), (32, 32)] and [tuple(b.shape) for b in mixed.boxes] == [(5, 4), (5, 4)]
    with pytest.raises(UserError, match="cannot read an image from int"):
        pipe(3, "the cube")
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        pipe(array.astype(np.float32), "the cube")
    with pytest.raises(UserError, match="one expression per image"):
        pipe([pil, pil], ["the cube"])


def test_boxes_are_scaled_to_the_image_and_clipped(chain, tmp_path, monkeypatch):
    _, pil, _ = wide_photo(tmp_path)
    from incontext_diffusion.heads.diff_prompt.hosts import GroundingOutput

    pipe = DiffPromptGroundingPipeline.from_pretrained(chain["vpt"])
    proposals = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [-0.2, -0.1, 1.3, 0.5]]])  # the second crosses three borders and scores higher
    monkeypatch.setattr(pipe.host, "forward", lambda pixel_values, texts: GroundingOutput(torch.tensor([[-2.0, 2.0]]), proposals))
    out = pipe(pil, "the cube")
    assert torch.allclose(out.boxes, torch.tensor([[[0.0, 0.0, 50.0, 15.0], [5.0, 6.0, 15.0, 12.0]]]))


def test_mask_pipeline_callback_steps_and_output_types(chain, tmp_path):
    _, pil, _ = wide_photo(tmp_path)
    pipe = DiffPromptMaskPipeline.from_pretrained(chain["dit"])
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def zero_at_the_end(p, index, timestep, tensors):
        seen.append(int(timestep))
        return {"latents": torch.zeros_like(tensors["latents"])} if index == p.config.ddim_steps - 1 else tensors

    out = pipe(pil, "the cube", generator=torch.Generator().manual_seed(0), callback_on_step_end=zero_at_the_end)
    assert len(seen) == pipe.config.ddim_steps == 4 and seen == sorted(seen, reverse=True)  # the exported default, noisiest first
    assert torch.equal(out.trajectory[-1], torch.zeros_like(out.trajectory[-1]))
    assert torch.allclose(out.masks[0], F.interpolate(pipe.mask_vae.decode(out.trajectory[-1]).sample, size=(30, 50), mode="bilinear")[0], atol=1e-6)
    assert pipe(pil, "the cube", output_type="np").masks.shape == (1, 30, 50)
    with pytest.raises(UserError, match="output_type"):
        pipe(pil, "the cube", output_type="latent")


def test_infer_and_eval_use_the_exported_ddim_steps(chain, tmp_path, monkeypatch):
    steps = []
    original = DiffPromptMaskPipeline.sample
    monkeypatch.setattr(DiffPromptMaskPipeline, "sample", lambda self, images, texts, n, *a, **k: steps.append(n) or original(self, images, texts, n, *a, **k))
    path, _, _ = wide_photo(tmp_path)
    commands.infer_grounding(InferOptions(model=chain["dp"], out=tmp_path / "o.png", prompt="the cube", images=[path]))
    commands.eval_grounding(EvalOptions(model=chain["dp"], out=tmp_path / "eval", num_samples=1, tasks=["unique"]))
    exported = json.loads((chain["dp"] / "model_index.json").read_text())["ddim_steps"]
    assert exported == 4 and set(steps) == {exported}
    steps.clear()
    commands.infer_grounding(InferOptions(model=chain["dp"], out=tmp_path / "o.png", prompt="the cube", images=[path], steps=6, overwrite=True))
    assert steps == [6]


def test_infer_on_a_folder_writes_one_answer_per_image_at_its_size(chain, tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, size in (("a.png", (50, 30)), ("b.jpg", (32, 40)), ("c.png", (32, 32))):
        Image.fromarray(np.asarray(load_rgb(render_scene(1_000_001, 32).rgb).resize(size))).save(folder / name)
    commands.infer_grounding(InferOptions(model=chain["dp"], out=tmp_path / "out", prompt="the cube", images=[folder], grid=True, batch_size=2))
    for name, (w, h) in (("a", (50, 30)), ("b", (32, 40)), ("c", (32, 32))):
        assert load_rgb(tmp_path / "out" / f"{name}.png").size == (w, h) and load_rgb(tmp_path / "out" / f"{name}_mask.png").size == (w, h)
        boxes = torch.tensor(json.loads((tmp_path / "out" / f"{name}.json").read_text())["boxes_xyxy"])
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
    commands.infer_mask(InferOptions(model=chain["dit"], out=tmp_path / "masks", prompt="the cube", images=[str(folder / "*.png")]))
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["a.png", "a_trajectory.png", "c.png", "c_trajectory.png"]
    assert load_rgb(tmp_path / "masks" / "a.png").size == (50, 30)
    with pytest.raises(UserError, match="pass a folder for --out"):
        commands.infer_grounding(InferOptions(model=chain["dp"], out=tmp_path / "one.png", prompt="the cube", images=[folder]))


def test_oracle_prompts_are_the_true_mask_noised_forward(chain):
    pipe = DiffPromptMaskPipeline.from_pretrained(chain["dit"])
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 4:12] = 1
    layers = pipe.oracle_prompt_masks(mask, depth=2, num_inference_steps=4, generator=torch.Generator().manual_seed(5))
    latent = pipe.mask_vae.encode(mask).latent_dist.mode()
    assert torch.allclose(layers[0], pipe.mask_vae.decode(latent).sample, atol=1e-6)  # layer 0: the clean end of the trajectory
    # layer 1 gets trajectory index 1 (4 steps: timesteps 75, 50, 25, 0): the latent at timestep 25
    a = pipe.scheduler.alphas_cumprod[25]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(layers[1], pipe.mask_vae.decode(a.sqrt() * latent + (1 - a).sqrt() * noise).sample, atol=1e-5)


def test_largest_component_box_and_the_diagnosis_rows(chain):
    from incontext_diffusion.heads.diff_prompt.diagnose import diagnose, largest_component_box

    mask = torch.zeros(10, 20)
    mask[1:3, 2:4] = 0.9  # 4 px
    mask[5:9, 10:16] = 0.8  # 24 px: the largest
    mask[0, 19] = 1.0
    assert torch.allclose(largest_component_box(mask), torch.tensor([10 / 20, 5 / 10, 16 / 20, 9 / 10], dtype=torch.float64))
    assert largest_component_box(torch.full((4, 4), 0.4)) is None
    table = diagnose(chain["dp"], num_scenes=2)
    assert set(table) == {"host", "dit prompts", "oracle prompts", "mask box", "host proposals ranked by mask box"}
    host = commands.eval_grounding(EvalOptions(model=chain["host"], out=chain["root"] / "eval_host", num_samples=2, tasks=["all", "unique"]))
    assert table["host"]["all R@1"] == host["all R@1"] and table["host"]["all R@5"] == host["all R@5"]  # the same host, unprompted
    assert table["mask box"]["all R@1"] == table["mask box"]["all UB"]  # one box per expression
    with pytest.raises(UserError, match="vpt_deep"):
        diagnose(chain["vpt"], num_scenes=1)
