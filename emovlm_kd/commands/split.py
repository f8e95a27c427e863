"""`emovlm-kd split DATASET --output splits.json`: make a split to share, and to reuse with `--splits FILE` in
`train`, `evaluate` and `table1`.

    emovlm-kd split data/FI --output fi-splits.json                       # FI's protocol: 80 / 5 / 15, seed 42
    emovlm-kd split data/Emotion6 --output e6.json --seed 7 --split-ratios 0.8 0.1 0.1

The file holds the ids of every split (the dataset's `id` column, as in `predictions.jsonl`) and the dataset's
fingerprint. Files whose content is identical in two splits are named in a warning (`--leakage error` stops).
"""

import logging
from dataclasses import dataclass

from emovlm_kd.errors import UsageError
from emovlm_kd.settings import REQUIRED, DatasetArguments, LeakageArguments, dataset_options, help_field

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SplitArguments(LeakageArguments, DatasetArguments):
    dataset: str = help_field("dataset folder, manifest, save_to_disk folder or Hub id", REQUIRED, positional=True)
    output: str = help_field("the split file to write (JSON)", REQUIRED)


ARGUMENTS = SplitArguments


def check_splits_usable(dataset):
    """`ValueError` for a split without train or test: `--splits` (train, evaluate, table1) reads only files with
    both, so such a file is refused now, before it is written."""
    missing = [name for name in ("train", "test") if name not in dataset]
    if missing:
        raise ValueError(
            f"the dataset yields no {' and no '.join(missing)} split (it has {', '.join(dataset) or 'none'}): a split "
            "file needs train and test (--splits reads no other). The dataset brings its own split without it: add "
            "a test/ folder (a `split` column, a Hub split), or give the images without a split (<root>/<class>/*, a "
            "manifest without `split`) to have train/val/test drawn by --split-ratios"
        )


def run(args: SplitArguments) -> int:
    from emovlm_kd.hubaccess import HubAccess

    problem = HubAccess().dataset_problem(args.dataset)  # in seconds, before `datasets` is imported: one Hub probe
    if problem:
        raise UsageError(f"--dataset {args.dataset}: {problem}")
    from emovlm_kd.data import load_image_dataset
    from emovlm_kd.data.splitfile import check_leakage, split_record, write_splits

    options = dataset_options(args)
    try:
        dataset = load_image_dataset(args.dataset, **options)
        check_splits_usable(dataset)
        check_leakage(dataset, strict=args.leakage == "error")
    except (ValueError, OSError) as error:
        raise UsageError(f"--dataset {args.dataset}: {error}")
    path = write_splits(args.output, split_record(dataset, args.dataset, **options))
    sizes = ", ".join(f"{name} {len(part)}" for name, part in dataset.items())
    print(f"wrote {path}: {sizes}")
    return 0
