"""Every command's settings: dataclasses, one field one flag, and the groups the commands share, defined once.

    DatasetArguments   how a dataset is read and split where it brings no split (evaluate, split, train)
    DataArguments      train's data group: the dataset, its split file, leakage and verification on top
    LeakageArguments   identical images in two splits: warn or stop (split, train)
    DeviceArguments    --device and --dtype (predict, evaluate, table1, demo); `device_field` / `dtype_field`, the
                       one definition of each flag, also make train's --dtype and the benchmark's
    QuantizationArguments  --load-in-4bit / --load-in-8bit (predict, evaluate, table1, demo)
    RuntimeArguments   DeviceArguments with --batch-size and --vlm-mode (predict, evaluate, table1), and QuantizationArguments
    DataPathArguments  --num-workers: the DataLoader processes feeding the model (predict, evaluate, table1)

A command's settings are a tuple of such dataclasses (its module's `ARGUMENTS`). `add_arguments(parser, groups)`
makes their fields flags by HfArgumentParser's rules (the parser `train` uses through TRL's `TrlParser`, over the
same `DataArguments`): `--name-with-dashes` and `--name_with_underscores`,
`Literal` types as choices, lists as `nargs="+"`, a field without default required, the field's `metadata`
("help", "metavar", "nargs", "action") passed to `add_argument`. Three differences keep the commands' behaviour and
their `--help` free of heavy imports (`transformers` alone takes seconds to import): a `bool` field defaulting to
False is a switch (`store_true`), `metadata={"positional": True}` makes a positional argument, and this module
imports nothing but the standard library and `emovlm_kd.errors`. `read(namespace, groups)` turns the parsed words
into the dataclasses; each checks its own values in `__post_init__` (`ValueError` naming the flag).

A new setting is a new field: its flag, its help and its check come with it.
"""

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Literal

from emovlm_kd import protocol as protocols  # stdlib only

DEMO = "demo"  # the synthetic dataset (and the tiny models) of the offline demo
DTYPES = ("float32", "bfloat16", "float16")  # the choices of every --dtype (`dtype_field`)
AUTO_DTYPE = "auto"  # train's --dtype default: bfloat16 on CUDA, else float32 (`runtime.resolve_dtype`)
DTYPES_OR_AUTO = (AUTO_DTYPE, *DTYPES)
Dtype = Literal[DTYPES]
DtypeOrAuto = Literal[DTYPES_OR_AUTO]
VLM_MODES = ("score", "generate")
SPLIT_RATIOS_RULE = "must be three shares (train val test) summing to 1, train and test > 0"


def split_ratios_ok(ratios):
    """The one split-ratio rule: three non-negative numbers (train, val, test) summing to 1, train and test > 0."""
    try:
        values = [float(value) for value in ratios]
    except (TypeError, ValueError):
        return False
    return (len(values) == 3 and min(values) >= 0 and values[0] > 0 and values[2] > 0
            and math.isclose(sum(values), 1.0, abs_tol=1e-6))


def check_split_ratios(ratios, name="split_ratios"):
    """`ratios` as a `(train, val, test)` tuple of floats, or a `ValueError` naming `name` and the rule."""
    if not split_ratios_ok(ratios):
        raise ValueError(f"{name} {SPLIT_RATIOS_RULE}, got {ratios!r}")
    return tuple(float(value) for value in ratios)


REQUIRED = MISSING  # help_field(text, REQUIRED): a field without default, a required flag (in a kw_only dataclass)


