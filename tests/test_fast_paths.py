"""Each fast path of `train.*` agrees with the default path on micro models (CPU)."""

import sys

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from incontext_diffusion.core.head import load_head
from incontext_diffusion.core.tiny import micro_components
from incontext_diffusion.data.synthscenes import caption_vocabulary
from incontext_diffusion.core.trainer import apply_fast_paths, make_optimizer, train
from incontext_diffusion.errors import UserError
from incontext_diffusion.recipes import TrainConfig, load_recipe


@pytest.fixture(autouse=True)
def restore_global_state():
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def micro_unet_and_inputs(tmp_path):
    unet = micro_components(caption_vocabulary(), tmp_path / "tokenizer", seed=0).unet
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 700]), torch.randn(2, 5, 8, generator=generator))
    return unet, inputs


def test_eager_attention_matches_sdpa(tmp_path):
    unet, inputs = micro_unet_and_inputs(tmp_path)
    with torch.no_grad():
        reference = unet(*inputs).sample
        apply_fast_paths([unet], TrainConfig(attention="eager"))
        eager = unet(*inputs).sample
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor"}
    assert reference.abs().max() > 0.1
    assert (eager - reference).abs().max() <= 1e-5


def test_channels_last_matches_and_changes_the_layout(tmp_path):
    unet, inputs = micro_unet_and_inputs(tmp_path)
    with torch.no_grad():
        reference = unet(*inputs).sample
        apply_fast_paths([unet], TrainConfig(channels_last=True))
        nhwc = unet(*inputs).sample
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not unet.conv_in.weight.is_contiguous()
    assert (nhwc - reference).abs().max() <= 1e-5


def test_compile_matches_in_forward_and_backward_and_keeps_parameter_names(tmp_path):
    vae = micro_components(caption_vocabulary(), tmp_path / "tokenizer", seed=0).vae  # the smallest diffusers model here: a short trace
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    names = list(vae.state_dict())
    vae(images).sample.square().mean().backward()
    reference = {n: p.grad.clone() for n, p in vae.named_parameters()}
    vae.zero_grad(set_to_none=True)
    # aot_eager traces with dynamo and AOT autograd as inductor does, without the C++ code generation a CPU test can't afford.
    apply_fast_paths([torch.nn.ModuleDict({"vae": vae})], TrainConfig(compile=True, compile_backend="aot_eager"))
    assert vae._compiled_call_impl is not None
    vae(images).sample.square().mean().backward()
    assert list(vae.state_dict()) == names  # checkpoints and exports are unchanged
    assert max((p.grad - reference[n]).abs().max().item() for n, p in vae.named_parameters()) <= 1e-5


def optimise(optimizer_name: str, steps: int = 10) -> torch.Tensor:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 128))  # 8192 elements: bitsandbytes keeps >= 4096 in 8 bits
    target = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    optimizer = make_optimizer([{"params": [weight]}], TrainConfig(optimizer=optimizer_name, learning_rate=1e-2))
    for _ in range(steps):
        (weight - target).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return weight.detach(), optimizer


def test_fused_adamw_matches_adamw():
    reference, _ = optimise("adamw")
    fused, optimizer = optimise("adamw_fused")
    assert optimizer.defaults["fused"]
    assert (fused - reference).abs().max() <= 1e-6


def test_8bit_adamw_tracks_adamw_with_8bit_state():
    pytest.importorskip("bitsandbytes")
    start, _ = optimise("adamw", steps=0)
    reference, _ = optimise("adamw")
    eight_bit, optimizer = optimise("adamw_8bit")
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert state["state1"].dtype == torch.uint8  # the moments really are 8-bit
    update, difference = reference - start, eight_bit - reference
    assert difference.norm() / update.norm() < 0.05  # measured 0.02: the quantised moments' error


def test_8bit_adamw_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError, match="adamw_8bit needs bitsandbytes: pip install bitsandbytes"):
        optimise("adamw_8bit")


def test_tf32_switch_sets_and_clears_the_backend_flags():
    apply_fast_paths([], TrainConfig(allow_tf32=True))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    apply_fast_paths([], TrainConfig(allow_tf32=False))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_bf16_autocast_loss_agrees_and_training_keeps_fp32_weights(tmp_path):
    recipe = load_recipe("tiny_ldm-micro", [f"output_dir={tmp_path / 'run'}", "train.mixed_precision=bf16", "train.max_steps=3"])
    head = load_head(recipe)
    head.build()
    model = head.trainable()
    batch = head.collate([head.train_dataset()[i] for i in range(4)])
    losses = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        torch.manual_seed(0)  # the same noise and timesteps for both
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled), torch.no_grad():
            losses[name] = head.loss(model, batch, 0).item()
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.03 * abs(losses["fp32"])

    out = train(load_head(recipe))  # accelerate's bf16 autocast; the trained weights stay fp32
    weights = load_file(str(next(out.glob("unet/*.safetensors"))))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert all(torch.isfinite(w).all() for w in weights.values())
