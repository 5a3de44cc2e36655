#!/usr/bin/env bash
# `make demo`: what the toolkit does, end to end, on the embedded tiny backbone and synthetic scenes.
# Each head adds a scripts/demo_<head>.sh; they run in name order after the shared part.
set -euo pipefail
OUT=${OUT:-outputs/demo}
ICD=".venv/bin/icd"
# Outputs are never replaced silently (icd refuses existing files): a previous demo's folder, marked
# by .icd-demo, is removed first; any other existing folder is left alone and the demo stops.
if [ -e "$OUT" ]; then
  if [ -f "$OUT/.icd-demo" ]; then rm -rf -- "$OUT"; else echo "error: $OUT exists and is not a demo folder: choose another OUT=..." >&2; exit 2; fi
fi
mkdir -p "$OUT"
touch "$OUT/.icd-demo"
echo "== synthetic scenes -> $OUT/scenes (+ grid)"
$ICD data synth --out "$OUT/scenes" --n 16 --size 128 --grid "$OUT/scenes_grid.png"
echo "== text-to-image with the embedded backbone -> $OUT/tiny_ldm.png"
$ICD infer --model assets/tiny-ldm --prompt "a large red sphere" --num-images 4 --out "$OUT/tiny_ldm.png"
echo "== the shipped model zoo (assets/): predictions and held-out figures (seeds >= 1,000,000; the model cards use 100 scenes)"
shipped() { [ -f "assets/$1/model_index.json" ] || { echo "   ($1 is not shipped in this checkout)"; return 1; }; }
for model in tiny-meta-prompts-depth tiny-meta-prompts-seg; do
  shipped "$model" || continue
  $ICD infer --model "$model" --image assets/samples --out "$OUT/shipped/$model"
  $ICD eval --model "$model" -n 20 --out "$OUT/shipped/${model}_eval"
done
if shipped tiny-prompt-diffusion; then
  echo "== tiny-prompt-diffusion: one query under the eight example pairs (six trained tasks, two unseen) -> $OUT/shipped/tiny-prompt-diffusion_eval/in_context.png"
  $ICD eval --model tiny-prompt-diffusion -n 4 --out "$OUT/shipped/tiny-prompt-diffusion_eval"
fi
if shipped tiny-diff-prompt; then  # its box, mask and trajectory: scripts/demo_diff_prompt.sh, beside the short run's on the same scene
  $ICD eval --model tiny-diff-prompt -n 20 --out "$OUT/shipped/tiny-diff-prompt_eval"
fi
echo "== short training runs of every head from the shipped backbone (these show that training works, not the best figures)"
for part in scripts/demo_*.sh; do
  [ -e "$part" ] || continue
  echo "== $part"
  OUT="$OUT" bash "$part"
done
echo "demo outputs in $OUT"
