"""`icd bench --sweep`: cost against image size and batch, measured per point, beside the FLOP count."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from incontext_diffusion.bench import sweep, sweep_table, write_sweep

CASE = "diff_prompt_mask_vae-train"  # the smallest convolutional case: seconds per point


@pytest.fixture(scope="module")
def points():
    return sweep([CASE], "cpu", sizes=(32, 64), batches=(1, 2), size_series_batch=2, iterations=1, warmup=0)


def test_each_point_is_measured_with_its_flops_and_its_own_memory(points):
    assert [(p.series, p.size, p.batch) for p in points] == [("size", 32, 2), ("size", 64, 2), ("batch", 32, 1), ("batch", 32, 2)]
    assert all(p.seconds_per_step > 0 and p.peak_memory_gib > 0 and p.note == "" for p in points)
    by_key = {(p.series, p.size, p.batch): p for p in points}
    # A convolutional VAE's FLOPs grow with the pixels and with the batch, exactly.
    assert by_key["size", 64, 2].gflop_per_step == pytest.approx(4 * by_key["size", 32, 2].gflop_per_step, rel=1e-3)
    assert by_key["batch", 32, 2].gflop_per_step == pytest.approx(2 * by_key["batch", 32, 1].gflop_per_step, rel=1e-3)
    # The same point measured twice (once per series) counts the same FLOPs.
    assert by_key["batch", 32, 2].gflop_per_step == pytest.approx(by_key["size", 32, 2].gflop_per_step)


def test_the_table_and_the_plot(points, tmp_path):
    table = sweep_table(points)
    rows = [line for line in table.splitlines() if line.startswith(f"| {CASE} |")]
    assert len(rows) == 4
    size_row = next(r for r in rows if "| size | 64 | 2 |" in r).split("|")
    assert float(size_row[8]) == pytest.approx(4.0, abs=0.01)  # FLOP growth column
    json_path, md_path, png_path = write_sweep(points, tmp_path)
    assert md_path.read_text() == table and json_path.is_file()
    with Image.open(png_path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert image.size[0] >= 800 and len(np.unique(pixels, axis=0)) > 3  # axes, lines and text drawn


def test_points_over_the_budget_and_after_a_failure_are_skipped_with_the_reason():
    skipped = sweep([CASE], "cpu", sizes=(32, 64), batches=(1,), size_series_batch=1, iterations=1, warmup=0, budget_s=1e-6)
    assert skipped[0].seconds_per_step is not None
    assert skipped[1].seconds_per_step is None and skipped[1].note.startswith("skipped: about")
    failed = sweep([CASE], "cpu", sizes=(32, 64), batches=(1,), iterations=1, warmup=0, overrides=("model.nonsense=1",))
    assert failed[0].note.startswith("failed: unknown key 'model.nonsense'")
    assert failed[1].seconds_per_step is None
    assert failed[1].note.startswith("skipped after failed: unknown key") and failed[1].note.endswith("at 32px, batch 4")


def load_check_targets():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "check_targets.py"
    spec = importlib.util.spec_from_file_location("check_targets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_targets_take_the_best_matching_row():
    def row(case, size, batch, steps, seconds, mfu=None, fast="-"):
        return {"case": case, "size": size, "batch": batch, "steps": steps, "seconds_per_iter": seconds, "samples_per_s": batch / seconds,
                "mfu": mfu, "device": "H200", "dtype": "fp16", "fast_paths": fast}

    rows = [row("prompt_diffusion-infer", 512, 1, 50, 2.9), row("prompt_diffusion-infer", 512, 1, 50, 0.45, fast="compile (reduce-overhead)"),
            row("prompt_diffusion-infer", 256, 1, 50, 0.1),  # another size: not the target's row
            row("meta_prompts_depth-infer", 512, 8, 0, 8 / 120), row("prompt_diffusion-train", 256, 32, 0, 0.2, mfu=0.155)]
    lines = load_check_targets().check(rows)
    assert lines[0].startswith("PASS") and "0.45 s/image" in lines[0] and "reduce-overhead" in lines[0]
    assert lines[1].startswith("FAIL") and "120 images/s" in lines[1]  # 130 wanted
    assert lines[2].startswith("FAIL") and "15.5 % MFU" in lines[2]
    assert load_check_targets().check(rows[:1])[1].startswith("MISSING")
