"""The training heads of Diff-Prompt's three stages and of the tiny grounding host.

How the stages chain (each reads the previous stage's exported model folder):
    diff_prompt_mask_vae  -> runs/<recipe>/model (mask_vae/)
    diff_prompt_dit       reads model.mask_vae: <stage-1 model>            -> mask_vae/ dit/ clip/ scheduler/
    grounding_host        (tiny host pre-trained on synthetic scenes)      -> host/
    diff_prompt_grounding reads model.prompt_generator: <stage-2 model> and model.host: <host model or hub id>
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import track

from ...core.head import Head
from ...core.images import make_grid, to_pil
from ...data.refcoco import load_refexp
from ...errors import UserError
from .diffusion import diffusion_loss, noise_scheduler
from .dit import ClipConditioner, MaskDiT
from .mask_vae import PAPER_KL_WEIGHT, build_mask_vae, mask_vae_loss, reconstruct
from .pipeline import DiffPromptGroundingPipeline, DiffPromptMaskPipeline, StagePrompts, write_model_index


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


def image_tensor(rgb) -> torch.Tensor:
    return torch.tensor(rgb).permute(2, 0, 1).float() / 127.5 - 1


def referring_samples(head: Head, split: str = "train"):
    """The recipe's training expressions (synthetic scenes seed..seed+num_samples, or RefCOCO train)."""
    data = head.recipe.data
    samples = load_refexp(data.source, data.path, "all" if data.source == "synthscenes" and split == "train" else split, data.size,
                          data.num_samples, data.seed, data.min_objects, data.max_objects)
    return [samples[i] for i in track(range(len(samples)), description=f"loading {split} expressions", transient=True)]


def held_out_samples(head: Head, n: int):
    data = head.recipe.data
    if data.source == "synthscenes":
        return load_refexp("synthscenes", None, "all", data.size, max(n, 1), 1_000_000, data.min_objects, data.max_objects)[:n]
    samples = load_refexp(data.source, data.path, "val", data.size)
    return [samples[i] for i in range(min(n, len(samples)))]


def _as_batch(samples) -> dict:
    masks = [torch.from_numpy(s.mask).float()[None] if s.mask is not None else None for s in samples]
    return {
        "images": torch.stack([image_tensor(s.image) for s in samples]),
        "texts": [s.text for s in samples],
        "boxes": torch.tensor([s.box for s in samples], dtype=torch.float32),
        "masks": torch.stack(masks) if all(m is not None for m in masks) else None,
    }


# ------------------------------------------------------------------------------ stage 1


class MaskVAEOptions(Options):
    block_out_channels: list[int] = [4, 8, 16, 16]
    latent_channels: int = 4
    norm_num_groups: int = 2
    layers_per_block: int = Field(2, ge=1)  # the official depth; the tiny recipe uses 1
    kl_weight: float = Field(PAPER_KL_WEIGHT, ge=0)


class MaskVAEModel(torch.nn.Module):
    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return mask_vae_loss(self.vae, masks, self.kl_weight)[0]


# The `data:` keys every Diff-Prompt stage reads (synthetic expressions or RefCOCO).
DIFF_PROMPT_DATA_KEYS = frozenset({"source", "path", "size", "seed", "num_samples", "min_objects", "max_objects"})


class MaskVAEHead(Head):
    """Stage 1: the Mask-VAE on referred-object masks (recipe diff_prompt_mask_vae)."""

    Options = MaskVAEOptions
    data_keys = DIFF_PROMPT_DATA_KEYS

    def build(self) -> None:
        o = self.options
        self.model = MaskVAEModel(build_mask_vae(tuple(o.block_out_channels), o.latent_channels, o.norm_num_groups, o.layers_per_block), o.kl_weight)
        samples = referring_samples(self)
        self.masks = [torch.from_numpy(s.mask).float()[None] for s in samples if s.mask is not None]
        if not self.masks:
            raise UserError("the training data has no masks: stage 1 needs referred-object masks (synthscenes or RefCOCO with segmentation)")
        self.validation = torch.stack([torch.from_numpy(s.mask).float()[None] for s in held_out_samples(self, 8)])

    def trainable(self):
        return self.model

    def train_dataset(self):
        return self.masks

    def loss(self, model, batch, step):
        return model(batch)

    @torch.no_grad()
    def validate(self, model, step):
        masks = self.validation.to(next(model.parameters()).device)
        recon = reconstruct(model.vae, masks).clamp(0, 1)
        return make_grid([[to_pil(m, value_range=(0, 1)) for m in masks], [to_pil(r, value_range=(0, 1)) for r in recon]])

    def export(self, model, out_dir: Path) -> None:
        model.vae.save_pretrained(str(out_dir / "mask_vae"))
        write_model_index(out_dir, "DiffPromptMaskVAE", mask_size=self.recipe.data.size)

    def model_card(self) -> str:
        return "Stage 1 of Diff-Prompt: a 1-channel AutoencoderKL for referred-object masks (`mask_vae/`). Next: recipe diff_prompt_dit with model.mask_vae set to this folder.\n"


