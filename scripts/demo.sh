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
echo "== the shipped model zoo (assets/): predictions on the sample photo and 20 held-out scenes' figures"
for model in tiny-meta-prompts-depth tiny-meta-prompts-seg; do
  [ -f "assets/$model/model_index.json" ] || { echo "   ($model is not shipped in this checkout)"; continue; }
  $ICD infer --model "$model" --image assets/samples --out "$OUT/shipped/$model"
  $ICD eval --model "$model" -n 20 --out "$OUT/shipped/${model}_eval"
done
echo "== short training runs of every head from the shipped backbone (these show that training works, not the best figures)"
for part in scripts/demo_*.sh; do
  [ -e "$part" ] || continue
  echo "== $part"
  OUT="$OUT" bash "$part"
done
echo "demo outputs in $OUT"
