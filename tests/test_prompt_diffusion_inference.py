"""Prompt Diffusion inference: batched queries, sizes, once-per-call embeddings, CUDA-graph steps,
half dtypes, the exported defaults shared by infer and eval, and eval scoring as defined."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ImagePipelineOutput
from PIL import Image

from incontext_diffusion.data.synthscenes import caption_vocabulary
from incontext_diffusion.cli import EvalOptions, InferOptions
from incontext_diffusion.core.tiny import micro_components
from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.prompt_diffusion import commands, evaluate
from incontext_diffusion.heads.prompt_diffusion.controlnet import PromptDiffusionControlNetModel
from incontext_diffusion.heads.prompt_diffusion.head import make_pipeline
from incontext_diffusion.heads.prompt_diffusion.pipeline import PromptDiffusionPipeline

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    components = micro_components(caption_vocabulary(), tmp_path_factory.mktemp("tok"), seed=0)
    torch.manual_seed(1)
    controlnet = PromptDiffusionControlNetModel.from_unet(components.unet, conditioning_embedding_out_channels=(8, 8, 8))
    for layer in [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_query_cond_embedding.conv_out,
                  *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        for param in layer.parameters():
            torch.nn.init.normal_(param, std=0.3)  # not the identity, so that the images matter
    return make_pipeline(components, controlnet, "[-1, 1]", steps=2, guidance_scale=2.5, task_texts={"image_to_depth": ""})


@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def images(n, size=64, seed=0):  # the micro UNet needs 64 px (8 latent px after 3 down-samplings)
    return list(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)))


def test_a_batch_of_queries_equals_one_call_per_query(pipe):
    source, target, q1, q2 = images(4)
    batched = pipe(["a red cube", "a blue sphere"], [q1, q2], [[source, target], [target, source]], num_inference_steps=1, guidance_scale=3.0,
                   generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], output_type="pt").images
    single = [pipe(text, q, pair, num_inference_steps=1, guidance_scale=3.0, generator=torch.Generator().manual_seed(s), output_type="pt").images[0]
              for text, q, pair, s in [("a red cube", q1, [source, target], 5), ("a blue sphere", q2, [target, source], 6)]]
    assert batched.shape == (2, 3, 64, 64)
    assert (batched - torch.stack(single)).abs().max() < 1e-5
    assert (batched[0] - batched[1]).abs().max() > 1e-3


def test_sizes_are_rounded_to_the_latent_grid_and_everything_is_resized(pipe):
    query = torch.rand(3, 62, 50)
    pair = [torch.rand(3, 20, 24), torch.rand(3, 64, 64)]  # other sizes: resized like the query
    assert pipe("x", query, pair, num_inference_steps=1, output_type="pt").images.shape == (1, 3, 60, 48)  # down to multiples of 4
    assert pipe("x", query, pair, height=40, width=36, num_inference_steps=1, output_type="pt").images.shape == (1, 3, 40, 36)
    pil = pipe("x", Image.new("RGB", (66, 50), "red"), pair, num_inference_steps=1).images[0]
    assert pil.size == (64, 48)


def test_pair_and_query_are_embedded_once_per_call_and_each_step_is_marked_for_cuda_graphs(pipe, monkeypatch):
    calls = {"embed": 0, "mark": 0}
    embed = pipe.controlnet.embed_conditions

    def counted_embed(*args):
        calls["embed"] += 1
        return embed(*args)

    def counted_mark():
        calls["mark"] += 1

    monkeypatch.setattr(pipe.controlnet, "embed_conditions", counted_embed)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", counted_mark)
    source, target, query = images(3)
    pipe("a cube", query, [source, target], num_inference_steps=3, guidance_scale=4.0, output_type="latent")
    assert calls == {"embed": 1, "mark": 3}


def half_dtypes():
    dtypes = [torch.bfloat16]
    try:
        torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.float16), torch.ones(1, 1, 1, 1, dtype=torch.float16))
        dtypes.append(torch.float16)
    except RuntimeError:  # no fp16 convolution on this CPU
        pass
    return dtypes


@pytest.mark.parametrize("dtype", half_dtypes(), ids=str)
def test_half_dtypes_give_finite_images_close_to_float32(pipe, dtype):
    source, target, query = images(3)
    reference = pipe("a red cube", query, [source, target], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    pipe.to(dtype=dtype)
    try:
        half = pipe("a red cube", query, [source, target], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    finally:
        pipe.to(dtype=torch.float32)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert half.std() > 0.01  # not a flat (black) image
    assert (half - reference).abs().mean() < 0.05


def spy_on_calls(monkeypatch) -> list:
    """Records (steps, guidance) of every pipeline call; answers grey 64 px images without sampling."""
    seen = []

    def spy(self, prompt, image, image_pair, **kwargs):
        seen.append((kwargs.get("num_inference_steps"), kwargs.get("guidance_scale")))
        grey = np.full((len(image) if isinstance(image, list) else 1, 64, 64, 3), 0.5, np.float32)
        return ImagePipelineOutput(images=grey if kwargs.get("output_type") == "np" else [Image.new("RGB", (64, 64), "grey")] * len(grey))

    monkeypatch.setattr(PromptDiffusionPipeline, "__call__", spy)
    return seen


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (width, height) in enumerate(sizes):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_infer_and_eval_use_the_exported_defaults_and_flags_override_them(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "untrained_pipeline", lambda pipe, backbone: None)
    seen = spy_on_calls(monkeypatch)
    source, target, query = write_images(tmp_path / "in", [(64, 64)] * 3)
    commands.infer(InferOptions(model=model_dir, out=tmp_path / "out.png", example=(source, target), query=query))
    evaluation = commands.evaluate(EvalOptions(model=model_dir, out=tmp_path / "eval", tasks=["image_to_depth"], num_samples=2))
    assert seen and set(seen) == {(2, 2.5)}  # the config's, in infer and eval alike
    assert (evaluation["steps"], evaluation["guidance_scale"]) == (2, 2.5)
    seen.clear()
    commands.infer(InferOptions(model=model_dir, out=tmp_path / "out2.png", example=(source, target), query=query, steps=1, guidance=3.0))
    commands.evaluate(EvalOptions(model=model_dir, out=tmp_path / "eval2", tasks=["image_to_depth"], num_samples=2, steps=1, guidance=3.0))
    assert set(seen) == {(1, 3.0)}


def test_infer_writes_one_output_per_query_at_its_size(model_dir, tmp_path):
    source, target = write_images(tmp_path / "pair", [(64, 64), (64, 64)])
    write_images(tmp_path / "queries", [(70, 66), (64, 81)])
    out = tmp_path / "outputs"
    commands.infer(InferOptions(model=model_dir, out=out, example=(source, target), query=tmp_path / "queries", steps=1))
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png"]
    assert [Image.open(out / name).size for name in ("img0.png", "img1.png")] == [(70, 66), (64, 81)]
    with pytest.raises(UserError, match="gives 2 images but --out .* is one file"):
        commands.infer(InferOptions(model=model_dir, out=tmp_path / "one.png", example=(source, target), query=tmp_path / "queries"))
    with pytest.raises(UserError, match="--num-images is not used by a Prompt Diffusion model"):
        commands.infer(InferOptions(model=model_dir, example=(source, target), query=source, num_images=2))


def fake_pipeline(monkeypatch, answer):
    """The pipeline's __call__ replaced by `answer(query, pair) -> HxWx3 uint8`."""
    def call(self, prompts, queries, pairs, **kwargs):
        outputs = [answer(query, pair) for query, pair in zip(queries, pairs)]
        return ImagePipelineOutput(images=np.stack(outputs).astype(np.float32) / 255)

    monkeypatch.setattr(PromptDiffusionPipeline, "__call__", call)


