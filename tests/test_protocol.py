"""Issue 24: `protocol: paper | official`. Each knob of emovlm_kd/protocol.py switches with the protocol, on tiny
models, and `paper` is what the project did before the knobs existed. Item numbers are issue 24's; the official
behaviour is read from github sange1104/EmoVLM-KD at fdffa10 (file:line in emovlm_kd/protocol.py)."""

import dataclasses
import logging

import pytest
import torch
from conftest import random_image

from configuration_emovlm_kd import OFFICIAL_PROMPT, PROTOCOL_FIELD_DEFAULTS, EmoVLMKDConfig
from emovlm_kd import protocol
from emovlm_kd.training.config import TrainConfig, parse_train_args
from scoring_emovlm_kd import (
    OFFICIAL_SYSTEM_MESSAGE,
    build_prompt_text,
    official_miss_index,
    parse_answer,
    parse_answer_official,
)

PAPER, OFFICIAL = TrainConfig(), TrainConfig(protocol="official")


# ------------------------------------------------------------------------------------------------ the preset


def test_every_knob_switches_and_a_set_knob_stays():
    for knob, (paper, official, source) in protocol.KNOBS.items():
        assert paper != official and source, knob
        assert getattr(PAPER, knob) == paper and getattr(OFFICIAL, knob) == official, knob
    mixed = TrainConfig(protocol="official", gate_batch_size=4, sft_loss="answer")
    assert (mixed.gate_batch_size, mixed.sft_loss, mixed.distill_batch_size) == (4, "answer", 1)
    back = protocol.with_protocol(mixed, "paper")  # the knobs that held official's values take paper's
    assert (back.gate_batch_size, back.sft_loss, back.distill_batch_size, back.sft_tf32) == (4, "answer", 32, False)
    with pytest.raises(ValueError, match="--protocol"):
        TrainConfig(protocol="authors")


def test_every_paper_config_says_protocol_paper_and_the_flag_switches_it():
    from emovlm_kd import configs

    for name in configs.names():
        text = configs.path(name).read_text(encoding="utf-8")
        assert "\nprotocol: paper\n" in text, name
        assert "distill_batch_size:" not in text and "gate_batch_size:" not in text, name  # the protocol's knobs
    cfg = parse_train_args(["--config", "fi", "--protocol", "official"])
    assert (cfg.protocol, cfg.distill_batch_size, cfg.gate_optimizer, cfg.sft_loss) == ("official", 1, "adam",
                                                                                       "all_tokens")
    assert parse_train_args(["--config", "fi"]).distill_batch_size == 32


def test_paper_bundle_config_has_no_new_keys_and_official_round_trips(tmp_path):
    paper = EmoVLMKDConfig(id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    assert not set(PROTOCOL_FIELD_DEFAULTS) & set(paper.to_dict())  # config.json as before the fields existed
    official = EmoVLMKDConfig(id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1}, **protocol.model_fields(OFFICIAL))
    official.save_pretrained(tmp_path)
    loaded = EmoVLMKDConfig.from_pretrained(tmp_path)
    assert (loaded.chat_format, loaded.generation_prompt, loaded.answer_parsing, loaded.gate_input) == (
        "official", False, "official", "logits")
    assert (loaded.vlm_mode, loaded.vlm_do_sample, loaded.vlm_temperature, loaded.vlm_max_new_tokens) == (
        "generate", True, 0.8, 256)
    assert loaded.classification_prompt() == OFFICIAL_PROMPT == "None"  # item 5: the builder returned None
    assert protocol.model_fields(PAPER) == {}
    with pytest.raises(ValueError, match="gate_input"):
        EmoVLMKDConfig(gate_input="softmax")


# ------------------------------------------------------------------------ items 3, 4, 5, 13: the chat and prompt


def _official_config(config):
    return EmoVLMKDConfig(**{**config.to_dict(), **protocol.model_fields(OFFICIAL)})


