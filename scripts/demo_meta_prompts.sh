#!/usr/bin/env bash
# MetaPrompts part of `make demo`: short depth and segmentation trainings on synthetic scenes from
# the embedded tiny backbone, then predictions on a held-out synthetic scene and on a CC0 photo, and
# an evaluation on 20 held-out scenes. The figures in docs/meta_prompts.md come from the full tiny
# recipes (same commands without the max_steps override).
set -euo pipefail
OUT=${OUT:-outputs/demo}
ICD=${ICD:-.venv/bin/icd}
STEPS=${META_PROMPTS_DEMO_STEPS:-40}
mkdir -p "$OUT"
scene="$OUT/meta_prompts_scene"
rm -rf "$scene"
$ICD data synth --out "$scene" --n 1 --seed 1000000 --size 64
for task in depth seg; do
  run="$OUT/meta_prompts_$task"
  rm -rf "$run" "$OUT/meta_prompts_${task}_pred" "$OUT/meta_prompts_${task}_eval"
  echo "== MetaPrompts $task: $STEPS training steps on synthetic scenes"
  $ICD train --recipe "meta_prompts_${task}-tiny" --set output_dir="$run" --set train.max_steps="$STEPS" \
    --set train.validate_every="$STEPS" --set train.checkpoint_every="$STEPS"
  cp "$(ls "$run"/samples/step-*.png | tail -1)" "$OUT/meta_prompts_${task}_heldout.png"
  echo "== MetaPrompts $task: predictions -> $OUT/meta_prompts_${task}_pred"
  $ICD infer --model "$run/model" --image "$scene/00000.png" --image assets/samples/coffee_cc0.png --out "$OUT/meta_prompts_${task}_pred"
  echo "== MetaPrompts $task: evaluation on 20 held-out scenes"
  $ICD eval --model "$run/model" --num-samples 20 --out "$OUT/meta_prompts_${task}_eval"
done
