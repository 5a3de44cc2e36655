"""A whole Stable Diffusion checkpoint in one file (ldm names) loads into the same components."""

import pytest
import torch
from safetensors.torch import save_file

from incontext_diffusion.core.components import TINY_LDM, load_components
from ldm_names import ldm_unet_state, ldm_vae_state


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny")


def single_file_state(components) -> dict[str, torch.Tensor]:
    """The tiny backbone laid out as an original SD checkpoint: model., first_stage_model., cond_stage_model."""
    state = {f"model.diffusion_model.{k}": v for k, v in ldm_unet_state(components.unet).items()}
    state |= {f"first_stage_model.{k}": v for k, v in ldm_vae_state(components.vae).items()}
    # transformers 5 names CLIPTextModel's weights without the `text_model.` level that SD checkpoints have
    text = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in components.text_encoder.state_dict().items()}
    state |= {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
    return {k: v.contiguous().clone() for k, v in state.items()}


def assert_same_weights(loaded, source) -> None:
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(source, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_safetensors_single_file_loads_with_a_local_config(tiny, tmp_path):
    path = tmp_path / "sd.safetensors"
    save_file(single_file_state(tiny), str(path))
    assert_same_weights(load_components(str(path), config=str(TINY_LDM)), tiny)


def test_ckpt_single_file_loads_without_unpickling_code(tiny, tmp_path):
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": single_file_state(tiny), "global_step": 10}, path)  # tensors and ints: weights_only-safe
    assert_same_weights(load_components(str(path), config=str(TINY_LDM)), tiny)
