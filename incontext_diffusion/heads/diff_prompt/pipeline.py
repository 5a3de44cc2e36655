"""Inference for Diff-Prompt: the stage-2 mask generator and the stage-3 grounding pipeline.

Both are plain classes with diffusers' habits (`from_pretrained`, `save_pretrained`, `__call__`
with a `generator`, an output dataclass): their parts (a custom DiT, a grounding host, adaptors)
are not diffusers pipeline components. Model folders (each has a model_index.json):

    stage 1  mask_vae/                                            _class_name DiffPromptMaskVAE
    stage 2  mask_vae/ dit/ clip/ scheduler/ [image_vae/]         _class_name DiffPromptMaskPipeline
    host     host/                                                _class_name GroundingHostPipeline
    stage 3  host/ prompts.safetensors prompts.json [+ stage 2]   _class_name DiffPromptGroundingPipeline
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from safetensors.torch import load_file, save_file

from ...errors import UserError
from .diffusion import ddim_scheduler, ddim_trajectory, prompt_indices
from .dit import ClipConditioner, MaskDiT
from .hosts import load_host
from .prompts import MaskPromptAdaptor, StaticDeepPrompts


def write_model_index(out_dir: Path, class_name: str, **extra) -> None:
    (Path(out_dir) / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_library": "incontext_diffusion", **extra}, indent=2))


def _check_folder(folder: Path, parts: list[str]) -> Path:
    folder = Path(folder)
    missing = [p for p in parts if not (folder / p).exists()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}: pass the model folder exported by the previous stage (runs/<recipe>/model)")
    return folder


@dataclass
class MaskGenerationOutput:
    masks: torch.Tensor  # (B, 1, S, S) decoded final masks (soft, not clamped)
    trajectory: list[torch.Tensor]  # latents after each DDIM step


class MaskGenerationPipeline:
    """Stage 2: image + referring expression -> Mask-VAE latent trajectory -> decoded masks."""

    def __init__(self, mask_vae: AutoencoderKL, dit: MaskDiT, conditioner: ClipConditioner, scheduler: DDPMScheduler):
        self.mask_vae, self.dit, self.conditioner, self.scheduler = mask_vae, dit, conditioner, scheduler
        self.sampler = ddim_scheduler(scheduler)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "MaskGenerationPipeline":
        from transformers import CLIPModel, CLIPTokenizer

        folder = _check_folder(Path(folder), ["mask_vae", "dit", "clip", "scheduler"])
        dit = MaskDiT.from_pretrained(str(folder / "dit"))
        image_vae = AutoencoderKL.from_pretrained(str(folder / "image_vae")) if (folder / "image_vae").is_dir() else None
        image_vae_size = dit.config.input_size * 2 ** (len(image_vae.config.block_out_channels) - 1) if image_vae else None
        clip = CLIPModel.from_pretrained(str(folder / "clip"))
        conditioner = ClipConditioner(clip, CLIPTokenizer.from_pretrained(str(folder / "clip")), image_vae, image_vae_size, dit.config.image_pixels)
        parts = [AutoencoderKL.from_pretrained(str(folder / "mask_vae")), dit, conditioner]
        for module in parts:  # inference (and stage 3) only: frozen
            module.eval().requires_grad_(False)
        return cls(*parts, DDPMScheduler.from_pretrained(str(folder / "scheduler")))

    def save_pretrained(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        self.mask_vae.save_pretrained(str(out_dir / "mask_vae"))
        self.dit.save_pretrained(str(out_dir / "dit"))
        self.conditioner.clip.save_pretrained(str(out_dir / "clip"))
        self.conditioner.tokenizer.save_pretrained(str(out_dir / "clip"))
        if self.conditioner.image_vae is not None:
            self.conditioner.image_vae.save_pretrained(str(out_dir / "image_vae"))
        self.scheduler.save_pretrained(str(out_dir / "scheduler"))

    def to(self, device) -> "MaskGenerationPipeline":
        for module in (self.mask_vae, self.dit, self.conditioner):
            module.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, texts: list[str], num_inference_steps: int = 25, generator: torch.Generator | None = None) -> MaskGenerationOutput:
        """`images` (B, 3, H, W) in [-1, 1]."""
        image_features, text_features, image_latents = self.conditioner(images, texts)
        trajectory = ddim_trajectory(self.dit, self.sampler, image_features, text_features, num_inference_steps, generator, image_latents)
        return MaskGenerationOutput(self.mask_vae.decode(trajectory[-1]).sample, trajectory)

    @torch.no_grad()
    def prompt_masks(self, images: torch.Tensor, texts: list[str], depth: int, num_inference_steps: int = 25, generator=None) -> list[torch.Tensor]:
        """Decoded soft masks feeding prompt layers 0..depth-1 (trajectory indices [steps-1, steps-3, ...])."""
        trajectory = self(images, texts, num_inference_steps, generator).trajectory
        return [self.mask_vae.decode(trajectory[i]).sample for i in prompt_indices(num_inference_steps, depth)]


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
class GroundingPipelineOutput:
    boxes: torch.Tensor  # (B, K, 4) xyxy in [0, 1], best first
    scores: torch.Tensor  # (B, K) probabilities, descending
    masks: torch.Tensor | None  # (B, 1, S, S) the generated mask (Diff-Prompt only)
    trajectory_masks: list[torch.Tensor] | None  # decoded masks fed to the prompt layers


class GroundingPipeline:
    """Stage 3 (or a bare host): image + expression -> ranked boxes, with Diff-Prompt/VPT/CoOp prompts."""

    def __init__(self, host, prompts: StagePrompts, generator: MaskGenerationPipeline | None = None, ddim_steps: int = 25):
        self.host, self.prompts, self.mask_generator, self.ddim_steps = host, prompts, generator, ddim_steps
        if prompts.needs_masks and generator is None:
            raise UserError("Diff-Prompt prompts need the stage-2 mask generator: set model.prompt_generator to the stage-2 model folder")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "GroundingPipeline":
        folder = _check_folder(Path(folder), ["host"])
        index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
        host = load_host(folder / "host")
        if (folder / "prompts.json").is_file():
            prompts = StagePrompts.from_pretrained(folder)
        else:
            prompts = StagePrompts("none", 0, 2, host.vision_dims[0], host.text_dim)
        generator = MaskGenerationPipeline.from_pretrained(folder) if prompts.needs_masks else None
        return cls(host.eval().requires_grad_(False), prompts.eval().requires_grad_(False), generator, index.get("ddim_steps", 25))

    def save_pretrained(self, out_dir: str | Path, class_name: str = "DiffPromptGroundingPipeline") -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.host.save_pretrained(out_dir / "host")
        if self.prompts.method != "none":
            self.prompts.save_pretrained(out_dir)
        if self.mask_generator is not None:
            self.mask_generator.save_pretrained(out_dir)
        write_model_index(out_dir, class_name, method=self.prompts.method, ddim_steps=self.ddim_steps)

    def prompt_tensors(self, images: torch.Tensor, texts: list[str], generator=None):
        masks = self.mask_generator.prompt_masks(images, texts, self.prompts.depth, self.ddim_steps, generator) if self.prompts.needs_masks else None
        vision, text = self.prompts(images.shape[0], masks)
        return vision, text, masks

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, texts: list[str], generator: torch.Generator | None = None, top_k: int = 5) -> GroundingPipelineOutput:
        """`images` (B, 3, H, W) in [-1, 1]; one expression per image."""
        if len(texts) != images.shape[0]:
            raise UserError(f"{images.shape[0]} images but {len(texts)} expressions: pass one expression per image")
        vision, text, masks = self.prompt_tensors(images, texts, generator)
        with self.host.prompted(vision, text, self.prompts.paper_compat):
            out = self.host(self.host.preprocess(images), texts)
        scores, order = out.logits.sigmoid().sort(dim=1, descending=True)
        order, scores = order[:, :top_k], scores[:, :top_k]
        boxes = torch.gather(out.boxes, 1, order[..., None].expand(-1, -1, 4))
        return GroundingPipelineOutput(boxes, scores, masks[0] if masks else None, masks)
