"""`PromptDiffusionPipeline`: in-context generation from an example pair, a query image and text.

The example pair (source -> target) shows a task; the pipeline applies it to the query. Sampling
is DDIM with classifier-free guidance in which the unconditional branch keeps the example pair and
the query and swaps only the text (the paper's and the diffusers port's convention).

Images may be PIL images, paths, HxWx3 numpy arrays (uint8, or floats in [0, 1]) or tensors
(CHW or 1xCHW floats in [0, 1]); `image` may be one query or a list of them (one output each),
`image_pair` one [source, target] pair for all queries or a list of pairs, one per query. Pair and
query are resized to the output size as diffusers' ControlNet pipeline resizes its control image
(`VaeImageProcessor`: LANCZOS for PIL images, `interpolate` for tensors). They reach the ControlNet
in `conditioning_range`: "[-1, 1]" as the paper trained and sampled (default), or "[0, 1]" as
diffusers' research port does.

Inference defaults live in the pipeline's config (`model_index.json`), so every caller uses the
same ones: `default_num_inference_steps`, `default_guidance_scale` and `task_texts` (task name ->
the fixed text a forward task was trained with; inverse tasks use the caption of the query scene).
"""

from __future__ import annotations

import inspect
import os
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from ...core.components import token_ids
from ...core.images import load_rgb, to_pil
from .controlnet import PromptDiffusionControlNetModel

CONDITIONING_RANGES = ("[-1, 1]", "[0, 1]")
ImageInput = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor


def as_processor_input(image: ImageInput) -> Image.Image | torch.Tensor:
    """One image as what `VaeImageProcessor` resizes: a PIL RGB image, or a 1x3xHxW float tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        tensor = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"an image tensor must be 3xHxW or 1x3xHxW in [0, 1], got shape {tuple(image.shape)}")
        return tensor.float()[None]
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be HxWx3, got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    return load_rgb(image)  # PIL, path or uint8 array


def image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(height, width) of a processor input."""
    return (image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape[-2:])


def as_query_list(image) -> list:
    """The queries of a call: a list as given, the images of a Bx3xHxW tensor, or one image."""
    if isinstance(image, (list, tuple)):
        return list(image)
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return list(image)
    return [image]


def is_one_pair(image_pair) -> bool:
    """[source, target] (one pair for every query) rather than a list of pairs."""
    return isinstance(image_pair, (list, tuple)) and len(image_pair) == 2 and not isinstance(image_pair[0], (list, tuple))


