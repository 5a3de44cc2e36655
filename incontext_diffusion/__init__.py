"""incontext_diffusion (`icd`): Prompt Diffusion, Meta-Prompts and Diff-Prompt on one latent-diffusion core.

    from incontext_diffusion import load_pipeline, PromptDiffusionPipeline
    pipe = load_pipeline("runs/prompt_diffusion-tiny/model")  # any exported folder or shipped model name

The names below are imported on first use (module `__getattr__`), so `import incontext_diffusion`
stays fast and imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "load_pipeline": "incontext_diffusion.core.model_folder",
    "read_model_folder": "incontext_diffusion.core.model_folder",
    "PromptDiffusionPipeline": "incontext_diffusion.heads.prompt_diffusion.pipeline",
    "MetaPromptsDepthPipeline": "incontext_diffusion.heads.meta_prompts.pipeline",
    "MetaPromptsSegmentationPipeline": "incontext_diffusion.heads.meta_prompts.pipeline",
    "DiffPromptMaskPipeline": "incontext_diffusion.heads.diff_prompt.pipeline",
    "DiffPromptGroundingPipeline": "incontext_diffusion.heads.diff_prompt.pipeline",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'incontext_diffusion' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
