"""EmoVLM-KD: a Qwen-VL backbone (Qwen2-VL, Qwen2.5-VL or Qwen3-VL), a distillation head on its visual encoder and a
gate, as one `PreTrainedModel`.

One pass through the visual encoder per image: its merger tokens feed the language model (the VLM branch) and,
mean-pooled per image, the distillation head. The gate combines the VLM branch's per-label vector with the head's
probabilities into the final logits. `forward` computes tensors (the VLM branch scores every label's answer);
`generate_labels` runs the paper's protocol (decode an answer, parse it to a label) and takes the tokenizer as an
argument: no tokenizer lives on the model.

The prompts, the label scorer (score mode) and the answer parser (generate mode) live in `scoring_emovlm_kd`. This
file travels to the Hub with the model (and, through its relative imports, `configuration_emovlm_kd` and
`scoring_emovlm_kd` with it): it imports only torch, transformers and those two files.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, PreTrainedModel
from transformers.utils import ModelOutput, logging

try:
    from .configuration_emovlm_kd import SUPPORTED_BACKBONES, EmoVLMKDConfig
    from .scoring_emovlm_kd import (
        EXPLANATION_MAX_NEW_TOKENS, EXPLANATION_QUESTION, LabelScoringPlan, PromptPrefixCache, build_prompt_text,
        choices_to_vectors, explanation_inputs, match_answer_tokens, official_miss_index, parse_answer,
        parse_answer_official, prepare_inputs, score_label_answers, to_left_padding,
    )  # fmt: skip
except ImportError:  # imported as a plain module (not from a Hub folder)
    from configuration_emovlm_kd import SUPPORTED_BACKBONES, EmoVLMKDConfig
    from scoring_emovlm_kd import (
        EXPLANATION_MAX_NEW_TOKENS, EXPLANATION_QUESTION, LabelScoringPlan, PromptPrefixCache, build_prompt_text,
        choices_to_vectors, explanation_inputs, match_answer_tokens, official_miss_index, parse_answer,
        parse_answer_official, prepare_inputs, score_label_answers, to_left_padding,
    )  # fmt: skip

logger = logging.get_logger(__name__)


@dataclass
class EmoVLMKDOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*): cross-entropy of `logits` against `labels`.
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): the gate's output divided by
        `config.gate_calibration_temperature`, the final prediction (calibrated; times the temperature: the raw output).
    distill_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): the distillation head's logits divided
        by `config.head_calibration_temperature` (the gate reads the head's raw probabilities, as it was trained).
    vlm_scores (`torch.FloatTensor` of shape `(batch_size, num_labels)`): the VLM branch's per-label vector as fed
        to the gate (label distribution or one-hot; all zeros for a generated answer that names no label).
    vlm_log_likelihoods (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*): `score` mode's
        log-likelihood of each label's answer string.
    vlm_answer_found (`torch.BoolTensor` of shape `(batch_size,)`): False where a generated answer named no label.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, hidden_size)`): mean-pooled visual tokens per image.
    generated_ids (`torch.LongTensor` of shape `(batch_size, new_tokens)`, *optional*): `generate_labels`' answers.
    generated_text (`list[str]`, *optional*): `generate_labels`' decoded answers (when given a tokenizer).
    explanation_ids (`torch.LongTensor` of shape `(batch_size, new_tokens)`, *optional*): `explain`'s generated tokens.
    explanations (`list[str]`, *optional*): `explain`'s decoded reasoning, one per image.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    distill_logits: torch.FloatTensor | None = None
    vlm_scores: torch.FloatTensor | None = None
    vlm_log_likelihoods: torch.FloatTensor | None = None
    vlm_answer_found: torch.BoolTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    generated_ids: torch.LongTensor | None = None
    generated_text: list | None = None
    explanation_ids: torch.LongTensor | None = None
    explanations: list | None = None


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class EmoVLMKDDistillationHead(nn.Module):
    """Mean-pooled visual tokens -> [Linear -> GELU -> Dropout] * len(hidden_sizes) -> Linear -> label logits."""

    def __init__(self, in_features, hidden_sizes, num_labels, dropout):
        super().__init__()
        layers, width = [], in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_labels)

    def forward(self, image_embeds):  # (B, H) -> (B, C)
        return self.classifier(self.layers(image_embeds))


class ConcatLinearGate(nn.Module):
    """y = W [v_vlm ; p_head] + b (the paper's default)."""

    def __init__(self, num_labels, **_):
        super().__init__()
        self.proj = nn.Linear(2 * num_labels, num_labels)

    def forward(self, vlm_vector, head_probs):
        return self.proj(torch.cat([vlm_vector, head_probs], dim=-1))


class MoEGate(nn.Module):
    """Experts over the concatenation, mixed by a softmax gate over the same concatenation."""

    def __init__(self, num_labels, num_experts=3, **_):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(2 * num_labels, num_labels) for _ in range(num_experts))
        self.router = nn.Linear(2 * num_labels, num_experts)

    def forward(self, vlm_vector, head_probs):
        h = torch.cat([vlm_vector, head_probs], dim=-1)
        weights = self.router(h).softmax(-1)  # (B, E)
        expert_out = torch.stack([expert(h) for expert in self.experts], dim=1)  # (B, E, C)
        return (weights.unsqueeze(-1) * expert_out).sum(1)


