"""The bundled model: shapes, gates, one encoder pass, score mode, generate mode, batching, Hub round trips."""

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CallCounter, brute_force_log_likelihoods

from configuration_emovlm_kd import GATE_TYPES, EmoVLMKDConfig
from modeling_emovlm_kd import EmoVLMKDForImageClassification
from pipeline_emovlm_kd import prepare_inputs
from scoring_emovlm_kd import parse_answer


def _inputs(model, processor, images):
    return prepare_inputs(processor, model.config, images)


def _run(model, inputs, mode, tokenizer=None, **generation):
    """`score`: the forward (tensors only); `generate`: `generate_labels` (decoding and parsing)."""
    if mode == "generate":
        return model.generate_labels(**inputs, tokenizer=tokenizer, generation_kwargs=generation)
    return model(**inputs, vlm_mode=mode)


def EncoderCounter(model):
    """Counts calls of the visual encoder through a forward hook."""
    return CallCounter(model.vlm.model.visual)


@pytest.mark.parametrize("gate_type", GATE_TYPES)
@pytest.mark.parametrize("hidden", [[64], [64, 32], [64, 32, 16]])
def test_shapes_and_no_nans_for_every_gate_and_depth(gate_type, hidden, images):
    from emovlm_kd.tiny import build_tiny_bundle

    model, processor = build_tiny_bundle(head_hidden_sizes=hidden, gate_type=gate_type)
    inputs = _inputs(model, processor, images)
    out = model(**inputs, labels=torch.tensor([0, 1, 2]))
    for name in ("logits", "distill_logits", "vlm_scores", "vlm_log_likelihoods"):
        assert out[name].shape == (3, 8), name
        assert torch.isfinite(out[name]).all(), name
    assert out.image_embeds.shape == (3, model.config.vlm_config.text_config.hidden_size)
    assert torch.isfinite(out.loss)
    assert len([m for m in model.distill_head.layers if isinstance(m, torch.nn.Linear)]) == len(hidden)
    torch.testing.assert_close(out.vlm_scores.sum(-1), torch.ones(3))


@pytest.mark.parametrize("part", ["distill_head", "gate"])
def test_gradients_reach_only_the_trained_module(tiny_bundle, images, part):
    model, processor = tiny_bundle
    model.train()
    try:
        model.requires_grad_(False)
        getattr(model, part).requires_grad_(True)
        out = model(**_inputs(model, processor, images), labels=torch.tensor([0, 1, 2]))
        loss = out.loss if part == "gate" else torch.nn.functional.cross_entropy(out.distill_logits, torch.tensor([0, 1, 2]))
        loss.backward()
        for name, param in model.named_parameters():
            if name.startswith(part + "."):
                assert param.grad is not None and param.grad.abs().sum() > 0, name
            else:
                assert param.grad is None, name
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)
        model.eval()


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_one_encoder_call_per_forward(backbone_bundle, images, mode):
    """One visual-encoder pass per batch, each image encoded once in it, on every backbone."""
    model, processor = backbone_bundle
    inputs = _inputs(model, processor, images)
    with EncoderCounter(model) as counter, torch.no_grad():
        _run(model, inputs, mode, max_new_tokens=4)
    assert (counter.calls, counter.images) == (1, len(images))


def test_one_encoder_call_per_pipeline_call(backbone_bundle_dir, images):
    from transformers import pipeline

    classify = pipeline(model=str(backbone_bundle_dir), trust_remote_code=True)
    with EncoderCounter(classify.model) as counter:
        result = classify(images[0], top_k=3)
    assert (counter.calls, counter.images) == (1, 1)
    assert len(result) == 3
    full = classify(images[0])
    assert sum(r["score"] for r in full) == pytest.approx(1.0, abs=1e-5)
    assert [r["label"] for r in result] == [r["label"] for r in full[:3]]


def test_pipeline_generate_mode_parses_answers_with_one_encoder_call(tiny_bundle_dir, images):
    from transformers import pipeline

    classify = pipeline(model=str(tiny_bundle_dir), trust_remote_code=True)
    with EncoderCounter(classify.model) as counter:
        result = classify(images[0], vlm_mode="generate")
    assert counter.calls == 1
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)
    inputs = _inputs(classify.model, classify.processor, [images[0]])
    with torch.no_grad():
        expected = classify.model.generate_labels(**inputs, tokenizer=classify.processor.tokenizer).logits[0]
    by_label = {r["label"]: r["score"] for r in result}
    scores = torch.tensor([by_label[label] for label in classify.model.config.labels])
    torch.testing.assert_close(scores, expected.softmax(-1), atol=1e-5, rtol=1e-4)


