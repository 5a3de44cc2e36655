"""`icd app`: a browser app (Gradio) over the heads' pipelines, one tab per capability.

Each tab is one plain function, inputs -> outputs, that the page, the tests and the benchmark call
alike: `in_context` (Prompt Diffusion), `depth_and_segmentation` (Meta-Prompts), `grounding`
(Diff-Prompt) and `text_to_image` (the tiny backbone). `build_app` lays them out in a
`gradio.Blocks`; `launch` serves it. Models come from `--model-dir` folders (default: the shipped
ones under assets/), sorted into tabs by the pipeline class in their model_index.json; a tab
without a model says which recipe makes one.

Uploads reach the functions as file paths inside the app's temporary folder (removed when the app
stops) and are opened through `core.images`, so a bad upload (not an image, too large, too small)
is one message in the page and the app keeps serving. Requests queue: one model call at a time.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr
import numpy as np
import torch
from PIL import Image

from .core.images import load_rgb, make_grid, save_depth_png, save_image, to_pil
from .core.model_folder import ModelFolder, read_model_folder, resolve_model, shipped_models
from .errors import UserError

# Pipeline class (model_index.json's `_class_name`) -> the tab capability it serves.
CAPABILITIES = {
    "PromptDiffusionPipeline": "in_context",
    "MetaPromptsDepthPipeline": "depth",
    "MetaPromptsSegmentationPipeline": "segmentation",
    "DiffPromptGroundingPipeline": "grounding",
    "StableDiffusionPipeline": "text_to_image",
}
# What a page without the model shows: the recipe that makes one.
TRAIN_HINTS = {
    "in_context": "icd train --recipe prompt_diffusion-tiny",
    "depth": "icd train --recipe meta_prompts_depth-tiny",
    "segmentation": "icd train --recipe meta_prompts_seg-tiny",
    "grounding": "icd train --recipe diff_prompt_grounding-tiny (after diff_prompt_mask_vae-tiny, diff_prompt_dit-tiny and grounding_host-tiny)",
    "text_to_image": "icd train --recipe tiny_ldm",
}
MAX_UPLOAD_PIXELS = 16_000_000  # a web app decodes strangers' files: well below core.images' 64 MP
MAX_FILE_SIZE = "20mb"  # Gradio refuses bigger uploads before they reach a tab
MIN_SIDE = 16  # smaller images carry nothing the models can use
OUTPUT_BUTTONS = ["download", "fullscreen"]  # no "share": nothing leaves the machine unless asked
GALLERY_SEEDS = 2  # example pairs per task in the in-context gallery
Progress = Callable[[int, int], None]  # (steps done, total steps)


# ------------------------------------------------------------------------------------- models
def find_models(model_dirs: list[str | Path]) -> dict[str, ModelFolder]:
    """capability -> model folder, from the given folders or else the shipped ones under assets/."""
    paths = [resolve_model(d) for d in model_dirs] if model_dirs else [resolve_model(name) for name in shipped_models()]
    found: dict[str, ModelFolder] = {}
    for path in paths:
        folder = read_model_folder(path)
        capability = CAPABILITIES.get(folder.class_name)
        if capability is None:
            if model_dirs:  # a shipped folder the app cannot show is skipped, a given one is refused
                raise UserError(f"{path} holds a {folder.class_name}, which the app does not show: pass folders of {', '.join(sorted(CAPABILITIES))}")
            continue
        if capability in found:
            raise UserError(f"two {capability} models given ({found[capability].path} and {path}): pass one --model-dir per tab")
        found[capability] = folder
    return found


def load_pipeline(folder: ModelFolder):
    """The pipeline of one model folder, with its progress bars off (the page shows progress)."""
    capability = CAPABILITIES[folder.class_name]
    if capability == "in_context":
        from .heads.prompt_diffusion.evaluate import load_pipeline as load_prompt_diffusion

        return load_prompt_diffusion(folder.path)
    if capability in ("depth", "segmentation"):
        from .heads.meta_prompts.pipeline import MetaPromptsDepthPipeline, MetaPromptsSegmentationPipeline

        pipeline_class = MetaPromptsDepthPipeline if capability == "depth" else MetaPromptsSegmentationPipeline
        return pipeline_class.from_pretrained(folder.path)
    if capability == "grounding":
        from .heads.diff_prompt.pipeline import DiffPromptGroundingPipeline

        return DiffPromptGroundingPipeline.from_pretrained(folder.path)
    from .heads.tiny_ldm.head import load_pipeline as load_text_to_image

    return load_text_to_image(folder.path)


class Models:
    """The model folder of each tab and its pipeline, loaded once, on first use or by `load_all`."""

    def __init__(self, folders: dict[str, ModelFolder]):
        self.folders = folders
        self._pipelines: dict[str, object] = {}
        self._lock = threading.Lock()  # the preloading thread and a first request may ask at once

    def missing(self, capability: str) -> str | None:
        """None when the tab has its model, else the page's note on how to get one."""
        if capability in self.folders:
            return None
        return f"No {capability.replace('_', '-')} model loaded. Make one with `{TRAIN_HINTS[capability]}` and pass its folder: `icd app --model-dir runs/<recipe>/model`."

    def pipeline(self, capability: str):
        if capability not in self.folders:
            raise UserError(self.missing(capability))
        with self._lock:
            if capability not in self._pipelines:
                self._pipelines[capability] = load_pipeline(self.folders[capability])
            return self._pipelines[capability]

    def load_all(self) -> None:
        for capability in self.folders:
            self.pipeline(capability)

    def setting(self, capability: str, section: str, key: str, default):
        """A setting of the recipe that trained the tab's model (recipe.yaml beside it), or `default`."""
        recipe = self.folders[capability].recipe if capability in self.folders else None
        if recipe is None:
            return default
        values = recipe.model if section == "model" else getattr(recipe, section).model_dump()
        return values.get(key, default)


