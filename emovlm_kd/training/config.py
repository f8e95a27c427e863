"""Settings of a training run: dataclasses parsed by TRL's `TrlParser` (`--config YAML`, every field a flag).

    cfg = parse_train_args(["--config", "fi", "--alpha", "0.3"])   # a shipped config by name, or any YAML path
    cfg = load_config("my.yaml", {"alpha": 0.3})                    # the same from Python
    cfg = TrainConfig(alpha=0.3)                                    # the paper's settings, one field changed

The dataclass defaults are the paper's settings (Qwen2-VL-7B-Instruct and the ViT teacher where the paper names
them); the embedded demo is the shipped `demo.yaml` (tiny models built offline, synthetic data), which is what
`emovlm-kd train` runs without `--config` (`train --dataset DIR`: its tiny models and settings on DIR, without the
synthetic data's reasoning answers). Each group checks its own ranges in `__post_init__` and names the flag.
"""

import argparse
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from configuration_emovlm_kd import DEFAULT_MAX_IMAGE_SIDE, GATE_TYPES, MIN_IMAGE_SIDE, SUPPORTED_BACKBONES
from emovlm_kd import protocol as protocols
from emovlm_kd.errors import InputError
from emovlm_kd.settings import DEMO, DataArguments
from emovlm_kd.settings import Checked as _Checked
from emovlm_kd.settings import help_field as _help
from emovlm_kd.settings import positive as _positive_set
from emovlm_kd.settings import AUTO_DTYPE, DtypeOrAuto, dtype_field, dtype_ok

DEMO_BACKBONE = "qwen2_vl"  # `--vlm demo` is `--vlm demo:qwen2_vl`
INSTRUCTION_KINDS = ("categorical", "conversation", "reasoning")  # the paper's three kinds of stage 1 rows
DEFAULT_CONFIG = "demo"


def demo_backbone(vlm):
    """The tiny backbone a `--vlm` value asks for: `demo` -> `qwen2_vl`, `demo:qwen3_vl` -> `qwen3_vl`; None for a
    checkpoint (a folder or a Hub name)."""
    vlm = str(vlm)
    if vlm == DEMO:
        return DEMO_BACKBONE
    return vlm[len(DEMO) + 1 :] if vlm.startswith(DEMO + ":") else None


def _knob(knob, text):
    """A field of the `--protocol` preset (emovlm_kd/protocol.py): None until the run's protocol fills it."""
    return field(default=None, metadata={"help": protocols.knob_help(knob, text)})


def _one_of(obj, name, allowed):
    """(ok, flag, why) of a knob that is None (filled later by the protocol) or one of `allowed`."""
    value = getattr(obj, name)
    return value is None or value in allowed, name.replace("_", "-"), f"must be one of {', '.join(map(str, allowed))}"


def _positive(obj, *names, strict=True):
    """settings.positive over `names`, skipping a protocol knob still None (the protocol fills it later)."""
    yield from _positive_set(obj, *(n for n in names if not (n in protocols.KNOBS and getattr(obj, n) is None)),
                             strict=strict)


class StageArguments(_Checked):
    """The settings of one stage: each field is a knob, and a knob is one field and nothing else.

    A field is a flag and a YAML key (`train_parser` reads the groups), enters the stage's key (the stage hashes the
    group's fields with its inputs) and reaches the stage's Trainer: `training.arguments.training_arguments` derives
    the stage's `TrainingArguments` subclass (e.g. `DistillTrainingArguments`, which subclasses TrainingArguments and
    this group as TRL's `GKDConfig` subclasses `TrainingArguments`), holding every field under its own name
    (`args.alpha`), with the stage's fixed values (`recipe`); a field named in `renames` also sets the
    TrainingArguments field it stands for (`sft_lr` -> `learning_rate`: the flags keep their stage prefix). Stage 0
    trains nothing. A run builds each group once (`TrainConfig.stage_groups`) and hands each stage its own; the
    stage's helpers get values.
    """

    stage = None  # the stage's folder and key name (RUN/<stage>_...)
    renames = {}  # {field: the TrainingArguments field it also sets}

    def __post_init__(self):
        protocols.fill(self)  # the knobs left unset: the protocol's (a group on its own: paper's)
        super().__post_init__()

    @classmethod
    def of(cls, settings):
        """This group's fields of `settings`, settings already checked that hold them (the flat `TrainConfig`, whose
        construction ran every group's checks): a new instance of this exact class, so that keys see this group
        only. The values are copied as they are, not checked again."""
        return cls.from_fields(vars(settings))

    @classmethod
    def from_fields(cls, values):
        """`of` from a mapping of field values (checked already)."""
        group = object.__new__(cls)
        group.__dict__.update({f.name: copy.copy(values[f.name]) for f in dataclasses.fields(cls)})
        return group

    @classmethod
    def recipe(cls, knobs):
        """The TrainingArguments values the stage fixes (not knobs), given the group's field values `knobs`."""
        return {}


