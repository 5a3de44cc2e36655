"""MetaPrompts model: feature taps (scoped to one forward call), loops, gradients."""


import pytest
import torch
from diffusers import UNet2DConditionModel

from incontext_diffusion.core.tiny import build_unet, micro_components
from incontext_diffusion.data.synthscenes import caption_vocabulary
from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.meta_prompts.decoders import MetaPromptsDepthHead, MetaPromptsSegmentationHead, reweight
from incontext_diffusion.heads.meta_prompts.model import build_model, feature_channels, tap_modules, time_embedding_dim

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return micro_components(caption_vocabulary(), tmp_path_factory.mktemp("tok"), seed=0)


def depth_head(unet, num_loops=3, **kwargs):
    return MetaPromptsDepthHead(
        feature_channels=tuple(feature_channels(unet)), prompt_dim=unet.config.cross_attention_dim, time_embedding_dim=time_embedding_dim(unet),
        num_prompts=5, num_loops=num_loops, num_deconv=2, decoder_channels=8, resize_scale=0, input_multiple=32, **kwargs,
    )


def seg_head(unet, num_loops=3):
    return MetaPromptsSegmentationHead(
        feature_channels=tuple(feature_channels(unet)), prompt_dim=unet.config.cross_attention_dim, time_embedding_dim=time_embedding_dim(unet),
        num_prompts=6, num_classes=4, num_loops=num_loops, channels=8, auxiliary_channels=8, input_multiple=32,
    )


def randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Diffusers zero-initialises conv_out; random weights make the feedback carry information."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def test_tap_shapes_and_order(components):
    unet = build_unet("micro")
    model = build_model(components.vae, unet, depth_head(unet))
    loops = model.features(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert len(loops) == 3
    # 32x32 image -> 8x8 latents (VAE x4); f0 at 8, f1 4, f2 2, f3 1 (fine -> coarse)
    assert [tuple(f.shape) for f in loops[-1]] == [(2, 8, 8, 8), (2, 8, 4, 4), (2, 8, 2, 2), (2, 8, 1, 1)]
    # the taps are the documented modules
    blocks = unet.up_blocks
    assert tap_modules(unet) == [blocks[3], blocks[2].attentions[1], blocks[1].attentions[1], blocks[0].resnets[1]]


def test_sd15_shaped_channels():
    with torch.device("meta"):  # the SD1.5 shape, without allocating it
        unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)
    assert feature_channels(unet) == [320, 640, 1280, 1280]
    assert time_embedding_dim(unet) == 1280
    assert len(tap_modules(unet)) == 4


def test_unet_without_taps_is_refused():
    unet = UNet2DConditionModel(block_out_channels=(8, 8), down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                norm_num_groups=4, cross_attention_dim=8, layers_per_block=1)
    with pytest.raises(UserError, match="4 up blocks"):
        tap_modules(unet)


def test_feedback_and_time_vectors_reach_the_unet(components):
    unet = build_unet("micro")
    randomise(unet)
    model = build_model(components.vae, unet, depth_head(unet))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loops = model.features(x)
    # each loop sees another input (the feedback) and another time vector: the features differ
    assert not torch.allclose(loops[0][0], loops[1][0])
    # the time vector really is the temb: changing t_k changes that loop's features
    with torch.no_grad():
        model.head.time_embeddings[0] += 1.0
    assert not torch.allclose(model.features(x)[0][0], loops[0][0])