# ------------------------------------------------------------------------------ stage 2


class DiTOptions(Options):
    mask_vae: str  # stage-1 model folder
    clip: str = "openai/clip-vit-base-patch32"  # hub id / folder, or "tiny" (CLIPModel from config, offline)
    clip_width: int = 64  # tiny CLIP only
    clip_text_from: str | None = None  # tiny CLIP only: a diffusers backbone folder whose pre-trained, frozen text_encoder/ + tokenizer/ become CLIP's text tower
    train_clip: bool = False  # tiny CLIP only: no pre-trained vision tower exists, so the untrained parts may learn with the DiT (documented deviation)
    encode_once: bool = False  # with train_clip false: encode every training expression once at build time (small data sets; one process)
    image_latents_from: str | None = None  # a folder with vae/: its frozen latent of the image is concatenated to the DiT input (spatial condition)
    image_pixels: bool = False  # with image_latents_from: the image's pixels too, space-to-depth onto the latent grid
    prediction_type: str = Field("epsilon", pattern="^(epsilon|v_prediction)$")
    mask_latents: str = Field("sample", pattern="^(sample|mode)$")  # the paper samples the Mask-VAE posterior; "mode" takes its mean
    hidden_size: int = 512
    depth: int = 12
    num_heads: int = 8
    patch_size: int = 2
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    loss: str = Field("hybrid", pattern="^(hybrid|mse)$")
    num_train_timesteps: int = 100
    schedule: str = Field("cosine", pattern="^(cosine|linear)$")
    ddim_steps: int = Field(25, ge=1)


class PromptGeneratorModel(torch.nn.Module):
    """The DiT (and, for the tiny recipe, CLIP); forward = the stage-2 diffusion loss."""

    def __init__(self, dit: MaskDiT, scheduler, loss_type: str, conditioner: ClipConditioner | None):
        super().__init__()
        self.dit, self.scheduler, self.loss_type, self.conditioner = dit, scheduler, loss_type, conditioner

    def forward(self, latents, images, texts, features=None):
        image_features, text_features, image_latents = features if features is not None else self.conditioner(images, texts)
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        output = self.dit(noisy, t, image_features, text_features, image_latents)
        return diffusion_loss(self.scheduler, output, latents, noisy, noise, t, self.loss_type)