class CachedRowsArguments(StageArguments):
    """Stages 2-4: one log line an epoch, the rows as they are, one global batch split across processes (the same
    updates under torchrun as in one process)."""

    @classmethod
    def recipe(cls, knobs):
        from emovlm_kd.logs import interactive

        return dict(logging_strategy="epoch", remove_unused_columns=False, dataloader_num_workers=0,
                    disable_tqdm=not interactive(), accelerator_config={"split_batches": True})


class SmallModuleArguments(CachedRowsArguments):
    """Stages 3 and 4 (the head, the gate): weight decay 1e-4 (the official Adam's, train_distillation.py:111 and
    train_gate.py:336), and a constant rate where the group's optimiser knob (`optimizer_knob`) is `adam`, as the
    official code; Trainer's linear decay with `adamw`."""

    optimizer_knob = None  # the field naming the stage's optimiser

    @classmethod
    def recipe(cls, knobs):
        return {**super().recipe(knobs), "weight_decay": 1e-4,
                **({"lr_scheduler_type": "constant"} if knobs[cls.optimizer_knob] == "adam" else {})}


@dataclass
class ModelArguments(_Checked):
    _argument_group_name = "Models and output"
    protocol: Literal["paper", "official"] = field(
        default="paper", metadata={"help": "paper (the paper's text, this project's defaults) or official (what the "
                                           "authors' code ran: fills every knob marked 'the --protocol's' that is "
                                           "not set; README: What differs from the paper and its code)"}
    )
    vlm: str = field(default=DEMO, metadata={"help": "Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint (name or path), or "
                                                     "'demo' (tiny Qwen2-VL, offline), 'demo:qwen2_5_vl', "
                                                     "'demo:qwen3_vl'"})
    teacher: str = field(default=DEMO, metadata={"help": "teacher to fine-tune: any AutoModelForImageClassification"})
    teacher_trained: str | None = _help("an already fine-tuned teacher: skip stage 2")
    output_dir: str = field(default="runs/demo", metadata={"help": "run folder (RUN); RUN/model is the Hub model"})
    push_to_hub: str | None = _help("Hub repo id to push RUN/model to")
    license: str | None = _help("the model card's license (a Hub license id); default: the base model's")
    dtype: DtypeOrAuto = dtype_field(default=AUTO_DTYPE)
    batch_size: int = field(default=8, metadata={"help": "batch size of feature/answer caching and evaluation"})
    max_image_side: int = field(
        default=DEFAULT_MAX_IMAGE_SIDE, metadata={"help": "images are scaled down to this long side (px) in SFT, the "
                                                          "caches and the model (saved with it), as the official code"}
    )

    def _checks(self):
        yield self.protocol in protocols.PROTOCOLS, "protocol", f"must be one of {', '.join(protocols.PROTOCOLS)}"
        yield from dtype_ok(self, auto=True)
        yield from _positive(self, "batch_size", strict=False)
        yield self.max_image_side >= MIN_IMAGE_SIDE, "max-image-side", f"must be >= {MIN_IMAGE_SIDE}"
        yield demo_backbone(self.vlm) in (None, *SUPPORTED_BACKBONES), "vlm", \
            f"names a tiny demo backbone: demo:{' or demo:'.join(SUPPORTED_BACKBONES)}"


