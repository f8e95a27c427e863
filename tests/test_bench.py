"""`python -m benchmarks.bench` and the fast paths it measures. No timing is asserted here (machines are noisy): the
benchmark must run and report, it must time the training stages' own code, and its fast paths must give the answers of
the slow ones."""

import json

import pytest
import torch

from benchmarks import bench, models, stages
from benchmarks.reference import ReferenceProtocol
from benchmarks.report import TARGETS
from emovlm_kd.tiny import build_tiny_bundle
from scoring_emovlm_kd import LabelScoringPlan, PromptPrefixCache

# labels whose answers share sub-word tokens: a trie several levels deep with shared inner nodes
DEEP_TRIE_LABELS = ("joyful", "joyless", "gloomy", "glad", "awe")


@pytest.fixture(scope="module")
def deep_bundle():
    model, processor = build_tiny_bundle(labels=DEEP_TRIE_LABELS, seed=3)
    return model, processor


def test_bench_tiny_runs_and_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--config", "tiny", "--output", str(out), "--stage-images", "4", "--max-other-load", "1"]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    for key in ("predict_ms", "reference_ms", "lower_bound_ms", "encoder_ms"):
        assert report[key] > 0, key
    assert set(report["per_image_ms"]) == {"1", "8"}
    for key in ("predict_vs_reference", "predict_vs_lower_bound", "gate_stage_speedup", "distill_stage_speedup"):
        assert report[key] > 0, key
    assert report["predict_vs_reference"] == pytest.approx(report["predict_ms"] / report["reference_ms"], rel=1e-3)
    for stage, epochs in (("gate_stage", 10), ("distill_stage", 5)):
        assert report[stage]["epochs"] == epochs
        assert report[stage]["images"] == 4
        assert report[stage]["ours_s"] > 0 and report[stage]["reference_s"] > 0
        assert report[stage]["reference_epochs_measured"] == epochs  # tiny: nothing extrapolated
    assert len(report["runs_ms"]["predict"]) == report["runs"] >= 5
    memory = report["memory"]
    assert memory["method"]
    for key in ("predict", "reference", "lower_bound", "predict_batch_8"):
        assert memory[key]["peak_mb"] > 0
    assert memory["weights_mb"]["reference"] > memory["weights_mb"]["ours"]  # the copied encoder
    assert report["visual_encoders"] == {"ours": 1, "reference": 2}
    params = report["params"]
    assert params["total"] == params["backbone"] + params["head"] + params["gate"]
    seven_b = report["params_qwen2_vl_7b"]
    assert seven_b["backbone"] == 8_291_375_616  # Qwen2-VL-7B-Instruct
    assert seven_b["head"] == 3_679_240  # the paper's Table 2 count for the [1024] head
    assert seven_b["gate"] == 2 * 8 * 8 + 8
    assert seven_b["head_gate_share"] < 0.005
    checks = report["checks"]
    assert checks["score_vs_brute_force_max_abs_diff"] < 1e-4
    assert checks["score_vs_brute_force_same_ranking"]
    assert checks["batch_vs_single_logits_max_abs_diff"] < 1e-4
    assert checks["batch_vs_single_same_answers"]
    assert set(report["targets"]) == set(TARGETS)
    assert report["targets_apply"] is False  # the targets are for the small config


@pytest.mark.parametrize("argv", [["--batch-sizes", "0,8"], ["--batch-sizes", "one"], ["--runs", "0"]])
def test_bench_rejects_bad_flags(argv):
    with pytest.raises(SystemExit) as error:
        bench.main(["--config", "tiny", *argv])
    assert error.value.code == 2


def test_deep_trie_plan(deep_bundle):
    model, _ = deep_bundle
    plan = LabelScoringPlan(model.config.label_answer_token_ids)
    assert max(plan.tree_depth) >= 2
    assert len(plan.tree_tokens) < sum(len(a) - len(plan.prefix) - 1 for a in model.config.label_answer_token_ids)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_fast_score_equals_brute_force(deep_bundle, images, grad):
    """Padded batch, a deep trie; with autograd off (the cached prompt prefix is used) and on (it is refused)."""
    model, processor = deep_bundle
    inputs = models.make_inputs(model, processor, images)
    assert inputs["attention_mask"].sum(-1).unique().numel() > 1  # rows of different lengths
    cache = PromptPrefixCache()
    with torch.set_grad_enabled(grad):
        if grad:
            with pytest.raises(ValueError, match="inference only"):
                model(**inputs, prompt_cache=cache)
        fast = model(**inputs, prompt_cache=None if grad else cache).vlm_log_likelihoods.detach()
    assert (cache.computed > 0) == (not grad)
    slow = models.brute_force_log_likelihoods(model, inputs)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)


