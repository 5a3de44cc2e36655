"""`icd bench`: FLOP counting, the SD1.5-size stand-in, the results table, a real case on the CPU."""

import json
import subprocess
import sys

import pytest
import torch

from incontext_diffusion.bench import count_flops, run_case
from incontext_diffusion.core.components import TINY_LDM
from incontext_diffusion.core.tiny import random_sd15_components

ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def test_flops_of_a_linear_layer_are_two_per_multiply_add():
    layer = torch.nn.Linear(32, 16, bias=False)
    assert count_flops(lambda: layer(torch.randn(5, 32))) == 2 * 5 * 32 * 16


def test_random_sd15_has_sd15s_parameter_counts():
    with torch.device("meta"):  # the architecture without allocating 4 GB
        components = random_sd15_components(TINY_LDM / "tokenizer")
    counts = {name: sum(p.numel() for p in getattr(components, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert components.tokenizer.model_max_length == 77
    assert components.unet.config.cross_attention_dim == components.text_encoder.config.hidden_size == 768


def test_a_training_case_runs_and_reports_its_flops():
    record = run_case("meta_prompts_depth-train", batch=2, iterations=1, warmup=0)
    assert record.size == 64 and record.batch == 2 and record.device.startswith("CPU")
    assert record.gflop_per_sample > 0.1  # a UNet pass over a 64x64 image and the decoder
    assert record.samples_per_s == pytest.approx(2 / record.seconds_per_iter)
    assert record.mfu is None  # no known peak for a CPU unless --peak-tflops is given


def test_cli_writes_json_and_markdown_and_rejects_unknown_cases(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "incontext_diffusion", "bench", "meta_prompts_depth-infer", "--batch", "1", "-n", "1", "--warmup", "0",
                         "--device", "cpu", "--peak-tflops", "1", "--out", str(tmp_path)], env=ENV, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["case"] for r in rows] == ["meta_prompts_depth-infer"] and rows[0]["mfu"] > 0
    assert "| meta_prompts_depth-infer |" in (tmp_path / "bench.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "incontext_diffusion", "bench", "nonsense", "--out", str(tmp_path)], env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown benchmark case 'nonsense'" in bad.stderr and "Traceback" not in bad.stderr
