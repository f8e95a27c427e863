"""The paper's ablations, retrained on a finished run's caches in seconds: Table 3 (head depth), Figure 3 (alpha),
Table 4 (gate type), and what the gate trains on (gate data: sampled train answers, held-out val, deterministic train).

    from emovlm_kd.evaluation.ablations import run_ablation
    table, markdown, output_dir = run_ablation("alpha", "runs/fi", [0.0, 0.5, 1.0], overrides={"seed": 1})

`emovlm-kd train` keeps one VLM pass (pooled visual features, label log-likelihoods) and one teacher pass (logits)
per image under RUN/cache/. The head (stage 3) and the gate (stage 4) train on those tensors only, so each setting
here retrains them with the training stages' own code (`emovlm_kd.training.heads.train_head` / `train_gate`) and
the run's settings (RUN/train_config.json; overrides replace them), and never loads the VLM or the teacher. The row
with the run's own settings reproduces RUN/eval_results.json, and a rerun gives the same numbers. Labels come from
the run's dataset (the caches hold none). A run that cannot be ablated raises `UsageError` naming `--run`.
"""

import copy
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch.nn.functional as F
from tqdm.auto import tqdm

from emovlm_kd.determinism import deterministic
from emovlm_kd.errors import UsageError
from emovlm_kd.evaluation.ablation_data import (  # noqa: F401  (RunTensors, load_settings: this module's API too)
    RunTensors,
    gate_num_experts,
    load_run_head,
    load_run_tensors,
    load_settings,
    run_results,
)
from emovlm_kd.evaluation.ablation_tables import render_table
from emovlm_kd.evaluation.paper import FIGURE3, TABLE3, TABLE4_FI
from emovlm_kd.evaluation.report import write_json, write_text
from emovlm_kd.runtime import resolve_dtype, run_device
from emovlm_kd.training import heads
from emovlm_kd.training.calibration import calibration_rows
from emovlm_kd.training.gatedata import gate_split, gate_training_set
from emovlm_kd.training.runner import accuracy
from modeling_emovlm_kd import GATE_CLASSES, EmoVLMKDDistillationHead

logger = logging.getLogger(__name__)

# What an ablation's training reads from the run's settings (overrides may replace some).
HEAD_FIELDS = ("head_hidden_sizes", "head_dropout", "alpha", "tau", "distill_epochs", "distill_lr",
               "distill_batch_size")
GATE_FIELDS = ("gate_type", "vlm_vector", "gate_epochs", "gate_lr", "gate_batch_size", "gate_data", "gate_samples",
               "gate_temperature")
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
    with deterministic():  # as the run trained (emovlm_kd.determinism)
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
# Training one setting: the training stages' code on the cached tensors
# ----------------------------------------------------------------------------------------------------------------


def fit_head(cfg, data):
    """Train a head with cfg's head settings as stage 3 does: created in float32 on the run's device
    (`runtime.run_device`), where its seeded initialisation draws. Returns the trained head (float32, on the CPU:
    what stage 3 saves) and its logits per split, evaluated as the run does (`as_evaluated`)."""
    head = EmoVLMKDDistillationHead(data.features["train"].shape[-1], cfg.head_hidden_sizes, len(data.names),
                                    cfg.head_dropout).float().to(run_device())
    with tempfile.TemporaryDirectory(prefix="emovlm-kd-ablation-") as tmp:
        heads.train_head(cfg.distill_args, head, data.features["train"], data.teacher_logits["train"],
                         data.labels["train"], tmp, seed=cfg.seed, **QUIET)
    evaluated = as_evaluated(head, cfg)
    return head.requires_grad_(False).cpu(), {s: heads.head_outputs(evaluated, data.features[s]) for s in data.splits}


def as_evaluated(module, cfg):
    """A frozen copy of a trained head or gate as the run evaluated it: in the run's dtype, on its device (stages 3
    and 4 cast the trained float32 module to the run's dtype before computing what the next stage reads)."""
    return copy.deepcopy(module).requires_grad_(False).to(run_device(), resolve_dtype(cfg.dtype))


def gate_data_of(cfg, data, head_logits):
    """(vlm_scores, head_probs, labels) that cfg's gate trains on (as stage 4 builds them), and the test vectors.
    Sampled answers come from the run's cache: the first cfg.gate_samples of them (each answer is seeded by its
    image and index, so they are what a run with fewer samples would have drawn)."""
    vlm_scores = {s: heads.vlm_vectors(data.vlm_log_likelihoods[s], cfg.vlm_vector) for s in data.splits}
    head_probs = {s: heads.gate_head_input(head_logits[s], cfg.gate_input) for s in data.splits}
    samples = data.gate_samples
    if cfg.gate_data == "sampled":
        if samples is None or samples.shape[1] < cfg.gate_samples:
            have = "no sampled answers" if samples is None else f"{samples.shape[1]} sampled answers per image"
            raise UsageError(f"--gate-data sampled with {cfg.gate_samples} samples: the run cached {have}; train "
                             f"with --gate-data sampled --gate-samples {cfg.gate_samples} (stages 0-3 are reused)")
        samples = samples[:, : cfg.gate_samples]
    # under --gate-data val the gate trains on val less the part its temperature is fitted on, as in stage 4
    val_rows = calibration_rows(cfg.gate_data, data.labels["val"], cfg.seed)[0] if "val" in data.labels else None
    return (gate_training_set(cfg.gate_data, vlm_scores, head_probs, data.labels, samples, val_rows=val_rows),
            vlm_scores["test"])


