"""No prompt and no stray warning (issue 21 item 5): `generate_labels` without a tokenizer asks no
`trust_remote_code` question; the libraries' expected notices (bitsandbytes' optional CPU kernel) are not warnings
under `--quiet`; gradio's share hint names `--share`; every command's help shows its flags with dashes, each with a
description and its default."""

import builtins
import copy
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from emovlm_kd.logs import setup_logging

# (logger, message) as bitsandbytes/backends/cpu/ops.py and kernels/_internals/hf_hub.py write them (bitsandbytes
# 0.50, kernels 0.12: on a CPU with AVX512-BF16, `import bitsandbytes` looks for an optional kernel on the Hub)
LIBRARY_NOTICES = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: Kernel "
                                      "repository 'kernels-community/quantization-bitsandbytes' could not verify "
                                      "publisher trust status. Please make sure you already `pip install kernels` "
                                      "and the kernels >= 0.11.1"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
                                  "because Hugging Face Hub is in offline mode."),
]


@pytest.fixture(autouse=True)
def keep_root_level():
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


class Records(logging.Handler):
    def __init__(self, *names):
        super().__init__(logging.DEBUG)
        self.records, self.loggers = [], [logging.getLogger(name) for name in names]

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        for logger in self.loggers:
            logger.addHandler(self)
        return self.records

    def __exit__(self, *exc):
        for logger in self.loggers:
            logger.removeHandler(self)


# ---------------------------------------------------------------------------------------------------------------
# generate_labels: no prompt, no warning
# ---------------------------------------------------------------------------------------------------------------


def test_generate_labels_without_a_tokenizer_asks_nothing_and_warns_nothing(tiny_bundle_dir, images, monkeypatch):
    """The README's snippet: the tokenizer saved beside the weights is loaded without transformers asking "Do you
    wish to run the custom code? [y/N]" (it read the bundle's config through AutoConfig without trust_remote_code)
    and without "You are using a model of type emovlm_kd to instantiate a model of type ''"."""
    from transformers import AutoModelForImageClassification, AutoProcessor

    asked = []

    def no_terminal(prompt=""):
        asked.append(prompt)
        raise EOFError  # stdin closed

    monkeypatch.setattr(builtins, "input", no_terminal)
    model = AutoModelForImageClassification.from_pretrained(tiny_bundle_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_bundle_dir, trust_remote_code=True)
    inputs = model.build_inputs(processor, images[:2])
    with Records("transformers") as records, torch.inference_mode():
        generated = model.generate_labels(**inputs, generation_kwargs={"max_new_tokens": 4})
    assert asked == []
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not any("instantiate a model of type" in message for message in warnings), warnings
    expected = processor.tokenizer.batch_decode(generated.generated_ids, skip_special_tokens=True)
    assert generated.generated_text == expected  # decoded with the saved tokenizer


# ---------------------------------------------------------------------------------------------------------------
# the libraries' expected notices
# ---------------------------------------------------------------------------------------------------------------


def test_bitsandbytes_kernel_notices_are_debug_lines_not_warnings():
    names = [name for name, _ in LIBRARY_NOTICES]
    setup_logging("INFO", quiet=True)
    with Records(*names) as records:
        for name, message in LIBRARY_NOTICES:
            logging.getLogger(name).warning(message)
        logging.getLogger(names[0]).warning("something else")  # a real problem stays a warning
    assert [r.getMessage() for r in records] == ["something else"]
    setup_logging("DEBUG")
    with Records(*names) as records:
        for name, message in LIBRARY_NOTICES:
            logging.getLogger(name).warning(message)
    assert [(r.levelname, r.getMessage()) for r in records] == [("DEBUG", m) for _, m in LIBRARY_NOTICES]


