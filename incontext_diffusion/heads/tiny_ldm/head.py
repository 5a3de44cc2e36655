"""The embedded tiny text-to-image backbone, trained from scratch on synthetic scenes.

Two stages in one run (`model.vae_steps` splits them): first the VAE learns to reconstruct the
scenes *and their maps* (depth, edges, semantic colours, normals, canny; MSE + a small KL term), as
SD's VAE reproduces such maps, so that the heads that generate or read maps can use it; then, with the VAE frozen, the UNet and the CLIP text encoder learn
eps-prediction on the scaled latents, with 10% empty captions so that classifier-free guidance
works. The export is a plain `StableDiffusionPipeline` folder: this is what `backbone: tiny` loads.
Its model_index.json also holds the inference defaults (`INFERENCE_DEFAULTS_KEY`: steps, guidance),
which `icd infer` and `icd eval` read; the key is private (`_`), so diffusers loads the folder
without a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import Progress, track

from ...core import tiny
from ...core.components import Components, load_components, text_to_image_pipeline, token_ids
from ...core.head import Head
from ...core.images import check_output_path, make_grid, save_image, to_pil
from ...core.model_folder import read_model_folder
from ...data.annotators import synthetic_map
from ...data.synthscenes import CLASSES, COLOURS, FLOOR_RGB, SHAPES, SIZES, WALL_RGB, SynthScenesDataset, caption_vocabulary, render_scene
from ...errors import UserError
from ...metrics.speed import SpeedMeter

VALIDATION_CAPTIONS = [f"a large {colour} {shape}" for colour, shape in zip(COLOURS, SHAPES * 3)]
# What the VAE learns to reproduce; "image" is the scene itself, the rest are the heads' maps.
VAE_MODALITIES = ("image", "depth", "hed", "seg", "normal", "canny")
INFERENCE_DEFAULTS_KEY = "_inference_defaults"  # in model_index.json: {"num_inference_steps": ..., "guidance_scale": ...}
# The settings of folders whose model_index.json holds no inference defaults (exported before the
# head wrote them, or made by diffusers itself); a folder's own defaults always win.
FALLBACK_DEFAULTS = {"num_inference_steps": 25, "guidance_scale": 4.0}


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [-1, 1]."""
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1


class TinyLDMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: str = Field("tiny", pattern="^(tiny|micro)$")  # micro: the same structure, a few thousand parameters
    vae_steps: int = Field(1500, ge=0)  # optimiser steps of stage 1 (VAE); the rest train UNet + text encoder
    kl_weight: float = Field(1e-6, ge=0)
    # Share of VAE samples that are scenes; the rest are the maps, in equal shares.
    vae_image_share: float = Field(0.3, ge=0, le=1)
    caption_dropout: float = Field(0.1, ge=0, le=1)  # empty caption, for classifier-free guidance
    validation_steps: int = Field(20, ge=1)  # DDIM steps of the validation samples
    inference_steps: int = Field(25, ge=1)  # exported as the folder's default DDIM steps
    guidance_scale: float = Field(4.0, ge=1)  # validation samples and the folder's default guidance


class TinyLDM(torch.nn.Module):
    """VAE, UNet and text encoder in one module whose forward is the training loss (DDP-friendly)."""

    def __init__(self, components: Components, options: TinyLDMOptions, empty_ids: torch.Tensor):
        super().__init__()
        self.vae, self.unet, self.text_encoder = components.vae, components.unet, components.text_encoder
        self.noise_scheduler = components.noise_scheduler
        self.options = options
        # 1 / std of the VAE latents, measured on the first UNet step and checkpointed with the weights.
        self.register_buffer("latent_scale", torch.zeros(()))
        self.register_buffer("empty_ids", empty_ids, persistent=False)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, maps: torch.Tensor, step: int) -> torch.Tensor:
        if step < self.options.vae_steps:
            # maps: B x M x 3 x H x W (the scene's maps, in [-1, 1]); each sample is the scene or one of
            # its maps, drawn here in step order (not in the loader) so a resumed run draws the same.
            share = self.options.vae_image_share
            weights = torch.tensor([share] + [(1 - share) / maps.shape[1]] * maps.shape[1], device=images.device)
            pick = torch.multinomial(weights, images.shape[0], replacement=True)
            candidates = torch.cat([images[:, None], maps], dim=1)  # B x (1+M) x 3 x H x W
            inputs = candidates[torch.arange(images.shape[0], device=images.device), pick]
            posterior = self.vae.encode(inputs).latent_dist
            reconstruction = self.vae.decode(posterior.sample()).sample
            return F.mse_loss(reconstruction, inputs) + self.options.kl_weight * posterior.kl().mean()
        with torch.no_grad():
            latents = self.vae.encode(images).latent_dist.sample()
            if self.latent_scale == 0:
                self.latent_scale.fill_(1.0 / latents.std())
            latents = latents * self.latent_scale
        # Caption dropout is drawn here, in step order, not in the data loader (which runs a batch
        # ahead): a resumed run then draws exactly what the uninterrupted run drew.
        drop = torch.rand(input_ids.shape[0], device=input_ids.device) < self.options.caption_dropout
        input_ids = torch.where(drop[:, None], self.empty_ids, input_ids)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        text = self.text_encoder(input_ids)[0]
        prediction = self.unet(noisy, timesteps, text).sample
        return F.mse_loss(prediction.float(), noise.float())