@dataclass
class InstructionArguments(StageArguments):
    _argument_group_name = "Stage 0: instruction data"
    stage = "stage0"
    instructions: str | None = _help("JSONL of conversation/reasoning answers ('demo': the synthetic dataset's)")
    annotator: str | None = _help("'openai' (OpenAI-compatible URL) or a local VLM")
    annotator_url: str | None = _help("chat endpoint base URL (key: $EMOVLM_KD_API_KEY)")
    annotator_model: str | None = _help("model name at the endpoint")
    instruction_kinds: list[str] = field(
        default_factory=lambda: list(INSTRUCTION_KINDS),
        metadata={"help": "the instruction mix of stage 1 (the paper's: categorical conversation reasoning); "
                          "conversation and reasoning need --instructions or --annotator; 'categorical' alone "
                          "trains on a third of the paper's data"},
    )
    chat_format: Literal["paper", "official"] | None = _knob(
        "chat_format", "the chat of stages 0-1 and of the model: paper (the backbone's system message, image then "
        "text, the paper's questions) or official (the official system message, text then image, the questions with "
        "their 'Example:' passages, the categorical prompt 'None')")
    annotator_prompt: Literal["paper", "official"] | None = _knob(
        "annotator_prompt", "what --annotator is asked: paper (this project's wording, the dataset's labels) or "
        "official (prompt_template.txt: the 8 Mikels labels for every dataset)")

    def _checks(self):
        kinds = self.instruction_kinds
        if isinstance(kinds, str):  # YAML `instruction_kinds: categorical` or `categorical,reasoning`
            kinds = kinds.replace(",", " ").split()
        self.instruction_kinds = [str(k).strip().lower() for k in kinds]
        yield all(k in INSTRUCTION_KINDS for k in self.instruction_kinds), "instruction-kinds", \
            f"must be some of {', '.join(INSTRUCTION_KINDS)}"
        yield "categorical" in self.instruction_kinds, "instruction-kinds", \
            "must include categorical (the rows that teach the answer the VLM branch scores)"
        yield len(set(self.instruction_kinds)) == len(self.instruction_kinds), "instruction-kinds", "lists a kind twice"
        yield _one_of(self, "chat_format", ("paper", "official"))
        yield _one_of(self, "annotator_prompt", ("paper", "official"))


