"""Training head of Prompt Diffusion: a ControlNet with an example-pair encoder and a query encoder
learns, jointly over several tasks, to apply the task an example pair shows to a query image.

Per the spec's decisions: uniform task sampling; condition dropout text 10 %, example pair 10 %,
both together 5 %, the query never; pair and query in [-1, 1] by default; Stable Diffusion frozen
unless `train_unet_decoder: true` (the UNet decoder, ldm `output_blocks` and `out`, then trains
too, as the official run did); eps-MSE loss. Randomness is drawn in the forward, in step order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.progress import track

from ...core.components import Components, load_components, token_ids
from ...core.head import Head
from ...core.images import make_grid, to_pil
from ...errors import UserError
from ...recipes import TaskCard, load_task
from .controlnet import PromptDiffusionControlNetModel, conditioning_channels_for
from .data import HELD_OUT_SEED, IMAGE_KEYS, SyntheticTriplets, as_tensors, with_task_texts
from .pipeline import PromptDiffusionPipeline


class PromptDiffusionOptions(BaseModel):
    """The recipe's `model:` section."""

    model_config = ConfigDict(extra="forbid")
    conditioning_range: Literal["[-1, 1]", "[0, 1]"] = "[-1, 1]"  # [-1, 1]: the paper; [0, 1]: diffusers' port
    train_unet_decoder: bool = False
    task_texts: dict[str, str] = {}  # task name -> fixed text, replacing the task card's (e.g. for a small tokenizer)
    text_dropout: float = Field(0.10, ge=0, le=1)  # in total, including the "both" share
    pair_dropout: float = Field(0.10, ge=0, le=1)
    both_dropout: float = Field(0.05, ge=0, le=1)  # text and pair dropped together
    conditioning_embedding_out_channels: list[int] | None = None  # default: SD's, cut to the VAE factor
    controlnet: str | None = None  # start from an existing PromptDiffusionControlNetModel folder
    # The ControlNet's own learning rate (default: train.learning_rate). Its zero convolutions and the
    # last convolutions of the hint encoders start at zero and grow slowly at the backbone's rate.
    controlnet_learning_rate: float | None = Field(None, gt=0)
    validation_steps: int = Field(20, ge=1)
    # Inference defaults, exported into the pipeline's config (`icd infer` and `icd eval` read them there).
    inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(9.0, ge=1)

    @model_validator(mode="after")
    def _check_dropout(self):
        if self.both_dropout > min(self.text_dropout, self.pair_dropout) or self.text_dropout + self.pair_dropout - self.both_dropout > 1:
            raise ValueError("model.both_dropout must be at most text_dropout and pair_dropout, and the three must add up to at most 1")
        return self