class DiTHead(Head):
    """Stage 2: the DiT prompt generator on frozen Mask-VAE latents (recipe diff_prompt_dit)."""

    Options = DiTOptions
    data_keys = DIFF_PROMPT_DATA_KEYS
    pipeline_classes = (DiffPromptMaskPipeline,)

    def build(self) -> None:
        from diffusers import AutoencoderKL
        from transformers import CLIPModel, CLIPTokenizer

        from .tiny import tiny_clip, tiny_clip_with_backbone_text

        o = self.options
        vae_dir = Path(o.mask_vae) / "mask_vae"
        if not vae_dir.is_dir():
            raise UserError(f"model.mask_vae '{o.mask_vae}' has no mask_vae/: train stage 1 first (icd train --recipe diff_prompt_mask_vae-tiny) and pass its model folder")
        self.vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval().requires_grad_(False)
        size = self.recipe.data.size
        if o.clip == "tiny" and o.clip_text_from:
            clip, tokenizer = tiny_clip_with_backbone_text(o.clip_text_from, o.hidden_size, size, o.clip_width)
            clip.text_model.requires_grad_(False)  # pre-trained: frozen, as the paper's CLIP
        elif o.clip == "tiny":
            clip, tokenizer = tiny_clip(o.hidden_size, size, self.recipe.run_dir() / "clip_tokenizer", o.clip_width)
        elif o.clip_text_from:
            raise UserError("model.clip_text_from only replaces the text tower of the tiny CLIP: set model.clip: tiny, or drop clip_text_from")
        else:
            clip, tokenizer = CLIPModel.from_pretrained(o.clip), CLIPTokenizer.from_pretrained(o.clip)
        if clip.config.projection_dim != o.hidden_size:
            raise UserError(f"CLIP projection_dim {clip.config.projection_dim} differs from model.hidden_size {o.hidden_size}: they must match (features are added to t)")
        latent_size = size // 2 ** (len(self.vae.config.block_out_channels) - 1)
        image_vae = _image_vae(o.image_latents_from) if o.image_latents_from else None
        image_vae_size = latent_size * 2 ** (len(image_vae.config.block_out_channels) - 1) if image_vae else None
        self.conditioner = ClipConditioner(clip, tokenizer, image_vae, image_vae_size, o.image_pixels)
        if not o.train_clip:
            self.conditioner.eval().requires_grad_(False)
        dit = MaskDiT(latent_size, o.patch_size, self.vae.config.latent_channels, o.hidden_size, o.depth, o.num_heads, o.mlp_ratio, o.learn_sigma,
                      self.conditioner.image_channels, o.image_pixels)
        self.scheduler = noise_scheduler(o.num_train_timesteps, o.schedule, o.prediction_type)
        self.model = PromptGeneratorModel(dit, self.scheduler, o.loss, self.conditioner if o.train_clip else None)
        self.samples = [s for s in referring_samples(self) if s.mask is not None]
        if o.encode_once and o.train_clip:
            raise UserError("model.encode_once needs a frozen conditioner: set model.train_clip: false, or encode_once: false")
        # Nothing before the DiT trains: encode every expression once, not every step.
        self.encoded = self.encode_samples(self.samples) if o.encode_once else None
        self.validation = held_out_samples(self, 6)

    @torch.no_grad()
    def encode_samples(self, samples, batch_size: int = 256) -> list[dict]:
        """Per expression: the frozen Mask-VAE posterior (mean, std) and the frozen conditioner's outputs."""
        encoded = []
        for start in track(range(0, len(samples), batch_size), description="encoding expressions", transient=True):
            batch = _as_batch(samples[start:start + batch_size])
            posterior = self.vae.encode(batch["masks"].to(self.vae.dtype)).latent_dist
            image_features, text_features, image_latents = self.conditioner(batch["images"], batch["texts"])
            for i in range(len(batch["texts"])):
                item = {"mean": posterior.mean[i].float(), "std": posterior.std[i].float(), "image_features": image_features[i], "text_features": text_features[i]}
                if image_latents is not None:
                    item["image_latents"] = image_latents[i]
                encoded.append(item)
        return encoded

    def trainable(self):
        return self.model

    def frozen(self):
        return [self.vae] + ([] if self.options.train_clip else [self.conditioner])

    def train_dataset(self):
        return self.samples if self.encoded is None else self.encoded

    def collate(self, samples):
        if self.encoded is None:
            return _as_batch(samples)
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def loss(self, model, batch, step):
        if self.encoded is not None:  # pre-encoded; the posterior draw still comes from the global RNG here
            latents = batch["mean"] + batch["std"] * torch.randn_like(batch["std"]) if self.options.mask_latents == "sample" else batch["mean"]
            features = (batch["image_features"], batch["text_features"], batch.get("image_latents"))
            return model(latents, None, None, features)
        with torch.no_grad():
            posterior = self.vae.encode(batch["masks"].to(self.vae.dtype)).latent_dist
            # contiguous: randn_like follows the memory layout, and the pre-encoded path must draw the same noise
            latents = (posterior.sample() if self.options.mask_latents == "sample" else posterior.mode()).float().contiguous()
            features = None if self.options.train_clip else self.conditioner(batch["images"], batch["texts"])
        return model(latents, batch["images"], batch["texts"], features)

    def pipeline(self, model) -> DiffPromptMaskPipeline:
        return DiffPromptMaskPipeline.from_parts(self.vae, model.dit, self.conditioner, self.scheduler, self.options.ddim_steps)

    @torch.no_grad()
    def validate(self, model, step):
        batch = _as_batch(self.validation)
        device = next(model.parameters()).device
        pipe = self.pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        masks = pipe(batch["images"].to(device), batch["texts"], generator=torch.Generator().manual_seed(0)).masks.clamp(0, 1)
        return make_grid([[to_pil(x) for x in batch["images"]], [to_pil(m, value_range=(0, 1)) for m in batch["masks"]], [to_pil(m, value_range=(0, 1)) for m in masks]],
                         labels=batch["texts"] + ["ground truth"] * len(masks) + ["generated"] * len(masks))

    def export(self, model, out_dir: Path) -> None:
        self.pipeline(model).save_pretrained(out_dir)
        write_model_index(out_dir, "DiffPromptMaskPipeline", mask_size=self.recipe.data.size, ddim_steps=self.options.ddim_steps)

    def model_card(self) -> str:
        return ("Stage 2 of Diff-Prompt: an adaLN-Zero DiT (EMA weights when train.ema) generating Mask-VAE latents from CLIP image and text features. "
                "Next: recipe diff_prompt_grounding with model.prompt_generator set to this folder.\n")


