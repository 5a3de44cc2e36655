"""Prompt Diffusion: ControlNet parity with diffusers, pipeline parity with a hand-written loop, input errors."""


import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from PIL import Image

from incontext_diffusion.core.tiny import inference_scheduler, micro_components
from incontext_diffusion.data.synthscenes import caption_vocabulary
from incontext_diffusion.heads.prompt_diffusion.controlnet import PromptDiffusionControlNetModel, conditioning_channels_for
from incontext_diffusion.heads.prompt_diffusion.pipeline import PromptDiffusionPipeline

torch.set_num_threads(2)
EMBEDDING = (8, 8, 8)  # x4, the micro VAE's factor


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return micro_components(caption_vocabulary(), tmp_path_factory.mktemp("tok"), seed=0)


def randomised_controlnet(unet, seed=1) -> PromptDiffusionControlNetModel:
    """A ControlNet whose zero-initialised layers are random, so that parity tests can fail."""
    torch.manual_seed(seed)
    controlnet = PromptDiffusionControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING)
    zero_init = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_query_cond_embedding.conv_out,
                 *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    for layer in zero_init:
        for param in layer.parameters():
            torch.nn.init.normal_(param, std=0.3)
    return controlnet.eval()


class SummedEmbedding(torch.nn.Module):
    """Reference conditioning: pair embedding + query embedding, for diffusers' own ControlNetModel."""

    def __init__(self, pair_embedding, query_embedding):
        super().__init__()
        self.pair_embedding, self.query_embedding = pair_embedding, query_embedding
        self.query = None

    def forward(self, pair):
        return self.pair_embedding(pair) + self.query_embedding(self.query)


def test_controlnet_matches_diffusers_controlnet_with_summed_embedding(components):
    ours = randomised_controlnet(components.unet)
    reference = ControlNetModel.from_config(dict(ours.config)).eval()
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("controlnet_query_cond_embedding.") for k in unexpected) and unexpected
    query_embedding = ControlNetConditioningEmbedding(ours.config.block_out_channels[0], 3, EMBEDDING)
    query_embedding.load_state_dict(ours.controlnet_query_cond_embedding.state_dict())
    reference.controlnet_cond_embedding = SummedEmbedding(reference.controlnet_cond_embedding, query_embedding)

    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 16, 8)
    pair, query = torch.rand(2, 6, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        down, mid = ours(x, t, text, pair, query, return_dict=False)
        reference.controlnet_cond_embedding.query = query
        ref_down, ref_mid = reference(x, t, text, pair, return_dict=False)
    assert len(down) == len(ref_down) == 8  # conv_in + 4 levels x (1 resnet + 3 downsamplers) for the micro UNet
    diffs = [(a - b).abs().max().item() for a, b in zip([*down, mid], [*ref_down, ref_mid])]
    assert max(diffs) <= 1e-5, diffs
    # The query matters: another query changes the residuals (the hook really adds it).
    with torch.no_grad():
        other = ours(x, t, text, pair, -query, return_dict=False)[1]
    assert (other - mid).abs().max() > 1e-3


def test_fresh_controlnet_is_the_identity_and_keeps_diffusers_keys(components, tmp_path):
    controlnet = PromptDiffusionControlNetModel.from_unet(components.unet, conditioning_embedding_out_channels=EMBEDDING)
    down, mid = controlnet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 16, 8), torch.randn(1, 6, 64, 64), torch.randn(1, 3, 64, 64), return_dict=False)
    assert all(r.abs().max() == 0 for r in [*down, mid])  # zero convs: the UNet starts unchanged
    keys = controlnet.state_dict().keys()
    assert {"controlnet_cond_embedding.conv_in.weight", "controlnet_query_cond_embedding.conv_out.bias", "controlnet_mid_block.weight"} <= set(keys)
    assert controlnet.controlnet_cond_embedding.conv_in.weight.shape[1] == 6
    assert controlnet.controlnet_query_cond_embedding.conv_in.weight.shape[1] == 3
    controlnet.save_pretrained(tmp_path)
    loaded = PromptDiffusionControlNetModel.from_pretrained(tmp_path)
    loaded.load_state_dict(controlnet.state_dict(), strict=True)
    assert loaded.config.conditioning_embedding_out_channels == list(EMBEDDING) or tuple(loaded.config.conditioning_embedding_out_channels) == EMBEDDING


def test_conditioning_channels_follow_the_vae_factor():
    assert conditioning_channels_for(8) == (16, 32, 96, 256)
    assert conditioning_channels_for(4) == (16, 32, 96)
    with pytest.raises(ValueError):
        conditioning_channels_for(6)