def draw_condition_dropout(batch_size: int, options: PromptDiffusionOptions, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample masks (drop_text, drop_pair), from one uniform draw r per sample as in ControlLDM:
    text alone for r < t - b, both for t - b <= r < t, the pair alone for t <= r < t + p - b."""
    r = torch.rand(batch_size, device=device)
    text, pair, both = options.text_dropout, options.pair_dropout, options.both_dropout
    drop_text = r < text
    drop_pair = (r >= text - both) & (r < text + pair - both)
    return drop_text, drop_pair


class PromptDiffusionModel(torch.nn.Module):
    """The trainable ControlNet (and, when asked, the UNet) with a forward that returns the loss.

    The VAE, text encoder and a frozen UNet are kept out of the module's registry: they are not
    optimised, not checkpointed, and the trainer places them (`Head.frozen`).
    """

    def __init__(self, components: Components, controlnet: PromptDiffusionControlNetModel, options: PromptDiffusionOptions, empty_ids: torch.Tensor):
        super().__init__()
        self.controlnet = controlnet
        self.options = options
        self.backbone = {"vae": components.vae, "text_encoder": components.text_encoder, "unet": components.unet}
        self.noise_scheduler = components.noise_scheduler
        if options.train_unet_decoder:
            self.unet = components.unet  # registered: trained in part and checkpointed
        self.register_buffer("empty_ids", empty_ids, persistent=False)

    def forward(self, example_source, example_target, query, target, input_ids, latent_moments=None, text_embeds=None) -> torch.Tensor:
        """eps-MSE loss of one batch; `latent_moments` and `text_embeds` come from `icd data cache` when given."""
        vae, text_encoder, unet = self.backbone["vae"], self.backbone["text_encoder"], self.backbone["unet"]
        drop_text, drop_pair = draw_condition_dropout(target.shape[0], self.options, target.device)
        input_ids = torch.where(drop_text[:, None], self.empty_ids, input_ids)
        pair = torch.cat([example_source, example_target], dim=1)
        pair = torch.where(drop_pair[:, None, None, None], torch.zeros_like(pair), pair)  # zero = mid-grey in [-1, 1]
        if self.options.conditioning_range == "[0, 1]":
            pair, query = (pair + 1) / 2, (query + 1) / 2
        with torch.no_grad():
            # A cached posterior is sampled here, as the encoder's would be: the same latents, draw for draw.
            posterior = DiagonalGaussianDistribution(latent_moments) if latent_moments is not None else vae.encode(target.to(vae.dtype)).latent_dist
            # Contiguous: the encoder may return channels-last latents, and CPU random draws depend on the layout.
            latents = (posterior.sample() * vae.config.scaling_factor).contiguous()
            if text_embeds is None:
                text = text_encoder(input_ids)[0]
            else:
                text = torch.where(drop_text[:, None, None], text_encoder(self.empty_ids)[0].to(text_embeds.dtype), text_embeds)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        down, mid = self.controlnet(noisy, timesteps, text, controlnet_cond=pair, controlnet_query_cond=query, return_dict=False)
        prediction = unet(noisy, timesteps, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        return F.mse_loss(prediction.float(), noise.float())


def decoder_parameter_names(unet) -> list[str]:
    """The UNet decoder (ldm `output_blocks` and `out`): up blocks, final norm and conv."""
    return [name for name, _ in unet.named_parameters() if name.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))]


def freeze_backbone(components: Components, options: PromptDiffusionOptions) -> None:
    """Freeze the VAE, text encoder and UNet, except the UNet decoder when the options train it."""
    for module in (components.vae, components.text_encoder, components.unet):
        module.requires_grad_(False)
    if options.train_unet_decoder:
        decoder = set(decoder_parameter_names(components.unet))
        for name, param in components.unet.named_parameters():
            param.requires_grad_(name in decoder)


class PromptDiffusionHead(Head):
    """Recipes `prompt_diffusion` (SD1.5) and `prompt_diffusion-tiny` (tiny backbone, synthetic scenes)."""

    Options = PromptDiffusionOptions
    pipeline_classes = (PromptDiffusionPipeline,)
    data_keys = frozenset({"source", "path", "size", "seed", "num_samples"})

    def build(self) -> None:
        if not self.recipe.tasks:
            raise UserError(f"recipe {self.recipe.name} lists no tasks: add e.g. tasks: [image_to_depth, depth_to_image]")
        self.tasks: list[TaskCard] = with_task_texts([load_task(name) for name in self.recipe.tasks], self.options.task_texts)
        self.components = load_components(self.recipe.backbone or "tiny")
        check_task_texts(self.tasks, self.components.tokenizer)
        self.controlnet = build_controlnet(self.components, self.options)
        freeze_backbone(self.components, self.options)
        self.model = PromptDiffusionModel(self.components, self.controlnet, self.options, self.tokenize([""]))
        self.dataset = self.make_dataset()
        self.validation_triplets = [as_tensors(triplet) for triplet in self.held_out(4)]

    def make_dataset(self):
        data = self.recipe.data
        if data.source == "ip2p":
            from ...data.ip2p import IP2PTriplets

            if not data.path:
                raise UserError("data.source ip2p needs data.path: the InstructPix2Pix folder (with seeds.json)")
            triplets = IP2PTriplets(data.path, self.tasks, "train", size=data.size, seed=data.seed)
            return TensorView(triplets)
        if data.source != "synthscenes":
            raise UserError(f"the prompt_diffusion head reads data.source synthscenes or ip2p, not {data.source}")
        triplets = SyntheticTriplets(data.num_samples, self.tasks, size=data.size, seed=data.seed)
        # Rendered once up front (about 15 ms each at 64 px): a step then costs the model alone.
        return [as_tensors(t) for t in track(triplets, description="rendering scene families", transient=True)]

    def held_out(self, n: int) -> list[dict]:
        return list(SyntheticTriplets(n, self.tasks, size=self.recipe.data.size, seed=HELD_OUT_SEED))

    def trainable(self) -> torch.nn.Module:
        return self.model

    def frozen(self) -> list[torch.nn.Module]:
        parts = [self.components.text_encoder, self.components.vae]
        return parts if self.options.train_unet_decoder else parts + [self.components.unet]

    def train_dataset(self):
        return self.dataset

    def parameter_groups(self, model: PromptDiffusionModel, learning_rate: float) -> list[dict]:
        """The ControlNet at `controlnet_learning_rate` when set; the decoders at the recipe's rate."""
        controlnet = [p for p in model.controlnet.parameters() if p.requires_grad]
        ids = {id(p) for p in controlnet}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": controlnet, "lr": self.options.controlnet_learning_rate or learning_rate}]
        return groups + ([{"params": rest, "lr": learning_rate}] if rest else [])

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return token_ids(self.components.tokenizer, captions)

    def collate(self, samples: list[dict]) -> dict:
        if "latent_moments" in samples[0]:  # from `icd data cache`: images stored as uint8
            batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
            return batch | {key: batch[key].float() / 127.5 - 1 for key in IMAGE_KEYS}
        batch = {key: torch.stack([s[key] for s in samples]) for key in IMAGE_KEYS}
        return batch | {"input_ids": self.tokenize([s["caption"] for s in samples])}

    def cache_features(self, batch: dict) -> dict[str, torch.Tensor]:
        """The images (uint8, exact), the token ids, the target's VAE posterior and the text embeddings."""
        vae, text_encoder = self.components.vae, self.components.text_encoder
        images = {key: ((batch[key] + 1) * 127.5).round().to(torch.uint8) for key in IMAGE_KEYS}
        return images | {
            "input_ids": batch["input_ids"],
            "latent_moments": vae.encode(batch["target"].to(vae.dtype)).latent_dist.parameters,
            "text_embeds": text_encoder(batch["input_ids"])[0],
        }

    def loss(self, model: torch.nn.Module, batch: dict, step: int) -> torch.Tensor:
        return model(batch["example_source"], batch["example_target"], batch["query"], batch["target"], batch["input_ids"],
                     batch.get("latent_moments"), batch.get("text_embeds"))

    def pipeline(self, model: PromptDiffusionModel) -> PromptDiffusionPipeline:
        """The inference pipeline, with the recipe's inference defaults and the tasks' fixed texts in its config."""
        texts = {task.name: task.text for task in self.tasks if task.text is not None}
        return make_pipeline(self.components, model.controlnet, self.options.conditioning_range,
                             self.options.inference_steps, self.options.guidance_scale, texts)

    @torch.no_grad()
    def validate(self, model: PromptDiffusionModel, step: int):
        pipe = self.pipeline(model)
        rows = []
        for triplet in self.validation_triplets:
            unit = {key: (triplet[key] + 1) / 2 for key in IMAGE_KEYS}
            output = pipe(triplet["caption"], unit["query"], [unit["example_source"], unit["example_target"]],
                          num_inference_steps=self.options.validation_steps, generator=torch.Generator().manual_seed(0)).images[0]
            rows.append([to_pil(triplet[key]) for key in IMAGE_KEYS[:3]] + [output, to_pil(triplet["target"])])
        return make_grid(rows)

    def export(self, model: PromptDiffusionModel, out_dir: Path) -> None:
        self.pipeline(model).save_pretrained(str(out_dir), safe_serialization=True)

    def model_card(self) -> str:
        tasks = ", ".join(task.name for task in self.tasks)
        return (
            f"Prompt Diffusion (in-context generation) trained on: {tasks}. Backbone: {self.recipe.backbone}.\n\n"
            "```python\nfrom incontext_diffusion import PromptDiffusionPipeline\n"
            "pipe = PromptDiffusionPipeline.from_pretrained(PATH)\n"
            "image = pipe(prompt, image=query, image_pair=[example_source, example_target]).images[0]\n```\n"
            f"Inference defaults (in model_index.json): {self.options.inference_steps} DDIM steps, guidance {self.options.guidance_scale}.\n"
            "Or `icd infer --model PATH --example SRC TGT --query IMG|FOLDER|GLOB --prompt TEXT --out OUT.png|FOLDER --grid`; "
            "`icd eval --model PATH` for the in-context metrics.\n"
        )


class TensorView(torch.utils.data.Dataset):
    """A triplet dataset whose items come out as tensors."""

    def __init__(self, triplets):
        self.triplets = triplets

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, index: int) -> dict:
        return as_tensors(self.triplets[index])


