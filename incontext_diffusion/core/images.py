"""Image I/O: the one place in the toolkit that opens, converts and saves images.

Every loader goes through `open_image`, which checks the file (missing, folder, empty, not an
image, truncated or corrupt, too many pixels) and raises a one-line `UserError` naming the path
and the fix. Conventions:

- `load_rgb` gives 8-bit RGB for the model: transparency is composited on white, CMYK and gray
  are converted, 16-bit gray is scaled to 8 bit. It resizes with LANCZOS.
- `load_map` gives the raw values of a map (labels, depth, edges) as a numpy array: 16-bit stays
  16-bit, palette images give their indices (class ids). It resizes with NEAREST, so labels and
  invalid-depth zeros are never blended.
- Sizes are (width, height), as in PIL; an int means a square.
- Tensors are CHW float32 in `value_range` (default -1..1, what diffusion VAEs expect); numpy
  images are HxW or HxWxC.
"""

import os
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from incontext_diffusion.errors import UserError, user_os_error

# Default pixel limit against decompression bombs: a small file can claim a huge canvas and
# exhaust memory when decoded. 64 MP is well above any training or inference size we use.
# Overridable per call (max_pixels=) or for a whole run with the ICD_MAX_PIXELS variable.
MAX_PIXELS = 64_000_000

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

PathLike = str | os.PathLike


def _pixel_limit(max_pixels: int | None) -> int:
    if max_pixels is not None:
        return max_pixels
    value = os.environ.get("ICD_MAX_PIXELS")
    if value is None:
        return MAX_PIXELS
    if not value.isdigit() or int(value) == 0:
        raise UserError(f"ICD_MAX_PIXELS must be a positive whole number of pixels, got {value!r}")
    return int(value)


def open_image(path: PathLike, *, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode one image file, with EXIF orientation applied and its mode kept.

    `max_pixels` defaults to ICD_MAX_PIXELS if set, else `MAX_PIXELS`; the size is checked from
    the header, before decoding. Raises `UserError` for any file problem.
    """
    path = Path(path)
    limit = _pixel_limit(max_pixels)
    if not path.exists():
        raise UserError(f"image not found: '{path}'; check the path and its spelling")
    if path.is_dir():
        raise UserError(f"'{path}' is a folder, not an image file; pass one image file inside it")
    if path.stat().st_size == 0:
        raise UserError(f"image file '{path}' is empty (0 bytes); re-export or re-download it")
    try:
        # Pillow warns above its own soft limit; our check below, on the same header size, is the
        # one that decides, so the warning would only be noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if width * height > limit:
                raise UserError(
                    f"image '{path}' is {width}x{height} = {width * height / 1e6:.1f} MP, above "
                    f"the limit of {limit / 1e6:.1f} MP; if you trust the file, raise it with "
                    f"ICD_MAX_PIXELS={width * height} (or max_pixels= in Python)"
                )
            image.load()
            return ImageOps.exif_transpose(image)
    except PermissionError:
        raise UserError(
            f"cannot read image '{path}': permission denied; fix the file's permissions"
        ) from None
    except UnidentifiedImageError:
        raise UserError(
            f"'{path}' is not an image Pillow can read; use a PNG, JPEG, WebP, BMP or TIFF file"
        ) from None
    except Image.DecompressionBombError as error:
        raise UserError(
            f"image '{path}' is above Pillow's hard pixel limit ({error}); downscale it first"
        ) from None
    except (OSError, SyntaxError, EOFError, ValueError) as error:
        # A file cut short fails here: in the header (at open) or in the pixel data (at load).
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"image '{path}' is truncated or corrupt ({reason}); re-export or re-download it"
        ) from None


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    # Pillow's own I;16 -> L conversion clips at 255 instead of scaling, so scale by hand.
    values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
    return Image.fromarray(np.round(values / 257).astype(np.uint8))


def _size_tuple(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def load_rgb(
    source: PathLike | Image.Image | np.ndarray,
    *,
    size: int | tuple[int, int] | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Load a file, PIL image or HxWx3 uint8 array as 8-bit RGB, resized with LANCZOS if `size`.

    Transparent pixels (RGBA, LA, palette or gray with a transparent colour) are composited on
    white; 16-bit and 32-bit integer gray ("I;16*", "I") is scaled from 0..65535 to 0..255.
    """
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ValueError(f"load_rgb expects HxWx3 uint8, got {source.dtype} {source.shape}")
        image = Image.fromarray(source)
    elif isinstance(source, Image.Image):
        image = source
    else:
        image = open_image(source, max_pixels=max_pixels)

    if image.mode.startswith("I"):
        image = _to_8bit_gray(image)
    if image.has_transparency_data:  # an alpha band, or a transparent colour in image.info
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("RGB")  # no-op copy for RGB; gray expanded, CMYK converted

    if size is not None and image.size != _size_tuple(size):
        image = image.resize(_size_tuple(size), Image.Resampling.LANCZOS)
    return image


def load_map(
    path: PathLike, *, size: int | tuple[int, int] | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Load a map (labels, depth, edges, normals) with its values kept, resized with NEAREST.

    Returns HxW uint8 for "L" and "P" (palette indices, i.e. class ids) and "1" (0/255), HxW
    uint16 for 16-bit ("I;16*", and "I" when its values fit), HxW float32 for "F", the gray
    channel of "LA", and HxWx3 uint8 for every colour mode (alpha dropped, not composited).
    """
    image = open_image(path, max_pixels=max_pixels)
    if size is not None and image.size != _size_tuple(size):
        image = image.resize(_size_tuple(size), Image.Resampling.NEAREST)

    if image.mode in ("L", "P"):
        return np.array(image)
    if image.mode == "1":
        return np.array(image.convert("L"))
    if image.mode == "LA":
        return np.array(image.getchannel("L"))
    if image.mode == "F":
        return np.array(image, dtype=np.float32)
    if image.mode.startswith("I"):
        values = np.array(image)
        if values.min() < 0 or values.max() > 65535:
            raise UserError(
                f"map '{path}' has values outside 0..65535 (32-bit image); save it as a 16-bit PNG"
            )
        return values.astype(np.uint16)  # also turns big-endian "I;16B" into native order
    return np.array(image.convert("RGB"))


def load_depth_png(path: PathLike, scale: float, *, max_pixels: int | None = None) -> np.ndarray:
    """Load a 16-bit depth PNG as float32 metres = value / scale (NYUv2: 1000, KITTI: 256).

    0 means "no measurement" and stays 0.
    """
    if scale <= 0:
        raise UserError(f"depth scale must be positive (NYUv2: 1000, KITTI: 256), got {scale}")
    values = load_map(path, max_pixels=max_pixels)
    if values.dtype != np.uint16:
        raise UserError(
            f"depth map '{path}' is not a 16-bit single-channel image (read as {values.dtype}, "
            f"shape {values.shape}); save depth as a 16-bit PNG, e.g. with save_depth_png"
        )
    return values.astype(np.float32) / np.float32(scale)


def depth_to_uint16(depth_m: np.ndarray, scale: float = 1000.0) -> np.ndarray:
    """round(depth * scale) as uint16, clipped to 0..65535; non-finite or negative depths become 0 (invalid)."""
    values = np.nan_to_num(np.round(np.asarray(depth_m, dtype=np.float64) * scale), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(values, 0, 65535).astype(np.uint16)


def save_depth_png(path: PathLike, depth_m: np.ndarray, scale: float = 1000.0, *, overwrite: bool = False) -> None:
    """Save HxW depth in metres as a 16-bit PNG of round(depth * scale), clipped to 0..65535.

    Non-finite or negative depths are written as 0 (invalid). The write is atomic.
    """
    if Path(path).suffix.lower() != ".png":
        raise UserError(f"depth maps are saved as 16-bit PNG; use a .png path instead of '{path}'")
    depth = np.asarray(depth_m, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"save_depth_png expects an HxW array, got shape {depth.shape}")
    save_image(Image.fromarray(depth_to_uint16(depth, scale)), path, overwrite=overwrite)


def check_output_path(path: PathLike, *, overwrite: bool = False, what: str = "output") -> Path:
    """Refuse an output path that cannot be written, before any long work starts.

    An existing file is refused unless `overwrite` (the toolkit never replaces a result silently);
    a path under a file, or in a folder that cannot be created or written, is refused too.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder: name a file, e.g. '{path / 'out.png'}'")
    if path.exists() and not overwrite:
        raise UserError(f"{what} '{path}' already exists: pass --overwrite to replace it, or choose another path")
    check_output_folder(path.parent, what=what)
    return path


def check_output_folder(folder: PathLike, *, what: str = "output") -> Path:
    """The folder exists or can be made, and can be written (checked before long work starts)."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path.cwd())  # what mkdir would start from
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{what} folder '{folder}': '{existing}' is a file, not a folder: choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} folder '{folder}' cannot be written (no permission on '{existing}'): choose a folder you can write to")
    return folder


def check_output_target(path: PathLike, *, overwrite: bool = False) -> Path:
    """`--out` of `icd infer`: a file when it has an extension (checked as by `check_output_path`), else a folder."""
    path = Path(path)
    return check_output_path(path, overwrite=overwrite, what="--out") if path.suffix else check_output_folder(path, what="--out")


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """A hidden temp path beside `path` to write; renamed over `path` only when the block completes
    (so a crash never leaves a half-written file), removed otherwise. OSErrors name the path."""
    # Same folder, so os.replace is a rename on one file system; the leading dot hides it from list_images.
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temp
        os.replace(temp, path)
    except OSError as error:
        raise user_os_error(error, path) from None
    finally:
        if temp.exists():
            temp.unlink()


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write a small text file (results, state) through a temp file and a rename; OSErrors name the path."""
    with atomic_write(Path(path)) as temp:
        temp.write_text(text)


def save_image(image: Image.Image, path: PathLike, *, overwrite: bool = False) -> None:
    """Save atomically: write a hidden temp file in the same folder, then rename it over `path`.

    A crash or error mid-write never leaves a half-written file at `path`. An existing `path` is
    refused unless `overwrite` (the CLI's --overwrite). The format follows the extension; missing
    parent folders are created. File-system failures (full disk, permissions, a file where a folder
    should be) are one-line `UserError`s naming the path.
    """
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise UserError(
            f"cannot save '{path}': unknown image extension '{path.suffix}'; use .png or .jpg"
        )
    if path.exists() and not overwrite:
        raise UserError(f"'{path}' already exists: pass --overwrite to replace it, or choose another path")
    # open(..., "xb") keeps the usual permissions (unlike mkstemp's 0600).
    with atomic_write(path) as temp, open(temp, "xb") as file:
        image.save(file, format=image_format)
        file.flush()
        os.fsync(file.fileno())


def to_tensor(image: Image.Image, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """An "L", "RGB" or "RGBA" image as a CHW float32 tensor with 0..255 mapped to `value_range`."""
    if image.mode not in ("L", "RGB", "RGBA"):
        raise ValueError(f"to_tensor expects an L, RGB or RGBA image, not {image.mode}; use load_rgb")
    pixels = np.array(image, dtype=np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    low, high = value_range
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous() * (high - low) + low


def to_pil(
    array: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)
) -> Image.Image:
    """A CHW tensor or an HxWxC / HxW numpy array (C = 1, 3 or 4) as a PIL image.

    uint8 input is taken as pixels; anything else as floats in `value_range`, rounded and clipped.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = array if array.dtype == torch.uint8 else array.float()  # numpy has no bfloat16
        array = (array.permute(1, 2, 0) if array.ndim == 3 else array).numpy()
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"to_pil expects CHW or HxWxC with 1, 3 or 4 channels, got {array.shape}")
    if array.dtype != np.uint8:
        low, high = value_range
        scaled = (array.astype(np.float32) - low) / (high - low) * 255.0
        array = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


# Pictures a person reads: small cells are enlarged (nearest neighbour, so pixels stay pixels) until
# their longer side is at least this, and labels are drawn at a size that stays legible there.
MIN_CELL_SIDE = 192
LABEL_FONT_SIZE = 14
BOX_COLOURS = ((255, 40, 40), (40, 200, 40), (40, 120, 255), (255, 200, 0), (220, 60, 220), (0, 210, 210))


def upscale_factor(width: int, height: int, min_side: int = MIN_CELL_SIDE) -> int:
    """The smallest whole factor that brings the longer side to `min_side` (1 if it is already there)."""
    return max(1, -(-min_side // max(width, height)))


def upscale(image: Image.Image, factor: int) -> Image.Image:
    """Nearest-neighbour enlargement by a whole factor: each pixel becomes a factor x factor block."""
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _font(size: int = LABEL_FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def wrap_label(text: str, width: int, font) -> list[str]:
    """`text` in lines no wider than `width` pixels: broken at spaces, long words at characters."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
            continue
        while font.getlength(word) > width and len(word) > 1:  # a word wider than the cell: cut it
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def _label_block(lines: list[str], width: int, height: int, font, line_height: int) -> Image.Image:
    block = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(block)
    for i, line in enumerate(lines):
        x = max(0, (width - font.getlength(line)) / 2)  # centred over the cell
        draw.text((x, 2 + i * line_height), line, fill="black", font=font)
    return block


def make_grid(
    images: list[Image.Image] | list[list[Image.Image]],
    labels: list[str] | None = None,
    ncols: int | None = None,
    gap: int = 4,
    *,
    column_labels: list[str] | None = None,
    row_labels: list[str] | None = None,
    min_cell: int = MIN_CELL_SIDE,
) -> Image.Image:
    """Lay images out in a white RGB grid a person can read.

    `images` is a flat list (split into rows of `ncols`, default one row) or a list of rows.
    Cells are the size of the largest image; smaller images are centred. Small cells are enlarged
    by a whole factor (nearest neighbour) until their longer side is at least `min_cell` (pass 0 to
    keep the pixels' size). Labels are wrapped to the cell width, never cut:
    - `labels`: one per image in reading order, above each image;
    - `column_labels`: one per column, once above the first row;
    - `row_labels`: one per row, in a strip to the left.
    """
    if images and isinstance(images[0], list):
        if ncols is not None:
            raise ValueError("make_grid: pass ncols only with a flat list of images")
        rows = images
    else:
        ncols = ncols or len(images)
        rows = [images[i : i + ncols] for i in range(0, len(images), ncols)]
    flat = [image for row in rows for image in row]
    if not flat:
        raise ValueError("make_grid needs at least one image")
    ncols = max(len(row) for row in rows)
    if labels is not None and len(labels) != len(flat):
        raise ValueError(f"make_grid got {len(labels)} labels for {len(flat)} images")
    if column_labels is not None and len(column_labels) != ncols:
        raise ValueError(f"make_grid got {len(column_labels)} column labels for {ncols} columns")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"make_grid got {len(row_labels)} row labels for {len(rows)} rows")

    factor = upscale_factor(max(i.width for i in flat), max(i.height for i in flat), min_cell) if min_cell else 1
    flat = [upscale(load_rgb(image), factor) for image in flat]
    cell_w = max(image.width for image in flat)
    cell_h = max(image.height for image in flat)
    font = _font()
    line_height = font.getbbox("Ag")[3] + 2

    def lines_of(texts: list[str] | None, width: int) -> list[list[str]]:
        return [wrap_label(text, width - 4, font) for text in texts] if texts is not None else []

    def block_height(wrapped: list[list[str]]) -> int:
        return max(len(lines) for lines in wrapped) * line_height + 4 if wrapped else 0

    cell_lines = lines_of(labels, cell_w)
    column_lines = lines_of(column_labels, cell_w)
    label_h, header_h = block_height(cell_lines), block_height(column_lines)
    # The row-label strip is as wide as its longest word, at most one cell.
    row_w = min(cell_w, max(int(font.getlength(w)) for t in row_labels for w in t.split() or [""]) + 8) if row_labels else 0
    row_lines = lines_of(row_labels, row_w)
    left = row_w + gap if row_labels else 0
    top = header_h + gap if column_labels else 0
    width = left + ncols * cell_w + (ncols - 1) * gap
    height = top + len(rows) * (label_h + cell_h) + (len(rows) - 1) * gap
    grid = Image.new("RGB", (width, height), "white")
    for c, lines in enumerate(column_lines):
        grid.paste(_label_block(lines, cell_w, header_h, font, line_height), (left + c * (cell_w + gap), 0))
    index = 0
    for r, row in enumerate(rows):
        y = top + r * (label_h + cell_h + gap)
        if row_labels:
            strip = _label_block(row_lines[r], row_w, len(row_lines[r]) * line_height + 4, font, line_height)
            grid.paste(strip, (0, y + label_h + (cell_h - strip.height) // 2))
        for c in range(len(row)):
            image, x = flat[index], left + c * (cell_w + gap)
            if labels is not None:
                grid.paste(_label_block(cell_lines[index], cell_w, label_h, font, line_height), (x, y))
            grid.paste(image, (x + (cell_w - image.width) // 2, y + label_h + (cell_h - image.height) // 2))
            index += 1
    return grid


def draw_boxes(
    image: Image.Image,
    boxes_xyxy,
    scores=None,
    labels: list[str] | None = None,
    *,
    min_side: int = MIN_CELL_SIDE,
    width: int | None = None,
) -> Image.Image:
    """A copy of `image` (RGB, enlarged like a grid cell) with each box drawn and captioned.

    `boxes_xyxy` are (x0, y0, x1, y1) in the input image's pixels (a list, array or tensor);
    the caption is the box's label and its score with two decimals. Lines are at least 2 px wide.
    """
    factor = upscale_factor(image.width, image.height, min_side) if min_side else 1
    canvas = upscale(load_rgb(image), factor).copy()
    boxes = np.asarray(boxes_xyxy.tolist() if hasattr(boxes_xyxy, "tolist") else boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    score_list = [] if scores is None else np.asarray(scores.tolist() if hasattr(scores, "tolist") else scores, dtype=np.float64).reshape(-1).tolist()
    if scores is not None and len(score_list) != len(boxes):
        raise ValueError(f"draw_boxes got {len(score_list)} scores for {len(boxes)} boxes")
    if labels is not None and len(labels) != len(boxes):
        raise ValueError(f"draw_boxes got {len(labels)} labels for {len(boxes)} boxes")
    line = width or max(2, round(max(canvas.size) / 128))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for i, box in enumerate(boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        x0, y0, x1, y1 = (float(v) * factor for v in box)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=line)
        caption = " ".join(part for part in (labels[i] if labels else "", f"{score_list[i]:.2f}" if score_list else "") if part)
        if caption:
            left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
            text_y = y0 - (bottom - top) - 4 if y0 - (bottom - top) - 4 >= 0 else y0 + line  # above the box, or inside at the top
            draw.rectangle((x0, text_y, x0 + right + 4, text_y + bottom + 2), fill=colour)
            draw.text((x0 + 2, text_y), caption, fill="black", font=font)
    return canvas


def overlay_mask(image: Image.Image, mask, colour: tuple[int, int, int] = (255, 40, 40), alpha: float = 0.5) -> Image.Image:
    """`image` (RGB) with `mask` laid over it: pixel = (1 - alpha * m) * image + alpha * m * colour.

    `mask` is HxW, boolean or in 0..1 (a soft mask blends in proportion), as an array, tensor or
    "L"/"1" image; a mask of another size is resized with NEAREST to the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay_mask: alpha must be in 0..1, got {alpha}")
    rgb = load_rgb(image)
    if isinstance(mask, Image.Image):
        values = np.asarray(mask.convert("L"), dtype=np.float64) / 255.0
    else:
        values = np.asarray(mask.detach().cpu().float().numpy() if isinstance(mask, torch.Tensor) else mask, dtype=np.float64)
    values = np.squeeze(values)
    if values.ndim != 2:
        raise ValueError(f"overlay_mask expects an HxW mask, got shape {values.shape}")
    if values.shape != (rgb.height, rgb.width):
        values = np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize(rgb.size, Image.Resampling.NEAREST))
    weight = alpha * np.clip(values, 0.0, 1.0)[:, :, None]  # HxWx1
    blended = (1.0 - weight) * np.asarray(rgb, dtype=np.float64) + weight * np.asarray(colour, dtype=np.float64)
    return Image.fromarray(np.round(blended).astype(np.uint8))


def expand_image_inputs(items: list[PathLike]) -> list[Path]:
    """`--image` values -> image files: each a file, a folder (its images, sorted) or a glob pattern."""
    import glob

    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += list_images(path)
        elif path.exists():
            files.append(path)
        elif glob.has_magic(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(item)) if Path(m).suffix.lower() in IMAGE_EXTENSIONS and Path(m).is_file())
            if not matches:
                raise UserError(f"no images match '{item}': check the pattern (files ending in {', '.join(IMAGE_EXTENSIONS)})")
            files += matches
        else:
            raise UserError(f"image '{item}' does not exist: pass an image file, a folder of images or a glob such as 'photos/*.jpg'")
    return files


def list_images(folder: PathLike) -> list[Path]:
    """The image files directly in `folder` (by extension, any case), sorted by name.

    Hidden files are skipped: temp files of `save_image` and macOS "._" metadata files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"image folder '{folder}' {what}; pass the folder that holds the images")
    found = sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and path.is_file()
    )
    if not found:
        raise UserError(
            f"no images in '{folder}'; expected files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
    return found
