"""A stage knob is one dataclass field and nothing else: every field of every stage's group (`STAGE_GROUPS`) is a
flag and a YAML key, enters its stage's key (as the stage function computes it) and reaches the stage's training
arguments (`arguments.training_arguments`). Nothing here names a field: a field added to a group is checked
by the same loops."""

import dataclasses
import types
import typing
from types import SimpleNamespace

import pytest
import torch
import yaml

from emovlm_kd.training import heads, instructions, sft, teacher
from emovlm_kd.training.config import STAGE_GROUPS, DistillArguments, InstructionArguments, parse_train_args


def another_values(spec, current, folder):
    """Values of the field `spec` other than `current`, derived from its type alone (a `str` field gets the path of
    an existing file: stage 0 reads the file its `--instructions` names)."""
    hint, found = spec.type, []
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option)
        if origin is typing.Literal:
            found += [choice for choice in typing.get_args(option) if choice != current]
        elif origin is list:
            found.append(current[:-1] if len(current) > 1 else current * 2)
        elif option is bool:
            found.append(not current)
        elif option is int:
            found.append(current + 1)
        elif option is float:
            found.append(current / 2 if current else 1.0)  # a default of 0.0 halves to itself
        elif option is str:
            path = folder / f"{spec.name}.txt"
            path.write_text(f"a file for --{spec.name}\n", encoding="utf-8")
            found.append(str(path))
    assert found, f"{spec.name}: no other value derived from {hint}"
    return found


def variants(group, folder):
    """(field name, value, the default group with that field changed) for every field of `group`: the first other
    value that the group's checks accept and that changes the group (an old name such as `gate_train_split` is
    folded into the field it names)."""
    default = group()
    for spec in dataclasses.fields(group):
        for value in another_values(spec, getattr(default, spec.name), folder):
            try:
                changed = dataclasses.replace(default, **{spec.name: value})
            except ValueError:  # refused by a check that ties it to another field (gate_data sampled: onehot)
                continue
            if changed != default:
                yield spec.name, value, changed
                break
        else:
            pytest.fail(f"{group.__name__}.{spec.name}: no other value is accepted")


def words(value):
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


@pytest.mark.parametrize("group", STAGE_GROUPS, ids=lambda group: group.__name__)
def test_every_stage_field_is_a_flag_and_a_yaml_key(group, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("seed: 42\n")  # a config of the user's: the fields' defaults apply
    for name, value, expected in variants(group, tmp_path):
        flag = parse_train_args(["--config", str(base), f"--{name.replace('_', '-')}", *words(value)])
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"seed": 42, name: value}))
        from_yaml = parse_train_args(["--config", str(config)])
        assert group.of(flag) == expected, name
        assert group.of(from_yaml) == expected, name


def stage_dataset():
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"id": Value("string"), "label": ClassLabel(names=["amusement", "anger", "awe"])})
    return DatasetDict(train=Dataset.from_dict({"id": ["a.png", "b.png", "c.png"], "label": [0, 1, 2]},
                                               features=features))


def stage_key(group, settings, tmp_path, monkeypatch):
    """The key the stage function of `group` computes for `settings` (its `run_stage` replaced by a recorder)."""
    from configuration_emovlm_kd import EmoVLMKDConfig

    seen = []
    for module in (instructions, sft, teacher, heads):
        monkeypatch.setattr(module, "run_stage", lambda run_dir, name, key, *args, **kwargs: seen.append(key))
    dataset, run = stage_dataset(), tmp_path / "run"
    rows = tmp_path / "instructions.jsonl"
    rows.write_text('{"id": "a.png", "kind": "categorical", "question": "q", "answer": "a"}\n')
    names = dataset["train"].features["label"].names
    tensors = torch.arange(12, dtype=torch.float32).view(3, 4), torch.ones(3, 3), torch.tensor([0, 1, 2])
    calls = {
        "stage0": lambda: instructions.run_stage0(
            settings, run, dataset, EmoVLMKDConfig(id2label=dict(enumerate(names)),
                                                   label2id={n: i for i, n in enumerate(names)})),
        "stage1": lambda: sft.run_stage1(settings, run, dataset, "a-vlm", rows, seed=0, dtype="auto",
                                         max_image_side=448),
        "stage2": lambda: teacher.run_stage2(settings, run, dataset, "a-teacher", seed=0),
        "stage3": lambda: heads.run_stage3(settings, run, SimpleNamespace(distill_head=None), *tensors, seed=0),
        "stage4": lambda: heads.run_stage4(settings, run, SimpleNamespace(gate=None), *tensors, seed=0),
    }
    calls[group.stage]()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("group", STAGE_GROUPS, ids=lambda group: group.__name__)
def test_every_stage_field_enters_its_stage_key(group, tmp_path, monkeypatch):
    default = stage_key(group, group(), tmp_path, monkeypatch)
    assert stage_key(group, group(), tmp_path, monkeypatch) == default  # a key, not a fresh value each call
    keys = {name: stage_key(group, changed, tmp_path, monkeypatch) for name, _, changed in variants(group, tmp_path)}
    assert keys and all(key != default for key in keys.values()), keys


@pytest.mark.parametrize("group", [g for g in STAGE_GROUPS if g is not InstructionArguments],
                         ids=lambda group: group.__name__)
def test_every_stage_field_reaches_the_stages_training_arguments(group, tmp_path):
    from transformers import TrainingArguments

    from emovlm_kd.training.arguments import training_arguments

    for name, value, changed in variants(group, tmp_path):
        args = training_arguments(changed, tmp_path / "checkpoints", seed=3)
        assert isinstance(args, TrainingArguments) and isinstance(args, group)
        assert {f.name: getattr(args, f.name) for f in dataclasses.fields(group)} == dataclasses.asdict(changed)
        assert all(getattr(args, to) == getattr(changed, field) for field, to in group.renames.items()), name
        assert (args.seed, args.output_dir) == (3, str(tmp_path / "checkpoints"))


def test_the_distillation_trainer_reads_alpha_and_tau_from_its_arguments(tmp_path):
    """What reaches the arguments is what the Trainer uses: the loss of `DistillationTrainer` is
    `distillation_loss` at the `alpha` and `tau` of its `DistillTrainingArguments`."""
    from emovlm_kd.training.arguments import training_arguments
    from emovlm_kd.training.trainers import DistillationTrainer, distillation_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    inputs = {"image_embeds": torch.randn(5, 4), "teacher_logits": torch.randn(5, 3),
              "labels": torch.tensor([0, 1, 2, 0, 1])}
    losses = []
    for alpha, tau in ((0.2, 1.0), (0.9, 4.0)):
        args = training_arguments(DistillArguments(alpha=alpha, tau=tau), tmp_path / f"{alpha}", seed=0)
        loss = DistillationTrainer(model=head, args=args).compute_loss(head, inputs)
        with torch.no_grad():
            expected = distillation_loss(head(inputs["image_embeds"]), inputs["teacher_logits"], inputs["labels"],
                                         alpha, tau)
        torch.testing.assert_close(loss.detach(), expected)
        losses.append(float(loss.detach()))
    assert losses[0] != losses[1]
