"""`image-classification` pipeline for EmoVLM-KD.

    from transformers import pipeline
    classify = pipeline(model="path/or/repo", trust_remote_code=True)
    classify("photo.jpg", top_k=3)  # [{"label": "awe", "score": 0.61}, ...]

This file travels to the Hub with the model: it imports only torch, transformers and the model's own files.
"""

import torch
from transformers import Pipeline
from transformers.image_utils import PILImageResampling, load_image

try:
    from .configuration_emovlm_kd import MIN_IMAGE_SIDE
    from .modeling_emovlm_kd import PromptPrefixCache, build_prompt_text
except ImportError:  # imported as a plain module (not from a Hub folder)
    from configuration_emovlm_kd import MIN_IMAGE_SIDE
    from modeling_emovlm_kd import PromptPrefixCache, build_prompt_text


ORIENTATION_TAG = 0x0112
# EXIF orientation -> PIL transpose method, as `PIL.ImageOps.exif_transpose` (FLIP_LEFT_RIGHT 0, FLIP_TOP_BOTTOM 1,
# ROTATE_90 2, ROTATE_180 3, ROTATE_270 4, TRANSPOSE 5, TRANSVERSE 6); this file imports nothing but torch/transformers
EXIF_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


def to_rgb(image):
    """An upright RGB copy of a PIL image: EXIF orientation applied (once: the tag is read here, and the result
    carries none), first frame of animations, 16-bit greyscale scaled to 8 bits, transparency (alpha or a palette's
    transparent colour) composited on white."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    orientation = image.getexif().get(ORIENTATION_TAG)  # read first: mode conversions drop TIFF tags
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bit before RGB
        image = image.point(lambda v: v * (1 / 256)).convert("L")
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


def fit_image(image, max_aspect_ratio=MAX_ASPECT_RATIO, min_side=MIN_SIDE):
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


def limit_long_side(image, max_side):
    """`image` scaled down (aspect ratio kept, Lanczos, as the official code's `resize_image`) so that its long side
    is `max_side` pixels; returned as it is when it is not longer (never upscaled)."""
    width, height = image.size
    if max_side is None or max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, resample=PILImageResampling.LANCZOS)


def prepare_image(image, timeout=None, max_side=None):
    """The one way an image is made ready for the model: `to_rgb` (orientation, first frame, 16 bits, transparency
    on white, palette), then `limit_long_side` (with `max_side`, the model's `config.max_image_side`), then
    `fit_image` (tiny images upscaled, extreme aspect ratios padded).

    With `max_side` the result's long side is at most `max_side` pixels, whatever the input: aspect ratios are
    then padded to at most `max_side / MIN_SIDE` (about 36.6 for 1024), so that upscaling a thin strip to
    `MIN_SIDE` cannot make it longer again. `image` is a PIL image, or a path, URL or base64 string, which
    transformers' `load_image` opens (that loader applies the EXIF orientation and flattens to RGB itself; `to_rgb`
    then finds no orientation left to apply).
    """
    if isinstance(image, str):
        image = load_image(image, timeout=timeout)
    image = to_rgb(image)
    if max_side is None:
        return fit_image(image)
    return fit_image(limit_long_side(image, max_side), max_aspect_ratio=min(MAX_ASPECT_RATIO, max_side / MIN_SIDE))


def prepare_inputs(processor, config, images):
    """Processor outputs for a batch of RGB images, each with the classification prompt (left padded)."""
    prompt = build_prompt_text(processor, config)
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return processor(text=[prompt] * len(images), images=list(images), padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side


def scores_to_predictions(probs, id2label, top_k=None):
    """Sorted `[{"label", "score"}]` from one row of probabilities."""
    order = torch.argsort(probs, descending=True).tolist()
    if top_k is not None:
        order = order[:top_k]
    return [{"label": id2label[i], "score": float(probs[i])} for i in order]


class EmoVLMKDImageClassificationPipeline(Pipeline):
    """Which emotion an image evokes: `[{"label", "score"}]`, scores summing to 1 over all labels."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    _prompt_cache = None  # a `PromptPrefixCache` for the duration of one `__call__` (the model is frozen meanwhile)

    def __call__(self, images, **kwargs):
        self._prompt_cache = PromptPrefixCache()
        try:
            return super().__call__(images, **kwargs)
        finally:
            self._prompt_cache = None

    def _sanitize_parameters(self, top_k=None, vlm_mode=None, timeout=None, **kwargs):
        preprocess_kwargs = {"timeout": timeout} if timeout is not None else {}
        forward_kwargs = {"vlm_mode": vlm_mode} if vlm_mode is not None else {}
        postprocess_kwargs = {"top_k": top_k} if top_k is not None else {}
        return preprocess_kwargs, forward_kwargs, postprocess_kwargs

    def preprocess(self, image, timeout=None):
        image = prepare_image(image, timeout=timeout, max_side=self.model.config.max_image_side)
        return prepare_inputs(self.processor, self.model.config, [image])

    def _forward(self, model_inputs, vlm_mode=None):
        if (vlm_mode or self.model.config.vlm_mode) == "generate":
            output = self.model.generate_labels(**model_inputs, tokenizer=self.processor.tokenizer)
        else:
            cache = None if self.model.training else self._prompt_cache
            output = self.model(**model_inputs, vlm_mode="score", prompt_cache=cache)
        return {"logits": output.logits}

    def postprocess(self, model_outputs, top_k=None):
        probs = model_outputs["logits"][0].float().softmax(-1)
        return scores_to_predictions(probs, self.model.config.id2label, top_k or len(probs))


__all__ = [
    "EmoVLMKDImageClassificationPipeline",
    "fit_image",
    "limit_long_side",
    "prepare_image",
    "prepare_inputs",
    "scores_to_predictions",
    "to_rgb",
]
