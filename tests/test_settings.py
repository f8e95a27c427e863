"""Every command's settings are dataclasses (`emovlm_kd.settings`): the dataset flags defined once for `evaluate`,
`split` and `train`, one split-ratio rule for the flags and the loader, and a new field is a new flag."""

import dataclasses
from pathlib import Path

import pytest
from conftest import imported_by_a_child

from emovlm_kd.settings import (
    REQUIRED,
    DatasetArguments,
    RuntimeArguments,
    help_field,
    parser_for,
    read,
    split_ratios_ok,
)

ROOT = Path(__file__).resolve().parents[1]


def actions_by_dest(parser):
    return {action.dest: action for action in parser._actions}


def command_parser(name):
    from emovlm_kd.cli import build_parser
    from emovlm_kd.helptext import parsers_of

    return next(parser for parser in parsers_of(build_parser()) if parser.prog == f"emovlm-kd {name}")


def test_the_dataset_flags_are_one_definition_in_evaluate_split_and_train():
    from emovlm_kd.training.config import train_parser

    parsers = {"evaluate": command_parser("evaluate"), "split": command_parser("split"), "train": train_parser()}
    for spec in dataclasses.fields(DatasetArguments):
        seen = {}
        for command, parser in parsers.items():
            action = actions_by_dest(parser)[spec.name]
            seen[command] = (action.help, tuple(action.choices or ()), action.default)
            assert f"--{spec.name.replace('_', '-')}" in action.option_strings, (command, action.option_strings)
        assert len(set(seen.values())) == 1, (spec.name, seen)
        assert seen["train"][0] == spec.metadata["help"]


def test_the_data_path_flag_is_one_definition_in_predict_evaluate_and_table1():
    from emovlm_kd.settings import DataPathArguments

    spec = {f.name: f for f in dataclasses.fields(DataPathArguments)}["num_workers"]
    seen = {}
    for command in ("predict", "evaluate", "table1"):
        action = actions_by_dest(command_parser(command))["num_workers"]
        seen[command] = (tuple(action.option_strings), action.help, action.default, action.type)
    assert set(seen.values()) == {(("--num-workers", "--num_workers"), spec.metadata["help"], None, int)}, seen
    for module in ("predict", "evaluate", "table1"):
        arguments = __import__(f"emovlm_kd.commands.{module}", fromlist=["ARGUMENTS"]).ARGUMENTS
        owners = [klass for klass in arguments.__mro__ if "num_workers" in klass.__dict__.get("__annotations__", {})]
        assert owners == [DataPathArguments], (module, owners)
    with pytest.raises(ValueError, match="--num-workers must be >= 0"):
        DataPathArguments(num_workers=-1)


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.85, 0.0, 0.15), (0.5, 0.5, 0.0), (0.0, 0.5, 0.5),
                                    (0.5, 0.2, 0.2), (1.1, -0.05, -0.05)])
def test_one_split_ratio_rule_for_the_flags_and_the_loader(ratios, tmp_path):
    from emovlm_kd.data import load_image_dataset

    ok = split_ratios_ok(ratios)
    assert ok == (ratios in [(0.8, 0.1, 0.1), (0.85, 0.0, 0.15)])
    refusals = 0
    try:
        DatasetArguments(split_ratios=list(ratios))
    except ValueError as error:
        assert "--split-ratios" in str(error)
        refusals += 1
    try:  # the ratios are checked before the (missing) folder is looked at
        load_image_dataset(tmp_path / "missing", split_ratios=ratios)
    except ValueError as error:
        refusals += "split_ratios" in str(error)
    assert refusals == (0 if ok else 2)


