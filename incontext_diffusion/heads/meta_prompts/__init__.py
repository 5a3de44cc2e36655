"""MetaPrompts: depth and semantic segmentation from a diffusion UNet with meta prompts (arXiv 2312.14733).

Nothing is imported here, so `icd --help` stays fast: `from incontext_diffusion import
MetaPromptsDepthPipeline` (or `...heads.meta_prompts.pipeline`) loads the pipelines.
"""
