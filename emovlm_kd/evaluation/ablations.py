"""The paper's ablations, retrained on a finished run's caches in seconds: Table 3 (head depth), Figure 3 (alpha)
and Table 4 (gate type).

    from emovlm_kd.evaluation.ablations import run_ablation
    table, markdown, output_dir = run_ablation("alpha", "runs/fi", [0.0, 0.5, 1.0], overrides={"seed": 1})

`emovlm-kd train` keeps one VLM pass (pooled visual features, label log-likelihoods) and one teacher pass (logits)
per image under RUN/cache/. The head (stage 3) and the gate (stage 4) train on those tensors only, so each setting
here retrains them with the training stages' own code (`emovlm_kd.training.heads.train_head` / `train_gate`) and
the run's settings (RUN/train_config.json; overrides replace them), and never loads the VLM or the teacher. The row
with the run's own settings reproduces RUN/eval_results.json, and a rerun gives the same numbers. Labels come from
the run's dataset (the caches hold none). A run that cannot be ablated raises `UsageError` naming `--run`.
"""

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from emovlm_kd.errors import UsageError
from emovlm_kd.evaluation.ablation_tables import render_table
from emovlm_kd.evaluation.paper import FIGURE3, TABLE3, TABLE4_FI
from emovlm_kd.evaluation.report import write_json, write_text
from emovlm_kd.training import heads
from emovlm_kd.training.config import DEMO, TrainConfig
from emovlm_kd.training.runner import accuracy, load_data
from emovlm_kd.training.stage import resolve_dtype
from modeling_emovlm_kd import GATE_CLASSES, EmoVLMKDDistillationHead

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# What an ablation's training reads from the run's settings (overrides may replace some).
HEAD_FIELDS = ("head_hidden_sizes", "head_dropout", "alpha", "tau", "distill_epochs", "distill_lr",
               "distill_batch_size")