def _image_vae(folder: str):
    from diffusers import AutoencoderKL

    vae_dir = Path(folder) / "vae"
    if not vae_dir.is_dir():
        raise UserError(f"model.image_latents_from '{folder}' has no vae/: pass a diffusers backbone folder such as assets/tiny-ldm")
    return AutoencoderKL.from_pretrained(str(vae_dir)).eval().requires_grad_(False)


# ------------------------------------------------------------------------------ tiny host


class HostOptions(Options):
    embed_dim: int = 32
    depths: list[int] = [2, 2]
    num_heads: list[int] = [2, 4]
    window_size: int = 4
    bert_width: int = 32
    bert_layers: int = 4
    head_dim: int = 64
    absolute_positions: bool = False  # Swin's absolute position embedding: lets shared prompts address a place (docs, diagnosis)


class HostModel(torch.nn.Module):
    def __init__(self, host):
        super().__init__()
        self.host = host

    def forward(self, images, texts, boxes):
        return self.host(self.host.preprocess(images), texts, boxes).loss


def draw_boxes(rgb, gt_boxes, pred_boxes):
    """An RGB image (uint8 array or PIL) with xyxy pixel boxes: ground truth green, predictions red."""
    from PIL import ImageDraw

    from ...core.images import load_rgb

    image = load_rgb(rgb).copy()
    draw = ImageDraw.Draw(image)
    for boxes, colour in ((gt_boxes, (0, 200, 0)), (pred_boxes, (230, 30, 30))):
        for x1, y1, x2, y2 in boxes:
            draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=colour)
    return image


def grounding_picture(pipe: DiffPromptGroundingPipeline, samples):
    batch = _as_batch(samples)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch["images"], batch["texts"], torch.Generator().manual_seed(0), top_k=1)
    size = batch["images"].shape[-1]
    pictures = [draw_boxes(s.image, [[v * size for v in s.box]], out.boxes[i, :1].tolist()) for i, s in enumerate(samples)]
    return make_grid(pictures, labels=batch["texts"], ncols=len(pictures))


class GroundingHostHead(Head):
    """Pre-trains the CPU demo host (TinyGroundingHost: Swin + BERT + dot-product head) on synthetic expressions."""

    Options = HostOptions
    data_keys = DIFF_PROMPT_DATA_KEYS
    pipeline_classes = (DiffPromptGroundingPipeline,)  # the host alone: a grounding pipeline without prompts

    def build(self) -> None:
        from .hosts import TinyGroundingHost
        from .tiny import tiny_host_configs, write_bert_tokenizer

        o = self.options
        swin, bert = tiny_host_configs(self.recipe.data.size, o.embed_dim, o.depths, o.num_heads, o.window_size, o.bert_width, o.bert_layers,
                                       o.absolute_positions)
        tokenizer = write_bert_tokenizer(self.recipe.run_dir() / "bert_tokenizer")
        self.model = HostModel(TinyGroundingHost.from_configs(swin, bert, tokenizer, o.head_dim))
        self.samples = referring_samples(self)
        self.validation = held_out_samples(self, 6)

    def trainable(self):
        return self.model

    def train_dataset(self):
        return self.samples

    def collate(self, samples):
        return _as_batch(samples)

    def loss(self, model, batch, step):
        return model(batch["images"], batch["texts"], batch["boxes"])

    @torch.no_grad()
    def validate(self, model, step):
        return grounding_picture(DiffPromptGroundingPipeline(model.host, StagePrompts("none", 0, 2, 1, 1)), self.validation)

    def export(self, model, out_dir: Path) -> None:
        model.host.save_pretrained(out_dir / "host")
        write_model_index(out_dir, "DiffPromptGroundingPipeline", image_size=self.recipe.data.size)


