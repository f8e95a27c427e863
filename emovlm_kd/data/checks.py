"""Checks made while loading: unreadable image files (skipped with one warning naming them), classes and splits
left without images (errors), a val/test class that train lacks (an error: the label set is learnt from train),
class folders naming one label in two spellings (an error), class folders skipped for leaving the dataset root or
for being unreadable (one warning each, counting them)."""

import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from emovlm_kd.data.records import normalise_label
from emovlm_kd.images import ImageLoadError, load_image_file

logger = logging.getLogger(__name__)

PROGRESS_MIN_FILES = 200
MAX_NAMED = 10


def check_not_empty(sizes):
    """`ValueError` for a split with zero rows (`sizes`: split -> number of rows)."""
    if not sizes:
        raise ValueError("the dataset has no splits with images")
    for split, size in sizes.items():
        if size == 0:
            raise ValueError(f"split {split!r} has no images")


def check_split_classes(splits):
    """`ValueError` naming the classes of val or test (`splits`: split -> records) that train lacks: no model can
    learn them. Nothing to check without a train split (a pool split later, or evaluation data alone)."""
    if "train" not in splits:
        return
    trained = {record.label for record in splits["train"]}
    for split, records in splits.items():
        unknown = sorted({record.label for record in records} - trained)
        if unknown:
            raise ValueError(
                f"class(es) {unknown} of split {split!r} have no images in train: the label set comes from train "
                f"(add train images of them, or remove them from {split!r})"
            )


def check_train_classes(labels):
    """`ValueError` when a train split (`labels`: its label names, one per image) has images of fewer than two
    classes: no classifier learns from one. A dataset without a train split (evaluation data alone) is not checked."""
    present = sorted(set(labels))
    if len(present) < 2:
        found = f"only the class {present[0]!r}" if present else "no class"
        raise ValueError(
            f"the train split has {found}: a classifier needs images of at least two classes (one class folder, "
            "label value or emotion per class)"
        )


def check_class_names_distinct(names, where):
    """`ValueError` when two class names of `names` (folder names in `where`) give one label (`Happy`, `happy`)."""
    spellings = defaultdict(list)
    for name in names:
        spellings[normalise_label(name, where)].append(name)
    clashes = [sorted(group) for group in spellings.values() if len(group) > 1]
    if clashes:
        named = "; ".join(" and ".join(repr(name) for name in group) for group in clashes)
        raise ValueError(
            f"{where}: class folders {named} name the same class (labels ignore case): merge or rename them"
        )


def warn_skipped_folders(links, unreadable):
    """One warning for the class folders skipped as leaving the dataset root (`links`: `(folder, target)` pairs) and
    one for the folders that could not be listed (`unreadable`), each with the count and the first names."""
    if links:
        named = ", ".join(f"{folder} -> {target}" for folder, target in links[:MAX_NAMED])
        more = ", ..." if len(links) > MAX_NAMED else ""
        logger.warning(
            "Skipped %d class folder(s) that resolve outside the dataset root, onto it or onto their split folder "
            "(symlinks): %s%s", len(links), named, more,
        )  # fmt: skip
    if unreadable:
        named = ", ".join(str(folder) for folder in unreadable[:MAX_NAMED])
        more = ", ..." if len(unreadable) > MAX_NAMED else ""
        logger.warning("Skipped %d folder(s) that could not be read (permissions?): %s%s", len(unreadable), named, more)


def drop_unreadable(splits):
    """`splits` without records whose file does not load (one warning); a split or class left empty is an error."""
    paths = list(dict.fromkeys(record.path for records in splits.values() for record in records))
    reasons = find_unreadable(paths)
    if not reasons:
        return splits
    ids = {record.path: record.id for records in splits.values() for record in records}
    named = [f"{ids[path]} ({reason})" for path, reason in list(reasons.items())[:MAX_NAMED]]
    more = ", ..." if len(reasons) > MAX_NAMED else ""
    logger.warning("Skipped %d unreadable image file(s): %s%s", len(reasons), ", ".join(named), more)
    kept = {split: [record for record in records if record.path not in reasons] for split, records in splits.items()}
    for split, records in kept.items():
        if not records:
            raise ValueError(f"split {split!r} has no readable images: all {len(splits[split])} were skipped")
        lost = sorted({record.label for record in splits[split]} - {record.label for record in records})
        if lost:
            raise ValueError(f"class(es) {lost} in split {split!r} have no readable images left: all were skipped")
    return kept


def find_unreadable(paths):
    """`{path: reason}` for the files `load_image_file` refuses; each file is read once (threads, progress bar)."""

    def check(path):
        try:
            load_image_file(path)
        except ImageLoadError as error:
            return str(error)
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = tqdm(
            pool.map(check, paths),
            total=len(paths),
            desc="Checking images",
            unit="img",
            disable=len(paths) <= PROGRESS_MIN_FILES or None,  # None: no bar without a terminal
            leave=False,
        )
        return {path: reason for path, reason in zip(paths, results) if reason is not None}
