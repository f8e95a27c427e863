"""Settings of a training run: one dataclass, read from YAML, every field overridable by a flag.

The defaults are the embedded demo (synthetic data, tiny models built offline); `configs/*.yaml` hold the paper's
settings for each dataset with Qwen2-VL-7B-Instruct and the ViT teacher.
"""

import dataclasses
import logging
from dataclasses import dataclass, field

from configuration_emovlm_kd import GATE_TYPES

logger = logging.getLogger(__name__)

DEMO = "demo"


@dataclass
class TrainConfig:
    # -- Data
    dataset: str = field(default=DEMO, metadata={"help": "dataset folder/manifest/Hub id, or 'demo' (synthetic)"})
    val_fraction: float = field(default=0.1, metadata={"help": "stratified share of train used as val when absent"})
    seed: int = field(default=42, metadata={"help": "seed of splits, initialisation and training"})
    max_train_samples: int | None = field(default=None, metadata={"help": "cap the train split (debugging)"})
    # -- Models
    vlm: str = field(default=DEMO, metadata={"help": "Qwen2-VL checkpoint (name or path), or 'demo' (tiny, offline)"})
    teacher: str = field(default=DEMO, metadata={"help": "teacher to fine-tune: any AutoModelForImageClassification"})
    teacher_trained: str | None = field(default=None, metadata={"help": "an already fine-tuned teacher: skip stage 2"})
    output_dir: str = field(default="runs/demo", metadata={"help": "run folder (RUN); RUN/model is the Hub model"})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push RUN/model to"})
    dtype: str = field(default="auto", metadata={"help": "float32, bfloat16 or auto (bf16 on CUDA)"})
    # -- Stage 0: instruction data
    instructions: str | None = field(default=None, metadata={"help": "JSONL of conversation/reasoning answers"})
    annotator: str | None = field(default=None, metadata={"help": "'openai' (OpenAI-compatible URL) or a local VLM"})
    annotator_url: str | None = field(default=None, metadata={"help": "chat endpoint base URL (key: $EMOVLM_KD_API_KEY)"})
    annotator_model: str | None = field(default=None, metadata={"help": "model name at the endpoint"})
    # -- Stage 1: instruction tuning (TRL SFTTrainer, LoRA / QLoRA)
    sft_epochs: float = 5.0
    sft_lr: float = 1e-4
    sft_batch_size: int = 1
    sft_grad_accum: int = 1
    lora_r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.05
    lora_targets: str = field(default="q_proj,k_proj,v_proj", metadata={"help": "LLM projections to adapt"})
    quantize: str = field(default="auto", metadata={"help": "4bit, none, or auto (4-bit nf4 when CUDA is present)"})
    # -- Stage 2: teacher
    teacher_epochs: float = 5.0
    teacher_lr: float = 5e-5
    teacher_batch_size: int = 32
    # -- Stage 3: distillation
    head_hidden_sizes: list[int] = field(default_factory=lambda: [1024])
    head_dropout: float = 0.1
    alpha: float = field(default=0.5, metadata={"help": "weight of the KL term, in [0, 1]"})
    tau: float = field(default=2.0, metadata={"help": "distillation temperature, > 0"})
    distill_epochs: float = 5.0
    distill_lr: float = 1e-3
    distill_batch_size: int = 32
    # -- Stage 4: gate
    gate_type: str = "concat_linear"
    vlm_vector: str = field(default="probs", metadata={"help": "probs or onehot (the paper's one-hot answer)"})
    gate_epochs: float = 10.0
    gate_lr: float = 1e-3
    gate_batch_size: int = 32
    gate_train_split: str = field(default="train", metadata={"help": "split the gate trains on: train or val"})
    # -- Inference while building caches
    batch_size: int = field(default=8, metadata={"help": "batch size of feature/answer caching and evaluation"})

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Fail at start, naming the flag, when a value cannot work."""
        self._coerce_numbers()
        checks = [
            (0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]"),
            (self.tau > 0, "tau", "must be > 0"),
            (self.gate_type in GATE_TYPES, "gate-type", f"must be one of {', '.join(GATE_TYPES)}"),
            (self.vlm_vector in ("probs", "onehot"), "vlm-vector", "must be probs or onehot"),
            (self.quantize in ("auto", "4bit", "none"), "quantize", "must be auto, 4bit or none"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", "must be auto/float32/bfloat16/float16"),
            (self.gate_train_split in ("train", "val"), "gate-train-split", "must be train or val"),
            (0.0 < self.val_fraction < 1.0, "val-fraction", "must be in (0, 1)"),
            (all(int(h) > 0 for h in self.head_hidden_sizes), "head-hidden-sizes", "must be positive integers"),
            (0.0 <= self.head_dropout < 1.0, "head-dropout", "must be in [0, 1)"),
        ]
        for name in ("sft_lr", "teacher_lr", "distill_lr", "gate_lr"):
            checks.append((getattr(self, name) > 0, name.replace("_", "-"), "must be > 0"))
        for name in ("sft_epochs", "teacher_epochs", "distill_epochs", "gate_epochs"):
            checks.append((getattr(self, name) > 0, name.replace("_", "-"), "must be > 0"))
        for name in ("sft_batch_size", "teacher_batch_size", "distill_batch_size", "gate_batch_size", "batch_size"):
            checks.append((getattr(self, name) >= 1, name.replace("_", "-"), "must be >= 1"))
        for ok, flag, why in checks:
            if not ok:
                raise ValueError(f"--{flag} {why}, got {getattr(self, flag.replace('-', '_'))!r}")
        self.head_hidden_sizes = [int(h) for h in self.head_hidden_sizes]

    def _coerce_numbers(self):
        """Numbers from YAML or Python ("1e-4", 8, "64,64") to the field's type, or a message naming the flag."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.type not in NUMBER_TYPES:
                continue
            try:
                setattr(self, f.name, _coerce(value, f.type))
            except (TypeError, ValueError, OverflowError):
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(f"{flag} must be {NUMBER_TYPES[f.type]}, got {value!r}") from None

    @property
    def is_demo(self):
        return self.vlm == DEMO

    def to_dict(self):
        return dataclasses.asdict(self)


