"""Splits a dataset lacks, drawn stratified by label and seeded: a val split from train, or 80/10/10 from a pool."""

import logging

import numpy as np

from emovlm_kd.data.records import UNSPLIT

logger = logging.getLogger(__name__)

TEST_FRACTION = 0.1


def stratified_split(labels, fraction, seed):
    """`(keep_indices, split_indices)`, both sorted: about `fraction` of each class goes to the split side.

    Pure and deterministic for the same `labels`, `fraction` and `seed`. A class with at least two items gives
    at least one to the split side and keeps at least one; a class with one item stays on the keep side.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    groups = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    rng = np.random.default_rng(seed)
    keep, split = [], []
    for indices in groups.values():  # first-appearance order: deterministic for the same labels
        order = rng.permutation(len(indices))
        count = min(max(round(fraction * len(indices)), 1), len(indices) - 1)
        split += [indices[i] for i in order[:count]]
        keep += [indices[i] for i in order[count:]]
    return sorted(keep), sorted(split)


def derive_splits(splits, val_fraction, seed):
    """Make the splits a dataset lacks: 80/10/10 from `UNSPLIT`, or a stratified val from train."""
    splits = dict(splits)
    if UNSPLIT in splits:
        if val_fraction + TEST_FRACTION >= 1:
            raise ValueError(f"val_fraction {val_fraction} + test fraction {TEST_FRACTION} must be below 1")
        splits["train"], splits["test"] = split_records(splits.pop(UNSPLIT), TEST_FRACTION, seed)
        if val_fraction:
            splits["train"], splits["val"] = split_records(splits["train"], val_fraction / (1 - TEST_FRACTION), seed)
    elif "train" in splits and "val" not in splits and val_fraction:
        splits["train"], splits["val"] = split_records(splits["train"], val_fraction, seed)
    for split in [split for split, records in splits.items() if not records]:
        logger.warning("Derived split %r is empty (too few images per class): left out", split)
        del splits[split]
    return splits


def split_records(records, fraction, seed):
    """`(kept, split_off)` record lists, stratified by label."""
    keep, split = stratified_split([record.label for record in records], fraction, seed)
    return [records[i] for i in keep], [records[i] for i in split]
