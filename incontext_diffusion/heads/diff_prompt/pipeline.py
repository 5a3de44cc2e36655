"""Inference for Diff-Prompt: the stage-2 mask generator and the stage-3 grounding pipeline.

Both are `diffusers.DiffusionPipeline`s: `.to()`, `device`, progress bars, `generator`,
`output_type`, `callback_on_step_end` in the DDIM loop, `enable_model_cpu_offload` through
`model_cpu_offload_seq`, and their inference defaults (`ddim_steps`) in the pipeline config, read from
the exported model_index.json. Their parts include a custom DiT, a grounding host and prompt modules
that diffusers' generic loader cannot build, so each class has its own `from_pretrained` /
`save_pretrained` for the folders below (load with `DiffPromptMaskPipeline.from_pretrained(dir)` or
`DiffPromptGroundingPipeline.from_pretrained(dir)`, or `icd infer`):

    stage 1  mask_vae/                                            _class_name DiffPromptMaskVAE
    stage 2  mask_vae/ dit/ clip/ scheduler/ [image_vae/]         _class_name DiffPromptMaskPipeline
    host     host/                                                _class_name DiffPromptGroundingPipeline
    stage 3  host/ prompts.safetensors prompts.json [+ stage 2]   _class_name DiffPromptGroundingPipeline

Inputs: PIL images, paths, HxWx3 arrays (uint8, or floats in [0, 1]) or tensors in [-1, 1] ((3, H, W) or
(B, 3, H, W)), one or a list; one expression per image. Outputs at each input's size: masks resized
back, boxes in the input's pixels and clipped to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from safetensors.torch import load_file, save_file

from ...core.model_folder import read_model_folder
from ...errors import UserError
from .diffusion import ddim_scheduler, ddim_trajectory, prompt_indices
from .dit import ClipConditioner, MaskDiT
from .hosts import load_host
from .prompts import MaskPromptAdaptor, StaticDeepPrompts

OUTPUT_TYPES = ("pt", "np", "pil")


def write_model_index(out_dir: Path, class_name: str, **extra) -> None:
    (Path(out_dir) / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_library": "incontext_diffusion", **extra}, indent=2))


def _check_folder(folder: Path, parts: list[str]) -> Path:
    folder = Path(folder)
    missing = [p for p in parts if not (folder / p).exists()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}: pass the model folder exported by the previous stage (runs/<recipe>/model)")
    return folder


def prepare_images(image, size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One image or a list (PIL, path, HxWx3 array, or a [-1, 1] tensor) -> (B, 3, size, size) in [-1, 1]
    and each input's (height, width)."""
    from ...core.images import load_rgb, to_tensor

    if isinstance(image, torch.Tensor) and image.ndim == 4:
        image = list(image)
    items = image if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise UserError("no image given: pass a PIL image, a path, an HxWx3 array or a tensor")
    tensors, sizes = [], []
    for item in items:
        if isinstance(item, torch.Tensor):
            if item.ndim != 3 or item.shape[0] != 3:
                raise UserError(f"an image tensor must be (3, H, W) or (B, 3, H, W) in [-1, 1], got {tuple(item.shape)}")
            sizes.append(tuple(item.shape[-2:]))
            resized = F.interpolate(item[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
            tensors.append(resized if item.shape[-2:] != (size, size) else item.float())
            continue
        if isinstance(item, np.ndarray) and item.dtype != np.uint8:
            if item.min() < 0 or item.max() > 1:
                raise UserError(f"a float image array must hold values in [0, 1] (got {item.min():.3g}..{item.max():.3g}): scale it, or pass uint8")
            item = np.round(item * 255).astype(np.uint8)
        if not isinstance(item, (str, Path, np.ndarray)) and not hasattr(item, "convert"):
            raise UserError(f"cannot read an image from {type(item).__name__}: pass a PIL image, a path, an HxWx3 array or a (3, H, W) tensor in [-1, 1]")
        try:
            rgb = load_rgb(item)
        except ValueError as err:
            raise UserError(f"{err}: pass an HxWx3 array") from None
        sizes.append((rgb.height, rgb.width))
        tensors.append(to_tensor(load_rgb(rgb, size=size)))
    return torch.stack(tensors), sizes


def _resize_masks(masks: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """(B, 1, S, S) soft masks -> one (1, H, W) per input size (bilinear: the masks are soft)."""
    return [F.interpolate(m[None].float(), size=hw, mode="bilinear", align_corners=False)[0] if m.shape[-2:] != hw else m for m, hw in zip(masks, sizes)]


def _format_masks(masks: list[torch.Tensor], output_type: str):
    if output_type == "pil":
        from ...core.images import to_pil

        return [to_pil(m.clamp(0, 1), value_range=(0, 1)) for m in masks]
    same = len({tuple(m.shape) for m in masks}) == 1
    if output_type == "np":
        arrays = [m[0].cpu().float().numpy() for m in masks]
        return np.stack(arrays) if same else arrays
    return torch.stack(masks) if same else masks


def _check_call(prompt, batch: int, output_type: str, callback_inputs: list[str]) -> list[str]:
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(texts) != batch:
        raise UserError(f"{batch} images but {len(texts)} expressions: pass one expression per image")
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type {output_type!r} is unknown: choose one of {', '.join(OUTPUT_TYPES)}")
    if set(callback_inputs) - {"latents"}:
        raise UserError(f"callback_on_step_end_tensor_inputs may name only 'latents', got {callback_inputs}")
    return texts


@dataclass
class MaskGenerationOutput(BaseOutput):
    masks: torch.Tensor | list  # decoded final masks (soft, not clamped) at each input's size: (B, 1, H, W), or a list when sizes differ
    trajectory: list[torch.Tensor]  # Mask-VAE latents after each DDIM step, (B, C, h, w)


class DiffPromptMaskPipeline(DiffusionPipeline):
    """Stage 2: image + referring expression -> Mask-VAE latent trajectory -> decoded mask."""

    model_cpu_offload_seq = "clip->image_vae->dit->mask_vae"
    _optional_components = ["image_vae"]

    def __init__(self, mask_vae: AutoencoderKL, dit: MaskDiT, clip, tokenizer, scheduler: DDPMScheduler, image_vae: AutoencoderKL | None = None,
                 ddim_steps: int = 25):
        super().__init__()
        self.register_modules(mask_vae=mask_vae, dit=dit, clip=clip, tokenizer=tokenizer, scheduler=scheduler, image_vae=image_vae)
        self.register_to_config(ddim_steps=ddim_steps)
        self.vae_scale = 2 ** (len(mask_vae.config.block_out_channels) - 1)
        self.mask_size = dit.config.input_size * self.vae_scale
        image_vae_size = dit.config.input_size * 2 ** (len(image_vae.config.block_out_channels) - 1) if image_vae is not None else None
        self.conditioner = ClipConditioner(clip, tokenizer, image_vae, image_vae_size, dit.config.image_pixels)
        self.sampler = ddim_scheduler(scheduler)

    @classmethod
    def from_parts(cls, mask_vae: AutoencoderKL, dit: MaskDiT, conditioner: ClipConditioner, scheduler: DDPMScheduler, ddim_steps: int = 25) -> "DiffPromptMaskPipeline":
        """The pipeline over a training head's own conditioner (same CLIP and image VAE objects)."""
        return cls(mask_vae, dit, conditioner.clip, conditioner.tokenizer, scheduler, conditioner.image_vae, ddim_steps)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **_) -> "DiffPromptMaskPipeline":
        from transformers import CLIPModel, CLIPTokenizer

        folder = _check_folder(Path(folder), ["mask_vae", "dit", "clip", "scheduler"])
        parts = dict(mask_vae=AutoencoderKL.from_pretrained(str(folder / "mask_vae")), dit=MaskDiT.from_pretrained(str(folder / "dit")),
                     clip=CLIPModel.from_pretrained(str(folder / "clip")),
                     image_vae=AutoencoderKL.from_pretrained(str(folder / "image_vae")) if (folder / "image_vae").is_dir() else None)
        for module in parts.values():  # inference (and stage 3) only: frozen
            if module is not None:
                module.eval().requires_grad_(False)
        return cls(tokenizer=CLIPTokenizer.from_pretrained(str(folder / "clip")), scheduler=DDPMScheduler.from_pretrained(str(folder / "scheduler")),
                   ddim_steps=read_model_folder(folder).index.get("ddim_steps", 25), **parts)

    def save_pretrained(self, out_dir: str | Path, **_) -> None:
        """The parts only; the head writes model_index.json (its class name and defaults)."""
        out_dir = Path(out_dir)
        self.mask_vae.save_pretrained(str(out_dir / "mask_vae"))
        self.dit.save_pretrained(str(out_dir / "dit"))
        self.clip.save_pretrained(str(out_dir / "clip"))
        self.tokenizer.save_pretrained(str(out_dir / "clip"))
        if self.image_vae is not None:
            self.image_vae.save_pretrained(str(out_dir / "image_vae"))
        self.scheduler.save_pretrained(str(out_dir / "scheduler"))

    def sample(self, images: torch.Tensor, texts: list[str], num_inference_steps: int, generator=None,
               callback_on_step_end: Callable | None = None) -> list[torch.Tensor]:
        """The DDIM latent trajectory for prepared images (B, 3, S, S) in [-1, 1], with a progress bar."""
        images = images.to(self.device)
        image_features, text_features, image_latents = self.conditioner(images, texts)
        with self.progress_bar(total=num_inference_steps) as bar:
            def on_step(index, t, latents):
                if callback_on_step_end is not None:
                    latents = callback_on_step_end(self, index, t, {"latents": latents}).get("latents", latents)
                bar.update()
                return latents

            return ddim_trajectory(self.dit, self.sampler, image_features, text_features, num_inference_steps, generator, image_latents, on_step)

    @torch.no_grad()
    def __call__(self, image, prompt: str | list[str], num_inference_steps: int | None = None, generator: torch.Generator | None = None,
                 output_type: str = "pt", callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs: list[str] = ["latents"],
                 return_dict: bool = True) -> MaskGenerationOutput:
        """`num_inference_steps` defaults to the exported `ddim_steps`; `output_type` pt, np or pil;
        `callback_on_step_end(pipe, step, timestep, {"latents": ...})` may return new latents."""
        images, sizes = prepare_images(image, self.mask_size)
        texts = _check_call(prompt, len(images), output_type, callback_on_step_end_tensor_inputs)
        trajectory = self.sample(images, texts, num_inference_steps or self.config.ddim_steps, generator, callback_on_step_end)
        masks = _format_masks(_resize_masks(self.mask_vae.decode(trajectory[-1]).sample, sizes), output_type)
        return MaskGenerationOutput(masks, trajectory) if return_dict else (masks, trajectory)

    @torch.no_grad()
    def prompt_masks(self, images: torch.Tensor, texts: list[str], depth: int, num_inference_steps: int = 25, generator=None) -> list[torch.Tensor]:
        """Decoded soft masks (B, 1, S, S) feeding prompt layers 0..depth-1 (trajectory indices [steps-1, steps-3, ...])."""
        trajectory = self.sample(images, texts, num_inference_steps, generator)
        return [self.mask_vae.decode(trajectory[i]).sample for i in prompt_indices(num_inference_steps, depth)]

    @torch.no_grad()
    def oracle_prompt_masks(self, masks: torch.Tensor, depth: int, num_inference_steps: int = 25, generator=None) -> list[torch.Tensor]:
        """The ground truth's stand-in for `prompt_masks`: the Mask-VAE posterior mean of the true masks (B, 1, H, W)
        noised forward, with one noise draw, to the timestep of each trajectory point the DiT would have given that layer."""
        masks = masks.to(self.device, self.mask_vae.dtype)
        if masks.shape[-2:] != (self.mask_size, self.mask_size):
            masks = F.interpolate(masks, size=(self.mask_size, self.mask_size), mode="bilinear", align_corners=False)
        latents = self.mask_vae.encode(masks).latent_dist.mode()
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        self.sampler.set_timesteps(num_inference_steps)
        timesteps = self.sampler.timesteps  # descending; trajectory[i] is the latent at timesteps[i + 1], the last one clean
        noised = []
        for i in prompt_indices(num_inference_steps, depth):
            noised.append(latents if i == num_inference_steps - 1 else self.scheduler.add_noise(latents, noise, timesteps[i + 1:i + 2].to(latents.device)))
        return [self.mask_vae.decode(x).sample for x in noised]


class StagePrompts(torch.nn.Module):
    """What stage 3 trains: Diff-Prompt's two adaptors, or VPT-deep / CoOp-deep static prompts."""

    def __init__(self, method: str, depth: int, prompt_length: int, vision_dim: int, text_dim: int, mask_size: int = 224,
                 base_channels: int = 8, visual: bool = True, textual: bool = True, visual_global: bool = True, textual_global: bool = True,
                 paper_compat: bool = False):
        super().__init__()
        self.settings = dict(method=method, depth=depth, prompt_length=prompt_length, vision_dim=vision_dim, text_dim=text_dim, mask_size=mask_size,
                             base_channels=base_channels, visual=visual, textual=textual, visual_global=visual_global, textual_global=textual_global,
                             paper_compat=paper_compat)
        self.method, self.depth, self.paper_compat = method, depth, paper_compat
        self.vision = self.text = None
        if method == "diff_prompt":
            if visual:
                self.vision = MaskPromptAdaptor(mask_size, vision_dim, depth, prompt_length, base_channels, True, visual_global)
            if textual:
                self.text = MaskPromptAdaptor(mask_size, text_dim, depth, prompt_length, base_channels, True, textual_global)
        elif method == "vpt_deep":
            self.vision = StaticDeepPrompts(vision_dim, depth, prompt_length)
        elif method == "coop_deep":
            self.text = StaticDeepPrompts(text_dim, depth, prompt_length)
        elif method != "none":
            raise UserError(f"unknown prompt method {method!r}: choose diff_prompt, vpt_deep, coop_deep or none")

    @property
    def needs_masks(self) -> bool:
        return self.method == "diff_prompt"

    @property
    def device(self) -> torch.device:  # read by DiffusionPipeline.device / .to(); "none" prompts have no parameters
        return next(self.parameters(), torch.empty(0)).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters(), torch.empty(0)).dtype

    def forward(self, batch_size: int, masks: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(vision prompts, text prompts), one (B, L, D) tensor per prompted layer."""
        def make(module):
            if module is None:
                return []
            return module(masks) if self.needs_masks else module(batch_size)

        return make(self.vision), make(self.text)

    def save_pretrained(self, out_dir: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(out_dir) / "prompts.safetensors"))
        (Path(out_dir) / "prompts.json").write_text(json.dumps(self.settings, indent=2))

    @classmethod
    def from_pretrained(cls, folder: Path) -> "StagePrompts":
        prompts = cls(**json.loads((Path(folder) / "prompts.json").read_text()))
        prompts.load_state_dict(load_file(str(Path(folder) / "prompts.safetensors")))
        return prompts


@dataclass
class GroundingPipelineOutput(BaseOutput):
    boxes: torch.Tensor | list  # (B, K, 4) xyxy in each input's pixels, clipped to it, best first (a list when sizes differ)
    scores: torch.Tensor  # (B, K) probabilities, descending
    masks: torch.Tensor | list | None  # the generated mask at each input's size (Diff-Prompt only), as output_type
    trajectory_masks: list[torch.Tensor] | None  # decoded masks (B, 1, S, S) fed to the prompt layers 0, 1, ...


class DiffPromptGroundingPipeline(DiffusionPipeline):
    """Stage 3 (or a bare host): image + expression -> ranked boxes, with Diff-Prompt/VPT/CoOp prompts.
    A Diff-Prompt model carries stage 2's parts (the mask generator) beside the host and the prompts."""

    model_cpu_offload_seq = "clip->image_vae->dit->mask_vae->prompts->host"
    _optional_components = ["mask_vae", "dit", "clip", "tokenizer", "scheduler", "image_vae"]

    def __init__(self, host, prompts: StagePrompts, mask_vae=None, dit=None, clip=None, tokenizer=None, scheduler=None, image_vae=None, ddim_steps: int = 25):
        super().__init__()
        self.register_modules(host=host, prompts=prompts, mask_vae=mask_vae, dit=dit, clip=clip, tokenizer=tokenizer, scheduler=scheduler, image_vae=image_vae)
        self.register_to_config(ddim_steps=ddim_steps)
        self.mask_generator = DiffPromptMaskPipeline(mask_vae, dit, clip, tokenizer, scheduler, image_vae, ddim_steps) if dit is not None else None
        if prompts.needs_masks and self.mask_generator is None:
            raise UserError("Diff-Prompt prompts need the stage-2 mask generator: set model.prompt_generator to the stage-2 model folder")

    @classmethod
    def from_generator(cls, host, prompts: StagePrompts, generator: DiffPromptMaskPipeline | None, ddim_steps: int) -> "DiffPromptGroundingPipeline":
        parts = {} if generator is None else {k: getattr(generator, k) for k in ("mask_vae", "dit", "clip", "tokenizer", "scheduler", "image_vae")}
        return cls(host, prompts, ddim_steps=ddim_steps, **parts)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **_) -> "DiffPromptGroundingPipeline":
        folder = _check_folder(Path(folder), ["host"])
        host = load_host(folder / "host")
        if (folder / "prompts.json").is_file():
            prompts = StagePrompts.from_pretrained(folder)
        else:
            prompts = StagePrompts("none", 0, 2, host.vision_dims[0], host.text_dim)
        generator = DiffPromptMaskPipeline.from_pretrained(folder) if prompts.needs_masks else None
        return cls.from_generator(host.eval().requires_grad_(False), prompts.eval().requires_grad_(False), generator, read_model_folder(folder).index.get("ddim_steps", 25))

    def save_pretrained(self, out_dir: str | Path, class_name: str = "DiffPromptGroundingPipeline", **_) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.host.save_pretrained(out_dir / "host")
        if self.prompts.method != "none":
            self.prompts.save_pretrained(out_dir)
        if self.mask_generator is not None:
            self.mask_generator.save_pretrained(out_dir)
        write_model_index(out_dir, class_name, method=self.prompts.method, ddim_steps=self.config.ddim_steps)

    def set_progress_bar_config(self, **kwargs) -> None:
        super().set_progress_bar_config(**kwargs)
        if self.mask_generator is not None:
            self.mask_generator.set_progress_bar_config(**kwargs)

    def prompt_tensors(self, images: torch.Tensor, texts: list[str], generator=None, num_inference_steps: int | None = None):
        steps = num_inference_steps or self.config.ddim_steps
        masks = self.mask_generator.prompt_masks(images, texts, self.prompts.depth, steps, generator) if self.prompts.needs_masks else None
        vision, text = self.prompts(images.shape[0], masks)
        return vision, text, masks

    @torch.no_grad()
    def ranked_boxes(self, images: torch.Tensor, texts: list[str], vision: list[torch.Tensor], text: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The host's boxes (B, Q, 4), normalised xyxy clipped to the image, and their probabilities (B, Q), best first,
        under the given prompts (a host may propose boxes past the border)."""
        with self.host.prompted(vision, text, self.prompts.paper_compat):
            out = self.host(self.host.preprocess(images.to(self.device)), texts)
        scores, order = out.logits.sigmoid().sort(dim=1, descending=True)
        return torch.gather(out.boxes, 1, order[..., None].expand(-1, -1, 4)).clamp(0, 1), scores

    @torch.no_grad()
    def __call__(self, image, prompt: str | list[str], generator: torch.Generator | None = None, top_k: int | None = 5,
                 num_inference_steps: int | None = None, output_type: str = "pt", callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ["latents"], return_dict: bool = True) -> GroundingPipelineOutput:
        """`top_k` boxes per image (None: all); DDIM steps default to the exported `ddim_steps`; `output_type` sets the
        masks' form (pt, np, pil); the callback sees the mask latents after each DDIM step."""
        images, sizes = prepare_images(image, self.host.image_size)
        texts = _check_call(prompt, len(images), output_type, callback_on_step_end_tensor_inputs)
        masks = None
        if self.prompts.needs_masks:
            steps = num_inference_steps or self.config.ddim_steps
            trajectory = self.mask_generator.sample(images, texts, steps, generator, callback_on_step_end)
            masks = [self.mask_generator.mask_vae.decode(trajectory[i]).sample for i in prompt_indices(steps, self.prompts.depth)]
        boxes, scores = self.ranked_boxes(images, texts, *self.prompts(len(texts), masks))
        boxes, scores = boxes[:, :top_k], scores[:, :top_k]
        pixel_boxes = [b * b.new_tensor([w, h, w, h]) for b, (h, w) in zip(boxes, sizes)]  # normalised -> each input's pixels
        pixel_boxes = torch.stack(pixel_boxes) if len(set(sizes)) == 1 else pixel_boxes
        final = _format_masks(_resize_masks(masks[0], sizes), output_type) if masks else None
        output = (pixel_boxes, scores, final, masks)
        return GroundingPipelineOutput(*output) if return_dict else output