@dataclass
class SFTArguments(StageArguments):
    _argument_group_name = "Stage 1: instruction tuning (TRL SFTTrainer, LoRA / QLoRA)"
    stage = "stage1"

    renames = {"sft_epochs": "num_train_epochs", "sft_lr": "learning_rate",
               "sft_batch_size": "per_device_train_batch_size", "sft_grad_accum": "gradient_accumulation_steps"}
    sft_epochs: float = field(default=5.0, metadata={"help": "stage 1 epochs over the instruction rows"})
    sft_lr: float = field(default=1e-4, metadata={"help": "stage 1 learning rate (LoRA weights)"})
    sft_batch_size: int = field(default=1, metadata={"help": "stage 1 rows per device and step"})
    sft_grad_accum: int = field(default=1, metadata={"help": "stage 1 gradient accumulation steps"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA inputs"})
    lora_targets: str = field(default="q_proj,k_proj,v_proj", metadata={"help": "LLM projections to adapt"})
    quantize: Literal["auto", "4bit", "none"] = field(
        default="auto", metadata={"help": "4bit, none, or auto (4-bit nf4 when CUDA is present)"}
    )
    quantize_scope: Literal["llm", "all"] | None = _knob(
        "quantize_scope", "what 4-bit quantises: llm (the vision tower and lm_head kept) or all (transformers' "
        "default skip list only, as the official BitsAndBytesConfig)")
    sft_loss: Literal["answer", "all_tokens"] | None = _knob(
        "sft_loss", "stage 1 loss: answer (the assistant's tokens) or all_tokens (every token but padding and "
        "image tokens, system and user prompt included)")
    sft_scheduler: Literal["constant_with_warmup", "constant"] | None = _knob(
        "sft_scheduler", "stage 1 schedule: constant_with_warmup (3 % warmup) or constant (no warmup)")
    sft_tf32: bool | None = _knob("sft_tf32", "stage 1 TF32 matmuls (TrainingArguments' tf32, where CUDA has TF32; "
                                            "elsewhere left off with a log line)")

    @classmethod
    def recipe(cls, knobs):
        """The schedule (`sft_scheduler` constant_with_warmup: constant after a 3 % warm-up; constant: no warm-up,
        as the official `warmup_ratio=0.03` with `lr_scheduler_type="constant"`, train_vlm.py:102-103, which
        transformers' `get_scheduler` builds without warm-up), gradient norm clipped at 0.3, a log line every 10
        steps, rows as long as they are, one global batch split across processes where it divides; `sft_loss`
        all_tokens: TRL's loss on every token (`completion_only_loss=False`; the image tokens: `sft_collator`)."""
        from emovlm_kd.distributed import world_size

        scheduler = knobs["sft_scheduler"]
        return dict(lr_scheduler_type=scheduler,
                    warmup_steps=0.03 if scheduler == "constant_with_warmup" else 0,  # a ratio of the steps
                    max_grad_norm=0.3, max_length=None, logging_strategy="steps", logging_steps=10,
                    accelerator_config={"split_batches": world_size() > 1
                                        and knobs["sft_batch_size"] % world_size() == 0},
                    **({"completion_only_loss": False} if knobs["sft_loss"] == "all_tokens" else {}))

    def _checks(self):
        yield _one_of(self, "quantize_scope", ("llm", "all"))
        yield _one_of(self, "sft_loss", ("answer", "all_tokens"))
        yield _one_of(self, "sft_scheduler", ("constant_with_warmup", "constant"))
        yield self.quantize in ("auto", "4bit", "none"), "quantize", "must be auto, 4bit or none"
        yield from _positive(self, "sft_epochs", "sft_lr")
        yield from _positive(self, "sft_batch_size", "sft_grad_accum", strict=False)


@dataclass
class TeacherArguments(CachedRowsArguments):
    _argument_group_name = "Stage 2: teacher"
    stage = "stage2"

    renames = {"teacher_epochs": "num_train_epochs", "teacher_lr": "learning_rate",
               "teacher_batch_size": "per_device_train_batch_size", "teacher_weight_decay": "weight_decay",
               "teacher_scheduler": "lr_scheduler_type"}
    # The official train_ViT.py's recipe (the paper gives none): Adam (L2 weight decay on every parameter),
    # lr 3e-5, weight decay 1e-5, batch 10, 10 epochs, no schedule.
    teacher_epochs: float = field(default=10.0, metadata={"help": "stage 2 epochs (teacher fine-tuning)"})
    teacher_lr: float = field(default=3e-5, metadata={"help": "stage 2 learning rate"})
    teacher_batch_size: int = field(default=10, metadata={"help": "stage 2 images per step"})
    teacher_weight_decay: float = field(default=1e-5, metadata={"help": "stage 2 weight decay"})
    teacher_optimizer: Literal["adam", "adamw"] = field(
        default="adam", metadata={"help": "adam (the official code's: torch.optim.Adam, L2 decay on every parameter) "
                                          "or adamw (transformers' default: decoupled decay, none on biases and norms)"}
    )
    teacher_scheduler: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata={"help": "learning-rate schedule (the official code's: constant)"}
    )

    def _checks(self):
        yield from _positive(self, "teacher_epochs", "teacher_lr")
        yield from _positive(self, "teacher_batch_size", strict=False)
        yield self.teacher_weight_decay >= 0, "teacher-weight-decay", "must be >= 0"
        yield self.teacher_optimizer in ("adam", "adamw"), "teacher-optimizer", "must be adam or adamw"
        yield self.teacher_scheduler in ("constant", "linear", "cosine"), "teacher-scheduler", \
            "must be constant, linear or cosine"


@dataclass
class DistillArguments(SmallModuleArguments):
    _argument_group_name = "Stage 3: distillation"
    stage = "stage3"
    optimizer_knob = "distill_optimizer"

    renames = {"distill_epochs": "num_train_epochs", "distill_lr": "learning_rate",
               "distill_batch_size": "per_device_train_batch_size"}
    head_hidden_sizes: list[int] = field(default_factory=lambda: [1024], metadata={"help": "head widths, e.g. 1024 512"})
    head_dropout: float = field(default=0.1, metadata={"help": "dropout between the head's layers, in [0, 1)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the KL term, in [0, 1]"})
    tau: float = field(default=2.0, metadata={"help": "distillation temperature, > 0"})
    distill_epochs: float = field(default=5.0, metadata={"help": "stage 3 epochs (head distillation)"})
    distill_lr: float = field(default=1e-3, metadata={"help": "stage 3 learning rate"})
    distill_batch_size: int | None = _knob("distill_batch_size", "stage 3 images per step")
    distill_optimizer: Literal["adamw", "adam"] | None = _knob(
        "distill_optimizer", "stage 3 optimiser: adamw (Trainer's, linear decay) or adam (torch.optim.Adam, L2 "
        "weight decay 1e-4, constant rate)")
    distill_init: Literal["normal", "pytorch"] | None = _knob(
        "distill_init", "the head's initial weights: normal (N(0, 0.02), zero bias) or pytorch (nn.Linear's)")

    def _checks(self):
        self.head_hidden_sizes = [int(h) for h in self.head_hidden_sizes]
        yield all(h > 0 for h in self.head_hidden_sizes), "head-hidden-sizes", "must be positive integers"
        yield 0.0 <= self.head_dropout < 1.0, "head-dropout", "must be in [0, 1)"
        yield 0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]"
        yield _one_of(self, "distill_optimizer", ("adamw", "adam"))
        yield _one_of(self, "distill_init", ("normal", "pytorch"))
        yield self.tau > 0, "tau", "must be > 0"
        yield from _positive(self, "distill_epochs", "distill_lr")
        yield from _positive(self, "distill_batch_size", strict=False)


