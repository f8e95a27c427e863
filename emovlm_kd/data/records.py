"""What a dataset reader returns: `Record`s (one local image each) grouped by split in a `Listing`; split names and
label normalisation shared by every reader."""

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}  # fmt: skip
UNSPLIT = "all"  # the pool of a dataset without an official split, before the train/val/test split


@dataclass(frozen=True)
class Record:
    """One local image: where it is, its (normalised) label, and its id (path relative to the dataset root)."""

    path: Path
    label: str
    id: str


@dataclass
class Listing:
    """Records per split (or `UNSPLIT`) and, where the dataset declares it, its full label set.

    `ratios`: the dataset's default (train, val, test) fractions for its `UNSPLIT` pool; None = 80/10/10 with the
    default `val_fraction` (10% test, `val_fraction` val).
    """

    splits: dict
    labels: list = None
    ratios: tuple = None


@dataclass(frozen=True)
class ReadOptions:
    """Choices some readers take: how Emotion6 is labelled, how Flickr/Instagram votes become a label."""

    emotion6_labels: str = "folder"
    vote_rule: object = "majority"  # a name in `katsurai.VOTE_RULES` or a callable (pos, neu, neg) -> label or None


def normalise_label(label, where):
    """`label` stripped and lower-cased; an empty label is an error naming `where`."""
    name = str(label).strip().lower() if label is not None else ""
    if not name:
        raise ValueError(f"{where}: empty label")
    return name


def normalise_split(split, where):
    """`train`/`val`/`test` from a split name (`validation` -> `val`), or a `ValueError` naming `where`."""
    name = SPLIT_ALIASES.get(str(split).strip().lower())
    if name is None:
        raise ValueError(f"{where}: unknown split {split!r} (expected one of {', '.join(SPLIT_ALIASES)})")
    return name
