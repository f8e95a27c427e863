"""The paper's Table 1: one model (or one per dataset) evaluated on the five test sets that are present, with the
paper's rows beside it.

    from emovlm_kd.evaluation.table1 import find_datasets, run_table1
    found, missing = find_datasets("data")
    table = run_table1(found, {name: "runs/fi/model" for name in found}, "results/table1", skipped=missing)

Each dataset's full report goes to `<output_dir>/<name>/`; the table to `table1.json` and `table1.md`.
"""

import gc
import json
import logging
import re
from pathlib import Path

from emovlm_kd.errors import UsageError
from emovlm_kd.evaluation.paper import TABLE1, TABLE1_DATASETS, TABLE1_TITLES
from emovlm_kd.evaluation.report import p_text, percent_ci_text, write_json, write_text
from emovlm_kd.evaluation.runner import (
    LabelMismatchError,
    ModelLoadError,
    bind_labels,
    dataset_label_names,
    evaluate_model,
    load_split,
)

logger = logging.getLogger(__name__)

ALIASES = {
    "emoset": ("emoset", "emoset118k"),
    "fi": ("fi",),
    "emotion6": ("emotion6",),
    "flickr": ("flickr",),
    "instagram": ("instagram",),
}


def _key(name):
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_datasets(root=None, overrides=None):
    """`(found, missing)`: `{name: path}` for the Table 1 datasets present (in Table 1 order) and `{name: reason}`.

    Under `root`, a dataset is a folder or file whose name (or stem) matches it case-insensitively, ignoring
    punctuation (`EmoSet-118K` is emoset); folders win over files. `overrides` (`{name: path}`) come first.
    """
    overrides = dict(overrides or {})
    candidates = {}
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"--data-root {root} is not a folder")
        for child in sorted(root.iterdir(), key=lambda p: (not p.is_dir(), p.name)):
            key = _key(child.name if child.is_dir() else child.stem)
            for name, aliases in ALIASES.items():
                if key in aliases:
                    candidates.setdefault(name, child)
    found, missing = {}, {}
    for name in TABLE1_DATASETS:
        if name in overrides:
            found[name] = Path(overrides[name])
        elif name in candidates:
            found[name] = candidates[name]
        else:
            missing[name] = f"not found under {root}" if root is not None else "not given"
    return found, missing


class _OneModel:
    """Keeps one model in memory at a time: `get(model_id)` loads it unless it is the one already loaded."""

    def __init__(self, device, dtype, quantize=None):
        self.device, self.dtype, self.quantize = device, dtype, quantize
        self.model_id = self.loaded = None

    def get(self, model_id):
        from emovlm_kd.hub import load_model
        from emovlm_kd.runtime import resolve_device

        if model_id != self.model_id:
            self.loaded = self.model_id = None
            gc.collect()
            try:
                self.loaded = load_model(model_id, device=resolve_device(self.device), dtype=self.dtype, bare_vlm=True,
                                         quantize=self.quantize)
            except (OSError, ValueError) as error:
                raise ModelLoadError(f"cannot load {model_id!r}: {error}") from error
            self.model_id = model_id
        return self.loaded


class _Skip(Exception):
    """A dataset left out of the table; the message says why."""


def run_table1(datasets, models, output_dir, *, split="test", limit=None, batch_size=8, vlm_mode=None, device=None,
               dtype=None, skipped=None, splits=None, protocol=None, quantize=None, num_workers=None):
    """Evaluate `models[name]` on each of `datasets` (`{name: path}`), writing `<output_dir>/<name>/` reports, and
    return the Table 1 result (also written to `table1.json` and `table1.md`). `models` maps dataset -> model id;
    `skipped` (`{name: reason}`) lists datasets left out beforehand. A model that does not load raises
    `ModelLoadError`; a dataset that does not load or whose labels differ from the model's is skipped. Each
    dataset is split by `splits[name]` (a split file) or else by the model folder's split file, as
    `emovlm-kd evaluate` does. `protocol` (paper or official) is how each bundle's VLM branch answers
    (`emovlm_kd.protocol.apply_to_model`); None keeps the bundle's own. `quantize` (4 or 8): each model's language
    model loaded in 4-/8-bit (`hub.load_model`). `num_workers`: the data path's worker processes
    (`runner.predict_split`; default: the available cores less one).
    """
    output_dir = Path(output_dir)
    results, skipped = {}, dict(skipped or {})
    cache = _OneModel(device, dtype, quantize)
    options = {"split": split, "limit": limit, "batch_size": batch_size, "vlm_mode": vlm_mode, "protocol": protocol,
               "num_workers": num_workers}
    for name, path in datasets.items():
        try:
            results[name] = _evaluate_dataset(name, path, models.get(name), cache, output_dir,
                                              splits=(splits or {}).get(name), **options)
        except _Skip as reason:
            skipped[name] = str(reason)
    table = {
        "split": split,
        "limit": limit,
        "this_model": {name: round(100 * r["accuracy"][r["final"]], 2) for name, r in results.items()},
        "datasets": results,
        "skipped": skipped,
        "paper": TABLE1,
        **({"protocol": protocol} if protocol else {}),
    }
    write_json(output_dir / "table1.json", table)
    write_text(output_dir / "table1.md", render_table1_markdown(table))
    return table


