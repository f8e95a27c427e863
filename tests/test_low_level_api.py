"""The documented low-level API (issue 13 item 8): `AutoModel` + `AutoProcessor` + `model.build_inputs(processor,
images)`; generate mode decodes its answers with the tokenizer saved beside the weights, without extra calls."""

import torch
from transformers import AutoModelForImageClassification, AutoProcessor

from pipeline_emovlm_kd import prepare_image


def test_build_inputs_then_forward_and_generate_labels_without_a_tokenizer_argument(backbone_bundle_dir, images):
    """The README's snippet, on every backbone."""
    model = AutoModelForImageClassification.from_pretrained(backbone_bundle_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(backbone_bundle_dir)
    inputs = model.build_inputs(processor, [prepare_image(image, max_side=model.config.max_image_side)
                                            for image in images])
    with torch.inference_mode():
        scores = model(**inputs)
        generated = model.generate_labels(**inputs, generation_kwargs={"max_new_tokens": 6})
    assert scores.logits.shape == (len(images), model.config.num_labels)
    assert generated.logits.shape == scores.logits.shape
    assert isinstance(generated.generated_text, list) and len(generated.generated_text) == len(images)
    decoded = processor.tokenizer.batch_decode(generated.generated_ids, skip_special_tokens=True)
    assert generated.generated_text == decoded  # the saved tokenizer, the same as passing it


def test_a_bundle_built_in_memory_falls_back_to_token_matching(tiny_bundle, images):
    model, processor = tiny_bundle
    inputs = model.build_inputs(processor, images)
    with torch.inference_mode():
        generated = model.generate_labels(**inputs, generation_kwargs={"max_new_tokens": 6})
    assert generated.generated_text is None and generated.logits.shape[0] == len(images)
