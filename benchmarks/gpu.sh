#!/usr/bin/env bash
# The GPU table of benchmarks/RESULTS.md: the paper-size recipes on SD1.5's architecture with random
# weights (backbone random-sd15, no download) and synthetic scenes.
# Usage: benchmarks/gpu.sh [OUT_DIR]   (about 15 minutes on one H100; `icd` must be installed)
set -uo pipefail
OUT=${1:-outputs/bench-gpu}
FAST=(--set train.allow_tf32=true --set train.optimizer=adamw_fused)
bench() { echo "== icd bench $*"; python -m incontext_diffusion bench --size sd15 --out "$OUT" "${FAST[@]}" "$@" || echo "FAILED: $*"; }
NO_CKPT=(--set train.gradient_checkpointing=false)

# Prompt Diffusion training (ControlNet trained, SD frozen; bf16 autocast, fp32 master weights)
bench prompt_diffusion-train --resolution 256 --batch 32 --dtype bf16 "${NO_CKPT[@]}"
bench prompt_diffusion-train --resolution 512 --batch 8 --dtype bf16 "${NO_CKPT[@]}"
bench prompt_diffusion-train --resolution 512 --batch 2 --dtype bf16 -n 5   # the recipe's gradient checkpointing
bench prompt_diffusion-train --resolution 256 --batch 32 --dtype bf16 "${NO_CKPT[@]}" --set train.compile=true
# Inference: Prompt Diffusion 512², 50 DDIM steps with CFG, batch 1; Meta-Prompts depth 512², 3 loops
bench prompt_diffusion-infer --resolution 512 --steps 50 --dtype fp16 -n 5
bench prompt_diffusion-infer --resolution 512 --steps 50 --dtype fp16 -n 5 --set train.compile=true
bench meta_prompts_depth-infer --resolution 512 --batch 8 --dtype fp16
bench meta_prompts_depth-infer --resolution 512 --batch 16 --dtype fp16
bench meta_prompts_depth-infer --resolution 512 --batch 8 --dtype fp16 --set train.compile=true
bench meta_prompts_depth-train --resolution 512 --batch 8 --dtype bf16 -n 5 "${NO_CKPT[@]}"
# Diff-Prompt has no SD-size form: its tiny chain (needs runs/ of the tiny recipes)
python -m incontext_diffusion bench diff_prompt-infer diff_prompt_dit-train --size tiny --out "$OUT" || echo "FAILED: diff_prompt tiny"