GATE_FIELDS = ("gate_type", "vlm_vector", "gate_epochs", "gate_lr", "gate_batch_size", "gate_train_split")
# Ablation trainers save and print nothing: results only.
QUIET = {"save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True}


def run_ablation(name, run_dir, values, overrides=None, output_dir=None):
    """Sweep `values` in ablation `name` (head_depth: head widths, alpha: alphas, gate: gate types) on the run in
    `run_dir`; write `<output_dir>/<name>.json` and `<name>.md` (default RUN/ablations).

    `overrides` (`{TrainConfig field: value or None}`) replace the run's settings. Returns
    `(table, markdown, output_dir)`.
    """
    run_dir = Path(run_dir)
    run_cfg, cfg = load_settings(run_dir, overrides or {})
    data = load_run_tensors(run_dir, run_cfg)
    started = time.perf_counter()
    table = ABLATIONS[name](run_dir, run_cfg, cfg, data, values)
    logger.info("%s ablation: %d settings in %.1f s", name, len(values), time.perf_counter() - started)
    output_dir = Path(output_dir) if output_dir else run_dir / "ablations"
    markdown = render_table(table)
    write_json(output_dir / f"{name}.json", table)
    write_text(output_dir / f"{name}.md", markdown)
    if table["reproduces_run"] is False:
        logger.warning("the row with the run's settings differs from %s", run_dir / "eval_results.json")
    return table, markdown, output_dir


# ----------------------------------------------------------------------------------------------------------------
# The run: settings, cached tensors, labels
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunTensors:
    """A run's cached tensors per split (rows in the dataset's order) and the labels."""

    names: list
    features: dict  # split -> (N, H) pooled visual features (float32)
    vlm_log_likelihoods: dict  # split -> (N, C)
    teacher_logits: dict  # split -> (N, C)
    labels: dict  # split -> (N,) class ids
    gate_split: str  # the split the run's gate trained on

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
        cfg = dataclasses.replace(run_cfg, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as error:
        raise UsageError(str(error)) from None
    return run_cfg, cfg


def find_cache(run_dir, name):
    """The tensors of RUN/cache/<name>-<fingerprint>.safetensors (exactly one such file)."""
    folder = Path(run_dir) / "cache"
    paths = sorted(folder.glob(f"{name}-*.safetensors"))
    if len(paths) > 1:
        raise UsageError(f"--run {run_dir}: several {name} caches ({', '.join(p.name for p in paths)}); "
                         "rerun `emovlm-kd train` to keep only the current one")
    if not paths:
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
    gate_split = run_cfg.gate_train_split if run_cfg.gate_train_split in labels else "train"
    return RunTensors(names, features, log_likelihoods, teacher_logits, labels, gate_split)


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
    head.requires_grad_(False).to(resolve_dtype(run_cfg))
    return head_file, {s: heads.head_outputs(head, data.features[s]) for s in data.splits}


def run_results(run_dir):
    path = Path(run_dir) / "eval_results.json"
    return json.loads(path.read_text(encoding="utf-8"))["accuracy"] if path.exists() else None


def gate_num_experts(run_dir):
    """The experts of the `moe` gate, as the run's model config has it (the config default otherwise)."""
    path = Path(run_dir) / "model" / "config.json"
    return int(json.loads(path.read_text(encoding="utf-8")).get("gate_num_experts", 3)) if path.exists() else 3


# ----------------------------------------------------------------------------------------------------------------
# Training one setting: the training stages' code on the cached tensors
# ----------------------------------------------------------------------------------------------------------------


def fit_head(cfg, data):
    """Train a head with cfg's head settings (as stage 3 does); its logits per split, evaluated as the run does."""
    head = EmoVLMKDDistillationHead(data.features["train"].shape[-1], cfg.head_hidden_sizes, len(data.names),
                                    cfg.head_dropout)
    with tempfile.TemporaryDirectory(prefix="emovlm-kd-ablation-") as tmp:
        heads.train_head(cfg, head, data.features["train"], data.teacher_logits["train"], data.labels["train"], tmp,
                         **QUIET)
    head.requires_grad_(False).to(resolve_dtype(cfg))
    return head, {s: heads.head_outputs(head, data.features[s]) for s in data.splits}


def fit_gate(cfg, data, head_logits, num_experts=3):
    """Train cfg's gate type on the VLM vectors and these head outputs (as stage 4 does); its test logits."""
    gate = GATE_CLASSES[cfg.gate_type](len(data.names), num_experts=num_experts)
    vlm_scores = {s: heads.vlm_vectors(data.vlm_log_likelihoods[s], cfg.vlm_vector) for s in (data.gate_split, "test")}
    head_probs = {s: head_logits[s].softmax(-1) for s in (data.gate_split, "test")}
    split = data.gate_split
    with tempfile.TemporaryDirectory(prefix="emovlm-kd-ablation-") as tmp:
        heads.train_gate(cfg, gate, vlm_scores[split], head_probs[split], data.labels[split], tmp, **QUIET)
    gate.requires_grad_(False).to(resolve_dtype(cfg))
    return gate, heads.gate_outputs(gate, vlm_scores["test"], head_probs["test"])


def kl_teacher_head(teacher_logits, head_logits, temperature=1.0):
    """KL(p_teacher || p_head) at `temperature`, averaged over images (no tau^2 factor)."""
    return round(float(F.kl_div(F.log_softmax(head_logits.float() / temperature, -1),
                                F.log_softmax(teacher_logits.float() / temperature, -1),
                                reduction="batchmean", log_target=True)), 6)


def accuracy_on_test(logits, data):
    return accuracy(logits.argmax(-1), data.labels["test"])


def num_parameters(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# The tables' shared parts
# ----------------------------------------------------------------------------------------------------------------


def settings_of(cfg, data, fields, num_experts):
    """The settings every row shares (the swept one left out), as they were used."""
    values = {name: getattr(cfg, name) for name in fields}
    values["gate_train_split"] = data.gate_split
    if "gate_type" in fields:
        values["gate_num_experts"] = num_experts
    values["seed"] = cfg.seed
    values["dtype"] = str(resolve_dtype(cfg)).removeprefix("torch.")
    return values


def same_as_run(cfg, run_cfg, fields):
    return cfg.seed == run_cfg.seed and all(getattr(cfg, f) == getattr(run_cfg, f) for f in fields)


def reproduces(rows, results, parts):
    """Does the row with the run's own settings give RUN/eval_results.json's accuracies? None without such a row."""
    own = [row for row in rows if row["run_setting"]]
    if not own or results is None:
        return None
    return all(own[0]["accuracy"][p] == results.get(p) for p in parts)


def make_table(kind, run_dir, data, settings, rows, parts, **paper):
    """The ablation's table: the run, the shared settings, the branches, `paper` (reference, numbers), the rows
    and whether the run's own row reproduces RUN/eval_results.json on `parts`."""
    results = run_results(run_dir)
    table = {
        "ablation": kind,
        "run": str(run_dir),
        "split": "test",
        "num_samples": len(data.labels["test"]),
        "labels": data.names,
        "settings": settings,
        "branches": {"vlm": accuracy_on_test(data.vlm_log_likelihoods["test"], data),
                     "teacher": accuracy_on_test(data.teacher_logits["test"], data)},
        "run_results": results,
    }
    table.update(paper, rows=rows, reproduces_run=reproduces(rows, results, parts))
    return table


def _summary(row):
    """What a row measured, for the log: 'distill 0.8125, EmoVLM-KD 0.8750[, KL 0.1234]'."""
    titles = {"distill": "distill", "emovlm_kd": "EmoVLM-KD"}
    found = [f"{title} {row['accuracy'][part]:.4f}" for part, title in titles.items() if part in row["accuracy"]]
    if "kl_teacher_head" in row:
        found.append(f"KL {row['kl_teacher_head']:.4f}")
    return ", ".join(found)


def _progress(items, desc):
    return tqdm(items, desc=desc, unit="setting")


# ----------------------------------------------------------------------------------------------------------------
# The three ablations
# ----------------------------------------------------------------------------------------------------------------


def sweep_head(run_dir, run_cfg, cfg, data, field, values, make_row, desc):
    """Per value of the TrainConfig `field`, retrain the head, then the gate on it; `(rows, shared settings)`.

    `make_row(value, head, head_test_logits, accuracy, run_setting)` gives each row, `accuracy` being the test
    accuracy of the head (`distill`) and the gate (`emovlm_kd`).
    """
    experts = gate_num_experts(run_dir)
    fields = [f for f in HEAD_FIELDS + GATE_FIELDS if f != field]
    rows = []
    for value in (bar := _progress(values, desc)):
        setting = dataclasses.replace(cfg, **{field: value})
        head, head_logits = fit_head(setting, data)
        _, gate_logits = fit_gate(setting, data, head_logits, experts)
        measured = {"distill": accuracy_on_test(head_logits["test"], data),
                    "emovlm_kd": accuracy_on_test(gate_logits, data)}
        run_setting = value == getattr(run_cfg, field) and same_as_run(cfg, run_cfg, fields)
        rows.append(make_row(value, head, head_logits["test"], measured, run_setting))
        bar.set_postfix(setting=str(value), emovlm_kd=measured["emovlm_kd"])
        logger.info("%s %s: %s", desc, value, _summary(rows[-1]))
    return rows, settings_of(cfg, data, fields, experts)


def ablate_head_depth(run_dir, run_cfg, cfg, data, depths):
    """Table 3: per head (hidden widths), retrain the head, then the gate on it; test accuracy of both."""

    def row(widths, head, head_test_logits, measured, run_setting):
        return {"head_hidden_sizes": widths, "head_parameters": num_parameters(head), "accuracy": measured,
                "run_setting": run_setting, "paper": TABLE3.get(tuple(widths))}

    rows, settings = sweep_head(run_dir, run_cfg, cfg, data, "head_hidden_sizes", depths, row, "head depth")
    return make_table("head_depth", run_dir, data, settings, rows, ("distill", "emovlm_kd"),
                      paper_reference="Table 3 (EmoVLM-KD accuracy, %, on FI and Emotion6)")


def ablate_alpha(run_dir, run_cfg, cfg, data, alphas):
    """Figure 3: per alpha, retrain the head, then the gate on it; accuracy and KL(teacher || head) on test."""
    teacher = data.teacher_logits["test"]

    def row(alpha, head, head_test_logits, measured, run_setting):
        return {"alpha": alpha, "accuracy": measured,
                "kl_teacher_head": kl_teacher_head(teacher, head_test_logits, 1.0),
                "kl_teacher_head_at_tau": kl_teacher_head(teacher, head_test_logits, cfg.tau),
                "run_setting": run_setting}

    rows, settings = sweep_head(run_dir, run_cfg, cfg, data, "alpha", alphas, row, "alpha")
    return make_table("alpha", run_dir, data, settings, rows, ("distill", "emovlm_kd"),
                      paper_reference="Figure 3 (accuracy and KL divergence per alpha)", paper=FIGURE3)


def ablate_gate(run_dir, run_cfg, cfg, data, gates):
    """Table 4: each gate type trained on the run's head (RUN/stage3_distill/head.safetensors)."""
    head_file, head_logits = load_run_head(run_dir, run_cfg, data)
    experts = gate_num_experts(run_dir)
    fields = [f for f in GATE_FIELDS if f != "gate_type"]
    rows = []
    for gate_type in (bar := _progress(gates, "gate")):
        gate, gate_logits = fit_gate(dataclasses.replace(cfg, gate_type=gate_type), data, head_logits, experts)
        rows.append({
            "gate_type": gate_type,
            "gate_parameters": num_parameters(gate),
            "accuracy": {"emovlm_kd": accuracy_on_test(gate_logits, data)},
            "run_setting": gate_type == run_cfg.gate_type and same_as_run(cfg, run_cfg, fields),
            "paper": {"fi": TABLE4_FI[gate_type]},
        })
        bar.set_postfix(gate=gate_type, emovlm_kd=rows[-1]["accuracy"]["emovlm_kd"])
        logger.info("gate %s: %s", gate_type, _summary(rows[-1]))
    settings = settings_of(cfg, data, fields, experts)
    settings["head"] = str(head_file)
    table = make_table("gate", run_dir, data, settings, rows, ("emovlm_kd",),
                       paper_reference="Table 4 (EmoVLM-KD accuracy, %, on FI)")
    table["branches"]["distill"] = accuracy_on_test(head_logits["test"], data)
    return table


ABLATIONS = {"head_depth": ablate_head_depth, "alpha": ablate_alpha, "gate": ablate_gate}
