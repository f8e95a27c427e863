"""EmoVLM-KD: a Qwen-VL backbone (Qwen2-VL, Qwen2.5-VL or Qwen3-VL), a distillation head on its visual encoder and a
gate, as one `PreTrainedModel`.

One pass through the visual encoder per image: its merger tokens feed the language model (the VLM branch) and,
mean-pooled per image, the distillation head. The gate combines the VLM branch's per-label vector with the head's
probabilities into the final logits. `forward` computes tensors (the VLM branch scores every label's answer);
`generate_labels` runs the paper's protocol (decode an answer, parse it to a label) and takes the tokenizer as an
argument: no tokenizer lives on the model.

This file travels to the Hub with the model: it imports only torch, transformers and its configuration file.
"""

import functools
import re
import unicodedata
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, DynamicCache, PreTrainedModel
from transformers.utils import ModelOutput, logging

try:
    from .configuration_emovlm_kd import SUPPORTED_BACKBONES, EmoVLMKDConfig
except ImportError:  # imported as a plain module (not from a Hub folder)
    from configuration_emovlm_kd import SUPPORTED_BACKBONES, EmoVLMKDConfig

logger = logging.get_logger(__name__)

# The paper's reasoning instruction (stage 1 tunes the VLM on it): what `explain` asks about each image.
EXPLANATION_QUESTION = "Observe the image and describe the process of inferring the emotions conveyed in the image."
EXPLANATION_MAX_NEW_TOKENS = 128


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


class LabelScoringPlan:
    """How to score every label's answer tokens in the prefill itself (one forward pass of the language model).

    The answers' common token prefix follows the prompt. The label-specific rest is laid out as a token trie:
    every trie node that has children becomes one extra token after the prefix, which attends to the prompt and
    to its ancestors only (a tree attention mask), so all labels are scored in one forward with no copy of a cache.
    Leaves are never fed (only predicted): when the labels' first tokens already differ and each answer ends
    there, no trie token is added at all.
    """

    def __init__(self, answer_token_ids):
        if not answer_token_ids:
            raise ValueError("label_answer_token_ids is empty: call `set_answer_tokens(tokenizer)` first")
        common = 0
        while all(len(a) > common for a in answer_token_ids) and len({a[common] for a in answer_token_ids}) == 1:
            common += 1
        self.prefix = list(answer_token_ids[0][:common])
        suffixes = [list(a[common:]) for a in answer_token_ids]
        if any(not s for s in suffixes) or len({tuple(s) for s in suffixes}) != len(suffixes):
            raise ValueError("label answers must be distinct and none may be a prefix of another")
        # Trie over suffixes; node = (parent_node, token). Internal nodes become continuation tokens.
        node_ids, node_parent, node_token = {}, [], []
        paths = []
        for suffix in suffixes:
            parent, path = -1, []
            for token in suffix:
                key = (parent, token)
                if key not in node_ids:
                    node_ids[key] = len(node_token)
                    node_parent.append(parent)
                    node_token.append(token)
                parent = node_ids[key]
                path.append(parent)
            paths.append(path)
        internal = sorted({node for path in paths for node in path[:-1]})
        slot = {node: i for i, node in enumerate(internal)}
        self.tree_tokens = [node_token[n] for n in internal]
        depth, ancestors = [], []
        for n in internal:
            chain, p = [], n
            while p != -1:
                chain.append(slot[p])
                p = node_parent[p]
            depth.append(len(chain) - 1)
            ancestors.append(chain)
        self.tree_depth = depth
        self.tree_ancestors = ancestors
        # For each label: (source row, target token); source 0 = prefill's last position, 1 + i = tree slot i.
        self.max_len = max(len(s) for s in suffixes)
        self.sources = [[0] + [1 + slot[n] for n in path[:-1]] for path in paths]
        self.targets = suffixes

    def tensors(self, device):
        C, K, T = len(self.targets), self.max_len, len(self.tree_tokens)
        src = torch.zeros(C, K, dtype=torch.long)
        tgt = torch.zeros(C, K, dtype=torch.long)
        valid = torch.zeros(C, K, dtype=torch.bool)
        for c, (s, t) in enumerate(zip(self.sources, self.targets)):
            src[c, : len(s)] = torch.tensor(s)
            tgt[c, : len(t)] = torch.tensor(t)
            valid[c, : len(t)] = True
        tree_mask = torch.zeros(T, T, dtype=torch.bool)
        for i, chain in enumerate(self.tree_ancestors):
            tree_mask[i, chain] = True
        return {
            "prefix": torch.tensor(self.prefix, dtype=torch.long, device=device),
            "tree_tokens": torch.tensor(self.tree_tokens, dtype=torch.long, device=device),
            "tree_depth": torch.tensor(self.tree_depth, dtype=torch.long, device=device),
            "tree_mask": tree_mask.to(device),
            "src": src.to(device),
            "tgt": tgt.to(device),
            "valid": valid.to(device),
        }


