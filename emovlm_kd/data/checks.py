"""Checks made while loading: unreadable image files (skipped with one warning naming them), classes and splits
left without images (errors)."""

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

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
            disable=len(paths) <= PROGRESS_MIN_FILES,
        )
        return {path: reason for path, reason in zip(paths, results) if reason is not None}
