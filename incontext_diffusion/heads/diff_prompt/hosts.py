"""Stage 3 of Diff-Prompt: grounding hosts and the prompt-injection contract (diff_prompt.md §4, decision 1).

Contract. A host is an `nn.Module` with
- `vision_blocks` / `text_layers`: its prompt slots (Swin attention blocks and BERT layers, in depth
  order) and `vision_dims` / `text_dim`, the width of each slot;
- `forward(pixel_values, texts, target_boxes=None) -> GroundingOutput` (box logits and normalised
  xyxy boxes, plus the host's own grounding loss when targets are given);
- `preprocess(images)` from [-1, 1] RGB tensors to its input at `image_size`, and `save_pretrained` / `load_host`.
`with host.prompted(vision, text):` sets per-sample prompts (B, L, D) for the first len(vision)
Swin blocks and the first len(text) BERT layers; outside the block the host is untouched.
`paper_compat=True` reproduces the official code's batch mixing of vision prompts (bug 1).

Injection (both hosts share it, since both are built from transformers' Swin and BERT):
- Swin: a layer's prompts are appended to every attention window as extra keys/values; their
  relative-position-bias and shift-mask entries are zero; only the window tokens come out, so the
  MLP never sees prompts. Windows are batch-major, so the prompts are tiled with
  `repeat_interleave` (window k belongs to sample k // windows_per_sample; bug 1 fixed).
  Prompts are made at the first stage's width and reshaped to later stages' widths by merging
  adjacent tokens, as in the paper (8 x 96 -> 4 x 192 -> 2 x 384 -> 1 x 768).
- BERT: a layer's prompts are prepended, attended to by every token, and dropped after the layer.

Hosts: `TinyGroundingHost` (Swin + BERT + a GLIP-A-style dot-product head: a score per image cell
from the cell/text dot product and a box per cell; it trains on CPU in minutes) and
`GroundingDinoHost` (transformers' `GroundingDinoForObjectDetection`, the default real host).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.swin.modeling_swin import SwinLayer

from ...errors import UserError


@dataclass
class GroundingOutput:
    logits: torch.Tensor  # (B, Q) score logit of each candidate box for the expression
    boxes: torch.Tensor  # (B, Q, 4) normalised xyxy
    loss: torch.Tensor | None = None


class PromptedSwinAttention(nn.Module):
    """Wraps a transformers `SwinAttention`: prompts join every window as extra keys and values."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.inner = attention
        self.prompts: torch.Tensor | None = None
        self.paper_compat = False  # True: the official `repeat` tiling, which mixes prompts across the batch
        self.dim = attention.q_proj.in_features

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if self.prompts is None:
            return self.inner(hidden_states, attention_mask, **kwargs)
        a = self.inner
        windows, n, channels = hidden_states.shape
        batch, length = self.prompts.shape[:2]
        if windows % batch:
            raise ValueError(f"{windows} windows do not split into {batch} samples")
        if self.paper_compat:
            prompts = self.prompts.to(hidden_states.dtype).repeat(windows // batch, 1, 1)
        else:
            prompts = self.prompts.to(hidden_states.dtype).repeat_interleave(windows // batch, dim=0)
        tokens = torch.cat([hidden_states, prompts], dim=1)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(windows, x.shape[1], a.num_attention_heads, a.head_dim).transpose(1, 2)

        query, key, value = heads(a.q_proj(hidden_states)), heads(a.k_proj(tokens)), heads(a.v_proj(tokens))
        bias = a.relative_position_bias()  # (1, heads, n, n)
        if attention_mask is not None:  # shift mask (windows_per_sample, n, n), same for every sample
            bias = bias + attention_mask.unsqueeze(1).repeat(batch, 1, 1, 1)
        bias = F.pad(bias, (0, length)).expand(windows, -1, -1, -1)  # prompt keys: zero bias, never masked
        dropout = a.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype), dropout_p=dropout, scale=a.scaling)
        return a.o_proj(out.transpose(1, 2).reshape(windows, n, channels)), None