def to_left_padding(attention_mask, *tensors):
    """Move right padding to the left, row by row (scoring and generation append after the last column)."""
    if attention_mask is None or bool(attention_mask[:, -1].all()):
        return (attention_mask, *tensors)
    length = attention_mask.shape[1]
    pad = length - attention_mask.sum(-1, keepdim=True)  # (B, 1)
    index = (torch.arange(length, device=attention_mask.device) - pad) % length
    return tuple(t.gather(1, index) if t is not None else None for t in (attention_mask, *tensors))


def shared_text_prefix(input_ids, attention_mask, mm_token_type_ids):
    """The leading text tokens that every left-padded row shares before its first image token: (L,) token ids.

    At least one token of the shortest row is left out, so that every row keeps a token to compute.
    """
    total = input_ids.shape[1]
    pads = total - attention_mask.sum(-1)  # (B,)
    span = int((total - pads.max()).item())
    index = pads[:, None] + torch.arange(span, device=input_ids.device)  # each row's first `span` real tokens
    tokens, types = input_ids.gather(1, index), mm_token_type_ids.gather(1, index)
    shared = (tokens == tokens[:1]).all(0) & (types == 0).all(0)
    length = min(int(shared.long().cumprod(0).sum().item()), span - 1)
    return tokens[0, :length]


def drop_leading_tokens(count, attention_mask, *tensors):
    """Remove the first `count` real tokens of every left-padded row from `attention_mask` (B, T) and `tensors`
    (..., B, T), e.g. position ids (3, B, T)."""
    batch, total = attention_mask.shape
    pads = total - attention_mask.sum(-1, keepdim=True)  # (B, 1)
    index = torch.arange(total - count, device=attention_mask.device).expand(batch, -1)
    index = torch.where(index < pads, index, index + count)  # padding stays, then the tokens after the dropped ones
    return tuple(t.gather(-1, index.expand(*t.shape[:-1], -1)) for t in (attention_mask, *tensors))


def tree_attention_mask(attention_mask, tree_mask, num_cached=0):
    """Boolean mask (B, 1, T + N, num_cached + T + N) of one scoring pass: `num_cached` tokens every row has seen,
    then T prompt tokens (causal over the row's real tokens), then N trie tokens that see the whole prompt and,
    among themselves, their ancestors (`tree_mask`, (N, N))."""
    batch, total = attention_mask.shape
    num_tree, device = tree_mask.shape[0], attention_mask.device
    valid = attention_mask.bool()
    full = total + num_tree
    mask = torch.zeros(batch, 1, full, num_cached + full, dtype=torch.bool, device=device)
    mask[..., :num_cached] = True
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    # padded rows also attend to themselves, so that no row is fully masked (NaN-free; never read by real rows)
    body = (causal[None] & valid[:, None, :]) | torch.eye(total, dtype=torch.bool, device=device)
    mask[:, 0, :total, num_cached : num_cached + total] = body
    if num_tree:
        mask[:, 0, total:, num_cached : num_cached + total] = valid[:, None, :]
        mask[:, 0, total:, num_cached + total :] = tree_mask
    return mask


class PromptPrefixCache:
    """The keys/values of the prompt text that every row shares before its image (system turn, start of the user
    turn), computed once and reused by later calls of `forward(..., prompt_cache=cache)`.

    Sound only while the language model's weights stay as they are: create one in an inference loop that owns a
    frozen model for its duration (a `predict` run, one evaluation pass, one pipeline call), pass it explicitly and
    drop it afterwards. It is never model state, and `forward` refuses it with autograd on or in training mode.
    It is keyed by what it can check: the language model object, the prefix's token ids, its device and the
    model's dtype; any other key recomputes it. Only public cache API is used: a `DynamicCache` filled by the
    language model, copied into a fresh `DynamicCache` per call with `update`.
    """

    def __init__(self):
        self._entry = None  # (key, DynamicCache of the prefix for one row); replaced as a whole
        self.computed = 0  # how many times the prefix was encoded

    def cache_for(self, language_model, prefix_ids, batch_size):
        """A new `DynamicCache` holding the prefix's keys/values for `batch_size` rows, ready to be extended."""
        states = self._prefix_states(language_model, prefix_ids)
        cache = DynamicCache(config=language_model.config)
        for index, layer in enumerate(states.layers):
            cache.update(layer.keys.expand(batch_size, -1, -1, -1), layer.values.expand(batch_size, -1, -1, -1), index)
        return cache

    def _prefix_states(self, language_model, prefix_ids):
        key = (language_model, tuple(prefix_ids.tolist()), prefix_ids.device, language_model.dtype)
        entry = self._entry
        if entry is not None and entry[0] == key:
            return entry[1]
        # text positions 0 .. L-1 in each of the three rotary sections: the prompt starts the row. Every backbone's
        # text model takes (3, B, L) M-RoPE positions (a 4th leading row would be read as text positions, e.g.
        # modeling_qwen3_vl.Qwen3VLTextModel.forward); no image token here, so Qwen3-VL adds no deepstack feature
        positions = torch.arange(len(prefix_ids), device=prefix_ids.device).view(1, 1, -1).expand(3, 1, -1)
        states = DynamicCache(config=language_model.config)
        language_model(input_ids=prefix_ids[None], position_ids=positions, cache=states, use_cache=True)
        self._entry = (key, states)
        self.computed += 1
        logger.debug("encoded the shared prompt prefix (%d tokens)", len(prefix_ids))
        return states


# Scripts written without spaces between words: a label in them is found anywhere, not only between word boundaries.
_UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "IDEOGRAPHIC", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")
_PLAIN_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"'})
_ANSWER_KEY_RE = re.compile(r"""['"]?emotion['"]?\s*[:=]\s*['"]?\s*""")
_ANSWER_VALUE_END_RE = re.compile(r"""\s*(?:['"},;.]|$)""")


