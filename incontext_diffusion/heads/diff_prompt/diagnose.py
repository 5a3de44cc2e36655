"""Where Diff-Prompt's gain is lost (issue 14): one stage-3 model read four ways on the same expressions.

- `host`: the frozen host alone (no prompts), the baseline and the proposals the mask box ranks;
- `dit prompts`: the model as trained, prompts from the DiT's DDIM trajectory;
- `oracle prompts`: the ground-truth mask's own latent (Mask-VAE posterior mean) noised forward to each
  trajectory point's timestep, in place of the DiT's: the ceiling of mask supervision through this
  injection, with the adaptors as trained;
- `mask box`: the DiT's final mask alone, thresholded at 0.5, its largest 4-connected component's
  bounding box as the one answer (R@1), and the host's proposals ranked by their IoU with that box (R@5):
  what the masks know without the host.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ...errors import UserError
from ...metrics.grounding import GroundingRecall, box_iou


def largest_component_box(mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor | None:
    """(S, S) soft mask -> normalised xyxy box of its largest 4-connected component, or None if empty."""
    from scipy import ndimage

    binary = mask.detach().float().cpu().numpy() > threshold
    labels, count = ndimage.label(binary)  # 4-connectivity (the default cross structure)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    ys, xs = np.nonzero(labels == 1 + int(sizes.argmax()))
    h, w = binary.shape
    return torch.tensor([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h], dtype=torch.float64)


def diagnose(model: Path, num_scenes: int = 100, seed: int = 0, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """{row: {"<split> R@1": ..., ...}} for the rows above, splits all / unique / extreme / relation."""
    from ...data.refcoco import load_refexp
    from .head import _as_batch
    from .pipeline import DiffPromptGroundingPipeline

    pipe = DiffPromptGroundingPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if not pipe.prompts.needs_masks:
        raise UserError(f"{model} is a {pipe.prompts.method} model: the diagnosis reads a Diff-Prompt model's masks (method diff_prompt)")
    samples = load_refexp("synthscenes", None, "all", pipe.host.image_size, num_scenes, 1_000_000)
    metrics: dict[str, dict[str, GroundingRecall]] = defaultdict(lambda: defaultdict(GroundingRecall))
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = _as_batch(chunk)
        images, texts = batch["images"], batch["texts"]  # already at the host's size
        generated = pipe.mask_generator.prompt_masks(images, texts, pipe.prompts.depth, pipe.config.ddim_steps, generator)
        oracle = pipe.mask_generator.oracle_prompt_masks(batch["masks"], pipe.prompts.depth, pipe.config.ddim_steps, generator)
        plain = pipe.ranked_boxes(images, texts, [], [])
        rows = {"host": plain, "dit prompts": pipe.ranked_boxes(images, texts, *pipe.prompts(len(texts), generated)),
                "oracle prompts": pipe.ranked_boxes(images, texts, *pipe.prompts(len(texts), oracle))}
        for i, sample in enumerate(chunk):
            gt = batch["boxes"][i]
            for row, (boxes, scores) in rows.items():
                for split in ("all", sample.kind):
                    metrics[row][split].update(boxes[i], gt, scores[i])
            mask_box = largest_component_box(generated[0][i, 0])
            proposals = plain[0][i]
            for split in ("all", sample.kind):
                metrics["mask box"][split].update(mask_box[None] if mask_box is not None else torch.zeros(0, 4), gt)
                overlap = box_iou(proposals, mask_box[None])[:, 0] if mask_box is not None else torch.zeros(len(proposals), dtype=torch.float64)
                metrics["host proposals ranked by mask box"][split].update(proposals, gt, overlap)
    results = {}
    for row, splits in metrics.items():
        results[row] = {f"{split} {name}": value for split in ("all", "unique", "extreme", "relation") if split in splits
                        for name, value in splits[split].compute().items()}
        results[row] |= {f"{split} expressions": int(splits[split].num_samples) for split in splits}
    return results