class TinyLDMHead(Head):
    """Trains `assets/tiny-ldm` (recipe `tiny_ldm`)."""

    Options = TinyLDMOptions
    data_keys = frozenset({"size", "num_samples", "seed", "min_objects", "max_objects"})  # synthetic scenes only
    pipeline_classes = (StableDiffusionPipeline,)
    has_unused_parameters = True  # each stage trains only part of the module

    def build(self) -> None:
        from_scratch = self.recipe.backbone in (None, "scratch")
        if from_scratch:
            self.components = tiny.build_components(caption_vocabulary(), self.recipe.run_dir() / "tokenizer", self.options.scale)
        else:  # continue training an existing backbone
            self.components = load_components(self.recipe.backbone)
        self.model = TinyLDM(self.components, self.options, self.tokenize([""]))
        if not from_scratch and self.options.vae_steps == 0:
            # The loaded UNet learned on latents at the VAE's scaling factor: keep it, not a re-measured one.
            self.model.latent_scale.fill_(self.components.vae.config.scaling_factor)
        data = self.recipe.data
        scenes = SynthScenesDataset(data.num_samples, size=data.size, seed=data.seed, min_objects=data.min_objects, max_objects=data.max_objects)
        # Rendered once up front (maps as uint8, a sixth of the float size): a step then costs the
        # model alone, and every epoch sees the same images.
        self.dataset = [
            (image_tensor(s.rgb), s.caption, torch.from_numpy(np.stack([synthetic_map(s, m) for m in VAE_MODALITIES[1:]])).permute(0, 3, 1, 2))
            for s in track(scenes, description="rendering scenes", transient=True)
        ]

    def trainable(self) -> torch.nn.Module:
        return self.model

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self.dataset

    def collate(self, samples: list[tuple[torch.Tensor, str, torch.Tensor]]) -> dict:
        return {
            "images": torch.stack([image for image, _, _ in samples]),
            "input_ids": self.tokenize([caption for _, caption, _ in samples]),
            "maps": torch.stack([maps for _, _, maps in samples]).float() / 127.5 - 1,
        }

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return token_ids(self.components.tokenizer, captions)

    def loss(self, model: torch.nn.Module, batch: dict, step: int) -> torch.Tensor:
        return model(batch["images"], batch["input_ids"], batch["maps"], step)

    def pipeline(self, model: TinyLDM) -> StableDiffusionPipeline:
        # `model` holds the components' own modules, so the pipeline sees the trained weights.
        model.vae.register_to_config(scaling_factor=float(model.latent_scale))
        return text_to_image_pipeline(self.components, tiny.inference_scheduler())

    @torch.no_grad()
    def validate(self, model: TinyLDM, step: int):
        if step <= self.options.vae_steps or model.latent_scale == 0:
            # One scene per column group: the scene and each of its maps, then their reconstructions.
            image, _, maps = self.dataset[0]
            inputs = torch.cat([image[None], maps.float() / 127.5 - 1]).to(model.latent_scale.device)
            reconstruction = model.vae.decode(model.vae.encode(inputs).latent_dist.mode()).sample
            return make_grid([[to_pil(x) for x in inputs], [to_pil(x) for x in reconstruction]], labels=[*VAE_MODALITIES, *(f"{m} (VAE)" for m in VAE_MODALITIES)])
        pipe = self.pipeline(model)
        generator = torch.Generator().manual_seed(0)
        output = pipe(VALIDATION_CAPTIONS, num_inference_steps=self.options.validation_steps, guidance_scale=self.options.guidance_scale, generator=generator)
        return make_grid(output.images, labels=VALIDATION_CAPTIONS, ncols=4)

    def export(self, model: TinyLDM, out_dir: Path) -> None:
        self.pipeline(model).save_pretrained(str(out_dir), safe_serialization=True)
        index_file = out_dir / "model_index.json"
        index = json.loads(index_file.read_text())
        index[INFERENCE_DEFAULTS_KEY] = {"num_inference_steps": self.options.inference_steps, "guidance_scale": self.options.guidance_scale}
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def model_card(self) -> str:
        return (
            "A tiny text-to-image latent diffusion model (VAE, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, DDIM) "
            "trained on incontext_diffusion's synthetic scenes. It plays the part of Stable Diffusion 1.5 offline.\n\n"
            "```python\nfrom diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_pretrained(PATH)\n"
            "image = pipe('a large red sphere', num_inference_steps=25).images[0]\n```\n"
        )