def normalize_answer_text(text):
    """How answers and labels are compared: NFKC, casefolded (`Ü` = `ü`, `ß` = `ss`), typographic quotes made plain
    (`’` = `'`), every run of whitespace one space."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(text.translate(_PLAIN_QUOTES).split())


def _needs_word_boundary(char):
    """Whether a label may not continue into a neighbouring word character at this edge: true for a letter, digit or
    `_` of a script written with spaces (Latin, Cyrillic, Greek, Hangul...), false for punctuation and CJK/Thai."""
    return re.match(r"\w", char) is not None and not unicodedata.name(char, "").startswith(_UNSPACED_SCRIPTS)


@functools.lru_cache(maxsize=32)
def _label_patterns(labels):
    """`(index, regex)` per label: the normalised label, bounded by `(?<!\\w)` / `(?!\\w)` (Unicode word characters,
    digits included) at the edges that need it; longest labels first."""
    patterns = []
    for index, label in enumerate(labels):
        key = normalize_answer_text(label)
        if key:
            left = r"(?<!\w)" if _needs_word_boundary(key[0]) else ""
            right = r"(?!\w)" if _needs_word_boundary(key[-1]) else ""
            patterns.append((len(key), index, re.compile(left + re.escape(key) + right)))
    return [(index, pattern) for _, index, pattern in sorted(patterns, key=lambda entry: -entry[0])]


def _label_after_answer_key(text, patterns):
    """The label that is the whole value of an `emotion: ...` key (quoted or not), or None."""
    key = _ANSWER_KEY_RE.search(text)
    if key is None:
        return None
    for index, pattern in patterns:
        match = pattern.match(text, key.end())
        if match and _ANSWER_VALUE_END_RE.match(text, match.end()):
            return index
    return None


def _single_label_named(text, patterns):
    """The one label named in free text, or None when none or several are: a label found only inside a longer
    label's match (`care` in `don't care`) does not count."""
    spans = [(m.start(), m.end(), index) for index, pattern in patterns for m in pattern.finditer(text)]
    named = {
        index
        for start, end, index in spans
        if not any(s <= start and end <= e and (s, e) != (start, end) for s, e, _ in spans)
    }
    return named.pop() if len(named) == 1 else None


def parse_answer(text, labels):
    """The index of the label a generated answer names, or None. `{'emotion': '<label>'}` first, else the one label
    the text names. Labels are any Unicode text (`joie`, `Überraschung`, `悲しみ`, `class 2`, `don't care`), compared
    after `normalize_answer_text`; a label must not run into a neighbouring letter or digit (`awe` is not in
    `awesome`, `class 2` not in `class 20`), except in scripts written without spaces (CJK, Thai...)."""
    patterns = _label_patterns(tuple(labels))
    text = normalize_answer_text(text)
    found = _label_after_answer_key(text, patterns)
    return found if found is not None else _single_label_named(text, patterns)


def match_answer_tokens(generated_ids, answer_token_ids):
    """Without a tokenizer: the label whose answer tokens start a generated row exactly, or None, per row."""
    choices = []
    for row in generated_ids.tolist():
        hits = [i for i, answer in enumerate(answer_token_ids) if row[: len(answer)] == list(answer)]
        choices.append(hits[0] if len(hits) == 1 else None)
    return choices


def choices_to_vectors(choices, num_labels, device=None):
    """One-hot vectors (B, C) and a found mask (B,) from per-row label choices; None gives a zero row."""
    vectors = torch.zeros(len(choices), num_labels, device=device)
    found = torch.tensor([choice is not None for choice in choices], dtype=torch.bool, device=device)
    for row, choice in enumerate(choices):
        if choice is not None:
            vectors[row, choice] = 1.0
    return vectors, found


def check_backbone(vlm):
    """Raise a `ValueError` unless `vlm` has the Qwen-VL layout this model drives; warn for a `model_type` outside
    `SUPPORTED_BACKBONES`. Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers 5.x, `modeling_qwen2_vl.py`,
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
    # `PreTrainedModel.post_init` gathers every child's `_no_split_modules` (modeling_utils.py, 5.24)
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

    def __init__(self, config: EmoVLMKDConfig, vlm=None):
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
    def from_vlm(cls, vlm, labels, processor=None, **config_kwargs):
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

    def set_answer_tokens(self, processor):
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

    def build_inputs(self, processor, images):
        """The model's inputs for a batch of images: the classification prompt (chat template, one image each)
        and the images through `processor`, left padded, on the model's device. `images` are PIL images (RGB) or
        arrays; for files, URLs or any mode (alpha, 16-bit, EXIF), prepare them with the pipeline file's
        `prepare_image(image, max_side=config.max_image_side)`, the one image path. Then `model(**inputs)` or
        `model.generate_labels(**inputs)`."""
        return prepare_inputs(processor, self.config, images).to(self.device)

    def answer_tokenizer(self):
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
    def spatial_merge_size(self):
        return self.vlm.model.visual.spatial_merge_size

    def encode_images(self, pixel_values, image_grid_thw):
        """The single visual-encoder pass: the backbone's `get_image_features` output, whose `pooler_output` holds the
        per-image merger tokens (a tuple, one (n_i, H) tensor per image). The whole output goes to the language model
        as `mm_encoder_outputs`, so Qwen3-VL's `deepstack_features` (mergers after early vision blocks, added to the
        image positions' hidden states in the first language-model layers) reach it as they would from pixels."""
        return self.vlm.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)

    @staticmethod
    def pool_image_features(image_tokens):
        """Mean over each image's own tokens (never across the batch): tuple of (n_i, H) -> (B, H).

        The tokens are what replaces the image placeholders in the language model's input, for every backbone:
        Qwen2-VL's merger output; Qwen2.5-VL's, after its windowed blocks and put back in raster order (a mean does
        not depend on the order anyway); Qwen3-VL's final merger output, not its deepstack features (these are added
        inside the language model's first layers, not fed as input tokens)."""
        return torch.stack([tokens.mean(0) for tokens in image_tokens])

    def forward_head(self, image_embeds):
        return self.distill_head(image_embeds.to(self.distill_head.classifier.weight.dtype))

    def forward_gate(self, vlm_vector, head_probs):
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

    def score_labels(self, input_ids, attention_mask, image_grid_thw, mm_token_type_ids, image_outputs,
                     prompt_cache=None):
        """Log-likelihood of each label's answer after the prompt: (B, C).

        One forward pass of the language model: the prompt + image, the answers' common prefix and a token trie of
        the label-specific parts are laid out as one sequence. The prompt and prefix attend causally; each trie
        token attends to the prompt, the prefix and its own ancestors only (a tree attention mask) and sits at the
        position it would have in its answer. Every label is thus scored in the prefill itself: the weights are read
        once (a second, small forward over a cache would read all of them again). With a `PromptPrefixCache`, the
        text every row shares before its image is taken from it instead of being computed again.
        `input_ids` must be left padded (`forward` takes care of it).
        """
        plan = self._scoring_plan(input_ids.device)
        batch = input_ids.shape[0]
        prefix = plan["prefix"].expand(batch, -1)
        tree = plan["tree_tokens"].expand(batch, -1)
        num_prefix, num_tree = prefix.shape[1], tree.shape[1]
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.vlm.config.image_token_id).to(torch.int)
        head = torch.cat([input_ids, prefix], dim=1)  # prompt + common prefix, attended causally
        head_mask = torch.cat([attention_mask, torch.ones_like(prefix, dtype=attention_mask.dtype)], dim=1)
        head_types = torch.cat([mm_token_type_ids, torch.zeros_like(prefix, dtype=mm_token_type_ids.dtype)], dim=1)
        # the same signature in qwen2_vl, qwen2_5_vl and qwen3_vl (an image needs none of the video timing arguments)
        position_ids, rope_deltas = self.vlm.model.get_rope_index(
            head, image_grid_thw=image_grid_thw, video_grid_thw=None, attention_mask=head_mask,
            mm_token_type_ids=head_types,
        )  # fmt: skip
        attn = self.vlm.model.language_model.config._attn_implementation or "sdpa"
        if attn not in ("sdpa", "eager"):  # flash attention & co. take no custom mask: a plain causal prefill
            if num_tree:
                raise NotImplementedError(f"score mode needs sdpa or eager attention (a tree mask), not {attn}")
            output = self.vlm(
                input_ids=head, attention_mask=head_mask, position_ids=position_ids, image_grid_thw=image_grid_thw,
                mm_token_type_ids=head_types, mm_encoder_outputs={"image": image_outputs}, use_cache=False,
                logits_to_keep=num_prefix + 1,
            )  # fmt: skip
        else:
            if num_tree:  # a trie token's text position continues after its row's last real token
                start = head_mask.sum(-1) + rope_deltas.to(head.device).view(-1)  # (B,)
                tree_positions = (start[:, None] + plan["tree_depth"][None]).to(position_ids.dtype)
                position_ids = torch.cat([position_ids, tree_positions[None].expand(3, -1, -1)], dim=-1)
            output = self._score_pass(
                head, head_mask, head_types, position_ids, tree, plan["tree_mask"], image_grid_thw, image_outputs,
                eager=attn == "eager", logits_to_keep=num_prefix + 1 + num_tree, prompt_cache=prompt_cache,
            )  # fmt: skip
        # rows: the last prompt token and the prefix tokens (predicting the prefix, then each label's first
        # specific token), then the trie tokens (predicting the next token of the labels that pass through them)
        log_probs = output.logits.float().log_softmax(-1)  # (B, P + 1 + T, V)
        # the common prefix's log-likelihood is the same for every label; it is added so that the result is the
        # full answer's log-likelihood (it cancels in the normalised distribution)
        prefix_ll = log_probs[:, :num_prefix].gather(-1, prefix[:, :, None]).sum((1, 2))  # (B,)
        steps = log_probs[:, num_prefix:]  # (B, 1 + T, V): row 0 = after the prefix, 1 + i = trie slot i
        picked = steps[:, plan["src"], plan["tgt"]]  # (B, C, K)
        return picked.masked_fill(~plan["valid"], 0.0).sum(-1) + prefix_ll[:, None]

    def _score_pass(self, head, head_mask, head_types, position_ids, tree, tree_mask, image_grid_thw,
                    image_outputs, eager, logits_to_keep, prompt_cache=None):
        """The language-model pass of `score_labels` under a tree attention mask (sdpa or eager); the shared text
        prefix of the prompt comes from `prompt_cache` when one is given. `position_ids` cover head + tree."""
        batch, num_cached, cache = head.shape[0], 0, None
        if prompt_cache is not None:
            prefix_ids = shared_text_prefix(head, head_mask, head_types)
            num_cached = len(prefix_ids)
        if num_cached:
            cache = prompt_cache.cache_for(self.vlm.model.language_model, prefix_ids, batch)
            num_head = head.shape[1]
            head_mask, head, head_types, head_positions = drop_leading_tokens(
                num_cached, head_mask, head, head_types, position_ids[..., :num_head]
            )
            position_ids = torch.cat([head_positions, position_ids[..., num_head:]], dim=-1)
        mask = tree_attention_mask(head_mask, tree_mask, num_cached)
        if eager:
            dtype = self.vlm.lm_head.weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return self.vlm(
            input_ids=torch.cat([head, tree], dim=1),
            attention_mask=mask,
            position_ids=position_ids,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=torch.cat([head_types, torch.zeros_like(tree, dtype=head_types.dtype)], dim=1),
            mm_encoder_outputs={"image": image_outputs},
            cache=cache,
            use_cache=cache is not None,
            logits_to_keep=logits_to_keep,
        )

    # -- the VLM branch, generate mode: the paper's protocol --------------------------------------------------------

    def generate_answers(self, input_ids, attention_mask, image_grid_thw, mm_token_type_ids, image_outputs, **kw):
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

    def answers_to_vectors(self, generated_ids, tokenizer=None):
        """`(vectors (B, C), found (B,), texts)`: generated answers parsed to one-hot vectors (zeros where an answer
        names no label). With a tokenizer the text is decoded and parsed (`parse_answer`); without one, each label's
        answer tokens are matched at the start of the answer and `texts` is None."""
        labels = self.config.labels
        texts = None
        if tokenizer is not None:
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor works too
            texts = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)
            choices = [parse_answer(text, labels) for text in texts]
        else:
            choices = match_answer_tokens(generated_ids, self.config.label_answer_token_ids or [])
        vectors, found = choices_to_vectors(choices, len(labels), device=generated_ids.device)
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
        loss when `labels` are given, and the output. The gate reads the head's uncalibrated probabilities."""
        config = self.config
        logits = self.forward_gate(vlm_scores, distill_logits.softmax(-1)) / config.gate_calibration_temperature
        distill_logits = distill_logits / config.head_calibration_temperature
        loss = F.cross_entropy(logits.float(), labels.to(logits.device)) if labels is not None else None
        return EmoVLMKDOutput(loss=loss, logits=logits, distill_logits=distill_logits, vlm_scores=vlm_scores,
                              vlm_answer_found=found, image_embeds=image_embeds, **fields)  # fmt: skip

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        labels=None,
        vlm_mode=None,
        prompt_cache=None,
        return_dict=None,
        **kwargs,
    ):
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
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        labels=None,
        tokenizer=None,
        generation_kwargs=None,
        **kwargs,
    ):
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
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        processor=None,
        question=None,
        vlm_mode=None,
        generation_kwargs=None,
        seed=None,
        streamer=None,
        prompt_cache=None,
    ):
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