def _evaluate_dataset(name, path, model_id, cache, output_dir, *, split, limit, batch_size, vlm_mode, splits=None,
                      protocol=None, num_workers=None):
    """One dataset's Table 1 entry (its report written to `<output_dir>/<name>/`), or `_Skip` with the reason."""
    if model_id is None:
        logger.warning("skipping %s: %s", name, "no --model for it")
        raise _Skip("no --model for it")
    try:
        dataset = load_split(path, split, limit, splits=splits, model=model_id)
    except UsageError as error:  # a dataset that does not load or lacks the split: skip it, keep the others
        logger.warning("skipping %s (%s): %s", name, path, error)
        raise _Skip(str(error)) from None
    base, processor, zero_shot = cache.get(model_id)
    try:
        model, perm = bind_labels(base, processor, zero_shot, dataset_label_names(dataset))
    except LabelMismatchError as error:
        logger.warning("skipping %s: %s", name, error)
        raise _Skip(str(error)) from None
    if not zero_shot:
        from emovlm_kd.protocol import apply_to_model

        apply_to_model(model, processor, protocol)
    logger.info("Table 1: %s (%s, %d samples) with %s", name, path, len(dataset), model_id)
    meta = {"model": str(model_id), "dataset": str(path), "split": split, "limit": limit,
            **({"protocol": protocol} if protocol else {})}
    report = evaluate_model(model, processor, dataset, output_dir / name, zero_shot=zero_shot, label_perm=perm,
                            batch_size=batch_size, vlm_mode=vlm_mode, meta=meta, desc=name,
                            num_workers=num_workers)
    return {
        "path": str(path),
        "model": str(model_id),
        "zero_shot": report["zero_shot"],
        "num_samples": report["num_samples"],
        "final": report["final"],
        "accuracy": report["accuracy"],
        "accuracy_ci": report["accuracy_ci"],
        "mcnemar": report["mcnemar"],
        "macro_f1": report["macro_f1"],
        "report": f"{name}/report.json",
    }


PAPER_ROW = {False: "EmoVLM-KD", True: "Qwen2-VL-7B zero-shot"}  # the paper's row this model's final answer stands by


def _mcnemar_text(found):
    """A McNemar cell: "b/c, p = ..." (images only the first got right / only the second; "of N" where the pairing
    counted the images), "not paired: why", or "-" where no test was made."""
    if found is None:
        return "-"
    if "not_paired" in found:
        return f"not paired: {found['not_paired']}"
    images = f" of {found['images']}" if "images" in found else ""
    return f"{found['b']}/{found['c']}{images}, p = {p_text(found['p_value'])}"