def inference_defaults(model_dir: Path) -> dict:
    """The folder's default steps and guidance: what `icd infer` and `icd eval` both use unless flags say otherwise."""
    stored = read_model_folder(model_dir).index.get(INFERENCE_DEFAULTS_KEY, {})
    unknown = sorted(set(stored) - set(FALLBACK_DEFAULTS)) if isinstance(stored, dict) else [repr(stored)]
    if unknown:
        raise UserError(f"{model_dir / 'model_index.json'}: {INFERENCE_DEFAULTS_KEY} holds {', '.join(unknown)}: keep only {', '.join(FALLBACK_DEFAULTS)}")
    return {**FALLBACK_DEFAULTS, **stored}


def load_pipeline(model_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: StableDiffusionPipeline, prompts: list[str], steps: int, guidance: float, generator: torch.Generator, output_type: str = "pil"):
    """Run the pipeline with one rich progress bar over the denoising steps."""
    with Progress(transient=True) as progress:
        task = progress.add_task("denoising", total=steps)

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            progress.advance(task)
            return callback_kwargs

        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type=output_type, callback_on_step_end=on_step_end).images


def text_to_image(model_dir: Path, prompt: str, out: Path, steps: int, guidance: float, seed: int = 0, num_images: int = 1,
                  overwrite: bool = False) -> None:
    """`icd infer` for a text-to-image model: one image, or a grid of `num_images`."""
    check_output_path(out, overwrite=overwrite, what="--out")  # before the model runs
    images = generate(load_pipeline(model_dir), [prompt] * num_images, steps, guidance, torch.Generator().manual_seed(seed))
    save_image(images[0] if num_images == 1 else make_grid(images, ncols=min(num_images, 8)), out, overwrite=overwrite)


# The shipped segmentation model judges which shape a sample shows (when it is in assets/).
SHAPE_JUDGE = "tiny-meta-prompts-seg"


def evaluate_text_to_image(model_dir: Path, num_samples: int, steps: int, guidance: float, seed: int = 0, batch_size: int | None = None) -> dict:
    """`icd eval` for a text-to-image model trained on synthetic scenes: colour agreement (and shape
    agreement, judged by the shipped segmentation model, beside the judge's score on rendered scenes)
    of `num_samples` generated one-object images, the VAE's reconstruction RMSE per modality on as many
    held-out scenes, and the pipeline's speed."""
    from ...core.model_folder import ASSETS, load_pipeline as load_any_pipeline
    from ...metrics.generation import shape_agreement

    pipe = load_pipeline(model_dir)
    meter = SpeedMeter("cpu", torch.float32, batch_size=batch_size or num_samples)
    captions = one_object_captions(num_samples)
    images = one_object_samples(pipe, captions, steps=steps, guidance_scale=guidance, seed=seed, batch_size=batch_size, meter=meter)
    results = {"colour_agreement": colour_agreement(images, captions)}
    if (ASSETS / SHAPE_JUDGE / "model_index.json").is_file():
        judge = load_any_pipeline(SHAPE_JUDGE)
        labels = judge(list(images)).prediction  # N x H x W class ids
        results["shape_agreement"] = shape_agreement(list(labels), [caption.split()[3] for caption in captions], CLASSES)  # the synthetic scenes the judge was trained on
        # The judge's own score on as many rendered one-object scenes: the ceiling of the figure above.
        scenes = [render_scene(1_000_000 + index, size=images.shape[1], min_objects=1, max_objects=1) for index in range(num_samples)]
        real_labels = judge([scene.rgb for scene in scenes]).prediction
        results["shape_agreement/rendered_scenes"] = shape_agreement(list(real_labels), [scene.objects[0].shape for scene in scenes], CLASSES)
        results["shape_judge"] = SHAPE_JUDGE
    rmse = vae_reconstruction_rmse(pipe.vae, num_scenes=num_samples)
    return {**results, "num_samples": num_samples, "steps": steps, "guidance_scale": guidance,
            **{f"vae_reconstruction_rmse/{modality}": value for modality, value in rmse.items()}, **meter.results()}