def help_field(text, default=None, **metadata):
    """A field with `default` and its flag's help (extra `metadata`: metavar, nargs, action, positional); a list
    default is copied for each instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text, **metadata})
    return field(default=default, metadata={"help": text, **metadata})


def dtype_field(unset="as saved", default=None):
    """The one `--dtype` field (its type: `Dtype | None`, or `DtypeOrAuto` where `default` is "auto"); `unset` says
    what None means, the help of "auto" is written here too."""
    if default == AUTO_DTYPE:
        return help_field(f"weights dtype; {AUTO_DTYPE}: bfloat16 on CUDA, else float32", default)
    return help_field(f"weights dtype (default: {unset})", default)


def device_field(unset="cuda when available"):
    """The one `--device` field (type `str | None`): None is `unset` (`runtime.resolve_device`: cuda when
    available)."""
    return help_field(f"cpu, cuda, cuda:1 ... (default: {unset})")


def dtype_ok(obj, auto=False):
    """(ok, flag, why) of `obj.dtype`: one of `DTYPES` (and "auto" with `auto`), or None where that is its default."""
    allowed = DTYPES_OR_AUTO if auto else DTYPES
    yield obj.dtype in allowed or (not auto and obj.dtype is None), "dtype", f"must be {'/'.join(allowed)}"


class Checked:
    """`__post_init__` runs every group's `_checks` (ok, flag, why) and raises `ValueError` naming the flag."""

    def __post_init__(self):
        for klass in type(self).__mro__:
            checks = klass.__dict__.get("_checks")
            for ok, flag, why in checks(self) if checks else ():
                if not ok:
                    raise ValueError(f"--{flag} {why}, got {getattr(self, flag.replace('-', '_'))!r}")


def positive(obj, *names, strict=True):
    """(ok, flag, why) of `names` > 0 (`strict`) or >= 1."""
    for name in names:
        value = getattr(obj, name)
        yield (value > 0 if strict else value >= 1), name.replace("_", "-"), "must be > 0" if strict else "must be >= 1"


# ---------------------------------------------------------------------------------------------------------------
# The shared groups
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DatasetArguments(Checked):
    """How a dataset is read, and split where it brings no split: `load_image_dataset`'s options (`dataset_options`)."""

    _argument_group_name = "Dataset"
    val_fraction: float = help_field("stratified share of train used as val when absent", 0.1)
    seed: int = help_field("seed of derived splits (train: also of initialisation and training)", 42)
    dataset_format: str | None = help_field("fi, emoset, emotion6, flickr, instagram, imagefolder, manifest or hub "
                                            "(default: detected)")
    split_ratios: list[float] | None = help_field("train val test shares where a dataset has no split (default: the "
                                                  "dataset's protocol, 0.8 0.05 0.15 for FI)", nargs=3,
                                                  metavar="SHARE")  # HfArgumentParser (train): nargs "+"
    emotion6_labels: Literal["folder", "argmax"] = help_field("Emotion6 labels: the class folder (the paper's) or the "
                                                              "argmax of ground_truth.txt", "folder")
    vote_rule: Literal["majority", "unanimous", "plurality"] = help_field(
        "Flickr/Instagram: the votes that make a positive/negative label (majority: 2 of 3)", "majority")
    label_column: str | None = help_field("save_to_disk/Hub/parquet datasets: the column holding the labels (default: "
                                          "label, labels, emotion or the first ClassLabel)")
    split_rule: Literal["paper", "official"] | None = help_field(protocols.knob_help(
        "split_rule", "how splits are made where the dataset has none: paper (the dataset's protocol) or official "
        "(EmoSet, Emotion6: val a stratified 10 % of train, sklearn train_test_split random_state 42, "
        "data_utils.py:107-128)"))

    def _checks(self):
        yield 0.0 < self.val_fraction < 1.0, "val-fraction", "must be in (0, 1)"
        yield self.split_ratios is None or split_ratios_ok(self.split_ratios), "split-ratios", SPLIT_RATIOS_RULE
        yield self.emotion6_labels in ("folder", "argmax"), "emotion6-labels", "must be folder or argmax"
        yield self.vote_rule in ("majority", "unanimous", "plurality"), "vote-rule", \
            "must be majority, unanimous or plurality"
        yield self.split_rule in (None, "paper", "official"), "split-rule", "must be paper or official"


DATASET_OPTIONS = tuple(f.name for f in dataclasses.fields(DatasetArguments))


