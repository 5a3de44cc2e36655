"""`PromptDiffusionPipeline`: in-context generation from an example pair, a query image and text.

The example pair (source -> target) shows a task; the pipeline applies it to the query. Sampling
is DDIM with classifier-free guidance in which the unconditional branch keeps the example pair and
the query and swaps only the text (the paper's and the diffusers port's convention).

Images may be PIL images, paths, HxWx3 numpy arrays (uint8, or floats in [0, 1]) or tensors
(CHW or 1xCHW floats in [0, 1]). They reach the ControlNet in `conditioning_range`: "[-1, 1]" as
the paper trained and sampled (default), or "[0, 1]" as diffusers' research port does.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from ...core.components import token_ids
from ...core.images import load_rgb, to_pil
from .controlnet import PromptDiffusionControlNetModel

CONDITIONING_RANGES = ("[-1, 1]", "[0, 1]")
ImageInput = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor


def image_to_unit_tensor(image: ImageInput) -> torch.Tensor:
    """One image as a 3xHxW float tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        tensor = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"an image tensor must be 3xHxW or 1x3xHxW in [0, 1], got shape {tuple(image.shape)}")
        return tensor.float()
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be HxWx3, got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    pixels = np.asarray(load_rgb(image), dtype=np.float32) / 255.0  # PIL, path or uint8 array
    return torch.from_numpy(pixels).permute(2, 0, 1)


class PromptDiffusionPipeline(DiffusionPipeline):
    """Prompt Diffusion: Stable Diffusion (or the tiny backbone) steered by a PromptDiffusionControlNetModel.

    Call it with `prompt`, `image` (the query) and `image_pair` ([example source, example target]).
    """

    model_cpu_offload_seq = "text_encoder->controlnet->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: PromptDiffusionControlNetModel,
        scheduler: KarrasDiffusionSchedulers,
        conditioning_range: str = "[-1, 1]",
    ):
        super().__init__()
        if conditioning_range not in CONDITIONING_RANGES:
            raise ValueError(f"conditioning_range must be one of {CONDITIONING_RANGES}, got {conditioning_range!r}")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet, scheduler=scheduler)
        self.register_to_config(conditioning_range=conditioning_range)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------ inputs
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Last hidden state of the text encoder, padded to the tokenizer's max length (SD convention)."""
        ids = token_ids(self.tokenizer, prompts)
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def prepare_conditioning(self, image: ImageInput, image_pair: list[ImageInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pair 1x6xHxW, query 1x3xHxW) in the ControlNet's range, after the size checks."""
        if not isinstance(image_pair, (list, tuple)) or len(image_pair) != 2:
            got = f"a {type(image_pair).__name__} of {len(image_pair)}" if isinstance(image_pair, (list, tuple)) else f"a {type(image_pair).__name__}"
            raise ValueError(f"image_pair must be a list of exactly two images [example source, example target], got {got}")
        source, target, query = (image_to_unit_tensor(x) for x in (*image_pair, image))
        sizes = {"example source": tuple(source.shape[1:]), "example target": tuple(target.shape[1:]), "query": tuple(query.shape[1:])}
        if len(set(sizes.values())) != 1:
            raise ValueError("the example pair and the query must have the same size (HxW): " + ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in sizes.items()))
        height, width = sizes["query"]
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"image size {height}x{width} is not divisible by the latent factor {self.vae_scale_factor}: resize the images")
        if self.config.conditioning_range == "[-1, 1]":
            source, target, query = (2 * x - 1 for x in (source, target, query))
        return torch.cat([source, target])[None], query[None]

    # ------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: ImageInput,
        image_pair: list[ImageInput],
        num_inference_steps: int = 50,
        guidance_scale: float = 9.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        controlnet_conditioning_scale: float = 1.0,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Apply the task shown by `image_pair` to the query `image`, guided by `prompt`.

        Returns `ImagePipelineOutput(images=...)`: PIL images, an (N, H, W, 3) array ("np"), an
        (N, 3, H, W) tensor in [0, 1] ("pt") or the latents ("latent").
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        device = self._execution_device
        do_guidance = guidance_scale > 1.0

        # 1. text: the conditional embeddings, and (for guidance) the negative ones
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self.encode_prompt(prompts)
        if do_guidance and negative_prompt_embeds is None:
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * prompt_embeds.shape[0]
            negative_prompt_embeds = self.encode_prompt(negatives)
        if do_guidance and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(f"negative prompt embeddings {tuple(negative_prompt_embeds.shape)} do not match the prompt's {tuple(prompt_embeds.shape)}")
        batch = prompt_embeds.shape[0] * num_images_per_prompt
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if do_guidance:
            # [unconditional, conditional]: the images stay in both halves; only the text differs.
            prompt_embeds = torch.cat([negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0), prompt_embeds])
        prompt_embeds = prompt_embeds.to(device, self.unet.dtype)

        # 2. the example pair and the query, repeated for the batch (and both guidance halves)
        pair, query = self.prepare_conditioning(image, image_pair)
        copies = batch * (2 if do_guidance else 1)
        pair = pair.to(device, self.controlnet.dtype).repeat(copies, 1, 1, 1)
        query = query.to(device, self.controlnet.dtype).repeat(copies, 1, 1, 1)
        height, width = query.shape[-2:]

        # 3. timesteps and initial noise
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype) * self.scheduler.init_noise_sigma
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device)
        step_kwargs = {}
        if "eta" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["eta"] = eta
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator

        # 4. denoising loop
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents] * 2) if do_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            down_residuals, mid_residual = self.controlnet(
                model_input, t, prompt_embeds, controlnet_cond=pair, controlnet_query_cond=query,
                conditioning_scale=controlnet_conditioning_scale, return_dict=False,
            )
            noise_pred = self.unet(
                model_input, t, encoder_hidden_states=prompt_embeds,
                down_block_additional_residuals=down_residuals, mid_block_additional_residual=mid_residual,
            ).sample
            if do_guidance:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                step_tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                latents = callback_on_step_end(self, i, t, callback_kwargs).get("latents", latents)

        # 5. decode
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            images = (decoded / 2 + 0.5).clamp(0, 1).float()
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            elif output_type == "pil":
                images = [to_pil(x, value_range=(0.0, 1.0)) for x in images]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
