"""Any Qwen-VL backbone (issue 16): Qwen2-VL, Qwen2.5-VL and Qwen3-VL with the same guarantees.

The model's guarantees run for every backbone in test_model.py and test_scoring.py (the `backbone_bundle` fixture:
one encoder pass per image, score mode = brute force, batch = one at a time, prompt cache, bf16 load). Here: the
`emovlm-kd tiny --backbone B` folder loaded by plain transformers in a fresh process and by `emovlm-kd predict`, what
the head pools on each backbone, and the training settings that name a backbone.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BACKBONES, random_image

from configuration_emovlm_kd import SUPPORTED_BACKBONES, EmoVLMKDConfig
from modeling_emovlm_kd import check_backbone
from pipeline_emovlm_kd import prepare_inputs

PROJECT = str(Path(__file__).resolve().parents[1])


def test_the_backbone_lists_agree():
    from emovlm_kd.commands.tiny import BACKBONES as CLI_BACKBONES
    from emovlm_kd.tiny import BACKBONES as TINY_BACKBONES

    assert SUPPORTED_BACKBONES == BACKBONES == CLI_BACKBONES == TINY_BACKBONES


# -------------------------------------------------------------------- the tiny folder, as a user of transformers


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """`emovlm-kd tiny OUT --backbone B` for each backbone, and one image file: {backbone: folder}, image path."""
    from emovlm_kd.cli import main

    root = tmp_path_factory.mktemp("tiny-backbones")
    folders = {}
    for backbone in BACKBONES:
        assert main(["tiny", str(root / backbone), "--backbone", backbone]) == 0
        folders[backbone] = root / backbone
    image = root / "img.jpg"
    random_image(64, 48, 5).save(image)
    return folders, image


def test_tiny_folders_hold_their_backbone_and_the_default_is_qwen2_vl(tiny_folders, tmp_path):
    from emovlm_kd.cli import main

    folders, _ = tiny_folders
    for backbone, folder in folders.items():
        config = json.loads((folder / "config.json").read_text())
        assert config["vlm_config"]["model_type"] == backbone
    assert main(["tiny", str(tmp_path / "default")]) == 0
    default = tmp_path / "default"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"):
        assert (default / name).read_bytes() == (folders["qwen2_vl"] / name).read_bytes(), name


def test_tiny_command_is_seeded_on_every_backbone(tiny_folders, tmp_path):
    from emovlm_kd.cli import main

    folders, _ = tiny_folders
    for backbone in ("qwen2_5_vl", "qwen3_vl"):
        assert main(["tiny", str(tmp_path / backbone), "--backbone", backbone]) == 0
        for file in folders[backbone].iterdir():
            assert (tmp_path / backbone / file.name).read_bytes() == file.read_bytes(), (backbone, file.name)


def test_tiny_command_refuses_an_unknown_backbone(tmp_path, capsys):
    from emovlm_kd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["tiny", str(tmp_path / "x"), "--backbone", "llava"])
    assert exit_info.value.code == 2 and "qwen3_vl" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


FRESH_PROCESS = textwrap.dedent(
    """
    import json, os, sys
    project = sys.argv[1]
    sys.path[:] = [p for p in sys.path if p and not (os.path.abspath(p) + os.sep).startswith(project + os.sep)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoProcessor, pipeline
    image = Image.open(sys.argv[2]).convert("RGB")
    out = {}
    for folder in sys.argv[3:]:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        assert config.model_type == "emovlm_kd", config.model_type
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        row = {"vlm_type": config.vlm_config.model_type, "processor": type(processor).__name__}
        for name, auto in [("auto_model", AutoModel), ("auto_cls", AutoModelForImageClassification)]:
            model = auto.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            row["vlm_class"] = type(model.vlm).__name__
            inputs = model.build_inputs(processor, [image, image.rotate(90, expand=True)])
            with torch.no_grad():
                row[name] = model(**inputs).logits.softmax(-1).tolist()
        classify = pipeline(model=folder, trust_remote_code=True)
        calls = []
        hook = classify.model.vlm.model.visual.register_forward_hook(
            lambda module, args, kwargs, output: calls.append(kwargs["grid_thw"].shape[0]), with_kwargs=True)
        row["pipeline"] = [classify(image), classify(image.rotate(90, expand=True))]
        hook.remove()
        row["encoder_calls"] = calls
        out[folder] = row
    assert "modeling_emovlm_kd" not in sys.modules
    print(json.dumps(out))
    """
)


def test_tiny_folders_load_with_plain_transformers_in_a_fresh_process(tiny_folders, tmp_path):
    """AutoConfig, AutoModel, AutoModelForImageClassification and `pipeline`, with trust_remote_code and without this
    project on the path, for every backbone in one process; the pipeline encodes each image once, in one pass."""
    from emovlm_kd.hub import load_bundle

    folders, image_path = tiny_folders
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run([sys.executable, str(script), PROJECT, str(image_path), *map(str, folders.values())],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    from PIL import Image

    image = Image.open(image_path).convert("RGB")
    for backbone, folder in folders.items():
        row = out[str(folder)]
        assert row["vlm_type"] == backbone
        assert row["vlm_class"] == {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                    "qwen3_vl": "Qwen3VLForConditionalGeneration"}[backbone]
        assert row["processor"] == {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                                    "qwen3_vl": "Qwen3VLProcessor"}[backbone]
        assert row["encoder_calls"] == [1, 1]  # one pass per pipeline call, one image in it
        model, processor = load_bundle(str(folder))
        with torch.no_grad():
            expected = model(**model.build_inputs(processor, [image, image.rotate(90, expand=True)])).logits.softmax(-1)
        for name in ("auto_model", "auto_cls"):
            torch.testing.assert_close(torch.tensor(row[name]), expected, atol=1e-5, rtol=1e-4)
        for i, predictions in enumerate(row["pipeline"]):
            by_label = {p["label"]: p["score"] for p in predictions}
            scores = torch.tensor([by_label[label] for label in model.config.labels])
            torch.testing.assert_close(scores, expected[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["qwen2_5_vl", "qwen3_vl"])  # Qwen2-VL: test_outputs.py, test_reliability.py
def test_predict_command_on_the_tiny_folder(tiny_folders, backbone, tmp_path, capsys):
    from emovlm_kd.cli import main

    folders, image_path = tiny_folders
    output = tmp_path / "predictions.jsonl"
    assert main(["predict", "--model", str(folders[backbone]), str(image_path), "--output", str(output)]) == 0
    (line,) = output.read_text().splitlines()
    row = json.loads(line)
    assert row["path"] == str(image_path) and "error" not in row
    assert row["label"] in row["scores"] and sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-4)


# -------------------------------------------------------------------------------------- what the head pools


def test_the_head_pools_the_tokens_that_replace_the_image_placeholders(backbone_bundle, images):
    """On every backbone `image_embeds` is the mean of the merger tokens the language model receives as the image:
    the embeddings at the image placeholders of its input equal them, token for token."""
    model, processor = backbone_bundle
    inputs = prepare_inputs(processor, model.config, images)
    seen = []
    hook = model.vlm.model.language_model.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        hook.remove()
    image_positions = inputs["input_ids"] == model.vlm.config.image_token_id  # left padded already
    for row in range(len(images)):
        prompt = seen[0][row, : image_positions.shape[1]]  # the scoring pass appends the answers' tokens after it
        tokens = prompt[image_positions[row]]  # (n_i, H), the image's tokens as the language model gets them
        torch.testing.assert_close(out.image_embeds[row], tokens.mean(0), atol=1e-6, rtol=1e-5)


def test_qwen3_vl_deepstack_features_reach_the_language_model_in_score_mode():
    """Qwen3-VL's deepstack features are added inside the language model's first layers, not pooled by the head:
    dropping them leaves `image_embeds` and the head as they are but changes the VLM branch's scores (so the
    brute-force equality in test_model.py, whose reference runs from pixels, covers them)."""
    from emovlm_kd.tiny import build_tiny_bundle

    model, processor = build_tiny_bundle(backbone="qwen3_vl")
    assert len(model.vlm.model.visual.deepstack_merger_list) == 2
    inputs = prepare_inputs(processor, model.config, [random_image(60, 80, 1)])
    real_encode = model.encode_images

    def without_deepstack(pixel_values, image_grid_thw):
        output = real_encode(pixel_values, image_grid_thw)
        output.deepstack_features = [[torch.zeros_like(t) for t in level] for level in output.deepstack_features]
        return output

    with torch.no_grad():
        full = model(**inputs)
        model.encode_images = without_deepstack
        try:
            dropped = model(**inputs)
        finally:
            del model.encode_images
    torch.testing.assert_close(dropped.image_embeds, full.image_embeds, atol=0, rtol=0)
    torch.testing.assert_close(dropped.distill_logits, full.distill_logits, atol=0, rtol=0)
    assert (dropped.vlm_log_likelihoods - full.vlm_log_likelihoods).abs().max() > 1e-3


def test_qwen2_5_vl_tiny_encoder_attends_in_windows():
    """The tiny Qwen2.5-VL windows its first vision block as the released ones do: with windows as large as the image
    (nothing windowed), the same weights give other merger tokens."""
    from emovlm_kd.tiny import build_tiny_processor, build_tiny_vlm

    processor = build_tiny_processor(backbone="qwen2_5_vl")
    windowed = build_tiny_vlm(processor.tokenizer, backbone="qwen2_5_vl")
    assert windowed.config.vision_config.fullatt_block_indexes == [1]
    whole = build_tiny_vlm(processor.tokenizer, backbone="qwen2_5_vl", vision={"window_size": 1024})
    whole.load_state_dict(windowed.state_dict())
    pixels = processor.image_processor(random_image(112, 112, 4), return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == [[1, 8, 8]]  # 4 x 4 merged tokens: four 56 px windows
    with torch.no_grad():
        a = windowed.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output[0]
        b = whole.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output[0]
    assert (a - b).abs().max() > 1e-4


def test_no_split_modules_are_the_backbones(backbone_bundle):
    """device_map="auto" keeps the backbone's decoder layers and vision blocks whole (transformers gathers them)."""
    model, _ = backbone_bundle
    assert set(model.vlm._no_split_modules) <= set(model._no_split_modules)
    layer = type(model.vlm.model.language_model.layers[0]).__name__
    block = type(model.vlm.model.visual.blocks[0]).__name__
    assert {layer, block} <= set(model._no_split_modules)


def test_a_vlm_without_the_qwen_vl_layout_is_refused_by_name():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tiny = LlavaConfig(text_config={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 128},
                       vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "intermediate_size": 64, "image_size": 28,
                                      "patch_size": 14})  # fmt: skip
    with pytest.raises(ValueError, match=r"Qwen-VL backbone .*model_type 'llava'.*model\.visual"):
        check_backbone(LlavaForConditionalGeneration(tiny))
    with pytest.raises(ValueError, match="model_type 'nope'.*qwen3_vl"):
        EmoVLMKDConfig(vlm_config={"model_type": "nope"})


@pytest.mark.parametrize("backbone", BACKBONES)
def test_config_round_trip_keeps_the_backbone(backbone, tiny_folders):
    folders, _ = tiny_folders
    config = EmoVLMKDConfig.from_pretrained(folders[backbone])
    assert config.vlm_config.model_type == backbone
    again = EmoVLMKDConfig.from_dict(config.to_dict())
    assert again.vlm_config.to_dict() == config.vlm_config.to_dict()


# ------------------------------------------------------------------------------------------------ training


def test_demo_backbone_settings():
    from emovlm_kd.training.config import demo_backbone, parse_train_args

    assert [demo_backbone(v) for v in ("demo", "demo:qwen3_vl", "Qwen/Qwen2.5-VL-7B-Instruct")] == \
        ["qwen2_vl", "qwen3_vl", None]
    assert (parse_train_args([]).output_dir, parse_train_args([]).is_demo) == ("runs/demo", True)
    cfg = parse_train_args(["--vlm", "demo:qwen3_vl"])
    assert cfg.is_demo and cfg.output_dir == "runs/demo-qwen3_vl"  # its own run folder by default
    assert parse_train_args(["--config", "demo", "--vlm", "demo:qwen2_5_vl"]).output_dir == "runs/demo-qwen2_5_vl"
    assert parse_train_args(["--config", "fi", "--vlm", "demo:qwen3_vl"]).output_dir == "runs/fi"  # the config's
    assert parse_train_args(["--vlm", "demo:qwen2_vl"]).output_dir == "runs/demo"
    assert parse_train_args(["--vlm", "demo:qwen2_5_vl", "--output-dir", "runs/x"]).output_dir == "runs/x"
    with pytest.raises(ValueError, match="--vlm names a tiny demo backbone: .*demo:qwen3_vl"):
        parse_train_args(["--vlm", "demo:llava"])