def test_chat_text_and_generation_prompt_switch(tiny_bundle):
    model, processor = tiny_bundle
    paper = build_prompt_text(processor, model.config)
    official = build_prompt_text(processor, _official_config(model.config))
    # paper: the backbone's default system turn, the image before the paper's prompt, the assistant header at the end
    assert OFFICIAL_SYSTEM_MESSAGE not in paper and paper.endswith("<|im_start|>assistant\n")
    assert paper.index("<|vision_start|>") < paper.index(model.config.classification_prompt())
    # official: its system message, the text "None" before the image (data_utils.py:165-176), no generation prompt
    # (train_gate.py:50): the prompt ends with the user's turn
    assert official.startswith(f"<|im_start|>system\n{OFFICIAL_SYSTEM_MESSAGE}<|im_end|>\n")
    assert "<|im_start|>user\nNone<|vision_start|>" in official
    assert official.endswith("<|vision_end|><|im_end|>\n") and "<|im_start|>assistant" not in official


def test_official_questions_and_annotator_prompt():
    from emovlm_kd.training.annotate import annotation_prompt
    from emovlm_kd.training.instructions import QUESTIONS, questions_for

    assert questions_for("paper") is QUESTIONS
    for kind, question in questions_for("official").items():  # train_vlm.py:20-33
        assert question.startswith(QUESTIONS[kind] + " Example: ")
    labels = ["negative", "positive"]
    ours, official = annotation_prompt("positive", labels), annotation_prompt("positive", labels, "official")
    assert "2 categories: negative, positive" in ours
    # prompt_template.txt: the 8 Mikels labels whatever the dataset, the label in its ==Emotion Information== block
    assert "amusement, excitement, sadness, fear, contentment, anger, disgust, awe" in official
    assert "==Emotion Information==\npositive\n==" in official


# --------------------------------------------------------------------------- item 12: parsing and the miss vector


def test_official_parsing_is_literal_and_case_sensitive():
    labels = ["amusement", "anger", "awe"]
    assert parse_answer_official("sure: {'emotion': 'awe'} ok", labels) == 2
    assert parse_answer_official("{'emotion':'anger'}", labels) == 1
    for miss in ("{'emotion': 'Awe'}", '{"emotion": "awe"}', "awe", "{'emotion': 'joy'}", ""):
        assert parse_answer_official(miss, labels) is None, miss
    assert parse_answer("{'emotion': 'Awe'}", labels) == 2 and parse_answer("awe", labels) == 2  # lenient
    assert official_miss_index(["positive", "negative"]) == 1  # sorted first: 'negative'
    assert official_miss_index(labels) is None


class _Texts:
    """A stand-in tokenizer whose `batch_decode` returns fixed answers."""

    def __init__(self, texts):
        self.texts = texts

    def batch_decode(self, ids, skip_special_tokens=True):
        return list(self.texts)


@pytest.mark.parametrize("labels, miss_vector", [(["positive", "negative"], [0.0, 1.0]),
                                                 (["amusement", "anger", "awe"], [0.0, 0.0, 0.0])])
def test_the_vector_of_a_miss_switches(labels, miss_vector):
    from emovlm_kd.tiny import build_tiny_bundle

    model, _ = build_tiny_bundle(labels=labels)
    texts = ["I would say Positive.", "{'emotion': '" + labels[0] + "'}"]
    ids = torch.zeros(2, 3, dtype=torch.long)
    paper, found, _ = model.answers_to_vectors(ids, _Texts(texts))
    assert found.tolist() == [labels[0] == "positive", True]  # lenient: a label named anywhere, any case
    model.config.answer_parsing = "official"
    official, found, _ = model.answers_to_vectors(ids, _Texts(texts))
    assert found.tolist() == [False, True]
    assert official[0].tolist() == miss_vector  # Flickr/Instagram: np.eye(2)[lb.transform(['none'])] = 'negative'
    assert official[1].tolist() == [1.0] + [0.0] * (len(labels) - 1)


# ------------------------------------------------------------------------------------ item 11: the gate's input


