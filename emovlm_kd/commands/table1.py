"""`emovlm-kd table1`: the paper's Table 1 row for a model, over the datasets that are present.

    emovlm-kd table1 --model runs/fi/model --data-root data --output-dir results/table1
    emovlm-kd table1 --model emoset=runs/emoset/model --model fi=runs/fi/model --model emotion6=runs/e6/model \
        --model flickr=runs/flickr/model --model instagram=runs/instagram/model --data-root data --output-dir R
    emovlm-kd table1 --model Qwen/Qwen2-VL-7B-Instruct --data-root data --output-dir results/table1-zero-shot

Datasets are the folders (or manifests) named emoset (or EmoSet-118K), fi, emotion6, flickr and instagram under
`--data-root` (case-insensitive), or given as `--dataset NAME=PATH`; missing ones are skipped with a log line, as
are datasets whose labels differ from the model's. The paper trains one model per dataset: `--model NAME=MODEL`
picks the model of one dataset, a plain `--model MODEL` serves the others. A bare Qwen2-VL checkpoint gives the
zero-shot row. Each dataset's full report goes to `<output-dir>/<name>/`; the table to `table1.json` / `table1.md`
(see `emovlm_kd.evaluation.table1`).
"""

import logging
from dataclasses import dataclass

from emovlm_kd.errors import UsageError
from emovlm_kd.evaluation.options import EvaluationArguments
from emovlm_kd.evaluation.paper import TABLE1_DATASETS
from emovlm_kd.settings import REQUIRED, RuntimeArguments, help_field

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Table1Arguments(RuntimeArguments, EvaluationArguments):
    model: list[str] = help_field("bundle or bare Qwen2-VL; NAME=MODEL for one dataset only (repeatable)", REQUIRED,
                                  action="append", metavar="[NAME=]MODEL")
    data_root: str | None = help_field("folder holding emoset, fi, emotion6, flickr, instagram")
    dataset: list[str] = help_field(f"a dataset's location, NAME one of {', '.join(TABLE1_DATASETS)} (repeatable)",
                                    [], action="append", metavar="NAME=PATH")
    splits: list[str] = help_field("a split file for one dataset (default: each model folder's splits.json) "
                                   "(repeatable)", [], action="append", metavar="NAME=FILE")


ARGUMENTS = Table1Arguments


def parse_models(values):
    """`(default, {dataset: model})` from `--model` values `MODEL` or `NAME=MODEL` (NAME a Table 1 dataset)."""
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
    paths = {}
    for value in values:
        name, sep, path = value.partition("=")
        name = name.strip().lower()
        if not sep or not path or name not in TABLE1_DATASETS:
            choices = ", ".join(TABLE1_DATASETS)
            raise UsageError(f"--dataset must be NAME=PATH with NAME one of {choices}, got {value!r}")
        paths[name] = path
    return paths


def parse_splits(values):
    """`NAME=FILE` flags as {name: file}."""
    splits = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or name.strip().lower() not in TABLE1_DATASETS:
            raise UsageError(f"--splits: expected NAME=FILE with NAME one of {', '.join(TABLE1_DATASETS)}, got {value!r}")
        splits[name.strip().lower()] = path
    return splits


def run(args: Table1Arguments) -> int:
    from emovlm_kd.evaluation.runner import ModelLoadError
    from emovlm_kd.runtime import resolve_device, resolve_dtype
    from emovlm_kd.evaluation.table1 import find_datasets, render_table1_markdown, run_table1

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
                           batch_size=args.batch_size, vlm_mode=args.vlm_mode, device=resolve_device(args.device),
                           dtype=resolve_dtype(args.dtype), skipped=missing, splits=parse_splits(args.splits))
    except ModelLoadError as error:
        raise UsageError(f"--model: {error}")
    print(render_table1_markdown(table))
    if not table["datasets"]:
        print("no dataset was evaluated", flush=True)
        return 1
    return 0
