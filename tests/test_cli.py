"""The `icd` command line: help, recipes, info, and one clear line with exit code 2 for user errors."""

import sys
import time
from importlib.metadata import version

import pytest

from incontext_diffusion import cli
from incontext_diffusion.core import components, hub
from incontext_diffusion.errors import UserError
from incontext_diffusion.recipes import apply_overrides, load_recipe

from cli_helpers import run_icd


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_help_lists_the_command_groups(monkeypatch, capsys):
    code, out, _ = run_icd(monkeypatch, capsys, "--help")
    assert code == 0
    for group in ("train", "infer", "eval", "data", "convert", "recipes", "info"):
        assert group in out


def test_recipes_lists_names_with_descriptions(monkeypatch, capsys):
    code, out, _ = run_icd(monkeypatch, capsys, "recipes")
    assert code == 0
    assert "tiny_ldm" in out and "tiny_ldm-micro" in out
    assert "Train the embedded tiny" in out


def test_info_reports_versions_hub_and_heads(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_icd(monkeypatch, capsys, "info")
    assert code == 0
    assert version("torch") in out and version("diffusers") in out
    assert "hub reachable" in out and "False" in out
    assert "prompt_diffusion" in out and "tiny_ldm" in out  # the installed heads


def test_head_commands_are_registered_from_the_entry_points(monkeypatch, capsys):
    assert cli.INFER_HANDLERS["StableDiffusionPipeline"].__module__ == "incontext_diffusion.heads.tiny_ldm.commands"
    assert "PromptDiffusionPipeline" in cli.EVAL_HANDLERS
    code, out, _ = run_icd(monkeypatch, capsys, "convert", "--help")
    assert code == 0 and "prompt-diffusion" in out and "meta-prompts" in out  # extras a head adds


def test_recipe_typo_names_the_closest_recipe(monkeypatch, capsys):
    code, _, err = run_icd(monkeypatch, capsys, "train", "--recipe", "tiny_ldmm")
    assert_one_line_error(code, err, "recipe 'tiny_ldmm' not found", "did you mean 'tiny_ldm'")


def test_unknown_key_names_the_closest_valid_key(monkeypatch, capsys):
    code, _, err = run_icd(monkeypatch, capsys, "train", "--recipe", "tiny_ldm-micro", "--set", "train.lerning_rate=0.1")
    assert_one_line_error(code, err, "unknown key 'train.lerning_rate'", "did you mean 'train.learning_rate'")


def test_unknown_head_option_names_the_closest_option(monkeypatch, capsys):
    code, _, err = run_icd(monkeypatch, capsys, "train", "--recipe", "tiny_ldm-micro", "--set", "model.vae_stepz=3")
    assert_one_line_error(code, err, "unknown key 'model.vae_stepz'", "did you mean 'model.vae_steps'")


def test_wrong_type_names_the_key_and_expected_type(monkeypatch, capsys):
    code, _, err = run_icd(monkeypatch, capsys, "train", "--recipe", "tiny_ldm-micro", "--set", "train.max_steps=many")
    assert_one_line_error(code, err, "'train.max_steps'", "must be an integer", "'many'")


def test_missing_recipe_file(monkeypatch, capsys, tmp_path):
    code, _, err = run_icd(monkeypatch, capsys, "train", "--recipe", str(tmp_path / "nope.yaml"))
    assert_one_line_error(code, err, "nope.yaml", "does not exist")


def test_invalid_yaml_recipe(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("head: tiny_ldm\ntrain: [unclosed\n")
    code, _, err = run_icd(monkeypatch, capsys, "train", "--recipe", str(bad))
    assert_one_line_error(code, err, "is not valid YAML")


def test_hub_id_offline_fails_fast_with_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UserError, match="not on this machine and the hub is unreachable: pass a local folder or use backbone: tiny"):
        components.load_components("some-org/some-model")
    assert time.perf_counter() - start < 2.0
    code, _, err = run_icd(monkeypatch, capsys, "train", "--recipe", "tiny_ldm-micro", "--set", "backbone=some-org/some-model")
    assert_one_line_error(code, err, "weights for some-org/some-model are not on this machine")


def test_hub_unreachable_without_offline_flag_is_detected_quickly(monkeypatch):
    # A closed local port stands in for a network that refuses the hub.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HUB_HOST", "127.0.0.1")
    start = time.perf_counter()
    assert hub.hub_reachable() is False
    assert time.perf_counter() - start < 2.0


def test_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["icd", "--debug", "train", "--recipe", "tiny_ldmm"])
    with pytest.raises(UserError):
        cli.main()


def test_overrides_parse_yaml_values():
    data = apply_overrides({"train": {"max_steps": 5}}, ["train.max_steps=10", "train.ema=true", "data.size=32", "tasks=[a, b]"])
    assert data == {"train": {"max_steps": 10, "ema": True}, "data": {"size": 32}, "tasks": ["a", "b"]}
    with pytest.raises(UserError, match="key=value"):
        apply_overrides({}, ["train.max_steps"])


def test_recipe_defaults_and_run_dir():
    recipe = load_recipe("tiny_ldm-micro", ["output_dir=null"])
    assert recipe.name == "tiny_ldm-micro"
    assert str(recipe.run_dir()) == "runs/tiny_ldm-micro"
    assert recipe.train.lr_scheduler == "constant"


def test_infer_on_a_folder_that_is_not_a_model(monkeypatch, capsys, tmp_path):
    code, _, err = run_icd(monkeypatch, capsys, "infer", "--model", str(tmp_path), "--prompt", "a red cube")
    assert_one_line_error(code, err, "no model_index.json")