def test_the_gate_reads_probabilities_or_logits(tiny_bundle):
    model, _ = tiny_bundle
    seen = []
    handle = model.gate.register_forward_hook(lambda module, args, output: seen.append(args[1].detach().clone()))
    vlm, logits = torch.zeros(2, model.config.num_labels), torch.randn(2, model.config.num_labels)
    try:
        model._combine(vlm, None, None, logits, None)
        model.config.gate_input = "logits"
        model._combine(vlm, None, None, logits, None)
    finally:
        model.config.gate_input = "probs"
        handle.remove()
    torch.testing.assert_close(seen[0], logits.softmax(-1))
    torch.testing.assert_close(seen[1], logits)  # train_gate.py:197-200: the head's raw output
    from emovlm_kd.training.heads import gate_head_input

    torch.testing.assert_close(gate_head_input(logits, "logits"), logits)
    torch.testing.assert_close(gate_head_input(logits, "probs"), logits.softmax(-1))


# ------------------------------------------------------------------------- items 8, 9, 10: head and gate training


def _train_gate(cfg, tmp_path, monkeypatch):
    from emovlm_kd.training import heads
    from modeling_emovlm_kd import GATE_CLASSES

    trainers = []
    original = heads._train
    monkeypatch.setattr(heads, "_train", lambda trainer, resume: trainers.append(trainer) or original(
        trainer, resume))
    gate = GATE_CLASSES["concat_linear"](3)
    g = torch.Generator().manual_seed(0)
    vlm, head, labels = torch.rand(8, 3, generator=g), torch.rand(8, 3, generator=g), torch.arange(8) % 3
    heads.train_gate(cfg.gate_args, gate, vlm, head, labels, str(tmp_path), seed=0, save_strategy="no",
                     logging_strategy="no", use_cpu=True)
    return trainers[0]


@pytest.mark.parametrize("name", ["paper", "official"])
def test_gate_optimiser_schedule_and_batch_switch(name, tmp_path, monkeypatch):
    cfg = dataclasses.replace(TrainConfig(protocol=name), gate_epochs=2.0, gate_lr=0.01, seed=0)
    trainer = _train_gate(cfg, tmp_path, monkeypatch)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    if name == "official":  # train_gate.py:358: Adam, L2 decay 1e-4 on every parameter, constant rate, batch 1
        assert type(optimizer) is torch.optim.Adam
        assert [group["weight_decay"] for group in optimizer.param_groups] == [1e-4]
        assert trainer.lr_scheduler.get_last_lr() == [0.01]
        assert trainer.args.per_device_train_batch_size == 1 and trainer.state.global_step == 16
    else:  # Trainer's AdamW, linear decay to 0, batch 32
        assert type(optimizer) is torch.optim.AdamW  # two groups: decayed weights, undecayed biases
        assert trainer.lr_scheduler.get_last_lr() == [0.0, 0.0]
        assert trainer.args.per_device_train_batch_size == 32 and trainer.state.global_step == 2


def test_initialisation_switches():
    from emovlm_kd.training.heads import reset_module

    layer = torch.nn.Linear(100, 50).requires_grad_(False)
    reset_module(layer, 0, "normal")
    assert float(layer.bias.abs().max()) == 0.0 and 0.015 < float(layer.weight.std()) < 0.025
    reset_module(layer, 0, "pytorch")
    bound = 1 / 100 ** 0.5  # nn.Linear.reset_parameters: U(-1/sqrt(in), 1/sqrt(in)) for the bias, within it the weight
    assert float(layer.bias.abs().max()) > 0 and float(layer.bias.abs().max()) <= bound
    assert float(layer.weight.abs().max()) <= bound and float(layer.weight.std()) > 0.05
    first = layer.weight.clone()
    reset_module(layer, 0, "pytorch")
    torch.testing.assert_close(layer.weight, first)  # seeded


# ------------------------------------------------------------------------------ items 1, 2, 7, 17: stage 1 (SFT)


def test_sft_schedule_learning_rates_switch(tmp_path):
    from transformers import get_scheduler

    from emovlm_kd.training.sft import sft_arguments

    rates = {}
    for cfg in (PAPER, OFFICIAL):
        args = sft_arguments(dataclasses.replace(cfg, sft_lr=1e-3).sft_args, tmp_path, 0, torch.float32, False)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(100),
                                  num_training_steps=100)
        rates[cfg.protocol] = [scheduler.get_last_lr()[0]]
        for _ in range(5):
            optimizer.step()
            scheduler.step()
            rates[cfg.protocol].append(scheduler.get_last_lr()[0])
    assert rates["paper"][0] == 0.0 and rates["paper"][3] == pytest.approx(1e-3)  # 3 warmup steps of 100
    assert rates["official"] == [1e-3] * 6  # 'constant' ignores warmup_ratio (train_vlm.py:102-103)


