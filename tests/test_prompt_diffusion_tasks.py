"""Prompt Diffusion: fixed texts of the forward tasks, the VAE-decoder option."""

import pytest
import torch
import torch.nn.functional as F

from incontext_diffusion.core.tiny import micro_components
from incontext_diffusion.data.synthscenes import caption_vocabulary
from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.prompt_diffusion.controlnet import PromptDiffusionControlNetModel
from incontext_diffusion.heads.prompt_diffusion.data import HELD_OUT_SEED, as_tensors, synthetic_triplet, with_task_texts
from incontext_diffusion.heads.prompt_diffusion.head import (
    PromptDiffusionModel,
    PromptDiffusionOptions,
    check_task_texts,
    freeze_backbone,
    vae_decoder_parameter_names,
)
from incontext_diffusion.recipes import load_recipe, load_task

torch.set_num_threads(2)


def test_forward_tasks_carry_the_papers_fixed_text_and_inverse_tasks_the_caption():
    depth = synthetic_triplet(HELD_OUT_SEED, load_task("image_to_depth"), 32, "layout")
    inverse = synthetic_triplet(HELD_OUT_SEED, load_task("depth_to_image"), 32, "layout")
    assert depth["caption"] == "depth map"
    assert inverse["caption"] not in ("", "depth map") and inverse["caption"].startswith("a")
    assert [load_task(f"image_to_{m}").text for m in ("hed", "seg")] == ["hed map", "segmentation map"]


def test_recipe_task_texts_replace_the_cards_and_unknown_names_are_refused():
    cards = [load_task("image_to_depth"), load_task("depth_to_image")]
    replaced = with_task_texts(cards, {"image_to_depth": ""})
    assert [c.text for c in replaced] == ["", None] and cards[0].text == "depth map"  # the cards themselves are untouched
    assert synthetic_triplet(HELD_OUT_SEED, replaced[0], 32, "colour")["caption"] == ""
    with pytest.raises(UserError, match="model.task_texts names image_to_hed"):
        with_task_texts(cards, {"image_to_hed": ""})
    tiny = load_recipe("prompt_diffusion-tiny")
    assert set(PromptDiffusionOptions(**tiny.model).task_texts) == {"image_to_depth", "image_to_hed", "image_to_seg"}


def test_a_task_text_longer_than_the_tokenizer_is_refused(tmp_path):
    tokenizer = micro_components(caption_vocabulary(), tmp_path, seed=0).tokenizer
    check_task_texts([load_task("image_to_depth").model_copy(update={"text": "a red cube"})], tokenizer)
    too_long = load_task("image_to_seg").model_copy(update={"text": " ".join(["red"] * tokenizer.model_max_length)})
    with pytest.raises(UserError, match="model.task_texts.image_to_seg"):
        check_task_texts([too_long], tokenizer)


def build(tmp_path, train_vae_decoder: bool):
    components = micro_components(caption_vocabulary(), tmp_path, seed=0)
    options = PromptDiffusionOptions(train_vae_decoder=train_vae_decoder, vae_decoder_samples=2, text_dropout=0, pair_dropout=0, both_dropout=0)
    freeze_backbone(components, options)  # the head's own freezing
    controlnet = PromptDiffusionControlNetModel.from_unet(components.unet, conditioning_embedding_out_channels=(8, 8, 8))
    empty = components.tokenizer([""], padding="max_length", max_length=16, return_tensors="pt").input_ids
    return components, PromptDiffusionModel(components, controlnet, options, empty)


def inputs(components, n=3):
    triplets = [as_tensors(synthetic_triplet(i, load_task("image_to_depth"), 32, "layout")) for i in range(n)]
    stacked = [torch.stack([t[k] for t in triplets]) for k in ("example_source", "example_target", "query", "target")]
    ids = components.tokenizer([t["caption"] for t in triplets], padding="max_length", max_length=16, return_tensors="pt").input_ids
    return stacked + [ids]


def test_vae_decoder_option_adds_the_reconstruction_loss_and_trains_only_the_decoder(tmp_path):
    components, model = build(tmp_path, train_vae_decoder=True)
    source, target_map, query, target, ids = inputs(components)
    torch.manual_seed(4)
    loss = model(source, target_map, query, target, ids)
    # The eps loss alone, with the same draws, from the model without the option.
    _, plain = build(tmp_path / "plain", train_vae_decoder=False)
    plain.controlnet.load_state_dict(model.controlnet.state_dict())
    torch.manual_seed(4)
    eps_loss = plain(source, target_map, query, target, ids)
    torch.manual_seed(4)
    torch.rand(3)  # the dropout draw comes first
    with torch.no_grad():
        latents = components.vae.encode(target).latent_dist.sample()
        expected = F.mse_loss(components.vae.decode(latents[:2]).sample, target[:2])
    assert abs(loss.item() - eps_loss.item() - expected.item()) < 1e-5
    loss.backward()
    decoder = set(vae_decoder_parameter_names(components.vae))
    assert decoder and all(n.startswith(("decoder.", "post_quant_conv.")) for n in decoder)
    for name, param in components.vae.named_parameters():
        assert (param.grad is not None) == (name in decoder), name
    assert not any(p.requires_grad for p in [*components.unet.parameters(), *components.text_encoder.parameters()])
    assert any(n.startswith("vae.decoder.") for n, p in model.named_parameters() if p.requires_grad)
    assert not any(n.startswith("vae.encoder.") for n, p in model.named_parameters() if p.requires_grad)