class PromptDiffusionPipeline(DiffusionPipeline):
    """Prompt Diffusion: Stable Diffusion (or the tiny backbone) steered by a PromptDiffusionControlNetModel.

    Call it with `prompt`, `image` (the query, or a list of queries) and `image_pair` ([example
    source, example target], or one such pair per query).
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
        default_num_inference_steps: int = 50,
        default_guidance_scale: float = 9.0,
        task_texts: dict[str, str] | None = None,
    ):
        super().__init__()
        if conditioning_range not in CONDITIONING_RANGES:
            raise ValueError(f"conditioning_range must be one of {CONDITIONING_RANGES}, got {conditioning_range!r}")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet, scheduler=scheduler)
        self.register_to_config(conditioning_range=conditioning_range, default_num_inference_steps=default_num_inference_steps,
                                default_guidance_scale=default_guidance_scale, task_texts=dict(task_texts or {}))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        # As diffusers' ControlNet pipeline prepares its control image: resized, in [0, 1], not normalised.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False)

    # ------------------------------------------------------------------------------------ inputs
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Last hidden state of the text encoder, padded to the tokenizer's max length (SD convention)."""
        ids = token_ids(self.tokenizer, prompts)
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def default_height_width(self, image: ImageInput | list[ImageInput]) -> tuple[int, int]:
        """The first query's size rounded down to a multiple of the VAE factor (the ControlNet pipeline's default)."""
        queries = as_query_list(image)
        if not queries:
            raise ValueError("no query image: pass one image, or a list of them")
        first = as_processor_input(queries[0])
        height, width = image_size(first)
        return height - height % self.vae_scale_factor, width - width % self.vae_scale_factor

    def prepare_conditioning(self, image: ImageInput | list[ImageInput], image_pair: list, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pairs Bx6xHxW, queries Bx3xHxW) at height x width, in the ControlNet's range; B is the number of queries."""
        queries = as_query_list(image)
        if is_one_pair(image_pair):
            pairs = [image_pair] * len(queries)
        elif isinstance(image_pair, list) and image_pair and all(is_one_pair(p) for p in image_pair):
            pairs = image_pair
        else:
            got = f"a {type(image_pair).__name__} of {len(image_pair)}" if isinstance(image_pair, (list, tuple)) else f"a {type(image_pair).__name__}"
            raise ValueError(f"image_pair must be [example source, example target] or a list of such pairs, one per query; got {got}")
        if len(pairs) != len(queries):
            raise ValueError(f"got {len(pairs)} example pairs for {len(queries)} queries: pass one pair, or one per query")
        if height < self.vae_scale_factor or width < self.vae_scale_factor:
            raise ValueError(f"the output size {height}x{width} is smaller than the latent factor {self.vae_scale_factor}")

        def resized(x: ImageInput) -> torch.Tensor:  # -> 1x3xHxW in [0, 1]
            return self.image_processor.preprocess(as_processor_input(x), height=height, width=width).float()

        pair = torch.cat([torch.cat([resized(source), resized(target)], dim=1) for source, target in pairs])
        query = torch.cat([resized(q) for q in queries])
        if self.config.conditioning_range == "[-1, 1]":
            pair, query = 2 * pair - 1, 2 * query - 1
        return pair, query

    # ------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: ImageInput | list[ImageInput],
        image_pair: list,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
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
        """Apply the task shown by `image_pair` to the query `image` (or each query of a list), guided by `prompt`.

        `height` and `width` default to the first query's size rounded down to a multiple of the
        VAE factor (as diffusers' ControlNet pipeline does); pair and queries are resized to it.
        `num_inference_steps` and `guidance_scale` default to the config's. With several queries,
        `prompt` is one text for all or one per query. Returns `ImagePipelineOutput(images=...)`:
        PIL images, an (N, H, W, 3) array ("np"), an (N, 3, H, W) tensor in [0, 1] ("pt") or the
        latents ("latent"), N = queries x num_images_per_prompt.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        num_inference_steps = num_inference_steps or self.config.default_num_inference_steps
        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        device = self._execution_device
        if height is None or width is None:
            default_height, default_width = self.default_height_width(image)
            height, width = height or default_height, width or default_width

        # 1. the example pairs and the queries, one of each per query
        pair, query = self.prepare_conditioning(image, image_pair, height, width)
        num_queries = query.shape[0]

        # 2. text: the conditional embeddings, and (for guidance) the negative ones
        if prompt_embeds is None:
            prompts = [prompt] * num_queries if isinstance(prompt, str) else list(prompt)
            if len(prompts) != num_queries:
                raise ValueError(f"got {len(prompts)} prompts for {num_queries} queries: pass one prompt, or one per query")
            prompt_embeds = self.encode_prompt(prompts)
        elif prompt_embeds.shape[0] != num_queries:
            raise ValueError(f"prompt_embeds has {prompt_embeds.shape[0]} rows for {num_queries} queries")
        do_guidance = guidance_scale > 1.0
        if do_guidance and negative_prompt_embeds is None:
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * num_queries
            negative_prompt_embeds = self.encode_prompt(negatives)
        if do_guidance and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(f"negative prompt embeddings {tuple(negative_prompt_embeds.shape)} do not match the prompt's {tuple(prompt_embeds.shape)}")
        if do_guidance and torch.equal(negative_prompt_embeds, prompt_embeds):
            # Both branches would see the same inputs: uncond + s * (cond - uncond) = cond, exactly.
            do_guidance = False
        batch = num_queries * num_images_per_prompt
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if do_guidance:
            # [unconditional, conditional]: the images stay in both halves; only the text differs.
            prompt_embeds = torch.cat([negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0), prompt_embeds])
        prompt_embeds = prompt_embeds.to(device, self.unet.dtype)

        # 3. the pair and query embeddings, once per call: they do not change between steps
        pair = pair.to(device, self.controlnet.dtype).repeat_interleave(num_images_per_prompt, dim=0)
        query = query.to(device, self.controlnet.dtype).repeat_interleave(num_images_per_prompt, dim=0)
        conditioning_embedding = self.controlnet.embed_conditions(pair, query)  # (batch, C, h, w)
        if do_guidance:
            conditioning_embedding = torch.cat([conditioning_embedding] * 2)

        # 4. timesteps and initial noise; the latents stay float32 whatever the models' dtype
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device, torch.float32)
        step_kwargs = {}
        if "eta" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["eta"] = eta
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator

        # 5. denoising loop
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            # A new step for CUDA graphs (compile mode reduce-overhead): the previous step's graph
            # outputs are consumed, so the next replay may overwrite them.
            torch.compiler.cudagraph_mark_step_begin()
            model_input = torch.cat([latents] * 2) if do_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t).to(self.unet.dtype)
            down_residuals, mid_residual = self.controlnet(
                model_input, t, prompt_embeds, conditioning_embedding=conditioning_embedding,
                conditioning_scale=controlnet_conditioning_scale, return_dict=False,
            )
            noise_pred = self.unet(
                model_input, t, encoder_hidden_states=prompt_embeds,
                down_block_additional_residuals=down_residuals, mid_block_additional_residual=mid_residual,
            ).sample.float()
            if do_guidance:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                step_tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                latents = callback_on_step_end(self, i, t, callback_kwargs).get("latents", latents)

        # 6. decode
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
            images = (decoded.float() / 2 + 0.5).clamp(0, 1)
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            elif output_type == "pil":
                images = [to_pil(x, value_range=(0.0, 1.0)) for x in images]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
