"""The paper's Table 1: one model (or one per dataset) evaluated on the five test sets that are present, with the
paper's rows beside it.

    from emovlm_kd.evaluation.table1 import find_datasets, run_table1
    found, missing = find_datasets("data")
    table = run_table1(found, {name: "runs/fi/model" for name in found}, "results/table1", skipped=missing)

Each dataset's full report goes to `<output_dir>/<name>/`; the table to `table1.json` and `table1.md`.
"""

import gc
import logging
import re
from pathlib import Path

from emovlm_kd.errors import UsageError
from emovlm_kd.evaluation.paper import TABLE1, TABLE1_DATASETS, TABLE1_TITLES
from emovlm_kd.evaluation.report import write_json, write_text
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

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.model_id = self.loaded = None

    def get(self, model_id):
        from emovlm_kd.hub import load_model
        from emovlm_kd.runtime import resolve_device

        if model_id != self.model_id:
            self.loaded = self.model_id = None
            gc.collect()
            try:
                self.loaded = load_model(model_id, device=resolve_device(self.device), dtype=self.dtype, bare_vlm=True)
            except (OSError, ValueError) as error:
                raise ModelLoadError(f"cannot load {model_id!r}: {error}") from error
            self.model_id = model_id
        return self.loaded


class _Skip(Exception):
    """A dataset left out of the table; the message says why."""


def run_table1(datasets, models, output_dir, *, split="test", limit=None, batch_size=8, vlm_mode=None, device=None,
               dtype=None, skipped=None, splits=None):
    """Evaluate `models[name]` on each of `datasets` (`{name: path}`), writing `<output_dir>/<name>/` reports, and
    return the Table 1 result (also written to `table1.json` and `table1.md`). `models` maps dataset -> model id;
    `skipped` (`{name: reason}`) lists datasets left out beforehand. A model that does not load raises
    `ModelLoadError`; a dataset that does not load or whose labels differ from the model's is skipped. Each
    dataset is split by `splits[name]` (a split file) or else by the model folder's split file, as
    `emovlm-kd evaluate` does.
    """
    output_dir = Path(output_dir)
    results, skipped = {}, dict(skipped or {})
    cache = _OneModel(device, dtype)
    options = {"split": split, "limit": limit, "batch_size": batch_size, "vlm_mode": vlm_mode}
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
    }
    write_json(output_dir / "table1.json", table)
    write_text(output_dir / "table1.md", render_table1_markdown(table))
    return table


def _evaluate_dataset(name, path, model_id, cache, output_dir, *, split, limit, batch_size, vlm_mode, splits=None):
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
    logger.info("Table 1: %s (%s, %d samples) with %s", name, path, len(dataset), model_id)
    meta = {"model": str(model_id), "dataset": str(path), "split": split, "limit": limit}
    report = evaluate_model(model, processor, dataset, output_dir / name, zero_shot=zero_shot, label_perm=perm,
                            batch_size=batch_size, vlm_mode=vlm_mode, meta=meta, desc=name)
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


def _per_dataset_lines(results, limited):
    """Per dataset: each part's accuracy with its 95 % bootstrap interval, the paper's number for the same model
    kind, and McNemar's test of each branch against the gate on the same images."""

    def cell(result, part):
        if part not in result["accuracy"]:
            return "-"
        low, high = result["accuracy_ci"][part]
        return f"{100 * result['accuracy'][part]:.2f} [{100 * low:.2f}, {100 * high:.2f}]"

    def test(result, branch):
        found = result["mcnemar"].get(f"{branch}_vs_emovlm_kd")
        if found is None:
            return "-"
        p = found["p_value"]
        return f"{found['b']}/{found['c']}, p = {p:.2g}" if p < 0.001 else f"{found['b']}/{found['c']}, p = {p:.3f}"

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
