"""`emovlm-kd table1`: the paper's Table 1 row for a model, over the datasets that are present.

    emovlm-kd table1 --model runs/fi/model --data-root data --output-dir results/table1
    emovlm-kd table1 --model emoset=runs/emoset/model --model fi=runs/fi/model --model emotion6=runs/e6/model \
        --model flickr=runs/flickr/model --model instagram=runs/instagram/model --data-root data --output-dir R
    emovlm-kd table1 --model Qwen/Qwen2-VL-7B-Instruct --data-root data --output-dir results/table1-zero-shot

Datasets are the folders (or manifests) named emoset (or EmoSet-118K), fi, emotion6, flickr and instagram under
`--data-root` (case-insensitive), or given as `--dataset NAME=PATH`; missing ones are skipped with a log line, as
are datasets whose labels differ from the model's. The paper trains one model per dataset: `--model NAME=MODEL`
picks the model of one dataset, a plain `--model MODEL` serves the others. A bare Qwen2-VL checkpoint gives the
zero-shot row. Each dataset's full report goes to `<output-dir>/<name>/`; the table to `table1.json` / `table1.md`.
"""

import gc
import logging
import re
from pathlib import Path

from emovlm_kd.evaluation.paper import TABLE1, TABLE1_DATASETS, TABLE1_TITLES

logger = logging.getLogger(__name__)

ALIASES = {
    "emoset": ("emoset", "emoset118k"),
    "fi": ("fi",),
    "emotion6": ("emotion6",),
    "flickr": ("flickr",),
    "instagram": ("instagram",),
}


def add_arguments(parser):
    from emovlm_kd.commands.evaluate import add_common_arguments

    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]MODEL",
                        help="bundle or bare Qwen2-VL; NAME=MODEL for one dataset only (repeatable)")
    parser.add_argument("--data-root", default=None, help="folder holding emoset, fi, emotion6, flickr, instagram")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH",
                        help=f"a dataset's location, NAME one of {', '.join(TABLE1_DATASETS)} (repeatable)")
    add_common_arguments(parser)


def _key(name):
    return re.sub(r"[^a-z0-9]", "", name.lower())


def parse_models(values):
    """`(default, {dataset: model})` from `--model` values `MODEL` or `NAME=MODEL` (NAME a Table 1 dataset)."""
    from emovlm_kd.errors import UsageError

    default, per_dataset = None, {}
    for value in values:
        name, sep, model = value.partition("=")
        if sep and name.strip().lower() in TABLE1_DATASETS:
            per_dataset[name.strip().lower()] = model
        elif default is None:
            default = value
        else:
            raise UsageError(f"--model: two models for every dataset ({default!r}, {value!r}); use NAME=MODEL")
    return default, per_dataset


def parse_datasets(values):
    """`{dataset: path}` from `--dataset NAME=PATH` values."""
    from emovlm_kd.errors import UsageError

    paths = {}
    for value in values:
        name, sep, path = value.partition("=")
        name = name.strip().lower()
        if not sep or not path or name not in TABLE1_DATASETS:
            choices = ", ".join(TABLE1_DATASETS)
            raise UsageError(f"--dataset must be NAME=PATH with NAME one of {choices}, got {value!r}")
        paths[name] = path
    return paths


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


def run_table1(datasets, models, output_dir, *, split="test", limit=None, batch_size=8, vlm_mode=None, device=None,
               dtype=None, skipped=None):
    """Evaluate `models[name]` on each of `datasets` (`{name: path}`), writing `<output_dir>/<name>/` reports, and
    return the Table 1 result (also written to `table1.json` and `table1.md`). `models` maps dataset -> model id;
    `skipped` (`{name: reason}`) lists datasets left out beforehand. A model that does not load raises
    `ModelLoadError`; a dataset that does not load or whose labels differ from the model's is skipped.
    """
    from emovlm_kd.errors import UsageError

    from emovlm_kd.commands.evaluate import load_split
    from emovlm_kd.evaluation.report import write_json, write_text
    from emovlm_kd.evaluation.runner import LabelMismatchError, ModelLoadError, bind_labels, dataset_label_names, evaluate_model, load_model

    output_dir = Path(output_dir)
    results, skipped = {}, dict(skipped or {})
    loaded_id = loaded = None
    for name, path in datasets.items():
        model_id = models.get(name)
        if model_id is None:
            skipped[name] = "no --model for it"
            logger.warning("skipping %s: %s", name, skipped[name])
            continue
        try:
            dataset = load_split(path, split, limit)
        except UsageError as error:  # a dataset that does not load or lacks the split: skip it, keep the others
            skipped[name] = str(error)
            logger.warning("skipping %s (%s): %s", name, path, error)
            continue
        if model_id != loaded_id:  # keep one model in memory at a time
            loaded = loaded_id = None
            gc.collect()
            try:
                loaded = load_model(model_id, device=device, dtype=dtype)
            except (OSError, ValueError) as error:
                raise ModelLoadError(f"cannot load {model_id!r}: {error}") from error
            loaded_id = model_id
        base, processor, zero_shot = loaded
        labels = dataset_label_names(dataset)
        try:
            model, perm = bind_labels(base, processor, zero_shot, labels)
        except LabelMismatchError as error:
            skipped[name] = str(error)
            logger.warning("skipping %s: %s", name, error)
            continue
        logger.info("Table 1: %s (%s, %d samples) with %s", name, path, len(dataset), model_id)
        meta = {"model": str(model_id), "dataset": str(path), "split": split, "limit": limit}
        report = evaluate_model(model, processor, dataset, output_dir / name, zero_shot=zero_shot, label_perm=perm,
                                batch_size=batch_size, vlm_mode=vlm_mode, meta=meta, desc=name)
        results[name] = {
            "path": str(path),
            "model": str(model_id),
            "zero_shot": report["zero_shot"],
            "num_samples": report["num_samples"],
            "final": report["final"],
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "report": f"{name}/report.json",
        }
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


def run(args):
    from emovlm_kd.errors import UsageError

    from emovlm_kd.commands.evaluate import check_common_arguments, torch_dtype
    from emovlm_kd.evaluation.runner import ModelLoadError, default_device

    check_common_arguments(args)
    default, per_dataset = parse_models(args.model)
    overrides = parse_datasets(args.dataset)
    if args.data_root is None and not overrides:
        raise UsageError("give --data-root ROOT or at least one --dataset NAME=PATH")
    try:
        found, missing = find_datasets(args.data_root, overrides)
    except FileNotFoundError as error:
        raise UsageError(str(error))
    for name, reason in missing.items():
        logger.info("skipping %s: %s", name, reason)
    models = {name: per_dataset.get(name, default) for name in found}
    try:
        table = run_table1(found, models, args.output_dir, split=args.split, limit=args.limit,
                           batch_size=args.batch_size, vlm_mode=args.vlm_mode, device=default_device(args.device),
                           dtype=torch_dtype(args.dtype), skipped=missing)
    except ModelLoadError as error:
        raise UsageError(f"--model: {error}")
    print(render_table1_markdown(table))
    if not table["datasets"]:
        print("no dataset was evaluated", flush=True)
        return 1
    return 0


__all__ = ["find_datasets", "parse_datasets", "parse_models", "render_table1_markdown", "run_table1"]
