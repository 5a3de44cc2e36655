#!/usr/bin/env bash
# Diff-Prompt demo: a short run of each of the three stages chained on synthetic referring expressions
# (a few minutes on 2 cores; weaker figures than the shipped assets/tiny-diff-prompt), then infer and eval.
# DIFF_PROMPT_RUNS=runs reuses models trained ahead with the full tiny recipes (see docs/diff_prompt.md).
set -euo pipefail
OUT=${OUT:-outputs/demo}/diff_prompt
ICD=${ICD:-.venv/bin/icd}
RUNS=${DIFF_PROMPT_RUNS:-$OUT/runs}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

train_if_missing() {  # recipe, output dir, extra --set overrides for the short version
  local recipe=$1 dir=$2; shift 2
  if [ -f "$dir/model/model_index.json" ]; then
    echo "== $recipe: using $dir/model"
  else
    echo "== $recipe: short training into $dir"
    local sets=(--set "output_dir=$dir")
    for s in "$@"; do sets+=(--set "$s"); done
    SECONDS=0
    "$ICD" train --recipe "$recipe" "${sets[@]}"
    echo "$recipe trained in ${SECONDS}s" | tee -a "$OUT/times.txt"
  fi
}

SHORT="data.num_samples=300"
train_if_missing diff_prompt_mask_vae-tiny "$RUNS/diff_prompt_mask_vae-tiny" $SHORT train.max_steps=100
train_if_missing diff_prompt_dit-tiny "$RUNS/diff_prompt_dit-tiny" $SHORT train.max_steps=150 \
  "model.mask_vae=$RUNS/diff_prompt_mask_vae-tiny/model"
train_if_missing grounding_host-tiny "$RUNS/grounding_host-tiny" $SHORT train.max_steps=150
train_if_missing diff_prompt_grounding-tiny "$RUNS/diff_prompt_grounding-tiny" $SHORT train.max_steps=40 \
  "model.host=$RUNS/grounding_host-tiny/model" "model.prompt_generator=$RUNS/diff_prompt_dit-tiny/model"
train_if_missing diff_prompt_grounding-tiny "$RUNS/vpt_deep-tiny" $SHORT train.max_steps=40 model.method=vpt_deep \
  "model.host=$RUNS/grounding_host-tiny/model"

echo "== a held-out scene and one of its referring expressions"
rm -rf "$OUT/scene"
"$ICD" data synth --out "$OUT/scene" --n 1 --size 32 --seed 1000007 --min-objects 2 --max-objects 3
IMAGE="$OUT/scene/$(.venv/bin/python -c "import json; print(json.loads(open('$OUT/scene/metadata.jsonl').readline())['file_name'])")"
TEXT=$(.venv/bin/python -c "import json; print(json.loads(open('$OUT/scene/metadata.jsonl').readline())['referring'][0]['text'])")
echo "image $IMAGE, text \"$TEXT\""
"$ICD" infer --model "$RUNS/diff_prompt_grounding-tiny/model" --image "$IMAGE" --text "$TEXT" --out "$OUT/grounding.png" --grid
if [ -f assets/tiny-diff-prompt/model_index.json ]; then
  echo "== the same scene and expression with the shipped tiny-diff-prompt -> $OUT/grounding_shipped.png (box), _mask.png, _trajectory.png"
  "$ICD" infer --model tiny-diff-prompt --image "$IMAGE" --text "$TEXT" --out "$OUT/grounding_shipped.png" --grid
fi

N=${EVAL_SCENES:-10}
echo "== evaluation on $N held-out synthetic scenes (seeds >= 1,000,000; docs/diff_prompt.md uses 100)"
"$ICD" eval --model "$RUNS/diff_prompt_mask_vae-tiny/model" --num-samples "$N" --tasks all --out "$OUT/eval_mask_vae"
"$ICD" eval --model "$RUNS/diff_prompt_dit-tiny/model" --num-samples "$N" --tasks all --out "$OUT/eval_dit"
for model in grounding_host-tiny vpt_deep-tiny diff_prompt_grounding-tiny; do
  "$ICD" eval --model "$RUNS/$model/model" --num-samples "$N" --out "$OUT/eval_$model"
done
echo "== where the gain is lost: the DiT's prompts, oracle prompts and the DiT's mask as a box (docs/diff_prompt.md)"
"$ICD" diff-prompt-diagnose --model "$RUNS/diff_prompt_grounding-tiny/model" --num-samples "$N" --out "$OUT/diagnosis.json"
echo "Diff-Prompt demo outputs in $OUT"
