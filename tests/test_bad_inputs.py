"""A corpus of bad inputs over every command: each ends in one line `error: ...`, exit code 2, no
traceback, and leaves nothing at the output path.

The CLI runs in-process. Broken model folders are copies of the embedded backbone with one thing
wrong; broken images are made here. Categories: option checks, recipes, backbones, model folders,
pickles, images, outputs (existing, under a file, read-only), empty data, checkpoints, bench.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import error_lines, run_icd, small_filesystem

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny-ldm"
PROMPT = ("--prompt", "a red cube")


def broken_copy(base: Path, name: str, damage) -> Path:
    folder = base / name
    shutil.copytree(TINY, folder)
    damage(folder)
    return folder


def cut(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])


def set_index(folder: Path, text: str) -> None:
    (folder / "model_index.json").write_text(text)


MODEL_DAMAGE = {
    "no_unet_weights": lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
    "no_text_encoder_weights": lambda f: (f / "text_encoder" / "model.safetensors").unlink(),
    "truncated_vae": lambda f: cut(f / "vae" / "diffusion_pytorch_model.safetensors", -1000),
    "vae_header_only": lambda f: cut(f / "vae" / "diffusion_pytorch_model.safetensors", 50),
    "fake_text_encoder_weights": lambda f: (f / "text_encoder" / "model.safetensors").write_text("not weights"),
    "pickled_unet": lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").rename(f / "unet" / "diffusion_pytorch_model.bin"),
    "no_unet_config": lambda f: (f / "unet" / "config.json").unlink(),
    "no_vae_folder": lambda f: shutil.rmtree(f / "vae"),
    "broken_index": lambda f: set_index(f, '{"_class_name": "StableDiffusionPipeline",'),
    "index_is_a_list": lambda f: set_index(f, "[1, 2]"),
    "index_without_class": lambda f: set_index(f, '{"unet": ["diffusers", "UNet2DConditionModel"]}'),
    "unknown_pipeline_class": lambda f: set_index(f, '{"_class_name": "NoSuchPipeline"}'),
    "empty_index": lambda f: set_index(f, ""),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Everything the cases point at, made once: broken models, images, checkpoints, folders."""
    base = tmp_path_factory.mktemp("bad_inputs")
    made = {name: broken_copy(base / "models", name, damage) for name, damage in MODEL_DAMAGE.items()}
    made["empty_folder"] = base / "empty"
    made["empty_folder"].mkdir()
    made["a_file"] = base / "a_file.txt"
    made["a_file"].write_text("a file, not a folder")
    made["existing_png"] = base / "existing.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(made["existing_png"])
    results = base / "results_exist"
    results.mkdir()
    (results / "results.json").write_text("{}")
    made["results_exist"] = results
    nonempty = base / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("keep")
    made["nonempty"] = nonempty

    # Single-file checkpoints.
    made["cut_safetensors"] = base / "cut.safetensors"
    made["cut_safetensors"].write_bytes((TINY / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()[:-4096])
    made["text_safetensors"] = base / "text.safetensors"
    made["text_safetensors"].write_text("hello")
    made["empty_safetensors"] = base / "empty.safetensors"
    made["empty_safetensors"].write_bytes(b"")
    made["pickle_ckpt"] = base / "needs_pickle.ckpt"
    torch.save({"state_dict": {"a": Path("x")}}, made["pickle_ckpt"])  # an object weights_only refuses
    made["garbage_ckpt"] = base / "garbage.ckpt"
    made["garbage_ckpt"].write_bytes(b"\x00garbage" * 10)

    # Images for `data annotate` (the shared image path: list_images, load_rgb).
    def image_folder(name: str, write) -> Path:
        folder = base / "images" / name
        folder.mkdir(parents=True)
        write(folder)
        return folder

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))

    def truncated(folder):
        noise.save(folder / "1_0.png")
        cut(folder / "1_0.png", 300)

    def bomb(folder):  # 81 MP of one colour: a small file, a canvas above the 64 MP limit
        Image.new("1", (9000, 9000)).save(folder / "1_0.png")

    made["img_truncated"] = image_folder("truncated", truncated)
    made["img_empty_file"] = image_folder("empty_file", lambda f: (f / "1_0.png").write_bytes(b""))
    made["img_fake"] = image_folder("fake", lambda f: (f / "1_0.jpg").write_text("not a jpeg"))
    made["img_bomb"] = image_folder("bomb", bomb)
    made["img_none"] = image_folder("none", lambda f: (f / "notes.txt").write_text("no images"))
    made["img_html"] = image_folder("html", lambda f: (f / "1_0.webp").write_text("<html>404</html>"))
    made["img_jpeg_cut"] = image_folder("jpeg_cut", lambda f: (noise.save(f / "1_0.jpg"), cut(f / "1_0.jpg", 200)))

    # A run folder whose only checkpoint is broken, and a recipe file with mistakes.
    broken_run = base / "broken_run"
    (broken_run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (broken_run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{not json")
    made["broken_run"] = broken_run
    made["bad_yaml"] = base / "bad.yaml"
    made["bad_yaml"].write_text("head: tiny_ldm\ntrain: [unclosed\n")
    made["wrong_head"] = base / "wrong_head.yaml"
    made["wrong_head"].write_text("head: no_such_head\n")
    made["list_yaml"] = base / "list.yaml"
    made["list_yaml"].write_text("- a\n- b\n")
    made["base"] = base
    return made


def infer_on(name: str, *extra: str):
    return lambda f: (["infer", "--model", f[name], *PROMPT, "--out", f["base"] / f"out_{name}.png", *extra], f["base"] / f"out_{name}.png")


def eval_on(name: str):
    return lambda f: (["eval", "--model", f[name], "-n", "1", "--out", f["base"] / f"eval_{name}"], f["base"] / f"eval_{name}")


def train_with(*sets: str, out: str = "run"):
    def case(f):
        run = f["base"] / f"train_{out}"
        return ["train", "--recipe", "tiny_ldm-micro", "--set", f"output_dir={run}", *[a for s in sets for a in ("--set", s.format(**f))]], run / "model"
    return case


def annotate(name: str):
    return lambda f: (["data", "annotate", f[name], "--tasks", "canny"], None)


def convert(name: str, *extra: str):
    return lambda f: (["convert", "single-file", f[name], f["base"] / f"converted_{name}", "--config", TINY, *extra], f["base"] / f"converted_{name}")


CASES = {
    # click/typer's own option checks
    "infer_steps_0": lambda f: (["infer", "-m", TINY, *PROMPT, "--steps", "0", "--out", f["base"] / "o1.png"], f["base"] / "o1.png"),
    "infer_guidance_negative": lambda f: (["infer", "-m", TINY, *PROMPT, "--guidance", "-1", "--out", f["base"] / "o2.png"], f["base"] / "o2.png"),
    "infer_seed_abc": lambda f: (["infer", "-m", TINY, *PROMPT, "--seed", "abc", "--out", f["base"] / "o3.png"], f["base"] / "o3.png"),
    "infer_num_images_0": lambda f: (["infer", "-m", TINY, *PROMPT, "--num-images", "0", "--out", f["base"] / "o4.png"], f["base"] / "o4.png"),
    "infer_height_4": lambda f: (["infer", "-m", TINY, *PROMPT, "--height", "4", "--out", f["base"] / "o5.png"], f["base"] / "o5.png"),
    "infer_unknown_option": lambda f: (["infer", "-m", TINY, "--stepz", "3"], None),
    "infer_example_needs_two": lambda f: (["infer", "-m", TINY, "--example", "only_one"], None),
    "infer_without_model": lambda f: (["infer", *PROMPT], None),
    "eval_n_0": lambda f: (["eval", "-m", TINY, "-n", "0", "--out", f["base"] / "e1"], f["base"] / "e1"),
    "eval_batch_size_0": lambda f: (["eval", "-m", TINY, "--batch-size", "0", "--out", f["base"] / "e2"], f["base"] / "e2"),
    "eval_scales_not_numbers": lambda f: (["eval", "-m", TINY, "--scales", "a,b", "--out", f["base"] / "e3"], f["base"] / "e3"),
    "synth_n_abc": lambda f: (["data", "synth", "--out", f["base"] / "s1", "--n", "abc"], f["base"] / "s1"),
    "synth_size_abc": lambda f: (["data", "synth", "--out", f["base"] / "s2", "--size", "big"], f["base"] / "s2"),
    "synth_without_out": lambda f: (["data", "synth"], None),
    "train_without_recipe": lambda f: (["train"], None),
    "cache_without_out": lambda f: (["data", "cache", "--recipe", "tiny_ldm-micro"], None),
    "convert_without_arguments": lambda f: (["convert", "single-file"], None),
    "bench_iterations_abc": lambda f: (["bench", "--iterations", "abc", "--out", f["base"] / "b1"], f["base"] / "b1"),
    "unknown_command": lambda f: (["trian"], None),
    # bench's own checks
    "bench_unknown_size": lambda f: (["bench", "--size", "huge", "--out", f["base"] / "b2"], f["base"] / "b2"),
    "bench_unknown_dtype": lambda f: (["bench", "--dtype", "fp8", "--out", f["base"] / "b3"], f["base"] / "b3"),
    # recipes
    "recipe_typo": lambda f: (["train", "--recipe", "tiny_ldmm"], None),
    "recipe_file_missing": lambda f: (["train", "--recipe", f["base"] / "nope.yaml"], None),
    "recipe_invalid_yaml": lambda f: (["train", "--recipe", f["bad_yaml"]], None),
    "recipe_not_a_mapping": lambda f: (["train", "--recipe", f["list_yaml"]], None),
    "recipe_unknown_head": lambda f: (["train", "--recipe", f["wrong_head"]], None),
    "recipe_unknown_key": train_with("train.lerning_rate=0.1"),
    "recipe_wrong_type": train_with("train.max_steps=many"),
    "recipe_set_without_equals": lambda f: (["train", "--recipe", "tiny_ldm-micro", "--set", "train.max_steps"], None),
    "recipe_unknown_precision": train_with("train.mixed_precision=fp8"),
    "cache_recipe_typo": lambda f: (["data", "cache", "--recipe", "tiny_ldmm", "--out", f["base"] / "c1"], f["base"] / "c1"),
    # backbones
    "backbone_hub_id_offline": train_with("backbone=some-org/some-model"),
    "backbone_missing_folder": train_with("backbone={base}/no_such_folder"),
    "backbone_empty_folder": train_with("backbone={empty_folder}"),
    "backbone_pickled_weights": train_with("backbone={pickled_unet}"),
    "backbone_truncated_weights": train_with("backbone={truncated_vae}"),
    "backbone_missing_weights": train_with("backbone={no_unet_weights}"),
    "backbone_missing_checkpoint_file": train_with("backbone={base}/missing.safetensors"),
    # model folders for infer and eval
    "model_missing_name": lambda f: (["infer", "-m", "no-such-model", *PROMPT], None),
    "model_empty_folder": infer_on("empty_folder"),
    "model_is_a_file": infer_on("a_file"),
    **{f"infer_{name}": infer_on(name) for name in MODEL_DAMAGE},
    "eval_no_unet_weights": eval_on("no_unet_weights"),
    "eval_pickled_unet": eval_on("pickled_unet"),
    "eval_broken_index": eval_on("broken_index"),
    "eval_truncated_vae": eval_on("truncated_vae"),
    # a flag the model does not read
    "infer_text_to_image_with_image": lambda f: (["infer", "-m", TINY, *PROMPT, "--image", f["existing_png"], "--out", f["base"] / "o6.png"], f["base"] / "o6.png"),
    # outputs
    "infer_out_exists": lambda f: (["infer", "-m", TINY, *PROMPT, "--out", f["existing_png"]], None),
    "infer_out_under_a_file": lambda f: (["infer", "-m", TINY, *PROMPT, "--out", f["a_file"] / "x.png"], f["a_file"] / "x.png"),
    "infer_out_is_a_folder_name_with_suffix": lambda f: (["infer", "-m", TINY, *PROMPT, "--out", f["nonempty"] / "keep.txt" / "y.png"], None),
    "infer_out_unknown_extension": lambda f: (["infer", "-m", TINY, *PROMPT, "--steps", "1", "--out", f["base"] / "o7.xyz"], f["base"] / "o7.xyz"),
    "eval_out_is_a_file": lambda f: (["eval", "-m", TINY, "-n", "1", "--out", f["a_file"]], None),
    "eval_out_has_results": lambda f: (["eval", "-m", TINY, "-n", "1", "--out", f["results_exist"]], None),
    "eval_out_under_a_file": lambda f: (["eval", "-m", TINY, "-n", "1", "--out", f["a_file"] / "e"], f["a_file"] / "e"),
    "synth_out_not_empty": lambda f: (["data", "synth", "--out", f["nonempty"], "--n", "2"], None),
    "synth_out_under_a_file": lambda f: (["data", "synth", "--out", f["a_file"] / "s", "--n", "2"], f["a_file"] / "s"),
    "synth_zero_scenes": lambda f: (["data", "synth", "--out", f["base"] / "s3", "--n", "0"], f["base"] / "s3"),
    "cache_out_exists": lambda f: (["data", "cache", "--recipe", "tiny_ldm-micro", "--out", f["nonempty"]], None),
    "train_output_dir_under_a_file": train_with("output_dir={a_file}/run"),
    # checkpoints
    "resume_without_checkpoints": lambda f: (["train", "--recipe", "tiny_ldm-micro", "--set", f"output_dir={f['base']}/fresh", "--resume", "latest"], f["base"] / "fresh" / "model"),
    "resume_missing_folder": lambda f: (["train", "--recipe", "tiny_ldm-micro", "--set", f"output_dir={f['base']}/fresh2", "--resume", f["base"] / "nope"], f["base"] / "fresh2" / "model"),
    "resume_every_checkpoint_broken": lambda f: (["train", "--recipe", "tiny_ldm-micro", "--set", f"output_dir={f['broken_run']}", "--resume", "latest"], f["broken_run"] / "model"),
    # single-file conversion and pickles
    "convert_truncated_safetensors": convert("cut_safetensors"),
    "convert_text_as_safetensors": convert("text_safetensors"),
    "convert_empty_safetensors": convert("empty_safetensors"),
    "convert_needs_pickle": convert("pickle_ckpt"),
    "convert_garbage_ckpt": convert("garbage_ckpt"),
    "convert_missing_file": lambda f: (["convert", "single-file", f["base"] / "none.safetensors", f["base"] / "cv"], f["base"] / "cv"),
    "convert_out_exists": lambda f: (["convert", "single-file", f["cut_safetensors"], f["nonempty"], "--config", TINY], None),
    "convert_hub_config_offline": lambda f: (["convert", "single-file", f["cut_safetensors"], f["base"] / "cv2", "--config", "some-org/some-model"], f["base"] / "cv2"),
    # images and data folders
    "annotate_truncated_png": annotate("img_truncated"),
    "annotate_empty_png": annotate("img_empty_file"),
    "annotate_text_as_jpg": annotate("img_fake"),
    "annotate_decompression_bomb": annotate("img_bomb"),
    "annotate_no_images": annotate("img_none"),
    "annotate_html_as_webp": annotate("img_html"),
    "annotate_cut_jpeg": annotate("img_jpeg_cut"),
    "annotate_missing_folder": lambda f: (["data", "annotate", f["base"] / "nowhere", "--tasks", "canny"], None),
    "annotate_empty_folder": annotate("empty_folder"),
    "annotate_unknown_task": lambda f: (["data", "annotate", f["img_truncated"], "--tasks", "colour"], None),
}


def test_the_corpus_is_large():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line(name, files, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(files["base"])  # default outputs (outputs/, runs/) would land here
    args, out = CASES[name](files)
    before = sorted(p.name for p in files["base"].iterdir())
    code, _, err = run_icd(monkeypatch, capsys, *args)
    lines = error_lines(err)
    assert code == 2, (name, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, err[-2000:])
    assert "Traceback" not in err
    if out is not None:
        assert not Path(out).exists(), f"{name} wrote {out}"
    assert not (files["base"] / "outputs").exists() and not (files["base"] / "runs").exists()
    new = set(p.name for p in files["base"].iterdir()) - set(before)
    assert not {n for n in new if n.startswith(".")}, f"{name} left temporary files: {new}"
    assert files["existing_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(files["existing_png"]).size == (4, 4)


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("infer_steps_0", "'--steps'"),
        ("synth_n_abc", "'--n'"),
        ("train_without_recipe", "missing option '--recipe'"),
        ("infer_no_unet_weights", "unet/diffusion_pytorch_model.safetensors is missing"),
        ("infer_no_text_encoder_weights", "text_encoder/model.safetensors is missing"),
        ("infer_truncated_vae", "vae/diffusion_pytorch_model.safetensors is not a readable safetensors file"),
        ("infer_pickled_unet", "holds pickled weights"),
        ("infer_no_unet_config", "unet/config.json is missing"),
        ("infer_broken_index", "is not valid JSON"),
        ("backbone_pickled_weights", "--trust-pickle"),
        ("infer_out_exists", "--overwrite"),
        ("eval_out_has_results", "results.json already exists"),
        ("convert_truncated_safetensors", "is not a readable safetensors file"),
        ("convert_needs_pickle", "--trust-pickle"),
        ("annotate_truncated_png", "truncated or corrupt"),
        ("annotate_decompression_bomb", "MP, above the limit"),
        ("resume_every_checkpoint_broken", "checkpoint-2 is broken"),
    ],
)
def test_the_line_names_the_problem(name, fragment, files, monkeypatch, capsys):
    """The line says what is wrong: the path, the missing file, the flag that fixes it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(files["base"])
    args, _ = CASES[name](files)
    _, _, err = run_icd(monkeypatch, capsys, *args)
    assert fragment in err, (name, err)


def test_the_eval_out_check_comes_before_the_evaluation(files, monkeypatch, capsys):
    """An existing results file is refused before the evaluation handler runs."""
    from incontext_diffusion import cli

    calls = []
    monkeypatch.setitem(cli.EVAL_HANDLERS, "StableDiffusionPipeline", lambda options: calls.append(options) or {})
    code, _, err = run_icd(monkeypatch, capsys, "eval", "-m", TINY, "-n", "1", "--out", files["results_exist"])
    assert code == 2 and "already exists" in err and calls == []
    code, _, _ = run_icd(monkeypatch, capsys, "eval", "-m", TINY, "-n", "1", "--out", files["results_exist"], "--overwrite")
    assert code == 0 and len(calls) == 1 and (files["results_exist"] / "results.md").is_file()


def test_unwritable_output_folder(tmp_path, monkeypatch, capsys):
    """An --out in a read-only folder fails at once with the folder named."""
    readonly = tmp_path / "readonly"
    with small_filesystem(readonly, read_only=True) as mounted:
        if not mounted:
            readonly.chmod(0o555)
        code, _, err = run_icd(monkeypatch, capsys, "infer", "-m", TINY, *PROMPT, "--out", readonly / "x.png")
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and "readonly" in lines[0] and "cannot be written" in lines[0]
        assert not (readonly / "x.png").exists()


def test_debug_keeps_the_traceback_of_an_option_error(monkeypatch):
    """`icd --debug` re-raises instead of printing one line."""
    import sys

    from incontext_diffusion import cli

    monkeypatch.setattr(sys, "argv", ["icd", "--debug", "infer", "-m", str(TINY), "--steps", "0"])
    with pytest.raises(Exception) as raised:
        cli.main()
    assert type(raised.value).__name__ == "BadParameter" and "greater than or equal to 1" in str(raised.value)