def check_task_texts(tasks: list[TaskCard], tokenizer) -> None:
    """A fixed task text must fit the tokenizer, or its end would be cut off silently."""
    for task in tasks:
        if task.text is None:
            continue
        length = len(tokenizer(task.text).input_ids)
        if length > tokenizer.model_max_length:
            raise UserError(
                f"the text of task {task.name} ({task.text!r}) is {length} tokens, but the tokenizer takes {tokenizer.model_max_length}: "
                f"set model.task_texts.{task.name} to a shorter text"
            )


def build_controlnet(components: Components, options: PromptDiffusionOptions) -> PromptDiffusionControlNetModel:
    """A new ControlNet copied from the backbone's UNet, or the one `options.controlnet` names."""
    if options.controlnet:
        return PromptDiffusionControlNetModel.from_pretrained(options.controlnet, local_files_only=True)
    channels = options.conditioning_embedding_out_channels or conditioning_channels_for(components.vae_scale_factor)
    if 2 ** (len(channels) - 1) != components.vae_scale_factor:
        raise UserError(
            f"model.conditioning_embedding_out_channels {list(channels)} down-samples by {2 ** (len(channels) - 1)}, "
            f"but the VAE by {components.vae_scale_factor}: give {int(components.vae_scale_factor).bit_length()} widths"
        )
    return PromptDiffusionControlNetModel.from_unet(components.unet, conditioning_embedding_out_channels=tuple(channels))


def make_pipeline(components: Components, controlnet: PromptDiffusionControlNetModel, conditioning_range: str = "[-1, 1]",
                  steps: int = 50, guidance_scale: float = 9.0, task_texts: dict[str, str] | None = None) -> PromptDiffusionPipeline:
    """The inference pipeline: the backbone, the ControlNet, SD's DDIM settings and the inference defaults."""
    scheduler = DDIMScheduler.from_config(components.noise_scheduler.config, set_alpha_to_one=False, steps_offset=1, clip_sample=False, timestep_spacing="leading")
    pipe = PromptDiffusionPipeline(components.vae, components.text_encoder, components.tokenizer, components.unet, controlnet, scheduler,
                                   conditioning_range, steps, guidance_scale, task_texts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