def test_fast_score_equals_brute_force_with_eager_attention(images, backbone):
    """Eager attention (an additive float mask) and a trie several levels deep, on every backbone."""
    model, processor = build_tiny_bundle(labels=DEEP_TRIE_LABELS, seed=4, backbone=backbone)
    assert len(LabelScoringPlan(model.config.label_answer_token_ids).tree_tokens) > 1
    model.vlm.set_attn_implementation("eager")
    inputs = models.make_inputs(model, processor, images)
    with torch.inference_mode():
        fast = model(**inputs).vlm_log_likelihoods
    torch.testing.assert_close(fast, models.brute_force_log_likelihoods(model, inputs), atol=1e-4, rtol=0)


def test_cached_prompt_prefix_follows_weight_changes(deep_bundle, images):
    """The prompt cache is the caller's, one per loop over a frozen model: the model itself keeps none, so a weight
    update between two loops (each with its own cache) shows in the second."""
    model, processor = deep_bundle
    inputs = models.make_inputs(model, processor, images[:2])
    weight = model.vlm.model.language_model.layers[0].self_attn.k_proj.weight
    cache = PromptPrefixCache()
    with torch.inference_mode():
        before = model(**inputs, prompt_cache=cache).vlm_log_likelihoods
    assert cache.computed == 1 and getattr(model, "_prompt_kv", None) is None
    with torch.no_grad():
        weight.add_(0.05)  # an in-place update, as an optimizer step or load_state_dict does
    try:
        with torch.inference_mode():
            after = model(**inputs, prompt_cache=PromptPrefixCache()).vlm_log_likelihoods
        slow = models.brute_force_log_likelihoods(model, inputs)
        torch.testing.assert_close(after, slow, atol=1e-4, rtol=0)
        assert not torch.allclose(before, after, atol=1e-4)
    finally:
        with torch.no_grad():
            weight.sub_(0.05)


def test_batch_answers_equal_one_at_a_time(deep_bundle, images):
    model, processor = deep_bundle
    inputs = models.make_inputs(model, processor, images)
    with torch.inference_mode():
        batch = model(**inputs)
        singles = [model(**row) for row in models.split_inputs(inputs)]
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch.logits[i], single.logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batch.vlm_log_likelihoods[i], single.vlm_log_likelihoods[0], atol=1e-4, rtol=0)
        assert int(batch.logits[i].argmax()) == int(single.logits[0].argmax())


def test_reference_protocol_runs_two_encoders_and_forces_the_answer_length():
    model, processor = models.build_random_model("tiny")
    reference = ReferenceProtocol(model)
    calls = {"backbone": 0, "copy": 0}
    hooks = [
        model.vlm.model.visual.register_forward_hook(lambda *a: calls.__setitem__("backbone", calls["backbone"] + 1)),
        reference.encoder.register_forward_hook(lambda *a: calls.__setitem__("copy", calls["copy"] + 1)),
    ]
    try:
        inputs = models.make_inputs(model, processor, models.random_images(1, 56))
        with torch.inference_mode():
            generated = model.vlm.generate(
                **inputs, do_sample=True, temperature=0.8, min_new_tokens=6, max_new_tokens=6, pad_token_id=0
            )
            calls.update(backbone=0, copy=0)
            logits = reference.predict(inputs, new_tokens=6)
    finally:
        for hook in hooks:
            hook.remove()
    assert generated.shape[1] - inputs["input_ids"].shape[1] == 6
    assert calls == {"backbone": 1, "copy": 1}
    assert logits.shape == (1, len(model.config.labels))
    assert models.visual_encoder_count(model) == 1