def fit_gate(cfg, data, head_logits, num_experts=3):
    """Train cfg's gate type on cfg's gate data and these head outputs as stage 4 does (created in float32 on the
    run's device, see `fit_head`). Returns the trained gate (float32, on the CPU: what stage 4 saves) and its test
    logits, evaluated as the run does."""
    gate = GATE_CLASSES[cfg.gate_type](len(data.names), num_experts=num_experts).float().to(run_device())
    (vlm_scores, head_probs, labels), test_vectors = gate_data_of(cfg, data, head_logits)
    with tempfile.TemporaryDirectory(prefix="emovlm-kd-ablation-") as tmp:
        heads.train_gate(cfg.gate_args, gate, vlm_scores, head_probs, labels, tmp, seed=cfg.seed, **QUIET)
    test_logits = heads.gate_outputs(as_evaluated(gate, cfg), test_vectors,
                                      heads.gate_head_input(head_logits["test"], cfg.gate_input))
    return gate.requires_grad_(False).cpu(), test_logits


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
    values["gate_train_split"] = gate_split(cfg.gate_data, data.labels) if "gate_data" in fields else "swept"
    if "gate_type" in fields:
        values["gate_num_experts"] = num_experts
    values["seed"] = cfg.seed
    values["dtype"] = str(resolve_dtype(cfg.dtype)).removeprefix("torch.")
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
    return tqdm(items, desc=desc, unit="setting", disable=None)  # no bar without a terminal


# ----------------------------------------------------------------------------------------------------------------
# The ablations
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


def follows(gate_logits, vlm_scores, head_logits):
    """Where the VLM's and the head's test answers differ: how many, and the share the gate sides with each."""
    vlm, head, gate = vlm_scores.argmax(-1), head_logits.argmax(-1), gate_logits.argmax(-1)
    differ = vlm != head
    count = int(differ.sum())
    share = (lambda same: round(float(same[differ].float().mean()), 4)) if count else (lambda same: None)
    return {"images": count, "vlm": share(gate == vlm), "head": share(gate == head)}


def gate_data_row(cfg, run_cfg, data, head_logits, protocol, experts):
    """One gate-data protocol: what the gate trained on, how often the VLM is right there, the test accuracy and
    whom the gate follows where the branches disagree; `unavailable` (with why) when the run has no such data."""
    row = {"gate_data": protocol, "run_setting": False}
    try:
        setting = dataclasses.replace(cfg, gate_data=protocol)
        (vlm_scores, _, labels), test_vectors = gate_data_of(setting, data, head_logits)
    except (ValueError, UsageError) as error:
        return {**row, "unavailable": str(error)}
    answers = vlm_scores.argmax(-1)  # (N,) or (N, K); a zero vector (no label named) counts as wrong
    right = (answers == (labels[:, None] if answers.dim() == 2 else labels)) & (vlm_scores.sum(-1) > 0)
    _, gate_logits = fit_gate(setting, data, head_logits, experts)
    return {**row, "split": "train" if protocol == "sampled" else gate_split(protocol, data.labels),
            "images": len(labels), "samples_per_image": setting.gate_samples if protocol == "sampled" else None,
            "vlm_accuracy_on_gate_data": round(float(right.float().mean()), 4),
            "accuracy": {"emovlm_kd": accuracy_on_test(gate_logits, data)},
            "follows_where_branches_differ": follows(gate_logits, test_vectors, head_logits["test"]),
            "run_setting": protocol == run_cfg.gate_data and same_as_run(cfg, run_cfg, GATE_FIELDS)}


def ablate_gate_data(run_dir, run_cfg, cfg, data, protocols):
    """What the gate trains on (sampled train answers, held-out val, deterministic train), each on the run's head."""
    head_file, head_logits = load_run_head(run_dir, run_cfg, data)
    experts = gate_num_experts(run_dir)
    rows = []
    for protocol in (bar := _progress(protocols, "gate data")):
        rows.append(gate_data_row(cfg, run_cfg, data, head_logits, protocol, experts))
        found = rows[-1].get("accuracy", {}).get("emovlm_kd")
        bar.set_postfix(gate_data=protocol, emovlm_kd=found)
        logger.info("gate data %s: %s", protocol, _summary(rows[-1]) if found is not None else rows[-1]["unavailable"])
    settings = settings_of(cfg, data, [f for f in GATE_FIELDS if f != "gate_data"], experts)
    settings.update(gate_data="swept", head=str(head_file))
    table = make_table("gate_data", run_dir, data, settings, rows, ("emovlm_kd",),
                       paper_reference="the paper's gate trains on the train split's answers sampled at T=0.8 "
                                       "(official train_gate.py)")
    table["branches"]["distill"] = accuracy_on_test(head_logits["test"], data)
    return table


ABLATIONS = {"head_depth": ablate_head_depth, "alpha": ablate_alpha, "gate": ablate_gate,
             "gate_data": ablate_gate_data}
