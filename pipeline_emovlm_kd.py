"""`image-classification` pipeline for EmoVLM-KD.

    from transformers import pipeline
    classify = pipeline(model="path/or/repo", trust_remote_code=True)
    classify("photo.jpg", top_k=3)  # [{"label": "awe", "score": 0.61}, ...]

This file travels to the Hub with the model: it imports only torch, transformers and the model's own files.
"""

import torch
from transformers import Pipeline
from transformers.image_utils import load_image

try:
    from .modeling_emovlm_kd import build_prompt_text
except ImportError:  # imported as a plain module (not from a Hub folder)
    from modeling_emovlm_kd import build_prompt_text


def to_rgb(image):
    """An upright RGB image from a path, URL or PIL image (EXIF orientation applied, first frame of animations)."""
    image = load_image(image)
    if getattr(image, "is_animated", False):
        image.seek(0)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bit before RGB
        image = image.point(lambda v: v * (1 / 256)).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = image.copy()
        background.paste((255, 255, 255, 255), (0, 0) + image.size)
        background.alpha_composite(image)
        image = background
    return image.convert("RGB")


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

    def _sanitize_parameters(self, top_k=None, vlm_mode=None, timeout=None, **kwargs):
        forward_kwargs = {"vlm_mode": vlm_mode} if vlm_mode is not None else {}
        postprocess_kwargs = {"top_k": top_k} if top_k is not None else {}
        return {}, forward_kwargs, postprocess_kwargs

    def preprocess(self, image):
        inputs = prepare_inputs(self.processor, self.model.config, [to_rgb(image)])
        return inputs

    def _forward(self, model_inputs, vlm_mode=None):
        if self.model._tokenizer is None:
            self.model.attach_tokenizer(self.processor.tokenizer)
        output = self.model(**model_inputs, vlm_mode=vlm_mode)
        return {"logits": output.logits}

    def postprocess(self, model_outputs, top_k=None):
        probs = model_outputs["logits"][0].float().softmax(-1)
        return scores_to_predictions(probs, self.model.config.id2label, top_k or len(probs))


__all__ = ["EmoVLMKDImageClassificationPipeline", "prepare_inputs", "to_rgb", "scores_to_predictions"]