@dataclass
class GateArguments(SmallModuleArguments):
    _argument_group_name = "Stage 4: gate"
    stage = "stage4"
    optimizer_knob = "gate_optimizer"

    renames = {"gate_epochs": "num_train_epochs", "gate_lr": "learning_rate",
               "gate_batch_size": "per_device_train_batch_size"}
    gate_type: Literal[GATE_TYPES] = field(
        default="concat_linear", metadata={"help": "how the gate combines the VLM branch's vector with the head's"}
    )
    vlm_vector: Literal["probs", "onehot"] = field(
        default="probs", metadata={"help": "probs or onehot (the paper's one-hot answer)"}
    )
    gate_epochs: float = field(default=10.0, metadata={"help": "stage 4 epochs (gate)"})
    gate_lr: float = field(default=1e-3, metadata={"help": "stage 4 learning rate"})
    gate_batch_size: int | None = _knob("gate_batch_size", "stage 4 images per step")
    gate_optimizer: Literal["adamw", "adam"] | None = _knob(
        "gate_optimizer", "stage 4 optimiser: adamw (Trainer's, linear decay) or adam (torch.optim.Adam, L2 weight "
        "decay 1e-4, constant rate)")
    gate_init: Literal["normal", "pytorch"] | None = _knob(
        "gate_init", "the gate's initial weights: normal (N(0, 0.02), zero bias) or pytorch (nn.Linear's)")
    gate_input: Literal["probs", "logits"] | None = _knob(
        "gate_input", "what the gate reads of the head: probs (softmax) or logits (raw)")
    answer_protocol: Literal["score", "official"] | None = _knob(
        "answer_protocol", "the VLM branch of the gate's val/test vectors and of the model: score (label "
        "log-likelihoods, deterministic) or official (one answer sampled at T 0.8, 256 new tokens, seeded, after a "
        "prompt without the generation prompt, parsed as the official code)")
    gate_data: Literal["sampled", "val", "train"] = field(
        default="train", metadata={"help": "what the gate trains on: sampled (the paper's: --gate-samples answers "
                                           "per train image sampled at --gate-temperature, one per epoch, cycled; "
                                           "needs --vlm-vector onehot), val (the VLM on held-out val images) or "
                                           "train (the VLM's deterministic answers on the train images)"}
    )
    gate_samples: int = field(default=10, metadata={"help": "sampled answers per train image (gate-data sampled)"})
    gate_temperature: float = field(default=0.8, metadata={"help": "sampling temperature (gate-data sampled)"})
    gate_train_split: Literal["train", "val"] | None = _help("old name of --gate-data train|val (sets it)")

    def _checks(self):
        if self.gate_train_split is not None:  # the old setting: folded into gate_data
            self.gate_data, self.gate_train_split = self.gate_train_split, None
        yield self.gate_type in GATE_TYPES, "gate-type", f"must be one of {', '.join(GATE_TYPES)}"
        yield _one_of(self, "gate_optimizer", ("adamw", "adam"))
        yield _one_of(self, "gate_init", ("normal", "pytorch"))
        yield _one_of(self, "gate_input", ("probs", "logits"))
        yield _one_of(self, "answer_protocol", ("score", "official"))
        yield self.vlm_vector in ("probs", "onehot"), "vlm-vector", "must be probs or onehot"
        yield self.gate_data in ("sampled", "val", "train"), "gate-data", "must be sampled, val or train"
        yield self.gate_data != "sampled" or self.vlm_vector == "onehot", "gate-data", \
            "sampled trains the gate on sampled answers (one-hot vectors): use it with --vlm-vector onehot"
        yield from _positive(self, "gate_samples", strict=False)
        yield self.gate_temperature > 0, "gate-temperature", "must be > 0"
        yield from _positive(self, "gate_epochs", "gate_lr")
        yield from _positive(self, "gate_batch_size", strict=False)