def test_sft_tf32_switches_where_the_device_has_it(tmp_path, caplog):
    from transformers.utils import is_torch_tf32_available

    from emovlm_kd.training.sft import sft_arguments

    assert sft_arguments(PAPER.sft_args, tmp_path, 0, torch.float32, False).tf32 is None
    with caplog.at_level(logging.INFO, logger="emovlm_kd.training.sft"):
        official = sft_arguments(OFFICIAL.sft_args, tmp_path, 0, torch.float32, False)
    if is_torch_tf32_available():
        assert official.tf32 is True
    else:  # TrainingArguments refuses tf32 without an Ampere GPU: left off, said in the log
        assert official.tf32 is None and "no TF32" in caplog.text


def test_quantisation_scope_switches():
    pytest.importorskip("bitsandbytes")
    from emovlm_kd.training.sft import model_config, quantization_config

    paper, official = (dataclasses.replace(cfg, quantize="4bit").sft_args for cfg in (PAPER, OFFICIAL))
    paper = quantization_config(model_config(paper), paper.quantize_scope)
    official = quantization_config(model_config(official), official.quantize_scope)
    assert paper.llm_int8_skip_modules == ["model.visual", "lm_head"]
    assert official.llm_int8_skip_modules is None  # transformers' own list (the output embedding), train_vlm.py:69


def test_sft_loss_mask_switches(tiny_bundle):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from emovlm_kd.training.sft import sft_collator

    model, processor = tiny_bundle
    tokenizer = processor.tokenizer
    vlm = model.config.vlm_config
    image_ids = torch.tensor([vlm.vision_start_token_id, vlm.vision_end_token_id, vlm.image_token_id])
    for cfg in (PAPER, OFFICIAL):
        # paper: None, so SFTTrainer builds TRL's collator, with completion_only_loss for prompt/completion rows
        collator = sft_collator(cfg.sft_args.sft_loss, processor, vlm) or DataCollatorForVisionLanguageModeling(
            processor=processor, completion_only_loss=True)
        batch = collator(_sft_rows(cfg))
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
        learned = labels != -100
        assert not learned[~mask].any()  # padding never
        assert not learned[torch.isin(ids, image_ids)].any()  # image tokens never
        text = [tokenizer.decode(ids[row][learned[row]]) for row in range(len(ids))]
        if cfg.protocol == "paper":  # the answer (and its end-of-turn) only
            assert all("which emotion" not in t and "user" not in t for t in text)
            assert "{'emotion': 'awe'}" in text[0]
        else:  # train_vlm.py:118-128: every other token, system and user prompt included
            assert OFFICIAL_SYSTEM_MESSAGE in text[0] and "which emotion?" in text[0] and "'awe'" in text[0]
            keep = mask & ~torch.isin(ids, image_ids)
            assert torch.equal(learned, keep)


