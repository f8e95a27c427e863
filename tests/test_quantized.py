"""Quantised inference: `hub.load_model(..., quantize=4|8)` loads the backbone's language model in 4-bit (nf4) or
8-bit through bitsandbytes, the head, the gate, the visual tower and `lm_head` unquantised in the compute dtype.

bitsandbytes runs on the CPU (0.49+: its CPU backend; checked here with the installed 0.50.2), so the load and the
predictions are tested on the CPU with the tiny bundle. Where bitsandbytes is not installed the loading tests are
skipped with that reason; the configuration tests run everywhere."""

import pytest
import torch
from conftest import random_image
from torch import nn

from emovlm_kd.hub import UNQUANTISED_MODULES, load_model, quantization_config
from emovlm_kd.inference import run_batch


def test_quantization_config_4bit_and_8bit():
    four = quantization_config(4, torch.bfloat16)
    assert four.load_in_4bit and not four.load_in_8bit
    assert four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    assert four.llm_int8_skip_modules == UNQUANTISED_MODULES
    assert quantization_config(4).bnb_4bit_compute_dtype == torch.float32  # no dtype: the bundle's float32
    eight = quantization_config(8)
    assert eight.load_in_8bit and not eight.load_in_4bit and eight.llm_int8_skip_modules == UNQUANTISED_MODULES
    assert quantization_config(None) is None
    with pytest.raises(ValueError, match="4-bit or 8-bit"):
        quantization_config(2)


def test_unquantised_modules_are_the_head_gate_tower_and_vocabulary(tiny_bundle):
    """The skip patterns, read as transformers reads them (`quantizers_utils.should_convert_module`), keep exactly the
    head, the gate, the visual tower and lm_head out of the quantised layers of the bundle."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    model, _ = tiny_bundle
    kept = {name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not should_convert_module(name, UNQUANTISED_MODULES)}
    converted = {name for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and should_convert_module(name, UNQUANTISED_MODULES)}
    assert kept and converted
    assert all(name.startswith(("distill_head", "gate", "vlm.model.visual", "vlm.lm_head")) for name in kept)
    assert all(name.startswith("vlm.model.language_model.") for name in converted)
    assert {"gate.proj", "distill_head.classifier", "vlm.lm_head"} <= kept


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_load_predicts_the_float_labels(tiny_bundle_dir, bits):
    """4-/8-bit loads on the CPU: the language model's linear layers are bitsandbytes layers, the rest float32; the
    labels of a handful of images are the float model's (the tiny random model's scores barely move)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: no quantised load to test")
    images = [random_image(60 + 8 * i, 80 - 4 * i, seed=i) for i in range(6)]
    model, processor, _ = load_model(tiny_bundle_dir, device="cpu")
    quantised, processor_q, _ = load_model(tiny_bundle_dir, device="cpu", quantize=bits)
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    text_layers = [m for n, m in quantised.named_modules() if n.startswith("vlm.model.language_model.")
                   and isinstance(m, nn.Linear)]
    assert text_layers and all(isinstance(m, layer_type) for m in text_layers)
    for module in (quantised.distill_head.classifier, quantised.gate.proj, quantised.vlm.lm_head):
        assert type(module) is nn.Linear and module.weight.dtype == torch.float32
    assert quantised.get_memory_footprint() < model.get_memory_footprint()
    with torch.inference_mode():
        reference = run_batch(model, processor, images)
        output = run_batch(quantised, processor_q, images)
    assert torch.equal(output.logits.argmax(-1), reference.logits.argmax(-1))
    assert torch.isfinite(output.vlm_log_likelihoods).all()
    assert not torch.equal(output.vlm_log_likelihoods, reference.vlm_log_likelihoods)  # it did run quantised


# ----------------------------------------------------------------------------------------------- the flags


@pytest.mark.parametrize("command", ["predict", "evaluate", "table1", "demo"])
def test_load_in_flags_are_one_definition_in_predict_evaluate_table1_and_demo(command):
    """--load-in-4bit / --load-in-8bit come from `QuantizationArguments` (defined once), read back as `quantize`;
    both at once are refused."""
    from emovlm_kd.cli import build_parser
    from emovlm_kd.helptext import parsers_of
    from emovlm_kd.settings import QuantizationArguments, read

    parser = next(p for p in parsers_of(build_parser()) if p.prog == f"emovlm-kd {command}")
    settings = __import__(f"emovlm_kd.commands.{command}", fromlist=["ARGUMENTS"]).ARGUMENTS
    assert issubclass(settings, QuantizationArguments)
    required = {"predict": ["--model", "m", "x.jpg"], "evaluate": ["--model", "m", "--dataset", "d", "--output-dir", "o"], "table1": ["--model", "m", "--data-root", "r",
                "--output-dir", "o"], "demo": ["--model", "m"]}[command]  # fmt: skip
    for words, bits in (([], None), (["--load-in-4bit"], 4), (["--load-in-8bit"], 8)):
        assert read(parser.parse_args(required + words), settings).quantize == bits
    with pytest.raises(ValueError, match="--load-in-8bit cannot go with --load-in-4bit"):
        read(parser.parse_args(required + ["--load-in-4bit", "--load-in-8bit"]), settings)


def test_the_loaders_of_predict_evaluate_table1_and_demo_pass_the_width_on(monkeypatch):
    """What the flag says reaches `hub.load_model(quantize=...)` from predict's, evaluate's, table1's and the demo's
    loaders."""
    from types import SimpleNamespace

    from emovlm_kd import hub
    from emovlm_kd.commands import evaluate, predict
    from emovlm_kd.demo import load_model as demo_load
    from emovlm_kd.errors import UsageError
    from emovlm_kd.evaluation.table1 import ModelLoadError, _OneModel

    seen = []

    def fake_load_model(model_id, **options):
        seen.append(options["quantize"])
        raise ValueError("stop here")

    monkeypatch.setattr(hub, "load_model", fake_load_model)
    with pytest.raises(ValueError, match="stop here"):
        demo_load("m", device="cpu", quantize=4)
    with pytest.raises(ModelLoadError):
        _OneModel("cpu", None, quantize=8).get("m")
    args = SimpleNamespace(model="m", trust_remote_code=False, quantize=4)
    with pytest.raises(UsageError):
        evaluate._load_model(args, ["a", "b"], "cpu", None)
    with pytest.raises(UsageError, match="stop here"):
        predict._load_model(SimpleNamespace(model="m", trust_remote_code=False, quantize=8, device="cpu", dtype=None))
    assert seen == [4, 8, 4, 8]


def test_the_pipeline_loads_quantised_through_model_kwargs(tiny_bundle_dir):
    """`pipeline(..., model_kwargs={"quantization_config": quantization_config(4)})`: the pipeline's model is the 4-bit
    one and classifies as the float pipeline does."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: no quantised load to test")
    from transformers import pipeline

    image = random_image(72, 64, seed=5)
    plain = pipeline(model=str(tiny_bundle_dir), trust_remote_code=True, device="cpu")
    quantised = pipeline(model=str(tiny_bundle_dir), trust_remote_code=True,
                         model_kwargs={"quantization_config": quantization_config(4), "device_map": {"": "cpu"}})
    layer = quantised.model.vlm.model.language_model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and type(quantised.model.gate.proj) is nn.Linear
    assert quantised(image, top_k=1)[0]["label"] == plain(image, top_k=1)[0]["label"]


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_predict_load_in_flags_give_the_float_labels(tiny_bundle_dir, tmp_path, flag):
    """`emovlm-kd predict --load-in-4bit|--load-in-8bit`: the same label for each image as the float run (the tiny
    random model's scores barely move), other scores."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: no quantised load to test")
    import json

    from emovlm_kd.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        random_image(60 + 8 * i, 72, seed=i).save(folder / f"{i}.png")

    def rows(name, *extra):
        out = tmp_path / name
        assert main(["predict", "--model", str(tiny_bundle_dir), "--device", "cpu", "--num-workers", "0",
                     "--output", str(out), str(folder), *extra]) == 0
        return [json.loads(line) for line in out.read_text().splitlines()]

    plain, quantised = rows("float.jsonl"), rows("quantised.jsonl", flag)
    assert [r["path"] for r in quantised] == [r["path"] for r in plain]
    assert [r["label"] for r in quantised] == [r["label"] for r in plain]
    assert [r["scores"] for r in quantised] != [r["scores"] for r in plain]  # it did run quantised