def dataset_options(settings):
    """`load_image_dataset` keyword arguments from a `DatasetArguments` (or a run's `TrainConfig`, or any object with
    those names); unset ones (None, or absent) are left out, so the loader's defaults apply."""
    options = {name: getattr(settings, name, None) for name in DATASET_OPTIONS}
    if options["split_ratios"]:
        options["split_ratios"] = tuple(options["split_ratios"])
    if options.get("split_rule") == "paper":  # the loader's own rule: recorded as before the setting existed
        options["split_rule"] = None
    return {k: v for k, v in options.items() if v is not None}


@dataclass
class LeakageArguments(Checked):
    _argument_group_name = "Dataset"
    leakage: Literal["warn", "error"] = help_field("identical images in two splits: warn, or stop", "warn")

    def _checks(self):
        yield self.leakage in ("warn", "error"), "leakage", "must be warn or error"


@dataclass
class DataArguments(LeakageArguments, DatasetArguments):
    """`emovlm-kd train`'s data group."""

    _argument_group_name = "Data"
    dataset: str = help_field("dataset folder/manifest/Hub id, or 'demo' (synthetic)", DEMO)
    max_train_samples: int | None = help_field("cap the train split (debugging)")
    splits: str | None = help_field("a split file (emovlm-kd split / RUN/splits.json) to use instead of deriving one")
    verify_data: Literal["stat", "content"] = help_field(
        "what cache and stage keys see of each image file: stat (its size and modification time) or content (its size "
        "and sha256: reads every file; catches a change that keeps both, and a file rewritten with the same bytes "
        "keeps its caches)", "stat")

    def _checks(self):
        yield self.verify_data in ("stat", "content"), "verify-data", "must be stat or content"


@dataclass
class ProtocolArguments(Checked):
    """`--protocol` of evaluate, table1 and ablate (emovlm_kd/protocol.py): None keeps what the model or run has."""

    _argument_group_name = "Protocol"
    protocol: Literal[protocols.PROTOCOLS] | None = help_field(
        "paper or official: the VLM branch's answers and the split rule as the paper (deterministic label scores) or "
        "as the authors' code (one answer sampled at T 0.8, seeded, parsed as train_gate.py:83-93) (default: the "
        "model's own)")


@dataclass
class DeviceArguments(Checked):
    """Where a command computes and in which dtype (`emovlm_kd.runtime` resolves both)."""

    _argument_group_name = "Device"
    device: str | None = device_field()
    dtype: Dtype | None = dtype_field()

    def _checks(self):
        yield from dtype_ok(self)


@dataclass
class QuantizationArguments(Checked):
    """A quantised load of the language model (`hub.load_model(quantize=...)`)."""

    _argument_group_name = "Quantisation"
    load_in_4bit: bool = help_field("load the language model in 4-bit (bitsandbytes nf4, computing in --dtype); the "
                                    "head, gate, visual tower and lm_head stay in --dtype", False)
    load_in_8bit: bool = help_field("load the language model in 8-bit (bitsandbytes LLM.int8); the head, gate, visual "
                                    "tower and lm_head stay in --dtype", False)

    def _checks(self):
        yield not (self.load_in_4bit and self.load_in_8bit), "load-in-8bit", "cannot go with --load-in-4bit"

    @property
    def quantize(self):
        """4, 8 or None: the width `hub.load_model(quantize=...)` loads the language model in."""
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None


@dataclass
class RuntimeArguments(DeviceArguments, QuantizationArguments):
    """How a command runs a model over images: device, dtype, quantisation, batch size, the VLM branch's mode."""

    _argument_group_name = "Runtime"
    batch_size: int = help_field("images per forward pass", 8)
    vlm_mode: Literal[VLM_MODES] | None = help_field("how the VLM branch answers (default: the model's config; the "
                                                     "paper generates)")

    def _checks(self):
        yield from positive(self, "batch_size", strict=False)


# ---------------------------------------------------------------------------------------------------------------
# Fields -> flags -> dataclasses
# ---------------------------------------------------------------------------------------------------------------


class Subcommands(dict):
    """A command's subcommands (`ablate head-depth ...`): word -> its settings dataclass, whose `_help` and
    `_description` class attributes say what it does; `metavar` names the word in the usage line."""

    def __init__(self, commands, metavar="COMMAND"):
        super().__init__(commands)
        self.metavar = metavar