@torch.no_grad()
def vae_reconstruction_rmse(vae: torch.nn.Module, num_scenes: int = 100, size: int = 64, seed: int = 1_000_000) -> dict[str, float]:
    """Encode -> decode RMSE (pixels / 255, posterior mode) of held-out scenes and each of their maps."""
    errors: dict[str, list[float]] = {m: [] for m in VAE_MODALITIES}
    for index in track(range(num_scenes), description="VAE reconstruction", transient=True):
        scene = render_scene(seed + index, size=size, min_objects=1, max_objects=2)
        inputs = torch.stack([image_tensor(synthetic_map(scene, m)) for m in VAE_MODALITIES])
        reconstruction = vae.decode(vae.encode(inputs).latent_dist.mode()).sample.clamp(-1, 1)
        # Round to uint8 as a saved map would be, then compare on [0, 1].
        squared = (((reconstruction + 1) * 127.5).round() / 255 - (inputs + 1) / 2) ** 2
        for modality, error in zip(VAE_MODALITIES, squared.mean(dim=(1, 2, 3))):
            errors[modality].append(float(error))
    return {m: float(np.sqrt(np.mean(e))) for m, e in errors.items()}


def one_object_captions(n: int) -> list[str]:
    """n captions naming one object, cycling through colours first so every colour appears."""
    colours = list(COLOURS)
    return [f"a {SIZES[(i // len(colours)) % 2]} {colours[i % len(colours)]} {SHAPES[(i // len(colours)) % len(SHAPES)]}" for i in range(n)]


def dominant_colour(image: np.ndarray) -> str | None:
    """The named colour most non-background pixels are closest to (each colour at several shadings)."""
    shades = np.linspace(0.35, 1.0, 8)[:, None]
    labels: list[str | None] = []
    references = []
    for label, rgb in [*COLOURS.items(), (None, FLOOR_RGB), (None, WALL_RGB)]:
        references.append(shades * np.asarray(rgb, dtype=np.float32))
        labels += [label] * len(shades)
    references = np.concatenate(references)
    pixels = image.reshape(-1, 3).astype(np.float32)
    nearest = np.argmin(((pixels[:, None, :] - references[None]) ** 2).sum(-1), axis=1)
    votes = [labels[i] for i in nearest if labels[i] is not None]
    return max(set(votes), key=votes.count) if votes else None


def one_object_samples(pipe: StableDiffusionPipeline, captions: list[str], steps: int = 25, guidance_scale: float = 4.0, seed: int = 0,
                       batch_size: int | None = None, meter: SpeedMeter | None = None) -> np.ndarray:
    """Generated images (N x H x W x 3 uint8), `batch_size` captions per pipeline call (all at once by
    default); `meter` times the calls."""
    generator = torch.Generator().manual_seed(seed)
    meter = meter or SpeedMeter()
    batch_size = batch_size or len(captions)
    images = []
    for start in range(0, len(captions), batch_size):
        batch = captions[start : start + batch_size]
        with meter.timed(len(batch)):
            images += list(generate(pipe, batch, steps, guidance_scale, generator, output_type="np"))
    return (np.stack(images) * 255).round().astype(np.uint8)


def colour_agreement(images: np.ndarray, captions: list[str]) -> float:
    """Fraction of samples for one-object captions whose dominant colour is the colour named."""
    hits = [dominant_colour(image) == caption.split()[2] for image, caption in zip(images, captions)]
    return float(np.mean(hits))
