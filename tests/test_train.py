"""Training: the loss, the caches, each stage on tiny data, the final Hub model, skip and resume."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_settings

from emovlm_kd.training.cache import TensorCache, fingerprint, fingerprint_module
from emovlm_kd.training.config import TrainConfig, load_config
from emovlm_kd.training.trainers import distillation_loss

# ---------------------------------------------------------------------------------------------------------------
# The distillation loss
# ---------------------------------------------------------------------------------------------------------------


def test_distillation_loss_is_zero_kl_for_identical_logits():
    logits = torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 3])
    assert distillation_loss(logits, logits, labels, alpha=1.0, tau=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_known_values():
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0]])
    labels = torch.tensor([0])
    tau, alpha = 2.0, 0.5
    p_t = torch.softmax(teacher / tau, -1)
    p_s = torch.softmax(student / tau, -1)
    kl = (p_t * (p_t.log() - p_s.log())).sum()
    ce = -torch.log_softmax(student, -1)[0, 0]
    expected = alpha * tau**2 * kl + (1 - alpha) * ce
    assert distillation_loss(student, teacher, labels, alpha, tau).item() == pytest.approx(expected.item(), rel=1e-6)
    assert distillation_loss(student, teacher, labels, 0.0, tau).item() == pytest.approx(ce.item(), rel=1e-6)


def test_distillation_loss_gradient_reaches_only_the_student():
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5, requires_grad=True)
    distillation_loss(student, teacher.detach(), torch.tensor([0, 1, 2])).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("alpha,tau", [(-0.1, 2.0), (1.5, 2.0), (0.5, 0.0)])
def test_distillation_loss_rejects_bad_settings(alpha, tau):
    with pytest.raises(ValueError):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), alpha, tau)


# ---------------------------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------------------------


def test_module_fingerprint_changes_with_weights():
    layer = torch.nn.Linear(4, 4)
    before = fingerprint_module(layer)
    assert fingerprint_module(layer) == before
    with torch.no_grad():
        layer.weight[1, 2] += 0.5
    assert fingerprint_module(layer) != before


def test_cache_computes_once_and_never_reuses_a_stale_entry(tmp_path):
    cache = TensorCache(tmp_path)
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return {"x": torch.full((2,), float(value))}

        return run

    key_a, key_b = fingerprint("model-a", "data"), fingerprint("model-b", "data")
    assert cache.get_or_compute("features", key_a, compute(1))["x"][0] == 1
    assert cache.get_or_compute("features", key_a, compute(99))["x"][0] == 1  # hit: not recomputed
    assert calls == [1]
    assert cache.get_or_compute("features", key_b, compute(2))["x"][0] == 2  # other model: recomputed
    assert calls == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"features-{key_b}.safetensors"]  # stale one removed
    assert cache.get("features", key_a) is None


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def test_config_defaults_follow_the_paper_and_yaml_overrides(tmp_path):
    cfg = TrainConfig()
    assert (cfg.alpha, cfg.head_hidden_sizes, cfg.gate_type) == (0.5, [1024], "concat_linear")
    assert (cfg.sft_lr, cfg.distill_lr, cfg.gate_lr) == (1e-4, 1e-3, 1e-3)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (8, 8, 0.05)
    path = tmp_path / "c.yaml"
    path.write_text("alpha: 0.3\ngate_type: moe\n")
    cfg = load_config(str(path), {"alpha": 0.7})
    assert (cfg.alpha, cfg.gate_type) == (0.7, "moe")
    with pytest.raises(ValueError, match="--alpha"):
        load_config(None, {"alpha": 2.0})


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[1] / "train" / "configs"
    names = {p.stem for p in root.glob("*.yaml")}
    paper = {"fi", "emoset", "emotion6", "flickr", "instagram"}
    assert {"demo", *paper, *(f"{name}_qwen2_5_vl" for name in paper)} <= names
    for path in root.glob("*.yaml"):
        cfg = load_config(str(path))
        if path.stem in paper:
            assert cfg.vlm == "Qwen/Qwen2-VL-7B-Instruct" and cfg.teacher == "google/vit-base-patch16-384"
        elif path.stem != "demo":  # the Qwen2.5-VL twin of a paper config: every other setting the same
            twin = load_config(str(root / f"{path.stem.removesuffix('_qwen2_5_vl')}.yaml"))
            assert cfg.vlm == "Qwen/Qwen2.5-VL-7B-Instruct" and cfg.output_dir == f"{twin.output_dir}_qwen2_5_vl"
            assert dataclasses.replace(cfg, vlm=twin.vlm, output_dir=twin.output_dir) == twin


# ---------------------------------------------------------------------------------------------------------------
# The stages end to end on tiny data
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tiny_inputs, tmp_path_factory):
    from emovlm_kd.training.runner import run_training

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = tiny_settings(*tiny_inputs, out)
    results = run_training(cfg)
    return cfg, out, results


STAGES = ["stage0_instructions", "stage1_sft", "stage2_teacher", "stage3_distill", "stage4_gate"]


def test_run_writes_every_stage_and_the_results(trained_run):
    cfg, out, results = trained_run
    for stage in STAGES:
        assert (out / stage / "DONE.json").exists(), stage
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved == results
    assert saved["split"] == "test" and saved["num_samples"] == 16
    assert set(saved["accuracy"]) == {"vlm", "distill", "teacher", "emovlm_kd"}
    instructions = (out / "stage0_instructions" / "instructions.jsonl").read_text().splitlines()
    first = json.loads(instructions[0])
    assert first["kind"] == "categorical" and first["answer"].startswith("{'emotion': '")
    assert "from the following 8 categories: amusement, anger, awe" in first["question"]
    assert (out / "stage1_sft" / "adapter" / "adapter_config.json").exists()
    adapter = json.loads((out / "stage1_sft" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 8)


def test_final_model_loads_with_plain_transformers_and_matches_the_results(trained_run):
    from transformers import AutoModelForImageClassification, AutoProcessor

    from emovlm_kd.inference import run_batch
    from emovlm_kd.data import load_image_dataset
    from emovlm_kd.images import prepare_image

    cfg, out, results = trained_run
    model = AutoModelForImageClassification.from_pretrained(out / "model", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out / "model", trust_remote_code=True)
    test = load_image_dataset(cfg.dataset)["test"]
    output = run_batch(model, processor, [prepare_image(image) for image in test["image"]])
    labels = torch.tensor(test["label"])
    accuracy = round(float((output.logits.argmax(-1) == labels).float().mean()), 4)
    assert accuracy == results["accuracy"]["emovlm_kd"]
    head = round(float((output.distill_logits.argmax(-1) == labels).float().mean()), 4)
    assert head == results["accuracy"]["distill"]
    card = (out / "model" / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: image-classification" in card
    assert not list((out / "model").glob("*.bin"))


def test_only_the_head_changed_in_stage3_and_the_backbone_is_the_merged_one(trained_run):
    """The bundle holds the merged backbone as saved, and stage 3's head (trained and saved in float32) cast to the
    run's dtype (float32 on the CPU, bfloat16 on CUDA)."""
    from safetensors.torch import load_file

    from emovlm_kd.runtime import resolve_dtype

    cfg, out, _ = trained_run
    bundle = load_file(out / "model" / "model.safetensors")
    merged = load_file(out / "stage1_sft" / "merged" / "model.safetensors")
    for name, tensor in merged.items():
        assert torch.equal(bundle["vlm." + name], tensor), name
    head = load_file(out / "stage3_distill" / "head.safetensors")
    for name, tensor in head.items():
        assert tensor.dtype == torch.float32, name
        assert bundle["distill_head." + name].dtype == resolve_dtype(cfg.dtype), name
        assert torch.equal(bundle["distill_head." + name], tensor.to(resolve_dtype(cfg.dtype))), name