class BilinearGate(nn.Module):
    """v_vlm^T W v_head, then a linear layer."""

    def __init__(self, num_labels, **_):
        super().__init__()
        self.bilinear = nn.Bilinear(num_labels, num_labels, num_labels)
        self.proj = nn.Linear(num_labels, num_labels)

    def forward(self, vlm_vector, head_probs):
        return self.proj(self.bilinear(vlm_vector, head_probs))


class DynamicWeightingGate(nn.Module):
    """Softmax weights (w1, w2) from the concatenation; w1 v_vlm + w2 p_head, then a linear layer."""

    def __init__(self, num_labels, **_):
        super().__init__()
        self.weights = nn.Linear(2 * num_labels, 2)
        self.proj = nn.Linear(num_labels, num_labels)

    def forward(self, vlm_vector, head_probs):
        w = self.weights(torch.cat([vlm_vector, head_probs], dim=-1)).softmax(-1)
        return self.proj(w[:, :1] * vlm_vector + w[:, 1:] * head_probs)


class CrossGatingGate(nn.Module):
    """g1 = sigmoid(L(p_head)), g2 = sigmoid(L(v_vlm)); g1 v_vlm + g2 p_head, then a linear layer."""

    def __init__(self, num_labels, **_):
        super().__init__()
        self.gate_vlm = nn.Linear(num_labels, num_labels)
        self.gate_head = nn.Linear(num_labels, num_labels)
        self.proj = nn.Linear(num_labels, num_labels)

    def forward(self, vlm_vector, head_probs):
        g1 = torch.sigmoid(self.gate_vlm(head_probs))
        g2 = torch.sigmoid(self.gate_head(vlm_vector))
        return self.proj(g1 * vlm_vector + g2 * head_probs)


GATE_CLASSES = {
    "concat_linear": ConcatLinearGate,
    "moe": MoEGate,
    "bilinear": BilinearGate,
    "dynamic_weighting": DynamicWeightingGate,
    "cross_gating": CrossGatingGate,
}


def build_gate(config):
    return GATE_CLASSES[config.gate_type](config.num_labels, num_experts=config.gate_num_experts)


