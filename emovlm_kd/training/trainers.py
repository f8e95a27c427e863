"""`Trainer` subclasses of the distillation and gate stages, and their loss functions.

Both stages train a small module on tensors cached once (visual features, teacher logits, VLM vectors), so an
epoch costs milliseconds; the Trainer brings the optimiser, schedules, checkpoints, resume and DDP.
"""

import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer


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


class DistillationTrainer(Trainer):
    """Trains the distillation head on cached pooled visual features against cached teacher logits."""

    def __init__(self, *args, alpha=0.5, tau=2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha, self.tau = alpha, tau

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["image_embeds"])
        loss = distillation_loss(logits, inputs["teacher_logits"], inputs["labels"], self.alpha, self.tau)
        return (loss, {"logits": logits}) if return_outputs else loss


class GateModule(nn.Module):
    """The gate applied to (VLM vector, head probabilities), as the Trainer's model."""

    _keys_to_ignore_on_save = None

    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def forward(self, vlm_scores, head_probs):
        return self.gate(vlm_scores, head_probs)


class GateTrainer(Trainer):
    """Trains the gate with cross-entropy on cached VLM vectors and head probabilities."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["vlm_scores"], inputs["head_probs"])
        loss = F.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss
