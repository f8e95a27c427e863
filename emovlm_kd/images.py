"""Reading images people actually have: any mode, format, orientation, size; clear errors for broken files."""

import logging
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".jfif", ".ppm", ".pgm"}
MAX_ASPECT_RATIO = 100  # Qwen2-VL's processor refuses more than 200: wider images are padded to this
MIN_SIDE = 28  # patch size x merge size: smaller images are upscaled


class ImageLoadError(ValueError):
    """An input that is not a readable image; the message says why."""


def iter_image_files(inputs):
    """Files named directly (whatever their extension) and image files found recursively in folders, sorted."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        yield Path(root) / name
        else:
            yield path


def fit_image(image, max_aspect_ratio=MAX_ASPECT_RATIO, min_side=MIN_SIDE):
    """Upscale tiny images and pad extreme aspect ratios (centred, black) so the processor accepts them."""
    width, height = image.size
    if min(width, height) < min_side:
        scale = min_side / min(width, height)
        width, height = max(min_side, round(width * scale)), max(min_side, round(height * scale))
        image = image.resize((width, height), Image.BICUBIC)
    if max(width, height) / min(width, height) > max_aspect_ratio:
        if width > height:
            canvas = Image.new("RGB", (width, -(-width // max_aspect_ratio)))
        else:
            canvas = Image.new("RGB", (-(-height // max_aspect_ratio), height))
        canvas.paste(image, ((canvas.width - width) // 2, (canvas.height - height) // 2))
        image = canvas
    return image


def load_image_file(path):
    """An upright RGB PIL image from `path`, or `ImageLoadError` saying what is wrong with the file."""
    from pipeline_emovlm_kd import to_rgb

    path = Path(path)
    if not path.exists():
        raise ImageLoadError("file not found")
    if path.is_dir():
        raise ImageLoadError("is a folder")
    if path.stat().st_size == 0:
        raise ImageLoadError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)
                image.load()
                image = ImageOps.exif_transpose(image)
                image = to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(f"decompression bomb refused: {error}") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"unreadable image: {error}") from None
    return fit_image(image)