def check_backbone(vlm):
    """Raise a `ValueError` unless `vlm` has the Qwen-VL layout this model drives; warn for a `model_type` outside
    `SUPPORTED_BACKBONES`. Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers' `modeling_qwen2_vl.py`,
    `modeling_qwen2_5_vl.py`, `modeling_qwen3_vl.py`) share it: `vlm.model.visual` (the encoder; its
    `spatial_merge_size`), `vlm.model.get_image_features` (per-image merger tokens as `pooler_output`, plus Qwen3-VL's
    `deepstack_features`), `vlm.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, ...)` (3-D M-RoPE
    positions and `rope_deltas`), `vlm.model.language_model` (the text decoder) and a forward that takes
    `mm_encoder_outputs={"image": ...}`."""
    model_type = getattr(vlm.config, "model_type", None)
    inner = getattr(vlm, "model", None)
    missing = [name for name in ("visual", "language_model", "get_image_features", "get_rope_index")
               if not hasattr(inner, name)]  # fmt: skip
    if missing:
        raise ValueError(
            f"EmoVLM-KD needs a Qwen-VL backbone ({', '.join(SUPPORTED_BACKBONES)}); a {type(vlm).__name__} "
            f"(model_type {model_type!r}) has no `model.{'`, `model.'.join(missing)}`"
        )
    if model_type not in SUPPORTED_BACKBONES:
        logger.warning(
            "backbone model_type %r has the Qwen-VL layout but is not one EmoVLM-KD was tested with (%s)",
            model_type, ", ".join(SUPPORTED_BACKBONES),
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class EmoVLMKDPreTrainedModel(PreTrainedModel):
    config_class = EmoVLMKDConfig
    config: EmoVLMKDConfig
    base_model_prefix = "emovlm_kd"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # `post_init` adds the backbone's own (`Qwen3VLTextDecoderLayer`, `Qwen2_5_VLVisionBlock`...): transformers'
    # `PreTrainedModel.post_init` gathers every child's `_no_split_modules` (modeling_utils.py)
    _no_split_modules = []
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module):
        std = getattr(self.config.vlm_config.get_text_config(), "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Bilinear)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class EmoVLMKDForImageClassification(EmoVLMKDPreTrainedModel):
    """A Qwen-VL backbone (Qwen2-VL, Qwen2.5-VL or Qwen3-VL) + distillation head + gate. `forward` takes what the
    backbone's processor returns and computes tensors (`score` mode); `generate_labels` runs the paper's
    generate-and-parse protocol on the same inputs."""

    def __init__(self, config: EmoVLMKDConfig, vlm: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        self.vlm = vlm if vlm is not None else AutoModelForImageTextToText.from_config(config.vlm_config)
        check_backbone(self.vlm)
        hidden = config.vlm_config.get_text_config().hidden_size  # the merger's output width, the LM's embedding
        self.distill_head = EmoVLMKDDistillationHead(
            hidden, config.head_hidden_sizes, config.num_labels, config.head_dropout
        )
        self.gate = build_gate(config)
        self._plan_cache = None
        self._answer_tokenizer = None
        self.post_init()

    # -- construction helpers ------------------------------------------------------------------------------------

    @classmethod
    def from_vlm(cls, vlm: PreTrainedModel | str, labels: Sequence[str], processor: Any = None,
                 **config_kwargs: Any) -> "EmoVLMKDForImageClassification":
        """Wrap a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model (an instance, or a name/path loaded with
        `AutoModelForImageTextToText.from_pretrained`, `vlm_kwargs` passed on) into a new bundle."""
        if isinstance(vlm, str):
            vlm = AutoModelForImageTextToText.from_pretrained(vlm, **config_kwargs.pop("vlm_kwargs", {}))
        labels = list(labels)
        config_kwargs.setdefault("attn_implementation", vlm.config._attn_implementation)
        config = EmoVLMKDConfig(
            vlm_config=vlm.config,
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **config_kwargs,
        )
        model = cls(config, vlm=vlm)
        model.to(next(vlm.parameters()).device)
        if processor is not None:
            model.set_answer_tokens(processor)
        return model

    def set_answer_tokens(self, processor: Any) -> list[list[int]]:
        """Record how the tokenizer writes each label's answer right after the prompt (needed by `score` mode)."""
        tokenizer = getattr(processor, "tokenizer", processor)
        prompt = build_prompt_text(processor, self.config)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answers = []
        for label in self.config.labels:
            ids = tokenizer(prompt + self.config.answer_for(label), add_special_tokens=False)["input_ids"]
            common = 0
            while common < min(len(ids), len(prompt_ids)) and ids[common] == prompt_ids[common]:
                common += 1
            if common != len(prompt_ids):
                raise ValueError(
                    f"The tokenizer merges the end of the prompt with the answer for label {label!r}; "
                    "change `answer_template` so that the answer starts a new token"
                )
            answers.append(ids[common:])
        self.config.label_answer_token_ids = answers
        return answers

    def build_inputs(self, processor: Any, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The model's inputs for a batch of images: the classification prompt (chat template, one image each)
        and the images through `processor`, left padded, on the model's device. `images` are PIL images (RGB) or
        arrays; for files, URLs or any mode (alpha, 16-bit, EXIF), prepare them with the pipeline file's
        `prepare_image(image, max_side=config.max_image_side)`, the one image path. Then `model(**inputs)` or
        `model.generate_labels(**inputs)`."""
        return prepare_inputs(processor, self.config, images).to(self.device)

    def answer_tokenizer(self) -> Any:
        """The tokenizer saved beside the weights (loaded once, from `name_or_path`), which `generate_labels`
        decodes its answers with when it is given none; None when there is none to load. The tokenizer's class comes
        from its own files and the backbone's config: the bundle's config (custom code) is not read again, so no
        `trust_remote_code` question is asked."""
        if self._answer_tokenizer is None and self.name_or_path:
            from transformers import AutoTokenizer

            try:
                self._answer_tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, config=self.config.vlm_config)
            except (OSError, ValueError):  # no tokenizer files there (a bundle built in memory): token matching
                self._answer_tokenizer = False
        return self._answer_tokenizer or None

    # -- the parts -----------------------------------------------------------------------------------------------

    @property
    def spatial_merge_size(self) -> int:
        return self.vlm.model.visual.spatial_merge_size

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor) -> ModelOutput:
        """The single visual-encoder pass: the backbone's `get_image_features` output, whose `pooler_output` holds the
        per-image merger tokens (a tuple, one (n_i, H) tensor per image). The whole output goes to the language model
        as `mm_encoder_outputs`, so Qwen3-VL's `deepstack_features` (mergers after early vision blocks, added to the
        image positions' hidden states in the first language-model layers) reach it as they would from pixels."""
        return self.vlm.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)

    @staticmethod
    def pool_image_features(image_tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over each image's own tokens (never across the batch): tuple of (n_i, H) -> (B, H).

        The tokens are what replaces the image placeholders in the language model's input, for every backbone:
        Qwen2-VL's merger output; Qwen2.5-VL's, after its windowed blocks and put back in raster order (a mean does
        not depend on the order anyway); Qwen3-VL's final merger output, not its deepstack features (these are added
        inside the language model's first layers, not fed as input tokens)."""
        return torch.stack([tokens.mean(0) for tokens in image_tokens])

    def forward_head(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.distill_head(image_embeds.to(self.distill_head.classifier.weight.dtype))

    def forward_gate(self, vlm_vector: torch.Tensor, head_probs: torch.Tensor) -> torch.Tensor:
        dtype = self.distill_head.classifier.weight.dtype
        return self.gate(vlm_vector.to(dtype), head_probs.to(dtype))

    def _scoring_plan(self, device):
        """`LabelScoringPlan(...).tensors(device)` for the configured answers, built once per answers and device."""
        answers = self.config.label_answer_token_ids
        key = (device, tuple(tuple(answer) for answer in answers or ()))
        if self._plan_cache is None or self._plan_cache[0] != key:
            plan = LabelScoringPlan(answers)
            with torch.inference_mode(False):  # plain tensors: usable later with autograd on, too
                self._plan_cache = (key, plan.tensors(device))
        return self._plan_cache[1]

    # -- the VLM branch, score mode: every label's answer in one language-model pass -------------------------------

    def score_labels(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        image_grid_thw: torch.LongTensor,
        mm_token_type_ids: torch.Tensor | None,
        image_outputs: ModelOutput,
        prompt_cache: PromptPrefixCache | None = None,
    ) -> torch.FloatTensor:
        """Log-likelihood of each label's answer after the prompt: (B, C), every label scored in one language-model
        pass (`scoring_emovlm_kd.score_label_answers`: a token trie of the answers under a tree attention mask).
        With a `PromptPrefixCache`, the text every row shares before its image is taken from it. `input_ids` must be
        left padded (`forward` takes care of it)."""
        plan = self._scoring_plan(input_ids.device)
        return score_label_answers(self.vlm, plan, input_ids, attention_mask, image_grid_thw, mm_token_type_ids,
                                   image_outputs, prompt_cache=prompt_cache)  # fmt: skip

    # -- the VLM branch, generate mode: the paper's protocol --------------------------------------------------------

    def generate_answers(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        image_grid_thw: torch.LongTensor,
        mm_token_type_ids: torch.Tensor | None,
        image_outputs: ModelOutput,
        **kw: Any,
    ) -> torch.LongTensor:
        """Decode an answer (greedy unless `do_sample`) from the encoded images; return the new tokens (B, N)."""
        do_sample = kw.pop("do_sample", self.config.vlm_do_sample)
        gen_kwargs = {"max_new_tokens": kw.pop("max_new_tokens", self.config.vlm_max_new_tokens), "do_sample": do_sample}
        if do_sample:
            gen_kwargs["temperature"] = kw.pop("temperature", self.config.vlm_temperature)
        gen_kwargs.update(kw)
        text_config = self.vlm.config.get_text_config()
        pad = getattr(self.vlm.generation_config, "pad_token_id", None)
        if pad is None:
            pad = text_config.pad_token_id if text_config.pad_token_id is not None else 0
        output = self.vlm.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs={"image": image_outputs},
            pad_token_id=pad,
            **gen_kwargs,
        )
        return output[:, input_ids.shape[1] :]

    def answers_to_vectors(
        self, generated_ids: torch.LongTensor, tokenizer: Any = None
    ) -> tuple[torch.Tensor, torch.BoolTensor, list[str] | None]:
        """`(vectors (B, C), found (B,), texts)`: generated answers parsed to one-hot vectors (zeros where an answer
        names no label). With a tokenizer the text is decoded and parsed (`parse_answer`); without one, each label's
        answer tokens are matched at the start of the answer and `texts` is None."""
        labels = self.config.labels
        texts = None
        if tokenizer is not None:
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor works too
            texts = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)
            parse = parse_answer_official if self.config.answer_parsing == "official" else parse_answer
            choices = [parse(text, labels) for text in texts]
        else:
            choices = match_answer_tokens(generated_ids, self.config.label_answer_token_ids or [])
        vectors, found = choices_to_vectors(choices, len(labels), device=generated_ids.device)
        miss = official_miss_index(labels) if self.config.answer_parsing == "official" else None
        if miss is not None:  # the official two-class fallback: a miss is one-hot on the first sorted label
            vectors[~found, miss] = 1.0
        return vectors, found, texts

    # -- entry points --------------------------------------------------------------------------------------------

    def _encode(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids):
        """Checked, left-padded inputs and the one visual-encoder pass with the head on its pooled tokens."""
        if pixel_values is None or image_grid_thw is None:
            raise ValueError("EmoVLM-KD needs `pixel_values` and `image_grid_thw` (one image per sample)")
        if input_ids is None:
            raise ValueError("EmoVLM-KD needs `input_ids` holding the classification prompt")
        if image_grid_thw.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"one image per sample expected: {input_ids.shape[0]} prompts but {image_grid_thw.shape[0]} images"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask, input_ids, mm_token_type_ids = to_left_padding(attention_mask, input_ids, mm_token_type_ids)
        image_outputs = self.encode_images(pixel_values, image_grid_thw)  # the one encoder pass
        image_embeds = self.pool_image_features(image_outputs.pooler_output)
        text = {"input_ids": input_ids, "attention_mask": attention_mask, "image_grid_thw": image_grid_thw,
                "mm_token_type_ids": mm_token_type_ids, "image_outputs": image_outputs}  # fmt: skip
        return text, image_embeds, self.forward_head(image_embeds)

    def _combine(self, vlm_scores, found, image_embeds, distill_logits, labels, **fields):
        """The gate over both branches, both outputs divided by their temperatures (calibration: same argmax), the
        loss when `labels` are given, and the output. The gate reads the head's uncalibrated probabilities (or, with
        `config.gate_input == "logits"`, its raw logits, as the official code)."""
        config = self.config
        head_input = distill_logits if config.gate_input == "logits" else distill_logits.softmax(-1)
        logits = self.forward_gate(vlm_scores, head_input) / config.gate_calibration_temperature
        distill_logits = distill_logits / config.head_calibration_temperature
        loss = F.cross_entropy(logits.float(), labels.to(logits.device)) if labels is not None else None
        return EmoVLMKDOutput(loss=loss, logits=logits, distill_logits=distill_logits, vlm_scores=vlm_scores,
                              vlm_answer_found=found, image_embeds=image_embeds, **fields)  # fmt: skip

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        vlm_mode: str | None = None,
        prompt_cache: PromptPrefixCache | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> EmoVLMKDOutput:
        r"""
        input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids: as returned by the Qwen2-VL
            processor for one image and the classification prompt per sample (either padding side).
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class ids; gives `loss`.
        vlm_mode (`str`, *optional*): `score` (the only mode `forward` computes; `config.vlm_mode` by default).
            `generate` decodes text: use `generate_labels`.
        prompt_cache (`PromptPrefixCache`, *optional*): keys/values of the prompt's shared text prefix, reused across
            calls of an inference loop over a frozen model; refused with autograd on or in training mode.
        """
        vlm_mode = vlm_mode or self.config.vlm_mode
        if vlm_mode == "generate":
            raise ValueError(
                "`forward` computes tensors only (score mode); generate mode decodes and parses text: call "
                "`model.generate_labels(**inputs, tokenizer=processor.tokenizer)` (the pipeline and "
                "`emovlm_kd.inference.run_batch` do so for vlm_mode='generate')"
            )
        if vlm_mode != "score":
            raise ValueError(f"vlm_mode must be 'score' or 'generate', got {vlm_mode!r}")
        if prompt_cache is not None and (self.training or torch.is_grad_enabled()):
            raise ValueError("`prompt_cache` is for inference only: use it under torch.inference_mode() in eval mode")
        text, image_embeds, distill_logits = self._encode(
            input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids
        )
        vlm_scores, found, fields = self._score_branch(text, prompt_cache)
        return self._combine(vlm_scores, found, image_embeds, distill_logits, labels, **fields)

    def _score_branch(self, text, prompt_cache=None):
        """The VLM branch in score mode on `_encode`'s text inputs: `(vlm_scores, found, {"vlm_log_likelihoods"})`."""
        log_likelihoods = self.score_labels(**text, prompt_cache=prompt_cache)
        vlm_scores = log_likelihoods.softmax(-1)
        if self.config.vlm_vector == "onehot":
            vlm_scores = F.one_hot(vlm_scores.argmax(-1), vlm_scores.shape[-1]).to(vlm_scores.dtype)
        found = torch.ones(vlm_scores.shape[0], dtype=torch.bool, device=vlm_scores.device)
        return vlm_scores, found, {"vlm_log_likelihoods": log_likelihoods}

    def _generate_branch(self, text, tokenizer=None, generation_kwargs=None):
        """The VLM branch in generate mode (the paper's protocol): `(vlm_scores, found, {generated_ids, text})`."""
        with torch.no_grad():
            generated_ids = self.generate_answers(**text, **(generation_kwargs or {}))
        vlm_scores, found, texts = self.answers_to_vectors(generated_ids, tokenizer or self.answer_tokenizer())
        return vlm_scores, found, {"generated_ids": generated_ids, "generated_text": texts}

    def generate_labels(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        tokenizer: Any = None,
        generation_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> EmoVLMKDOutput:
        r"""
        The paper's protocol for the VLM branch: decode an answer (greedy; sampling with
        `generation_kwargs={"do_sample": True}`), parse it to a label and feed its one-hot vector to the gate. An
        answer that names no label gives a zero vector and `vlm_answer_found=False`, never class 0. One visual-encoder
        pass per image feeds both the language model and the head. Inputs as for `forward`.

        tokenizer (*optional*): decodes the answers (`generated_text`) and parses them with `parse_answer`; by
            default the tokenizer saved with the model (`answer_tokenizer`); where there is none, each label's answer
            tokens are matched at the start of the generated tokens and `generated_text` is None.
        generation_kwargs (`dict`, *optional*): extra arguments for `generate` (`max_new_tokens`, `do_sample`...).
        """
        text, image_embeds, distill_logits = self._encode(
            input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids
        )
        vlm_scores, found, fields = self._generate_branch(text, tokenizer, generation_kwargs)
        return self._combine(vlm_scores, found, image_embeds, distill_logits, labels, **fields)

    @torch.no_grad()
    def explain(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        processor: Any = None,
        question: str | None = None,
        vlm_mode: str | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        seed: int | None = None,
        streamer: Any = None,
        prompt_cache: PromptPrefixCache | None = None,
    ) -> EmoVLMKDOutput:
        r"""
        Classify the images and say why: everything `forward` (or `generate_labels`, with `vlm_mode="generate"`)
        returns, plus `explanations`, the model's answer to the paper's reasoning instruction
        (`EXPLANATION_QUESTION`, which stage 1 tunes it on) for the same images. The visual features of the one
        encoder pass feed the head, the classification prompt and the reasoning prompt: no image is encoded twice.
        Inputs as for `forward` (the classification prompt, e.g. from `build_inputs`).

        processor: the model's processor (its chat template and tokenizer write the reasoning prompt and decode it).
        question (`str`, *optional*): another instruction to answer instead of `EXPLANATION_QUESTION`.
        generation_kwargs (`dict`, *optional*): for `generate`: greedy by default (`max_new_tokens` defaults to
            `EXPLANATION_MAX_NEW_TOKENS`); `{"do_sample": True, "temperature": 0.7}` samples.
        seed (`int`, *optional*): seeds the sampling (a forked RNG: the global random state is left as it was).
        streamer (*optional*): a `transformers` streamer (e.g. `TextIteratorStreamer`) that receives the explanation's
            tokens as they are generated (one image at a time).
        """
        if processor is None:
            raise ValueError("`explain` needs the model's `processor`: it writes the reasoning prompt and decodes it")
        text, image_embeds, distill_logits = self._encode(
            input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids
        )
        if (vlm_mode or self.config.vlm_mode) == "generate":
            vlm_scores, found, fields = self._generate_branch(text, processor)
        else:
            vlm_scores, found, fields = self._score_branch(text, prompt_cache)
        output = self._combine(vlm_scores, found, image_embeds, distill_logits, None, **fields)
        reasoning = explanation_inputs(processor, self.config, text, question)
        options = {"max_new_tokens": EXPLANATION_MAX_NEW_TOKENS, "do_sample": False, **(generation_kwargs or {})}
        if streamer is not None:
            options["streamer"] = streamer
        devices = [text["input_ids"].device] if text["input_ids"].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            ids = self.generate_answers(**reasoning, image_outputs=text["image_outputs"], **options)
        tokenizer = getattr(processor, "tokenizer", processor)
        output["explanation_ids"] = ids
        output["explanations"] = [answer.strip() for answer in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return output


EmoVLMKDModel = EmoVLMKDForImageClassification

__all__ = ["EmoVLMKDForImageClassification", "EmoVLMKDModel", "EmoVLMKDOutput", "EmoVLMKDPreTrainedModel"]