def test_stages_time_the_training_code_itself(monkeypatch):
    """Ours is `train_head` / `train_gate` (what stages 3 and 4 and the ablations call), not a copy of them."""
    from emovlm_kd.training import heads

    calls = []

    def spy(function):
        def wrapper(cfg, module, *tensors_and_dir, **kwargs):
            calls.append((function.__name__, len(tensors_and_dir[0]), kwargs.get("save_strategy")))
            return function(cfg, module, *tensors_and_dir, **kwargs)

        return wrapper

    monkeypatch.setattr(heads, "train_head", spy(heads.train_head))
    monkeypatch.setattr(heads, "train_gate", spy(heads.train_gate))
    model, processor = models.build_random_model("tiny")
    data = stages.stage_data(model, processor, count=3, side=56, batch_size=2, seed=0)
    cfg = stages.stage_config(model, distill_epochs=1, gate_epochs=2, seed=0)
    reference = ReferenceProtocol(model)
    distill, distill_speedup = stages.distill_stage(model, reference, cfg, data)
    gate, gate_speedup = stages.gate_stage(model, reference, cfg, data, reference_epochs=1)
    # each after an untimed one-epoch warm-up on two rows
    assert calls == [("train_head", 2, "no"), ("train_head", 3, "no"), ("train_gate", 2, "no"), ("train_gate", 3, "no")]
    assert distill["ours_s"] == pytest.approx(distill["ours_cache_s"] + distill["ours_train_s"], abs=2e-3)
    assert gate["reference_extrapolated"] and gate["reference_epochs_measured"] == 1
    assert distill_speedup > 0 and gate_speedup > 0


# ----------------------------------------------------------------------------------------------------------------
# --config 7b and --train: built on `meta` here (the figures themselves need CUDA)
# ----------------------------------------------------------------------------------------------------------------


def test_7b_preset_is_qwen2_vl_7b_exactly_built_on_meta():
    """Qwen2-VL-7B's exact shape, built without memory; a 448 x 448 image is 256 image tokens; the default dtype is
    restored after a bfloat16 build."""
    from pipeline_emovlm_kd import prepare_inputs

    model, processor = models.build_random_model("7b", device="meta", dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32
    assert model.device.type == "meta" and model.vlm.dtype == torch.bfloat16
    assert models.count_params(model.vlm) == 8_291_375_616  # Qwen2-VL-7B-Instruct
    assert models.count_params(model.distill_head) == 3_679_240  # the paper's [1024] head
    text = model.vlm.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size) == (3584, 18944, 28,
                                                                                                    152064)
    side = models.CONFIGS["7b"]["image_size"]
    assert side == 448
    inputs = prepare_inputs(processor, model.config, models.random_images(2, side))
    image_token = model.vlm.config.image_token_id
    assert (inputs["input_ids"] == image_token).sum(-1).tolist() == [256, 256]


# the published parameter counts of the real checkpoints (the Hub's safetensors totals; sources in benchmarks/models.py)
REAL_PARAMS = {"qwen2_5_vl": 8_292_166_656, "qwen3_vl": 8_767_123_696}