def test_rerun_skips_every_finished_stage(trained_run, caplog):
    from emovlm_kd.training.runner import run_training

    cfg, out, results = trained_run
    marks = {s: (out / s / "DONE.json").stat().st_mtime_ns for s in STAGES}
    model_mtime = (out / "model" / "model.safetensors").stat().st_mtime_ns
    caches = sorted(p.name for p in (out / "cache").iterdir())
    with caplog.at_level("INFO"):
        again = run_training(cfg)
    assert again == results
    assert {s: (out / s / "DONE.json").stat().st_mtime_ns for s in STAGES} == marks
    assert sorted(p.name for p in (out / "cache").iterdir()) == caches
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == model_mtime  # not re-exported
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 5
    assert sum("cache hit" in r.getMessage() for r in caplog.records) == 6  # VLM pass + teacher, 3 splits


def test_changing_the_gate_reruns_only_the_gate(trained_run, tmp_path):
    import shutil

    from emovlm_kd.training.runner import run_training

    cfg, out, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    marks = {s: (copy / s / "DONE.json").read_text() for s in STAGES}
    results = run_training(tiny_settings(cfg.dataset, cfg.vlm, cfg.teacher, copy, gate_type="moe"))
    for stage in STAGES[:-1]:
        assert (copy / stage / "DONE.json").read_text() == marks[stage], stage
    assert (copy / "stage4_gate" / "DONE.json").read_text() != marks["stage4_gate"]
    assert json.loads((copy / "model" / "config.json").read_text())["gate_type"] == "moe"
    assert 0.0 <= results["accuracy"]["emovlm_kd"] <= 1.0


