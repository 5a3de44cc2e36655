"""Diffusers -> original (ldm) state-dict names, for building single-file stand-ins in tests.

The inverse of what diffusers' single-file loader and the heads' converters read: the UNet (and
ControlNet) in `openaimodel` names, the VAE in `autoencoder` names, CLIP under the `transformer.` prefix.
"""

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet_key(key: str, config) -> str:
    """The ldm name of a diffusers UNet / ControlNet key (the inverse of the spec's table)."""
    per_level = config.layers_per_block + 1
    parts = key.split(".")
    simple = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_norm_out": "out.0", "conv_out": "out.2", "controlnet_mid_block": "middle_block_out.0"}
    head = ".".join(parts[:-1])
    if head in simple:
        return f"{simple[head]}.{parts[-1]}"
    if parts[0] in ("controlnet_cond_embedding", "controlnet_query_cond_embedding"):
        block = "input_hint_block" if parts[0] == "controlnet_cond_embedding" else "input_cond_block"
        n_blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
        index = {"conv_in": 0, "conv_out": 2 * n_blocks + 2}.get(parts[1])
        index = 2 * int(parts[2]) + 2 if index is None else index
        return f"{block}.{index}.{parts[-1]}"
    if parts[0] == "controlnet_down_blocks":
        return f"zero_convs.{parts[1]}.0.{parts[2]}"
    if parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{parts[1]}.{parts[2]}"]
        rest = parts[3:]
    elif parts[0] in ("down_blocks", "up_blocks"):
        level, kind, j = int(parts[1]), parts[2], int(parts[3])
        down = parts[0] == "down_blocks"
        if kind in ("downsamplers", "upsamplers"):
            index = 1 + level * per_level + config.layers_per_block if down else level * per_level + config.layers_per_block
            has_attention = "CrossAttn" in config.up_block_types[level] if not down else False
            slot = "0.op" if down else ("2.conv" if has_attention else "1.conv")
            return f"{'input_blocks' if down else 'output_blocks'}.{index}.{slot}.{parts[-1]}"
        index = (1 + level * per_level + j) if down else level * per_level + j
        rest = [str(0 if kind == "resnets" else 1), *parts[4:]]
        return f"{'input_blocks' if down else 'output_blocks'}.{index}.{'.'.join(rename_resnet(rest))}"
    else:
        raise AssertionError(f"unexpected key {key}")
    return f"middle_block.{index}.{'.'.join(rename_resnet(rest))}"


def rename_resnet(parts: list[str]) -> list[str]:
    if len(parts) == 2 and parts[0] in RESNET:
        return [*RESNET[parts[0]].split("."), parts[1]]
    if len(parts) == 3 and parts[1] in RESNET:  # ["0", "norm1", "weight"]
        return [parts[0], *RESNET[parts[1]].split("."), parts[2]]
    return parts


def ldm_unet_state(unet) -> dict[str, torch.Tensor]:
    return {ldm_unet_key(key, unet.config): value for key, value in unet.state_dict().items()}


VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def ldm_vae_state(vae) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's weights under ldm's names (attention projections as 1x1 convolutions)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        if parts[1] in ("conv_norm_out",):
            parts[1] = "norm_out"
        elif parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
            if parts[3] in ("downsamplers", "upsamplers"):
                parts = [parts[0], "down" if parts[1] == "down_blocks" else "up", str(level), parts[3][:-2], *parts[5:]]
            else:  # resnets.j.name
                parts = [parts[0], "down" if parts[1] == "down_blocks" else "up", str(level), "block", parts[4], VAE_RESNET.get(parts[5], parts[5]), *parts[6:]]
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                parts = [parts[0], "mid", f"block_{int(parts[3]) + 1}", VAE_RESNET.get(parts[4], parts[4]), *parts[5:]]
            else:  # attentions.0.to_q.weight, attentions.0.to_out.0.weight
                name = VAE_ATTENTION[parts[4]]
                parts = [parts[0], "mid", "attn_1", name, parts[-1]]
                if name != "norm" and value.ndim == 2:
                    value = value[:, :, None, None]
        out[".".join(parts)] = value
    return out
