"""Prompt Diffusion: fixed texts of the forward tasks."""

import pytest
import torch

from incontext_diffusion.core.tiny import micro_components
from incontext_diffusion.data.synthscenes import caption_vocabulary
from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.prompt_diffusion.data import HELD_OUT_SEED, synthetic_triplet, with_task_texts
from incontext_diffusion.heads.prompt_diffusion.head import PromptDiffusionOptions, check_task_texts
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
