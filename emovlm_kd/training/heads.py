"""Stages 3 and 4: the distillation head and the gate, trained on cached tensors (milliseconds an epoch); the same
`train_head` / `train_gate` serve the ablations. Also the small helpers that apply them to cached tensors."""

import copy
import dataclasses
import logging
from functools import partial

import torch
from safetensors.torch import load_file, save_file

from emovlm_kd.training.cache import fingerprint
from emovlm_kd.training.stage import adam, last_checkpoint, run_stage, run_trainer, trained

logger = logging.getLogger(__name__)


def run_stage3(settings, run_dir, bundle, features, teacher_logits, labels, *, seed):
    """Distil the teacher into the head (only the head trains) on cached features and teacher logits, by the
    stage's `DistillArguments` (`settings`)."""
    key = fingerprint(settings.stage, dataclasses.asdict(settings),
                      [fingerprint_tensor(features), fingerprint_tensor(teacher_logits)], seed)
    return run_module_stage(run_dir, "stage3_distill", key, "head.safetensors", bundle.distill_head,
                            "[stage 3] distillation: done, skipped",
                            lambda folder: train_head(settings, bundle.distill_head, features, teacher_logits, labels,
                                                      folder, seed=seed, resume=True))


def run_stage4(settings, run_dir, bundle, vlm_scores, head_probs, labels, *, seed):
    """Train the gate (only the gate) on cached VLM vectors (or sampled answers, see `train_gate`) and head
    probabilities, by the stage's `GateArguments` (`settings`)."""
    key = fingerprint(settings.stage, dataclasses.asdict(settings),
                      [fingerprint_tensor(vlm_scores), fingerprint_tensor(head_probs)], seed)
    return run_module_stage(run_dir, "stage4_gate", key, "gate.safetensors", bundle.gate,
                            "[stage 4] gate: done, skipped",
                            lambda folder: train_gate(settings, bundle.gate, vlm_scores, head_probs, labels, folder,
                                                      seed=seed, resume=True))


def run_module_stage(run_dir, name, key, file_name, module, skipped, train):
    """Stages 3 and 4 (`run_stage`): `train(checkpoint folder)` trains `module`, whose weights are saved as
    RUN/name/file_name; when the stage is done, they are loaded back into `module` and `skipped` is logged."""

    def work(stage):
        result = train(stage.checkpoints())
        return partial(write_module, module), trained(result)

    return run_stage(run_dir, name, key, file_name, work, skipped=skipped, log=logger,
                     restore=lambda path: module.load_state_dict(load_file(path)))


def train_head(settings, head, features, teacher_logits, labels, output_dir, *, seed, resume=False, **args_extra):
    """Re-initialise `head` from `seed` and distil into it (DistillationTrainer; the `DistillTrainingArguments` of
    `settings`, a `DistillArguments`: alpha, tau, epochs, lr...).

    No stage bookkeeping: stage 3 and the ablations share it. `resume` continues from the last checkpoint in
    `output_dir`; `args_extra` overrides TrainingArguments (the ablations save nothing and log nothing).
    """
    from emovlm_kd.training.arguments import training_arguments
    from emovlm_kd.training.trainers import DistillationTrainer, TensorDictDataset

    reset_module(head, seed, settings.distill_init)
    data = TensorDictDataset(image_embeds=features, teacher_logits=teacher_logits, labels=labels)
    args = training_arguments(settings, output_dir, seed, **args_extra)
    trainer = DistillationTrainer(model=head, args=args, train_dataset=data,
                                  optimizer_cls_and_kwargs=adam(settings.distill_optimizer, head, settings.distill_lr))
    return _train(trainer, resume)


def train_gate(settings, gate, vlm_scores, head_probs, labels, output_dir, *, seed, resume=False, **args_extra):
    """Re-initialise `gate` from `seed` and train it with cross-entropy (GateTrainer; the `GateTrainingArguments`
    of `settings`, a `GateArguments`: epochs, lr...).

    `vlm_scores`: (N, C) vectors, or (N, K, C) sampled answers of which epoch e trains on answer e % K.
    """
    from emovlm_kd.training.gatedata import CycledSamples
    from emovlm_kd.training.arguments import training_arguments
    from emovlm_kd.training.trainers import GateModule, GateTrainer, TensorDictDataset

    reset_module(gate, seed, settings.gate_init)
    if vlm_scores.dim() == 3:
        data = CycledSamples(vlm_scores, head_probs, labels)
        callbacks = [data.callback()]
    else:
        data, callbacks = TensorDictDataset(vlm_scores=vlm_scores, head_probs=head_probs, labels=labels), []
    args = training_arguments(settings, output_dir, seed, **args_extra)
    trainer = GateTrainer(model=GateModule(gate), args=args, train_dataset=data, callbacks=callbacks,
                          optimizer_cls_and_kwargs=adam(settings.gate_optimizer, gate, settings.gate_lr))
    return _train(trainer, resume)


def gate_head_input(head_logits, gate_input):
    """What the gate reads of the head: its probabilities (`probs`, the paper's text) or its logits (`logits`)."""
    return head_logits if gate_input == "logits" else head_logits.softmax(-1)


def _train(trainer, resume):
    return run_trainer(trainer, last_checkpoint(trainer.args.output_dir) if resume else None)


def vlm_vectors(log_likelihoods, mode):
    """What the gate sees from the VLM branch: the label distribution, or its argmax one-hot (paper)."""
    probs = log_likelihoods.float().softmax(-1)
    if mode == "onehot":
        return torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).float()
    return probs


@torch.inference_mode()
def head_outputs(head, features, batch_size=1024):
    """Head logits (float32, on the CPU) for cached features, in the head's dtype and on its device."""
    head.eval()
    param = next(head.parameters())
    return torch.cat([head(features[i : i + batch_size].to(param.device, param.dtype)).float().cpu()
                      for i in range(0, len(features), batch_size)])


@torch.inference_mode()
def gate_outputs(gate, vlm_scores, head_probs):
    """Gate logits (float32, on the CPU) for cached VLM vectors and head probabilities."""
    gate.eval()
    param = next(gate.parameters())
    return gate(vlm_scores.to(param.device, param.dtype), head_probs.to(param.device, param.dtype)).float().cpu()


def reset_module(module, seed, init="normal"):
    """Re-initialise a small module deterministically (so a rerun trains from the same start): weights drawn from the
    CPU generator seeded with `seed` and copied to the module's device, so the start is the same on a CPU and a GPU
    (a CUDA tensor's own `normal_` would draw from the CUDA generator). `normal`: N(0, 0.02), zero bias; `pytorch`:
    each layer's own `reset_parameters` (nn.Linear's Kaiming-uniform weight and uniform bias, as the official code,
    which never re-initialises), drawn on a CPU copy."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Bilinear)):
                if init == "pytorch":
                    fresh = copy.deepcopy(layer).cpu()  # its draws from the seeded CPU generator
                    fresh.reset_parameters()
                    layer.weight.copy_(fresh.weight)
                    layer.bias.copy_(fresh.bias)
                else:
                    layer.weight.copy_(torch.empty(layer.weight.shape).normal_(0.0, 0.02))
                    layer.bias.zero_()


def write_module(module, path):
    """The module's weights as safetensors at `path` (the stage's temp file)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def fingerprint_tensor(tensor):
    import hashlib

    return hashlib.sha256(tensor.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
