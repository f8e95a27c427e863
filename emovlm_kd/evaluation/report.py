"""Pure aggregation of per-sample predictions into the benchmark report (no model needed).

Conventions: class ids index `labels` (the dataset's order); a prediction of -1 means "no answer" (a generated VLM
answer that names no label) and is never correct. Accuracies and F1 are fractions in [0, 1] in the JSON report
and percentages in the Markdown.
"""

import functools
import json

import numpy as np

from emovlm_kd.metrics import load_metric
from emovlm_kd.evaluation.paper import TABLE2_FI
from emovlm_kd.evaluation.stats import bootstrap_ci, mcnemar
from emovlm_kd.folders import atomic_write  # the writer of every report file (all or nothing)

PARTS = ("vlm", "distill", "teacher", "emovlm_kd")  # the order of the paper's Table 2
PART_TITLES = {"vlm": "VLM", "distill": "Distill head", "emovlm_kd": "EmoVLM-KD", "teacher": "ViT teacher"}
COMPLEMENTARITY_PAIRS = (("vlm", "distill"), ("vlm", "teacher"))
GATE_TESTS = ("vlm", "distill")  # McNemar between each branch and the gate (EmoVLM-KD), on the same images
CI = {"confidence": 0.95, "resamples": 10000, "seed": 0}  # the bootstrap of every reported accuracy
NO_ANSWER = -1