def _per_dataset_lines(results, limited):
    """Per dataset: each part's accuracy with its 95 % bootstrap interval, the paper's number for the same model
    kind, and McNemar's test of each branch against the gate on the same images."""

    def cell(result, part):
        if part not in result["accuracy"]:
            return "-"
        return percent_ci_text(result["accuracy"][part], result["accuracy_ci"][part])

    def test(result, branch):
        return _mcnemar_text(result["mcnemar"].get(f"{branch}_vs_emovlm_kd"))

    header = ["dataset", "images", "this model (%) [95 % CI]", "paper (%)", "VLM branch", "distill head",
              "McNemar VLM vs gate", "McNemar head vs gate"]
    lines = ["## This model per dataset: 95 % confidence intervals and paired tests", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        paper = TABLE1[PAPER_ROW[r["zero_shot"]]].get(name)
        cells = [TABLE1_TITLES[name], r["num_samples"], cell(r, r["final"]), "-" if paper is None else f"{paper:.2f}",
                 cell(r, "vlm") if not r["zero_shot"] else "-", cell(r, "distill"), test(r, "vlm"),
                 test(r, "distill")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Intervals: percentile bootstrap of the accuracy over the test images (10000 resamples, seed 0). "
              "McNemar: images only the branch got right / only the gate got right, and the two-sided p (exact "
              "binomial below 25 such images, else chi-square with continuity correction). Paper: its EmoVLM-KD "
              "row (its Qwen2-VL-7B zero-shot row for a zero-shot model)"
              + (", measured on its full test sets, not on a sample (`--limit`)." if limited else "."), ""]
    return lines


def render_table1_markdown(table):
    """Table 1 (accuracy, %): the paper's rows, then this model's (and its branches' when it is a bundle)."""
    header = ["model"] + [TABLE1_TITLES[name] for name in TABLE1_DATASETS]
    lines = ["# Table 1: accuracy (%)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(title, values):
        cells = ["-" if values.get(name) is None else f"{values[name]:.2f}" for name in TABLE1_DATASETS]
        lines.append("| " + " | ".join([title] + cells) + " |")

    for title, values in TABLE1.items():
        row(f"{title} (paper)", values)
    results = table["datasets"]
    zero_shot = bool(results) and all(r["zero_shot"] for r in results.values())
    row("**this model (zero-shot VLM)**" if zero_shot else "**this model**", table["this_model"])
    for part, title in (("vlm", "this model: VLM branch"), ("distill", "this model: distill head")):
        values = {n: 100 * r["accuracy"][part] for n, r in results.items() if not r["zero_shot"]}
        if values:
            row(title, values)
    lines.append("")
    if results:
        lines += _per_dataset_lines(results, limited=bool(table["limit"]))
    models = sorted({r["model"] for r in results.values()})
    if models:
        lines.append(f"Split `{table['split']}`" + (f", first {table['limit']} samples" if table["limit"] else "")
                     + "; model(s): " + ", ".join(f"`{m}`" for m in models) + ".")
    if results:
        lines.append("Reports: " + ", ".join(f"[{TABLE1_TITLES[n]}]({n}/report.md)" for n in results) + ".")
    if table["skipped"]:
        skipped = "; ".join(f"{TABLE1_TITLES[n]} ({why})" for n, why in table["skipped"].items())
        lines.append(f"Skipped: {skipped}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# `--protocol both`: the two protocols side by side
# ---------------------------------------------------------------------------------------------------------------


def compare_protocols(output_dir, tables):
    """`{dataset: entry}` for `tables` = {"paper": table, "official": table} (each `run_table1`'s, its reports under
    `<output_dir>/<protocol>/<dataset>/`): per dataset both protocols' final accuracy with its 95 % bootstrap
    interval, the paper's published number, and McNemar's test between the two protocols' final predictions on
    the same images (`stats.paired_correctness`); where the two runs' test images differ (e.g. different splits),
    no test and the reason."""
    from emovlm_kd.evaluation.stats import mcnemar, paired_correctness

    def read_jsonl(path):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    output_dir = Path(output_dir)
    rows = {}
    for name in TABLE1_DATASETS:
        results = {p: t["datasets"].get(name) for p, t in tables.items()}
        if not any(results.values()):
            continue
        entry = {"paper_published": TABLE1["EmoVLM-KD"].get(name)}
        for protocol, result in results.items():
            if result is not None:
                low, high = result["accuracy_ci"][result["final"]]
                entry[protocol] = {"accuracy": round(100 * result["accuracy"][result["final"]], 2),
                                   "ci95": [round(100 * low, 2), round(100 * high, 2)],
                                   "model": result["model"], "num_samples": result["num_samples"]}
        if all(results.values()):
            records = {p: read_jsonl(output_dir / p / r["report"].replace("report.json", "predictions.jsonl"))
                       for p, r in results.items()}
            finals = {p: r["final"] for p, r in results.items()}
            try:
                a, b, ids = paired_correctness(records["paper"], records["official"], finals["paper"],
                                               finals["official"])
            except ValueError as error:
                entry["mcnemar"] = {"not_paired": str(error)}
            else:
                entry["mcnemar"] = {**mcnemar(a, b).as_dict(), "images": len(ids)}
        rows[name] = entry
    return rows


def render_protocols_markdown(rows, limited=False):
    """The `--protocol both` table: per dataset the paper protocol, the official protocol, the published number and
    the paired test."""
    header = ["dataset", "protocol paper (%) [95 % CI]", "protocol official (%) [95 % CI]", "paper, published (%)",
              "McNemar paper vs official"]
    lines = ["# Table 1 under both protocols: accuracy (%)", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]

    def cell(entry):
        if entry is None:
            return "-"
        low, high = entry["ci95"]
        return f"{entry['accuracy']:.2f} [{low:.2f}, {high:.2f}]"

    for name, entry in rows.items():
        published = entry["paper_published"]
        lines.append("| " + " | ".join([TABLE1_TITLES[name], cell(entry.get("paper")), cell(entry.get("official")),
                                         "-" if published is None else f"{published:.2f}",
                                         _mcnemar_text(entry.get("mcnemar"))]) + " |")
    lines += ["", "paper: the paper's text and this project's defaults (label scores); official: what the authors' "
              "code ran (github sange1104/EmoVLM-KD; one answer sampled at T 0.8, seeded, parsed as its "
              "train_gate.py:83-93; README: What differs from the paper and its code). Intervals: percentile "
              "bootstrap over the test images (10000 resamples, seed 0). McNemar: images only the paper protocol got "
              "right / only the official one did, two-sided p (exact below 25 such images, else chi-square with "
              "continuity correction). Published: the paper's EmoVLM-KD row"
              + (", on its full test sets, not on a sample (`--limit`)." if limited else "."), ""]
    return "\n".join(lines) + "\n"
