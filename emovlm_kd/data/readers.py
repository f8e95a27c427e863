"""The local on-disk layouts, one `Reader` each: a `matches(path)` test for detection, an `accepts(path)` test for
an explicitly named format, and a `read(path, options) -> Listing`.

A new layout is a module with its `read_<layout>` function (records per split, or under `UNSPLIT` with the ratios
to split it by; the label set when the dataset declares it), a `matches` test, and one `Reader` line in `READERS`,
which `load_image_dataset` tries in order (before `save_to_disk` folders and Hub datasets, the format "hub").
Labels go through `normalise_label`, split names through `normalise_split`; a record's id is its path relative to
the dataset root.
"""

from collections.abc import Callable
from dataclasses import dataclass

from emovlm_kd.data.emoset import is_emoset, read_emoset
from emovlm_kd.data.emotion6 import accepts_emotion6, is_emotion6, read_emotion6
from emovlm_kd.data.folders import accepts_fi, is_fi, is_imagefolder, read_fi, read_imagefolder
from emovlm_kd.data.katsurai import accepts_votes_file, is_flickr, is_instagram, read_flickr, read_instagram
from emovlm_kd.data.manifest import MANIFEST_SUFFIXES, is_manifest, read_manifest

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
    return is_flickr(path) or accepts_votes_file(path)


def _instagram_or_file(path):
    return is_instagram(path) or accepts_votes_file(path)


# In detection order: the first layout that matches reads the source (the split class-folder layout matches
# nothing else; Flickr/Instagram come before plain class folders, whose `images/` folder they may hold).
READERS = (
    Reader("emoset", "EmoSet-118K (info.json + train.json/val.json/test.json)", is_emoset, read_emoset),
    Reader("emotion6", "Emotion6 (images/<emotion>/ + ground_truth.txt)", is_emotion6, read_emotion6,
           accepts_emotion6),
    Reader("flickr", "Flickr of Katsurai & Satoh (flickr*_icassp2016_dataset.csv + images named by id)",
           is_flickr, read_flickr, _flickr_or_file),
    Reader("instagram", "Instagram of Katsurai & Satoh (instagram*_icassp2016_dataset.csv + images named by id)",
           is_instagram, read_instagram, _instagram_or_file),
    Reader("fi", "FI (<root>/<Mikels emotion>/*.jpg, no split)", is_fi, read_fi, accepts_fi),
    Reader("imagefolder", "<root>/{train,val,test}/<class>/* or <root>/<class>/*", is_imagefolder, read_imagefolder),
    Reader("manifest", "a .csv/.jsonl manifest (path, label[, split])", is_manifest, read_manifest),
)  # fmt: skip
DATASET_FORMATS = (*(reader.name for reader in READERS), HUB)

__all__ = ["DATASET_FORMATS", "HUB", "MANIFEST_SUFFIXES", "READERS", "Reader", "find_reader", "named_reader"]


def find_reader(path):
    """The first reader of `READERS` whose layout `path` is, or None."""
    return next((reader for reader in READERS if reader.matches(path)), None)


def named_reader(name, path):
    """The reader of format `name` for `path`; a `ValueError` when `path` is not such a layout."""
    reader = next((reader for reader in READERS if reader.name == name), None)
    if reader is None:
        raise ValueError(f"dataset_format must be one of {', '.join(DATASET_FORMATS)} or None, got {name!r}")
    if not reader.admits(path):
        raise ValueError(f"{path} is not in the {name} format: expected {reader.description}")
    return reader
