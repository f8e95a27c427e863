"""Configuration of EmoVLM-KD: a Qwen-VL backbone (Qwen2-VL, Qwen2.5-VL or Qwen3-VL), a distillation head on its visual
encoder and a gate.

This file travels to the Hub with the model: it imports only `transformers` (and the standard library).
"""

from collections.abc import Sequence
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

GATE_TYPES = ("concat_linear", "moe", "bilinear", "dynamic_weighting", "cross_gating")
VLM_MODES = ("score", "generate")
VLM_VECTORS = ("probs", "onehot")
CHAT_FORMATS = ("paper", "official")
ANSWER_PARSINGS = ("lenient", "official")
GATE_INPUTS = ("probs", "logits")
# The official code's categorical prompt builder (github sange1104/EmoVLM-KD at fdffa10, data_utils.py:131-146) has
# no `return`, so the prompt every official run trained and tested with is None, which Qwen2-VL's chat template
# renders as the text "None" (Jinja prints None as "None"; checked: the same prompt text as the string "None").
# Its chat layout (system message, text before the image) is `scoring_emovlm_kd.chat_messages`.
OFFICIAL_PROMPT = "None"
# Fields of issue 24's `protocol` (emovlm_kd/protocol.py) and their paper values: config.json holds one only when it
# differs, so that a bundle saved under `paper` is the bundle saved before these fields existed.
PROTOCOL_FIELD_DEFAULTS = {"chat_format": "paper", "generation_prompt": True, "answer_parsing": "lenient",
                           "gate_input": "probs"}

DEFAULT_PROMPT = (
    "Observe the image and select the emotion category that best matches this image from the following "
    "{num_labels} categories: {label_list}. Answer in dictionary form as follows: {example_answer}"
)
DEFAULT_ANSWER_TEMPLATE = "{{'emotion': '{label}'}}"
DEFAULT_MAX_IMAGE_SIDE = 1024  # the official code's `resize_image`: the long side at most 1024 px
MIN_IMAGE_SIDE = 28  # Qwen2-VL's patch size x merge size: no side can be smaller
# (Qwen3-VL's is 32 = 16 x 2: its processor rounds a side of 28 px to one 32 px unit, `smart_resize`, so 28 serves all)
# The backbones tested with this model: `model_type`s of the nested `vlm_config` (transformers' own classes, loaded
# through `AutoModelForImageTextToText`). Qwen2.5-VL's windowed vision attention and Qwen3-VL's deepstack features
# stay inside the backbone: the head pools the merger tokens that replace the image placeholders in every case.
SUPPORTED_BACKBONES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def format_label_list(labels: Sequence[str]) -> str:
    """`a, b, and c` as in the paper's categorical instruction."""
    labels = list(labels)
    if len(labels) <= 1:
        return "".join(labels)
    if len(labels) == 2:
        return f"{labels[0]} and {labels[1]}"
    return ", ".join(labels[:-1]) + f", and {labels[-1]}"