@functools.cache
def _metric(name):
    return load_metric(name)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def complementarity(correct_a, correct_b, name_a="vlm", name_b="distill"):
    """The paper's Figure 1 counts for two parts: `both_correct`, `<a>_only`, `<b>_only`, `neither` (sum = N)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"correctness vectors differ in shape: {a.shape} vs {b.shape}")
    return {
        "both_correct": int((a & b).sum()),
        f"{name_a}_only": int((a & ~b).sum()),
        f"{name_b}_only": int((~a & b).sum()),
        "neither": int((~a & ~b).sum()),
    }


def correctness(predictions, references):
    """`{part: (N,) bool}`: whether each part got each image right (no answer, -1, is wrong). The per-image vector
    that `stats.bootstrap_ci` and `stats.mcnemar` take; across two runs, pair the `predictions.jsonl` records by
    image id with `stats.paired_correctness`."""
    references = np.asarray(references, dtype=np.int64)
    return {part: np.asarray(pred, dtype=np.int64) == references for part, pred in predictions.items()}


def significance(correct, ci=CI):
    """`(accuracy_ci, paired_tests)` of per-part correctness vectors: `{part: [low, high]}`, the percentile
    bootstrap interval of each accuracy over the images (fractions, like the accuracies), and `{"<branch>_vs_emovlm_kd":
    McNemar's test as a dict}` for each branch in `GATE_TESTS` beside the gate."""
    intervals = {}
    for part, right in correct.items():
        low, high = bootstrap_ci(right, confidence=ci["confidence"], resamples=ci["resamples"], seed=ci["seed"])
        intervals[part] = [round(low / 100, 6), round(high / 100, 6)]
    tests = {f"{branch}_vs_emovlm_kd": mcnemar(correct[branch], correct["emovlm_kd"]).as_dict()
             for branch in GATE_TESTS if branch in correct and "emovlm_kd" in correct}
    return intervals, tests


def gate_decisions(vlm_pred, distill_pred, final_pred, references):
    """Which branch the gate followed where the VLM and the head disagree, and who was right there."""
    vlm, head, final, refs = (np.asarray(x, dtype=np.int64) for x in (vlm_pred, distill_pred, final_pred, references))
    disagree = vlm != head
    agree = ~disagree
    return {
        "disagreements": int(disagree.sum()),
        "followed_vlm": int((disagree & (final == vlm)).sum()),
        "followed_distill": int((disagree & (final == head)).sum()),
        "followed_neither": int((disagree & (final != vlm) & (final != head)).sum()),
        "vlm_correct": int((disagree & (vlm == refs)).sum()),
        "distill_correct": int((disagree & (head == refs)).sum()),
        "gate_correct": int((disagree & (final == refs)).sum()),
        "agreements": int(agree.sum()),
        "overrode_agreement": int((agree & (final != vlm)).sum()),
    }


def part_metrics(predictions, references, num_classes, probabilities=None, n_bins=15):
    """accuracy, macro_f1, per_class_accuracy, confusion_matrix (and ece with probabilities), via the metric modules.

    Macro-F1 averages over the classes present in the references or the (answered) predictions, as scikit-learn
    does; "no answer" (-1) counts as wrong for every metric and is left out of the confusion matrix.
    """
    predictions = np.asarray(predictions, dtype=np.int64)
    references = np.asarray(references, dtype=np.int64)
    answered = predictions != NO_ANSWER
    f1_labels = sorted(set(references.tolist()) | set(predictions[answered].tolist()))
    result = {
        "accuracy": _metric("accuracy").compute(predictions=predictions, references=references)["accuracy"],
        "macro_f1": _metric("macro_f1").compute(predictions=predictions, references=references, labels=f1_labels)[
            "macro_f1"
        ],
        "per_class_accuracy": _metric("per_class_accuracy").compute(
            predictions=predictions, references=references, num_classes=num_classes
        )["per_class_accuracy"],
        "confusion_matrix": _metric("confusion_matrix").compute(
            predictions=predictions[answered], references=references[answered], num_classes=num_classes
        )["confusion_matrix"],
        "no_answer": int((~answered).sum()),
    }
    if probabilities is not None:
        result["ece"] = _metric("ece").compute(
            probabilities=np.asarray(probabilities, dtype=np.float64), references=references, n_bins=n_bins
        )["ece"]
    return result


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


def calibration(references, probabilities, uncalibrated_probabilities, temperatures, n_bins=15):
    """ECE before and after temperature scaling, per calibrated part: `{"temperature": {part: T}, "ece_before":
    {part: ECE of the uncalibrated probabilities}, "ece_after": {part: ECE of the model's outputs}}`."""
    parts = [p for p in PARTS if p in uncalibrated_probabilities and p in probabilities]

    def ece(probs):
        return _metric("ece").compute(probabilities=np.asarray(probs, dtype=np.float64), references=references,
                                      n_bins=n_bins)["ece"]

    return {
        "temperature": {part: float(temperatures[part]) for part in parts},
        "ece_before": {part: ece(uncalibrated_probabilities[part]) for part in parts},
        "ece_after": {part: ece(probabilities[part]) for part in parts},
    }


def build_report(labels, references, predictions, probabilities=None, *, meta=None, parameters=None, n_bins=15,
                 temperatures=None, uncalibrated_probabilities=None):
    """The report dict from per-sample arrays.

    labels: class names in id order. references: (N,) true ids. predictions: {part: (N,) ids, -1 = no answer} for
    parts among `PARTS`. probabilities: {part: (N, C)} for the parts whose calibration is measured (ECE).
    temperatures, uncalibrated_probabilities: {part: T}, {part: (N, C)} for the parts the model calibrates by
    temperature scaling; `report["calibration"]` then holds their ECE before and after (`report["ece"]` is after:
    the model's outputs). The final answer is `emovlm_kd` when present, else `vlm` (the zero-shot baseline).
    """
    labels = [str(label) for label in labels]
    references = np.asarray(references, dtype=np.int64)
    probabilities = probabilities or {}
    parts = [p for p in PARTS if p in predictions]
    unknown = set(predictions) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; expected some of {PARTS}")
    if not parts:
        raise ValueError("no predictions to report")
    final = "emovlm_kd" if "emovlm_kd" in predictions else parts[0]
    num = int(references.shape[0])
    metrics = {
        part: part_metrics(predictions[part], references, len(labels), probabilities.get(part), n_bins=n_bins)
        for part in parts
    }
    report = dict(meta or {})
    report.update(
        {
            "num_samples": num,
            "labels": labels,
            "support": np.bincount(references, minlength=len(labels)).tolist(),
            "final": final,
            "zero_shot": "emovlm_kd" not in predictions,
            "accuracy": {part: metrics[part]["accuracy"] for part in parts},
            "macro_f1": {part: metrics[part]["macro_f1"] for part in parts},
            "ece": {part: metrics[part]["ece"] for part in parts if "ece" in metrics[part]},
            "ece_n_bins": n_bins,
            "per_class_accuracy": {
                part: dict(zip(labels, metrics[part]["per_class_accuracy"])) for part in parts
            },
            "no_answer": {part: metrics[part]["no_answer"] for part in parts if metrics[part]["no_answer"]},
            "complementarity": {},
            "confusion_matrix": {part: metrics[part]["confusion_matrix"] for part in parts},
        }
    )
    correct = correctness({part: predictions[part] for part in parts}, references)
    report["accuracy_ci"], report["mcnemar"] = significance(correct)
    report["accuracy_ci_method"] = {"method": "percentile bootstrap over the images", **CI}
    for a, b in COMPLEMENTARITY_PAIRS:
        if a in correct and b in correct:
            report["complementarity"][f"{a}_vs_{b}"] = complementarity(correct[a], correct[b], a, b)
    if {"vlm", "distill", "emovlm_kd"} <= set(parts):
        report["gate"] = gate_decisions(
            predictions["vlm"], predictions["distill"], predictions["emovlm_kd"], references
        )
    if parameters:
        report["parameters"] = {part: int(parameters[part]) for part in PARTS if part in parameters}
    if uncalibrated_probabilities:
        report["calibration"] = calibration(references, probabilities, uncalibrated_probabilities, temperatures,
                                            n_bins=n_bins)
    return report


def prediction_records(labels, references, predictions, probabilities=None, ids=None, paths=None, extra=None):
    """One JSON-ready dict per sample: id, path, true label and each part's predicted label (None = no answer),
    with the predicted label's probability for the parts in `probabilities`."""
    probabilities = probabilities or {}
    parts = [p for p in PARTS if p in predictions]
    records = []
    for i, ref in enumerate(np.asarray(references).tolist()):
        record = {"index": i, "id": str(ids[i]) if ids is not None else str(i)}
        if paths is not None and paths[i]:
            record["path"] = str(paths[i])
        record["label"] = labels[ref]
        record["predictions"] = {}
        confidence = {}
        for part in parts:
            pred = int(predictions[part][i])
            record["predictions"][part] = labels[pred] if pred != NO_ANSWER else None
            if part in probabilities and pred != NO_ANSWER:
                confidence[part] = round(float(probabilities[part][i][pred]), 6)
        if confidence:
            record["confidence"] = confidence
        for key, values in (extra or {}).items():
            if values is not None and values[i] is not None:
                record[key] = values[i]
        records.append(record)
    return records


def accuracies_from_records(records):
    """{part: accuracy} recomputed from prediction records (e.g. the lines of `predictions.jsonl`)."""
    records = list(records)
    if not records:
        raise ValueError("no records")
    parts = list(records[0]["predictions"])
    return {part: sum(r["predictions"][part] == r["label"] for r in records) / len(records) for part in parts}


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def write_json(path, data):
    return atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n"))


def write_jsonl(path, records):
    return atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_text(path, text):
    return atomic_write(path, lambda f: f.write(text))


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def _pct(value, digits=2):
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_table(report):
    """A short plain-text table of the accuracies (what the command prints at the end)."""
    intervals = report.get("accuracy_ci", {})
    rows = [(PART_TITLES[p], _pct(report["accuracy"][p]), _ci(intervals.get(p)), _pct(report["macro_f1"][p]))
            for p in report["accuracy"]]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'part':<{width}}  accuracy  {'95 % CI':<16}  macro-F1"]
    lines += [f"{name:<{width}}  {acc:>8}  {ci:<16}  {f1:>8}" for name, acc, ci, f1 in rows]
    tests = report.get("mcnemar", {})
    if tests:
        lines.append("McNemar vs EmoVLM-KD: " + "; ".join(
            f"{PART_TITLES[pair.split('_vs_')[0]]} p = {p_text(test['p_value'])}" for pair, test in tests.items()))
    return "\n".join(lines)


