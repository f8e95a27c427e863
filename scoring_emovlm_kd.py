"""The text side of EmoVLM-KD's VLM branch (used by `modeling_emovlm_kd`): the prompts, the label scorer and the
answer parser.

Prompts: the chat-formatted classification prompt (`build_prompt_text`, `prepare_inputs`) and the paper's reasoning
prompt for `explain` (`explanation_inputs`). Score mode: every label's answer after the classification prompt is
scored in one language-model pass (`score_label_answers`): the answers' common prefix follows the prompt and their
label-specific rest is laid out as a token trie under a tree attention mask (`LabelScoringPlan`,
`tree_attention_mask`); the text every prompt shares before its image can come from a `PromptPrefixCache`. Generate
mode: a decoded answer is parsed to a label (`parse_answer`) or, without a tokenizer, matched token by token
(`match_answer_tokens`).

This file travels to the Hub with the model: it imports only torch, transformers and the standard library.
"""

import ast
import functools
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.utils import logging

logger = logging.get_logger(__name__)


# The paper's reasoning instruction (stage 1 tunes the VLM on it): what `explain` asks about each image.
EXPLANATION_QUESTION = "Observe the image and describe the process of inferring the emotions conveyed in the image."
EXPLANATION_MAX_NEW_TOKENS = 128
# The official code's system message (github sange1104/EmoVLM-KD at fdffa10, data_utils.py:37), `chat_format: official`
OFFICIAL_SYSTEM_MESSAGE = "You are an AI visual assistant, and you are seeing a single image."


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------


def chat_messages(instruction: str, config: Any = None) -> list[dict[str, Any]]:
    """The chat of one classification (or reasoning) question about one image: the paper's (a user turn of the image
    then `instruction`, the backbone's default system message) or, with `config.chat_format == "official"`, the
    official code's (its system message, then the user turn as [instruction, image]: data_utils.py:37,165-176)."""
    if getattr(config, "chat_format", "paper") == "official":
        return [{"role": "system", "content": [{"type": "text", "text": OFFICIAL_SYSTEM_MESSAGE}]},
                {"role": "user", "content": [{"type": "text", "text": instruction}, {"type": "image"}]}]
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def chat_prompt(processor: Any, instruction: str, config: Any = None, generation_prompt: bool | None = None) -> str:
    """One image and `instruction`, chat-formatted (`chat_messages`), ending with the assistant's turn unless
    `generation_prompt` is False (default: `config.generation_prompt`, True without a config; the official code's
    gate and test prompts leave it out, train_gate.py:50)."""
    if generation_prompt is None:
        generation_prompt = getattr(config, "generation_prompt", True)
    messages = chat_messages(instruction, config)
    return processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def build_prompt_text(processor: Any, config: Any) -> str:
    """The chat-formatted classification prompt (one image placeholder), as `config` says (`chat_prompt`)."""
    return chat_prompt(processor, config.classification_prompt(), config)