def _sft_rows(cfg):
    from scoring_emovlm_kd import chat_messages

    layout = _official_config(EmoVLMKDConfig()) if cfg.chat_format == "official" else None
    return [{"images": [random_image(56, 56, seed)], "prompt": chat_messages(question, layout),
             "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
            for seed, (question, answer) in enumerate([("which emotion?", "{'emotion': 'awe'}"),
                                                       ("describe it", "a calm lake at dusk, long")])]


# -------------------------------------------------------------------------------------------- item 14: the splits


def test_split_rule_switches_on_emoset(tmp_path):
    from dataset_fixtures import write_emoset

    from emovlm_kd.data import load_image_dataset
    from emovlm_kd.settings import dataset_options

    root = write_emoset(tmp_path / "EmoSet-118K", per_class=(10, 1, 2))
    paper = load_image_dataset(root, **dataset_options(PAPER))
    official = load_image_dataset(root, **dataset_options(OFFICIAL))
    assert "split_rule" not in dataset_options(PAPER)  # RUN/splits.json of a paper run records what it did before
    assert {k: v.num_rows for k, v in paper.items()} == {"train": 80, "val": 8, "test": 16}  # val.json kept
    # data_utils.py:109-123: val.json unused, val a stratified 10 % of train (one per class here), test kept
    assert {k: v.num_rows for k, v in official.items()} == {"train": 72, "val": 8, "test": 16}
    assert set(official["val"]["id"]) <= set(paper["train"]["id"]) and official["test"]["id"] == paper["test"]["id"]
    assert sorted(official["val"]["label"]) == list(range(8))  # stratified
    again = load_image_dataset(root, **dataset_options(dataclasses.replace(OFFICIAL, seed=7)))
    assert again["val"]["id"] == official["val"]["id"]  # random_state 42 whatever the run's seed


# ------------------------------------------------------------------------------------ table1 --protocol both


def test_table1_both_protocols_side_by_side(tiny_bundle_dir, tmp_path, capsys):
    import json

    import numpy as np

    from emovlm_kd.cli import main
    from emovlm_kd.data import make_synthetic_dataset
    from emovlm_kd.evaluation.stats import mcnemar

    data = make_synthetic_dataset(tmp_path / "FI", per_class=(1, 0, 2), image_size=40)
    out = tmp_path / "table1"
    # 4 images: the official protocol generates up to 256 tokens per image (train_gate.py:69)
    assert main(["table1", "--protocol", "both", "--model", str(tiny_bundle_dir), "--dataset", f"fi={data}",
                 "--limit", "4", "--batch-size", "4", "--device", "cpu", "--output-dir", str(out)]) == 0
    rows = json.loads((out / "table1_protocols.json").read_text())["datasets"]
    assert list(rows) == ["fi"] and rows["fi"]["paper_published"] == 79.51
    correct = {}
    for name in ("paper", "official"):
        report = json.loads((out / name / "fi" / "report.json").read_text())
        records = [json.loads(line) for line in (out / name / "fi" / "predictions.jsonl").read_text().splitlines()]
        assert report["protocol"] == name and report["vlm_mode"] == ("generate" if name == "official" else "score")
        assert rows["fi"][name]["accuracy"] == round(100 * report["accuracy"][report["final"]], 2)
        answers = [record.get("vlm_answer") for record in records]
        # official: a generated, sampled answer per image; paper: label scores, no text
        assert all(isinstance(a, str) for a in answers) if name == "official" else not any(answers)
        correct[name] = np.array([r["predictions"][report["final"]] == r["label"] for r in records])
    expected = mcnemar(correct["paper"], correct["official"]).as_dict()
    assert rows["fi"]["mcnemar"] == {**expected, "images": 4}
    markdown = (out / "table1_protocols.md").read_text()
    assert f"| FI | {rows['fi']['paper']['accuracy']:.2f} [" in markdown and "| 79.51 |" in markdown
    assert "Table 1 under both protocols" in capsys.readouterr().out


def test_ablate_protocol_retrains_head_and_gate_with_the_other_preset(tmp_path):
    import json

    from emovlm_kd.evaluation.ablation_data import load_settings

    (tmp_path / "train_config.json").write_text(json.dumps(dataclasses.replace(PAPER, gate_lr=0.5).to_dict()))
    run_cfg, cfg = load_settings(tmp_path, {"protocol": "official", "gate_epochs": 3.0})
    assert (run_cfg.gate_optimizer, run_cfg.gate_batch_size, run_cfg.gate_input) == ("adamw", 32, "probs")
    assert (cfg.gate_optimizer, cfg.gate_batch_size, cfg.gate_input, cfg.distill_init) == ("adam", 1, "logits",
                                                                                            "pytorch")
    assert (cfg.gate_lr, cfg.gate_epochs) == (0.5, 3.0)  # the run's own settings and the flags stay
    # a run from before the knobs existed (no knob in its train_config.json) reads as paper
    old = {k: v for k, v in PAPER.to_dict().items() if k not in protocol.KNOBS and k != "protocol"}
    (tmp_path / "train_config.json").write_text(json.dumps(old))
    assert load_settings(tmp_path, {})[0] == PAPER