def test_importing_bitsandbytes_under_quiet_logging_prints_nothing(tmp_path):
    """What every `train`, `ablate` and benchmark run does (PEFT and TRL import bitsandbytes), in a fresh process
    as the CLI sets it up, offline (the notices differ on and off line)."""
    pytest.importorskip("bitsandbytes")
    code = ("from emovlm_kd.logs import setup_logging\n"
            "setup_logging('INFO', quiet=True)\n"
            "import bitsandbytes\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip() == "", result.stderr[-2000:]


def test_calibrating_a_gate_trained_on_val_is_no_warning(tiny_bundle, caplog, monkeypatch):
    """The demo's setting (gate-data val): the gate's temperature is fitted on the half of val it never saw, an
    information line; a warning only where a fit fails (see test_calibration)."""
    from emovlm_kd.training import heads
    from emovlm_kd.training.calibration import calibrate_bundle, calibration_rows

    model = copy.deepcopy(tiny_bundle[0])  # the session's bundle keeps its temperatures
    labels = model.config.num_labels
    n = 4 * labels
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(n) % labels
    # scores that say something about the labels, with mistakes: each fit has its minimum inside the bounds
    head_logits = 2 * torch.nn.functional.one_hot(targets, labels) + torch.randn(n, labels, generator=generator)
    val = {"vlm_scores": torch.softmax(torch.randn(n, labels, generator=generator), -1),
           "head_probs": head_logits.softmax(-1), "head_logits": head_logits}
    monkeypatch.setattr(heads, "gate_outputs", lambda gate, vlm_scores, head_probs: 0.5 * head_probs.log())
    with caplog.at_level(logging.INFO, logger="emovlm_kd.training.calibration"):
        record = calibrate_bundle(model, {"val": {"labels": targets}}, {"val": val},
                                  calibration_rows("val", targets, 0))
    assert record["gate"]["error"] is None and record["head"]["error"] is None
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any("calibration part" in message for _, message in lines)
    assert all(level == logging.INFO for level, _ in lines)


def test_the_demo_names_the_share_flag_not_gradios_launch_argument(tiny_bundle_dir, capsys):
    pytest.importorskip("gradio")
    from demo_fixtures import free_port

    from emovlm_kd.demo import build_demo, launch, load_model

    model, processor = load_model(tiny_bundle_dir)
    demo = build_demo(model, processor)
    try:
        _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True,
                           share_hint="* To create a public link, add --share.")
    finally:
        demo.close()
    out = capsys.readouterr().out
    assert f"Running on local URL:  {url}" in out
    assert "add --share" in out and "share=True" not in out


# ---------------------------------------------------------------------------------------------------------------
# help: dashes, a description and the default of every flag
# ---------------------------------------------------------------------------------------------------------------


def option_blocks(help_text):
    """{first spelling shown: the option's lines} from an argparse help text."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"  (--?[A-Za-z][\w-]*)", line)
        if match:
            current = match.group(1)
            blocks[current] = [line]
        elif current and line.startswith("   ") and line.strip():
            blocks[current].append(line)
        else:
            current = None
    return blocks


def every_parser():
    from emovlm_kd.cli import build_parser
    from emovlm_kd.helptext import parsers_of
    from emovlm_kd.training.config import train_parser

    return [*parsers_of(build_parser()), train_parser()]


def test_every_commands_help_shows_dashed_flags_each_with_a_description_and_its_default():
    from emovlm_kd.helptext import shows_default

    checked = 0
    for parser in every_parser():
        text = parser.format_help()
        usage = text.split("\n\n", 1)[0]
        assert not re.search(r"--[a-z0-9-]*_", usage), f"{parser.prog}: a flag with underscores in {usage}"
        blocks = option_blocks(text)
        for action in parser._actions:
            if not action.option_strings or "--help" in action.option_strings:
                continue
            shown = [option for option in action.option_strings if option in blocks]
            assert len(shown) == 1 and "_" not in shown[0], f"{parser.prog}: {action.option_strings} shown as {shown}"
            block = " ".join(line.strip() for line in blocks[shown[0]])
            description = block.split(None, 1 if action.nargs == 0 else 2)[-1]
            assert action.help and re.sub(r"\(?default:[^)]*\)?", "", description).strip(), \
                f"{parser.prog} {shown[0]}: no description"
            if shows_default(action):
                assert "default" in block.lower(), f"{parser.prog} {shown[0]}: its default ({action.default}) unsaid"
            checked += 1
    assert checked > 100  # train's ~50 flags and the other commands'


def test_train_accepts_both_spellings_of_a_flag():
    from emovlm_kd.training.config import parse_train_args

    assert parse_train_args(["--val-fraction", "0.2"]).val_fraction == 0.2
    assert parse_train_args(["--val_fraction", "0.3"]).val_fraction == 0.3