@pytest.mark.parametrize("backbone, image_tokens", [("qwen2_5_vl", 256), ("qwen3_vl", 196)])
def test_7b_preset_on_qwen2_5_vl_and_qwen3_vl_is_the_real_shape_built_on_meta(backbone, image_tokens):
    """`--config 7b --backbone B`: Qwen2.5-VL-7B-Instruct's / Qwen3-VL-8B-Instruct's exact shape (every parameter's
    name and shape as the real config gives them, and the published count), built without memory; a 448 x 448 image
    is 256 image tokens (Qwen3-VL's 16 px patches: 196)."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from pipeline_emovlm_kd import prepare_inputs

    model, processor = models.build_random_model("7b", device="meta", dtype=torch.bfloat16, backbone=backbone)
    assert torch.get_default_dtype() == torch.float32
    assert model.vlm.config.model_type == backbone and model.vlm.dtype == torch.bfloat16
    assert models.count_params(model.vlm) == REAL_PARAMS[backbone]
    assert models.real_size_param_counts(backbone)["backbone"] == REAL_PARAMS[backbone]
    config = CONFIG_MAPPING[backbone](**models.REAL_SIZES[backbone][1])
    with torch.device("meta"):
        real = AutoModelForImageTextToText.from_config(config)
    assert {k: v.shape for k, v in model.vlm.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    text, real_text = model.vlm.config.text_config, config.text_config
    assert text.rope_parameters["mrope_section"] == real_text.rope_parameters["mrope_section"]
    if backbone == "qwen3_vl":
        assert model.vlm.config.vision_config.deepstack_visual_indexes == [8, 16, 24]
        assert text.rope_parameters["mrope_interleaved"] and text.rope_parameters["rope_theta"] == 5e6
    else:
        assert model.vlm.config.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
        assert model.vlm.config.vision_config.window_size == 112
    inputs = prepare_inputs(processor, model.config, models.random_images(2, 448))
    assert (inputs["input_ids"] == model.vlm.config.image_token_id).sum(-1).tolist() == [image_tokens] * 2


def test_backbone_flag_goes_with_7b_or_tiny():
    assert bench.parse_args(["--config", "7b", "--device", "cpu", "--backbone", "qwen3_vl"]).backbone == "qwen3_vl"
    assert bench.parse_args(["--config", "tiny"]).backbone == "qwen2_vl"
    for argv in (["--config", "small", "--backbone", "qwen3_vl"], ["--config", "tiny", "--backbone", "llava"]):
        with pytest.raises(SystemExit) as error:
            bench.parse_args(argv)
        assert error.value.code == 2


def test_bench_tiny_on_qwen3_vl_reports_its_backbone(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--config", "tiny", "--backbone", "qwen3_vl", "--output", str(out), "--skip-stages", "--runs", "1",
            "--warmup", "0", "--max-other-load", "1", "--batch-sizes", "1,2"]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["backbone"] == "qwen3_vl" and report["visual_encoders"] == {"ours": 1, "reference": 2}
    assert report["params_real_size"]["model"] == "Qwen/Qwen3-VL-8B-Instruct"
    assert report["params_real_size"]["backbone"] == REAL_PARAMS["qwen3_vl"]
    assert report["checks"]["score_vs_brute_force_max_abs_diff"] < 1e-4


def test_7b_train_preset_keeps_the_widths_at_reduced_depth_on_meta():
    model, _ = models.build_random_model("7b", device="meta", depth=models.TRAIN_7B_DEPTH)
    full, _ = models.build_random_model("7b", device="meta")
    text, vision = model.vlm.config.text_config, model.vlm.config.vision_config
    assert (text.num_hidden_layers, vision.depth) == (4, 4)
    full_text = full.vlm.config.text_config
    for name in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads"):
        assert getattr(text, name) == getattr(full_text, name), name
    assert vision.embed_dim == full.vlm.config.vision_config.embed_dim == 1280
    assert models.count_params(model.vlm) == 2_147_020_288  # 2.15 B


def test_7b_preset_defaults_and_no_cuda_refusal():
    args = bench.parse_args(["--config", "7b", "--device", "cpu"])  # resolved without building anything
    assert (args.image_size, args.sizes, args.dtype) == (448, [1, 8, 32], "bfloat16")
    assert bench.parse_args(["--config", "tiny"]).sizes == [1, 8]
    if not torch.cuda.is_available():  # a CPU fact: the 7B preset's default device is CUDA
        with pytest.raises(SystemExit) as error:
            bench.main(["--config", "7b"])
        assert error.value.code == 2


def test_7b_report_carries_the_gpu_targets():
    from benchmarks.report import TARGETS_7B_GPU, evaluate_targets, targets_apply

    report = {"config": "7b", "model": None, "device": "cuda", "predict_ms": 24.0, "per_image_ms": {"1": 24.0,
              "8": 12.0, "32": 10.5}, "predict_vs_reference": 0.2, "predict_vs_lower_bound": 1.1,
              "batched_per_image_vs_batch_1": 0.44, "visual_encoders": {"ours": 1},
              "params_qwen2_vl_7b": {"head_gate_share": 0.00044}}
    targets = evaluate_targets(report)
    assert set(targets) == set(TARGETS_7B_GPU)
    assert targets["predict_ms"]["met"] is True and targets["per_image_ms_batch_32"]["met"] is False
    assert targets_apply(report) and not targets_apply({**report, "device": "cpu"})
    assert targets_apply({**report, "config": "small", "device": "cpu"})


def test_bench_train_times_stage1_steps_and_memory(tmp_path):
    """`--train` on the tiny model on the CPU (LoRA; QLoRA's 4-bit needs CUDA here): the stage's trainer runs the
    warm-up and timed steps and the JSON holds steps per second and peak memory."""
    out = tmp_path / "train.json"
    argv = ["--config", "tiny", "--train", "--train-steps", "2", "--train-warmup-steps", "1", "--train-batch-size",
            "2", "--device", "cpu", "--output", str(out)]
    assert bench.main(argv) == 0
    stage1 = json.loads(out.read_text())["stage1"]
    assert stage1["steps_measured"] == 2 and stage1["warmup_steps"] == 1
    assert stage1["steps_per_s"] == pytest.approx(1 / stage1["s_per_step"], rel=1e-2)
    assert stage1["memory"]["peak_mb"] > 0
    assert 0 < stage1["trainable_params"] < stage1["params"] == 364_416  # the tiny backbone
    assert stage1["lora"]["targets"] == "q_proj,k_proj,v_proj"
    assert stage1["quantization"] == "none (LoRA)" and stage1["s_per_step_scaled_to_full_depth"] is None
