"""Explanations: `model.explain`, `pipeline(..., explain=True)` and `emovlm-kd predict --explain` classify an image and
answer the paper's reasoning instruction for it from the one visual-encoder pass that classified it."""

import json

import pytest
import torch
from conftest import CallCounter, random_image

import modeling_emovlm_kd
from scoring_emovlm_kd import EXPLANATION_QUESTION, build_prompt_text, chat_prompt


def reasoning_inputs(processor, model, image, question=EXPLANATION_QUESTION):
    """The reasoning prompt and the image through the processor itself (the plain Qwen2-VL way)."""
    prompt = chat_prompt(processor, question)
    return processor(text=[prompt], images=[image], return_tensors="pt").to(model.device)


def test_explain_classifies_as_forward_and_encodes_each_image_once(backbone_bundle, images):
    model, processor = backbone_bundle
    inputs = model.build_inputs(processor, images)
    with CallCounter(model.vlm.model.visual) as encoder:
        output = model.explain(**inputs, processor=processor, generation_kwargs={"max_new_tokens": 6})
    # one pass over the batch's three images, feeding the head, the scoring and the reasoning
    assert (encoder.calls, encoder.images) == (1, 3)
    with torch.no_grad():
        reference = model(**inputs)
    for key in ("logits", "distill_logits", "vlm_scores", "vlm_log_likelihoods"):
        torch.testing.assert_close(output[key], reference[key], rtol=0, atol=0)
    assert output.explanation_ids.shape[0] == 3 and output.explanation_ids.shape[1] <= 6
    assert len(output.explanations) == 3 and all(isinstance(text, str) for text in output.explanations)


def test_the_explanation_is_what_the_vlm_answers_from_the_pixels(backbone_bundle, images):
    """Reusing the encoded image changes nothing: the same tokens as a plain `generate` on the reasoning prompt with
    the pixels (greedy), on each backbone."""
    model, processor = backbone_bundle
    output = model.explain(**model.build_inputs(processor, images[:1]), processor=processor,
                           generation_kwargs={"max_new_tokens": 8})
    plain = reasoning_inputs(processor, model, images[0])
    with torch.no_grad():
        expected = model.vlm.generate(**plain, max_new_tokens=8, do_sample=False,
                                      pad_token_id=processor.tokenizer.pad_token_id)
    assert output.explanation_ids[0].tolist() == expected[0, plain["input_ids"].shape[1]:].tolist()
    assert output.explanations[0] == processor.tokenizer.decode(expected[0, plain["input_ids"].shape[1]:],
                                                                 skip_special_tokens=True).strip()


def test_another_question_and_the_generate_mode(tiny_bundle, images):
    model, processor = tiny_bundle
    question = "Observe the image and describe key elements of the image."
    output = model.explain(**model.build_inputs(processor, images[:1]), processor=processor, question=question,
                           vlm_mode="generate", generation_kwargs={"max_new_tokens": 5})
    plain = reasoning_inputs(processor, model, images[0], question)
    with torch.no_grad():
        expected = model.vlm.generate(**plain, max_new_tokens=5, do_sample=False,
                                      pad_token_id=processor.tokenizer.pad_token_id)
    assert output.explanation_ids[0].tolist() == expected[0, plain["input_ids"].shape[1]:].tolist()
    assert output.generated_ids is not None  # the classification answer was generated too (the paper's protocol)


def test_sampling_is_seeded_and_leaves_the_global_random_state_alone(tiny_bundle, images):
    model, processor = tiny_bundle
    inputs = model.build_inputs(processor, images[:2])
    sample = {"do_sample": True, "temperature": 1.5, "max_new_tokens": 12}
    state = torch.random.get_rng_state()
    first = model.explain(**inputs, processor=processor, generation_kwargs=sample, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = model.explain(**inputs, processor=processor, generation_kwargs=sample, seed=7)
    other = model.explain(**inputs, processor=processor, generation_kwargs=sample, seed=8)
    assert first.explanation_ids.tolist() == second.explanation_ids.tolist()
    assert first.explanation_ids.tolist() != other.explanation_ids.tolist()  # 24 tokens from a flat random model


def test_explain_needs_the_processor(tiny_bundle, images):
    model, processor = tiny_bundle
    with pytest.raises(ValueError, match="processor"):
        model.explain(**model.build_inputs(processor, images[:1]))


def test_pipeline_explain_adds_the_explanation_to_each_entry(tiny_bundle_dir, images):
    from transformers import pipeline

    classify = pipeline(model=str(tiny_bundle_dir), trust_remote_code=True, device="cpu")
    plain = classify(images[0])
    explained = classify(images[0], explain=True, max_new_tokens=6)
    assert [p["label"] for p in explained] == [p["label"] for p in plain]
    assert [p["score"] for p in explained] == pytest.approx([p["score"] for p in plain], abs=1e-6)
    model, processor = classify.model, classify.processor
    expected = model.explain(**model.build_inputs(processor, [images[0]]), processor=processor,
                             generation_kwargs={"max_new_tokens": 6}).explanations[0]
    assert {p["explanation"] for p in explained} == {expected}
    assert "explanation" not in plain[0]
    with pytest.raises(ValueError, match="explain=True"):
        classify(images[0], max_new_tokens=6)


def test_predict_explain_writes_an_explanation_per_line_with_one_encoder_pass_per_image(
    tiny_bundle_dir, tmp_path, monkeypatch, capsys
):
    from emovlm_kd.cli import main

    paths = []
    for index, size in enumerate([(60, 80), (90, 70), (56, 56)]):
        paths.append(tmp_path / f"image_{index}.png")
        random_image(*size, seed=index).save(paths[-1])
    encoded = []
    original = modeling_emovlm_kd.EmoVLMKDForImageClassification.encode_images

    def counting(self, pixel_values, image_grid_thw):
        encoded.append(int(image_grid_thw.shape[0]))
        return original(self, pixel_values, image_grid_thw)

    monkeypatch.setattr(modeling_emovlm_kd.EmoVLMKDForImageClassification, "encode_images", counting)
    code = main(["predict", "--model", str(tiny_bundle_dir), *map(str, paths), "--explain", "--max-new-tokens", "5",
                 "--device", "cpu", "--batch-size", "2"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == list(map(str, paths))
    assert all(isinstance(line["explanation"], str) for line in lines)
    assert encoded == [2, 1]  # each image encoded once, in its batch
    code = main(["predict", "--model", str(tiny_bundle_dir), str(paths[0]), "--device", "cpu"])
    assert code == 0 and "explanation" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("flags", [["--max-new-tokens", "5"], ["--do-sample"], ["--explain", "--max-new-tokens", "0"],
                                   ["--explain", "--temperature", "0.5"]])
def test_predict_refuses_explanation_flags_that_do_not_fit(tiny_bundle_dir, tmp_path, flags):
    from emovlm_kd.cli import main

    path = tmp_path / "image.png"
    random_image(56, 56).save(path)
    with pytest.raises(SystemExit) as stopped:
        main(["predict", "--model", str(tiny_bundle_dir), str(path), *flags])
    assert stopped.value.code == 2


def test_the_prompt_the_explanation_answers_is_the_papers_reasoning_instruction(tiny_bundle):
    from emovlm_kd.training.instructions import REASONING_QUESTION

    model, processor = tiny_bundle
    assert EXPLANATION_QUESTION == REASONING_QUESTION  # what stage 1 tunes the model on
    assert model.config.classification_prompt() in build_prompt_text(processor, model.config)
