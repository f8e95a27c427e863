"""`load_image_dataset`: find which layout a source is (a local layout of `readers`, else a `save_to_disk` folder or
a Hub dataset) and read it into the standard `DatasetDict`."""

import re
from pathlib import Path

from emovlm_kd.data.build import from_listing
from emovlm_kd.data.hfdatasets import from_datasets, load_datasets
from emovlm_kd.data.readers import MANIFEST_SUFFIXES, find_reader

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_image_dataset(
    source, *, val_fraction=0.1, seed=42, label_names=None, label_column=None, image_column=None, splits=None
):
    """A `DatasetDict` with splits among train/val/test, each with exactly the columns `image` (`Image()`),
    `label` (`ClassLabel`, canonical order, or `label_names` in their order) and `id` (string).

    `source` is detected in this order: the official `<root>/{train,val,test}/<class>/*` layout, EmoSet-118K,
    Emotion6, a CSV/JSONL manifest, a `save_to_disk` folder, else a Hub dataset id (`label_column`/`image_column`
    pick the columns there). A label outside `label_names`, a missing root, an empty split or a class whose
    images are all unreadable raise `ValueError`.

    `splits` (e.g. `["test"]`) keeps only those splits of a local file listing and checks only their images (a
    derived val split is then drawn before unreadable train files are dropped): evaluation need not read train.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    location = _locate(source)
    local = isinstance(location, Path)
    reader = find_reader(location) if local else None
    if reader is not None:
        return from_listing(reader.read(location), label_names, val_fraction, seed, splits)
    if local and location.is_file():
        raise ValueError(f"{location}: a file that is not a manifest (expected {', '.join(MANIFEST_SUFFIXES)})")
    root = location if local else None
    return from_datasets(load_datasets(location), root, label_names, label_column, image_column, val_fraction, seed)


def _locate(source):
    """The local folder or file `source` names (an absolute `Path`), else `source` as a Hub dataset id."""
    path = Path(source).expanduser().absolute()
    if path.is_dir() or path.is_file():
        return path
    if isinstance(source, str) and HUB_ID.match(source):
        return source
    raise ValueError(f"dataset root not found: {path}")
