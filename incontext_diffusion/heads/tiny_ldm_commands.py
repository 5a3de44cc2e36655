"""`icd infer` and `icd eval` for text-to-image models (the embedded backbone's own job)."""

from __future__ import annotations

from ..errors import UserError


def infer_text_to_image(options) -> None:
    from pathlib import Path

    from .tiny_ldm import text_to_image

    options.refuse_unused({"prompt", "out", "steps", "guidance", "num_images"}, "text-to-image")
    if not options.prompt:
        raise UserError("a text-to-image model needs --prompt TEXT")
    out = options.out or Path("outputs/infer.png")
    text_to_image(options.model, options.prompt, out, steps=options.steps or 25, guidance=options.guidance or 4.0, seed=options.seed, num_images=options.num_images or 1)
    print(f"wrote {out}")


def eval_text_to_image(options) -> dict:
    from .tiny_ldm import evaluate_text_to_image

    return evaluate_text_to_image(options.model, num_samples=options.num_samples, steps=options.steps or 25, seed=options.seed)


def register(app, data_app, convert_app, infer: dict, evaluate: dict) -> None:
    infer["StableDiffusionPipeline"] = infer_text_to_image
    evaluate["StableDiffusionPipeline"] = eval_text_to_image