# ---------------------------------------------------------------------------------- images in
def read_image(path: str | Path | None, label: str) -> Image.Image:
    """An upload as 8-bit RGB, or one clear `UserError` naming the input and the fix."""
    if path is None:
        raise UserError(f"{label}: no image given: upload one or pick an example")
    try:
        image = load_rgb(path, max_pixels=MAX_UPLOAD_PIXELS)
    except UserError as err:  # name the file as the user knows it, not by its temporary path
        raise UserError(f"{label}: {str(err).replace(str(path), Path(path).name)}") from None
    if min(image.size) < MIN_SIDE:
        raise UserError(f"{label} is {image.width}x{image.height} pixels: the models need at least {MIN_SIDE} a side: upload a larger image")
    return image


# ------------------------------------------------------------------------------- the tabs' work
def in_context(models: Models, source: str | Path, target: str | Path, query: str | Path, prompt: str = "", steps: int = 20,
               guidance: float | None = None, seed: int = 0, progress: Progress | None = None) -> Image.Image:
    """Prompt Diffusion: apply the task the example pair (source -> target) shows to the query; the output has the query's size."""
    images = [read_image(path, label) for path, label in ((source, "example source"), (target, "example target"), (query, "query"))]
    pipe = models.pipeline("in_context")
    size = int(models.setting("in_context", "data", "size", 64))  # the model's training resolution
    guidance = guidance or float(models.setting("in_context", "model", "guidance_scale", 9.0))

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        if progress is not None:
            progress(step + 1, steps)
        return callback_kwargs

    source_image, target_image, query_image = (image.resize((size, size), Image.Resampling.LANCZOS) for image in images)
    output = pipe(prompt or "", query_image, [source_image, target_image], num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), callback_on_step_end=on_step_end).images[0]
    return output.resize(images[2].size, Image.Resampling.LANCZOS)


@dataclass
class DepthAndSegmentation:
    """What the depth and segmentation tab shows; None where the tab has no model for it."""

    depth: np.ndarray | None  # (H, W) metres at the input's size
    depth_colored: Image.Image | None
    depth_png: Path | None  # 16-bit PNG, millimetres
    labels: np.ndarray | None  # (H, W) class ids at the input's size
    overlay: Image.Image | None
    labels_png: Path | None  # 8-bit PNG of class ids