def _ci(interval):
    return "-" if interval is None else f"[{_pct(interval[0])}, {_pct(interval[1])}]"


def percent_ci_text(value, interval):
    """An accuracy (a fraction) and its 95 % interval as the tables write them: "78.12 [70.31, 85.94]"."""
    return f"{_pct(value)} {_ci(interval)}"


def p_text(value):
    """A p-value as the tables write it: 2 significant digits below 0.001, else 3 decimals."""
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def render_markdown(report, images=("confusion_matrix.png", "complementarity.png")):
    """`report.md`: components (Table 2), complementarity (Figure 1), the gate, per-class accuracy, confusion."""
    out = _overview(report)
    out += _components_section(report)
    if report.get("mcnemar"):
        out += _paired_tests_section(report)
    if report.get("calibration", {}).get("temperature"):
        out += _calibration_section(report)
    if report["complementarity"]:
        out += _complementarity_section(report, images)
    if report.get("gate"):
        out += _gate_section(report)
    out += _per_class_section(report)
    out += _confusion_section(report, images)
    return "\n".join(out)


def _overview(report):
    title = report.get("dataset") or "dataset"
    out = [f"# EmoVLM-KD evaluation: {title}", ""]
    facts = [("model", report.get("model")), ("split", report.get("split")), ("samples", report["num_samples"]),
             ("VLM mode", report.get("vlm_mode")), ("teacher", report.get("teacher"))]
    out += [f"- {key}: `{value}`" for key, value in facts if value is not None]
    if report.get("zero_shot"):
        out.append("- zero-shot baseline: the VLM branch alone (no trained head or gate)")
    return out + [""]


