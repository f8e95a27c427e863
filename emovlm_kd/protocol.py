"""`protocol: paper | official`: one preset over the per-stage knobs, from ONE table (`KNOBS`).

`paper` is the project's behaviour (the paper's text, with the mends the README lists); `official` is what the
authors' code (github sange1104/EmoVLM-KD, commit fdffa10) actually ran, bugs that shaped Table 1 included (the
categorical prompt that is the string "None", item 5). A knob a config or a flag sets keeps its value; a knob left
unset (None) is filled from the row of the run's protocol (`fill`). Each training stage still reads only its own
knobs (`cfg.sft_loss`, `cfg.distill_optimizer`, ...); the model-side knobs (chat_format, gate_input,
answer_protocol: `model_fields`) are fields of the Hub bundle's config (`configuration_emovlm_kd.EmoVLMKDConfig`),
implemented in the Hub files.

The numbers in brackets are issue 24's items; file:line is the official code at commit fdffa10.
This module imports nothing heavy (the standard library only): configs, commands and tests read it freely.
"""

import dataclasses

PROTOCOLS = ("paper", "official")
DEFAULT_PROTOCOL = "paper"

# knob -> (paper, official, where the official value comes from)
KNOBS = {
    # stage 1 (SFT)
    "sft_loss": ("answer", "all_tokens",
                 "[1] train_vlm.py:118-128: labels = input_ids, padding and image tokens (151652/151653/151655) -100"),
    "sft_scheduler": ("constant_with_warmup", "constant",
                      "[2] train_vlm.py:102-103: warmup_ratio=0.03 with lr_scheduler_type='constant', which "
                      "transformers' get_scheduler builds without warmup"),
    "chat_format": ("paper", "official",
                    "[3,4,5] data_utils.py:37,165-176 (system message, text before the image), train_vlm.py:20-33 "
                    "(the 'Example: ...' questions), data_utils.py:131-146 (no `return`: the prompt is None, "
                    "rendered 'None')"),
    "annotator_prompt": ("paper", "official", "[6] prompt_template.txt, generate_instruction.py:34-37"),
    "quantize_scope": ("llm", "all",
                       "[7] train_vlm.py:69-80: BitsAndBytesConfig with no skip list (transformers still keeps "
                       "lm_head, the output embedding, unquantised)"),
    "sft_tf32": (False, True, "[17] train_vlm.py:100: SFTConfig(tf32=True)"),
    # stage 3 (head) and stage 4 (gate)
    "distill_optimizer": ("adamw", "adam", "[8] train_distillation.py:155: optim.Adam(weight_decay=1e-4), constant"),
    "gate_optimizer": ("adamw", "adam", "[8] train_gate.py:358: optim.Adam(weight_decay=1e-4), constant"),
    "distill_batch_size": (32, 1, "[9] train_distillation.py:33: one image per step"),
    "gate_batch_size": (32, 1, "[9] train_gate.py:189: one image per step"),
    "distill_init": ("normal", "pytorch", "[10] distill_model.py:389-400: nn.Linear's own initialisation"),
    "gate_init": ("normal", "pytorch", "[10] train_gate.py:105-114: nn.Linear's own initialisation"),
    # the model (Hub config fields)
    "gate_input": ("probs", "logits", "[11] train_gate.py:197-200: the head's raw output, no softmax"),
    "answer_protocol": ("score", "official",
                        "[12,13] train_gate.py:50,61-94: the answer sampled (T 0.8, top_p 1, 256 new tokens) "
                        "after a prompt without the generation prompt, parsed by a case-sensitive regex; a miss is "
                        "zeros, or one-hot on the first sorted label for two classes"),
    # data
    "split_rule": ("paper", "official",
                   "[14] data_utils.py:107-128: val = stratified 10 % of train (random_state 42) for EmoSet, "
                   "Emotion6; the pre-split folders elsewhere"),
}

