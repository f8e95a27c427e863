"""`Trainer` subclasses of the distillation and gate stages, their loss functions, and the verified resume every
stage's Trainer uses.

Both stages train a small module on tensors cached once (visual features, teacher logits, VLM vectors), so an
epoch costs milliseconds; the Trainer brings the optimiser, schedules, checkpoints, resume and DDP.

Resume: the Trainer's own `_load_from_checkpoint` reads `model.safetensors` as it is into `model.load_state_dict(...,
strict=False)` and only logs missing keys. transformers' `save_pretrained` writes a model's weights under its
checkpoint (legacy) key names, reverting the renaming `from_pretrained` applies (`revert_weight_conversion`; e.g. a
ViT's `vit.layers.*` are saved as `vit.encoder.layer.*`), so such a checkpoint resumed that way restores only the
keys no renaming touches. `VerifiedResume` restores through the loader that applies the renaming, and stops with
`CheckpointError` unless every key of the model was restored.
"""

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset
from transformers import PreTrainedModel, Trainer
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_NAME

logger = logging.getLogger(__name__)


def distillation_loss(student_logits, teacher_logits, labels, alpha=0.5, tau=2.0):
    """alpha * tau^2 * KL(p_teacher^tau || p_student^tau) + (1 - alpha) * CE(labels, p_student).

    KL is averaged over the batch (`batchmean`); tau softens both distributions (Hinton et al.).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    student_logits = student_logits.float()
    kl = F.kl_div(
        F.log_softmax(student_logits / tau, dim=-1),
        F.log_softmax(teacher_logits.float() / tau, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    ce = F.cross_entropy(student_logits, labels)
    return alpha * tau**2 * kl + (1.0 - alpha) * ce


class TensorDictDataset(Dataset):
    """Rows of equally long tensors, as dicts (what the cached stages train on)."""

    def __init__(self, **tensors):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors of different lengths: { {k: len(v) for k, v in tensors.items()} }")
        self.tensors = tensors

    def __len__(self):
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index):
        return {k: v[index] for k, v in self.tensors.items()}


class CheckpointError(RuntimeError):
    """A Trainer checkpoint whose weights do not restore the model exactly."""


def key_problems(expected, found):
    """What keeps the tensors `found` from restoring the state `expected` (both {name: tensor}): keys missing,
    unexpected or of another shape, a few named each; "" when none."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    shapes = {k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k].shape)}
    return _listing({"missing": missing, "unexpected": unexpected, "of another shape": shapes})


def _listing(groups):
    """The text '2 missing (a, b); 1 unexpected (c)' for {what: names}, empty groups left out."""
    def named(names):
        names = sorted(map(str, names))
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    return "; ".join(f"{len(names)} {what} ({named(names)})" for what, names in groups.items() if names)


def restore_checkpoint_weights(model, checkpoint):
    """Load the weights of Trainer checkpoint `checkpoint` into `model` with every key, or raise `CheckpointError`.

    A PEFT model gets its active adapter's weights (`adapter_model.safetensors`: the same keys as the adapter's,
    equal to the file's once loaded); a `PreTrainedModel` is loaded by `from_pretrained`, which maps the saved key
    names to the model's, and copied in (nothing missing, unexpected or mismatched on either step); any other module
    (the head, the gate) loads `model.safetensors` strictly.
    """
    checkpoint = Path(checkpoint)
    if is_peft_model(model):
        problems = _restore_adapter(model, checkpoint)
    elif isinstance(model, PreTrainedModel):
        problems = _restore_pretrained(model, checkpoint)
    else:
        problems = _restore_module(model, checkpoint)
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint} does not restore the {type(model).__name__}: {problems}")
    logger.info("restored every weight from %s", checkpoint)


def is_peft_model(model):
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _restore_module(model, checkpoint):
    state = load_file(checkpoint / SAFE_WEIGHTS_NAME)
    problems = key_problems(model.state_dict(), state)
    if not problems:
        model.load_state_dict(state, strict=True)
    return problems


def _restore_pretrained(model, checkpoint):
    with torch.random.fork_rng(devices=[]):  # weights it would initialise must not move the run's generator
        loaded, info = type(model).from_pretrained(checkpoint, config=model.config, dtype=model.dtype,
                                                   use_safetensors=True, output_loading_info=True)
    problems = _listing({k.replace("_", " "): info.get(k) for k in
                         ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")})
    problems = problems or key_problems(model.state_dict(), loaded.state_dict())
    if not problems:
        model.load_state_dict(loaded.state_dict(), strict=True)
    return problems


def _restore_adapter(model, checkpoint):
    from peft import get_peft_model_state_dict

    adapter = model.active_adapter
    saved = load_file(checkpoint / ADAPTER_SAFE_WEIGHTS_NAME)
    problems = key_problems(get_peft_model_state_dict(model, adapter_name=adapter), saved)
    if problems:
        return problems
    model.load_adapter(str(checkpoint), adapter, is_trainable=True)
    restored = get_peft_model_state_dict(model, adapter_name=adapter)
    return _listing({"adapter tensors differing from the file after loading":
                     [k for k, v in saved.items() if not torch.equal(restored[k].cpu().to(v.dtype), v)]})


class VerifiedResume:
    """Trainer mixin: resuming from a checkpoint restores its weights with every key (`restore_checkpoint_weights`)
    or stops with `CheckpointError`, where the Trainer's own loader logs missing keys and trains on."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        restore_checkpoint_weights(self.model if model is None else model, resume_from_checkpoint)


class VerifiedTrainer(VerifiedResume, Trainer):
    """The HF `Trainer` with a verified resume."""


def with_verified_resume(trainer_class):
    """`trainer_class` (e.g. TRL's SFTTrainer) with a verified resume."""
    return type(f"Verified{trainer_class.__name__}", (VerifiedResume, trainer_class), {})


class DistillationTrainer(VerifiedTrainer):
    """Trains the distillation head on cached pooled visual features against cached teacher logits, with the
    `alpha` and `tau` of its `arguments.DistillTrainingArguments`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["image_embeds"])
        loss = distillation_loss(logits, inputs["teacher_logits"], inputs["labels"], self.args.alpha, self.args.tau)
        return (loss, {"logits": logits}) if return_outputs else loss


class GateModule(nn.Module):
    """The gate applied to (VLM vector, head probabilities), as the Trainer's model."""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def forward(self, vlm_scores, head_probs):
        return self.gate(vlm_scores, head_probs)


class GateTrainer(VerifiedTrainer):
    """Trains the gate with cross-entropy on cached VLM vectors and head probabilities."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["vlm_scores"], inputs["head_probs"])
        loss = F.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss
