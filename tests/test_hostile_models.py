"""Model folders made to hurt (issue 22, item 2): a config that would build a full-size backbone before any check,
labels by the hundred thousand, weights overwritten with NaN or infinity, a chat template that raises. Each is refused
with one line (exit status 3) naming the file, in seconds and with little memory: config.json is compared with the
weight files' headers before any tensor is allocated (a model on the meta device), weights are checked finite on
load, the chat template is rendered at load. Built from the tiny bundle; a few KB each."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_model_checks import bundle, edit_config, image  # noqa: F401 (the same fixtures: an image, a bundle to damage)

from emovlm_kd.cli import main
from emovlm_kd.errors import ModelCheckError

ROOT = Path(__file__).resolve().parents[1]
CODE_FILES = ("configuration_emovlm_kd.py", "modeling_emovlm_kd.py", "pipeline_emovlm_kd.py", "scoring_emovlm_kd.py")




def model_error_line(err):
    lines = [line for line in err.splitlines() if "the model could not be loaded" in line]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def predict_exit_3(bundle, image, capsys):
    """`predict` on `bundle`: exit status 3 and the one line it printed."""
    code = main(["predict", "--model", str(bundle), "--device", "cpu", str(image)])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    return model_error_line(err)


# ------------------------------------------------------------------------------ what a model folder would cost


def small_weights(folder, count=64):
    """`model.safetensors` replaced by `count` one-value tensors named as the bundle's own (a few KB in all)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        names = sorted(handle.keys())[:count]
    save_file({name: torch.zeros(1) for name in names}, folder / "model.safetensors", metadata={"format": "pt"})


def strip_to_config_and_weights(folder):
    """Only what a load reads before the processor: config.json and model.safetensors (and the processor files,
    which nothing reads first): a folder of a few KB."""
    for name in CODE_FILES:
        (folder / name).unlink()
    small_weights(folder)


def drop_backbone_config(config):
    config["vlm_config"] = None


def drop_text_config(config):
    del config["vlm_config"]["text_config"]


def many_layers(config):
    config["vlm_config"]["text_config"]["num_hidden_layers"] = 10**7
    config["vlm_config"]["text_config"]["layer_types"] = ["full_attention"]


def wide_backbone(config):
    """The text model of Qwen2-VL-7B (its widths, vocabulary and heads) with the tiny one's two layers: 5 GB of
    float32 for a load that believed the config."""
    config["vlm_config"]["text_config"].update(hidden_size=3584, intermediate_size=18944, vocab_size=152064,
                                               num_attention_heads=28, num_key_value_heads=4)
    config["vlm_config"]["text_config"]["rope_parameters"]["mrope_section"] = [16, 24, 24]


HOSTILE = {  # change to config.json, what the one line says
    "vlm_config null": (drop_backbone_config, "config.json: vlm_config is missing (null)"),
    "no text_config": (drop_text_config, "config.json: vlm_config.text_config is missing (null)"),
    "ten million layers": (many_layers, "config.json: vlm_config.text_config.num_hidden_layers is 10,000,000, but "
                                        "the weights hold 64 tensors in all"),
    "a backbone wider than its weights": (wide_backbone, "model.safetensors: "),
}