# ------------------------------------------------------------------------------ stage 3


class GroundingOptions(Options):
    host: str  # host model folder (grounding_host) or a Grounding DINO hub id / folder
    prompt_generator: str | None = None  # stage-2 model folder (Diff-Prompt only)
    method: str = Field("diff_prompt", pattern="^(diff_prompt|vpt_deep|coop_deep)$")
    depth: int = Field(9, ge=1)
    prompt_length: int = Field(8, ge=1)
    base_channels: int = 8
    visual: bool = True
    textual: bool = True
    visual_global: bool = True
    textual_global: bool = True
    ddim_steps: int = Field(25, ge=2)
    prompt_source: str = Field("generated", pattern="^(generated|oracle)$")  # oracle: train on the true masks' noised latents (a diagnosis, docs)
    paper_compat: bool = False  # reproduce the official batch mixing of vision prompts (bug 1), for comparison only


class GroundingHead(Head):
    """Stage 3: trains only the prompt modules through the frozen host's own grounding loss."""

    Options = GroundingOptions
    data_keys = DIFF_PROMPT_DATA_KEYS
    pipeline_classes = (DiffPromptGroundingPipeline,)

    def build(self) -> None:
        from .hosts import load_host

        o = self.options
        self.host = load_host(o.host).eval().requires_grad_(False)
        self.generator = None
        if o.method == "diff_prompt":
            if o.prompt_generator is None:
                raise UserError("method diff_prompt needs model.prompt_generator: the stage-2 model folder (e.g. runs/diff_prompt_dit-tiny/model)")
            self.generator = DiffPromptMaskPipeline.from_pretrained(o.prompt_generator)
            self.generator.set_progress_bar_config(disable=True)  # it samples in every training step
        if o.prompt_source == "oracle" and o.method != "diff_prompt":
            raise UserError(f"model.prompt_source oracle replaces the DiT's masks: it needs method diff_prompt, not {o.method}")
        mask_size = self.recipe.data.size if self.generator is None else self.generator.mask_size
        self.prompts = StagePrompts(o.method, o.depth, o.prompt_length, self.host.vision_dims[0], self.host.text_dim, mask_size, o.base_channels,
                                    o.visual, o.textual, o.visual_global, o.textual_global, o.paper_compat)
        self.samples = referring_samples(self)
        self.validation = held_out_samples(self, 6)

    def trainable(self):
        return self.prompts

    def frozen(self):
        parts = [self.host]
        if self.generator is not None:
            parts += [self.generator.mask_vae, self.generator.dit, self.generator.conditioner]
        return parts

    def train_dataset(self):
        return self.samples

    def collate(self, samples):
        return _as_batch(samples)

    def loss(self, model, batch, step):
        images = batch["images"]
        # The mask generator runs frozen, under no_grad, with fresh noise from the global RNG.
        o = self.options
        if self.generator is None:
            masks = None
        elif o.prompt_source == "oracle":
            if batch["masks"] is None:
                raise UserError("model.prompt_source oracle needs the referred objects' masks: use synthscenes or RefCOCO with segmentation")
            masks = self.generator.oracle_prompt_masks(batch["masks"], o.depth, o.ddim_steps)
        else:
            masks = self.generator.prompt_masks(images, batch["texts"], o.depth, o.ddim_steps)
        vision, text = model(images.shape[0], masks)
        with self.host.prompted(vision, text, self.options.paper_compat):
            return self.host(self.host.preprocess(images), batch["texts"], batch["boxes"].to(images.device)).loss

    def pipeline(self, model) -> DiffPromptGroundingPipeline:
        return DiffPromptGroundingPipeline.from_generator(self.host, model, self.generator, self.options.ddim_steps)

    @torch.no_grad()
    def validate(self, model, step):
        return grounding_picture(self.pipeline(model), self.validation)

    def export(self, model, out_dir: Path) -> None:
        self.pipeline(model).save_pretrained(out_dir)

    def model_card(self) -> str:
        return f"Stage 3 of Diff-Prompt ({self.options.method}): prompt modules for a frozen grounding host (`host/`).\n"

