"""What the gate (stage 4) trains on, three ways (`--gate-data`), every one from cached tensors:

- `sampled`, the paper's protocol: the VLM's answer to each train image sampled at temperature 0.8 (the official
  train_gate.py regenerates one answer per image in every epoch, 10 epochs). Here K answers per image
  (`--gate-samples`) are generated once, in batched passes, and cached; gate epoch e trains on answer e % K.
- `val`: the VLM's deterministic vectors on the held-out val images.
- `train`: the VLM's deterministic vectors on the train images, which the VLM was tuned on.

The VLM is nearly always right on its own train images, so a gate trained on `train` learns to follow it; sampling
(or held-out images) shows the gate the VLM's mistakes. `emovlm-kd ablate gate-data --run RUN` compares the three
on a run's caches.

Sampling is greedy decoding over Gumbel-perturbed scores (the Gumbel-max trick: argmax(logits / T + Gumbel noise)
is a draw from softmax(logits / T)), each row's noise drawn from its own seed (run seed, image, sample, step). The
answers are then the same whatever the batch size or number of processes, and no top-k / top-p of the checkpoint's
generation config applies: pure temperature sampling, top_p 1.0 as in the official code.
"""

import logging
import math

import torch
from torch.utils.data import Dataset
from transformers import LogitsProcessor, LogitsProcessorList

from emovlm_kd import protocol as protocols
from emovlm_kd.images import prepare_image
from emovlm_kd.training.cache import (
    fingerprint,
    fingerprint_dataset,
    fingerprint_module,
)
from emovlm_kd.training.passes import cached_map

logger = logging.getLogger(__name__)

SAMPLES_CACHE = "gate_samples-train"
GATE_DATA = ("sampled", "val", "train")


def row_seed(seed, index, sample):
    """The seed of answer `sample` to image `index` of the train split."""
    return (seed * 1_000_003 + index) * 1_009 + sample


class SeededSampling(LogitsProcessor):
    """Temperature sampling as greedy decoding: returns scores / T + Gumbel noise, each row's noise from its seed."""

    def __init__(self, seeds, temperature):
        self.seeds, self.temperature, self.start = list(seeds), float(temperature), None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]  # the padded prompt's length differs from batch to batch
        step = input_ids.shape[1] - self.start
        uniform = torch.stack([
            torch.rand(scores.shape[-1], device=scores.device,
                       generator=torch.Generator(scores.device).manual_seed((seed * 10_007 + step) % 2**63))
            for seed in self.seeds
        ])
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        return scores.float() / self.temperature + gumbel


@torch.inference_mode()
def sample_answers(model, processor, images, seeds, temperature):
    """One sampled answer per (image, seed) row, in one batched `generate_labels` call: one-hot vectors (B, C)
    (zeros where the answer names no label) and whether it named one (B,)."""
    from pipeline_emovlm_kd import prepare_inputs

    inputs = prepare_inputs(processor, model.config, images).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    sampler = LogitsProcessorList([SeededSampling(seeds, temperature)])
    output = model.generate_labels(**inputs, tokenizer=processor.tokenizer,
                                   generation_kwargs={"do_sample": False, "logits_processor": sampler})
    return output.vlm_scores.float().cpu(), output.vlm_answer_found.cpu()


def add_sampled_answers(gate, cache, passes, bundle, processor, dataset, *, seed, batch_size):
    """The answers stage 4's `GateArguments` (`gate`) asks to sample from the VLM, added to `passes`: K per train
    image for the gate's training data (`gate_data: sampled`), and one per val/test image for the official
    evaluation (`answer_protocol: official`)."""
    if gate.gate_data == "sampled":
        passes["train"].update(sampled_answer_cache(cache, bundle, processor, dataset["train"], seed=seed,
                                                    batch_size=batch_size, samples=gate.gate_samples,
                                                    temperature=gate.gate_temperature))
    if gate.answer_protocol == "official":
        for split in (s for s in ("val", "test") if s in dataset):
            answers = sampled_answer_cache(cache, bundle, processor, dataset[split], seed=seed, batch_size=batch_size,
                                           split_name=split, samples=1, temperature=gate.gate_temperature)
            passes[split].update(vlm_answer=answers["vlm_samples"][:, 0],
                                 vlm_answer_found=answers["answer_found"][:, 0])


