"""`emovlm-kd ablate`: the paper's ablations, retrained on a finished run's caches in seconds.

    emovlm-kd ablate head-depth --run runs/fi    Table 3: head widths -> distill head and EmoVLM-KD test accuracy
    emovlm-kd ablate alpha --run runs/fi         Figure 3: alpha -> accuracy and KL(teacher || head) on test
    emovlm-kd ablate gate --run runs/fi          Table 4: gate types on the run's trained head -> EmoVLM-KD accuracy

`emovlm-kd train` keeps one VLM pass (pooled visual features, label log-likelihoods) and one teacher pass (logits)
per image under RUN/cache/. The head (stage 3) and the gate (stage 4) train on those tensors only, so each setting
here retrains them with the training stages' own code (`emovlm_kd.training.heads.train_head` / `train_gate`) and the run's
settings (RUN/train_config.json; flags override), and never loads the VLM or the teacher. The row with the run's
own settings reproduces RUN/eval_results.json, and a rerun gives the same numbers. Labels come from the run's
dataset (the caches hold none). Each ablation writes `<output-dir>/<name>.json` and `<name>.md` (default
RUN/ablations) and prints the Markdown table.
"""

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

DEFAULT_DEPTHS = "1024;1024,512;1024,512,256;1024,512,256,128;1024,512,256,128,64"
DEFAULT_ALPHAS = ",".join(f"{i / 10:g}" for i in range(11))
GATE_TITLES = {
    "concat_linear": "Concat & Linear",
    "moe": "MoE",
    "bilinear": "Bilinear",
    "dynamic_weighting": "DynamicWeighting",
    "cross_gating": "CrossGating",
}

# The paper's numbers (accuracy, %). Table 3: EmoVLM-KD accuracy per head (hidden widths) on FI and Emotion6.
PAPER_TABLE3 = {
    (1024,): {"fi": 79.51, "emotion6": 73.91},
    (1024, 512): {"fi": 73.98, "emotion6": 69.02},
    (1024, 512, 256): {"fi": 73.80, "emotion6": 68.86},
    (1024, 512, 256, 128): {"fi": 72.43, "emotion6": 67.68},
    (1024, 512, 256, 128, 64): {"fi": 68.59, "emotion6": 63.30},
}
# Table 4: EmoVLM-KD accuracy per gate type on FI.
PAPER_TABLE4_FI = {"concat_linear": 79.51, "moe": 79.24, "bilinear": 78.56, "dynamic_weighting": 78.14,
                   "cross_gating": 78.01}
# Figure 3 is a plot; the text gives its conclusions only.
PAPER_FIGURE3 = ("the paper plots Figure 3 only: on FI and Emotion6 accuracy peaks at alpha = 0.5, "
                 "and KL(teacher || head) falls as alpha grows")

# What an ablation's training reads from the run's settings (flags may override some).
HEAD_FIELDS = ("head_hidden_sizes", "head_dropout", "alpha", "tau", "distill_epochs", "distill_lr", "distill_batch_size")
GATE_FIELDS = ("gate_type", "vlm_vector", "gate_epochs", "gate_lr", "gate_batch_size", "gate_train_split")
# Flags that override a run setting of the same name.
OVERRIDABLE = ("seed", "gate_epochs", "gate_lr", "tau", "head_dropout", "distill_epochs", "distill_lr", "gate_type",
               "alpha", "head_hidden_sizes")