def make_pipeline(components, controlnet, conditioning_range="[-1, 1]"):
    pipe = PromptDiffusionPipeline(components.vae, components.text_encoder, components.tokenizer, components.unet, controlnet, inference_scheduler(), conditioning_range)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hand_written_loop(components, controlnet, pair, query, text, negative, steps, guidance, seed):
    """DDIM + classifier-free guidance written out: the images stay in both halves, only the text changes."""
    scheduler = inference_scheduler()
    scheduler.set_timesteps(steps)
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    context = torch.cat([negative, text])
    for t in scheduler.timesteps:
        doubled = torch.cat([latents, latents])
        down, mid = controlnet(doubled, t, context, pair.repeat(2, 1, 1, 1), query.repeat(2, 1, 1, 1), return_dict=False)
        eps = components.unet(doubled, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        uncond, cond = eps.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    image = components.vae.decode(latents / components.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("conditioning_range", ["[-1, 1]", "[0, 1]"])
def test_pipeline_equals_hand_written_ddim_cfg_loop(components, conditioning_range):
    controlnet = randomised_controlnet(components.unet)
    pipe = make_pipeline(components, controlnet, conditioning_range)
    torch.manual_seed(0)
    source, target, query = torch.rand(3, 3, 64, 64).unbind(0)  # pixels in [0, 1]
    text, negative = components.encode_text(["a red cube"]), components.encode_text([""])
    out = pipe("a red cube", query, [source, target], num_inference_steps=3, guidance_scale=6.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    to_range = (lambda x: 2 * x - 1) if conditioning_range == "[-1, 1]" else (lambda x: x)
    with torch.no_grad():
        expected = hand_written_loop(components, controlnet, to_range(torch.cat([source, target]))[None], to_range(query)[None], text, negative, 3, 6.0, 0)
    assert out.shape == (1, 3, 64, 64)
    assert (out - expected).abs().max().item() <= 1e-5


def test_pipeline_accepts_paths_pil_arrays_and_tensors_alike(components, tmp_path):
    pipe = make_pipeline(components, randomised_controlnet(components.unet))
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    paths = []
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    kinds = [arrays, paths, [Image.fromarray(a) for a in arrays], [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays],
             [a.astype(np.float32) / 255 for a in arrays]]
    conditionings = [pipe.prepare_conditioning(images[2], images[:2], 64, 64) for images in kinds]
    pair, query = conditionings[0]
    assert pair.shape == (1, 6, 64, 64) and query.shape == (1, 3, 64, 64)
    assert torch.allclose(pair[0, 3:], torch.from_numpy(arrays[1]).permute(2, 0, 1).float() / 127.5 - 1)  # [source, target], in [-1, 1]
    for other_pair, other_query in conditionings[1:]:
        assert (other_pair - pair).abs().max() < 1e-6 and (other_query - query).abs().max() < 1e-6


def test_conditioning_range_changes_the_output(components):
    controlnet = randomised_controlnet(components.unet)
    source, target, query = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)).unbind(0)
    outputs = [make_pipeline(components, controlnet, r)("a cube", query, [source, target], num_inference_steps=2, guidance_scale=3.0,
                                                        generator=torch.Generator().manual_seed(1), output_type="np").images for r in ("[-1, 1]", "[0, 1]")]
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-4


def test_pipeline_rejects_bad_inputs_with_clear_errors(components):
    pipe = make_pipeline(components, randomised_controlnet(components.unet))
    image = torch.rand(3, 64, 64)
    with pytest.raises(ValueError, match="exactly two images|\\[example source, example target\\]"):
        pipe("x", image, [image], num_inference_steps=1)
    with pytest.raises(ValueError, match="\\[example source, example target\\]"):
        pipe("x", image, image, num_inference_steps=1)
    with pytest.raises(ValueError, match="2 example pairs for 3 queries"):
        pipe("x", [image] * 3, [[image, image]] * 2, num_inference_steps=1)
    with pytest.raises(ValueError, match="2 prompts for 3 queries"):
        pipe(["x", "y"], [image] * 3, [image, image], num_inference_steps=1)
    with pytest.raises(ValueError, match="smaller than the latent factor 4"):
        pipe("x", torch.rand(3, 3, 3), [image, image], num_inference_steps=1)


def test_pipeline_save_and_load_round_trip(components, tmp_path):
    pipe = make_pipeline(components, randomised_controlnet(components.unet), "[0, 1]")
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = PromptDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.config.conditioning_range == "[0, 1]"
    assert isinstance(loaded.controlnet, PromptDiffusionControlNetModel)
    for a, b in zip(pipe.controlnet.state_dict().values(), loaded.controlnet.state_dict().values()):
        assert torch.equal(a, b)