COST_PROBE = """
import json, resource, sys, threading, time, os
import torch, transformers  # noqa: F401 (imported before the baseline is taken)
import emovlm_kd.hub, emovlm_kd.modelcheck, modeling_emovlm_kd  # noqa: F401
from emovlm_kd.errors import ModelCheckError

LIMIT_MB, LIMIT_S = 2000, 60  # far beyond the test's bounds: a load that gets there is stopped, not waited for

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

base, started = peak_mb(), time.perf_counter()

def report(outcome):
    print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - started, "peak_mb": peak_mb() - base}))
    sys.stdout.flush()

def watchdog():
    while True:
        time.sleep(0.05)
        if peak_mb() - base > LIMIT_MB or time.perf_counter() - started > LIMIT_S:
            report("stopped by the watchdog")
            os._exit(0)

threading.Thread(target=watchdog, daemon=True).start()
try:
    emovlm_kd.hub.load_bundle(sys.argv[1])
    report("loaded")
except ModelCheckError as error:
    report("refused: " + str(error))
"""


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_small_folder_is_refused_in_seconds_with_little_memory(case, bundle, tmp_path):
    """Issue 22's done-when: a model folder of a few KB neither allocates more than a few hundred MB nor runs more
    than a few seconds before it is refused (peak RSS and wall time of the load alone, in a fresh process, measured
    after torch and transformers are imported)."""
    change, says = HOSTILE[case]
    strip_to_config_and_weights(bundle)
    edit_config(bundle, change)
    size = sum(path.stat().st_size for path in bundle.iterdir() if path.name in ("config.json", "model.safetensors"))
    assert size < 12_000  # config.json (5 KB) and 64 one-value tensors
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", COST_PROBE, str(bundle)], cwd=ROOT, env=env, check=False,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.splitlines()[-1])
    assert probe["outcome"].startswith(f"refused: {bundle / says.split(':')[0]}: "), probe
    assert says.split(": ", 1)[-1] in probe["outcome"], probe
    assert probe["peak_mb"] < 300, probe
    assert probe["seconds"] < 5, probe


def test_config_is_compared_with_the_weight_headers_before_any_tensor_is_loaded(bundle, image, capsys,
                                                                                monkeypatch):
    """A backbone one size off its weights: refused from the headers alone, `from_pretrained` never called."""
    import modeling_emovlm_kd

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained ran before the weights were compared with the config")

    monkeypatch.setattr(modeling_emovlm_kd.EmoVLMKDForImageClassification, "from_pretrained", never)
    edit_config(bundle, lambda c: c["vlm_config"]["text_config"].update(intermediate_size=96))
    line = predict_exit_3(bundle, image, capsys)
    assert f"{bundle / 'model.safetensors'}: " in line
    assert "do not fit config.json (8 labels): vlm.model.language_model.layers.0.mlp.down_proj.weight is [64, 128] " \
           "here but [64, 96] for the config" in line


@pytest.mark.parametrize("where", ["vlm_config", "vision_config"])
def test_a_sub_config_of_the_wrong_type_is_refused(where, bundle, image, capsys):
    def change(config):
        if where == "vlm_config":
            config["vlm_config"] = "qwen2_vl"
        else:
            config["vlm_config"]["vision_config"]["model_type"] = "qwen2_vl_text"

    edit_config(bundle, change)
    line = predict_exit_3(bundle, image, capsys)
    assert f"{bundle / 'config.json'}: " in line
    assert ("vlm_config is a str" if where == "vlm_config" else
            "vlm_config.vision_config has model_type 'qwen2_vl_text', not 'qwen2_vl_vision'") in line


def test_the_label_check_is_linear_in_the_number_of_labels():
    """200,000 labels are checked (the repeated-name check was quadratic: 10k labels 1.6 s, 20k 5.9 s, 200k still
    running at 90 s; linear, it takes well under a second); a repeated name is still found, naming both spellings.
    No speed is asserted: the child gets 120 s, which only a quadratic check (hours at 200k) runs out of."""
    code = (
        "from emovlm_kd.modelcheck import check_labels\n"
        "id2label = {str(i): f'label {i}' for i in range(200_000)}\n"
        "config = {'id2label': id2label, 'label2id': {name: int(i) for i, name in id2label.items()}}\n"
        "print(len(check_labels(config, 'config.json')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200000"]
    from emovlm_kd.modelcheck import check_labels

    id2label = {str(i): f"label {i}" for i in range(2_000)}
    id2label["1999"] = "LABEL 7 "
    with pytest.raises(ModelCheckError, match=r"id2label names a label twice: LABEL 7 , label 7$"):
        check_labels({"id2label": id2label}, "config.json")


# ------------------------------------------------------------------------------------------------ the weights


