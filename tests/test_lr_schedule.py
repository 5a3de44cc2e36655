"""A head's own learning-rate schedule (`Head.lr_lambda`) drives the trainer; Meta-Prompts' official depth schedule."""

import json

import pytest
from accelerate.state import AcceleratorState, GradientState

from incontext_diffusion.core.head import load_head
from incontext_diffusion.core.trainer import train
from incontext_diffusion.recipes import load_recipe
from test_trainer import LinearHead, linear_recipe


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class HalvingHead(LinearHead):
    def lr_lambda(self, max_steps):
        return lambda step: 0.5**step


def test_the_heads_schedule_replaces_the_recipes(tmp_path):
    recipe = linear_recipe(tmp_path, learning_rate=0.1, lr_scheduler="linear", lr_warmup_steps=3)
    train(HalvingHead(recipe))
    logged = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([0.1 * 0.5**step for step in range(1, 7)])  # after each of the 6 steps


def test_official_depth_schedule_rises_to_the_peak_at_half_and_falls_back():
    head = load_head(load_recipe("meta_prompts_nyu"))
    factor = head.lr_lambda(1000)
    low = 3e-5 / 5e-4
    assert factor(0) == pytest.approx(low)
    assert factor(250) == pytest.approx(low + (1 - low) * 0.5**0.9)  # (s/half)^0.9 on the way up
    assert factor(500) == pytest.approx(1.0)
    assert factor(750) == pytest.approx(1 - (1 - low) * 0.5**0.9)
    assert factor(1000) == pytest.approx(low) and factor(1200) == pytest.approx(low)  # floor at min_lr
    assert load_head(load_recipe("meta_prompts_depth-tiny")).lr_lambda(1000) is None  # the tiny recipe keeps its own