def sampled_answer_cache(cache, model, processor, split, *, seed, batch_size, samples, temperature,
                         split_name="train"):
    """`{"vlm_samples": (N, K, C), "answer_found": (N, K)}`: K = `samples` answers per image at `temperature`,
    computed once (each batch of images repeated K times, about `batch_size` rows a call) and cached."""
    max_side = model.config.max_image_side  # images as the VLM pass sees them
    key = fingerprint("gate_samples", fingerprint_module(model.vlm), fingerprint_dataset(split),
                      model.config.classification_prompt(), model.config.vlm_max_new_tokens, max_side,
                      processor.image_processor.size["longest_edge"], samples, temperature, seed,
                      *protocols.config_changes(model.config), *(() if split_name == "train" else (split_name,)))

    def compute_batch(indices):
        images = [prepare_image(split[i]["image"], max_side=max_side) for i in indices]
        rows = [image for image in images for _ in range(samples)]  # image-major: row i * K + k
        seeds = [row_seed(seed, i, k) for i in indices for k in range(samples)]
        vectors, found = sample_answers(model, processor, rows, seeds, temperature)
        return {"vlm_samples": vectors.view(len(indices), samples, -1), "answer_found": found.view(len(indices), -1)}

    images_per_call = max(1, math.ceil(batch_size / samples))  # about --batch-size rows per generate call
    name = SAMPLES_CACHE if split_name == "train" else f"answers-{split_name}"
    tensors = cached_map(cache, name, key, len(split), images_per_call, compute_batch,
                         desc=f"sampled answers (x{samples})")
    logger.info("%d answers per %s image sampled at T=%g; %.1f %% name a label", samples, split_name,
                temperature, 100 * float(tensors["answer_found"].float().mean()))
    return tensors


class CycledSamples(Dataset):
    """Rows {vlm_scores, head_probs, labels} where vlm_scores is sample `epoch % K` of each image's K answers;
    `callback()` keeps `epoch` at the Trainer's (a resumed run continues with the epoch it stopped in)."""

    def __init__(self, vlm_samples, head_probs, labels):
        if not len(vlm_samples) == len(head_probs) == len(labels):
            raise ValueError(f"rows differ: {len(vlm_samples)} samples, {len(head_probs)} head, {len(labels)} labels")
        self.vlm_samples, self.head_probs, self.labels, self.epoch = vlm_samples, head_probs, labels, 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        sample = self.epoch % self.vlm_samples.shape[1]
        return {"vlm_scores": self.vlm_samples[index, sample], "head_probs": self.head_probs[index],
                "labels": self.labels[index]}

    def callback(self):
        from transformers import TrainerCallback

        rows = self

        class EpochCallback(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kwargs):
                rows.epoch = int((state.epoch or 0) + 1e-6)

        return EpochCallback()


def gate_split(gate_data, splits):
    """The split whose images the gate trains on: val for `val` (train where a dataset has none), else train."""
    return "val" if gate_data == "val" and "val" in splits else "train"


def gate_training_set(gate_data, vlm_vectors, head_probs, labels, samples=None, val_rows=None):
    """(vlm_scores, head_probs, labels) the gate trains on, from per-split dicts of the VLM vectors, the head's
    probabilities and the labels; `samples` (N, K, C): the sampled answers on train (`gate_data` sampled);
    `val_rows`: the rows of val the gate trains on when it trains on val (the others calibrate it, see
    `calibration.calibration_rows`; None: all of val)."""
    if gate_data == "sampled":
        if samples is None:
            raise ValueError("--gate-data sampled: no sampled answers")
        return samples, head_probs["train"], labels["train"]
    split = gate_split(gate_data, labels)
    if split == "val" and val_rows is not None:
        rows = torch.as_tensor(val_rows, dtype=torch.long)
        return vlm_vectors[split][rows], head_probs[split][rows], labels[split][rows]
    return vlm_vectors[split], head_probs[split], labels[split]


def gate_data_summary(gate_data, passes, val_rows=None, *, samples=None, temperature=None):
    """What the gate trained on (`gate_data`, `val_rows`: as `gate_training_set`; `samples` and `temperature`: stage
    4's `--gate-samples` and `--gate-temperature`), for RUN/eval_results.json and the model card."""
    split = "train" if gate_data == "sampled" else gate_split(gate_data, passes)
    held_out = split == "val" and val_rows is not None
    summary = {"protocol": gate_data, "split": split,
               "images": len(val_rows) if held_out else len(passes[split]["labels"])}
    if held_out:
        summary["held_out_for_calibration"] = len(passes["val"]["labels"]) - len(val_rows)
    if gate_data == "sampled":
        summary.update(samples_per_image=samples, temperature=temperature,
                       answers_naming_a_label=round(float(passes["train"]["answer_found"].float().mean()), 4))
    return summary