STAGE_GROUPS = (InstructionArguments, SFTArguments, TeacherArguments, DistillArguments, GateArguments)
GROUPS = (DataArguments, ModelArguments, *STAGE_GROUPS)


class StageGroups(NamedTuple):
    """Each stage's group of a run's settings (`TrainConfig.stage_groups`)."""

    instruction: InstructionArguments
    sft: SFTArguments
    teacher: TeacherArguments
    distill: DistillArguments
    gate: GateArguments


class _Group:
    """A `TrainConfig` attribute giving one stage's group of its settings (`StageArguments.of`)."""

    def __init__(self, group):
        self.group = group

    def __get__(self, settings, owner=None):
        return self if settings is None else self.group.of(settings)


@dataclass
class TrainConfig(GateArguments, DistillArguments, TeacherArguments, SFTArguments, InstructionArguments,
                  ModelArguments, DataArguments):
    """Every setting of a run, flat (`cfg.alpha`, `cfg.vlm`, ...): the union of the argument groups. Each stage
    receives its own group alone (`cfg.distill_args`, ...) and the shared runtime values it needs, by name. The
    knobs left unset are filled from `protocol` (emovlm_kd/protocol.py) before the checks run."""

    def __post_init__(self):
        protocols.fill(self)
        super().__post_init__()

    instruction_args = _Group(InstructionArguments)
    sft_args = _Group(SFTArguments)
    teacher_args = _Group(TeacherArguments)
    distill_args = _Group(DistillArguments)
    gate_args = _Group(GateArguments)

    def stage_groups(self):
        """Every stage's group, built once (`StageGroups`): what `run_training` hands the stages, each its own."""
        values = vars(self)
        return StageGroups(*(group.from_fields(values) for group in STAGE_GROUPS))

    @property
    def is_demo(self):
        """Whether the VLM is the demo's tiny one (`demo`, `demo:qwen2_5_vl`...), built offline under RUN/base."""
        return demo_backbone(self.vlm) is not None

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_groups(cls, *groups):
        return cls(**{k: v for group in groups for k, v in dataclasses.asdict(group).items()})


def resolve_config_path(value):
    """A YAML path that exists, else the shipped config of that name (`fi`, `fi.yaml`, `configs/fi.yaml`)."""
    from emovlm_kd import configs

    if Path(value).is_file():
        return str(value)
    shipped = configs.path(value)
    if shipped is None:
        raise FileNotFoundError(f"--config: no such file {value!r} (shipped configs: {', '.join(configs.names())})")
    return str(shipped)


