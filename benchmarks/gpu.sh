#!/usr/bin/env bash
# The GPU table of benchmarks/RESULTS.md in one command: the paper-size recipes on SD1.5's architecture
# with random weights (backbone random-sd15, no download) and synthetic scenes; then where the Prompt
# Diffusion training step's time goes (torch.profiler), the cost sweep up to 1024², and the targets
# of issue 18 as PASS / FAIL lines.
# Usage: benchmarks/gpu.sh [OUT_DIR]   (about 25 minutes on one H100/H200; run from the repository root
# with the package importable: `pip install -e .` or PYTHONPATH=.)
# Quick look first: QUICK=1 benchmarks/gpu.sh  (fewer iterations, the targets and the profile only)
set -uo pipefail
OUT=${1:-outputs/bench-gpu}
PY=${PYTHON:-python}
N=(); [ -n "${QUICK:-}" ] && N=(-n 3 --warmup 2)
FAST=(--set train.allow_tf32=true --set train.optimizer=adamw_fused)
NO_CKPT=(--set train.gradient_checkpointing=false)
COMPILE=(--set train.compile=true)
GRAPHS=(--set train.compile=true --set train.compile_mode=reduce-overhead)
bench() { echo "== icd bench $*"; "$PY" -m incontext_diffusion bench --size sd15 --out "$OUT" "${FAST[@]}" "${N[@]}" "$@" || echo "FAILED: $*"; }
mkdir -p "$OUT"
"$PY" -m incontext_diffusion info | tee "$OUT/info.txt"

# 1. The targets. Prompt Diffusion inference: 512², 50 DDIM steps with CFG, batch 1.
bench prompt_diffusion-infer --resolution 512 --steps 50 --dtype fp16 -n 5
bench prompt_diffusion-infer --resolution 512 --steps 50 --dtype fp16 -n 5 "${COMPILE[@]}"
bench prompt_diffusion-infer --resolution 512 --steps 50 --dtype fp16 -n 5 "${GRAPHS[@]}"   # CUDA graphs
# Meta-Prompts depth: 512², batch 8, 3 loops.
bench meta_prompts_depth-infer --resolution 512 --batch 8 --dtype fp16
bench meta_prompts_depth-infer --resolution 512 --batch 8 --dtype fp16 "${COMPILE[@]}"
bench meta_prompts_depth-infer --resolution 512 --batch 8 --dtype fp16 "${GRAPHS[@]}"
bench meta_prompts_depth-infer --resolution 512 --batch 8 --dtype bf16 "${COMPILE[@]}" --set train.channels_last=true
# Prompt Diffusion training MFU at 256² (ControlNet trained, SD frozen; bf16 autocast, fp32 master weights).
bench prompt_diffusion-train --resolution 256 --batch 32 --dtype bf16 "${NO_CKPT[@]}"
bench prompt_diffusion-train --resolution 256 --batch 32 --dtype bf16 "${NO_CKPT[@]}" "${COMPILE[@]}"
bench prompt_diffusion-train --resolution 256 --batch 64 --dtype bf16 "${NO_CKPT[@]}" "${COMPILE[@]}" --set train.channels_last=true

# 2. Where the training step's time goes (the table to read before fixing anything).
echo "== profile prompt_diffusion-train 256² batch 32 bf16"
"$PY" benchmarks/profile_step.py --case prompt_diffusion-train --size sd15 --resolution 256 --batch 32 --dtype bf16 --out "$OUT" \
  "${FAST[@]}" "${NO_CKPT[@]}" || echo "FAILED: profile"

if [ -z "${QUICK:-}" ]; then
  # 3. The rest of the table.
  bench prompt_diffusion-train --resolution 512 --batch 8 --dtype bf16 "${NO_CKPT[@]}"
  bench prompt_diffusion-train --resolution 512 --batch 2 --dtype bf16 -n 5   # the recipe's gradient checkpointing
  bench meta_prompts_depth-infer --resolution 512 --batch 16 --dtype fp16
  bench meta_prompts_depth-train --resolution 512 --batch 8 --dtype bf16 -n 5 "${NO_CKPT[@]}"
  # Diff-Prompt has no SD-size form: its tiny chain (needs runs/ of the tiny recipes)
  "$PY" -m incontext_diffusion bench diff_prompt-infer diff_prompt_dit-train --size tiny --out "$OUT" || echo "FAILED: diff_prompt tiny"

  # 4. How cost grows: size 64-1024 at batch 4, batch 1-32 at 256², bf16 autocast (out-of-memory points are noted, not fatal).
  "$PY" -m incontext_diffusion bench --sweep prompt_diffusion-train meta_prompts_depth-train --size sd15 --dtype bf16 --resolution 256 \
    -n 3 --warmup 2 "${FAST[@]}" "${NO_CKPT[@]}" --out "$OUT/sweep-sd15" || echo "FAILED: sweep sd15"
  "$PY" -m incontext_diffusion bench --sweep diff_prompt_mask_vae-train --size tiny -n 3 --warmup 2 --out "$OUT/sweep-diff-prompt" \
    || echo "FAILED: sweep diff_prompt"
fi

# 5. The targets, PASS or FAIL.
echo "== targets"
"$PY" benchmarks/check_targets.py "$OUT/bench.json" | tee "$OUT/targets.txt"
echo "results: $OUT/bench.md, $OUT/profile_*.md, $OUT/sweep-*/sweep.{md,png}, $OUT/targets.txt"
