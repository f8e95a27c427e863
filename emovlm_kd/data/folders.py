"""Class-folder layouts: the official code's `<root>/{train,val,test}/<class>/*`, a plain `<root>/<class>/*` (no
split: one is drawn), and FI as its authors distribute it.

FI (You, Luo, Jin, Yang, AAAI 2016, "Building a Large Scale Dataset for Image Emotion Recognition: The Fine Print
and The Benchmark"; from the authors (qzyou.github.io) or a mirror such as http://47.105.62.179:8081/sentiment/)
is one folder per Mikels emotion, `amusement/ anger/ awe/ contentment/ disgust/ excitement/ fear/ sadness/`, of
JPEG files named `<emotion>_<number>.jpg` (public FI loaders take the label as `file_name.split('_')[0]`), with no
split. The VEA papers split it at random 80 / 5 / 15 (train / val / test); the official EmoVLM-KD code (github
sange1104/EmoVLM-KD, data_utils.py) expects it already split as `images/FI/{train,val,test}/<class>/`, which
`imagefolder` reads (and `fi`, named explicitly).

What reading class folders refuses or skips: two class folders of one split whose names differ only in case
(`Happy/`, `happy/`: labels are case-insensitive) are an error naming both; a class folder that resolves outside
the dataset root, onto it or onto its own split folder (a symlink such as `train/c -> ..`) is skipped, as are folders
that cannot be listed (permissions): one warning each, with the count and the first names.
"""

import logging
import os
from pathlib import Path

from emovlm_kd.data.checks import check_class_names_distinct, warn_skipped_folders
from emovlm_kd.data.records import SPLIT_ALIASES, SPLITS, UNSPLIT, Listing, Record, normalise_label
from emovlm_kd.data.splits import LARGE_SET_RATIOS
from emovlm_kd.images import IMAGE_EXTENSIONS
from emovlm_kd.labels import MIKELS8

logger = logging.getLogger(__name__)

FI_PAPER_IMAGES = 21_824  # the images of FI the EmoVLM-KD paper reports


def is_saved_dataset(path):
    """Whether `path` is a `save_to_disk` folder (its other folders are then no class folders)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def class_folders(path, unreadable=None):
    """The visible sub-folders of `path`, sorted (hidden and `_`-prefixed ones, e.g. `__MACOSX`, left out). A `path`
    that cannot be listed has none; it is appended to the list `unreadable` when one is given, else the error raises."""
    try:
        entries = list(path.iterdir())
    except OSError:
        if unreadable is None:
            raise
        unreadable.append(path)
        return []
    return sorted(p for p in entries if p.is_dir() and not p.name.startswith((".", "_")))


def _holds_images(folder):
    try:
        return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())
    except OSError:  # unreadable: reported when the layout is read
        return False


def is_split_folders(path):
    """`<root>/{train,val,test}/<class>/*`: some split folder holding class folders."""
    return path.is_dir() and any((path / split).is_dir() and class_folders(path / split) for split in SPLITS)


def is_class_folders(path):
    """`<root>/<class>/*` without split folders: some sub-folder holds image files, none is named as a split (a
    `train/` of images is the Hub's imagefolder with metadata, left to `datasets`)."""
    if not path.is_dir() or is_saved_dataset(path) or is_split_folders(path):
        return False
    folders = class_folders(path)
    if any(folder.name.lower() in SPLIT_ALIASES for folder in folders):
        return False
    return any(_holds_images(folder) for folder in folders)


def is_imagefolder(path):
    return is_split_folders(path) or is_class_folders(path)


def is_fi(path):
    """FI as distributed: class folders named exactly as the eight Mikels emotions (any case), no split folders."""
    return is_class_folders(path) and {p.name.lower() for p in class_folders(path)} == set(MIKELS8)


def accepts_fi(path):
    """What an explicit `fi` format reads: FI's class folders, or FI already split in the official layout."""
    return is_split_folders(path) or is_class_folders(path)


def read_imagefolder(root, options=None):
    """Records of the official split layout, or of unsplit class folders (a pool split by `split_ratios`)."""
    links, unreadable = [], []
    if is_split_folders(root):
        split_dirs = {split: root / split for split in SPLITS if (root / split).is_dir()}
        splits = {split: _read_classes(folder, root, links, unreadable) for split, folder in split_dirs.items()}
    else:
        splits = {UNSPLIT: _read_classes(root, root, links, unreadable)}
    warn_skipped_folders(links, unreadable)
    return Listing(splits)


def read_fi(root, options=None):
    """FI: the eight Mikels class folders, split 80/5/15 by default (or FI already split in the official layout)."""
    listing = read_imagefolder(root)
    strays = sorted({r.label for records in listing.splits.values() for r in records} - set(MIKELS8))
    if strays:
        raise ValueError(f"{root}: FI class folders must be the Mikels emotions {list(MIKELS8)}, found {strays}")
    count = sum(len(records) for records in listing.splits.values())
    logger.info("FI: %d images in %s (the paper: %s)", count, root, f"{FI_PAPER_IMAGES:,}")
    ratios = LARGE_SET_RATIOS if UNSPLIT in listing.splits else None
    return Listing(listing.splits, list(MIKELS8), ratios)


def _read_classes(folder, root, links, unreadable):
    """Records of `folder/<class>/*` (ids relative to `root`); a class folder without images is an error, as are two
    class folders naming one label. Class folders escaping the root go to `links` as `(folder, target)`, folders that
    cannot be listed to `unreadable`: both are skipped."""
    class_dirs = _kept_class_folders(folder, root, links, unreadable)
    check_class_names_distinct([class_dir.name for class_dir in class_dirs], folder)
    records, empty = [], []
    for class_dir in class_dirs:
        files = _image_files(class_dir, unreadable)
        if files is None:
            continue
        empty += [class_dir.name] if not files else []
        label = normalise_label(class_dir.name, class_dir)
        records += [Record(file, label, file.relative_to(root).as_posix()) for file in files]
    if empty and records:
        raise ValueError(f"{folder}: class folder(s) {empty} hold no image files while other classes do")
    return records


def _kept_class_folders(folder, root, links, unreadable):
    """`class_folders(folder)` less those that resolve outside `root`, onto it or onto `folder` (appended to
    `links`); a `folder` that cannot be listed is appended to `unreadable`."""
    root, home = root.resolve(), folder.resolve()
    kept = []
    for class_dir in class_folders(folder, unreadable):
        target = class_dir.resolve()
        if root not in target.parents or target == home:
            links.append((class_dir, target))
        else:
            kept.append(class_dir)
    return kept


def _image_files(class_dir, unreadable):
    """The image files under `class_dir` (recursively, sorted, symlinked sub-folders not followed), or None when
    `class_dir` itself cannot be listed; every folder that cannot be listed is appended to `unreadable`."""
    failed = []
    files = []
    for top, dirs, names in os.walk(class_dir, onerror=lambda error: failed.append(Path(error.filename))):
        dirs.sort()
        files += [Path(top) / name for name in sorted(names) if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    unreadable += failed
    return None if class_dir in failed else files