def test_a_new_field_is_a_new_flag_read_back_into_the_dataclass():
    @dataclasses.dataclass(kw_only=True)
    class WithAKnob(RuntimeArguments):
        knob: float = help_field("a new setting", 0.5)
        where: str = help_field("required", REQUIRED)

    parser = parser_for(WithAKnob)
    parsed = read(parser.parse_args(["--knob", "0.25", "--where", "x", "--batch-size", "2"]), WithAKnob)
    assert (parsed.knob, parsed.where, parsed.batch_size, parsed.dtype) == (0.25, "x", 2, None)
    assert read(parser.parse_args(["--where", "x"]), WithAKnob).knob == 0.5
    assert "a new setting" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --where is required
    with pytest.raises(ValueError, match="--batch-size must be >= 1, got 0"):
        read(parser.parse_args(["--where", "x", "--batch-size", "0"]), WithAKnob)


def test_switches_positionals_and_repeated_flags_keep_their_forms():
    @dataclasses.dataclass(kw_only=True)
    class Forms:
        target: str = help_field("a positional", REQUIRED, positional=True)
        flag: bool = help_field("a switch", False)
        many: list[str] = help_field("repeatable", [], action="append")

    parser = parser_for(Forms)
    parsed = read(parser.parse_args(["--flag", "out", "--many", "a", "--many", "b"]), Forms)
    assert (parsed.target, parsed.flag, parsed.many) == ("out", True, ["a", "b"])
    assert read(parser.parse_args(["out"]), Forms).many == []


def test_every_command_module_has_a_settings_dataclass_and_its_help_imports_nothing_heavy():
    code = ("from emovlm_kd.cli import main\n"
            "for command in ('tiny', 'split', 'evaluate', 'table1', 'demo', 'ablate'):\n"
            "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n")
    imported, result = imported_by_a_child(code)
    assert imported == [] and "usage: emovlm-kd ablate" in result.stdout
    from emovlm_kd.commands import ablate, demo, evaluate, split, table1, tiny

    for module in (ablate, demo, evaluate, split, table1, tiny):
        arguments = module.ARGUMENTS
        for klass in arguments.values() if isinstance(arguments, dict) else (arguments,):
            assert dataclasses.is_dataclass(klass), module.__name__


@pytest.mark.parametrize("command, words", [
    ("evaluate", ["--model", "m", "--dataset", "d", "--output-dir", "o", "--split-ratios", "0.8", "0.1", "0.1",
                  "--vote-rule", "plurality", "--batch-size", "3", "--dtype", "bfloat16", "--trust-remote-code",
                  "--num-workers", "2"]),
    ("demo", ["--model", "m", "--port", "7861", "--share", "--device", "cpu"]),
    ("ablate head-depth", ["--run", "r", "--depths", "64;64,32", "--tau", "3", "--gate-type", "moe"]),
])
def test_huggingfaces_parser_reads_the_same_settings_from_the_same_words(command, words):
    """The settings dataclasses are HfArgumentParser's kind (transformers/hf_argparser.py: fields -> flags with both
    spellings, Literal -> choices, a bool a `--flag [BOOL]`): parsed by it, the same words give the same settings
    as the CLI's parser, which imports no transformers."""
    from transformers import HfArgumentParser

    from emovlm_kd.cli import build_parser
    from emovlm_kd.commands import ablate, demo, evaluate

    module = {"evaluate": evaluate, "demo": demo, "ablate head-depth": ablate}[command]
    ours = read(build_parser().parse_args([*command.split(), *words]), module.ARGUMENTS)
    (theirs,) = HfArgumentParser(type(ours)).parse_args_into_dataclasses(words)
    assert ours == theirs


# ---------------------------------------------------------------------------------------------------------------
# One definition of --device and --dtype
# ---------------------------------------------------------------------------------------------------------------

SOURCE_FILES = sorted([*ROOT.glob("*.py"), *(ROOT / "emovlm_kd").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])
FLAG_FIELDS = {"dtype": "dtype_field", "device": "device_field"}  # field name -> the one helper that makes it


