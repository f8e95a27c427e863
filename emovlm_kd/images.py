"""Reading images people actually have: any mode, format, orientation, size; clear errors for broken files.

The one image path, `prepare_image`, lives beside the model in `pipeline_emovlm_kd` (it travels to the Hub with the
pipeline) and is re-exported here; `load_image_file` opens a file, checks it and hands it to `prepare_image`.

Image size: `prepare_image(image, max_side=config.max_image_side)` scales every image down until its long side is at
most `max_image_side` (1024 by default, as the official code). `limit_processor_pixels` lowers the processor's
`max_pixels` (`size["longest_edge"]`) to what such an image can reach after the processor's rounding to multiples
of 28 (1036 x 1036 for 1024), so a caller that hands the processor raw images gets the same pixel budget.

Memory: files over `PIL.Image.MAX_IMAGE_PIXELS` (89.5 M pixels) are refused. Below it, with `max_side`, an image
whose long side reaches 4 x `max_side` is shrunk by an integer factor before any conversion, a JPEG even while it
is decoded (`decode_reduced`: libjpeg's 1/2-1/8 scaling), so the conversions hold fewer than (4 x max_side)^2
pixels; smaller images take exactly the path they always took (`prepare_image` says what is bounded).
"""

import logging
import os
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

# re-exported from the pipeline file on first use (`__getattr__`): it imports torch and transformers, which the
# dataset readers (IMAGE_EXTENSIONS, iter_image_files) must not wait for, so a bad --dataset is refused in a second
FROM_PIPELINE = ("MAX_ASPECT_RATIO", "MIN_SIDE", "decode_reduced", "fit_image", "limit_long_side", "prepare_image",
                 "to_rgb")


def __getattr__(name):
    if name in FROM_PIPELINE:
        import pipeline_emovlm_kd

        return getattr(pipeline_emovlm_kd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".jfif", ".ppm", ".pgm"}


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


def load_image_file(path, max_side=None):
    """`prepare_image` of the file at `path` (upright, RGB, long side at most `max_side`, fitted), or
    `ImageLoadError` saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError("file not found")
    if path.is_dir():
        raise ImageLoadError("is a folder")
    if path.stat().st_size == 0:
        raise ImageLoadError("empty file")
    return _load_checked(path, max_side)


def load_image_bytes(data, max_side=None):
    """`load_image_file` of an encoded image held in memory (a dataset row's `bytes`, a WebDataset member): the same
    checks and the same `prepare_image`, so a row and the file it was made from give the same pixels."""
    import io

    if not data:
        raise ImageLoadError("empty image")
    return _load_checked(io.BytesIO(data), max_side)


def _load_checked(source, max_side):
    """`prepare_image` of the image in `source` (a path or a binary file object), or `ImageLoadError`."""
    from pipeline_emovlm_kd import decode_reduced, prepare_image

    try:
        with Image.open(source) as image:  # raises DecompressionBombError above twice the limit
            _check_pixels(image.size)  # between one and two times the limit Pillow only warns
            image.seek(0)
            decode_reduced(image, max_side)  # a huge JPEG is decoded at 1/2 to 1/8 scale: see `prepare_image`
            image.load()  # decode now: a truncated or corrupt file fails here, with the file still open
            image = prepare_image(image, max_side=max_side)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"decompression bomb refused: {error}") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not an image (unidentified format)") from None
    except ImageLoadError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, EOFError, struct.error, zlib.error, ...
        raise ImageLoadError(f"unreadable image: {type(error).__name__}: {error}") from None
    return image


def _check_pixels(size):
    """`ImageLoadError` when `size` exceeds `PIL.Image.MAX_IMAGE_PIXELS` (an explicit check: thread-safe)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise ImageLoadError(
            f"decompression bomb refused: {size[0]}x{size[1]} = {size[0] * size[1]} pixels, "
            f"over the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)"
        )


def max_pixels_for_side(max_side, image_processor):
    """The most pixels the processor makes of an image whose long side is at most `max_side` (a square one, after
    its rounding of each side to a multiple of patch size x merge size)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    factor = image_processor.patch_size * image_processor.merge_size
    height, width = smart_resize(max_side, max_side, factor=factor, min_pixels=factor * factor,
                                 max_pixels=(max_side + factor) ** 2)
    return height * width


def limit_processor_pixels(processor, max_side):
    """Lower the processor's `max_pixels` (its image processor's `size["longest_edge"]`) to
    `max_pixels_for_side(max_side)`; a lower limit (e.g. a tiny test processor's) is kept. Saved with the
    processor. Returns the limit in force."""
    image_processor = getattr(processor, "image_processor", processor)
    current = image_processor.size["longest_edge"]
    if max_side is None:
        return current
    limit = max_pixels_for_side(max_side, image_processor)
    if current > limit:
        image_processor.size["longest_edge"] = limit
        logger.info("processor max_pixels lowered from %d to %d (long side <= %d px)", current, limit, max_side)
        return limit
    return current
