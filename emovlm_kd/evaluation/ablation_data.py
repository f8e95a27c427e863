"""A finished run as the ablations read it: its settings (RUN/train_config.json), its cached tensors (RUN/cache/),
its dataset's labels, its trained head and its results. Nothing here loads the VLM or the teacher; a run that cannot
be read raises `UsageError` naming `--run`.
"""

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from emovlm_kd import protocol as protocols
from emovlm_kd.errors import UsageError
from emovlm_kd.training import heads
from emovlm_kd.training.config import DEMO, TrainConfig
from emovlm_kd.training.gatedata import SAMPLES_CACHE, gate_split
from emovlm_kd.runtime import resolve_dtype, run_device
from emovlm_kd.training.runner import load_data
from modeling_emovlm_kd import EmoVLMKDDistillationHead

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class RunTensors:
    """A run's cached tensors per split (rows in the dataset's order) and the labels."""

    names: list
    features: dict  # split -> (N, H) pooled visual features (float32)
    vlm_log_likelihoods: dict  # split -> (N, C)
    teacher_logits: dict  # split -> (N, C)
    labels: dict  # split -> (N,) class ids
    gate_split: str  # the split the run's gate trained on
    gate_samples: torch.Tensor | None = None  # (N_train, K, C) sampled answers, where the run cached them

    @property
    def splits(self):
        return list(self.features)


def load_settings(run_dir, overrides):
    """(the run's TrainConfig, the same with the overrides); a missing or bad run is a `UsageError`."""
    path = Path(run_dir) / "train_config.json"
    if not path.exists():
        raise UsageError(f"--run {run_dir}: no train_config.json there; run `emovlm-kd train` first")
    values = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        logger.warning("%s: ignoring unknown setting(s) %s", path, ", ".join(unknown))
    try:
        run_cfg = TrainConfig(**{k: v for k, v in values.items() if k in known})
    except ValueError as error:
        raise UsageError(f"--run {run_dir}: bad train_config.json: {error}") from None
    try:
        overrides = dict(overrides)
        name = overrides.pop("protocol", None)
        cfg = protocols.with_protocol(run_cfg, name) if name else run_cfg  # the knobs the run left to its protocol
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as error:
        raise UsageError(str(error)) from None
    return run_cfg, cfg


def find_cache(run_dir, name, required=True):
    """The tensors of RUN/cache/<name>-<fingerprint>.safetensors (exactly one such file; None when absent and not
    `required`)."""
    folder = Path(run_dir) / "cache"
    paths = sorted(folder.glob(f"{name}-*.safetensors"))
    if len(paths) > 1:
        raise UsageError(f"--run {run_dir}: several {name} caches ({', '.join(p.name for p in paths)}); "
                         "rerun `emovlm-kd train` to keep only the current one")
    if not paths:
        if not required:
            return None
        raise UsageError(f"--run {run_dir}: no {name}-*.safetensors in {folder}; run `emovlm-kd train` first")
    return safetensors.torch.load_file(paths[0])


def load_run_tensors(run_dir, run_cfg):
    """The run's caches and its dataset's labels, loaded as the run loaded them (same data source and seed)."""
    source = Path(run_dir) / "data" / "synthetic" if run_cfg.dataset == DEMO else run_cfg.dataset
    try:
        dataset = load_data(run_cfg, source)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"--run {run_dir}: cannot load the run's dataset {str(source)!r} for its labels: {error}"
        ) from None
    names = list(dataset["train"].features["label"].names)
    features, log_likelihoods, teacher_logits, labels = {}, {}, {}, {}
    for split in (s for s in SPLITS if s in dataset):
        vlm_pass, teacher = find_cache(run_dir, f"vlm_pass-{split}"), find_cache(run_dir, f"teacher-{split}")
        labels[split] = torch.tensor(dataset[split]["label"])
        features[split] = vlm_pass["image_embeds"].float()
        log_likelihoods[split] = vlm_pass["vlm_log_likelihoods"]
        teacher_logits[split] = teacher["teacher_logits"]
        rows = {len(labels[split]), len(features[split]), len(log_likelihoods[split]), len(teacher_logits[split])}
        if len(rows) != 1:
            raise UsageError(f"--run {run_dir}: the {split} caches and the dataset {str(source)!r} differ in rows; "
                             "the data changed since the run: rerun `emovlm-kd train`")
        if log_likelihoods[split].shape[-1] != len(names) or teacher_logits[split].shape[-1] != len(names):
            raise UsageError(f"--run {run_dir}: the {split} caches do not have the dataset's {len(names)} classes")
    samples = find_cache(run_dir, SAMPLES_CACHE, required=False)
    samples = samples["vlm_samples"].float() if samples is not None else None
    if samples is not None and (len(samples) != len(labels["train"]) or samples.shape[-1] != len(names)):
        raise UsageError(f"--run {run_dir}: the sampled answers do not fit the train split; rerun `emovlm-kd train`")
    return RunTensors(names, features, log_likelihoods, teacher_logits, labels,
                      gate_split(run_cfg.gate_data, labels), samples)


def load_run_head(run_dir, run_cfg, data):
    """The run's trained head (RUN/stage3_distill/head.safetensors) and its logits per split."""
    head_file = Path(run_dir) / "stage3_distill" / "head.safetensors"
    if not (head_file.exists() and (head_file.parent / "DONE.json").exists()):
        raise UsageError(f"--run {run_dir}: no trained head ({head_file}); run `emovlm-kd train` first")
    head = EmoVLMKDDistillationHead(data.features["train"].shape[-1], run_cfg.head_hidden_sizes, len(data.names),
                                    run_cfg.head_dropout)
    try:
        head.load_state_dict(safetensors.torch.load_file(head_file))
    except RuntimeError as error:
        raise UsageError(f"--run {run_dir}: {head_file} does not fit the run's head settings: {error}") from None
    head.requires_grad_(False).to(run_device(), resolve_dtype(run_cfg.dtype))  # as the run evaluated it
    return head_file, {s: heads.head_outputs(head, data.features[s]) for s in data.splits}


def run_results(run_dir):
    path = Path(run_dir) / "eval_results.json"
    return json.loads(path.read_text(encoding="utf-8"))["accuracy"] if path.exists() else None


def gate_num_experts(run_dir):
    """The experts of the `moe` gate, as the run's model config has it (the config default otherwise)."""
    path = Path(run_dir) / "model" / "config.json"
    return int(json.loads(path.read_text(encoding="utf-8")).get("gate_num_experts", 3)) if path.exists() else 3
