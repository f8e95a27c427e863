"""Splits a dataset lacks, drawn stratified by label and seeded: a val split from train, or train/val/test from a
pool (`split_ratios`, e.g. FI's 80/5/15; by default 80/10/10)."""

import logging

import numpy as np

from emovlm_kd.data.records import UNSPLIT
from emovlm_kd.settings import check_split_ratios

logger = logging.getLogger(__name__)

TEST_FRACTION = 0.1
LARGE_SET_RATIOS = (0.8, 0.05, 0.15)  # the VEA papers' random train/val/test protocol for FI (and Flickr/Instagram)


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


def default_ratios(val_fraction):
    """The 80/10/10 default of a pool without declared ratios: 10% test, `val_fraction` val, the rest train."""
    if val_fraction + TEST_FRACTION >= 1:
        raise ValueError(f"val_fraction {val_fraction} + test fraction {TEST_FRACTION} must be below 1")
    return (1 - TEST_FRACTION - val_fraction, val_fraction, TEST_FRACTION)


def derive_splits(splits, val_fraction, seed, ratios=None):
    """Make the splits a dataset lacks: train/val/test from `UNSPLIT` (`ratios`, else 80/10/10 with
    `val_fraction`), or a stratified `val_fraction` of train as val."""
    splits = dict(splits)
    if UNSPLIT in splits:
        ratios = check_split_ratios(ratios) if ratios is not None else default_ratios(val_fraction)
        splits.update(split_pool(splits.pop(UNSPLIT), ratios, seed))
    elif "train" in splits and "val" not in splits and val_fraction:
        splits["train"], splits["val"] = split_records(splits["train"], val_fraction, seed)
    for split in [split for split, records in splits.items() if not records]:
        logger.warning("Derived split %r is empty (too few images per class): left out", split)
        del splits[split]
    return splits


def split_pool(records, ratios, seed):
    """`{train, val, test: records}` of a pool, each class split by `ratios` (test first, then val from the rest)."""
    _, val, test = ratios
    rest, result = records, {}
    if test:
        rest, result["test"] = split_records(rest, test, seed)
    if val:
        rest, result["val"] = split_records(rest, val / (1 - test), seed)
    result["train"] = rest
    return result


def split_records(records, fraction, seed):
    """`(kept, split_off)` record lists, stratified by label."""
    keep, split = stratified_split([record.label for record in records], fraction, seed)
    return [records[i] for i in keep], [records[i] for i in split]