def train_parser(prog="emovlm-kd train"):
    """TRL's parser over the argument groups, with `--config` documented (TrlParser reads it itself)."""
    from trl import TrlParser

    from emovlm_kd.helptext import HelpFormatter  # flags with dashes; each option's default that applies (the
    # --config's value when it sets one, as TrlParser puts the YAML's values in the defaults)

    parser = TrlParser(GROUPS, prog=prog, formatter_class=HelpFormatter,
                       description="Every stage from a dataset and a Qwen2-VL checkpoint to one Hub model. Values: "
                                   "the flag, else --config, else the field's default.")
    parser.add_argument("--config", default=argparse.SUPPRESS, help=f"YAML settings, or a shipped config by name (default: {DEFAULT_CONFIG}, "
                        "the offline demo)")
    return parser


def parse_train_args(argv):
    """`TrainConfig` from command-line words; without `--config` the shipped demo config applies (with a `--dataset`
    of the user's, all but its synthetic data's settings: `for_a_users_dataset`).

    Raises `ValueError` (bad values, unknown YAML keys, YAML that is not a mapping) or `FileNotFoundError`; argparse
    itself exits with status 2 on a malformed flag and prints the help for `--help`.
    """
    import yaml

    argv = list(argv)
    for i, word in enumerate(argv):
        if word.startswith("--config="):
            argv[i : i + 1] = ["--config", word.split("=", 1)[1]]
    implicit_demo = "--config" not in argv  # demo.yaml applies without being asked for
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError("--config needs a file or a shipped config name")
        argv[at + 1] = resolve_config_path(argv[at + 1])
        where = argv[at + 1]
    else:
        where = resolve_config_path(DEFAULT_CONFIG)
        argv = ["--config", where, *argv]
    try:
        parsed = train_parser().parse_args_and_config(argv)
    except yaml.YAMLError as error:
        raise ValueError(f"--config {where}: not valid YAML: {error}") from None
    except ValueError as error:
        raise ValueError(f"--config {where}: {error}") if "config" in str(error).lower() else error from None
    cfg = TrainConfig.from_groups(*(part for part in parsed if dataclasses.is_dataclass(part)))
    cfg = preset_knobs(cfg, argv, where)
    shipped_demo = Path(where).resolve() == Path(str(resolve_config_path(DEFAULT_CONFIG))).resolve()
    if implicit_demo and cfg.dataset != DEMO:  # `train --dataset DIR`: not the synthetic data's settings
        cfg = for_a_users_dataset(cfg, argv)
    if shipped_demo and demo_backbone(cfg.vlm) not in (None, DEMO_BACKBONE) and not _given(argv, "output-dir"):
        # the shipped demo on another backbone gets its own run folder (runs/demo-qwen3_vl), not the Qwen2-VL demo's
        cfg = dataclasses.replace(cfg, output_dir=f"{cfg.output_dir}-{demo_backbone(cfg.vlm)}")
    return cfg


def preset_knobs(cfg, argv, config_path):
    """`cfg` with every protocol knob that neither a flag nor the YAML sets taken from `cfg.protocol`: the parser
    builds each group on its own, which fills its knobs with the paper's values (a group knows no protocol)."""
    import yaml

    given = set(yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {})
    unset = {knob: None for knob in protocols.KNOBS
             if hasattr(cfg, knob) and knob not in given and not _given(argv, knob.replace("_", "-"))}
    return dataclasses.replace(cfg, **unset) if cfg.protocol != protocols.DEFAULT_PROTOCOL and unset else cfg


def for_a_users_dataset(cfg, argv):
    """The shipped demo's settings, applied without --config, on a user's `--dataset`: the embedded tiny models and the demo's training settings
    stay, but what demo.yaml says about its synthetic data does not apply unless given as a flag: no synthetic
    reasoning answers (`instructions: demo`), the categorical instructions alone (the paper's three kinds when
    --instructions or --annotator gives answers), and RUN is runs/<dataset name>, not runs/demo. Logs one line
    saying what the run uses and how to add conversation/reasoning answers."""
    import logging

    values = {}
    if not _given(argv, "instructions"):
        values["instructions"] = None
    if not _given(argv, "instruction-kinds"):
        has_answers = _given(argv, "instructions") or _given(argv, "annotator")
        values["instruction_kinds"] = list(INSTRUCTION_KINDS) if has_answers else ["categorical"]
    if not _given(argv, "output-dir"):
        values["output_dir"] = default_output_dir(cfg.dataset)
    cfg = dataclasses.replace(cfg, **values)
    used = []
    embedded = [part for part, is_embedded in (("VLM", cfg.is_demo), ("teacher", cfg.teacher == DEMO
                                                                         and not cfg.teacher_trained)) if is_embedded]
    if embedded:
        used.append(f"the embedded tiny {' and '.join(embedded)} (built offline under RUN/base; --vlm and --teacher "
                    "take real checkpoints)")
    if cfg.instruction_kinds == ["categorical"]:
        used.append("the categorical instructions only (to add conversation/reasoning answers: --instructions FILE "
                    "or --annotator, with --instruction-kinds categorical conversation reasoning)")
    if used:
        logging.getLogger(__name__).info("training on %s with %s; run folder %s", cfg.dataset, " and ".join(used),
                                         cfg.output_dir)
    return cfg