class PromptedBertLayer(nn.Module):
    """Wraps a transformers `BertLayer`: prompts are prepended for the layer and dropped after it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.inner = layer
        self.prompts: torch.Tensor | None = None
        self.dim = layer.attention.self.query.in_features if hasattr(layer.attention, "self") else layer.intermediate.dense.in_features

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if self.prompts is None:
            return self.inner(hidden_states, attention_mask, *args, **kwargs)
        length = self.prompts.shape[1]
        kwargs.pop("position_ids", None)  # phrase-restarting positions would be misread with extra tokens
        tokens = torch.cat([self.prompts.to(hidden_states.dtype), hidden_states], dim=1)
        out = self.inner(tokens, extend_mask(attention_mask, length), *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out[:, length:]


def extend_mask(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """A 4D attention mask (B, 1 or heads, Q, K) with `length` prompt rows and keys in front that attend freely."""
    if mask is None:
        return None
    if mask.ndim != 4:
        raise ValueError(f"expected a 4D attention mask, got shape {tuple(mask.shape)}")
    attend = True if mask.dtype == torch.bool else 0.0
    mask = F.pad(mask, (length, 0), value=attend)
    if mask.shape[2] > 1:
        mask = F.pad(mask, (0, 0, length, 0), value=attend)
    return mask


def inject(module: nn.Module) -> tuple[list[PromptedSwinAttention], list[PromptedBertLayer]]:
    """Wrap every Swin attention and BERT layer inside `module`, in depth order; returns the slots."""
    vision = []
    for layer in [m for m in module.modules() if isinstance(m, SwinLayer)]:
        layer.attention = PromptedSwinAttention(layer.attention)
        vision.append(layer.attention)
    text = []
    for parent in list(module.modules()):
        if isinstance(parent, nn.ModuleList) and parent and all(isinstance(m, BertLayer) for m in parent):
            for i, layer in enumerate(parent):
                parent[i] = PromptedBertLayer(layer)
                text.append(parent[i])
    return vision, text


def fit_tokens(prompts: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, L, D0) -> (B, L * D0 / dim, dim) by merging adjacent tokens (the paper's stage reshape)."""
    batch, length, width = prompts.shape
    if width == dim:
        return prompts
    if (length * width) % dim:
        raise UserError(f"{length} prompt tokens of width {width} cannot be reshaped to width {dim}: use a prompt length that divides evenly")
    return prompts.reshape(batch, length * width // dim, dim)


class PromptSlots(nn.Module):
    """Mixin part of every host: the slots and the `prompted` context."""

    vision_blocks: list[PromptedSwinAttention]
    text_layers: list[PromptedBertLayer]

    @property
    def device(self) -> torch.device:  # read by DiffusionPipeline.device / .to()
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def vision_dims(self) -> list[int]:
        return [block.dim for block in self.vision_blocks]

    @property
    def text_dim(self) -> int:
        return self.text_layers[0].dim

    @contextlib.contextmanager
    def prompted(self, vision: list[torch.Tensor] | None = None, text: list[torch.Tensor] | None = None, paper_compat: bool = False):
        vision, text = vision or [], text or []
        if len(vision) > len(self.vision_blocks) or len(text) > len(self.text_layers):
            raise UserError(
                f"prompt depth {max(len(vision), len(text))} exceeds the host's {len(self.vision_blocks)} Swin blocks / {len(self.text_layers)} BERT layers: lower model.depth"
            )
        try:
            for block, prompts in zip(self.vision_blocks, vision):
                block.prompts, block.paper_compat = fit_tokens(prompts, block.dim), paper_compat
            for layer, prompts in zip(self.text_layers, text):
                layer.prompts = prompts
            yield self
        finally:
            for slot in [*self.vision_blocks, *self.text_layers]:
                slot.prompts = None


# --------------------------------------------------------------------------------- tiny host


def box_giou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of xyxy boxes (..., 4)."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull_area = hull[..., 0] * hull[..., 1]
    return inter / union.clamp(min=1e-7) - (hull_area - union) / hull_area.clamp(min=1e-7)


class TinyGroundingHost(PromptSlots):
    """Swin + BERT + a dot-product head (like GLIP-T(A): no deep fusion; text meets vision in the head).

    Each cell of the last Swin stage proposes one box (distances to its four sides) and scores it by
    the dot product of the cell feature with the mean BERT token feature of the expression.
    """

    def __init__(self, swin, bert, tokenizer, head_dim: int = 64):
        super().__init__()
        self.swin, self.bert, self.tokenizer = swin, bert, tokenizer
        self.head_dim = head_dim
        vision_width = swin.num_features
        self.image_proj = nn.Linear(vision_width, head_dim)
        self.text_proj = nn.Linear(bert.config.hidden_size, head_dim)
        self.score_bias = nn.Parameter(torch.tensor(-2.0))
        self.box_head = nn.Sequential(nn.Linear(vision_width, vision_width), nn.GELU(), nn.Linear(vision_width, 4))
        self.vision_blocks, self.text_layers = inject(self)

    @classmethod
    def from_configs(cls, swin_config, bert_config, tokenizer, head_dim: int = 64) -> "TinyGroundingHost":
        from transformers import BertModel, SwinModel

        return cls(SwinModel(swin_config, add_pooling_layer=False), BertModel(bert_config, add_pooling_layer=False), tokenizer, head_dim)

    @property
    def image_size(self) -> int:
        """The side its Swin was trained at: `preprocess` resizes every image to it."""
        return self.swin.config.image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return images

    def tokenize(self, texts: list[str], device) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer([t.lower() for t in texts], padding=True, truncation=True, max_length=self.bert.config.max_position_embeddings, return_tensors="pt")
        return {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

    def forward(self, pixel_values: torch.Tensor, texts: list[str], target_boxes: torch.Tensor | None = None) -> GroundingOutput:
        cells = self.swin(pixel_values=pixel_values).last_hidden_state  # (B, G*G, C)
        tokens = self.tokenize(texts, pixel_values.device)
        words = self.bert(**tokens).last_hidden_state
        weights = tokens["attention_mask"].unsqueeze(-1).to(words.dtype)
        text = self.text_proj((words * weights).sum(1) / weights.sum(1))
        logits = torch.einsum("bnd,bd->bn", self.image_proj(cells), text) / math.sqrt(self.head_dim) + self.score_bias
        grid = int(math.isqrt(cells.shape[1]))
        centres = (torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="xy"), -1).reshape(-1, 2).to(cells) + 0.5) / grid
        sides = F.softplus(self.box_head(cells)) / grid  # distances to left, top, right, bottom
        boxes = torch.cat([centres - sides[..., :2], centres + sides[..., 2:]], dim=-1)
        output = GroundingOutput(logits, boxes)
        if target_boxes is not None:
            output.loss = self.grounding_loss(output, target_boxes, centres)
        return output

    @staticmethod
    def grounding_loss(output: GroundingOutput, target_boxes: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Sigmoid focal loss on the cells inside the target box (at least the cell holding its centre),
        plus L1 + GIoU of those cells' boxes."""
        from torchvision.ops import sigmoid_focal_loss

        inside = ((centres[None] >= target_boxes[:, None, :2]) & (centres[None] <= target_boxes[:, None, 2:])).all(-1)
        box_centre = (target_boxes[:, :2] + target_boxes[:, 2:]) / 2
        nearest = (centres[None] - box_centre[:, None]).abs().sum(-1).argmin(1)
        positive = inside.clone()
        positive[torch.arange(len(positive)), nearest] = True
        num_positive = positive.sum().clamp(min=1)
        score_loss = sigmoid_focal_loss(output.logits, positive.to(output.logits.dtype), reduction="sum") / num_positive
        predicted, target = output.boxes[positive], target_boxes[:, None].expand_as(output.boxes)[positive]
        box_loss = (F.l1_loss(predicted, target, reduction="sum") * 5 + (1 - box_giou_pairs(predicted, target)).sum() * 2) / num_positive
        return score_loss + box_loss

    def save_pretrained(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        self.swin.config.save_pretrained(out_dir / "swin")
        self.bert.config.save_pretrained(out_dir / "bert")
        self.tokenizer.save_pretrained(str(out_dir / "tokenizer"))
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / "host.safetensors"))
        (out_dir / "host.json").write_text(json.dumps({"type": "tiny", "head_dim": self.head_dim}))

    @classmethod
    def from_pretrained(cls, folder: Path) -> "TinyGroundingHost":
        from transformers import BertConfig, BertTokenizer, SwinConfig

        folder = Path(folder)
        settings = json.loads((folder / "host.json").read_text())
        tokenizer = BertTokenizer.from_pretrained(str(folder / "tokenizer"))
        host = cls.from_configs(SwinConfig.from_pretrained(folder / "swin"), BertConfig.from_pretrained(folder / "bert"), tokenizer, settings["head_dim"])
        host.load_state_dict(load_file(str(folder / "host.safetensors")))
        return host


