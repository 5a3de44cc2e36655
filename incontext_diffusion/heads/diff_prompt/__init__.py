"""Diff-Prompt (ICLR 2025): mask-supervised diffusion prompts for a frozen grounding model.

Stage 1 `mask_vae.py` (Mask-VAE), stage 2 `dit.py` + `diffusion.py` (DiT prompt generator), stage 3
`prompts.py` + `hosts.py` (adaptors, prompt injection into a Swin/BERT host); `pipeline.py` for
inference, `head.py` for training, `commands.py` for the CLI. See docs/diff_prompt.md.
"""
