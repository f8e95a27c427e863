"""From a reader's `Listing` to the standard `DatasetDict` (`image`, `label`, `id`): the label names, the checks,
the derived splits."""

import logging
from collections import Counter

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from emovlm_kd.data.checks import check_not_empty, check_split_classes, check_train_classes, drop_unreadable
from emovlm_kd.data.records import SPLITS, UNSPLIT, normalise_label
from emovlm_kd.data.splits import derive_splits
from emovlm_kd.labels import canonical_label_order

logger = logging.getLogger(__name__)


def from_listing(listing, label_names, val_fraction, seed, wanted=None, split_ratios=None):
    """Check labels and rows, drop unreadable images, derive missing splits, build the `DatasetDict`.

    `wanted` (split names) keeps only those splits, derived first, and checks only their images. `split_ratios`
    (train, val, test) overrides the listing's own ratios for a pool without a split; a dataset with its own split
    keeps it. A class in the dataset's own val or test split but not in its train split is an error
    (`check_split_classes`).
    """
    present = [record.label for records in listing.splits.values() for record in records]
    names = resolve_label_names(label_names, listing.labels or present)
    index = {name: i for i, name in enumerate(names)}
    for records in listing.splits.values():
        for record in records:
            if record.label not in index:
                raise ValueError(f"label {record.label!r} of {record.path} is not one of the labels {names}")
    check_not_empty({split: len(records) for split, records in listing.splits.items()})
    check_split_classes(listing.splits)
    ratios = listing.ratios if split_ratios is None else split_ratios
    if split_ratios is not None and UNSPLIT not in listing.splits:
        logger.info("split_ratios %s not used: the dataset has its own split", tuple(split_ratios))
    if wanted is None:
        splits = derive_splits(drop_unreadable(listing.splits), val_fraction, seed, ratios)
    else:
        derived = derive_splits(listing.splits, val_fraction, seed, ratios)
        missing = sorted(set(wanted) - set(derived))
        if missing:
            raise ValueError(f"the dataset has no split {missing[0]!r}; it has {', '.join(sorted(derived))}")
        splits = drop_unreadable({split: derived[split] for split in wanted})
    if "train" in splits:
        check_train_classes([record.label for record in splits["train"]])
    features = Features({"image": Image(), "label": ClassLabel(names=names), "id": Value("string")})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "image": [str(record.path) for record in splits[split]],
                    "label": [index[record.label] for record in splits[split]],
                    "id": [record.id for record in splits[split]],
                },
                features=features,
            )
            for split in SPLITS
            if split in splits
        }
    )


def resolve_label_names(label_names, labels):
    """`label_names` normalised (order kept, no duplicates), else the canonical order of `labels`."""
    if label_names is None:
        return canonical_label_order(labels)
    names = [normalise_label(name, "label_names") for name in label_names]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates or not names:
        raise ValueError(f"label_names must be non-empty and unique, got {list(label_names)}")
    return names