def test_eval_scores_the_ground_truth_and_a_copy_of_the_example_as_defined(model_dir, tmp_path, monkeypatch):
    from incontext_diffusion.data.annotators import synthetic_map
    from incontext_diffusion.data.synthscenes import scene_family

    monkeypatch.setattr(evaluate, "untrained_pipeline", lambda pipe, backbone: None)
    n = 3
    families = [scene_family(evaluate.HELD_OUT_SEED + i, 2, 64, "layout") for i in range(n)]
    truth = {}  # (query, example target) -> the query's ground truth for the example's task
    for card in evaluate.task_cards(evaluate.TRAINED_TASKS + evaluate.UNSEEN_TASKS, {}):
        for example, _ in families:
            for _, query in families:  # the swapped queries too
                key = (synthetic_map(query, card.source).tobytes(), synthetic_map(example, card.target).tobytes())
                truth[key] = synthetic_map(query, card.target)

    fake_pipeline(monkeypatch, lambda query, pair: truth[(query.tobytes(), pair[1].tobytes())])
    oracle = evaluate.evaluate_model(model_dir, [], num_samples=n, out=tmp_path / "oracle")
    for task in evaluate.TRAINED_TASKS + evaluate.UNSEEN_TASKS:
        assert oracle[f"{task}/task_following"] == 1.0 and oracle[f"{task}/query_following"] == 1.0, task
        assert oracle[f"{task}/rmse"] == 0.0
        expected = "image" if task.endswith("_to_image") else task.removeprefix("image_to_")
        assert oracle[f"confusion/{task}/{expected}"] == 1.0
    for task in ("depth_to_image", "seg_to_image", "canny_to_image"):
        assert oracle[f"{task}/object_colour_agreement"] == 1.0
    assert oracle["canny_to_image/placement_iou"] == oracle["normal_to_image/placement_iou"] == 1.0
    assert oracle["image_to_depth/rmse_copy_example"] > 0 and oracle["image_to_depth/rmse_untrained"].startswith("skipped")
    assert Image.open(tmp_path / "oracle" / "in_context.png").width >= 5 * 192

    fake_pipeline(monkeypatch, lambda query, pair: pair[1])  # copies the example's target
    copier = evaluate.evaluate_model(model_dir, ["image_to_depth", "image_to_seg"], num_samples=n)
    for task in ("image_to_depth", "image_to_seg"):
        assert copier[f"{task}/rmse"] == pytest.approx(copier[f"{task}/rmse_copy_example"], abs=1e-12)
        assert copier[f"{task}/query_following"] == 0.0
        assert copier[f"{task}/task_following"] == 1.0