SUBCOMMAND = "_subcommand"  # where the parsed namespace keeps a Subcommands word


def add_arguments(parser, settings):
    """Every field of the dataclass `settings` (or of each of a tuple of them, or a `Subcommands`' dataclasses, one
    sub-parser each) as a flag of `parser` (the rules: this module's docstring). A class's own fields come first,
    then the shared groups' it inherits."""
    if isinstance(settings, Subcommands):
        sub = parser.add_subparsers(dest=SUBCOMMAND, required=True, metavar=settings.metavar)
        for word, klass in settings.items():
            add_arguments(sub.add_parser(word, help=klass._help, description=klass._description), klass)
        return parser
    for klass in settings if isinstance(settings, tuple) else (settings,):
        hints, own = typing.get_type_hints(klass), klass.__dict__.get("__annotations__", {})
        specs = [spec for spec in dataclasses.fields(klass) if spec.init]
        for spec in sorted(specs, key=lambda spec: spec.name not in own):  # stable: field order within each part
            _add_field(parser, spec, hints[spec.name])
    return parser


def _add_field(parser, spec, hint):
    kwargs = {k: v for k, v in spec.metadata.items() if k != "positional"}
    hint = _strip_optional(hint)
    origin = typing.get_origin(hint)
    if spec.default is not MISSING:
        kwargs["default"] = spec.default
    elif spec.default_factory is not MISSING:
        kwargs["default"] = spec.default_factory()
    if origin is Literal:
        kwargs["choices"] = typing.get_args(hint)
        kwargs.setdefault("type", type(kwargs["choices"][0]))
    elif hint is bool:
        if spec.default is not False:
            raise TypeError(f"{spec.name}: a bool field is a switch, off by default (default=False)")
        kwargs["action"] = "store_true"  # a switch, as before (HfArgumentParser: `--flag [BOOL]`)
    elif origin is list:
        if kwargs.get("action") != "append":
            kwargs.setdefault("nargs", "+")
        kwargs["type"] = typing.get_args(hint)[0]
    else:
        kwargs["type"] = hint
    if spec.metadata.get("positional"):
        if "default" in kwargs:
            kwargs.setdefault("nargs", "?")
        return parser.add_argument(spec.name, **kwargs)
    if "default" not in kwargs:
        kwargs["required"] = True
    dashed = f"--{spec.name.replace('_', '-')}"
    names = [dashed] if "_" not in spec.name else [dashed, f"--{spec.name}"]
    return parser.add_argument(*names, dest=spec.name, **kwargs)


def _strip_optional(hint):
    """`X` for `X | None` / `Optional[X]`, else `hint`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def read(namespace, settings):
    """The dataclass `settings` (a tuple of them, or the chosen one of `Subcommands`) from a parsed namespace; each
    checks its values (`ValueError` naming the flag)."""
    values = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    if isinstance(settings, Subcommands):
        settings = settings[values[SUBCOMMAND]]
    if isinstance(settings, tuple):
        return tuple(read(values, klass) for klass in settings)
    return settings(**{spec.name: values[spec.name] for spec in dataclasses.fields(settings)
                       if spec.init and spec.name in values})


def parser_for(settings, **kwargs):
    """A standalone `argparse.ArgumentParser` over `settings` (tests, scripts)."""
    return add_arguments(argparse.ArgumentParser(**kwargs), settings)


# ---------------------------------------------------------------------------------------------------------------
# The data path
# ---------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DataPathArguments(Checked):
    """The data path that feeds the model (`emovlm_kd.datapath`): `DataLoader` processes decode, prepare and run the
    processor beside it (predict, evaluate, table1)."""

    _argument_group_name = "Data path"
    num_workers: int | None = help_field("processes decoding and preparing images beside the model (default: the "
                                         "available cores less one, at most 8; 0: in the main process)")

    def _checks(self):
        yield self.num_workers is None or self.num_workers >= 0, "num-workers", "must be >= 0"
