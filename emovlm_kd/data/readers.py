"""The local on-disk layouts: one reader per layout, each a `matches(path)` test and a `read(path) -> Listing`.

A new layout is a `read_<layout>` function returning a `Listing` (records per split, or under `UNSPLIT` for the
80/10/10 split; the label set when the dataset declares it), a `matches` test, and one `Reader` line in `READERS`,
which `load_image_dataset` tries in order (before `save_to_disk` folders and Hub datasets). Labels go through
`normalise_label`, split names through `normalise_split`; a record's id is its path relative to the dataset root.
"""

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emovlm_kd.data.records import SPLITS, UNSPLIT, Listing, Record, normalise_label, normalise_split
from emovlm_kd.images import iter_image_files
from emovlm_kd.labels import EKMAN6

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class Reader:
    """A local layout: `matches(path)` says whether the folder or file `path` is one, `read(path)` lists it."""

    name: str
    description: str  # for error messages: what such a source looks like
    matches: Callable
    read: Callable


def find_reader(path):
    """The first reader of `READERS` whose layout `path` is, or None."""
    return next((reader for reader in READERS if reader.matches(path)), None)


# ------------------------------------------------------------- official: <root>/{train,val,test}/<class>/*


def is_official(path):
    return path.is_dir() and any(_is_class_folder_split(path / split) for split in SPLITS)


def _is_class_folder_split(path):
    """Whether `path` is a split folder of the official layout (a folder holding class folders)."""
    return path.is_dir() and any(child.is_dir() and not child.name.startswith(".") for child in path.iterdir())


def read_official(root):
    """Records of `<root>/{train,val,test}/<class>/*`; a class folder without images is an error."""
    splits = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        records, empty = [], []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = list(iter_image_files([class_dir]))
            empty += [class_dir.name] if not files else []
            label = normalise_label(class_dir.name, class_dir)
            records += [Record(file, label, file.relative_to(root).as_posix()) for file in files]
        if empty and records:
            raise ValueError(f"{split_dir}: class folder(s) {empty} hold no image files while other classes do")
        splits[split] = records
    return Listing(splits)


# ------------------------------------------------------------- EmoSet-118K: info.json + {train,val,test}.json


def is_emoset(path):
    return (
        path.is_dir()
        and (path / "info.json").is_file()
        and any((path / f"{split}.json").is_file() for split in SPLITS)
    )


def read_emoset(root):
    """Records of EmoSet-118K: `info.json` (label set) and `{train,val,test}.json` rows with 3 or 4 items."""
    splits = {}
    for split in SPLITS:
        file = root / f"{split}.json"
        if file.is_file():
            rows = json.loads(file.read_text(encoding="utf-8"))
            splits[split] = [_emoset_record(root, row, f"{file} row {i}") for i, row in enumerate(rows)]
    return Listing(splits, _emoset_emotions(root / "info.json"))


def _emoset_record(root, row, where):
    """A record from `[emotion, image_id, image_path, annotation_path]` or `[emotion, image_path, annotation_path]`."""
    if not isinstance(row, (list, tuple)) or len(row) not in (3, 4):
        raise ValueError(
            f"{where}: expected [emotion, image_id, image_path, annotation_path] "
            f"or [emotion, image_path, annotation_path], got {row!r}"
        )
    image_path = Path(row[-2])
    return Record(root / image_path, normalise_label(row[0], where), image_path.as_posix())


def _emoset_emotions(info_path):
    """The emotion names declared in EmoSet's `info.json`, or None when it does not list them."""
    info = json.loads(info_path.read_text(encoding="utf-8"))
    label2idx = (info.get("label2idx") or {}).get("emotion")
    if isinstance(label2idx, dict) and label2idx:
        return [normalise_label(name, info_path) for name in label2idx]
    idx2label = (info.get("idx2label") or {}).get("emotion")
    if isinstance(idx2label, dict) and idx2label:
        return [normalise_label(name, info_path) for name in idx2label.values()]
    return None


# ------------------------------------------------------------- Emotion6: images/<emotion>/ + ground_truth.txt


def is_emotion6(path):
    return path.is_dir() and (path / "ground_truth.txt").is_file() and (path / "images").is_dir()


def read_emotion6(root):
    """Records of Emotion6: `ground_truth.txt` rows, label = argmax of the six emotion probabilities."""
    truth = root / "ground_truth.txt"
    records = []
    for number, line in enumerate(truth.read_text(encoding="utf-8").splitlines()[1:], start=2):
        if not line.strip():
            continue
        fields = [field.strip() for field in (line.split("\t") if "\t" in line else line.split())]
        where = f"{truth} line {number}"
        try:
            probabilities = [float(value) for value in fields[3:9]]
        except ValueError:
            raise ValueError(f"{where}: probabilities are not numbers: {line!r}") from None
        if len(probabilities) != len(EKMAN6):
            raise ValueError(f"{where}: expected file, valence, arousal and 7 probabilities, got {line!r}")
        relative = Path("images") / fields[0]
        records.append(Record(root / relative, EKMAN6[int(np.argmax(probabilities))], relative.as_posix()))
    return Listing({UNSPLIT: records}, list(EKMAN6))


# ------------------------------------------------------------- a CSV/JSONL manifest: path,label[,split]


def is_manifest(path):
    return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES


def read_manifest(path):
    """Records of a CSV/JSONL manifest (`path` or `image`, `label`, optional `split`), paths relative to its folder."""
    rows = _read_manifest_rows(path)
    has_split = any(row.get("split") not in (None, "") for _, row in rows)
    splits = {}
    for number, row in rows:
        where = f"{path} line {number}"
        image = row.get("path") or row.get("image")
        if not image or "label" not in row:
            raise ValueError(f"{where}: needs `path` (or `image`) and `label`, got keys {sorted(row)}")
        split = normalise_split(row.get("split"), where) if has_split else UNSPLIT
        record = Record(path.parent / image, normalise_label(row["label"], where), Path(image).as_posix())
        splits.setdefault(split, []).append(record)
    return Listing(splits)


def _read_manifest_rows(path):
    """`[(line_number, row_dict)]` from a CSV (with a header) or a JSONL file."""
    with open(path, encoding="utf-8", newline="") as file:
        if path.suffix.lower() == ".csv":
            return [(number, row) for number, row in enumerate(csv.DictReader(file), start=2)]
        rows = []
        for number, line in enumerate(file, start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{path} line {number}: expected a JSON object, got {line.strip()!r}")
                rows.append((number, row))
        return rows


# In detection order: the first layout that matches reads the source.
READERS = (
    Reader("official", "<root>/{train,val,test}/<class>/*", is_official, read_official),
    Reader("emoset", "EmoSet-118K (info.json + train.json)", is_emoset, read_emoset),
    Reader("emotion6", "Emotion6 (images/ + ground_truth.txt)", is_emotion6, read_emotion6),
    Reader("manifest", "a .csv/.jsonl manifest", is_manifest, read_manifest),
)
