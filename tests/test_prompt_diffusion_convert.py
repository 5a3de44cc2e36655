"""Converter round trip: a tiny ldm-layout Prompt Diffusion checkpoint, built here from the spec's key
table (§5.2), converts back to exactly the weights it was built from."""

import pytest
import torch
from safetensors.torch import save_file

from incontext_diffusion.core.components import save_components
from incontext_diffusion.core.tiny import micro_components
from incontext_diffusion.data.synthscenes import caption_vocabulary
from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.prompt_diffusion.controlnet import PromptDiffusionControlNetModel
from incontext_diffusion.heads.prompt_diffusion.convert import convert_checkpoint, convert_state, load_state_dict
from incontext_diffusion.heads.prompt_diffusion.evaluate import load_pipeline
from ldm_names import ldm_unet_key

class Opaque:
    """An object that only unpickling can rebuild: such a checkpoint is refused without --trust-pickle."""


def random_controlnet(unet) -> PromptDiffusionControlNetModel:
    controlnet = PromptDiffusionControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8))
    with torch.no_grad():
        for param in controlnet.parameters():
            param.normal_()  # every tensor distinct, so a swapped key cannot pass
    return controlnet


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    folder = tmp_path_factory.mktemp("micro")
    components = micro_components(caption_vocabulary(), folder / "tok", seed=0)
    save_components(components, folder / "base")
    return components, folder / "base"


def ldm_checkpoint(components, controlnet) -> dict:
    state = {"control_model." + ldm_unet_key(k, controlnet.config): v.clone() for k, v in controlnet.state_dict().items()}
    unet = {k: v + 1.0 for k, v in components.unet.state_dict().items()}  # the "trained" UNet differs from the base one
    state |= {"model.diffusion_model." + ldm_unet_key(k, components.unet.config): v for k, v in unet.items()}
    return state, unet


def test_every_key_is_mapped_and_values_are_equal(micro):
    components, base_dir = micro
    controlnet = random_controlnet(components.unet)
    state, trained_unet = ldm_checkpoint(components, controlnet)
    assert any(k.startswith("control_model.input_cond_block.") for k in state) and any(k.startswith("control_model.input_hint_block.10") for k in state)
    from incontext_diffusion.core.components import load_components

    converted_components, converted = convert_state(state, load_components(str(base_dir)))
    assert converted.state_dict().keys() == controlnet.state_dict().keys()
    for key, value in controlnet.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    for key, value in trained_unet.items():  # the UNet comes from the checkpoint, not from the base
        assert torch.equal(converted_components.unet.state_dict()[key], value), key


def test_leftover_keys_are_refused(micro):
    components, base_dir = micro
    state, _ = ldm_checkpoint(components, random_controlnet(components.unet))
    state["control_model.extra_block.0.weight"] = torch.zeros(1)
    from incontext_diffusion.core.components import load_components

    with pytest.raises(UserError, match="control_model"):
        convert_state(state, load_components(str(base_dir)))


def test_cli_converter_writes_a_loadable_pipeline_and_refuses_pickles(micro, tmp_path):
    components, base_dir = micro
    controlnet = random_controlnet(components.unet)
    state, _ = ldm_checkpoint(components, controlnet)
    torch.save({"state_dict": state}, tmp_path / "plain.ckpt")
    out = convert_checkpoint(tmp_path / "plain.ckpt", tmp_path / "model", config=str(base_dir))
    pipe = load_pipeline(out)
    assert torch.equal(pipe.controlnet.controlnet_query_cond_embedding.conv_in.weight, controlnet.controlnet_query_cond_embedding.conv_in.weight)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "weights.safetensors"))
    assert load_state_dict(tmp_path / "weights.safetensors").keys() == state.keys()

    torch.save({"state_dict": state, "extra": Opaque()}, tmp_path / "pickled.ckpt")
    with pytest.raises(UserError, match="--trust-pickle"):
        load_state_dict(tmp_path / "pickled.ckpt")
    with pytest.raises(UserError, match="already exists"):
        convert_checkpoint(tmp_path / "plain.ckpt", tmp_path / "model", config=str(base_dir))


def test_icd_convert_sets_the_conditioning_range(micro, tmp_path, monkeypatch, capsys):
    from cli_helpers import run_icd

    components, base_dir = micro
    state, _ = ldm_checkpoint(components, random_controlnet(components.unet))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "weights.safetensors"))
    code, _, err = run_icd(monkeypatch, capsys, "convert", "prompt-diffusion", str(tmp_path / "weights.safetensors"), str(tmp_path / "port"),
                           "--config", str(base_dir), "--conditioning-range", "[0,1]")
    assert code == 0, err
    assert load_pipeline(tmp_path / "port").config.conditioning_range == "[0, 1]"
    capsys.readouterr()  # the loading bars of the check above are not the next command's
    code, _, err = run_icd(monkeypatch, capsys, "convert", "prompt-diffusion", str(tmp_path / "weights.safetensors"), str(tmp_path / "bad"),
                           "--config", str(base_dir), "--conditioning-range", "0..1")
    assert code == 2 and "--conditioning-range '0..1' is not known" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
