"""incontext_diffusion (`icd`): Prompt Diffusion, Meta-Prompts and Diff-Prompt on one latent-diffusion core."""

__version__ = "0.1.0"
