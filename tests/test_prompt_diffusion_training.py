"""Prompt Diffusion training: which parameters learn, condition dropout rates, the loss, the data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from incontext_diffusion.core.tiny import micro_components
from incontext_diffusion.data.synthscenes import caption_vocabulary
from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.prompt_diffusion.controlnet import PromptDiffusionControlNetModel
from incontext_diffusion.heads.prompt_diffusion.data import SyntheticTriplets, as_tensors
from incontext_diffusion.heads.prompt_diffusion.head import (
    PromptDiffusionHead,
    PromptDiffusionModel,
    PromptDiffusionOptions,
    draw_condition_dropout,
    freeze_backbone,
)
from incontext_diffusion.recipes import load_recipe, load_task, validate

torch.set_num_threads(2)
TASKS = ["image_to_depth", "depth_to_image", "image_to_seg", "hed_to_image"]


def build(tmp_path, **options):
    components = micro_components(caption_vocabulary(), tmp_path, seed=0)
    opts = PromptDiffusionOptions(**options)
    freeze_backbone(components, opts)  # the head's own freezing
    controlnet = PromptDiffusionControlNetModel.from_unet(components.unet, conditioning_embedding_out_channels=(8, 8, 8))
    empty = components.tokenizer([""], padding="max_length", max_length=16, return_tensors="pt").input_ids
    return components, PromptDiffusionModel(components, controlnet, opts, empty)


def batch(components, n=2):
    triplets = [as_tensors(t) for t in SyntheticTriplets(n, [load_task(name) for name in TASKS], size=32, seed=5)]
    stacked = {k: torch.stack([t[k] for t in triplets]) for k in ("example_source", "example_target", "query", "target")}
    ids = components.tokenizer([t["caption"] for t in triplets], padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    return stacked | {"input_ids": ids}


@pytest.mark.parametrize("decoder", [False, True])
def test_only_the_controlnet_and_optionally_the_unet_decoder_get_gradients(tmp_path, decoder):
    components, model = build(tmp_path, train_unet_decoder=decoder)
    inputs = batch(components)
    loss = model(inputs["example_source"], inputs["example_target"], inputs["query"], inputs["target"], inputs["input_ids"])
    loss.backward()
    controlnet_grads = [p.grad for p in model.controlnet.parameters()]
    assert all(g is not None for g in controlnet_grads) and any(g.abs().sum() > 0 for g in controlnet_grads)
    for name, param in components.unet.named_parameters():
        in_decoder = name.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))
        assert (param.grad is not None) == (decoder and in_decoder), name
    assert all(p.grad is None for p in components.vae.parameters())
    assert all(p.grad is None for p in components.text_encoder.parameters())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("unet.up_blocks.") for n in trainable) == decoder
    assert not any(n.startswith("unet.down_blocks.") for n in trainable)


@pytest.mark.parametrize("controlnet_lr", [None, 1e-3])
def test_parameter_groups_give_the_controlnet_its_own_learning_rate(tmp_path, controlnet_lr):
    components, model = build(tmp_path, train_unet_decoder=True, controlnet_learning_rate=controlnet_lr)
    head = object.__new__(PromptDiffusionHead)  # parameter_groups reads only the options
    head.options = model.options
    groups = head.parameter_groups(model, 3e-4)
    assert [g["lr"] for g in groups] == [controlnet_lr or 3e-4, 3e-4]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.controlnet.parameters()}
    decoder = [p for n, p in components.unet.named_parameters() if n.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in decoder}


def test_condition_dropout_rates_follow_the_paper():
    torch.manual_seed(0)
    drop_text, drop_pair = draw_condition_dropout(200_000, PromptDiffusionOptions(), torch.device("cpu"))
    rates = {"text": drop_text.float().mean(), "pair": drop_pair.float().mean(), "both": (drop_text & drop_pair).float().mean(),
             "text only": (drop_text & ~drop_pair).float().mean(), "pair only": (drop_pair & ~drop_text).float().mean()}
    expected = {"text": 0.10, "pair": 0.10, "both": 0.05, "text only": 0.05, "pair only": 0.05}
    for key in expected:
        assert abs(rates[key].item() - expected[key]) < 0.003, (key, rates[key])


def test_loss_is_eps_mse_against_a_ddpm_scheduler_with_the_same_betas(tmp_path):
    components, model = build(tmp_path, text_dropout=0.0, pair_dropout=0.0, both_dropout=0.0)
    inputs = batch(components)
    torch.manual_seed(3)
    loss = model(inputs["example_source"], inputs["example_target"], inputs["query"], inputs["target"], inputs["input_ids"])
    # Replay the same draws by hand: dropout r, then the VAE sample, noise and timesteps.
    torch.manual_seed(3)
    torch.rand(2)
    with torch.no_grad():
        latents = components.vae.encode(inputs["target"]).latent_dist.sample() * components.vae.config.scaling_factor
        noise = torch.randn_like(latents.contiguous())  # the model draws noise for contiguous latents
        t = torch.randint(0, 1000, (2,))
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        noisy = scheduler.add_noise(latents, noise, t)
        text = components.text_encoder(inputs["input_ids"])[0]
        pair = torch.cat([inputs["example_source"], inputs["example_target"]], 1)
        down, mid = model.controlnet(noisy, t, text, pair, inputs["query"], return_dict=False)
        eps = components.unet(noisy, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert abs(loss.item() - F.mse_loss(eps, noise).item()) < 1e-6


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    components, model = build(tmp_path)
    inputs = batch(components, n=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def fixed_loss():
        torch.manual_seed(0)  # the same noise and timesteps each time: only the weights change
        return model(inputs["example_source"], inputs["example_target"], inputs["query"], inputs["target"], inputs["input_ids"])

    first = fixed_loss().item()
    for _ in range(8):
        optimizer.zero_grad()
        fixed_loss().backward()
        optimizer.step()
    assert fixed_loss().item() < 0.95 * first


def test_synthetic_triplets_are_deterministic_and_task_consistent():
    tasks = [load_task(name) for name in TASKS]
    data = SyntheticTriplets(40, tasks, size=32, seed=0)
    a, b = data[7], data[7]
    assert all(np.array_equal(a[k], b[k]) for k in ("example_source", "example_target", "query", "target"))
    names = [data[i]["task"] for i in range(40)]
    assert set(names) == set(TASKS)  # uniform draw over the recipe's tasks covers all of them
    depth = next(data[i] for i in range(40) if data[i]["task"] == "image_to_depth")
    assert depth["query"].shape == (32, 32, 3) and (depth["target"][..., 0] == depth["target"][..., 1]).all()  # gray map
    assert not np.array_equal(depth["example_source"], depth["query"])  # example and query come from different scenes


def test_recipe_options_are_validated():
    recipe = load_recipe("prompt_diffusion-tiny")
    assert validate(PromptDiffusionOptions, recipe.model, "x").conditioning_range == "[-1, 1]"
    with pytest.raises(UserError, match="model.train_unet_decodr"):
        validate(PromptDiffusionOptions, {"train_unet_decodr": True}, "recipe", prefix="model.")
    with pytest.raises(UserError, match="both_dropout"):
        validate(PromptDiffusionOptions, {"both_dropout": 0.2}, "recipe", prefix="model.")
    sd = load_recipe("prompt_diffusion")
    assert sd.backbone == "stable-diffusion-v1-5/stable-diffusion-v1-5" and sd.data.size == 256 and sd.train.learning_rate == 1e-4