def test_a_base_checkpoint_replaced_at_the_same_path_is_not_mistaken_for_the_old_one(tmp_path):
    from emovlm_kd.training.cache import fingerprint_checkpoint

    folder = tmp_path / "vlm"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"old weights")
    before = fingerprint_checkpoint(folder)
    assert fingerprint_checkpoint(folder) == before
    (folder / "model.safetensors").write_bytes(b"new weights, other size")
    assert fingerprint_checkpoint(folder) != before
    assert fingerprint_checkpoint("Qwen/Qwen2-VL-7B-Instruct") == "Qwen/Qwen2-VL-7B-Instruct"


def test_a_stale_cache_is_not_reused_when_the_data_changes(trained_run, tmp_path):
    """A VLM-pass cache is keyed by model and data: another split gives another key."""
    from emovlm_kd.training.cache import fingerprint_dataset
    from emovlm_kd.data import load_image_dataset

    cfg, _, _ = trained_run
    data = load_image_dataset(cfg.dataset)
    assert fingerprint_dataset(data["train"]) != fingerprint_dataset(data["train"].select(range(10)))
    assert fingerprint_dataset(data["train"]) == fingerprint_dataset(load_image_dataset(cfg.dataset)["train"])


# ---------------------------------------------------------------------------------------------------------------
# Several processes (crash and resume: test_resume.py)
# ---------------------------------------------------------------------------------------------------------------


def train_command(cfg, launcher=None):
    """`emovlm-kd train --config FILE` with `cfg` written as YAML, run as `python -m` or under `launcher`."""
    import sys

    import yaml

    path = Path(cfg.output_dir).with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return [*(launcher or [sys.executable]), "-m", "emovlm_kd.cli", "train", "--config", str(path)]