def settings_fields(path):
    """`(class, field, annotation source, value source)` of every `dtype`/`device` field of a dataclass in `path`."""
    import ast

    source = path.read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and getattr(item.target, "id", None) in FLAG_FIELDS:
                    yield (node.name, item.target.id, ast.unparse(item.annotation),
                           ast.unparse(item.value) if item.value else "")


def test_every_device_and_dtype_field_is_made_by_the_one_helper():
    """A settings dataclass anywhere (the commands', train's ModelArguments, the benchmark's) gets its --device and
    --dtype from `settings.device_field`/`dtype_field`, typed by `Dtype`/`DtypeOrAuto`: a second list of choices or
    a second help text fails here."""
    found = {}
    for path in SOURCE_FILES:
        for klass, name, annotation, value in settings_fields(path):
            found[f"{path.relative_to(ROOT)}:{klass}.{name}"] = (annotation, value)
    assert {"emovlm_kd/settings.py:DeviceArguments.dtype", "emovlm_kd/training/config.py:ModelArguments.dtype",
            "benchmarks/bench.py:BenchArguments.dtype", "benchmarks/bench.py:BenchArguments.device"} <= set(found)
    for where, (annotation, value) in found.items():
        name = where.rsplit(".", 1)[1]
        assert value.startswith(f"{FLAG_FIELDS[name]}("), where
        if name == "dtype":
            assert annotation in ("Dtype | None", "DtypeOrAuto"), where


def test_the_dtype_choices_and_the_device_help_are_written_once():
    """The choices of --dtype (`DTYPES`) and the words of --device's help stand in one place of the source."""
    import re

    written = {"dtype choices": re.compile(r"[\"']float16[\"']"), "device help": re.compile(r"cpu, cuda, cuda:1")}
    for what, pattern in written.items():
        places = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCE_FILES
                  for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
        assert places and all(place.startswith("emovlm_kd/settings.py:") for place in places), (what, places)
        assert len(places) == 1, (what, places)


def test_train_and_the_benchmark_parse_the_one_dtype_flag():
    """The parsers of `train` (TRL's TrlParser) and of the benchmark (HfArgumentParser) take --dtype's choices and
    help from `settings`; train keeps its default "auto" and its check of a YAML value, the benchmark its None."""
    from benchmarks.bench import BenchArguments, parse_args
    from emovlm_kd.settings import AUTO_DTYPE, DTYPES, DTYPES_OR_AUTO, device_field, dtype_field
    from emovlm_kd.training.config import ModelArguments, train_parser

    train = actions_by_dest(train_parser())["dtype"]
    assert (tuple(train.choices), train.default) == (DTYPES_OR_AUTO, AUTO_DTYPE) and DTYPES_OR_AUTO[1:] == DTYPES
    assert train.help == dtype_field(default=AUTO_DTYPE).metadata["help"]
    with pytest.raises(ValueError, match="--dtype must be auto/float32/bfloat16/float16, got 'float8'"):
        ModelArguments(dtype="float8")  # a YAML value (no argparse choices on that path)
    from transformers import HfArgumentParser

    bench = actions_by_dest(HfArgumentParser(BenchArguments))
    assert tuple(bench["dtype"].choices) == DTYPES and bench["dtype"].default is None
    assert bench["device"].help.startswith(device_field("x").metadata["help"][: -len("(default: x)")])
    assert parse_args(["--config", "tiny", "--dtype", "float16"]).dtype == "float16"
    with pytest.raises(SystemExit) as exited:
        parse_args(["--config", "tiny", "--dtype", "float8"])
    assert exited.value.code == 2


def test_the_commands_device_group_checks_its_dtype_from_python_too():
    from emovlm_kd.settings import DeviceArguments

    assert DeviceArguments(dtype="bfloat16").dtype == "bfloat16" and DeviceArguments().dtype is None
    with pytest.raises(ValueError, match="--dtype must be float32/bfloat16/float16, got 'auto'"):
        DeviceArguments(dtype="auto")
