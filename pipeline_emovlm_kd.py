"""`image-classification` pipeline for EmoVLM-KD.

    from transformers import pipeline
    classify = pipeline(model="path/or/repo", trust_remote_code=True)
    classify("photo.jpg", top_k=3)  # [{"label": "awe", "score": 0.61}, ...]
    classify("photo.jpg", explain=True)  # each entry also has "explanation": why (one encoder pass per image)

This file travels to the Hub with the model: it imports only torch, transformers, the model's own files and the
standard library (Pillow is reached as transformers' image backend, `transformers.image_utils.PIL`).
"""

import base64
import binascii
import io
import os
import urllib.request
from typing import Any

import torch
from transformers import Pipeline, image_utils
from transformers.image_transforms import to_pil_image
from transformers.image_utils import PILImageResampling

try:
    from .configuration_emovlm_kd import MIN_IMAGE_SIDE
    from .scoring_emovlm_kd import PromptPrefixCache, prepare_inputs
except ImportError:  # imported as a plain module (not from a Hub folder)
    from configuration_emovlm_kd import MIN_IMAGE_SIDE
    from scoring_emovlm_kd import PromptPrefixCache, prepare_inputs


ORIENTATION_TAG = 0x0112
# EXIF orientation -> PIL transpose method, as `PIL.ImageOps.exif_transpose` (FLIP_LEFT_RIGHT 0, FLIP_TOP_BOTTOM 1,
# ROTATE_90 2, ROTATE_180 3, ROTATE_270 4, TRANSPOSE 5, TRANSVERSE 6); this file imports nothing but torch/transformers
EXIF_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


# Memory: an image is reduced early only when its long side reaches 2 * REDUCING_GAP * max_side (4096 px for 1024);
# smaller ones take exactly the path they always took.
REDUCING_GAP = 2  # as Pillow's `thumbnail`: an early integer reduction leaves at least this factor to the final resize
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr", "LAB", "HSV")  # what `Image.reduce` averages


