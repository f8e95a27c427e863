"""Each training stage's arguments: `TrainingArguments` (stage 1: TRL's `SFTConfig`) subclassed with the stage's
group of settings as fields, as TRL's `GKDConfig` subclasses `TrainingArguments` with its own knobs, so a stage's
Trainer reads them from `self.args` (`self.args.alpha`); built in one place, `training_arguments`:

    args = training_arguments(cfg.distill_args, "RUN/stage3_distill/checkpoints-KEY", seed=42)
    args.alpha, args.learning_rate        # the group's `alpha`, and its `distill_lr` under the Trainer's name
"""

import dataclasses
from dataclasses import dataclass

from transformers import TrainingArguments
from trl import SFTConfig

from emovlm_kd.training.config import DistillArguments, GateArguments, SFTArguments, TeacherArguments
from emovlm_kd.training.stage import base_training_arguments


@dataclass
class SFTStageConfig(SFTConfig, SFTArguments):
    """Stage 1's `SFTConfig`, with every `SFTArguments` field."""


@dataclass
class TeacherTrainingArguments(TrainingArguments, TeacherArguments):
    """Stage 2's `TrainingArguments`, with every `TeacherArguments` field."""


@dataclass
class DistillTrainingArguments(TrainingArguments, DistillArguments):
    """Stage 3's `TrainingArguments`, with every `DistillArguments` field (`alpha`, `tau`...)."""


@dataclass
class GateTrainingArguments(TrainingArguments, GateArguments):
    """Stage 4's `TrainingArguments`, with every `GateArguments` field."""


TRAINING_CLASSES = {SFTArguments: SFTStageConfig, TeacherArguments: TeacherTrainingArguments,
                    DistillArguments: DistillTrainingArguments, GateArguments: GateTrainingArguments}


def training_arguments(settings, output_dir, seed, **values):
    """The training arguments of the stage whose group `settings` is (`TRAINING_CLASSES`): what every stage shares
    (`stage.base_training_arguments`: `output_dir`, `seed`...), the stage's fixed values (its class's `recipe`),
    every field of the group under its own name and, where the group's `renames` gives one, under its
    TrainingArguments name, then `values` (values derived at run time, or overrides such as the ablations'
    save-nothing)."""
    group = type(settings)
    knobs = dataclasses.asdict(settings)
    renamed = {to: knobs[name] for name, to in group.renames.items()}
    return TRAINING_CLASSES[group](
        **{**base_training_arguments(output_dir, seed), **group.recipe(knobs), **knobs, **renamed, **values})