def is_the_papers_fi_test(report):
    """Whether the paper's Table 2 (FI) numbers may stand beside this report's: the dataset was read in the FI
    layout, on its test split, in full (no `--limit`)."""
    return report.get("dataset_format") == "fi" and report.get("split") == "test" and not report.get("limit")


def _components_section(report):
    out = ["## Components (the paper's Table 2)", ""]
    params = report.get("parameters", {})
    paper = is_the_papers_fi_test(report)
    intervals = report.get("accuracy_ci", {})
    header = ["part", "parameters", "accuracy (%)", "95 % CI", "macro-F1 (%)", f"ECE ({report['ece_n_bins']} bins)"]
    header += ["paper, FI (%)"] if paper else []
    rows = []
    for part in report["accuracy"]:
        ece = report["ece"].get(part)
        rows.append((PART_TITLES[part], f"{params[part]:,}" if part in params else "-", _pct(report["accuracy"][part]),
                     _ci(intervals.get(part)), _pct(report["macro_f1"][part]), "-" if ece is None else f"{ece:.4f}",
                     *([TABLE2_FI[part][1]] if paper else [])))
    out += [_table(header, rows), ""]
    if intervals:
        method = report.get("accuracy_ci_method", CI)
        out += [f"95 % CI: percentile bootstrap of the accuracy over the {report['num_samples']} images "
                f"({method['resamples']} resamples, seed {method['seed']}).", ""]
    if report.get("no_answer"):
        missing = ", ".join(f"{PART_TITLES[p]} {n}" for p, n in report["no_answer"].items())
        out += [f"Answers that named no label (counted as wrong): {missing}.", ""]
    return out


def _paired_tests_section(report):
    """McNemar's test of each branch against the gate on the same images."""
    rows = []
    for pair, test in report["mcnemar"].items():
        branch = PART_TITLES[pair.split("_vs_")[0]]
        rows.append((f"{branch} vs EmoVLM-KD", test["b"], test["c"],
                     "exact binomial" if test["method"] == "exact" else f"chi-square {test['statistic']:.3f}",
                     p_text(test["p_value"])))
    explanation = ("McNemar's test on the images where exactly one of the two is right (the first: only the branch; "
                   "the second: only EmoVLM-KD); exact binomial below 25 such images, else chi-square with continuity "
                   "correction. A small p means the accuracies differ by more than chance on these images.")
    header = ["pair", "branch only right", "EmoVLM-KD only right", "test", "p (two-sided)"]
    return ["## Paired tests (McNemar)", "", explanation, "", _table(header, rows), ""]