class EmoVLMKDConfig(PretrainedConfig):
    r"""
    Configuration for [`EmoVLMKDForImageClassification`].

    Args:
        vlm_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the vision-language backbone: a Qwen2-VL, Qwen2.5-VL or Qwen3-VL config (`model_type`
            `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, as in `SUPPORTED_BACKBONES`), or its dict; defaults to Qwen2-VL.
        head_hidden_sizes (`list[int]`, *optional*, defaults to `[1024]`):
            Hidden widths of the distillation head (Linear -> GELU -> Dropout per entry, then Linear -> labels).
            The paper's Table 3 compares `[1024]` to deeper heads such as `[1024, 512, 256, 128, 64]`.
        head_dropout (`float`, *optional*, defaults to 0.1): dropout inside the head.
        gate_type (`str`, *optional*, defaults to `"concat_linear"`): one of `concat_linear`, `moe`, `bilinear`,
            `dynamic_weighting`, `cross_gating` (the paper's Table 4).
        gate_num_experts (`int`, *optional*, defaults to 3): experts of the `moe` gate.
        vlm_mode (`str`, *optional*, defaults to `"score"`): how the VLM branch answers. `score` ranks every label's
            answer string by its log-likelihood (deterministic); `generate` decodes an answer and parses it.
        vlm_vector (`str`, *optional*, defaults to `"probs"`): what `score` mode hands to the gate: the normalised
            label distribution (`probs`) or its argmax as a one-hot vector (`onehot`, as in the paper). `generate`
            mode always gives a one-hot vector (all zeros when the answer names no label).
        prompt (`str`, *optional*): the classification instruction. `{num_labels}`, `{label_list}` and
            `{example_answer}` are filled from the labels.
        answer_template (`str`, *optional*): the answer format; `{label}` is filled with the label name.
        label_answer_token_ids (`list[list[int]]`, *optional*): the token ids of each label's answer as the
            tokenizer writes it after the prompt (set by `EmoVLMKDForImageClassification.set_answer_tokens`).
        vlm_max_new_tokens (`int`, *optional*, defaults to 32): generation budget of `generate` mode.
        vlm_do_sample (`bool`), vlm_temperature (`float`): sampling in `generate` mode (off by default; the paper's code
            samples at temperature 0.8).
        max_image_side (`int`, *optional*, defaults to 1024): every image is scaled down (aspect ratio kept) until its
            long side is at most this many pixels before it reaches the processor (`prepare_image` in the pipeline
            file), as the official code's `resize_image`; `None` leaves sizes to the processor's `max_pixels`.
        gate_calibration_temperature (`float`, *optional*, defaults to 1.0): the gate's logits are divided by it
            (temperature scaling, fitted on the val split after training): calibrated probabilities, the same argmax.
        head_calibration_temperature (`float`, *optional*, defaults to 1.0): the same for the head's `distill_logits`;
            the gate reads the head's uncalibrated probabilities, as it was trained.
        chat_format (`str`, *optional*, defaults to `"paper"`): `paper`: the backbone's default system message and
            the image before the instruction; `official`: the official code's system message
            (`scoring_emovlm_kd.OFFICIAL_SYSTEM_MESSAGE`) and the instruction before the image (data_utils.py:37,165-176).
        generation_prompt (`bool`, *optional*, defaults to `True`): end the classification prompt with the assistant
            turn's header; the official code leaves it out at gate and test time (train_gate.py:50).
        answer_parsing (`str`, *optional*, defaults to `"lenient"`): how a generated answer becomes a vector.
            `lenient`: `parse_answer` (any spelling of `{'emotion': label}`, else the one label the text names; a
            miss is a zero vector). `official`: train_gate.py:83-93: only the literal `{'emotion': '...'}`,
            case-sensitive; a miss is a zero vector, except for two labels, where it is one-hot on the first label
            in sorted order (`np.eye(2)[LabelBinarizer.transform(['none'])]`).
        gate_input (`str`, *optional*, defaults to `"probs"`): what the gate reads of the head: its softmax
            probabilities (the paper's text) or its raw logits (the official code, train_gate.py:197-200).
    """

    model_type = "emovlm_kd"
    sub_configs = {"vlm_config": AutoConfig}

    def __init__(
        self,
        vlm_config: PretrainedConfig | dict | None = None,
        head_hidden_sizes: Sequence[int] = (1024,),
        head_dropout: float = 0.1,
        gate_type: str = "concat_linear",
        gate_num_experts: int = 3,
        vlm_mode: str = "score",
        vlm_vector: str = "probs",
        prompt: str = DEFAULT_PROMPT,
        answer_template: str = DEFAULT_ANSWER_TEMPLATE,
        label_answer_token_ids: list[list[int]] | None = None,
        vlm_max_new_tokens: int = 32,
        vlm_do_sample: bool = False,
        vlm_temperature: float = 0.8,
        max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
        gate_calibration_temperature: float = 1.0,
        head_calibration_temperature: float = 1.0,
        chat_format: str = "paper",
        generation_prompt: bool = True,
        answer_parsing: str = "lenient",
        gate_input: str = "probs",
        **kwargs: Any,
    ) -> None:
        if vlm_config is None:
            vlm_config = CONFIG_MAPPING["qwen2_vl"]()
        elif isinstance(vlm_config, dict):
            vlm_config = dict(vlm_config)
            vlm_type = vlm_config.pop("model_type", "qwen2_vl")
            if vlm_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"vlm_config has model_type {vlm_type!r}, which this transformers does not know; EmoVLM-KD "
                    f"backbones: {', '.join(SUPPORTED_BACKBONES)}"
                )
            vlm_config = CONFIG_MAPPING[vlm_type](**vlm_config)
        self.vlm_config = vlm_config
        self.head_hidden_sizes = [int(h) for h in head_hidden_sizes]
        self.head_dropout = float(head_dropout)
        self.gate_type = gate_type
        self.gate_num_experts = int(gate_num_experts)
        self.vlm_mode = vlm_mode
        self.vlm_vector = vlm_vector
        self.prompt = prompt
        self.answer_template = answer_template
        self.label_answer_token_ids = label_answer_token_ids
        self.vlm_max_new_tokens = int(vlm_max_new_tokens)
        self.vlm_do_sample = bool(vlm_do_sample)
        self.vlm_temperature = float(vlm_temperature)
        self.max_image_side = int(max_image_side) if max_image_side is not None else None
        self.gate_calibration_temperature = float(gate_calibration_temperature)
        self.head_calibration_temperature = float(head_calibration_temperature)
        self.chat_format = chat_format
        self.generation_prompt = bool(generation_prompt)
        self.answer_parsing = answer_parsing
        self.gate_input = gate_input
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` that names the field when a value is out of range."""
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"gate_type must be one of {GATE_TYPES}, got {self.gate_type!r}")
        if self.vlm_mode not in VLM_MODES:
            raise ValueError(f"vlm_mode must be one of {VLM_MODES}, got {self.vlm_mode!r}")
        if self.vlm_vector not in VLM_VECTORS:
            raise ValueError(f"vlm_vector must be one of {VLM_VECTORS}, got {self.vlm_vector!r}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if any(h <= 0 for h in self.head_hidden_sizes):
            raise ValueError(f"head_hidden_sizes must be positive, got {self.head_hidden_sizes}")
        if self.gate_num_experts < 1:
            raise ValueError(f"gate_num_experts must be >= 1, got {self.gate_num_experts}")
        for name, allowed in (("chat_format", CHAT_FORMATS), ("answer_parsing", ANSWER_PARSINGS),
                              ("gate_input", GATE_INPUTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if "{label}" not in self.answer_template:
            raise ValueError("answer_template must contain '{label}'")
        if self.max_image_side is not None and self.max_image_side < MIN_IMAGE_SIDE:
            raise ValueError(f"max_image_side must be >= {MIN_IMAGE_SIDE} (or None), got {self.max_image_side}")
        for name in ("gate_calibration_temperature", "head_calibration_temperature"):
            value = getattr(self, name)
            if not 0.0 < value < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")

    @property
    def labels(self) -> list[str]:
        """Label names in id order."""
        return [self.id2label[i] for i in range(len(self.id2label))]

    def answer_for(self, label: str) -> str:
        return self.answer_template.format(label=label)

    def classification_prompt(self) -> str:
        """The categorical instruction for this config's labels (the paper's prompt by default)."""
        labels = self.labels
        return self.prompt.format(
            num_labels=len(labels), label_list=format_label_list(labels), example_answer=self.answer_for(labels[0])
        )

    def to_dict(self):
        output = super().to_dict()
        for name, default in PROTOCOL_FIELD_DEFAULTS.items():
            if output.get(name, default) == default:
                output.pop(name, None)
        if hasattr(self.vlm_config, "to_dict"):
            output["vlm_config"] = self.vlm_config.to_dict()
        return output


__all__ = [
    "ANSWER_PARSINGS", "CHAT_FORMATS", "GATE_INPUTS", "OFFICIAL_PROMPT",
    "PROTOCOL_FIELD_DEFAULTS", "DEFAULT_MAX_IMAGE_SIDE", "GATE_TYPES", "MIN_IMAGE_SIDE", "SUPPORTED_BACKBONES", "VLM_MODES", "VLM_VECTORS",
    "EmoVLMKDConfig",
]