def test_num_loops_changes_the_output(components):
    unet = build_unet("micro")
    randomise(unet)
    head3 = depth_head(unet, num_loops=3)
    randomise(head3, seed=2)  # the official init makes the output nearly constant at first
    head1 = depth_head(unet, num_loops=1)
    # the same weights, the one loop using the last loop's prompts, adapter and time vector
    state = head3.state_dict()
    mapped = {k: v for k, v in state.items() if not k.startswith(("meta_prompts.", "prompt_adapters.", "time_embeddings"))}
    mapped["meta_prompts.0"], mapped["time_embeddings"] = state["meta_prompts.2"], state["time_embeddings"][2:]
    mapped.update({k.replace("prompt_adapters.2", "prompt_adapters.0"): v for k, v in state.items() if k.startswith("prompt_adapters.2")})
    head1.load_state_dict(mapped)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        d3 = build_model(components.vae, unet, head3).eval()(x)
        d1 = build_model(components.vae, unet, head1).eval()(x)  # a second model on the same UNet
    assert d1.shape == d3.shape == (2, 1, 32, 32)
    assert (d3 - d1).abs().max() > 1e-3


def test_hooks_live_only_inside_a_forward_call(components):
    unet = build_unet("micro")
    randomise(unet)
    # batch 2: the micro UNet's 1x1 bottleneck needs more than one value per GroupNorm group
    sample, timestep, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 3, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(sample, timestep, encoder_hidden_states=context).sample
        model = build_model(components.vae, unet, depth_head(unet))
        model(torch.rand(2, 3, 32, 32) * 2 - 1)
        after = unet(sample, timestep, encoder_hidden_states=context).sample  # the real time embedding again
    assert torch.equal(before, after)
    hooked = [m for m in unet.modules() if m._forward_hooks]
    assert hooked == []


def test_gradients_reach_prompts_time_vectors_decoders_and_unet(components):
    unet = build_unet("micro")
    randomise(unet)
    head = depth_head(unet)
    model = build_model(components.vae, unet, head)
    model(torch.rand(2, 3, 32, 32) * 2 - 1).mean().backward()
    for name in ["meta_prompts.0", "meta_prompts.2", "time_embeddings", "prompt_adapters.0.0.weight", "decoder.conv_layers.0.weight",
                 "last_layer_depth.2.weight", "layer4.deconv_layers.0.weight", "out_layer.0.weight"]:
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # every loop's time vector gets a gradient (the refinement is differentiable end to end)
    assert (head.time_embeddings.grad.abs().sum(dim=1) > 0).all()
    assert unet.conv_out.weight.grad.abs().sum() > 0  # the feedback head is trained
    assert unet.time_embedding.linear_1.weight.grad is None  # bypassed and frozen
    assert all(p.grad is None for p in components.vae.parameters())


def test_segmentation_gradients_and_shapes(components):
    unet = build_unet("micro")
    randomise(unet)
    head = seg_head(unet)
    model = build_model(components.vae, unet, head)
    logits, aux = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert logits.shape == aux.shape == (2, 4, 32, 32)
    (logits.mean() + aux.mean()).backward()
    assert head.meta_prompts.grad.abs().sum() > 0
    assert (head.time_embeddings.grad.abs().sum(dim=1) > 0).all()
    assert head.decode_head.classifier.weight.grad.abs().sum() > 0
    assert head.auxiliary_head.classifier.weight.grad.abs().sum() > 0


def test_reweight_is_a_plain_dot_product():
    features = torch.tensor([[[[1.0]], [[2.0]]]])  # (1, C=2, 1, 1)
    prompts = torch.tensor([[[3.0, 4.0], [1.0, -1.0]]])  # (1, N=2, C=2)
    assert reweight(features, prompts).flatten().tolist() == [11.0, -1.0]


def test_depth_prompts_broadcast_for_any_batch(components):
    head = depth_head(build_unet("micro"))
    for batch in (1, 5, 50):  # the official adapter changed shape when batch == num_prompts (50)
        assert all(c.shape == (batch, 5, 8) for c in head.contexts(batch))


def test_silog_training_lowers_the_loss(components):
    from incontext_diffusion.heads.meta_prompts.losses import silog_loss

    torch.manual_seed(0)
    unet = build_unet("micro")
    model = build_model(components.vae, unet, depth_head(unet))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    depth = 1.0 + 4.0 * (images[:, :1] + 1) / 2  # a depth the image explains
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = silog_loss(model(images), depth)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses  # SiLog in log-metres: 0.62 -> under 0.55 here