# ------------------------------------------------------------------------ Grounding DINO host


class GroundingDinoHost(PromptSlots):
    """transformers' `GroundingDinoForObjectDetection` (Swin + BERT + deep fusion + DETR head) as a host."""

    def __init__(self, model, tokenizer, image_size: int = 800):
        super().__init__()
        self.model, self.tokenizer, self.image_size = model, tokenizer, image_size
        self.vision_blocks, self.text_layers = inject(self.model)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        return ((images + 1) / 2 - self.mean) / self.std

    def forward(self, pixel_values: torch.Tensor, texts: list[str], target_boxes: torch.Tensor | None = None) -> GroundingOutput:
        # One phrase per sample, "."-terminated as Grounding DINO expects.
        phrases = [t.lower().rstrip(".") + "." for t in texts]
        max_length = self.model.config.max_text_len
        tokens = self.tokenizer(phrases, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(pixel_values.device)
        labels = None
        if target_boxes is not None:
            cxcywh = torch.cat([(target_boxes[:, :2] + target_boxes[:, 2:]) / 2, target_boxes[:, 2:] - target_boxes[:, :2]], dim=-1)
            labels = [{"class_labels": torch.zeros(1, dtype=torch.long, device=pixel_values.device), "boxes": box[None]} for box in cxcywh]
        out = self.model(pixel_values=pixel_values, input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, token_type_ids=tokens.get("token_type_ids"), labels=labels)
        text_tokens = tokens.attention_mask.bool() & (tokens.input_ids != self.tokenizer.cls_token_id) & (tokens.input_ids != self.tokenizer.sep_token_id)
        text_tokens = F.pad(text_tokens, (0, out.logits.shape[-1] - text_tokens.shape[1]), value=False)
        logits = out.logits.masked_fill(~text_tokens[:, None], float("-inf")).max(-1).values
        boxes = out.pred_boxes
        boxes = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], dim=-1).clamp(0, 1)
        return GroundingOutput(logits, boxes, out.loss)

    def save_pretrained(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        # The wrappers hold the original modules under `.inner`; save the unwrapped model's keys.
        state = {k.replace(".inner.", "."): v for k, v in self.model.state_dict().items()}
        self.model.save_pretrained(str(out_dir / "grounding_dino"), state_dict=state)
        self.tokenizer.save_pretrained(str(out_dir / "grounding_dino"))
        (out_dir / "host.json").write_text(json.dumps({"type": "grounding_dino", "image_size": self.image_size}))

    @classmethod
    def from_pretrained(cls, name_or_folder: str, image_size: int = 800) -> "GroundingDinoHost":
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection

        model = GroundingDinoForObjectDetection.from_pretrained(name_or_folder)
        return cls(model, AutoTokenizer.from_pretrained(name_or_folder), image_size)


def load_host(name_or_folder: str | Path) -> PromptSlots:
    """A host folder written by `save_pretrained`, or a Grounding DINO hub id / folder."""
    folder = Path(name_or_folder)
    if (folder / "host" / "host.json").is_file():  # an exported model folder
        folder = folder / "host"
    if (folder / "host.json").is_file():
        settings = json.loads((folder / "host.json").read_text())
        if settings["type"] == "tiny":
            return TinyGroundingHost.from_pretrained(folder)
        return GroundingDinoHost.from_pretrained(str(folder / "grounding_dino"), settings["image_size"])
    if folder.exists() or "/" in str(name_or_folder):
        return GroundingDinoHost.from_pretrained(str(name_or_folder))
    raise UserError(f"host '{name_or_folder}' is neither a host folder (with host.json) nor a hub id: pass runs/grounding_host-tiny/model or IDEA-Research/grounding-dino-tiny")