# Ablation trainers save and print nothing: results only.
QUIET = dict(save_strategy="no", logging_strategy="no", disable_tqdm=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def add_arguments(parser):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run", required=True, help="a finished `emovlm-kd train` run folder (RUN)")
    common.add_argument("--output-dir", default=None, help="where the tables go (default: RUN/ablations)")
    common.add_argument("--seed", type=int, default=None, help="seed of initialisation and training (default: run's)")
    common.add_argument("--gate-epochs", type=float, default=None, help="default: the run's")
    common.add_argument("--gate-lr", type=float, default=None, help="default: the run's")
    head = argparse.ArgumentParser(add_help=False)
    head.add_argument("--tau", type=float, default=None, help="distillation temperature (default: the run's)")
    head.add_argument("--head-dropout", type=float, default=None, help="default: the run's")
    head.add_argument("--distill-epochs", type=float, default=None, help="default: the run's")
    head.add_argument("--distill-lr", type=float, default=None, help="default: the run's")
    head.add_argument("--gate-type", default=None, help="the gate trained on each head (default: the run's)")

    sub = parser.add_subparsers(dest="ablation", required=True, metavar="ABLATION")
    depth = sub.add_parser("head-depth", parents=[common, head], help="Table 3: head depth",
                           description="Table 3: retrain the head (and the gate on it) for each head depth")
    depth.add_argument("--depths", default=DEFAULT_DEPTHS,
                       help=f"heads as hidden widths, ';' between heads (default: the paper's, {DEFAULT_DEPTHS})")
    depth.add_argument("--alpha", type=float, default=None, help="weight of the KL term (default: the run's)")
    alpha = sub.add_parser("alpha", parents=[common, head], help="Figure 3: alpha",
                           description="Figure 3: retrain the head (and the gate on it) for each alpha")
    alpha.add_argument("--alphas", default=DEFAULT_ALPHAS, help=f"comma-separated (default: {DEFAULT_ALPHAS})")
    alpha.add_argument("--head-hidden-sizes", default=None, help="head widths, e.g. 1024 (default: the run's)")
    gate = sub.add_parser("gate", parents=[common], help="Table 4: gate type",
                          description="Table 4: train each gate type on the run's trained head")
    gate.add_argument("--gates", default=",".join(GATE_TITLES), help="comma-separated gate types (default: all five)")


def run(args):
    from emovlm_kd.evaluation.report import write_json, write_text

    name, parse, ablate_fn = {
        "head-depth": ("head_depth", lambda: parse_depths(args.depths), ablate_head_depth),
        "alpha": ("alpha", lambda: parse_alphas(args.alphas), ablate_alpha),
        "gate": ("gate", lambda: parse_gates(args.gates), ablate_gate),
    }[args.ablation]
    run_dir = Path(args.run)
    overrides = {flag: getattr(args, flag, None) for flag in OVERRIDABLE}
    settings = parse()
    run_cfg, cfg = load_settings(run_dir, overrides)
    data = load_run_tensors(run_dir, run_cfg)
    started = time.perf_counter()
    table = ablate_fn(run_dir, run_cfg, cfg, data, settings)
    logger.info("%s ablation: %d settings in %.1f s", name, len(settings), time.perf_counter() - started)
    output_dir = Path(args.output_dir) if args.output_dir else run_dir / "ablations"
    markdown = RENDERERS[name](table)
    write_json(output_dir / f"{name}.json", table)
    write_text(output_dir / f"{name}.md", markdown)
    print(markdown + f"\ntables: {output_dir / name}.json, {output_dir / name}.md")
    if table["reproduces_run"] is False:
        logger.warning("the row with the run's settings differs from %s", run_dir / "eval_results.json")
    return 0


def _usage(message):
    from emovlm_kd.errors import UsageError

    return UsageError(message)


def _unique(values, flag):
    seen = []
    for value in values:
        if value in seen:
            raise _usage(f"{flag}: {value} is listed twice")
        seen.append(value)
    return seen


def parse_depths(text):
    """'1024;1024,512' -> [[1024], [1024, 512]]."""
    heads = []
    for part in (p.strip() for p in str(text).split(";")):
        try:
            widths = [int(w) for w in part.split(",")]
        except ValueError:
            raise _usage(f"--depths: {part!r} is not a comma-separated list of integers") from None
        if not widths or any(w <= 0 for w in widths):
            raise _usage(f"--depths: widths must be positive, got {part!r}")
        heads.append(widths)
    return _unique(heads, "--depths")


def parse_alphas(text):
    try:
        alphas = [float(a) for a in str(text).split(",")]
    except ValueError:
        raise _usage(f"--alphas: expected comma-separated numbers, got {text!r}") from None
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise _usage(f"--alphas: every alpha must be in [0, 1], got {bad[0]}")
    return _unique(alphas, "--alphas")


def parse_gates(text):
    gates = [g.strip() for g in str(text).split(",") if g.strip()]
    unknown = [g for g in gates if g not in GATE_TITLES]
    if unknown or not gates:
        raise _usage(f"--gates: unknown gate type {unknown[0] if unknown else text!r}; known: {', '.join(GATE_TITLES)}")
    return _unique(gates, "--gates")


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
    """(the run's TrainConfig, the same with the flags' overrides); a missing or bad run is a usage error."""
    from emovlm_kd.training.config import TrainConfig

    path = Path(run_dir) / "train_config.json"
    if not path.exists():
        raise _usage(f"--run {run_dir}: no train_config.json there; run `emovlm-kd train` first")
    values = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        logger.warning("%s: ignoring unknown setting(s) %s", path, ", ".join(unknown))
    try:
        run_cfg = TrainConfig(**{k: v for k, v in values.items() if k in known})
    except ValueError as error:
        raise _usage(f"--run {run_dir}: bad train_config.json: {error}") from None
    try:
        cfg = dataclasses.replace(run_cfg, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as error:
        raise _usage(str(error)) from None
    return run_cfg, cfg


def find_cache(run_dir, name):
    """The tensors of RUN/cache/<name>-<fingerprint>.safetensors (exactly one such file)."""
    from safetensors.torch import load_file

    folder = Path(run_dir) / "cache"
    paths = sorted(folder.glob(f"{name}-*.safetensors"))
    if len(paths) > 1:
        raise _usage(f"--run {run_dir}: several {name} caches ({', '.join(p.name for p in paths)}); "
                     "rerun `emovlm-kd train` to keep only the current one")
    if not paths:
        raise _usage(f"--run {run_dir}: no {name}-*.safetensors in {folder}; run `emovlm-kd train` first")
    return load_file(paths[0])


def load_run_tensors(run_dir, run_cfg):
    """The run's caches and its dataset's labels, loaded as the run loaded them (same data source and seed)."""
    import torch

    from emovlm_kd.training.config import DEMO
    from emovlm_kd.training.runner import load_data

    source = Path(run_dir) / "data" / "synthetic" if run_cfg.dataset == DEMO else run_cfg.dataset
    try:
        dataset = load_data(run_cfg, source)
    except (OSError, ValueError) as error:
        raise _usage(f"--run {run_dir}: cannot load the run's dataset {str(source)!r} for its labels: {error}") from None
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
            raise _usage(f"--run {run_dir}: the {split} caches and the dataset {str(source)!r} differ in rows; "
                         "the data changed since the run: rerun `emovlm-kd train`")
        if log_likelihoods[split].shape[-1] != len(names) or teacher_logits[split].shape[-1] != len(names):
            raise _usage(f"--run {run_dir}: the {split} caches do not have the dataset's {len(names)} classes")
    gate_split = run_cfg.gate_train_split if run_cfg.gate_train_split in labels else "train"
    return RunTensors(names, features, log_likelihoods, teacher_logits, labels, gate_split)


def run_results(run_dir):
    path = Path(run_dir) / "eval_results.json"
    return json.loads(path.read_text(encoding="utf-8"))["accuracy"] if path.exists() else None


# ----------------------------------------------------------------------------------------------------------------
# Training one setting: the training stages' code on the cached tensors
# ----------------------------------------------------------------------------------------------------------------


def fit_head(cfg, data):
    """Train a head with cfg's head settings (as stage 3 does); its logits per split, evaluated as the run does."""
    from modeling_emovlm_kd import EmoVLMKDDistillationHead
    from emovlm_kd.training import heads, stage

    head = EmoVLMKDDistillationHead(data.features["train"].shape[-1], cfg.head_hidden_sizes, len(data.names),
                                    cfg.head_dropout)
    with tempfile.TemporaryDirectory(prefix="emovlm-kd-ablation-") as tmp:
        heads.train_head(cfg, head, data.features["train"], data.teacher_logits["train"], data.labels["train"], tmp,
                          **QUIET)
    head.requires_grad_(False).to(stage.resolve_dtype(cfg))
    return head, {s: heads.head_outputs(head, data.features[s]) for s in data.splits}


def fit_gate(cfg, data, head_logits, num_experts=3):
    """Train cfg's gate type on the VLM vectors and these head outputs (as stage 4 does); its test logits."""
    from modeling_emovlm_kd import GATE_CLASSES
    from emovlm_kd.training import heads, stage

    gate = GATE_CLASSES[cfg.gate_type](len(data.names), num_experts=num_experts)
    vlm_scores = {s: heads.vlm_vectors(data.vlm_log_likelihoods[s], cfg.vlm_vector) for s in (data.gate_split, "test")}
    head_probs = {s: head_logits[s].softmax(-1) for s in (data.gate_split, "test")}
    split = data.gate_split
    with tempfile.TemporaryDirectory(prefix="emovlm-kd-ablation-") as tmp:
        heads.train_gate(cfg, gate, vlm_scores[split], head_probs[split], data.labels[split], tmp, **QUIET)
    gate.requires_grad_(False).to(stage.resolve_dtype(cfg))
    return gate, heads.gate_outputs(gate, vlm_scores["test"], head_probs["test"])


def kl_teacher_head(teacher_logits, head_logits, temperature=1.0):
    """KL(p_teacher || p_head) at `temperature`, averaged over images (no tau^2 factor)."""
    import torch.nn.functional as F

    return round(float(F.kl_div(F.log_softmax(head_logits.float() / temperature, -1),
                                F.log_softmax(teacher_logits.float() / temperature, -1),
                                reduction="batchmean", log_target=True)), 6)


def accuracy_on_test(logits, data):
    from emovlm_kd.training.runner import accuracy

    return accuracy(logits.argmax(-1), data.labels["test"])


def num_parameters(module):
    return sum(p.numel() for p in module.parameters())


def gate_num_experts(run_dir):
    """The experts of the `moe` gate, as the run's model config has it (the config default otherwise)."""
    path = Path(run_dir) / "model" / "config.json"
    return int(json.loads(path.read_text(encoding="utf-8")).get("gate_num_experts", 3)) if path.exists() else 3


def settings_of(cfg, data, fields, num_experts):
    """The settings every row shares (the swept one left out), as they were used."""
    from emovlm_kd.training.stage import resolve_dtype

    values = {name: getattr(cfg, name) for name in fields}
    values["gate_train_split"] = data.gate_split
    if "gate_type" in fields:
        values["gate_num_experts"] = num_experts
    values["seed"] = cfg.seed
    values["dtype"] = str(resolve_dtype(cfg)).removeprefix("torch.")
    return values


def same_as_run(cfg, run_cfg, fields):
    return cfg.seed == run_cfg.seed and all(getattr(cfg, f) == getattr(run_cfg, f) for f in fields)


def table_header(kind, run_dir, data, settings, results):
    return {
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


def reproduces(rows, results, parts):
    """Does the row with the run's own settings give RUN/eval_results.json's accuracies? None without such a row."""
    own = [row for row in rows if row["run_setting"]]
    if not own or results is None:
        return None
    return all(own[0]["accuracy"][p] == results.get(p) for p in parts)


def _progress(items, desc):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="setting")


# ----------------------------------------------------------------------------------------------------------------
# The three ablations
# ----------------------------------------------------------------------------------------------------------------


def ablate_head_depth(run_dir, run_cfg, cfg, data, depths):
    """Table 3: per head, retrain the head, then the gate on it; test accuracy of both."""
    experts = gate_num_experts(run_dir)
    fields = [f for f in HEAD_FIELDS + GATE_FIELDS if f != "head_hidden_sizes"]
    results, rows = run_results(run_dir), []
    for widths in (bar := _progress(depths, "head depth")):
        setting = dataclasses.replace(cfg, head_hidden_sizes=widths)
        head, head_logits = fit_head(setting, data)
        _, gate_logits = fit_gate(setting, data, head_logits, experts)
        row = {
            "head_hidden_sizes": widths,
            "head_parameters": num_parameters(head),
            "accuracy": {"distill": accuracy_on_test(head_logits["test"], data),
                         "emovlm_kd": accuracy_on_test(gate_logits, data)},
            "run_setting": widths == run_cfg.head_hidden_sizes and same_as_run(cfg, run_cfg, fields),
            "paper": PAPER_TABLE3.get(tuple(widths)),
        }
        rows.append(row)
        bar.set_postfix(head=str(widths), emovlm_kd=row["accuracy"]["emovlm_kd"])
        logger.info("head %s: distill %.4f, EmoVLM-KD %.4f", widths, *row["accuracy"].values())
    table = table_header("head_depth", run_dir, data, settings_of(cfg, data, fields, experts), results)
    table.update(paper_reference="Table 3 (EmoVLM-KD accuracy, %, on FI and Emotion6)", rows=rows,
                 reproduces_run=reproduces(rows, results, ("distill", "emovlm_kd")))
    return table


def ablate_alpha(run_dir, run_cfg, cfg, data, alphas):
    """Figure 3: per alpha, retrain the head, then the gate on it; accuracy and KL(teacher || head) on test."""
    experts = gate_num_experts(run_dir)
    fields = [f for f in HEAD_FIELDS + GATE_FIELDS if f != "alpha"]
    results, rows = run_results(run_dir), []
    for alpha in (bar := _progress(alphas, "alpha")):
        setting = dataclasses.replace(cfg, alpha=alpha)
        _, head_logits = fit_head(setting, data)
        _, gate_logits = fit_gate(setting, data, head_logits, experts)
        teacher = data.teacher_logits["test"]
        row = {
            "alpha": alpha,
            "accuracy": {"distill": accuracy_on_test(head_logits["test"], data),
                         "emovlm_kd": accuracy_on_test(gate_logits, data)},
            "kl_teacher_head": kl_teacher_head(teacher, head_logits["test"], 1.0),
            "kl_teacher_head_at_tau": kl_teacher_head(teacher, head_logits["test"], cfg.tau),
            "run_setting": alpha == run_cfg.alpha and same_as_run(cfg, run_cfg, fields),
        }
        rows.append(row)
        bar.set_postfix(alpha=alpha, emovlm_kd=row["accuracy"]["emovlm_kd"])
        logger.info("alpha %g: distill %.4f, EmoVLM-KD %.4f, KL %.4f", alpha, *row["accuracy"].values(),
                    row["kl_teacher_head"])
    table = table_header("alpha", run_dir, data, settings_of(cfg, data, fields, experts), results)
    table.update(paper_reference="Figure 3 (accuracy and KL divergence per alpha)", paper=PAPER_FIGURE3, rows=rows,
                 reproduces_run=reproduces(rows, results, ("distill", "emovlm_kd")))
    return table


def ablate_gate(run_dir, run_cfg, cfg, data, gates):
    """Table 4: each gate type trained on the run's head (RUN/stage3_distill/head.safetensors)."""
    from safetensors.torch import load_file

    from modeling_emovlm_kd import EmoVLMKDDistillationHead
    from emovlm_kd.training import heads, stage

    head_file = Path(run_dir) / "stage3_distill" / "head.safetensors"
    if not (head_file.exists() and (head_file.parent / "DONE.json").exists()):
        raise _usage(f"--run {run_dir}: no trained head ({head_file}); run `emovlm-kd train` first")
    head = EmoVLMKDDistillationHead(data.features["train"].shape[-1], run_cfg.head_hidden_sizes, len(data.names),
                                    run_cfg.head_dropout)
    try:
        head.load_state_dict(load_file(head_file))
    except RuntimeError as error:
        raise _usage(f"--run {run_dir}: {head_file} does not fit the run's head settings: {error}") from None
    head.requires_grad_(False).to(stage.resolve_dtype(run_cfg))
    head_logits = {s: heads.head_outputs(head, data.features[s]) for s in data.splits}
    experts = gate_num_experts(run_dir)
    fields = [f for f in GATE_FIELDS if f != "gate_type"]
    results, rows = run_results(run_dir), []
    for gate_type in (bar := _progress(gates, "gate")):
        gate, gate_logits = fit_gate(dataclasses.replace(cfg, gate_type=gate_type), data, head_logits, experts)
        row = {
            "gate_type": gate_type,
            "gate_parameters": num_parameters(gate),
            "accuracy": {"emovlm_kd": accuracy_on_test(gate_logits, data)},
            "run_setting": gate_type == run_cfg.gate_type and same_as_run(cfg, run_cfg, fields),
            "paper": {"fi": PAPER_TABLE4_FI[gate_type]},
        }
        rows.append(row)
        bar.set_postfix(gate=gate_type, emovlm_kd=row["accuracy"]["emovlm_kd"])
        logger.info("gate %s: EmoVLM-KD %.4f", gate_type, row["accuracy"]["emovlm_kd"])
    settings = settings_of(cfg, data, fields, experts)
    settings["head"] = str(head_file)
    table = table_header("gate", run_dir, data, settings, results)
    table["branches"]["distill"] = accuracy_on_test(head_logits["test"], data)
    table.update(paper_reference="Table 4 (EmoVLM-KD accuracy, %, on FI)", rows=rows,
                 reproduces_run=reproduces(rows, results, ("emovlm_kd",)))
    return table


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def _pct(value):
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value):
    return "-" if value is None else f"{value:.2f}"


def _grid(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _intro(table, title):
    s = table["settings"]
    lines = [f"# {title}", "", f"Run `{table['run']}`, {table['num_samples']} test images, seed {s['seed']}, "
             f"{s['dtype']}."]
    if "alpha" in s or "tau" in s:
        lines.append(f"Head: alpha {s.get('alpha', 'swept')}, tau {s['tau']}, dropout {s['head_dropout']}, "
                     f"{s['distill_epochs']:g} epochs at lr {s['distill_lr']:g}.")
    lines.append(f"Gate: {s.get('gate_type', 'swept')}, {s['vlm_vector']} VLM vectors, {s['gate_epochs']:g} epochs "
                 f"at lr {s['gate_lr']:g}, trained on {s['gate_train_split']}.")
    branches = ", ".join(f"{name} {_pct(acc)} %" for name, acc in table["branches"].items())
    lines += [f"Branches on test: {branches}.", ""]
    return lines


def _outro(table, parts):
    verdict = {True: "yes", False: "NO", None: "no such row or no eval_results.json"}[table["reproduces_run"]]
    lines = ["", "(run): the run's own settings."]
    if table["run_results"]:
        found = ", ".join(f"{p} {_pct(table['run_results'].get(p))} %" for p in parts)
        lines.append(f"RUN/eval_results.json: {found}; reproduced by the (run) row: {verdict}.")
    return lines


def render_head_depth(table):
    rows = [[str(r["head_hidden_sizes"]) + (" (run)" if r["run_setting"] else ""), f"{r['head_parameters']:,}",
             _pct(r["accuracy"]["distill"]), _pct(r["accuracy"]["emovlm_kd"]),
             _num((r["paper"] or {}).get("fi")), _num((r["paper"] or {}).get("emotion6"))] for r in table["rows"]]
    lines = _intro(table, "Table 3: head depth (test accuracy, %)")
    lines += _grid(["Head", "Head parameters", "Distill head", "EmoVLM-KD", "Paper FI", "Paper Emotion6"], rows)
    lines += _outro(table, ("distill", "emovlm_kd"))
    lines.append("Paper: EmoVLM-KD accuracy with Qwen2-VL-7B (Table 3); '-' where the paper has no such head.")
    return "\n".join(lines) + "\n"


def render_alpha(table):
    tau = table["settings"]["tau"]
    rows = [[f"{r['alpha']:g}" + (" (run)" if r["run_setting"] else ""), _pct(r["accuracy"]["distill"]),
             _pct(r["accuracy"]["emovlm_kd"]), f"{r['kl_teacher_head']:.4f}", f"{r['kl_teacher_head_at_tau']:.4f}"]
            for r in table["rows"]]
    lines = _intro(table, "Figure 3: alpha (test accuracy, %, and KL(teacher || head))")
    lines += _grid(["alpha", "Distill head", "EmoVLM-KD", "KL at T=1", f"KL at T={tau:g}"], rows)
    lines += _outro(table, ("distill", "emovlm_kd"))
    lines.append("KL: mean over test images of KL(p_teacher || p_head) at temperature T (no T^2 factor).")
    lines.append(f"Paper: {table['paper']}.")
    return "\n".join(lines) + "\n"


def render_gate(table):
    rows = [[GATE_TITLES[r["gate_type"]] + (" (run)" if r["run_setting"] else ""), f"{r['gate_parameters']:,}",
             _pct(r["accuracy"]["emovlm_kd"]), _num(r["paper"]["fi"])] for r in table["rows"]]
    lines = _intro(table, "Table 4: gate type (EmoVLM-KD test accuracy, %)")
    lines.insert(-1, f"Head: the run's trained head, `{table['settings']['head']}`.")
    lines += _grid(["Gate", "Gate parameters", "EmoVLM-KD", "Paper FI"], rows)
    lines += _outro(table, ("emovlm_kd",))
    lines.append("Paper: EmoVLM-KD accuracy on FI with Qwen2-VL-7B (Table 4).")
    return "\n".join(lines) + "\n"


RENDERERS = {"head_depth": render_head_depth, "alpha": render_alpha, "gate": render_gate}
