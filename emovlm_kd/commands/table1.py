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

`--protocol paper|official` evaluates every bundle's VLM branch as that protocol answers (issue 24;
`emovlm_kd.protocol.apply_to_model`); `--protocol both` runs both into `<output-dir>/paper/` and
`<output-dir>/official/` and writes the two side by side, with the paper's published numbers and McNemar's test
between the protocols' predictions, to `<output-dir>/table1_protocols.json` / `.md`. `--official-model [NAME=]MODEL`
names the runs trained with `--protocol official` (default: the `--model` ones, answering as the official code).

    emovlm-kd table1 --protocol both --model fi=runs/fi/model --official-model fi=runs/fi-official/model \
        --data-root data --output-dir results/table1-protocols
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from emovlm_kd.errors import UsageError
from emovlm_kd.evaluation.options import EvaluationArguments
from emovlm_kd.evaluation.paper import TABLE1_DATASETS
from emovlm_kd.settings import REQUIRED, DataPathArguments, RuntimeArguments, help_field

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Table1Arguments(RuntimeArguments, DataPathArguments, EvaluationArguments):
    model: list[str] = help_field("bundle or bare Qwen2-VL; NAME=MODEL for one dataset only (repeatable)", REQUIRED,
                                  action="append", metavar="[NAME=]MODEL")
    data_root: str | None = help_field("folder holding emoset, fi, emotion6, flickr, instagram")
    dataset: list[str] = help_field(f"a dataset's location, NAME one of {', '.join(TABLE1_DATASETS)} (repeatable)",
                                    [], action="append", metavar="NAME=PATH")
    splits: list[str] = help_field("a split file for one dataset (default: each model folder's splits.json) "
                                   "(repeatable)", [], action="append", metavar="NAME=FILE")
    protocol: Literal["paper", "official", "both"] | None = help_field(
        "how each bundle's VLM branch answers: paper (label scores), official (one answer sampled at T 0.8, seeded, "
        "parsed as the authors' code), or both side by side with McNemar's test between them (default: each "
        "model's own)")
    official_model: list[str] = help_field("--protocol both: the official protocol's model, [NAME=]MODEL as --model "
                                           "(repeatable; default: the --model ones)", [], action="append",
                                           metavar="[NAME=]MODEL")


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
    options = dict(split=args.split, limit=args.limit, batch_size=args.batch_size, vlm_mode=args.vlm_mode,
                   device=resolve_device(args.device), dtype=resolve_dtype(args.dtype), skipped=missing,
                   splits=parse_splits(args.splits), quantize=args.quantize, num_workers=args.num_workers)
    if args.official_model and args.protocol != "both":
        raise UsageError("--official-model goes with --protocol both")
    try:
        if args.protocol == "both":
            return _both(args, found, models, options)
        table = run_table1(found, models, args.output_dir, protocol=args.protocol, **options)
    except ModelLoadError as error:
        raise UsageError(f"--model: {error}")
    print(render_table1_markdown(table))
    if not table["datasets"]:
        print("no dataset was evaluated", flush=True)
        return 1
    return 0


def _both(args, found, models, options):
    """`--protocol both`: Table 1 under each protocol, then the two side by side (`compare_protocols`)."""
    from emovlm_kd.evaluation.report import write_json, write_text
    from emovlm_kd.evaluation.table1 import compare_protocols, render_protocols_markdown, run_table1

    official_default, official_per = parse_models(args.official_model) if args.official_model else (None, {})
    official_models = {name: official_per.get(name, official_default or models[name]) for name in found}
    output_dir = Path(args.output_dir)
    tables = {"paper": run_table1(found, models, output_dir / "paper", protocol="paper", **options),
              "official": run_table1(found, official_models, output_dir / "official", protocol="official",
                                     **options)}
    rows = compare_protocols(output_dir, tables)
    markdown = render_protocols_markdown(rows, limited=bool(args.limit))
    write_json(output_dir / "table1_protocols.json", {"split": args.split, "limit": args.limit, "datasets": rows})
    write_text(output_dir / "table1_protocols.md", markdown)
    print(markdown)
    if not rows:
        print("no dataset was evaluated", flush=True)
        return 1
    return 0