def chat_prompt(processor, instruction):
    """One user turn of an image placeholder and `instruction`, chat-formatted, ending with the assistant's turn."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def build_prompt_text(processor, config):
    """The chat-formatted classification prompt (one image placeholder) ending with the assistant's turn."""
    return chat_prompt(processor, config.classification_prompt())


def explanation_inputs(processor, config, text, question=None):
    """The reasoning prompt for the images of `text` (`_encode`'s left-padded classification inputs): input ids,
    attention mask, `mm_token_type_ids` and grid, each row holding as many image tokens as its classification row
    (so the encoded images fit it as they are). The image placeholder is expanded here as the processor expands it."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token_id = config.vlm_config.image_token_id
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    prompt = chat_prompt(processor, question or EXPLANATION_QUESTION)
    if prompt.count(image_token) != 1:
        raise ValueError(f"the chat template should write one {image_token!r} per image, got: {prompt!r}")
    counts = (text["input_ids"] == image_token_id).sum(-1).tolist()
    rows = [prompt.replace(image_token, image_token * count) for count in counts]
    encoded = tokenizer(rows, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    input_ids = encoded["input_ids"].to(text["input_ids"].device)
    if (input_ids == image_token_id).sum(-1).tolist() != counts:
        raise ValueError("the tokenizer does not keep the image placeholder tokens as they are")
    types = text["mm_token_type_ids"]
    mm_token_type_ids = (input_ids == image_token_id).to(types.dtype if types is not None else torch.int)
    return {"input_ids": input_ids, "attention_mask": encoded["attention_mask"].to(input_ids.device),
            "image_grid_thw": text["image_grid_thw"], "mm_token_type_ids": mm_token_type_ids}  # fmt: skip


def prepare_inputs(processor, config, images):
    """Processor outputs for a batch of RGB images, each with the classification prompt (left padded)."""
    prompt = build_prompt_text(processor, config)
    return processor(text=[prompt] * len(images), images=list(images), padding=True, padding_side="left",
                     return_tensors="pt")  # the tokenizer's own `padding_side` is left as it is


EmoVLMKDModel = EmoVLMKDForImageClassification

__all__ = [
    "EmoVLMKDForImageClassification",
    "EmoVLMKDModel",
    "EmoVLMKDOutput",
    "EmoVLMKDPreTrainedModel",
    "EXPLANATION_QUESTION",
    "LabelScoringPlan",
    "PromptPrefixCache",
    "build_prompt_text",
    "chat_prompt",
    "explanation_inputs",
    "parse_answer",
    "prepare_inputs",
]
