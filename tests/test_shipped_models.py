"""The shipped model zoo (assets/): each model loads by its short name through `icd eval` and scores one
figure on a handful of held-out scenes (seeds >= 1,000,000) well past its trivial baseline, so a broken
or swapped asset is caught. The thresholds sit between the baseline and the model-card figure."""

import json

import pytest
import torch

from cli_helpers import run_icd
from incontext_diffusion.core.model_folder import shipped_models

torch.set_num_threads(2)

# model -> (icd eval arguments, results key, threshold, "max" or "min": which side the model must be on)
CHECKS = {
    # RMSE of encode -> decode on depth maps: card 0.019, target 0.04; backbone v1 0.32.
    "tiny-ldm": (["-n", "4", "--steps", "10"], "vae_reconstruction_rmse/depth", 0.04, "max"),
    # AbsRel: card 0.022; the mean depth map scores 0.069.
    "tiny-meta-prompts-depth": (["-n", "4"], "abs_rel", 0.04, "max"),
    # mIoU: card 0.901; every pixel "floor" scores 0.111.
    "tiny-meta-prompts-seg": (["-n", "4"], "mIoU", 0.6, "min"),
    # image -> depth RMSE: card 0.0251 (20 steps); the constant mean map scores 0.068, copying the example 0.076.
    "tiny-prompt-diffusion": (["-n", "4", "--tasks", "image_to_depth", "--steps", "10"], "image_to_depth/rmse", 0.045, "max"),
    # the DiT's generated-mask IoU: card 0.83 on unique-attribute expressions; the recipe's first run 0.08.
    "tiny-diff-prompt": (["-n", "4", "--tasks", "unique", "--steps", "10"], "unique mask IoU", 0.6, "min"),
}


@pytest.mark.parametrize("model", sorted(CHECKS))
def test_the_shipped_model_scores_past_its_baseline(model, monkeypatch, capsys, tmp_path):
    if model not in shipped_models():
        pytest.fail(f"assets/{model} is missing: the zoo ships it (see its recipe in the README's table)")
    arguments, key, threshold, side = CHECKS[model]
    code, _, err = run_icd(monkeypatch, capsys, "eval", "--model", model, *arguments, "--out", tmp_path / "eval")
    assert code == 0, err
    value = json.loads((tmp_path / "eval" / "results.json").read_text())[key]
    assert value <= threshold if side == "max" else value >= threshold, f"{model}: {key} = {value}"
