"""MetaPrompts pipelines: the official test-time augmentation on hand-built models, processing
resolution, inputs and outputs, and the pipeline right after training."""

import numpy as np
import pytest
import torch
from PIL import Image

from incontext_diffusion.data.synthscenes import caption_vocabulary
from incontext_diffusion.core.tiny import build_unet, micro_components
from incontext_diffusion.errors import UserError
from incontext_diffusion.heads.meta_prompts.decoders import MetaPromptsDepthHead, MetaPromptsSegmentationHead
from incontext_diffusion.heads.meta_prompts.model import feature_channels, time_embedding_dim
from incontext_diffusion.heads.meta_prompts.pipeline import (
    MetaPromptsDepthPipeline,
    MetaPromptsSegmentationPipeline,
    processing_size,
    shift_window_starts,
    slide_window_starts,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return micro_components(caption_vocabulary(), tmp_path_factory.mktemp("tok"), seed=0)


def head_kwargs(unet):
    return dict(feature_channels=tuple(feature_channels(unet)), prompt_dim=unet.config.cross_attention_dim,
                time_embedding_dim=time_embedding_dim(unet), num_prompts=4, input_multiple=32)


def depth_pipeline(components, fake=None, **config):
    unet = build_unet("micro")
    head = MetaPromptsDepthHead(**head_kwargs(unet), num_deconv=2, decoder_channels=8, resize_scale=0)
    pipe = MetaPromptsDepthPipeline(vae=components.vae, unet=unet, head=head, **config)
    pipe.set_progress_bar_config(disable=True)
    if fake is not None:
        pipe._model = fake
    return pipe


def seg_pipeline(components, fake, **config):
    unet = build_unet("micro")
    head = MetaPromptsSegmentationHead(**head_kwargs(unet), num_classes=3, channels=8, auxiliary_channels=8)
    pipe = MetaPromptsSegmentationPipeline(vae=components.vae, unet=unet, head=head, **config)
    pipe.set_progress_bar_config(disable=True)
    pipe._model = fake
    return pipe


def column_image(height: int, width: int) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] whose every channel is column / 100: a crop says where it was cut."""
    return (torch.arange(width, dtype=torch.float32) / 100).expand(1, 3, height, width).clone()


def column_of(crop: torch.Tensor) -> torch.Tensor:
    """The original column of each pixel of a crop of column_image (undoing x * 2 - 1)."""
    return ((crop[:, :1] + 1) / 2 * 100).round()


# --- window positions ----------------------------------------------------------------------------


def test_depth_shift_windows_at_the_official_positions():
    # official: i * ((W - H) // (n - 1)); NYU 640x480, 2 windows; KITTI 1216x352, 16 windows (step 57, not ceil's 58)
    assert shift_window_starts(640, 480, 2) == [0, 160]
    kitti = shift_window_starts(1216, 352, 16)
    assert kitti == [57 * i for i in range(16)] and kitti[-1] + 352 == 1207
    assert shift_window_starts(480, 480, 2) == [0]  # a square image is one window


def test_segmentation_slide_positions_as_mmseg():
    # ADE20K (short side 512): 512 windows at stride 341, the last moved back to the edge
    assert slide_window_starts(683, 512, 341) == [0, 171]
    assert slide_window_starts(512, 512, 341) == [0]
    assert slide_window_starts(853, 512, 341) == [0, 341]
    assert slide_window_starts(2048, 1024, 512) == [0, 512, 1024]  # Cityscapes width
    assert slide_window_starts(300, 512, 341) == [0]  # smaller than a window: the whole side


def test_processing_size_sets_the_short_side():
    assert processing_size(600, 1000, 64) == (64, 107)
    assert processing_size(480, 640, 480) == (480, 640)
    assert processing_size(37, 50, 0) == (37, 50)


# --- depth test-time augmentation ----------------------------------------------------------------


def test_depth_windows_average_a_known_function_of_the_window(components):
    # The fake model predicts, everywhere in a window, the window's first column. 4x11 image, 3 windows
    # of side 4 at step (11 - 4) // 2 = 3: 0, 3, 6; column 10 is past the last one, so the edge window
    # at 7 fills it (and only it).
    fake = lambda x: column_of(x)[..., :1].expand(-1, -1, x.shape[-2], x.shape[-1])
    pipe = depth_pipeline(components, fake)
    depth = pipe(column_image(4, 11), processing_resolution=0, shift_windows=3, output_type="pt").prediction[0, 0, 0]
    # windows 0 (cols 0-3), 3 (3-6), 6 (6-9), then the edge window 7 for column 10 alone
    expected = [0, 0, 0, (0 + 3) / 2, 3, 3, (3 + 6) / 2, 6, 6, 6, 7]
    assert depth.tolist() == pytest.approx(expected)


def test_depth_flip_averages_with_the_flipped_back_prediction(components):
    # Not flip-symmetric: x times a ramp 0..1 over the window. f(x) + flip(f(flip(x))) = x (ramp + reversed ramp = 1).
    ramp = lambda x: x[:, :1] * torch.linspace(0, 1, x.shape[-1])
    image = torch.rand(1, 3, 5, 5)
    pipe = depth_pipeline(components, ramp, default_tta=True)
    depth = pipe(image, processing_resolution=0, output_type="pt").prediction  # tta from the config
    assert torch.allclose(depth, (image[:, :1] * 2 - 1) / 2, atol=1e-6)
    plain = pipe(image, processing_resolution=0, tta=False, output_type="pt").prediction
    assert torch.allclose(plain, ramp(image * 2 - 1), atol=1e-6)


def test_depth_flip_with_shift_windows(components):
    # Each window with its own flip (as the official): a ramp model over windows 0 and 2 of a 3x5 image gives x / 2.
    ramp = lambda x: x[:, :1] * torch.linspace(0, 1, x.shape[-1])
    image = torch.rand(1, 3, 3, 5)
    depth = depth_pipeline(components, ramp)(image, processing_resolution=0, tta=True, shift_windows=2, output_type="pt").prediction
    assert torch.allclose(depth, (image[:, :1] * 2 - 1) / 2, atol=1e-6)


def test_depth_comes_back_at_the_input_size(components):
    seen = []

    def fake(x):
        seen.append(tuple(x.shape[-2:]))
        return torch.ones(x.shape[0], 1, *x.shape[-2:])

    pipe = depth_pipeline(components, fake, default_processing_resolution=16)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    out = pipe([photo, photo], batch_size=2).prediction
    assert out.shape == (2, 30, 50, 1) and seen == [(16, 27)]  # short side at the config's 16, back to 30x50


# --- segmentation test-time augmentation ---------------------------------------------------------


def window_logits(x: torch.Tensor) -> torch.Tensor:
    """Class logits per crop: [6, 0, 5] for a crop starting at column 0, [0, 6, 5] otherwise."""
    first = column_of(x)[:, 0, 0, 0]
    logits = torch.where((first == 0)[:, None], torch.tensor([6.0, 0.0, 5.0]), torch.tensor([0.0, 6.0, 5.0]))
    return logits[:, :, None, None].expand(-1, -1, *x.shape[-2:])


def test_segmentation_windows_average_logits_not_probabilities(components):
    # 2x3 image, windows of 2 at stride 1: columns 0-1 and 1-2. Column 1 gets the mean logits [3, 3, 5]
    # -> class 2; the mean of the two softmaxes would be [0.37, 0.37, 0.27] -> class 0.
    pipe = seg_pipeline(components, lambda x: (window_logits(x), None))
    labels = pipe(column_image(2, 3), processing_resolution=0, window=2, stride=1).prediction
    assert labels.tolist() == [[[0, 2, 1], [0, 2, 1]]]


def test_segmentation_flip_is_on_the_whole_image_and_undone(components):
    # Logits: class 0 = a ramp 0..1 over the columns, class 1 = 0.45. One pass: class 0 where the ramp > 0.45.
    # With the flip, p0 = (sigmoid(r - 0.45) + sigmoid(0.55 - r)) / 2 > 0.5 at every column: class 0 everywhere
    # (without un-flipping the second pass, the result would be the one-pass map again).
    def fake(x):
        ramp = torch.linspace(0, 1, x.shape[-1]).expand(x.shape[0], 1, *x.shape[-2:])
        return torch.cat([ramp, torch.full_like(ramp, 0.45), torch.full_like(ramp, -10.0)], dim=1), None

    pipe = seg_pipeline(components, fake)
    one_pass = pipe(torch.rand(1, 3, 2, 6), processing_resolution=0).prediction[0, 0]
    assert one_pass.tolist() == [1, 1, 1, 0, 0, 0]  # ramp 0, .2, .4 | .6, .8, 1
    assert pipe(torch.rand(1, 3, 2, 6), processing_resolution=0, tta=True).prediction[0, 0].tolist() == [0] * 6


def test_segmentation_multi_scale_averages_probabilities(components):
    # At half size the model is sure of class 0 (logits 10 vs 0); at full and 1.5x size it leans to class 1
    # (0 vs 1). Scale 1 alone: class 1; scales 0.5, 1, 1.5: p0 = (1.0 + 0.269 + 0.269) / 3 = 0.51 -> class 0.
    def fake(x):
        small = x.shape[-1] < 8
        logits = torch.tensor([10.0, 0.0, -10.0]) if small else torch.tensor([0.0, 1.0, -10.0])
        return logits[None, :, None, None].expand(x.shape[0], -1, *x.shape[-2:]), None

    pipe = seg_pipeline(components, fake)
    image = torch.rand(1, 3, 8, 8)
    assert (pipe(image, processing_resolution=0).prediction == 1).all()
    assert (pipe(image, processing_resolution=0, scales=(0.5, 1.0, 1.5)).prediction == 0).all()
    with pytest.raises(UserError, match="positive"):
        pipe(image, scales=(0.0,))


# --- inputs --------------------------------------------------------------------------------------


def test_inputs_paths_arrays_tensors_single_or_batched(components, tmp_path):
    pipe = depth_pipeline(components, lambda x: x[:, :1], default_processing_resolution=0)
    pixels = np.random.default_rng(1).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    expected = torch.from_numpy(pixels[..., 0] / 255.0 * 2 - 1).float()
    for image in (tmp_path / "a.png", str(tmp_path / "a.png"), pixels, Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1) / 255.0):
        out = pipe(image).prediction
        assert out.shape == (1, 6, 7, 1) and np.allclose(out[0, ..., 0], expected, atol=1e-6)
    assert pipe([pixels, pixels]).prediction.shape == (2, 6, 7, 1)
    with pytest.raises(UserError, match="share a size"):
        pipe([pixels, pixels[:5]])
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        pipe(torch.full((1, 3, 4, 4), 2.0))


def test_save_and_load_keep_the_inference_defaults(components, tmp_path):
    pipe = depth_pipeline(components, default_processing_resolution=64, shift_windows=2)
    pipe.save_pretrained(str(tmp_path / "m"))
    loaded = MetaPromptsDepthPipeline.from_pretrained(tmp_path / "m")
    assert (loaded.config.default_processing_resolution, loaded.config.default_tta, loaded.config.shift_windows) == (64, False, 2)
    image = torch.rand(1, 3, 40, 56)  # run at 64 x 90 (short side 64), returned at 40 x 56
    depth = loaded(image, output_type="pt").prediction
    assert depth.shape == (1, 1, 40, 56)
    assert torch.allclose(depth, pipe(image, output_type="pt").prediction, atol=1e-6)
    with pytest.raises(UserError, match="model_index.json"):
        MetaPromptsDepthPipeline.from_pretrained(tmp_path / "nothing")