def test_demo_inputs_keep_one_base_vlm_per_backbone(tmp_path):
    from emovlm_kd.hub import checkpoint_model_type
    from emovlm_kd.training.demo import prepare_demo_inputs

    _, qwen2, _ = prepare_demo_inputs(tmp_path, seed=0)
    _, qwen3, _ = prepare_demo_inputs(tmp_path, seed=0, backbone="qwen3_vl")
    assert (qwen2.name, qwen3.name) == ("vlm", "vlm-qwen3_vl")
    assert (checkpoint_model_type(str(qwen2)), checkpoint_model_type(str(qwen3))) == ("qwen2_vl", "qwen3_vl")


def test_preflight_checks_the_vlm_backbone(tmp_path, monkeypatch):
    from emovlm_kd.training.config import TrainConfig
    from emovlm_kd.training.preflight import problems

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "no-cache"))
    for name, model_type in (("llava", "llava"), ("qwen3", "qwen3_vl"), ("qwen25", "qwen2_5_vl")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": model_type}))

    def found(vlm):
        return problems(TrainConfig(vlm=str(tmp_path / vlm), output_dir=str(tmp_path / "run"),
                                    instruction_kinds=["categorical"]))

    assert found("llava") == [f"--vlm {tmp_path / 'llava'}: model_type 'llava' is not a backbone EmoVLM-KD drives "
                              "(qwen2_vl, qwen2_5_vl, qwen3_vl: Qwen2-VL, Qwen2.5-VL, Qwen3-VL)"]
    assert found("qwen3") == found("qwen25") == []


@pytest.mark.parametrize("backbone", ["qwen2_5_vl", "qwen3_vl"])
def test_lora_and_4bit_settings_fit_every_backbones_module_names(backbone):
    """Stage 1's LoRA targets the language model's projections only, and QLoRA leaves every linear layer of the
    vision tower (Qwen2.5-VL's gated MLPs, Qwen3-VL's deepstack mergers) and lm_head unquantised, on every backbone:
    checked against the tiny models' module names."""
    import re

    from emovlm_kd.tiny import build_tiny_processor, build_tiny_vlm
    from emovlm_kd.training.config import TrainConfig
    from trl import get_peft_config

    from emovlm_kd.training.sft import model_config, quantization_config

    processor = build_tiny_processor(backbone=backbone)
    vlm = build_tiny_vlm(processor.tokenizer, backbone=backbone)
    linear = [name for name, module in vlm.named_modules() if isinstance(module, torch.nn.Linear)]
    pattern = re.compile(get_peft_config(model_config(TrainConfig(lora_targets="q_proj,k_proj,v_proj,gate_proj")))
                         .target_modules)
    targeted = [name for name in linear if pattern.fullmatch(name)]
    assert len(targeted) == 4 * vlm.config.get_text_config().num_hidden_layers
    assert all(name.startswith("model.language_model.layers.") for name in targeted)
    skip = quantization_config(model_config(TrainConfig(quantize="4bit"))).llm_int8_skip_modules
    skipped = [name for name in linear if any(name.startswith(prefix) for prefix in skip)]
    assert set(skipped) == {name for name in linear if name.startswith("model.visual.")} | {"lm_head"}
    if backbone == "qwen3_vl":
        assert any(".deepstack_merger_list." in name for name in skipped)
