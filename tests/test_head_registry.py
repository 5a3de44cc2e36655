"""Heads come from the entry points: a third-party head gets train, infer and eval with no edit to cli.py."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from incontext_diffusion import cli
from incontext_diffusion.core.head import available_heads
from incontext_diffusion.errors import UserError
from incontext_diffusion.recipes import load_recipe

TOY_HEAD = '''
import json

import torch
from safetensors.torch import load_file, save_file

from incontext_diffusion.core.head import Head


class ToyPipeline:
    """y = weight * x, the weight learnt by ToyHead."""

    def __init__(self, weight: float):
        self.weight = weight

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        return cls(float(load_file(f"{path}/weight.safetensors")["weight"]))

    def __call__(self, x: float) -> float:
        return self.weight * x


class ToyHead(Head):
    """Learns w so that w * 1 = 3."""

    data_keys = frozenset()
    pipeline_classes = (ToyPipeline,)

    def build(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.model.weight.fill_(0.5)

    def trainable(self):
        return self.model

    def train_dataset(self):
        return [torch.ones(1)] * 8

    def loss(self, model, batch, step):
        return ((model(batch) - 3.0) ** 2).mean()  # batch: B x 1

    def pipeline(self, model):
        return ToyPipeline(float(model.weight))

    def export(self, model, out_dir):
        save_file({"weight": model.weight.detach().reshape(())}, str(out_dir / "weight.safetensors"))
        (out_dir / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline"}))
'''

TOY_COMMANDS = '''
from pathlib import Path


def infer_toy(options):
    from .head import ToyPipeline

    options.refuse_unused({"out"}, "toy")
    Path(options.out).write_text(str(ToyPipeline.from_pretrained(options.model)(2.0)))


def eval_toy(options):
    from .head import ToyPipeline

    return {"weight": ToyPipeline.from_pretrained(options.model).weight}


def register(app, data_app, convert_app, infer, evaluate):
    infer["ToyPipeline"] = infer_toy
    evaluate["ToyPipeline"] = eval_toy

    @app.command("toy-hello")
    def hello():
        """Say hello from the toy head."""
        print("hello from the toy head")
'''

def write_toy_package(root: Path) -> None:
    (root / "toyhead").mkdir(parents=True)
    (root / "toyhead" / "__init__.py").write_text("")
    (root / "toyhead" / "head.py").write_text(TOY_HEAD)
    (root / "toyhead" / "commands.py").write_text(TOY_COMMANDS)
    dist = root / "toy_icd-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-icd\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[incontext_diffusion.heads]\ntoy = toyhead.head:ToyHead\n")


def test_a_third_party_head_trains_infers_and_evaluates_through_its_entry_point(tmp_path):
    write_toy_package(tmp_path / "site")
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        description: The toy head learns w * 1 = 3.
        head: toy
        backbone: null
        output_dir: {tmp_path / 'run'}
        train: {{max_steps: 40, batch_size: 4, learning_rate: 0.1, weight_decay: 0.0, checkpoint_every: 100, validate_every: 100, log_every: 10}}
        """))
    model = tmp_path / "run" / "model"
    script = textwrap.dedent(f"""\
        import sys
        from incontext_diffusion import cli, load_pipeline

        for args in (["train", "--recipe", {str(recipe)!r}],
                     ["infer", "--model", {str(model)!r}, "--out", {str(tmp_path / 'y.txt')!r}],
                     ["eval", "--model", {str(model)!r}, "--out", {str(tmp_path / 'eval')!r}],
                     ["toy-hello"]):
            sys.argv = ["icd", *args]
            try:
                cli.main()
            except SystemExit as exit_:
                assert exit_.code in (0, None), (args, exit_.code)
        pipe = load_pipeline({str(model)!r})
        print("loaded", type(pipe).__name__, pipe.weight)
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *sys.path]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    weight = float(load_file(str(model / "weight.safetensors"))["weight"])
    assert abs(weight - 3.0) < 0.3 < abs(0.5 - 3.0)  # trained from 0.5 towards 3
    assert float((tmp_path / "y.txt").read_text()) == pytest.approx(2 * weight)
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["weight"] == pytest.approx(weight)
    assert "hello from the toy head" in done.stdout
    assert f"loaded ToyPipeline {weight}" in done.stdout


def test_a_data_key_the_head_does_not_read_is_refused():
    from incontext_diffusion.core.head import load_head

    with pytest.raises(UserError, match=r"^data.source: imagefolder in recipe tiny_ldm-micro is not read by the tiny_ldm head: remove it"):
        load_head(load_recipe("tiny_ldm-micro", ["data.source=imagefolder"]))
    with pytest.raises(UserError, match=r"^data.held_out: 5 .* not read by the tiny_ldm head"):
        load_head(load_recipe("tiny_ldm-micro", ["data.held_out=5"]))
    # Keys it reads, keys the trainer reads, and unread keys left at their defaults pass.
    load_head(load_recipe("tiny_ldm-micro", ["data.size=16", "data.num_workers=1", "data.source=synthscenes"]))


def test_every_pipeline_class_a_head_exports_has_infer_and_eval_commands():
    declared = {cls.__name__: name for name, ep in available_heads().items() for cls in ep.load().pipeline_classes}
    assert declared["StableDiffusionPipeline"] == "tiny_ldm"
    for class_name in declared:
        assert class_name in cli.INFER_HANDLERS and class_name in cli.EVAL_HANDLERS, class_name


def test_top_level_exports_are_lazy_and_resolve():
    import incontext_diffusion

    check = "import sys, incontext_diffusion; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    for name in incontext_diffusion._EXPORTS:
        assert getattr(incontext_diffusion, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'NoSuchPipeline'"):
        incontext_diffusion.NoSuchPipeline


def test_the_cli_starts_without_torch():
    check = "import sys, incontext_diffusion.cli; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.strip() == "[]"