def overwrite_tensor(folder, name, byte):
    """The data of tensor `name` in model.safetensors overwritten with `byte` (0xFF: NaN in float32), header intact
    (safetensors layout: an 8-byte little-endian header length, the JSON header, then the data at its offsets)."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + length])[name]["data_offsets"]
    with open(path, "r+b") as handle:
        handle.seek(8 + length + start)
        handle.write(byte * (end - start))


@pytest.mark.parametrize("value, byte", [("NaN", b"\xff"), ("infinity", None)])
def test_weights_that_are_not_finite_are_refused_naming_the_tensor(value, byte, bundle, image, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    if byte is None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(bundle / "model.safetensors")
        tensors["gate.proj.weight"][0, 3] = float("inf")
        save_file(tensors, bundle / "model.safetensors", metadata={"format": "pt"})
    else:
        overwrite_tensor(bundle, "gate.proj.weight", byte)
    code = main(["predict", "--model", str(bundle), "--device", "cpu", "--output", str(out), str(image)])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    line = model_error_line(err)
    count = "1" if value == "infinity" else "128"  # the gate's [8, 16] weight: one value, or all of it
    assert f"{bundle / 'model.safetensors'}: tensor gate.proj.weight holds {count} NaN or infinite value(s)" in line
    assert not out.exists() and not Path(f"{out}.part").exists()


# -------------------------------------------------------------------------------------------- the chat template

TEMPLATES = {  # a template that raises when rendered, the error named in the line
    "a sandbox escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    "raise_exception": ("{{ raise_exception('not for you') }}", "TemplateError: not for you"),
    "the reasoning prompt only": (
        "{% for m in messages %}{% for c in m.content %}{% if c.text is defined and 'describe' in c.text %}"
        "{{ c.text.__class__.__init__.__globals__ }}{% endif %}{% endfor %}{% endfor %}<|vision_start|><|image_pad|>"
        "<|vision_end|>{{ messages[0].content[1].text }}", "SecurityError"),
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_a_chat_template_that_raises_is_refused_in_one_line(case, bundle, image, capsys):
    template, error = TEMPLATES[case]
    (bundle / "chat_template.jinja").write_text(template)
    line = predict_exit_3(bundle, image, capsys)
    assert f"{bundle / 'chat_template.jinja'}: the chat template does not render the prompt ({error}" in line


COSTLY_TEMPLATES = {  # a template written to cost: refused in one line, within the bounds, this process unharmed
    "memory": ("{{ 'x' * 10**10 }}", "the chat template needs more than 512 MiB to render the prompt"),
    "time": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
             "the chat template takes more than 2 s to render the prompt"),
}


@pytest.mark.parametrize("case", list(COSTLY_TEMPLATES))
def test_a_chat_template_written_to_cost_is_refused_within_its_bounds(case, bundle, image, capsys, monkeypatch):
    import resource
    import time

    import emovlm_kd.modelcheck

    monkeypatch.setattr(emovlm_kd.modelcheck, "TEMPLATE_SECONDS", 2.0)
    template, message = COSTLY_TEMPLATES[case]
    (bundle / "chat_template.jinja").write_text(template)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    line = predict_exit_3(bundle, image, capsys)
    assert time.monotonic() - start < 60  # the whole predict: imports, the model's own checks, the bounded render
    assert line.endswith(f": the model could not be loaded: {bundle / 'chat_template.jinja'}: {message}"), line
    # the render ran in a child: this process did not grow by what the template asked for (10 GB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 1_000_000  # KiB: under ~1 GB


def test_the_finite_check_counts_only_what_is_not_finite():
    """The screen is each tensor's sum: a float16 sum that overflows (finite values) passes, one NaN among them
    does not."""
    from emovlm_kd.modelcheck import check_finite

    model = torch.nn.Linear(64, 64).half()
    with torch.no_grad():
        model.weight.fill_(60000.0)  # float16's largest values: their sum is inf, each of them finite
        check_finite(model, "model.safetensors")
        model.weight[5, 7] = float("nan")
    with pytest.raises(ModelCheckError, match=r"^model.safetensors: tensor weight holds 1 NaN or infinite value\(s\) "
                                              r"of 4,096"):
        check_finite(model, "model.safetensors")