def assert_same_weights(folder_a, folder_b, atol=1e-5):
    from safetensors.torch import load_file

    a, b = load_file(Path(folder_a) / "model.safetensors"), load_file(Path(folder_b) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.timeout(900)
def test_two_processes_give_the_same_result_as_one(tiny_inputs, tmp_path):
    """Every stage, caches included, under `torchrun --nproc_per_node 2` (gloo on the CPU) vs one process; pinned to
    the CPU (CUDA_VISIBLE_DEVICES=) on a CUDA machine too: two processes on one GPU stop at once
    (test_cuda_paths.py), and the tolerances are float32's."""
    import os
    import shutil
    import subprocess

    from safetensors.torch import load_file

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    single = tiny_settings(*tiny_inputs, tmp_path / "one", head_dropout=0.0, lora_dropout=0.0)
    double = tiny_settings(*tiny_inputs, tmp_path / "two", head_dropout=0.0, lora_dropout=0.0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    torchrun = ["torchrun", "--nproc_per_node", "2", "--master_port", "29517"]
    for cfg, launcher in [(single, None), (double, torchrun)]:
        result = subprocess.run(train_command(cfg, launcher), env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    caches_one = {p.name.rsplit("-", 1)[0]: p for p in (Path(single.output_dir) / "cache").iterdir()}
    caches_two = {p.name.rsplit("-", 1)[0]: p for p in (Path(double.output_dir) / "cache").iterdir()}
    assert caches_one.keys() == caches_two.keys() and len(caches_one) == 6
    for name in caches_one:  # file names hold fingerprints of weights, which may differ in the last bits
        a, b = load_file(caches_one[name]), load_file(caches_two[name])
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=f"{name}:{key}")
    one = json.loads((Path(single.output_dir) / "eval_results.json").read_text())
    two = json.loads((Path(double.output_dir) / "eval_results.json").read_text())
    # the temperatures are fitted on outputs of weights equal to float32's tolerance, not bit for bit
    calibration_one, calibration_two = one.pop("calibration"), two.pop("calibration")
    assert one == two
    assert calibration_one.keys() == calibration_two.keys() == {"gate", "head"}
    for part, record in calibration_one.items():
        assert record.keys() == calibration_two[part].keys()
        for key, value in record.items():
            expected = pytest.approx(value, rel=1e-3, abs=1e-3) if isinstance(value, float) else value
            assert calibration_two[part][key] == expected, (part, key)
    assert_same_weights(Path(single.output_dir) / "model", Path(double.output_dir) / "model", atol=1e-3)


@pytest.mark.parametrize("quantize", ["4bit", "auto", "none"])
def test_stage1_lora_and_quantisation_configs_from_trl_are_the_hand_written_ones(quantize):
    """TRL's `get_peft_config` / `get_quantization_config` (through `sft.model_config`) give, field by field, the
    LoraConfig and BitsAndBytesConfig stage 1 built by hand before (the LLM's projections only; nf4 double-quant,
    bfloat16 compute, the visual tower and lm_head unquantised)."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import get_peft_config

    from emovlm_kd.training import sft

    cfg = TrainConfig(quantize=quantize, lora_r=8, lora_alpha=16, lora_dropout=0.1, lora_targets="q_proj, v_proj,")
    assert get_peft_config(sft.model_config(cfg)) == LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=r".*language_model.*\.(q_proj|v_proj)",
        task_type="CAUSAL_LM",
    )
    quant = sft.quantization_config(sft.model_config(cfg), cfg.quantize_scope)
    if quantize == "4bit" or (quantize == "auto" and torch.cuda.is_available()):
        expected = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["model.visual", "lm_head"],
        )
        assert quant.to_dict() == expected.to_dict()
    else:
        assert quant is None


def test_qlora_stage_quantises_trains_and_merges_into_full_precision(tiny_inputs, tmp_path, caplog):
    """Stage 1 with `quantize=4bit`: 4-bit nf4 layers while training, a merged backbone with no 4-bit tensor left,
    in the run's dtype (float32 on the CPU, bfloat16 on CUDA; the merge itself is in float32: test_merge_precision)."""
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig

    from emovlm_kd.data import load_image_dataset
    from emovlm_kd.training import instructions, sft
    from emovlm_kd.runtime import resolve_dtype

    data, vlm, teacher = tiny_inputs
    cfg = tiny_settings(data, vlm, teacher, tmp_path / "run", quantize="4bit", sft_epochs=1.0)
    quant = sft.quantization_config(sft.model_config(cfg), cfg.quantize_scope)
    assert isinstance(quant, BitsAndBytesConfig)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    unquantised = tiny_settings(data, vlm, teacher, tmp_path, quantize="none")
    assert sft.quantization_config(sft.model_config(unquantised), unquantised.quantize_scope) is None
    dataset = load_image_dataset(str(data))
    from configuration_emovlm_kd import EmoVLMKDConfig

    names = dataset["train"].features["label"].names
    prompt_config = EmoVLMKDConfig(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    instructions = instructions.run_stage0(cfg.instruction_args, tmp_path / "run", dataset, prompt_config)
    with caplog.at_level("INFO"):
        merged = sft.run_stage1(cfg.sft_args, tmp_path / "run", dataset, vlm, instructions, seed=cfg.seed,
                                dtype=cfg.dtype, max_image_side=cfg.max_image_side)
    assert any("4-bit nf4" in r.getMessage() for r in caplog.records)
    weights = load_file(merged / "model.safetensors")
    assert not [k for k in weights if "absmax" in k or "quant" in k]
    dtype = resolve_dtype(cfg.dtype)
    assert {tensor.dtype for tensor in weights.values()} == {dtype}
    base = load_file(Path(vlm) / "model.safetensors")  # float32
    changed = [k for k in weights if not torch.equal(weights[k], base[k].to(dtype))]
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj") for k in changed)


def test_push_to_hub_uploads_the_model_folder(trained_run, monkeypatch):
    """`--push-to-hub REPO` uploads RUN/model as it is (no Hub here: the upload functions are replaced)."""
    import dataclasses

    import huggingface_hub

    from emovlm_kd.training.runner import run_training

    cfg, out, _ = trained_run
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    run_training(dataclasses.replace(cfg, push_to_hub="someone/emovlm-kd-tiny"))
    assert calls[0] == ("create", "someone/emovlm-kd-tiny")
    assert calls[1][1]["repo_id"] == "someone/emovlm-kd-tiny"
    assert Path(calls[1][1]["folder_path"]) == out / "model"


def test_stage0_adds_user_conversation_and_reasoning_answers(tiny_inputs, tmp_path, caplog):
    from configuration_emovlm_kd import EmoVLMKDConfig
    from emovlm_kd.training import instructions, sft
    from emovlm_kd.data import load_image_dataset

    data, vlm, teacher = tiny_inputs
    dataset = load_image_dataset(str(data))
    ids = dataset["train"]["id"]
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        json.dumps({"id": ids[0], "kind": "conversation", "answer": "Warm colours and a calm scene."}) + "\n"
        + json.dumps({"id": ids[1], "kind": "reasoning", "answer": "Soft light suggests contentment."}) + "\n"
        + json.dumps({"id": "not/in/train.png", "kind": "reasoning", "answer": "ignored"}) + "\n"
    )
    paper_mix = ["categorical", "conversation", "reasoning"]  # tiny_settings: categorical alone
    cfg = tiny_settings(data, vlm, teacher, tmp_path / "run", instructions=str(answers), instruction_kinds=paper_mix)
    names = dataset["train"].features["label"].names
    prompt_config = EmoVLMKDConfig(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    with caplog.at_level("WARNING"):
        path = instructions.run_stage0(cfg.instruction_args, tmp_path / "run", dataset, prompt_config)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("categorical") == len(ids) and kinds.count("conversation") == 1 and kinds.count("reasoning") == 1
    assert {r["question"] for r in rows if r["kind"] == "conversation"} == {instructions.CONVERSATION_QUESTION}
    assert "not/in/train.png" in caplog.text
    sft = sft.sft_dataset(dataset["train"], path)
    assert len(sft) == len(ids) + 2
    assert sft[len(ids)]["completion"][0]["content"][0]["text"] == "Warm colours and a calm scene."
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": ids[0], "kind": "poem", "answer": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        instructions.run_stage0(tiny_settings(data, vlm, teacher, tmp_path / "run2", instructions=str(bad),
                                              instruction_kinds=paper_mix).instruction_args,
                                tmp_path / "run2", dataset, prompt_config)