def explanation_inputs(
    processor: Any, config: Any, text: dict[str, Any], question: str | None = None
) -> dict[str, Any]:
    """The reasoning prompt for the images of `text` (`_encode`'s left-padded classification inputs): input ids,
    attention mask, `mm_token_type_ids` and grid, each row holding as many image tokens as its classification row
    (so the encoded images fit it as they are). The image placeholder is expanded here as the processor expands it."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token_id = config.vlm_config.image_token_id
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    prompt = chat_prompt(processor, question or EXPLANATION_QUESTION, config, generation_prompt=True)
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


def prepare_inputs(processor: Any, config: Any, images: Sequence[Any]) -> Any:
    """Processor outputs for a batch of RGB images, each with the classification prompt (left padded)."""
    prompt = build_prompt_text(processor, config)
    return processor(text=[prompt] * len(images), images=list(images), padding=True, padding_side="left",
                     return_tensors="pt")  # the tokenizer's own `padding_side` is left as it is


# ----------------------------------------------------------------------------------------------------------------
# The label scorer (score mode)
# ----------------------------------------------------------------------------------------------------------------


class LabelScoringPlan:
    """How to score every label's answer tokens in the prefill itself (one forward pass of the language model).

    The answers' common token prefix follows the prompt. The label-specific rest is laid out as a token trie:
    every trie node that has children becomes one extra token after the prefix, which attends to the prompt and
    to its ancestors only (a tree attention mask), so all labels are scored in one forward with no copy of a cache.
    Leaves are never fed (only predicted): when the labels' first tokens already differ and each answer ends
    there, no trie token is added at all.
    """

    def __init__(self, answer_token_ids: Sequence[Sequence[int]]) -> None:
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

    def tensors(self, device: torch.device | str) -> dict[str, torch.Tensor]:
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

    def cache_for(self, language_model: nn.Module, prefix_ids: torch.Tensor, batch_size: int) -> DynamicCache:
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


def score_label_answers(
    vlm: nn.Module,
    plan: dict[str, torch.Tensor],
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.LongTensor,
    mm_token_type_ids: torch.Tensor | None,
    image_outputs: Any,
    prompt_cache: "PromptPrefixCache | None" = None,
) -> torch.FloatTensor:
    """Log-likelihood of each label's answer after the prompt: (B, C).

    One forward pass of the language model: the prompt + image, the answers' common prefix and a token trie of
    the label-specific parts are laid out as one sequence. The prompt and prefix attend causally; each trie
    token attends to the prompt, the prefix and its own ancestors only (a tree attention mask) and sits at the
    position it would have in its answer. Every label is thus scored in the prefill itself: the weights are read
    once (a second, small forward over a cache would read all of them again). With a `PromptPrefixCache`, the
    text every row shares before its image is taken from it instead of being computed again.
    `vlm` is the Qwen-VL backbone (`AutoModelForImageTextToText`), `plan` `LabelScoringPlan(...).tensors(device)`.
    `input_ids` must be left padded (the model's `forward` takes care of it).
    """
    batch = input_ids.shape[0]
    prefix = plan["prefix"].expand(batch, -1)
    tree = plan["tree_tokens"].expand(batch, -1)
    num_prefix, num_tree = prefix.shape[1], tree.shape[1]
    if mm_token_type_ids is None:
        mm_token_type_ids = (input_ids == vlm.config.image_token_id).to(torch.int)
    head = torch.cat([input_ids, prefix], dim=1)  # prompt + common prefix, attended causally
    head_mask = torch.cat([attention_mask, torch.ones_like(prefix, dtype=attention_mask.dtype)], dim=1)
    head_types = torch.cat([mm_token_type_ids, torch.zeros_like(prefix, dtype=mm_token_type_ids.dtype)], dim=1)
    # the same signature in qwen2_vl, qwen2_5_vl and qwen3_vl (an image needs none of the video timing arguments)
    position_ids, rope_deltas = vlm.model.get_rope_index(
        head, image_grid_thw=image_grid_thw, video_grid_thw=None, attention_mask=head_mask,
        mm_token_type_ids=head_types,
    )  # fmt: skip
    attn = vlm.model.language_model.config._attn_implementation or "sdpa"
    if attn not in ("sdpa", "eager"):  # flash attention & co. take no custom mask: a plain causal prefill
        if num_tree:
            raise NotImplementedError(f"score mode needs sdpa or eager attention (a tree mask), not {attn}")
        logits = answer_logits(
            vlm, num_prefix + 1, input_ids=head, attention_mask=head_mask, position_ids=position_ids,
            image_grid_thw=image_grid_thw, mm_token_type_ids=head_types, mm_encoder_outputs={"image": image_outputs},
            use_cache=False,
        )  # fmt: skip
    else:
        if num_tree:  # a trie token's text position continues after its row's last real token
            start = head_mask.sum(-1) + rope_deltas.to(head.device).view(-1)  # (B,)
            tree_positions = (start[:, None] + plan["tree_depth"][None]).to(position_ids.dtype)
            position_ids = torch.cat([position_ids, tree_positions[None].expand(3, -1, -1)], dim=-1)
        logits = _tree_score_pass(
            vlm, head, head_mask, head_types, position_ids, tree, plan["tree_mask"], image_grid_thw, image_outputs,
            eager=attn == "eager", logits_to_keep=num_prefix + 1 + num_tree, prompt_cache=prompt_cache,
        )  # fmt: skip
    # rows: the last prompt token and the prefix tokens (predicting the prefix, then each label's first
    # specific token), then the trie tokens (predicting the next token of the labels that pass through them)
    log_probs = logits.float().log_softmax(-1)  # (B, P + 1 + T, V)
    # the common prefix's log-likelihood is the same for every label; it is added so that the result is the
    # full answer's log-likelihood (it cancels in the normalised distribution)
    prefix_ll = log_probs[:, :num_prefix].gather(-1, prefix[:, :, None]).sum((1, 2))  # (B,)
    steps = log_probs[:, num_prefix:]  # (B, 1 + T, V): row 0 = after the prefix, 1 + i = trie slot i
    picked = steps[:, plan["src"], plan["tgt"]]  # (B, C, K)
    return picked.masked_fill(~plan["valid"], 0.0).sum(-1) + prefix_ll[:, None]

def _tree_score_pass(vlm, head, head_mask, head_types, position_ids, tree, tree_mask, image_grid_thw,
                     image_outputs, eager, logits_to_keep, prompt_cache=None):
    """The language-model pass of `score_label_answers` under a tree attention mask (sdpa or eager): the logits of the
    last `logits_to_keep` positions. The shared text prefix of the prompt comes from `prompt_cache` when one is given.
    `position_ids` cover head + tree."""
    batch, num_cached, cache = head.shape[0], 0, None
    if prompt_cache is not None:
        prefix_ids = shared_text_prefix(head, head_mask, head_types)
        num_cached = len(prefix_ids)
    if num_cached:
        cache = prompt_cache.cache_for(vlm.model.language_model, prefix_ids, batch)
        num_head = head.shape[1]
        head_mask, head, head_types, head_positions = drop_leading_tokens(
            num_cached, head_mask, head, head_types, position_ids[..., :num_head]
        )
        position_ids = torch.cat([head_positions, position_ids[..., num_head:]], dim=-1)
    mask = tree_attention_mask(head_mask, tree_mask, num_cached)
    if eager:
        dtype = vlm.lm_head.weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return answer_logits(
        vlm,
        logits_to_keep,
        input_ids=torch.cat([head, tree], dim=1),
        attention_mask=mask,
        position_ids=position_ids,
        image_grid_thw=image_grid_thw,
        mm_token_type_ids=torch.cat([head_types, torch.zeros_like(tree, dtype=head_types.dtype)], dim=1),
        mm_encoder_outputs={"image": image_outputs},
        cache=cache,
        use_cache=cache is not None,
    )


# The CPU's vocabulary projection of a few rows, in slices of about this many bytes of `lm_head.weight` (see
# `vocabulary_logits`).
VOCAB_SLICE_BYTES = 2 << 20


def answer_logits(vlm: nn.Module, logits_to_keep: int, **inputs: Any) -> torch.Tensor:
    """The logits of the last `logits_to_keep` positions, (B, logits_to_keep, V): what `vlm(**inputs,
    logits_to_keep=...).logits` gives (the backbone's forward is its `model`, then `lm_head` on the kept positions:
    `Qwen2VLForConditionalGeneration.forward` and its Qwen2.5-VL / Qwen3-VL twins), with the projection done by
    `vocabulary_logits`."""
    hidden = vlm.model(**inputs).last_hidden_state[:, -logits_to_keep:]
    return vocabulary_logits(vlm.lm_head, hidden)


def vocabulary_logits(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`lm_head(hidden)` for the few rows score mode keeps (the last prompt token, the answers' prefix, the trie).
    On the CPU, a plain `nn.Linear` is applied in slices of the vocabulary (`VOCAB_SLICE_BYTES` of weight each): a
    matrix product of a dozen rows against the whole (V, H) weight at once ran about twice as long as one row's (the
    small benchmark config, 2 threads: 14 ms against 6.5 ms of main-thread CPU), sliced about 8.5 ms. Each output
    element is the same dot product over H either way (bit-identical logits in that config). Elsewhere (CUDA,
    quantised or wrapped heads) `lm_head(hidden)` as it is."""
    weight = getattr(lm_head, "weight", None)
    if type(lm_head) is not nn.Linear or weight.device.type != "cpu" or hidden.device.type != "cpu":
        return lm_head(hidden)
    rows = max(256, VOCAB_SLICE_BYTES // (weight.shape[1] * weight.element_size()))
    if rows >= weight.shape[0]:
        return lm_head(hidden)
    biases = lm_head.bias.split(rows) if lm_head.bias is not None else [None] * -(-weight.shape[0] // rows)
    return torch.cat([nn.functional.linear(hidden, w, b) for w, b in zip(weight.split(rows), biases)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Answer parsing (generate mode)
# ----------------------------------------------------------------------------------------------------------------


# Scripts written without spaces between words: a label in them is found anywhere, not only between word boundaries.
_UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "IDEOGRAPHIC", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")
_PLAIN_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"'})
_ANSWER_KEY_RE = re.compile(r"""['"]?emotion['"]?\s*[:=]\s*['"]?\s*""")
_ANSWER_VALUE_END_RE = re.compile(r"""\s*(?:['"},;.]|$)""")


def normalize_answer_text(text: str) -> str:
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


def parse_answer(text: str, labels: Sequence[str]) -> int | None:
    """The index of the label a generated answer names, or None. `{'emotion': '<label>'}` first, else the one label
    the text names. Labels are any Unicode text (`joie`, `Überraschung`, `悲しみ`, `class 2`, `don't care`), compared
    after `normalize_answer_text`; a label must not run into a neighbouring letter or digit (`awe` is not in
    `awesome`, `class 2` not in `class 20`), except in scripts written without spaces (CJK, Thai...)."""
    patterns = _label_patterns(tuple(labels))
    text = normalize_answer_text(text)
    found = _label_after_answer_key(text, patterns)
    return found if found is not None else _single_label_named(text, patterns)


_OFFICIAL_ANSWER_RE = re.compile(r"{'emotion':\s*'.*?'}")  # train_gate.py:83, verbatim


def parse_answer_official(text: str, labels: Sequence[str]) -> int | None:
    """The official code's parsing (train_gate.py:83-88): the first literal `{'emotion': '...'}` (the key quoted
    with single quotes, exactly as written), evaluated with `ast.literal_eval`; its value must be a label exactly
    (case-sensitive). None otherwise (the official code's `'none'`)."""
    match = _OFFICIAL_ANSWER_RE.search(text)
    try:
        value = ast.literal_eval(match.group(0))["emotion"]
    except Exception:  # no match, or not a literal: the official code's bare `except Exception`
        return None
    labels = list(labels)
    return labels.index(value) if value in labels else None


def official_miss_index(labels: Sequence[str]) -> int | None:
    """The label a miss becomes under the official parsing: for two labels the first in sorted order (sklearn's
    `LabelBinarizer` sorts its classes, transforms an unknown label to [[0]], and train_gate.py:91 takes
    `np.eye(2)[0]` = [1, 0]: 'negative' for Flickr/Instagram); None (a zero vector) for more labels."""
    labels = list(labels)
    return labels.index(sorted(labels)[0]) if len(labels) == 2 else None


def match_answer_tokens(generated_ids: torch.Tensor, answer_token_ids: Sequence[Sequence[int]]) -> list[int | None]:
    """Without a tokenizer: the label whose answer tokens start a generated row exactly, or None, per row."""
    choices = []
    for row in generated_ids.tolist():
        hits = [i for i, answer in enumerate(answer_token_ids) if row[: len(answer)] == list(answer)]
        choices.append(hits[0] if len(hits) == 1 else None)
    return choices


def choices_to_vectors(
    choices: Sequence[int | None], num_labels: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.BoolTensor]:
    """One-hot vectors (B, C) and a found mask (B,) from per-row label choices; None gives a zero row."""
    vectors = torch.zeros(len(choices), num_labels, device=device)
    found = torch.tensor([choice is not None for choice in choices], dtype=torch.bool, device=device)
    for row, choice in enumerate(choices):
        if choice is not None:
            vectors[row, choice] = 1.0
    return vectors, found


__all__ = [
    "EXPLANATION_QUESTION",
    "OFFICIAL_SYSTEM_MESSAGE",
    "LabelScoringPlan",
    "PromptPrefixCache",
    "answer_logits",
    "build_prompt_text",
    "chat_messages",
    "chat_prompt",
    "official_miss_index",
    "parse_answer_official",
    "choices_to_vectors",
    "drop_leading_tokens",
    "explanation_inputs",
    "match_answer_tokens",
    "normalize_answer_text",
    "parse_answer",
    "prepare_inputs",
    "score_label_answers",
    "shared_text_prefix",
    "to_left_padding",
    "tree_attention_mask",
    "vocabulary_logits",
]