# The config values the official `answer_protocol` stands for (`model_fields`, `apply_to_model`).
OFFICIAL_SAMPLING = {"vlm_mode": "generate", "vlm_do_sample": True, "vlm_temperature": 0.8, "vlm_max_new_tokens": 256}
# train_gate.py:67-73 (and train_vlm.py:153): do_sample=True, temperature=0.8, top_p=1.0, max_new_tokens=256


def check(name):
    """`name` if it is a protocol, else ValueError naming the flag."""
    if name not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}")
    return name


def preset(name):
    """{knob: value} of a protocol."""
    column = PROTOCOLS.index(check(name))
    return {knob: row[column] for knob, row in KNOBS.items()}


def fill(cfg):
    """Fill every knob of `cfg` (a dataclass or any object with the knob attributes) left None from its protocol's
    row, in place; knobs `cfg` does not have are skipped (each stage's group has only its own). Returns `cfg`."""
    values = preset(getattr(cfg, "protocol", None) or DEFAULT_PROTOCOL)
    for knob, value in values.items():
        if hasattr(cfg, knob) and getattr(cfg, knob) is None:
            setattr(cfg, knob, value)
    return cfg


def with_protocol(cfg, name):
    """A copy of the dataclass `cfg` under protocol `name`: the knobs that hold the old protocol's value are filled
    from the new one's (a knob set to something else stays)."""
    old = preset(getattr(cfg, "protocol", None) or DEFAULT_PROTOCOL)
    reset = {k: None for k, v in old.items() if hasattr(cfg, k) and getattr(cfg, k) == v}
    return dataclasses.replace(cfg, protocol=check(name), **reset)


def model_fields(cfg):
    """The bundle-config fields (`EmoVLMKDConfig` keyword arguments) of `cfg`'s model-side knobs; empty for the
    paper's values (so a paper bundle's config.json is what it was)."""
    fields = {}
    if getattr(cfg, "chat_format", "paper") == "official":
        from configuration_emovlm_kd import OFFICIAL_PROMPT

        fields.update(chat_format="official", prompt=OFFICIAL_PROMPT)
    if getattr(cfg, "gate_input", "probs") != "probs":
        fields["gate_input"] = cfg.gate_input
    if getattr(cfg, "answer_protocol", "score") == "official":
        fields.update(OFFICIAL_SAMPLING, answer_parsing="official", generation_prompt=False)
    return fields


PAPER_ANSWERING = {"vlm_mode": "score", "vlm_do_sample": False, "answer_parsing": "lenient", "generation_prompt": True}


def apply_to_model(model, processor, name):
    """Evaluate a loaded bundle under protocol `name` (evaluate, table1 `--protocol`): how its VLM branch answers.
    `official`: one answer sampled at T 0.8 (256 new tokens; the evaluation seeds it), parsed as train_gate.py:83-93,
    after a prompt without the generation prompt; `paper`: the label scores (deterministic). What the bundle was
    trained with stays (its chat layout, the gate's input): changing those would feed the gate what it never saw.
    The answers' token ids are recomputed when the prompt's end changes. Returns `model`."""
    if name is None:
        return model
    config = model.config
    values = dict(OFFICIAL_SAMPLING, answer_parsing="official", generation_prompt=False) if check(name) == "official" \
        else PAPER_ANSWERING
    before = config.generation_prompt
    for key, value in values.items():
        setattr(config, key, value)
    if config.generation_prompt != before and processor is not None and hasattr(model, "set_answer_tokens"):
        model.set_answer_tokens(processor)
    return model


def config_changes(config):
    """(field, value) of a bundle config's protocol fields that differ from the paper's: what the cache keys of the
    VLM passes add (nothing for a paper bundle, whose keys stay what they were)."""
    from configuration_emovlm_kd import PROTOCOL_FIELD_DEFAULTS

    return tuple((k, getattr(config, k)) for k, v in PROTOCOL_FIELD_DEFAULTS.items() if getattr(config, k, v) != v)


def knob_help(knob, text):
    """A knob's flag help: `text` and what each protocol fills it with (`%` doubled: argparse formats help)."""
    paper, official, _ = KNOBS[knob]
    return f"{text} (default: the --protocol's: paper {paper}, official {official})".replace("%", "%%")