def default_output_dir(dataset):
    """runs/<the dataset's folder or file name> (runs/<NAME> for a Hub id ORG/NAME); never the demo's runs/demo."""
    import re

    path = Path(str(dataset)).expanduser()
    if path.exists():
        path = path.resolve()
        name = path.stem if path.is_file() else path.name
    else:
        name = str(dataset).rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^\w.-]+", "_", name).strip("._") or "dataset"
    return f"runs/{name}" if name != DEMO else "runs/demo-dataset"


def _given(argv, flag):
    """Whether `--flag` (or `--flag_with_underscores`, as HfArgumentParser also takes it) is among `argv`."""
    spellings = {f"--{flag}", f"--{flag.replace('-', '_')}"}
    return any(word.split("=", 1)[0] in spellings for word in argv)


def load_config(path=None, overrides=None):
    """`TrainConfig` from a YAML file (or the shipped demo) with `overrides` (field -> value, None ignored) on top."""
    cfg = parse_train_args(["--config", str(path)] if path else [])
    return dataclasses.replace(cfg, **{k: v for k, v in (overrides or {}).items() if v is not None})


HOW_TO_GET_ANSWERS = (
    "pass --instructions FILE (JSONL lines {\"id\", \"kind\": \"conversation\"|\"reasoning\", \"answer\"}, or the "
    "official code's annotation JSON), or --annotator openai --annotator-url URL --annotator-model NAME (key in "
    "$EMOVLM_KD_API_KEY), or --annotator PATH_OR_ID (a local VLM); or train on the categorical rows alone, a third of "
    "the paper's data, with --instruction-kinds categorical"
)


def instruction_source_problems(kinds, instructions=None, annotator=None, dataset=None):
    """Lines naming the fix when the instruction mix `kinds` (`--instruction-kinds`) needs conversation/reasoning
    answers and neither `instructions` (`--instructions`) nor `annotator` (`--annotator`) gives them, or a source is
    given that the mix does not use, or `--instructions demo` goes with another `dataset` than the demo's, or an
    `--instructions` file is missing (empty when all is well)."""
    found = []
    wanted = [kind for kind in kinds if kind != "categorical"]
    given = [flag for flag, value in (("--instructions", instructions), ("--annotator", annotator)) if value]
    if wanted and not given:
        found.append(f"the instruction mix ({' '.join(kinds)}) needs {' and '.join(wanted)} answers "
                     f"and none were given: {HOW_TO_GET_ANSWERS}")
    if given and not wanted:
        found.append(f"{' and '.join(given)} given, but --instruction-kinds categorical uses no conversation or "
                     "reasoning answers: drop it, or add the kinds (--instruction-kinds categorical conversation "
                     "reasoning)")
    if instructions == DEMO and dataset not in (None, DEMO):
        found.append("--instructions demo (the synthetic dataset's reasoning answers) goes with --dataset demo")
    if instructions and instructions != DEMO and not Path(instructions).is_file():
        found.append(f"--instructions {instructions}: no such file")
    return found


def check_instruction_sources(settings, dataset=None):
    """`InputError` with every line of `instruction_source_problems` of `settings` (an `InstructionArguments`, or
    the flat `TrainConfig`), if any."""
    found = instruction_source_problems(settings.instruction_kinds, settings.instructions, settings.annotator,
                                        dataset)
    if found:
        raise InputError("; ".join(found))
