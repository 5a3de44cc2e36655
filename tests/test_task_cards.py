"""Task cards drive the code: a card names an annotator per modality, looked up in one registry."""

import numpy as np
import pytest

from incontext_diffusion.data import annotators
from incontext_diffusion.data.annotators import annotator_for, register_annotator, synthetic_map
from incontext_diffusion.data.synthscenes import render_scene
from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.prompt_diffusion.data import synthetic_triplet
from incontext_diffusion.recipes import list_tasks, load_task


@pytest.fixture
def inverted_modality(monkeypatch):
    """A new modality, `inverted` (the scene's negative), registered as one function."""
    monkeypatch.setattr(annotators, "ANNOTATORS", dict(annotators.ANNOTATORS))
    register_annotator("negative", "inverted", lambda scene: 255 - scene.rgb)


def test_a_new_modality_is_one_function_and_a_card(inverted_modality, tmp_path):
    card_file = tmp_path / "image_to_inverted.yaml"
    card_file.write_text("description: Draw the negative of an image.\nsource: image\ntarget: inverted\n"
                         "annotator: {inverted: negative}\ntext: negative\n")
    card = load_task(str(card_file))
    scene = render_scene(7, size=32)
    assert np.array_equal(synthetic_map(scene, card.target, card.annotator[card.target]), 255 - scene.rgb)
    # The in-context data of a head picks it up with no edit: query and target are the image and its negative.
    triplet = synthetic_triplet(7, card, 32, "layout")
    assert np.array_equal(triplet["target"], 255 - triplet["query"])
    assert np.array_equal(triplet["example_target"], 255 - triplet["example_source"])
    assert triplet["caption"] == "negative"
    assert annotators.is_map_file(tmp_path / "0001_inverted.png")


def test_every_shipped_card_names_registered_annotators_of_its_modalities():
    for name in list_tasks():
        card = load_task(name)
        for modality in {card.source, card.target} - {"image"}:
            assert annotator_for(modality, card.annotator[modality]).modality == modality
    scene = render_scene(3, size=32)
    assert np.array_equal(synthetic_map(scene, "hed"), np.repeat(scene.edges[:, :, None], 3, axis=2))


def test_cards_with_a_wrong_annotator_are_refused_with_one_line(tmp_path):
    cases = {
        "annotator: {depth: zoe}": "unknown annotator 'zoe'",
        "annotator: {depth: hed}": "annotator 'hed' draws hed maps, not depth",
        "annotator: {}": "names no annotator for depth",
        "annotator: {depth: midas}\nkind: perception": "unknown key 'kind'",  # fields no code read are gone
    }
    for line, message in cases.items():
        card = tmp_path / "card.yaml"
        card.write_text(f"description: d\nsource: image\ntarget: depth\n{line}\n")
        with pytest.raises(UserError, match=message) as err:
            load_task(str(card))
        assert "\n" not in str(err.value)
