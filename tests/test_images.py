"""Tests for core/images.py: each unusual or broken input is built here, in tmp_path."""

import warnings

import numpy as np
import pytest
from PIL import Image

from incontext_diffusion.core.images import (
    list_images,
    load_depth_png,
    load_map,
    load_rgb,
    make_grid,
    open_image,
    save_depth_png,
    save_image,
    to_pil,
    to_tensor,
)
from incontext_diffusion.errors import UserError

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def noise(size=(64, 48), seed=0):
    """Random RGB pixels: they do not compress, so a cut file is cut inside the pixel data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixel(image, xy=(0, 0)):
    return tuple(image.getpixel(xy))


# --- modes -------------------------------------------------------------------------------------


def test_gray_is_expanded_to_rgb_and_kept_as_a_map(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "gray.png")
    assert pixel(load_rgb(tmp_path / "gray.png")) == (77, 77, 77)
    values = load_map(tmp_path / "gray.png")
    assert values.dtype == np.uint8 and values.shape == (4, 5) and values[0, 0] == 77


def test_la_is_composited_on_white(tmp_path):
    image = Image.new("LA", (2, 1), (100, 255))
    image.putpixel((1, 0), (0, 0))  # fully transparent black
    image.save(tmp_path / "la.png")
    rgb = load_rgb(tmp_path / "la.png")
    assert pixel(rgb, (0, 0)) == (100, 100, 100) and pixel(rgb, (1, 0)) == WHITE
    assert load_map(tmp_path / "la.png").tolist() == [[100, 0]]


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    image.putpixel((1, 0), (255, 0, 0, 128))
    image.putpixel((2, 0), (0, 0, 0, 0))
    image.save(tmp_path / "rgba.png")
    rgb = load_rgb(str(tmp_path / "rgba.png"))
    assert rgb.mode == "RGB" and pixel(rgb, (0, 0)) == RED and pixel(rgb, (2, 0)) == WHITE
    half = pixel(rgb, (1, 0))  # 0.5 red over white = (255, 127, 127)
    assert half[0] == 255 and abs(half[1] - 127) <= 1 and abs(half[2] - 127) <= 1
    assert load_map(tmp_path / "rgba.png").shape == (1, 3, 3)  # maps drop alpha


def palette_image():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 - 2) * 3)
    image.putpixel((1, 0), 1)
    return image


def test_palette_without_transparency(tmp_path):
    palette_image().save(tmp_path / "p.png")
    rgb = load_rgb(tmp_path / "p.png")
    assert pixel(rgb, (0, 0)) == (0, 0, 0) and pixel(rgb, (1, 0)) == RED
    assert load_map(tmp_path / "p.png").tolist() == [[0, 1]]  # indices = class ids


def test_palette_with_transparency(tmp_path):
    palette_image().save(tmp_path / "p.png", transparency=0)
    assert open_image(tmp_path / "p.png").mode == "P"  # open_image keeps the mode
    rgb = load_rgb(tmp_path / "p.png")
    assert pixel(rgb, (0, 0)) == WHITE and pixel(rgb, (1, 0)) == RED


@pytest.mark.parametrize("ext", ["tif", "jpg"])
def test_cmyk_is_converted(tmp_path, ext):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / f"cmyk.{ext}")
    assert open_image(tmp_path / f"cmyk.{ext}").mode == "CMYK"
    red = pixel(load_rgb(tmp_path / f"cmyk.{ext}"))
    assert red[0] > 245 and red[1] < 10 and red[2] < 10


VALUES_16 = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16)


def test_16bit_png_keeps_its_values(tmp_path):
    Image.fromarray(VALUES_16).save(tmp_path / "d.png")
    assert open_image(tmp_path / "d.png").mode == "I;16"
    values = load_map(tmp_path / "d.png")
    assert values.dtype == np.uint16 and np.array_equal(values, VALUES_16)
    # For RGB use, 16 bit is scaled to 8 bit (not clipped): 40000 / 257 = 155.6.
    assert [pixel(load_rgb(tmp_path / "d.png"), (x, 0))[0] for x in range(5)] == [0, 1, 1, 156, 255]


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_other_16bit_modes_keep_their_values(tmp_path, mode):
    # Pillow writes these as TIFF; "I" is also how older Pillow opened 16-bit PNGs.
    if mode == "I":
        image = Image.fromarray(VALUES_16.astype(np.int32))
    else:
        image = Image.frombytes(mode, (5, 1), VALUES_16.astype(">u2").tobytes())
    image.save(tmp_path / "d.tif")
    assert open_image(tmp_path / "d.tif").mode == mode
    values = load_map(tmp_path / "d.tif")
    assert values.dtype == np.uint16 and np.array_equal(values, VALUES_16)


def test_32bit_map_out_of_16bit_range_is_refused(tmp_path):
    Image.fromarray(np.array([[70000]], dtype=np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(UserError, match="outside 0..65535"):
        load_map(tmp_path / "big.tif")


def test_depth_png_round_trip_in_metres(tmp_path):
    depth = np.array([[0.0, 1.5, 10.0], [np.nan, -1.0, 100.0]], dtype=np.float32)
    save_depth_png(tmp_path / "depth.png", depth, scale=1000)
    raw = load_map(tmp_path / "depth.png")
    assert raw.tolist() == [[0, 1500, 10000], [0, 0, 65535]]  # invalid -> 0, far -> clipped
    metres = load_depth_png(tmp_path / "depth.png", scale=1000)
    assert metres.dtype == np.float32 and np.allclose(metres[0], [0, 1.5, 10.0])
    assert np.isclose(load_depth_png(tmp_path / "depth.png", scale=256)[0, 1], 1500 / 256)


def test_8bit_depth_png_is_refused(tmp_path):
    Image.new("L", (2, 2), 9).save(tmp_path / "depth8.png")
    with pytest.raises(UserError, match="not a 16-bit"):
        load_depth_png(tmp_path / "depth8.png", scale=1000)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (40, 20), RED).save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (20, 40)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


# --- sizes and inputs --------------------------------------------------------------------------


def test_load_rgb_accepts_images_and_arrays_and_resizes(tmp_path):
    image = noise((30, 20))
    from_array = load_rgb(np.asarray(image), size=16)
    assert from_array.size == (16, 16) and from_array.mode == "RGB"
    assert load_rgb(image, size=(12, 8)).size == (12, 8)
    assert load_rgb(image) is not image  # a copy, never the caller's object
    with pytest.raises(ValueError):
        load_rgb(np.zeros((4, 4), dtype=np.uint8))


def test_load_map_resizes_with_nearest(tmp_path):
    labels = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "labels.png")
    resized = load_map(tmp_path / "labels.png", size=(5, 7))
    assert resized.shape == (7, 5) and set(np.unique(resized)) == {1, 2, 3, 4}


# --- broken files: each its own message, naming the path -----------------------------------------


def broken_files(tmp_path):
    """One path per kind of problem, with the words its message must contain."""
    noise().save(tmp_path / "good.png")
    noise().save(tmp_path / "good.jpg", quality=95)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    (tmp_path / "folder.png").mkdir()
    for name in ("good.png", "good.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut_header.png").write_bytes((tmp_path / "good.png").read_bytes()[:20])
    return {
        "missing": (tmp_path / "missing.png", "not found"),
        "empty": (tmp_path / "empty.png", "empty (0 bytes)"),
        "text": (tmp_path / "notes.png", "not an image"),
        "folder": (tmp_path / "folder.png", "is a folder"),
        "cut png": (tmp_path / "cut_good.png", "truncated or corrupt"),
        "cut jpg": (tmp_path / "cut_good.jpg", "truncated or corrupt"),
        "cut header": (tmp_path / "cut_header.png", "truncated or corrupt"),
        "too large": (tmp_path / "good.png", "above the limit"),
    }


def test_each_broken_file_has_its_own_one_line_message(tmp_path):
    messages = {}
    for kind, (path, words) in broken_files(tmp_path).items():
        with pytest.raises(UserError) as caught:
            open_image(path, max_pixels=1000 if kind == "too large" else None)
        message = str(caught.value)
        assert words in message and str(path) in message and "\n" not in message, kind
        messages[kind] = message.replace(str(path), "PATH")
    # The truncated files share a kind; every other kind reads differently.
    kinds = {message for kind, message in messages.items() if kind not in ("cut jpg", "cut header")}
    assert len(kinds) == 6
    # The loaders that build on open_image report the same errors.
    with pytest.raises(UserError, match="empty"):
        load_rgb(tmp_path / "empty.png")
    with pytest.raises(UserError, match="not an image"):
        load_map(tmp_path / "notes.png")


def test_pixel_limit_names_size_and_how_to_raise_it(tmp_path, monkeypatch):
    noise((40, 30)).save(tmp_path / "big.png")
    with pytest.raises(UserError, match=r"40x30.*ICD_MAX_PIXELS=1200"):
        open_image(tmp_path / "big.png", max_pixels=1199)
    assert open_image(tmp_path / "big.png", max_pixels=1200).size == (40, 30)
    monkeypatch.setenv("ICD_MAX_PIXELS", "1000")  # the default for a whole run
    with pytest.raises(UserError, match="above the limit"):
        load_rgb(tmp_path / "big.png")
    monkeypatch.setenv("ICD_MAX_PIXELS", "lots")
    with pytest.raises(UserError, match="ICD_MAX_PIXELS must be"):
        load_rgb(tmp_path / "big.png")


def test_pillow_bomb_error_and_warning_are_handled(tmp_path, monkeypatch):
    noise((8, 8)).save(tmp_path / "bomb.png")  # 64 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # Pillow refuses above 2 x 20
    with pytest.raises(UserError, match="hard pixel limit") as caught:
        open_image(tmp_path / "bomb.png", max_pixels=10**9)
    assert str(tmp_path / "bomb.png") in str(caught.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # Pillow only warns: our limit decides
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_image(tmp_path / "bomb.png", max_pixels=100).size == (8, 8)
        with pytest.raises(UserError, match="above the limit"):
            open_image(tmp_path / "bomb.png", max_pixels=50)


# --- saving ------------------------------------------------------------------------------------


def test_save_image_round_trip_leaves_no_temp_files(tmp_path):
    image = noise((10, 6))
    save_image(image, tmp_path / "out" / "sample.png")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["sample.png"]
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "out" / "sample.png")), np.asarray(image))
    with pytest.raises(UserError, match="unknown image extension"):
        save_image(image, tmp_path / "sample.xyz")


def test_failed_save_leaves_the_existing_file_untouched(tmp_path, monkeypatch):
    target = tmp_path / "sample.png"
    target.write_bytes(b"previous content")

    def broken_save(self, fp, format=None, **params):
        fp.write(b"half an image")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_image(noise(), target, overwrite=True)
    assert target.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["sample.png"]


# --- tensors and grids -------------------------------------------------------------------------


def test_tensor_round_trip():
    image = noise((7, 5))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 5, 7) and tensor.dtype.is_floating_point
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(to_pil(tensor)), np.asarray(image))
    unit = to_tensor(image, value_range=(0, 1))
    hwc = unit.numpy().transpose(1, 2, 0)  # numpy input is channels-last
    assert np.array_equal(np.asarray(to_pil(hwc, value_range=(0, 1))), np.asarray(image))
    gray = to_tensor(Image.new("L", (3, 2), 255))
    assert gray.shape == (1, 2, 3) and to_pil(gray).mode == "L"
    assert to_pil(np.full((2, 2, 3), 2.0)).getpixel((0, 0)) == WHITE  # clipped
    assert to_pil(tensor.bfloat16()).size == (7, 5)


def test_make_grid_size():
    tiles = [noise((20, 10), seed) for seed in range(5)]
    gap = 4
    grid = make_grid(tiles, ncols=3, gap=gap, min_cell=0)  # 0: cells keep their pixels' size
    assert grid.size == (3 * 20 + 2 * gap, 2 * 10 + gap)
    rows = make_grid([[tiles[0], Image.new("L", (8, 8))], [tiles[1]]], gap=gap, min_cell=0)
    assert rows.size == (2 * 20 + gap, 2 * 10 + gap) and rows.mode == "RGB"
    labelled = make_grid(tiles[:2], labels=["example", "a long caption " * 5], gap=gap, min_cell=0)
    assert labelled.width == 2 * 20 + gap and labelled.height > 10
    with pytest.raises(ValueError):
        make_grid(tiles, labels=["only one"])


def test_make_grid_enlarges_small_cells_by_a_whole_factor():
    # Longer side 20 -> factor ceil(192 / 20) = 10: each cell is 200 x 100, each pixel a 10 x 10 block.
    tiles = [noise((20, 10), seed) for seed in range(2)]
    grid = make_grid(tiles, gap=4)
    assert grid.size == (2 * 200 + 4, 100)
    assert grid.getpixel((3 * 10 + 9, 5 * 10)) == tiles[0].getpixel((3, 5))  # the block of pixel (3, 5)
    assert grid.getpixel((204 + 19 * 10, 9 * 10 + 9)) == tiles[1].getpixel((19, 9))
    big = noise((256, 64))
    assert make_grid([big]).size == (256, 64)  # already large enough: unchanged


def test_make_grid_wraps_long_labels_instead_of_cutting_them():
    from incontext_diffusion.core.images import _font, wrap_label

    font = _font()
    lines = wrap_label("example source image with a long caption", 100, font)
    assert len(lines) > 1 and " ".join(lines) == "example source image with a long caption"
    assert all(font.getlength(line) <= 100 for line in lines)
    assert "".join(wrap_label("abcdefghijklmnopqrstuvwxyz" * 3, 60, font)) == "abcdefghijklmnopqrstuvwxyz" * 3
    tiles = [Image.new("RGB", (64, 64), RED) for _ in range(2)]
    one_line = make_grid(tiles, column_labels=["a", "b"])
    wrapped = make_grid(tiles, column_labels=["a", "a caption far too long for one line of a 192 px cell"])
    assert wrapped.height > one_line.height and wrapped.width == one_line.width == 2 * 192 + 4
    with pytest.raises(ValueError, match="column labels"):
        make_grid(tiles, column_labels=["only one"])


def test_make_grid_row_labels_sit_left_of_the_rows():
    tiles = [[Image.new("RGB", (64, 64), RED)], [Image.new("RGB", (64, 64), RED)]]
    plain = make_grid(tiles)
    labelled = make_grid(tiles, row_labels=["input", "output"])
    assert labelled.height == plain.height and labelled.width > plain.width
    assert labelled.getpixel((labelled.width - 1, 0)) == RED and labelled.getpixel((0, 0)) == WHITE


def test_draw_boxes_draws_two_pixel_lines_at_the_enlarged_size():
    from incontext_diffusion.core.images import draw_boxes

    image = Image.new("RGB", (64, 64), (0, 0, 0))
    drawn = draw_boxes(image, [[16, 16, 48, 48]], scores=[0.87], labels=["cube"])
    assert drawn.size == (192, 192)  # 64 px enlarged by 3
    colour = drawn.getpixel((48, 100))  # the left edge of the box, x0 = 16 * 3 = 48
    assert colour != (0, 0, 0) and drawn.getpixel((49, 100)) == colour  # at least 2 px wide
    assert drawn.getpixel((50, 100)) == (0, 0, 0) and drawn.getpixel((100, 100)) == (0, 0, 0)  # inside stays
    assert drawn.getpixel((143, 100)) == colour  # right edge: x1 * 3 - 1
    assert image.getpixel((16, 16)) == (0, 0, 0)  # the input is not drawn on
    with pytest.raises(ValueError, match="scores"):
        draw_boxes(image, [[0, 0, 4, 4]], scores=[0.1, 0.2])


def test_overlay_mask_blends_the_colour_where_the_mask_is():
    from incontext_diffusion.core.images import overlay_mask

    image = Image.new("RGB", (4, 2), (100, 100, 100))
    mask = np.zeros((2, 4))
    mask[0, 1] = 1.0
    mask[1, 2] = 0.5
    out = overlay_mask(image, mask, colour=(255, 0, 0), alpha=0.25)
    assert out.getpixel((0, 0)) == (100, 100, 100)
    assert out.getpixel((1, 0)) == (139, 75, 75)  # 0.75 * 100 + 0.25 * 255 = 138.75; 0.75 * 100 = 75
    assert out.getpixel((2, 1)) == (119, 88, 88)  # weight 0.125: 87.5 + 31.875 = 119.375; 87.5 -> 88
    small = overlay_mask(Image.new("RGB", (4, 4), (0, 0, 0)), np.ones((2, 2), bool), colour=(0, 200, 0), alpha=1.0)
    assert small.getpixel((3, 3)) == (0, 200, 0)  # a smaller mask is resized to the image
    with pytest.raises(ValueError, match="alpha"):
        overlay_mask(image, mask, alpha=2.0)


def test_save_image_refuses_an_existing_file_unless_overwrite(tmp_path):
    target = tmp_path / "out.png"
    save_image(Image.new("RGB", (2, 2), RED), target)
    with pytest.raises(UserError, match="already exists: pass --overwrite"):
        save_image(Image.new("RGB", (2, 2), WHITE), target)
    assert pixel(load_rgb(target)) == RED
    save_image(Image.new("RGB", (2, 2), WHITE), target, overwrite=True)
    assert pixel(load_rgb(target)) == WHITE
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="a_file"):
        save_image(Image.new("RGB", (2, 2), RED), tmp_path / "a_file" / "out.png")


def test_list_images(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in"):
        list_images(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        list_images(tmp_path / "nowhere")

