"""Class-folder layouts: the official code's `<root>/{train,val,test}/<class>/*`, a plain `<root>/<class>/*` (no
split: one is drawn), and FI as its authors distribute it.

FI (You, Luo, Jin, Yang, AAAI 2016, "Building a Large Scale Dataset for Image Emotion Recognition: The Fine Print
and The Benchmark"; from the authors (qzyou.github.io) or a mirror such as http://47.105.62.179:8081/sentiment/)
is one folder per Mikels emotion, `amusement/ anger/ awe/ contentment/ disgust/ excitement/ fear/ sadness/`, of
JPEG files named `<emotion>_<number>.jpg` (public FI loaders take the label as `file_name.split('_')[0]`), with no
split. The VEA papers split it at random 80 / 5 / 15 (train / val / test); the official EmoVLM-KD code (github
sange1104/EmoVLM-KD, data_utils.py) expects it already split as `images/FI/{train,val,test}/<class>/`, which
`imagefolder` reads (and `fi`, named explicitly).
"""

import logging

from emovlm_kd.data.records import SPLIT_ALIASES, SPLITS, UNSPLIT, Listing, Record, normalise_label
from emovlm_kd.data.splits import LARGE_SET_RATIOS
from emovlm_kd.images import IMAGE_EXTENSIONS, iter_image_files
from emovlm_kd.labels import MIKELS8

logger = logging.getLogger(__name__)

FI_PAPER_IMAGES = 21_824  # the images of FI the EmoVLM-KD paper reports


def is_saved_dataset(path):
    """Whether `path` is a `save_to_disk` folder (its other folders are then no class folders)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def class_folders(path):
    """The visible sub-folders of `path`, sorted (hidden and `_`-prefixed ones, e.g. `__MACOSX`, left out)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _holds_images(folder):
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


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
    if is_split_folders(root):
        return Listing({split: _read_classes(root / split, root) for split in SPLITS if (root / split).is_dir()})
    return Listing({UNSPLIT: _read_classes(root, root)})


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


def _read_classes(folder, root):
    """Records of `folder/<class>/*` (ids relative to `root`); a class folder without images is an error."""
    records, empty = [], []
    for class_dir in class_folders(folder):
        files = list(iter_image_files([class_dir]))
        empty += [class_dir.name] if not files else []
        label = normalise_label(class_dir.name, class_dir)
        records += [Record(file, label, file.relative_to(root).as_posix()) for file in files]
    if empty and records:
        raise ValueError(f"{folder}: class folder(s) {empty} hold no image files while other classes do")
    return records
