"""The local on-disk layouts, one `Reader` each: a `matches(path)` test for detection, an `accepts(path)` test for
an explicitly named format, and a `read(path, options) -> Listing`.

A new layout is a module with its `read_<layout>` function (records per split, or under `UNSPLIT` with the ratios
to split it by; the label set when the dataset declares it), a `matches` test, and one `Reader` line in `READERS`,
which `load_image_dataset` tries in order (before `save_to_disk` folders and Hub datasets, the format "hub").
Labels go through `normalise_label`, split names through `normalise_split`; a record's id is its path relative to
the dataset root.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from emovlm_kd.data.emoset import is_emoset, read_emoset
from emovlm_kd.data.emotion6 import accepts_emotion6, is_emotion6, read_emotion6
from emovlm_kd.data.folders import (
    accepts_fi,
    class_folders,
    is_fi,
    is_imagefolder,
    is_saved_dataset,
    read_fi,
    read_imagefolder,
)
from emovlm_kd.data.katsurai import (
    accepts_sentiment_folders,
    accepts_votes_file,
    is_flickr,
    is_instagram,
    read_flickr,
    read_instagram,
)
from emovlm_kd.data.manifest import MANIFEST_SUFFIXES, is_manifest, read_manifest
from emovlm_kd.images import IMAGE_EXTENSIONS

METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")  # `datasets`' imagefolder reads labels there

HUB = "hub"


@dataclass(frozen=True)
class Reader:
    """A local layout: `matches(path)` detects it, `accepts(path)` admits it when named, `read(path, options)`."""

    name: str
    description: str  # for error messages: what such a source looks like
    matches: Callable
    read: Callable
    accepts: Callable = None  # None: the same as `matches`

    def admits(self, path):
        return self.matches(path) or (self.accepts is not None and self.accepts(path))


def _flickr_or_file(path):
    return is_flickr(path) or accepts_votes_file(path) or accepts_sentiment_folders(path)


def _instagram_or_file(path):
    return is_instagram(path) or accepts_votes_file(path) or accepts_sentiment_folders(path)


# In detection order: the first layout that matches reads the source (the split class-folder layout matches
# nothing else; Flickr/Instagram come before plain class folders, whose `images/` folder they may hold).
READERS = (
    Reader("emoset", "EmoSet-118K (info.json + train.json/val.json/test.json)", is_emoset, read_emoset),
    Reader("emotion6", "Emotion6 (images/<emotion>/ + ground_truth.txt)", is_emotion6, read_emotion6,
           accepts_emotion6),
    Reader("flickr", "Flickr of Katsurai & Satoh (flickr*_icassp2016_dataset.csv + images named by id, or "
                     "[{train,val,test}/]{positive,negative}/*.jpg)",
           is_flickr, read_flickr, _flickr_or_file),
    Reader("instagram", "Instagram of Katsurai & Satoh (instagram*_icassp2016_dataset.csv + images named by id, "
                        "or [{train,val,test}/]{positive,negative}/*.jpg)",
           is_instagram, read_instagram, _instagram_or_file),
    Reader("fi", "FI (<root>/<Mikels emotion>/*.jpg, no split)", is_fi, read_fi, accepts_fi),
    Reader("imagefolder", "<root>/{train,val,test}/<class>/* or <root>/<class>/*", is_imagefolder, read_imagefolder),
    Reader("manifest", "a .csv/.jsonl manifest (path, label[, split])", is_manifest, read_manifest),
)  # fmt: skip
DATASET_FORMATS = (*(reader.name for reader in READERS), HUB)

__all__ = ["DATASET_FORMATS", "HUB", "MANIFEST_SUFFIXES", "READERS", "Reader", "find_reader", "resolve_local"]

logger = logging.getLogger(__name__)

WRAPPER_DEPTH = 2  # single folders descended to find a dataset: `DIR/emotion_dataset/<class>/` (FI's tar unpacked)
LABELLED_LAYOUTS = (
    "class folders (<root>/<label>/*.jpg or <root>/{train,val,test}/<label>/*.jpg), a CSV/JSONL manifest "
    "(path,label[,split]), a metadata.csv with a label column beside the images, the datasets' own files (FI, "
    "EmoSet-118K info.json, Emotion6 ground_truth.txt, Flickr/Instagram vote files), or a save_to_disk/Hub/parquet "
    "dataset with a label column (--label-column NAME)"
)


def find_reader(path):
    """The first reader of `READERS` whose layout `path` is, or None."""
    return next((reader for reader in READERS if reader.matches(path)), None)


def _reader_named(name):
    reader = next((reader for reader in READERS if reader.name == name), None)
    if reader is None:
        raise ValueError(f"dataset_format must be one of {', '.join(DATASET_FORMATS)} or None, got {name!r}")
    return reader


def resolve_local(path, name=None):
    """`(reader, root)` for the local folder or file `path`: the reader of format `name` (None: detected) and the
    folder it reads. `root` is `path`, or the dataset inside a wrapper folder when `path` holds nothing but one
    folder (and files such as the archive), as an archive unpacks: FI's `emotion_dataset.tar` gives
    `path/emotion_dataset/<emotion>/*.jpg` (logged). `(None, path)` leaves `path` to `datasets` (a `save_to_disk`
    folder, images with a metadata file, data files).

    `ValueError`, before any image is opened, for a folder of images that carry no label (naming the layouts that
    do), and for a folder holding datasets in several sub-folders (naming them)."""
    if name is not None:
        reader = _reader_named(name)
        if reader.admits(path):
            return reader, path
        inner = _wrapped_dataset(path, reader.admits)
        if inner is None:
            raise ValueError(f"{path} is not in the {name} format: expected {reader.description}")
        logger.info("Reading %s: the %s dataset inside %s", inner, name, path)
        return reader, inner
    reader = find_reader(path)
    if reader is not None or not path.is_dir() or is_saved_dataset(path):
        return reader, path
    inner = _wrapped_dataset(path, find_reader)
    if inner is not None:
        reader = find_reader(inner)
        logger.info("Reading %s: the %s dataset inside %s", inner, reader.name, path)
        return reader, inner
    nested = [(folder.name, find_reader(folder)) for folder in class_folders(path)]
    nested = [f"{folder}/ ({reader.name})" for folder, reader in nested if reader is not None]
    if nested:
        raise ValueError(f"{path} is no dataset itself but holds datasets in its sub-folders {', '.join(nested)}: "
                         "point at one of them")  # fmt: skip
    check_labelled(path)
    return None, path


def _wrapped_dataset(path, test):
    """The folder below `path` (through up to `WRAPPER_DEPTH` single folders holding no images) that passes
    `test`, or None."""
    folder = path
    for _ in range(WRAPPER_DEPTH):
        if not folder.is_dir() or is_saved_dataset(folder) or _image_count(folder) or _has_metadata(folder):
            return None
        inner = class_folders(folder, unreadable=[])
        if len(inner) != 1:
            return None
        folder = inner[0]
        if test(folder):
            return folder
    return None


def check_labelled(path):
    """`ValueError` for a folder no reader takes that holds image files (at its top or one folder down) and no
    metadata file `datasets` would read labels from: such images carry no label. Lists folders only."""
    folders = [path, *class_folders(path, unreadable=[])]
    if any(_has_metadata(folder) for folder in folders):
        return
    count = sum(_image_count(folder) for folder in folders)
    if count:
        raise ValueError(
            f"{path}: {count} image file(s) but no labels (no class folders, no metadata file); labels come with "
            f"{LABELLED_LAYOUTS}"
        )


def _has_metadata(folder):
    return any((folder / name).is_file() for name in METADATA_FILES)


def _image_count(folder):
    try:
        return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    except OSError:
        return 0