NUMBER_TYPES = {float: "a number", int: "an integer", int | None: "an integer", list[int]: "integers"}


def _coerce(value, kind):
    """`value` as `kind` (float, int or list of ints); YAML reads `1e-4` as a string, booleans are refused."""
    if kind == list[int]:
        return [_coerce(item, int) for item in (value if isinstance(value, (list, tuple)) else str(value).split(","))]
    if isinstance(value, bool):
        raise TypeError(value)
    number = float(value)
    if kind is float:
        return number
    if number != int(number):
        raise ValueError(value)
    return int(number)


def demo_overrides():
    """The embedded demo: tiny models and the synthetic dataset, a few minutes on two CPU cores.

    Two departures from the paper's settings, both because the demo's VLM is tiny and randomly initialised:
    LoRA adapts every linear layer of its language model (q, k, v alone cannot move a random model's flat output
    distribution: the VLM branch stays at chance), and the gate trains on the held-out val split (on train both
    branches are nearly perfect, so the gate cannot learn which one to trust).
    """
    return dict(
        head_hidden_sizes=[64],
        sft_epochs=3.0,
        sft_lr=5e-3,
        sft_batch_size=8,
        lora_r=16,
        lora_alpha=32,
        lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        teacher_epochs=12.0,
        teacher_lr=2e-3,
        teacher_batch_size=32,
        distill_epochs=100.0,
        distill_lr=1e-2,
        gate_epochs=30.0,
        gate_lr=1e-2,
        gate_train_split="val",
    )


def load_config(path=None, overrides=None):
    """TrainConfig from a YAML file (or the demo defaults) with `overrides` (flag values) applied on top."""
    import yaml

    values = {}
    if path is None:
        values.update(demo_overrides())
    else:
        with open(path, encoding="utf-8") as handle:
            try:
                loaded = yaml.safe_load(handle)
            except yaml.YAMLError as error:
                raise ValueError(f"--config {path}: not valid YAML: {error}") from None
        if not isinstance(loaded, (dict, type(None))):
            raise ValueError(f"--config {path}: expected a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded or {})
        unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ValueError(f"--config {path}: unknown setting(s) {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig(**values)
