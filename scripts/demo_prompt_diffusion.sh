#!/usr/bin/env bash
# Prompt Diffusion demo: train prompt_diffusion-tiny briefly on synthetic scene families, then apply
# an unseen task (canny -> image) and a trained one (image -> depth) to held-out scenes with --grid
# (steps and guidance: the model's exported defaults). The in-context evaluation runs on the shipped
# assets/tiny-prompt-diffusion (scripts/demo.sh); a run this short shows that training works.
set -euo pipefail
OUT=${OUT:-outputs/demo}
ICD=".venv/bin/icd"
STEPS=${PD_DEMO_STEPS:-100}
RUN="$OUT/prompt_diffusion/run"
mkdir -p "$OUT/prompt_diffusion"
rm -rf "$RUN"
echo "== training prompt_diffusion-tiny for $STEPS steps -> $RUN"
$ICD train --recipe prompt_diffusion-tiny --set train.max_steps="$STEPS" --set output_dir="$RUN" --set data.num_samples=800 \
  --set train.validate_every="$STEPS" --set train.checkpoint_every="$STEPS"
echo "== held-out example pairs (scene seeds >= 1_000_000)"
.venv/bin/python - "$OUT/prompt_diffusion" <<'PY'
import sys
from pathlib import Path
from PIL import Image
from incontext_diffusion.heads.prompt_diffusion.data import HELD_OUT_SEED, synthetic_triplet
from incontext_diffusion.recipes import load_recipe, load_task

out = Path(sys.argv[1])
texts = load_recipe("prompt_diffusion-tiny").model.get("task_texts", {})  # the tiny backbone's forward-task texts
for task in ("canny_to_image", "image_to_depth"):
    card = load_task(task)
    card = card.model_copy(update={"text": texts[task]}) if task in texts else card
    triplet = synthetic_triplet(HELD_OUT_SEED + 7, card, 64, change="layout")
    for key in ("example_source", "example_target", "query", "target"):
        Image.fromarray(triplet[key]).save(out / f"{task}_{key}.png")
    (out / f"{task}_caption.txt").write_text(triplet["caption"])
PY
for task in canny_to_image image_to_depth; do
  D="$OUT/prompt_diffusion"
  $ICD infer --model "$RUN/model" --example "$D/${task}_example_source.png" "$D/${task}_example_target.png" \
    --query "$D/${task}_query.png" --prompt "$(cat "$D/${task}_caption.txt")" --seed 0 \
    --out "$D/${task}.png" --grid
done
echo "Prompt Diffusion pictures (the short run): $OUT/prompt_diffusion/canny_to_image_grid.png, image_to_depth_grid.png"
