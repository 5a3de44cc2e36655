"""`icd infer` and `icd eval` for text-to-image models (the embedded backbone's own job).

Nothing heavy is imported at module level: `icd --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError

PIPELINE = "StableDiffusionPipeline"

def infer_text_to_image(options) -> None:
    from .head import inference_defaults, text_to_image

    options.refuse_unused({"prompt", "out", "steps", "guidance", "num_images"}, "text-to-image")
    if not options.prompt:
        raise UserError("a text-to-image model needs --prompt TEXT")
    defaults = inference_defaults(options.model)
    out = options.out or Path("outputs/infer.png")
    text_to_image(options.model, options.prompt, out, steps=options.steps or defaults["num_inference_steps"],
                  guidance=options.guidance or defaults["guidance_scale"], seed=options.seed, num_images=options.num_images or 1,
                  overwrite=options.overwrite)
    print(f"wrote {out}")


def eval_text_to_image(options) -> dict:
    from .head import evaluate_text_to_image, inference_defaults

    options.refuse_unused({"num_samples", "steps", "guidance", "batch_size"}, "text-to-image")
    defaults = inference_defaults(options.model)
    return evaluate_text_to_image(options.model, num_samples=options.num_samples, steps=options.steps or defaults["num_inference_steps"],
                                  guidance=options.guidance or defaults["guidance_scale"], seed=options.seed, batch_size=options.batch_size)


def register(app, data_app, convert_app, infer: dict, evaluate: dict) -> None:
    infer[PIPELINE] = infer_text_to_image
    evaluate[PIPELINE] = eval_text_to_image
