#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md: SD1.5-size modules with random weights (no download).
# Usage: benchmarks/gpu.sh [OUT_DIR]   (about 10 minutes on one H100; `icd` must be installed)
set -uo pipefail
OUT=${1:-outputs/bench-gpu}
FAST=(--set train.allow_tf32=true --set train.optimizer=adamw_fused)
bench() { echo "== icd bench $*"; python -m incontext_diffusion bench --size sd15 --out "$OUT" "${FAST[@]}" "$@" || echo "FAILED: $*"; }

# Prompt Diffusion training (ControlNet trained, SD frozen; bf16 autocast, fp32 master weights)
bench prompt_diffusion-train --resolution 256 --batch 32 --dtype bf16
bench prompt_diffusion-train --resolution 512 --batch 8 --dtype bf16
# A 512² configuration for a 24 GB card: small batch and gradient checkpointing
bench prompt_diffusion-train --resolution 512 --batch 2 --dtype bf16 --set train.gradient_checkpointing=true -n 5
# Inference: Prompt Diffusion 512², 50 DDIM steps with CFG, batch 1; Meta-Prompts depth 512², 3 loops, batch 8
bench prompt_diffusion-infer --resolution 512 --steps 50 --dtype fp16 -n 5
bench meta_prompts_depth-infer --resolution 512 --batch 8 --dtype fp16
bench meta_prompts_depth-train --resolution 512 --batch 8 --dtype bf16 -n 5
# Diff-Prompt has no SD-size form: its tiny chain (needs runs/ of the tiny recipes)
python -m incontext_diffusion bench diff_prompt-infer diff_prompt_dit-train --size tiny --out "$OUT" || echo "FAILED: diff_prompt tiny"
# torch.compile (in place, default mode): Prompt Diffusion inference and Meta-Prompts depth inference
bench prompt_diffusion-infer --resolution 512 --steps 50 --dtype fp16 -n 5 --set train.compile=true
bench meta_prompts_depth-infer --resolution 512 --batch 8 --dtype fp16 --set train.compile=true