def _calibration_section(report):
    calib = report["calibration"]
    rows = [(PART_TITLES[part], f"{calib['temperature'][part]:.4f}", f"{calib['ece_before'][part]:.4f}",
             f"{calib['ece_after'][part]:.4f}") for part in calib["temperature"]]
    explanation = ("Temperature scaling fitted on the val split after training: the logits are divided by T "
                   "(accuracy unchanged). ECE before = of the logits times T.")
    header = ["part", "temperature", f"ECE before ({report['ece_n_bins']} bins)", "ECE after"]
    return ["## Calibration", "", explanation, "", _table(header, rows), ""]


def _complementarity_section(report, images):
    num = report["num_samples"]
    explanation = ("Share of samples that both parts, only one, or neither classify correctly; "
                   "`either` is the accuracy of a perfect chooser between the two.")
    out = ["## Complementarity (the paper's Figure 1)", "", explanation, ""]
    rows = []
    for pair, counts in report["complementarity"].items():
        a, b = pair.split("_vs_")
        cells = [counts["both_correct"], counts[f"{a}_only"], counts[f"{b}_only"], counts["neither"]]
        rows.append([f"{PART_TITLES[a]} vs {PART_TITLES[b]}"] + [f"{c} ({_pct(c / num, 1)}%)" for c in cells]
                    + [_pct(1 - counts["neither"] / num)])
    header = ["pair", "both correct", "first only", "second only", "neither", "either (%)"]
    out += [_table(header, rows), ""]
    if "complementarity.png" in images:
        out += ["![complementarity](complementarity.png)", ""]
    return out


def _gate_section(report):
    gate, num = report["gate"], report["num_samples"]
    d = gate["disagreements"]
    rows = [("disagreements", d, _pct(d / num, 1) + "% of samples"),
            ("gate followed the VLM", gate["followed_vlm"], _share(gate["followed_vlm"], d)),
            ("gate followed the head", gate["followed_distill"], _share(gate["followed_distill"], d)),
            ("gate chose a third label", gate["followed_neither"], _share(gate["followed_neither"], d)),
            ("VLM right", gate["vlm_correct"], _share(gate["vlm_correct"], d)),
            ("head right", gate["distill_correct"], _share(gate["distill_correct"], d)),
            ("gate right", gate["gate_correct"], _share(gate["gate_correct"], d)),
            ("gate overrode an agreement", gate["overrode_agreement"], _share(gate["overrode_agreement"],
                                                                              gate["agreements"]))]
    return ["## The gate where the VLM and the head disagree", "", _table(["", "count", "share"], rows), ""]


def _per_class_section(report):
    parts = list(report["accuracy"])
    rows = [[label, report["support"][i]] + [_pct(report["per_class_accuracy"][p][label], 1) for p in parts]
            for i, label in enumerate(report["labels"])]
    return ["## Per-class accuracy (%)", "", _table(["label", "support"] + [PART_TITLES[p] for p in parts], rows), ""]


def _confusion_section(report, images):
    labels, final = report["labels"], report["final"]
    matrix = report["confusion_matrix"][final]
    out = [f"## Confusion matrix of {PART_TITLES[final]} (rows: true label, columns: predicted)", ""]
    out += [_table(["true \\ predicted"] + labels, [[label] + row for label, row in zip(labels, matrix)]), ""]
    if "confusion_matrix.png" in images:
        out += ["![confusion matrices](confusion_matrix.png)", ""]
    return out


def _share(count, total):
    return f"{_pct(count / total, 1)}%" if total else "-"


__all__ = [
    "PARTS",
    "accuracies_from_records",
    "accuracy_table",
    "atomic_write",
    "build_report",
    "calibration",
    "complementarity",
    "correctness",
    "gate_decisions",
    "part_metrics",
    "prediction_records",
    "render_markdown",
    "significance",
    "write_json",
    "write_jsonl",
    "write_text",
]