def depth_and_segmentation(models: Models, image: str | Path, out_dir: Path) -> DepthAndSegmentation:
    """Meta-Prompts: metric depth and class ids of a photo, at its size, with the files to download written to `out_dir`."""
    photo = read_image(image, "photo")
    if "depth" not in models.folders and "segmentation" not in models.folders:
        raise UserError(models.missing("depth"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(image).stem
    result = DepthAndSegmentation(None, None, None, None, None, None)
    # The pipelines run at their processing resolution (the training size) and answer at the photo's size.
    if "depth" in models.folders:
        pipe = models.pipeline("depth")
        result.depth = pipe(photo).prediction[0, :, :, 0]  # metres, H x W
        result.depth_colored = pipe.image_processor.visualize_depth(result.depth[None, :, :, None])[0]
        result.depth_png = out_dir / f"{stem}_depth.png"
        save_depth_png(result.depth_png, result.depth, scale=1000.0)
    if "segmentation" in models.folders:
        pipe = models.pipeline("segmentation")
        result.labels = pipe(photo).prediction[0].astype(np.uint8)  # class ids, H x W
        result.overlay = pipe.image_processor.overlay_segmentation(photo, result.labels)
        result.labels_png = out_dir / f"{stem}_labels.png"
        save_image(Image.fromarray(result.labels), result.labels_png)
    return result


@dataclass
class Grounding:
    """What the grounding tab shows."""

    image: Image.Image  # the input photo
    box: tuple[int, int, int, int]  # the best box, xyxy pixels of the photo
    score: float
    mask: np.ndarray | None  # (H, W) generated mask in [0, 1] at the photo's size (Diff-Prompt only)
    trajectory: Image.Image | None  # the decoded masks fed to the prompt layers, left to right


def grounding(models: Models, image: str | Path, text: str, seed: int = 0) -> Grounding:
    """Diff-Prompt: the box a referring expression names in a photo, its score, and the generated mask."""
    photo = read_image(image, "photo")
    if not text or not text.strip():
        raise UserError("no referring expression: type one, e.g. \"the small red cube\"")
    pipe = models.pipeline("grounding")
    out = pipe(photo, [text.strip()], torch.Generator().manual_seed(seed), top_k=1)  # boxes and masks in the photo's pixels
    x1, y1, x2, y2 = out.boxes[0, 0].tolist()
    box = (round(x1), round(y1), max(round(x2), round(x1) + 1), max(round(y2), round(y1) + 1))
    mask = trajectory = None
    if out.masks is not None:
        mask = out.masks[0][0].clamp(0, 1).cpu().numpy()  # H x W at the photo's size
        layers = [to_pil(m[0, 0].clamp(0, 1), value_range=(0, 1)) for m in out.trajectory_masks]
        trajectory = make_grid(layers, labels=[f"layer {i}" for i in range(len(layers))])
    return Grounding(photo, box, float(out.scores[0, 0]), mask, trajectory)


def text_to_image(models: Models, prompt: str, steps: int = 20, guidance: float = 4.0, seed: int = 0, progress: Progress | None = None) -> Image.Image:
    """The tiny backbone: one image for a caption."""
    if not prompt or not prompt.strip():
        raise UserError("no text: type a caption, e.g. \"a large red sphere\"")
    pipe = models.pipeline("text_to_image")

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        if progress is not None:
            progress(step + 1, steps)
        return callback_kwargs

    return pipe(prompt.strip(), num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                callback_on_step_end=on_step_end).images[0]


# ----------------------------------------------------------------------------- example gallery
@dataclass
class ExamplePair:
    task: str
    seen_in_training: bool
    source: Path
    target: Path
    query: Path
    text: str


def write_gallery(models: Models, folder: Path) -> list[ExamplePair]:
    """Example pairs and queries of every task card, from held-out synthetic scene families (seeds >= 1,000,000)."""
    from .heads.prompt_diffusion.data import HELD_OUT_SEED, synthetic_triplet
    from .recipes import list_tasks, load_task

    size = int(models.setting("in_context", "data", "size", 64))
    texts = models.setting("in_context", "model", "task_texts", {}) or {}  # the tiny recipe's texts for forward tasks
    folder.mkdir(parents=True, exist_ok=True)
    # Trained or unseen: the tasks of the recipe that made the in-context model.
    recipe = models.folders["in_context"].recipe if "in_context" in models.folders else None
    trained = set(recipe.tasks) if recipe else set()
    cards = sorted((load_task(name) for name in list_tasks()), key=lambda card: (card.name not in trained, card.name))
    pairs = []
    for card in cards:
        card = card.model_copy(update={"text": texts[card.name]}) if card.name in texts else card
        for k in range(GALLERY_SEEDS):
            triplet = synthetic_triplet(HELD_OUT_SEED + k, card, size, "layout")
            paths = {}
            for key in ("example_source", "example_target", "query"):
                paths[key] = folder / f"{card.name}_{k}_{key}.png"
                save_image(Image.fromarray(triplet[key]), paths[key])
            pairs.append(ExamplePair(card.name, card.name in trained, paths["example_source"], paths["example_target"], paths["query"], triplet["caption"]))
    return pairs


# ------------------------------------------------------------------------------------- the page
class UploadedImage(gr.Image):
    """gr.Image that hands the tab its upload as a path, unopened: `read_image` checks it (Gradio's own
    preprocessing would fail on a non-image with no message). A template, so the page draws a gr.Image."""

    is_template = True

    def preprocess(self, payload):
        return None if payload is None else payload.path


def page_errors(function: Callable) -> Callable:
    """The tab function with a `UserError` shown as one message in the page (the app keeps serving)."""
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UserError as err:
            raise gr.Error(str(err), title="Cannot run this input") from None

    return run


def gradio_progress(progress: gr.Progress) -> Progress:
    return lambda done, total: progress((done, total), desc="denoising", unit="steps")


def build_app(models: Models, work_dir: Path) -> gr.Blocks:
    """The page: one tab per capability; a tab without its model explains how to make one."""
    outputs_dir = work_dir / "outputs"
    with gr.Blocks(title="incontext_diffusion", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# incontext_diffusion\nPrompt Diffusion, Meta-Prompts and Diff-Prompt on one latent-diffusion core.")

        with gr.Tab("In-context generation", id="in_context"):
            if models.missing("in_context"):
                gr.Markdown(models.missing("in_context"))
            else:
                gr.Markdown("An example pair (source -> target) shows a task; the model applies it to the query.")
                with gr.Row():
                    source = UploadedImage(label="Example source", type="filepath", height=192, elem_classes="pixels", elem_id="in-context-source")
                    target = UploadedImage(label="Example target", type="filepath", height=192, elem_classes="pixels", elem_id="in-context-target")
                    query = UploadedImage(label="Query", type="filepath", height=192, elem_classes="pixels", elem_id="in-context-query")
                    generated = gr.Image(label="Output", type="pil", format="png", buttons=OUTPUT_BUTTONS, height=192, interactive=False, elem_classes="pixels", elem_id="in-context-output")
                with gr.Row():
                    task = gr.Textbox(label="Task (from the gallery)", interactive=False, scale=1)
                    prompt = gr.Textbox(label="Text", placeholder="a caption for image tasks; empty for the tiny model's map tasks", scale=3)
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                    guidance = gr.Slider(1.0, 15.0, value=float(models.setting("in_context", "model", "guidance_scale", 9.0)), step=0.5, label="Guidance")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                run = gr.Button("Generate", variant="primary", elem_id="in-context-run")
                pairs = write_gallery(models, work_dir / "gallery")
                gr.Examples(
                    [[f"{p.task} ({'trained' if p.seen_in_training else 'unseen'})", str(p.source), str(p.target), str(p.query), p.text] for p in pairs],
                    [task, source, target, query, prompt], label="Example pairs from held-out scenes: click one to fill the inputs",
                    examples_per_page=len(pairs), cache_examples=False, elem_id="in-context-gallery",
                )

                def run_in_context(source, target, query, prompt, steps, guidance, seed, progress=gr.Progress()):
                    return in_context(models, source, target, query, prompt, int(steps), guidance, int(seed), gradio_progress(progress))

                run.click(page_errors(run_in_context), [source, target, query, prompt, steps, guidance, seed], generated, api_name="in_context")

        with gr.Tab("Depth and segmentation", id="depth"):
            if models.missing("depth") and models.missing("segmentation"):
                gr.Markdown(models.missing("depth") + "\n\n" + models.missing("segmentation"))
            else:
                for capability in ("depth", "segmentation"):
                    if models.missing(capability):
                        gr.Markdown(models.missing(capability))
                with gr.Row():
                    photo = UploadedImage(label="Photo", type="filepath", height=256, elem_classes="pixels", elem_id="depth-photo")
                    depth_colored = gr.Image(label="Depth (coloured, near to far)", type="pil", format="png", buttons=OUTPUT_BUTTONS, height=256, interactive=False, elem_classes="pixels", elem_id="depth-colored")
                    overlay = gr.Image(label="Segmentation overlay", type="pil", format="png", buttons=OUTPUT_BUTTONS, height=256, interactive=False, elem_classes="pixels", elem_id="depth-overlay")
                with gr.Row():
                    depth_png = gr.File(label="16-bit depth PNG (millimetres)", elem_id="depth-png")
                    labels_png = gr.File(label="Label map PNG (class ids)", elem_id="labels-png")
                predict = gr.Button("Predict", variant="primary", elem_id="depth-run")
                samples = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "assets" / "samples").glob("*.png"))
                if samples:
                    gr.Examples([[s] for s in samples], [photo], label="Sample photos", cache_examples=False)

                def run_depth(photo):
                    result = depth_and_segmentation(models, photo, Path(tempfile.mkdtemp(dir=outputs_dir)))
                    files = [str(path) if path else None for path in (result.depth_png, result.labels_png)]
                    return result.depth_colored, result.overlay, *files

                outputs_dir.mkdir(parents=True, exist_ok=True)
                predict.click(page_errors(run_depth), photo, [depth_colored, overlay, depth_png, labels_png], api_name="depth")

        with gr.Tab("Grounding", id="grounding"):
            if models.missing("grounding"):
                gr.Markdown(models.missing("grounding"))
            else:
                with gr.Row():
                    grounding_photo = UploadedImage(label="Photo", type="filepath", height=256, elem_classes="pixels", elem_id="grounding-photo")
                    annotated = gr.AnnotatedImage(label="Box (with its score) and generated mask", format="png", height=256, elem_classes="pixels", elem_id="grounding-output")
                    trajectory = gr.Image(label="Mask trajectory (the masks fed to the prompt layers)", type="pil", format="png", buttons=OUTPUT_BUTTONS, height=256, interactive=False, elem_classes="pixels", elem_id="grounding-trajectory")
                expression = gr.Textbox(label="Referring expression", placeholder="the small red cube", elem_id="grounding-text")
                with gr.Row():
                    grounding_seed = gr.Number(value=0, precision=0, label="Seed")
                    locate = gr.Button("Locate", variant="primary", elem_id="grounding-run")

                def run_grounding(photo, text, seed):
                    result = grounding(models, photo, text, int(seed))
                    annotations = [(result.box, f"box {result.score:.2f}")]
                    if result.mask is not None:
                        annotations.append((result.mask, "generated mask"))
                    return (result.image, annotations), result.trajectory

                locate.click(page_errors(run_grounding), [grounding_photo, expression, grounding_seed], [annotated, trajectory], api_name="grounding")

        with gr.Tab("Text-to-image", id="text_to_image"):
            if models.missing("text_to_image"):
                gr.Markdown(models.missing("text_to_image"))
            else:
                caption = gr.Textbox(label="Caption", value="a large red sphere")
                with gr.Row():
                    t2i_steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                    t2i_guidance = gr.Slider(1.0, 15.0, value=4.0, step=0.5, label="Guidance")
                    t2i_seed = gr.Number(value=0, precision=0, label="Seed")
                draw = gr.Button("Generate", variant="primary", elem_id="text-to-image-run")
                picture = gr.Image(label="Image", type="pil", format="png", buttons=OUTPUT_BUTTONS, height=256, interactive=False, elem_classes="pixels", elem_id="text-to-image-output")

                def run_text_to_image(caption, steps, guidance, seed, progress=gr.Progress()):
                    return text_to_image(models, caption, int(steps), guidance, int(seed), gradio_progress(progress))

                draw.click(page_errors(run_text_to_image), [caption, t2i_steps, t2i_guidance, t2i_seed], picture, api_name="text_to_image")
    # One model call at a time (the CPU is shared by every request); the others wait in line.
    return demo.queue(default_concurrency_limit=1, max_size=32)


# ------------------------------------------------------------------------------------ serving
# System fonts only: the default theme fetches web fonts, which an offline machine cannot reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# The tiny models' 32-64 px images fill their box, enlarged with hard pixel edges; what is served and
# downloaded stays the model's own pixels.
PIXEL_CSS = ".pixels img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


@contextmanager
def serve(model_dirs: list[str | Path], host: str = "127.0.0.1", port: int | None = None, share: bool = False,
          preload: bool = False) -> Iterator[str]:
    """Run the app in this process and yield its URL; on exit stop it and remove its temporary folder."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    models = Models(find_models(model_dirs))
    work_dir = Path(tempfile.mkdtemp(prefix="icd-app-"))
    previous_temp = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(work_dir)  # Gradio writes uploads and the files it serves here, beside ours
    demo = None
    try:
        demo = build_app(models, work_dir)
        demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True, show_error=False,
                    max_file_size=MAX_FILE_SIZE, theme=THEME, css=PIXEL_CSS, footer_links=[], ssr_mode=False, mcp_server=False)
        if preload:  # the page is up already; the models load behind it (a first request waits for them)
            models.load_all()
        yield demo.local_url
    finally:
        if demo is not None:
            demo.close()
        if previous_temp is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous_temp
        shutil.rmtree(work_dir, ignore_errors=True)


def launch(model_dirs: list[str | Path], host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """`icd app`: serve until Ctrl-C or SIGTERM (both remove the temporary folder)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # unwinds through `serve`'s cleanup
    with serve(model_dirs, host, port, share, preload=True) as url:
        print(f"icd app is serving at {url} (Ctrl-C stops it)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