def reduction_factor(size: tuple[int, int], max_side: int | None, gap: int = REDUCING_GAP) -> int:
    """The integer factor an image of `size` may be shrunk by before its final resize to a long side of `max_side`,
    leaving at least `gap` to that resize: 1 (none) while the long side is below `2 * gap * max_side` or without
    `max_side`. A reduced long side is below `1.5 * gap * max_side` (3072 px for 1024 and the default gap)."""
    if max_side is None:
        return 1
    return max(1, max(size) // (gap * max_side))


def decode_reduced(image: "PIL.Image.Image", max_side: int | None, gap: int = REDUCING_GAP) -> "PIL.Image.Image":
    """Let a JPEG that is not decoded yet (fresh from `Image.open`) decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling, `Image.draft`) when `reduction_factor` allows it, so its full-resolution pixels are never in memory; its
    long side stays at least `gap * max_side`. Changes `image` in place (use it on images you opened); any other
    image is left as it is. Returns `image`."""
    factor = reduction_factor(image.size, max_side, gap)
    if factor > 1 and image.format == "JPEG":
        width, height = image.size
        image.draft(None, (-(-width // factor), -(-height // factor)))  # a no-op once decoded
    return image


def reduce_early(image: "PIL.Image.Image", max_side: int | None, gap: int = REDUCING_GAP) -> "PIL.Image.Image":
    """`image` shrunk by `reduction_factor` (`Image.reduce`: the mean of each k x k block) in its own mode, before any
    full-size conversion; palette and 1-bit images, and images with a transparent colour, become RGB(A)/L first (a
    mean of palette indices or of a keyed colour means nothing). Returned as it is when the factor is 1 or its mode
    cannot be reduced."""
    factor = reduction_factor(image.size, max_side, gap)
    if factor == 1:
        return image
    if image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    return image.reduce(factor) if image.mode in REDUCIBLE_MODES else image


def to_rgb(image: "PIL.Image.Image", max_side: int | None = None) -> "PIL.Image.Image":
    """An upright RGB copy of a PIL image: EXIF orientation applied (once: the tag is read here, and the result
    carries none), first frame of animations, 16-bit greyscale scaled to 8 bits, transparency (alpha or a palette's
    transparent colour) composited on white. With `max_side`, an image whose long side reaches
    `2 * REDUCING_GAP * max_side` is shrunk (`reduce_early`) before the transparency and RGB conversions."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    orientation = image.getexif().get(ORIENTATION_TAG)  # read first: mode conversions drop TIFF tags
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bit before RGB
        image = image.point(lambda v: v * (1 / 256)).convert("L")
    image = reduce_early(image, max_side)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        image = image.convert("RGBA")
        background = image.copy()
        background.paste((255, 255, 255, 255), (0, 0) + image.size)
        background.alpha_composite(image)
        image = background
    image = image.convert("RGB")
    if orientation in EXIF_TRANSPOSE:
        image = image.transpose(EXIF_TRANSPOSE[orientation])
    return image


MAX_ASPECT_RATIO = 100  # Qwen2-VL's processor refuses more than 200: wider images are padded to this
MIN_SIDE = MIN_IMAGE_SIDE  # patch size x merge size: smaller images are upscaled


def fit_image(
    image: "PIL.Image.Image", max_aspect_ratio: float = MAX_ASPECT_RATIO, min_side: int = MIN_SIDE
) -> "PIL.Image.Image":
    """Pad extreme aspect ratios (centred, black), then upscale tiny images, so the processor accepts them.

    Padding first keeps a 20000x1 strip at 20000x200 instead of upscaling it to 560000x28 and padding that.
    Cropping past the edges pads with black, so no imaging library is imported here.
    """
    width, height = image.size
    if max(width, height) / min(width, height) > max_aspect_ratio:
        if width > height:
            new_height = int(-(-width // max_aspect_ratio))
            top = (new_height - height) // 2
            image = image.crop((0, -top, width, new_height - top))
        else:
            new_width = int(-(-height // max_aspect_ratio))
            left = (new_width - width) // 2
            image = image.crop((-left, 0, new_width - left, height))
        width, height = image.size
    if min(width, height) < min_side:
        scale = min_side / min(width, height)
        image = image.resize((max(min_side, round(width * scale)), max(min_side, round(height * scale))))
    return image


def limit_long_side(image: "PIL.Image.Image", max_side: int | None) -> "PIL.Image.Image":
    """`image` scaled down (aspect ratio kept, Lanczos, as the official code's `resize_image`) so that its long side
    is `max_side` pixels; returned as it is when it is not longer (never upscaled)."""
    width, height = image.size
    if max_side is None or max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, resample=PILImageResampling.LANCZOS)


def prepare_image(image: Any, timeout: float | None = None, max_side: int | None = None) -> "PIL.Image.Image":
    """The one way an image is made ready for the model: `to_rgb` (orientation, first frame, 16 bits, transparency
    on white, palette), then `limit_long_side` (with `max_side`, the model's `config.max_image_side`), then
    `fit_image` (tiny images upscaled, extreme aspect ratios padded).

    With `max_side` the result's long side is at most `max_side` pixels, whatever the input: aspect ratios are
    then padded to at most `max_side / MIN_SIDE` (about 36.6 for 1024), so that upscaling a thin strip to
    `MIN_SIDE` cannot make it longer again. `image` is anything `open_image` opens (a PIL image, a path, URL,
    base64 string, array or tensor): every source then takes the same path, so a file and the PIL image of that file
    give the same pixels.

    Memory, with `max_side`: an image whose long side is below `2 * REDUCING_GAP * max_side` (4096 px for 1024) is
    processed exactly as without this bound; a larger one is first shrunk by an integer factor in its own mode
    (`reduce_early`), so the transparency and RGB conversions and the Lanczos resize work on fewer than
    (4 * max_side)^2 pixels (16.8 M for 1024: at most 67 MB per 8-bit RGBA copy). A JPEG given as a local path is
    decoded at 1/2 to 1/8 scale (`decode_reduced`), so its full-resolution pixels are never in memory at all. Other
    formats, and images decoded before they get here, hold their full-resolution pixels once in their own mode
    (palette, 1-bit and 16-bit images: once more as RGB(A) or 8-bit grey). No float copy of an image is made here.
    """
    image = to_rgb(open_image(image, timeout=timeout, max_side=max_side), max_side=max_side)
    if max_side is None:
        return fit_image(image)
    return fit_image(limit_long_side(image, max_side), max_aspect_ratio=min(MAX_ASPECT_RATIO, max_side / MIN_SIDE))


def open_image(source: Any, timeout: float | None = None, max_side: int | None = None) -> "PIL.Image.Image":
    """A PIL image in its own mode from what a user passes: a PIL image (as it is), a local path, an http(s) URL, a
    `data:image/...;base64,` URL or a base64 string (transformers' `load_image` sources), or an array / tensor (HWC
    or CHW, uint8 or floats in [0, 1], via transformers' `to_pil_image`). Unlike `load_image` it does not flatten to
    RGB, so alpha, palettes, 16-bit and EXIF orientation are handled once, by `to_rgb`, whatever the source. A local
    JPEG that `max_side` lets shrink is decoded reduced (`decode_reduced`). Pillow is transformers' own (its image
    utilities' vision backend)."""
    pil = image_utils.PIL.Image
    if isinstance(source, pil.Image):
        return source
    if not isinstance(source, str):
        return to_pil_image(source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source)
    if os.path.isfile(source):
        image = pil.open(source)
        return decode_reduced(image, max_side) if max_side is not None else image
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=timeout) as response:
            data = response.read()
    else:
        try:
            data = base64.b64decode(source.split(",", 1)[1] if source.startswith("data:image/") else source,
                                    validate=True)
        except (ValueError, binascii.Error):
            raise ValueError(f"not an image file, URL or base64 image: {source[:80]!r}") from None
    return pil.open(io.BytesIO(data))


def scores_to_predictions(probs: torch.Tensor, id2label: dict[int, str], top_k: int | None = None) -> list[dict]:
    """Sorted `[{"label", "score"}]` from one row of probabilities."""
    order = torch.argsort(probs, descending=True).tolist()
    if top_k is not None:
        order = order[:top_k]
    return [{"label": id2label[i], "score": float(probs[i])} for i in order]


class EmoVLMKDImageClassificationPipeline(Pipeline):
    """Which emotion an image evokes: `[{"label", "score"}]`, scores summing to 1 over all labels.

    `explain=True` also asks the model why (`model.explain`: the paper's reasoning instruction, answered from the same
    encoded image) and adds the answer as `explanation` to each entry; `max_new_tokens` (default 128), `do_sample`
    (greedy by default), `temperature` and `seed` (seeds the sampling) shape it.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    _prompt_cache = None  # a `PromptPrefixCache` for the duration of one `__call__` (the model is frozen meanwhile)

    def __call__(self, images: Any, **kwargs: Any) -> list[dict] | list[list[dict]]:
        self._prompt_cache = PromptPrefixCache()
        try:
            return super().__call__(images, **kwargs)
        finally:
            self._prompt_cache = None

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        vlm_mode: str | None = None,
        timeout: float | None = None,
        explain: bool | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        preprocess_kwargs = {"timeout": timeout} if timeout is not None else {}
        forward_kwargs = {"vlm_mode": vlm_mode} if vlm_mode is not None else {}
        generation = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature}
        generation = {key: value for key, value in generation.items() if value is not None}
        if explain:
            forward_kwargs.update(explain=True, generation_kwargs=generation, seed=seed)
        elif generation or seed is not None:
            raise ValueError("max_new_tokens, do_sample, temperature and seed shape the explanation: pass explain=True")
        postprocess_kwargs = {"top_k": top_k} if top_k is not None else {}
        return preprocess_kwargs, forward_kwargs, postprocess_kwargs

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, torch.Tensor]:
        image = prepare_image(image, timeout=timeout, max_side=self.model.config.max_image_side)
        return prepare_inputs(self.processor, self.model.config, [image])

    def _forward(self, model_inputs: dict[str, torch.Tensor], vlm_mode: str | None = None, explain: bool = False,
                 generation_kwargs: dict[str, Any] | None = None, seed: int | None = None) -> dict[str, Any]:
        cache = None if self.model.training else self._prompt_cache
        if explain:
            output = self.model.explain(**model_inputs, processor=self.processor, vlm_mode=vlm_mode,
                                        generation_kwargs=generation_kwargs, seed=seed, prompt_cache=cache)
            return {"logits": output.logits, "explanation": output.explanations[0]}
        if (vlm_mode or self.model.config.vlm_mode) == "generate":
            output = self.model.generate_labels(**model_inputs, tokenizer=self.processor.tokenizer)
        else:
            output = self.model(**model_inputs, vlm_mode="score", prompt_cache=cache)
        return {"logits": output.logits}

    def postprocess(self, model_outputs: dict[str, Any], top_k: int | None = None) -> list[dict]:
        probs = model_outputs["logits"][0].float().softmax(-1)
        predictions = scores_to_predictions(probs, self.model.config.id2label, top_k or len(probs))
        if "explanation" in model_outputs:
            for prediction in predictions:
                prediction["explanation"] = model_outputs["explanation"]
        return predictions


__all__ = [
    "EmoVLMKDImageClassificationPipeline",
    "decode_reduced",
    "fit_image",
    "limit_long_side",
    "open_image",
    "prepare_image",
    "prepare_inputs",
    "reduce_early",
    "scores_to_predictions",
    "to_rgb",
]
