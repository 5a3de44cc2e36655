"""`icd data shard` and `data.shards`: Parquet shards streamed per process, shuffled, resumed exactly."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from incontext_diffusion.core.head import Head
from incontext_diffusion.core.shards import ShardStream, flatten, rebuild, write_shards
from incontext_diffusion.errors import UserError
from incontext_diffusion.recipes import Recipe

from cli_helpers import kill_at_first_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
SAMPLES = 30


class IdHead(Head):
    """Samples that name themselves: an id, a vector, a text and a tuple (to check the round trip)."""

    def build(self) -> None:
        self.model = torch.nn.Linear(2, 1)

    def trainable(self) -> torch.nn.Module:
        return self.model

    def train_dataset(self):
        return [{"id": torch.tensor(i), "x": torch.full((2, 3), float(i)), "name": f"scene {i}", "pair": (i, i / 2)} for i in range(SAMPLES)]

    def collate(self, samples):
        return samples


def id_recipe(shards: str | None = None, **train) -> Recipe:
    return Recipe(name="ids", description="test", head="ids", backbone=None, data={"shards": shards}, train={"batch_size": 4, **train})


@pytest.fixture
def memory_shards():
    url = f"memory://shards-{time.monotonic_ns()}"
    assert write_shards(IdHead(id_recipe()), url, samples_per_shard=7) == SAMPLES
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def ids(batches) -> list[int]:
    return [int(sample["id"]) for batch in batches for sample in batch]


def test_a_sample_comes_back_as_it_went_in():
    sample = {"image": torch.rand(3, 4, 5), "maps": torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8), "text": "a red cube",
              "extra": (3, 0.25, True, np.arange(4, dtype=np.int16))}
    columns, layout = flatten(sample)
    assert sorted(columns) == ["extra.0", "extra.1", "extra.2", "extra.3", "image", "maps", "text"]
    block = {key: np.stack([value]) if isinstance(value, np.ndarray) else np.array([value]) for key, value in columns.items()}
    again = rebuild(layout, block, 0)
    assert torch.equal(again["image"], sample["image"]) and again["maps"].dtype == torch.uint8 and torch.equal(again["maps"], sample["maps"])
    assert again["text"] == "a red cube" and again["extra"][:3] == (3, 0.25, True) and type(again["extra"][0]) is int
    assert np.array_equal(again["extra"][3], sample["extra"][3])


def test_the_writer_mixes_the_set_and_writes_the_index_last(memory_shards):
    fs = fsspec.filesystem("memory")
    root = memory_shards.removeprefix("memory://")
    index = json.loads(fs.cat(f"{root}/shards.json"))
    assert [s["samples"] for s in index["shards"]] == [7, 7, 7, 7, 2] and index["samples"] == SAMPLES
    stream = ShardStream(memory_shards, IdHead(id_recipe(memory_shards)), 0, 1, torch.device("cpu"))
    first_epoch = ids(stream)
    assert len(first_epoch) == 28 and len(set(first_epoch)) == 28  # 30 samples in batches of 4: the last 2 dropped
    assert set(first_epoch) <= set(range(SAMPLES))
    assert first_epoch != sorted(first_epoch)  # shuffled
    stream.set_epoch(1)
    assert ids(stream) != first_epoch  # another order each epoch
    assert ids(stream) == []  # the epoch is drawn: the next one starts with set_epoch
    stream.set_epoch(2)
    batch = next(iter(stream))
    assert batch[0]["name"] == f"scene {int(batch[0]['id'])}" and batch[0]["x"].shape == (2, 3) and batch[0]["pair"][1] == int(batch[0]["id"]) / 2


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_see_disjoint_samples_that_cover_the_set(memory_shards, world_size):
    # 5 shards do not divide by 2 or 3: every process keeps every world_size-th sample of the stream.
    seen = [ids(ShardStream(memory_shards, IdHead(id_recipe(memory_shards, batch_size=2)), rank, world_size, torch.device("cpu")))
            for rank in range(world_size)]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not set(seen[a]) & set(seen[b])
    # 30 samples: 15 per process in batches of 2 (one dropped) for 2 processes, 10 each for 3 (none dropped).
    assert [len(s) for s in seen] == ([14, 14] if world_size == 2 else [10, 10, 10])
    assert set().union(*map(set, seen)) <= set(range(SAMPLES))


def test_whole_shards_per_process_when_their_count_divides(tmp_path):
    url = f"file://{tmp_path}/set"
    write_shards(IdHead(id_recipe()), url, samples_per_shard=5)  # 6 shards for 2 processes
    seen = [ids(ShardStream(url, IdHead(id_recipe(url, batch_size=5)), rank, 2, torch.device("cpu"))) for rank in range(2)]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(SAMPLES))


def draw(stream: ShardStream, count: int, seen: list[int]) -> None:
    """Draw batches, epoch after epoch, until `seen` holds `count` ids."""
    while len(seen) < count:
        for batch in stream:
            seen += ids([batch])
            if len(seen) == count:
                return
        stream.set_epoch(stream.epoch + 1)


def test_a_stream_resumes_exactly_mid_block_and_across_epochs(memory_shards):
    def stream(state: dict | None = None) -> ShardStream:
        fresh = ShardStream(memory_shards, IdHead(id_recipe(memory_shards, batch_size=3)), 0, 1, torch.device("cpu"))
        if state is not None:
            fresh.load_state_dict([json.loads(json.dumps(state))])  # as the checkpoint stores it
        return fresh

    whole = []
    draw(stream(), 60, whole)  # two epochs of 30
    # Stop inside the third block of 7 (15 samples), again in the same block just after resuming (18),
    # in the next block (24), in the next epoch (45), and finish.
    seen, current = [], stream()
    for stop in (15, 18, 24, 45, 60):
        draw(current, stop, seen)
        current = stream(current.state_dict())
    assert current.epoch == 1
    assert seen == whole


def test_bad_shard_sets_and_resumes_are_refused(memory_shards, tmp_path):
    head = IdHead(id_recipe(memory_shards))
    with pytest.raises(UserError, match="is not a shard set"):
        ShardStream(f"memory://nothing-{time.monotonic_ns()}", head, 0, 1, torch.device("cpu"))
    other = IdHead(Recipe(name="ids", description="t", head="ids", backbone=None, data={"shards": memory_shards, "size": 32}))
    with pytest.raises(UserError, match="were written for head ids, backbone None, size 64"):
        ShardStream(memory_shards, other, 0, 1, torch.device("cpu"))
    with pytest.raises(UserError, match="fewer than one batch"):
        ShardStream(memory_shards, IdHead(id_recipe(memory_shards, batch_size=16)), 0, 2, torch.device("cpu"))
    stream = ShardStream(memory_shards, head, 0, 2, torch.device("cpu"))
    with pytest.raises(UserError, match="on 1 processes and this run has 2"):
        stream.load_state_dict([stream.state_dict()])
    with pytest.raises(UserError, match="not written by a run that trains from data.shards"):
        stream.load_state_dict(None)
    with pytest.raises(UserError, match="already holds files"):
        write_shards(IdHead(id_recipe()), memory_shards)

    class PictureHead(IdHead):
        def train_dataset(self):
            from PIL import Image

            return [{"picture": Image.new("RGB", (4, 4))}]

    with pytest.raises(UserError, match="field 'picture' is a Image"):
        write_shards(PictureHead(id_recipe()), f"memory://pictures-{time.monotonic_ns()}")


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*/*.safetensors"))
    assert files, f"no weights under {model_dir}"
    return {f"{f.parent.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


def test_icd_trains_from_shards_and_resumes_after_sigkill_with_identical_weights(tmp_path):
    from typer.testing import CliRunner

    from incontext_diffusion.cli import app

    shards = tmp_path / "shards"
    micro = ["--recipe", "tiny_ldm-micro", "--set", f"output_dir={tmp_path / 'tokenizer'}"]
    written = CliRunner().invoke(app, ["data", "shard", *micro, "--out", str(shards), "--samples-per-shard", "6"])
    assert written.exit_code == 0, written.output
    assert f"train with --set data.shards={shards}" in " ".join(written.output.split())  # rich wraps long lines
    assert len(json.loads((shards / "shards.json").read_text())["shards"]) == 6  # 32 samples, 6 per shard
    # 32 samples in shards of 6, batches of 4: 8 batches per epoch; 12 steps cross an epoch boundary.
    train = ["train", "--recipe", "tiny_ldm-micro", "--set", f"data.shards={shards}", "--set", "train.max_steps=12", "--set", "train.checkpoint_every=2",
             "--set", "train.validate_every=100"]
    straight = subprocess.run([sys.executable, "-m", "incontext_diffusion", *train, "--set", f"output_dir={tmp_path / 'straight'}"],
                              env=ENV, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr

    killed = tmp_path / "killed"
    kill_at_first_checkpoint([*train, "--set", f"output_dir={killed}"], killed, ENV, timeout=300)
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    resumed = subprocess.run([sys.executable, "-m", "incontext_diffusion", *train, "--set", f"output_dir={killed}", "--resume", "latest"],
                             env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    expected, actual = weights(tmp_path / "straight" / "model"), weights(killed / "model")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


TWO_PROCESS_SCRIPT = '''
import shutil, sys
from pathlib import Path
import torch
from incontext_diffusion.core.head import Head
from incontext_diffusion.core.trainer import train
from incontext_diffusion.recipes import Recipe

shards, out, resume = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "resume"

class IdHead(Head):
    def build(self):
        self.model = torch.nn.Linear(6, 1)
    def trainable(self):
        return self.model
    def collate(self, samples):
        return {"id": torch.stack([s["id"] for s in samples]), "x": torch.stack([s["x"].flatten() for s in samples])}
    def loss(self, model, batch, step):
        with (out / f"ids_{torch.distributed.get_rank()}.txt").open("a") as f:
            f.write(f"{step} " + " ".join(str(int(i)) for i in batch["id"]) + "\\n")
        return model(batch["x"] / 30).pow(2).mean()
    def export(self, model, out_dir):
        from safetensors.torch import save_file
        save_file(model.state_dict(), str(out_dir / "model.safetensors"))

settings = {"batch_size": 3, "max_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 4, "validate_every": 100, "log_every": 1}
recipe = Recipe(name="ids", description="t", head="ids", backbone=None, output_dir=str(out), data={"shards": shards}, train=settings)
train(IdHead(recipe), resume=str(out / "checkpoints" / "checkpoint-4") if resume else None)
'''


def test_two_processes_stream_disjoint_shards_and_resume_exactly(tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(IdHead(id_recipe()), shards, samples_per_shard=5)  # 6 shards: 3 per process, 15 samples = 5 batches of 3 per epoch
    script = tmp_path / "two_process.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(script), shards]
    env = {**ENV, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def drawn(run: Path, rank: int) -> dict[int, list[int]]:
        steps = [line.split() for line in (run / f"ids_{rank}.txt").read_text().splitlines()]
        return {int(step): [int(i) for i in sample_ids] for step, *sample_ids in steps}

    straight = tmp_path / "straight"
    straight.mkdir()
    result = subprocess.run([*launch, str(straight), "fresh"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = [drawn(straight, rank) for rank in range(2)]
    epoch = [sum((seen[rank][step] for step in range(5)), []) for rank in range(2)]  # 5 steps of 3 samples: one epoch
    assert not set(epoch[0]) & set(epoch[1]) and sorted(epoch[0] + epoch[1]) == list(range(SAMPLES))

    # Resume a copy of the run from its step-4 checkpoint, on 2 processes again.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    result = subprocess.run([*launch, str(resumed), "resume"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for rank in range(2):  # each process draws what it drew in the uninterrupted run, across the epoch boundary
        assert drawn(resumed, rank) == {step: ids for step, ids in seen[rank].items() if step >= 4}
    assert torch.equal(load_file(str(straight / "model" / "model.safetensors"))["weight"], load_file(str(resumed / "model" / "model.safetensors"))["weight"])
