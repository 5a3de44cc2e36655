"""The shared trainer: resume after SIGKILL, atomic checkpoints, NaN guard, 2 processes, export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from incontext_diffusion.core import checkpoints
from incontext_diffusion.core.head import Head
from incontext_diffusion.core.trainer import train
from incontext_diffusion.errors import UserError
from incontext_diffusion.recipes import Recipe

from cli_helpers import free_port, kill_at_first_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
MICRO = ["--recipe", "tiny_ldm-micro", "--set", "train.max_steps=8", "--set", "train.checkpoint_every=2"]


def icd(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "incontext_diffusion", *args], env=ENV, capture_output=True, text=True, **kwargs)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*/*.safetensors"))
    assert files, f"no weights under {model_dir}"
    return {f"{f.parent.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_resume_after_sigkill_gives_identical_weights(tmp_path):
    straight = icd("train", *MICRO, "--set", f"output_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr

    # The micro run shows the bookkeeping a user looks at: progress, TensorBoard, metrics, samples.
    run = tmp_path / "straight"
    assert "tiny_ldm-micro" in straight.stdout and "8/8" in straight.stdout
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-000003.png", "step-000006.png", "step-000008.png"]

    killed_dir = tmp_path / "killed"
    kill_at_first_checkpoint(["train", *MICRO, "--set", f"output_dir={killed_dir}"], killed_dir, ENV, timeout=120)
    assert not (killed_dir / "model").exists(), "the run finished before it could be killed"
    kept = checkpoints.list_checkpoints(killed_dir)
    assert kept and int(kept[-1].name.split("-")[1]) < 8

    resumed = icd("train", *MICRO, "--set", f"output_dir={killed_dir}", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    expected, actual = weights(run / "model"), weights(killed_dir / "model")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key

    # The export is a plain diffusers model.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(killed_dir / "model"), local_files_only=True)
    assert pipe.unet.config.sample_size == 16
    assert (killed_dir / "model" / "recipe.yaml").is_file() and (killed_dir / "model" / "README.md").is_file()


def test_starting_over_an_existing_run_needs_resume(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    result = icd("train", *MICRO, "--set", f"output_dir={run}")
    assert result.returncode == 2
    assert "already holds checkpoints: pass --resume latest" in result.stderr


class LinearModel(torch.nn.Module):
    """y = w.x, with a loss that is NaN on the forward calls listed in `nan_calls` (1-based)."""

    def __init__(self, nan_calls: set[int]):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.nan_calls, self.calls = nan_calls, 0

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        self.calls += 1
        loss = self.linear(x).pow(2).mean()
        return loss * float("nan") if self.calls in self.nan_calls else loss


class LinearHead(Head):
    def __init__(self, recipe: Recipe, nan_calls: set[int] = frozenset()):
        super().__init__(recipe)
        self.nan_calls = nan_calls

    def build(self) -> None:
        self.model = LinearModel(self.nan_calls)

    def trainable(self) -> torch.nn.Module:
        return self.model

    def train_dataset(self):
        return torch.utils.data.TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))

    def collate(self, samples):
        return torch.stack([s[0] for s in samples])

    def loss(self, model, batch, step):
        return model(batch, step)

    def export(self, model, out_dir: Path) -> None:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(out_dir / "model.safetensors"))


def linear_recipe(tmp_path: Path, **train) -> Recipe:
    settings = {"max_steps": 6, "batch_size": 8, "checkpoint_every": 2, "validate_every": 100, "log_every": 1, **train}
    return Recipe(name="linear", description="test", head="linear", output_dir=str(tmp_path / "run"), train=settings)


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    recipe = linear_recipe(tmp_path)
    with pytest.raises(UserError, match=r"became nan at step 3: last good checkpoint: .*checkpoint-2 \(intact\)"):
        train(LinearHead(recipe, nan_calls={3}))
    (last,) = checkpoints.list_checkpoints(tmp_path / "run")
    assert last.name == "checkpoint-2"
    state = load_file(str(last / "model.safetensors"))
    assert torch.isfinite(state["linear.weight"]).all()


def test_nan_loss_can_skip_the_batch(tmp_path):
    recipe = linear_recipe(tmp_path, on_nan="skip")
    out = train(LinearHead(recipe, nan_calls={3}))
    weight = load_file(str(out / "model.safetensors"))["linear.weight"]
    assert torch.isfinite(weight).all()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["skipped_batches"] == 1


def test_skipping_stops_when_every_batch_is_nan(tmp_path):
    recipe = linear_recipe(tmp_path, on_nan="skip")
    with pytest.raises(UserError, match="10 non-finite losses in a row at step 3"):
        train(LinearHead(recipe, nan_calls=set(range(3, 100))))


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    run = tmp_path / "run"
    checkpoints.save_checkpoint(accelerator, run, 2, {"step": 2, "batches_seen": 2, "epoch": 0})
    saved = model.weight.detach().clone()

    def broken_save(output_dir, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt  # the kill arrives part-way through the save

    monkeypatch.setattr(accelerator, "save_state", broken_save)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(accelerator, run, 4, {"step": 4, "batches_seen": 4, "epoch": 0})
    monkeypatch.undo()

    assert [p.name for p in checkpoints.list_checkpoints(run)] == ["checkpoint-2"]
    latest = checkpoints.resolve_resume(run, "latest")
    state = checkpoints.load_checkpoint(accelerator, latest)
    assert state["step"] == 2
    assert torch.equal(model.weight.detach(), saved)


def test_resume_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in"):
        checkpoints.resolve_resume(tmp_path, "latest")
    with pytest.raises(UserError, match="not a complete checkpoint folder"):
        checkpoints.resolve_resume(tmp_path, str(tmp_path))


def test_two_process_cpu_launch(tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),  # not 29500: it may be taken
         "-m", "incontext_diffusion", "train", "--recipe", "tiny_ldm-micro", "--set", "train.max_steps=4", "--set", f"output_dir={out}"],
        env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=300,
    )
    assert result.stdout.count("model written to") == 1, result.stderr[-3000:]  # rank 0 speaks for the run
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Each step consumed one batch per process.
    assert records[-1]["step"] == 4 and records[-1]["samples_per_s"] > 0
    assert {p.name for p in (out / "checkpoints" / "checkpoint-4").glob("rng_state_*.safetensors")} == {
        "rng_state_0.safetensors", "rng_state_1.safetensors"}
    assert weights(out / "model")


def test_ema_is_exported_checkpointed_and_resumed(tmp_path):
    straight = train(LinearHead(linear_recipe(tmp_path / "a", ema=True, ema_decay=0.5)))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(LinearHead(linear_recipe(tmp_path / "b", ema=True, ema_decay=0.5, max_steps=4)))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = train(LinearHead(linear_recipe(tmp_path / "b", ema=True, ema_decay=0.5)), resume="latest")

    exported = load_file(str(straight / "model.safetensors"))
    last = checkpoints.list_checkpoints(tmp_path / "a" / "run")[-1]
    raw = load_file(str(last / "model.safetensors"))
    shadow = load_file(str(last / "ema.safetensors"))
    # The export holds the EMA weights, not the raw ones.
    assert not torch.equal(exported["linear.weight"], raw["linear.weight"])
    assert torch.equal(exported["linear.weight"], shadow["shadow.0"])
    # A run resumed at step 4 restores the EMA too, and ends where the straight run ends.
    again = load_file(str(resumed / "model.safetensors"))
    for key in exported:
        assert torch.equal(exported[key], again[key]), key
