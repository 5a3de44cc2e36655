"""Converters for the released Diff-Prompt checkpoints: tiny state dicts in the official layouts, built here
(DiT-main/models.py names, timm's PatchEmbed/Mlp; unique_vae's AutoencoderKL, Lightning prefix), convert with
every key placed and none left over, and the converted models compute what a reference written here computes."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.diff_prompt.convert import convert_dit, convert_mask_vae, write_dit_folder, write_mask_vae_folder
from incontext_diffusion.heads.diff_prompt.dit import sincos_pos_embed_2d
from incontext_diffusion.heads.diff_prompt.mask_vae import build_mask_vae
from incontext_diffusion.heads.diff_prompt.pipeline import DiffPromptMaskPipeline

HIDDEN, DEPTH, HEADS, PATCH, GRID, CHANNELS = 16, 2, 2, 2, 3, 4


class Opaque:
    """Only unpickling can rebuild this: a checkpoint holding it needs --trust-pickle."""


def test_position_embedding_puts_the_column_half_first():
    # dim 8, grid 2: omega = 1 / 10000 ** ([0, 1] / 2) = [1, 0.01]; token 1 is row 0, column 1.
    table = sincos_pos_embed_2d(8, 2)
    column, row = 1.0, 0.0
    expected = [math.sin(column), math.sin(column * 0.01), math.cos(column), math.cos(column * 0.01),
                math.sin(row), math.sin(row * 0.01), math.cos(row), math.cos(row * 0.01)]
    assert np.allclose(table[1], expected, atol=1e-7)
    assert np.allclose(table[2, :4], [0, 0, 1, 1]) and not np.allclose(table[2, 4:], [0, 0, 1, 1])  # token 2: row 1, column 0


def official_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE/DiT's table written out per token: [sin(x w), cos(x w), sin(y w), cos(y w)], x the column."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    rows = []
    for k in range(grid * grid):
        y, x = divmod(k, grid)
        rows.append(np.concatenate([np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]))
    return torch.tensor(np.stack(rows), dtype=torch.float32)[None]


def official_dit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random DiT in the official key layout (learn_sigma: 2 x 4 output channels)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"x_embedder.proj.weight": (HIDDEN, CHANNELS, PATCH, PATCH), "x_embedder.proj.bias": (HIDDEN,),
              "t_embedder.mlp.0.weight": (HIDDEN, 256), "t_embedder.mlp.0.bias": (HIDDEN,),
              "t_embedder.mlp.2.weight": (HIDDEN, HIDDEN), "t_embedder.mlp.2.bias": (HIDDEN,),
              "final_layer.linear.weight": (PATCH * PATCH * 2 * CHANNELS, HIDDEN), "final_layer.linear.bias": (PATCH * PATCH * 2 * CHANNELS,),
              "final_layer.adaLN_modulation.1.weight": (2 * HIDDEN, 2 * HIDDEN), "final_layer.adaLN_modulation.1.bias": (2 * HIDDEN,)}
    for i in range(DEPTH):
        shapes |= {f"blocks.{i}.attn.qkv.weight": (3 * HIDDEN, HIDDEN), f"blocks.{i}.attn.qkv.bias": (3 * HIDDEN,),
                   f"blocks.{i}.attn.proj.weight": (HIDDEN, HIDDEN), f"blocks.{i}.attn.proj.bias": (HIDDEN,),
                   f"blocks.{i}.mlp.fc1.weight": (4 * HIDDEN, HIDDEN), f"blocks.{i}.mlp.fc1.bias": (4 * HIDDEN,),
                   f"blocks.{i}.mlp.fc2.weight": (HIDDEN, 4 * HIDDEN), f"blocks.{i}.mlp.fc2.bias": (HIDDEN,),
                   f"blocks.{i}.adaLN_modulation.1.weight": (6 * HIDDEN, 2 * HIDDEN), f"blocks.{i}.adaLN_modulation.1.bias": (6 * HIDDEN,)}
    state = {k: 0.3 * torch.randn(shape, generator=g) for k, shape in shapes.items()}
    state["pos_embed"] = official_pos_embed(HIDDEN, GRID)
    return state


def reference_dit(s: dict, x: torch.Tensor, t: torch.Tensor, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The official forward written out on the official tensors (softmax attention, timm's names)."""
    def modulate(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    def norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    h = F.conv2d(x, s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2) + s["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    t_freq = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    t_emb = F.linear(F.silu(F.linear(t_freq, s["t_embedder.mlp.0.weight"], s["t_embedder.mlp.0.bias"])), s["t_embedder.mlp.2.weight"], s["t_embedder.mlp.2.bias"])
    c = torch.cat([image + t_emb, text + t_emb], dim=1)  # (B, 2 * hidden)
    b, n, d = h.shape
    for i in range(DEPTH):
        p = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = F.linear(F.silu(c), s[p + "adaLN_modulation.1.weight"], s[p + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
        qkv = F.linear(modulate(norm(h), shift1, scale1), s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"]).view(b, n, 3, HEADS, d // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d / heads)
        attended = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // HEADS), dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        h = h + gate1[:, None] * F.linear(attended, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        hidden = F.gelu(F.linear(modulate(norm(h), shift2, scale2), s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]), approximate="tanh")
        h = h + gate2[:, None] * F.linear(hidden, s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
    shift, scale = F.linear(F.silu(c), s["final_layer.adaLN_modulation.1.weight"], s["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(modulate(norm(h), shift, scale), s["final_layer.linear.weight"], s["final_layer.linear.bias"])  # (B, N, p * p * C)
    out = out.view(b, GRID, GRID, PATCH, PATCH, 2 * CHANNELS)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(b, 2 * CHANNELS, GRID * PATCH, GRID * PATCH)


def write_hub_dit(folder, state):
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "mask_dit", "depth": DEPTH, "hidden_size": HIDDEN, "patch_size": PATCH,
                                                    "num_heads": HEADS, "input_size": GRID * PATCH, "num_classes": 1000}))
    return folder


def test_dit_converter_places_every_tensor_and_matches_the_reference(tmp_path):
    state = official_dit_state()
    dit = convert_dit(write_hub_dit(tmp_path / "mask_dit", state))
    assert (dit.config.hidden_size, dit.config.depth, dit.config.num_heads, dit.config.input_size, dit.config.learn_sigma) == (HIDDEN, DEPTH, HEADS, GRID * PATCH, True)
    ours = dit.state_dict()
    assert torch.equal(ours["x_embedder.weight"], state["x_embedder.proj.weight"])
    assert torch.equal(ours["blocks.1.mlp.0.weight"], state["blocks.1.mlp.fc1.weight"]) and torch.equal(ours["blocks.1.mlp.2.bias"], state["blocks.1.mlp.fc2.bias"])
    assert len(ours) == len(state) - 1  # pos_embed is our fixed buffer, checked rather than loaded

    g = torch.Generator().manual_seed(1)
    x, image, text = torch.randn(2, CHANNELS, GRID * PATCH, GRID * PATCH, generator=g), torch.randn(2, HIDDEN, generator=g), torch.randn(2, HIDDEN, generator=g)
    t = torch.tensor([3.0, 71.0])
    with torch.no_grad():
        assert torch.allclose(dit(x, t, image, text), reference_dit(state, x, t, image, text), atol=1e-5)


def test_dit_converter_refuses_leftovers_missing_tensors_and_a_row_first_table(tmp_path):
    state = official_dit_state()
    with pytest.raises(UserError, match="no place.*blocks.0.attn.q_bias"):
        convert_dit(write_hub_dit(tmp_path / "extra", state | {"blocks.0.attn.q_bias": torch.zeros(HIDDEN)}))
    with pytest.raises(UserError, match="1 are missing.*final_layer.linear.bias"):
        convert_dit(write_hub_dit(tmp_path / "missing", {k: v for k, v in state.items() if k != "final_layer.linear.bias"}))
    row_first = official_pos_embed(HIDDEN, GRID).view(GRID, GRID, HIDDEN).transpose(0, 1).reshape(1, GRID * GRID, HIDDEN)  # x and y swapped
    with pytest.raises(UserError, match="column half first"):
        convert_dit(write_hub_dit(tmp_path / "row_first", state | {"pos_embed": row_first}))


def test_dit_training_checkpoint_takes_the_ema_weights_and_needs_trust_for_pickles(tmp_path):
    ema, raw = official_dit_state(0), official_dit_state(1)
    torch.save({"model": raw, "ema": ema}, tmp_path / "0094200.pt")
    dit = convert_dit(tmp_path / "0094200.pt", num_heads=HEADS)
    assert torch.equal(dit.state_dict()["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    torch.save({"model": raw, "ema": ema, "args": Opaque()}, tmp_path / "pickled.pt")  # train.py saves argparse args
    with pytest.raises(UserError, match="--trust-pickle"):
        convert_dit(tmp_path / "pickled.pt")
    assert torch.equal(convert_dit(tmp_path / "pickled.pt", trust_pickle=True).state_dict()["x_embedder.bias"], ema["x_embedder.proj.bias"])


OFFICIAL_VAE = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    block_out_channels=(4, 8, 16, 16), layers_per_block=2, latent_channels=4, norm_num_groups=2, sample_size=256)  # spec §2


def random_vae(**config) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(**config)
    with torch.no_grad():
        for param in vae.parameters():
            param.normal_(0, 0.2)  # every tensor distinct, so a swapped key cannot pass
    return vae.eval()


def test_real_size_mask_vae_has_the_official_layout():
    ours, official = build_mask_vae(), AutoencoderKL(**OFFICIAL_VAE)
    assert ours.state_dict().keys() == official.state_dict().keys()
    assert sum(p.numel() for p in ours.parameters()) == 85_529  # spec §2 (encoder 35,372 + decoder 50,065 + quant convs)


def test_mask_vae_from_the_lightning_checkpoint_and_the_hub_folder(tmp_path):
    official = random_vae(**OFFICIAL_VAE)
    torch.save({"state_dict": {"model.vae." + k: v for k, v in official.state_dict().items()}, "epoch": 157}, tmp_path / "epoch=157-step=13113.ckpt")
    masks = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    with torch.no_grad():
        reference = official.decode(official.encode(masks).latent_dist.mode()).sample
        for converted in (convert_mask_vae(tmp_path / "epoch=157-step=13113.ckpt"), convert_mask_vae(official.save_pretrained(tmp_path / "hub") or tmp_path / "hub")):
            assert converted.state_dict().keys() == official.state_dict().keys()
            assert torch.equal(converted.decode(converted.encode(masks).latent_dist.mode()).sample, reference)


def test_mask_vae_converter_refuses_the_wrong_depth_and_images(tmp_path):
    shallow = random_vae(**OFFICIAL_VAE | {"layers_per_block": 1})
    torch.save({"state_dict": {"model.vae." + k: v for k, v in shallow.state_dict().items()}}, tmp_path / "shallow.ckpt")
    with pytest.raises(UserError, match="are missing"):
        convert_mask_vae(tmp_path / "shallow.ckpt")
    random_vae(**OFFICIAL_VAE | {"in_channels": 3, "out_channels": 3}).save_pretrained(tmp_path / "rgb")
    with pytest.raises(UserError, match="one-channel"):
        convert_mask_vae(tmp_path / "rgb")


def test_converted_checkpoints_make_a_stage_2_folder_that_loads(tmp_path):
    from incontext_diffusion.heads.diff_prompt.tiny import tiny_clip

    vae = random_vae(**OFFICIAL_VAE | {"block_out_channels": (4, 8), "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2})
    stage1 = write_mask_vae_folder(vae, tmp_path / "stage1", mask_size=GRID * PATCH * 2)
    clip, tokenizer = tiny_clip(HIDDEN, 32, tmp_path / "tok", width=16)
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    state = official_dit_state()
    out = write_dit_folder(convert_dit(write_hub_dit(tmp_path / "mask_dit", state)), stage1, str(tmp_path / "clip"), tmp_path / "stage2")
    pipe = DiffPromptMaskPipeline.from_pretrained(out)
    assert torch.equal(pipe.dit.state_dict()["blocks.0.mlp.2.weight"], state["blocks.0.mlp.fc2.weight"])
    assert json.loads((out / "model_index.json").read_text())["mask_size"] == GRID * PATCH * 2
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.scheduler.config.num_train_timesteps == 100


def test_real_size_grounding_recipe_trains_on_a_converted_dit(tmp_path):
    """The real recipe (diff_prompt_grounding.yaml) on a tiny Grounding DINO and a DiT converted from the official layout:
    3 training steps move the adaptors and nothing else."""
    from incontext_diffusion.core.head import load_head
    from incontext_diffusion.core.trainer import train
    from incontext_diffusion.heads.diff_prompt.hosts import GroundingDinoHost
    from incontext_diffusion.heads.diff_prompt.tiny import tiny_clip, tiny_grounding_dino
    from incontext_diffusion.recipes import load_recipe

    torch.manual_seed(0)
    model, bert_tokenizer = tiny_grounding_dino(tmp_path / "dino_tok", image_size=128)
    GroundingDinoHost(model, bert_tokenizer, image_size=128).save_pretrained(tmp_path / "host")
    vae = random_vae(**OFFICIAL_VAE | {"block_out_channels": (4, 8), "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2})
    stage1 = write_mask_vae_folder(vae, tmp_path / "stage1", mask_size=GRID * PATCH * 2)
    clip, clip_tokenizer = tiny_clip(HIDDEN, 32, tmp_path / "clip_tok", width=16)
    clip.save_pretrained(tmp_path / "clip")
    clip_tokenizer.save_pretrained(tmp_path / "clip")
    stage2 = write_dit_folder(convert_dit(write_hub_dit(tmp_path / "mask_dit", official_dit_state())), stage1, str(tmp_path / "clip"), tmp_path / "stage2")

    recipe = load_recipe("diff_prompt_grounding", [
        f"model.host={tmp_path / 'host'}", f"model.prompt_generator={stage2}", "model.depth=2", "model.ddim_steps=4",  # the tiny DINO has 5 Swin blocks, 2 BERT layers
        "data.source=synthscenes", "data.path=null", "data.size=32", "data.num_samples=2", "data.num_workers=0",  # no RefCOCO offline
        "train.max_steps=3", "train.batch_size=2", "train.mixed_precision='no'", "train.optimizer=adamw", "train.checkpoint_every=3",
        "train.validate_every=3", "train.log_every=1", f"output_dir={tmp_path / 'run'}"])
    assert (recipe.model["prompt_length"], recipe.train.learning_rate, recipe.train.weight_decay) == (8, 1e-4, 0.05)  # the paper's, kept
    head = load_head(recipe)
    head.build()
    before = {k: v.clone() for k, v in head.trainable().state_dict().items()}
    frozen = {k: v.clone() for k, v in head.host.state_dict().items()}
    out = train(head)
    assert (out / "prompts.safetensors").is_file() and (out / "dit").is_dir()
    after = head.trainable().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the adaptors learned
    assert all(torch.equal(frozen[k], v) for k, v in head.host.state_dict().items())  # the host did not