def test_forward_computes_tensors_and_generate_labels_decodes(tiny_bundle, images):
    """No tokenizer lives on the model: `forward` refuses generate mode and names the method that runs it."""
    model, processor = tiny_bundle
    inputs = _inputs(model, processor, images)
    assert not hasattr(model, "attach_tokenizer") and not hasattr(model, "_tokenizer")
    with pytest.raises(ValueError, match="generate_labels"), torch.no_grad():
        model(**inputs, vlm_mode="generate")
    with torch.no_grad():
        plain = model.generate_labels(**inputs, generation_kwargs={"max_new_tokens": 3})
        decoded = model.generate_labels(**inputs, tokenizer=processor.tokenizer, generation_kwargs={"max_new_tokens": 3})
    assert plain.generated_text is None and plain.generated_ids.shape == (3, 3)
    assert decoded.generated_text == processor.tokenizer.batch_decode(decoded.generated_ids, skip_special_tokens=True)
    assert torch.equal(plain.generated_ids, decoded.generated_ids)


def test_answers_to_vectors_parses_text_or_matches_tokens(tiny_bundle):
    model, processor = tiny_bundle
    labels = model.config.labels
    answers = model.config.label_answer_token_ids
    rows = [answers[2], answers[0], processor.tokenizer("no idea", add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    pad = model.vlm.config.text_config.pad_token_id
    generated = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    for tokenizer in (None, processor.tokenizer):
        vectors, found, texts = model.answers_to_vectors(generated, tokenizer)
        assert found.tolist() == [True, True, False]
        assert vectors.argmax(-1)[:2].tolist() == [2, 0] and vectors.sum(-1).tolist() == [1.0, 1.0, 0.0]
        assert (texts is None) == (tokenizer is None)
    assert parse_answer(texts[0], labels) == 2


def test_encoder_features_feed_both_branches(backbone_bundle, images):
    """Generation from precomputed features equals generation from pixels (same features reach the LLM: Qwen3-VL's
    deepstack features too)."""
    model, processor = backbone_bundle
    inputs = _inputs(model, processor, images[:1])
    with torch.no_grad():
        ours = model.generate_labels(**inputs, generation_kwargs={"max_new_tokens": 6}).generated_ids
        plain = model.vlm.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, plain[:, inputs["input_ids"].shape[1] :])


def test_score_mode_equals_brute_force(backbone_bundle, images):
    model, processor = backbone_bundle
    for image in images:
        inputs = _inputs(model, processor, [image])
        with torch.no_grad():
            fast = model(**inputs).vlm_log_likelihoods[0]
            slow = brute_force_log_likelihoods(model, inputs)
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_batch_equals_one_at_a_time(backbone_bundle, images, mode):
    model, processor = backbone_bundle
    with torch.no_grad():
        batch = _run(model, _inputs(model, processor, images), mode, max_new_tokens=5)
        for i, image in enumerate(images):
            single = _run(model, _inputs(model, processor, [image]), mode, max_new_tokens=5)
            torch.testing.assert_close(batch.logits[i], single.logits[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batch.distill_logits[i], single.distill_logits[0], atol=1e-5, rtol=1e-4)
            if mode == "generate":
                assert torch.equal(batch.generated_ids[i], single.generated_ids[0])
            else:
                torch.testing.assert_close(
                    batch.vlm_log_likelihoods[i], single.vlm_log_likelihoods[0], atol=1e-4, rtol=0
                )


def test_right_padding_is_handled(backbone_bundle, images):
    model, processor = backbone_bundle
    left = _inputs(model, processor, images)
    processor.tokenizer.padding_side = "right"
    try:
        from scoring_emovlm_kd import build_prompt_text

        prompt = build_prompt_text(processor, model.config)
        right = processor(text=[prompt] * 3, images=images, padding=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = "left"
    with torch.no_grad():
        torch.testing.assert_close(model(**left).logits, model(**right).logits, atol=1e-5, rtol=1e-4)


def test_unparseable_answer_gives_zero_vector_and_is_counted(tiny_bundle, images):
    model, processor = tiny_bundle  # a random model writes gibberish, which names no label
    with torch.no_grad():
        out = _run(model, _inputs(model, processor, images), "generate", processor.tokenizer, max_new_tokens=3)
    assert not out.vlm_answer_found.any()
    assert torch.equal(out.vlm_scores, torch.zeros_like(out.vlm_scores))


def test_parse_answer():
    labels = ["amusement", "anger", "awe"]
    assert parse_answer("{'emotion': 'awe'}", labels) == 2
    assert parse_answer('{"emotion":"Anger"}', labels) == 1
    assert parse_answer("I think this is amusement.", labels) == 0
    assert parse_answer("anger or awe", labels) is None
    assert parse_answer("no idea", labels) is None


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="gate_type"):
        EmoVLMKDConfig(gate_type="attention")
    with pytest.raises(ValueError, match="vlm_mode"):
        EmoVLMKDConfig(vlm_mode="sample")
    with pytest.raises(ValueError, match="head_dropout"):
        EmoVLMKDConfig(head_dropout=1.5)


def test_missing_image_is_a_clear_error(tiny_bundle, images):
    model, processor = tiny_bundle
    inputs = _inputs(model, processor, images[:1])
    with pytest.raises(ValueError, match="pixel_values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_tiny_command_is_seeded(tmp_path):
    from emovlm_kd.cli import main

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    assert main(["tiny", str(tmp_path / "a")]) == 0
    assert main(["tiny", str(tmp_path / "b")]) == 0
    first, second = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert first == second
    assert {"model.safetensors", "config.json", "modeling_emovlm_kd.py", "pipeline_emovlm_kd.py"} <= set(first)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"].startswith("modeling_emovlm_kd.")
    assert config["id2label"]["0"] == "amusement" and len(config["id2label"]) == 8


FRESH_PROCESS = textwrap.dedent(
    """
    import json, os, sys
    project = sys.argv[2]
    sys.path[:] = [p for p in sys.path if p and not (os.path.abspath(p) + os.sep).startswith(project + os.sep)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageClassification, AutoProcessor, AutoConfig, pipeline
    folder, image = sys.argv[1], Image.open(sys.argv[3]).convert("RGB")
    assert AutoConfig.from_pretrained(folder, trust_remote_code=True).model_type == "emovlm_kd"
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    out = {}
    for name, auto in [("auto_model", AutoModel), ("auto_cls", AutoModelForImageClassification)]:
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        config = model.config
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": config.classification_prompt()}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            out[name] = model(**inputs).logits[0].softmax(-1).tolist()
    out["pipeline"] = pipeline(model=folder, trust_remote_code=True)(image)
    assert "modeling_emovlm_kd" not in sys.modules and "scoring_emovlm_kd" not in sys.modules
    print(json.dumps(out))
    """
)


def test_save_load_in_fresh_process(tiny_bundle, tiny_bundle_dir, images, tmp_path):
    from pathlib import Path

    model, processor = tiny_bundle
    image_path = tmp_path / "img.png"
    images[0].save(image_path)
    project = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_bundle_dir), project, str(image_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        from PIL import Image

        expected = model(**_inputs(model, processor, [Image.open(image_path).convert("RGB")])).logits[0].softmax(-1)
    for name in ("auto_model", "auto_cls"):
        torch.testing.assert_close(torch.tensor(out[name]), expected, atol=1e-5, rtol=1e-4)
    by_label = {r["label"]: r["score"] for r in out["pipeline"]}
    labels = model.config.labels
    torch.testing.assert_close(torch.tensor([by_label[label] for label in labels]), expected, atol=1e-5, rtol=1e-4)


def test_bfloat16_loading(backbone_bundle_dir, images):
    from emovlm_kd.hub import load_bundle
    from emovlm_kd.inference import run_batch

    model, processor = load_bundle(str(backbone_bundle_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.distill_head.classifier.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.vlm.parameters()} == {torch.bfloat16}
    out = run_batch(model, processor, images)
    assert torch.isfinite(out.logits).all() and out.logits.shape == (3, 8)


def test_from_vlm_wraps_a_model_instance(backbone):
    from emovlm_kd.tiny import build_tiny_processor, build_tiny_vlm

    processor = build_tiny_processor(backbone=backbone)
    vlm = build_tiny_vlm(processor.tokenizer, backbone=backbone)
    model = EmoVLMKDForImageClassification.from_vlm(vlm, ["negative", "positive"], processor=processor)
    assert model.vlm is vlm and model.config.vlm_config.model_type == backbone
    assert model.config.labels == ["negative", "positive"]
    assert len(model.config.label_answer_token_ids) == 2
    encoders = [m for m in model.modules() if type(m) is type(vlm.model.visual)]
    assert len(encoders) == 1
