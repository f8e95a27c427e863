"""Image classification data for EmoVLM-KD: one `DatasetDict` with `image`, `label`, `id` from any layout in use.

    from emovlm_kd.data import load_image_dataset, make_synthetic_dataset

    data = load_image_dataset("data/FI")               # <root>/{train,val,test}/<class>/* (official code)
    data = load_image_dataset("data/EmoSet-118K")      # info.json + {train,val,test}.json
    data = load_image_dataset("data/Emotion6")         # images/<emotion>/N.jpg + ground_truth.txt
    data = load_image_dataset("data/flickr.csv")       # manifest: path,label[,split]
    data = load_image_dataset("user/some-emotion-set") # a save_to_disk folder or a Hub dataset id
    data["train"].features["label"].names               # canonical order: Mikels 8, Ekman 6, negative/positive

    root = make_synthetic_dataset("/tmp/synthetic")    # a tiny, learnable dataset in the official layout

Splits are among "train", "val", "test". Where "val" is missing it is a stratified `val_fraction` of train (seeded,
deterministic); Emotion6 and manifests without a `split` column get a stratified 80/10/10 train/val/test split.
Local image files are checked once while loading: unreadable ones are skipped with one warning naming them.
"""

import colorsys
import csv
import json
import logging
import os
import re
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset, load_from_disk
from PIL import Image as PILImage
from tqdm import tqdm

from emovlm_kd.images import ImageLoadError, iter_image_files, load_image_file
from emovlm_kd.labels import EKMAN6, MIKELS8, canonical_label_order

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}  # fmt: skip
UNSPLIT = "all"  # the pool of a dataset without an official split, before the 80/10/10 split
TEST_FRACTION = 0.1
LABEL_COLUMNS = ("label", "labels", "emotion")
IMAGE_COLUMNS = ("image", "img", "path")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
PROGRESS_MIN_FILES = 200
MAX_NAMED = 10
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LAYOUTS = (
    "<root>/{train,val,test}/<class>/*, EmoSet-118K (info.json + train.json), "
    "Emotion6 (images/ + ground_truth.txt), a .csv/.jsonl manifest, a save_to_disk folder or a Hub dataset id"
)
SYNTHETIC_FORMAT = 1


@dataclass(frozen=True)
class Record:
    """One local image: where it is, its (normalised) label, and its id (path relative to the dataset root)."""

    path: Path
    label: str
    id: str


@dataclass
class Listing:
    """Records per split (or `UNSPLIT`) and, where the dataset declares it, its full label set."""

    splits: dict
    labels: list = None


# ----------------------------------------------------------------------------------------------- public API


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
    kind, location = _detect_source(source)
    if kind in ("disk", "hub"):
        splits = _load_datasets(location, local=isinstance(location, Path), disk=kind == "disk")
        root = location if isinstance(location, Path) else None
        return _from_datasets(splits, root, label_names, label_column, image_column, val_fraction, seed)
    listers = {
        "official": _list_official, "emoset": _list_emoset, "emotion6": _list_emotion6, "manifest": _list_manifest,
    }  # fmt: skip
    return _from_listing(listers[kind](location), label_names, val_fraction, seed, splits)


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


def make_synthetic_dataset(root, labels=MIKELS8, per_class=(24, 6, 8), image_size=48, label_noise=0.05, seed=0):
    """Write a small, learnable dataset in the official layout `<root>/{train,val,test}/<class>/<class>_<i>.png`.

    Each class has its own dominant hue and stripe orientation/period; images vary in size (about 5/6 to 4/3 of
    `image_size`, some non-square), brightness, stripe position and noise. A `label_noise` fraction of train
    images is written under a wrong class folder. Same arguments, same bytes; a folder already holding a complete
    dataset written with the same arguments (see `synthetic.json`) is returned as is.
    """
    root = Path(root)
    args = _synthetic_args(labels, per_class, image_size, label_noise, seed)
    if _synthetic_is_complete(root, args):
        return root
    _clear_synthetic(root)
    rng = np.random.default_rng(seed)
    written = Counter()  # files per folder: the next file's index
    for split, folders, classes in _synthetic_plan(args, rng):
        for folder_index, class_index in zip(folders, classes):
            folder = root / split / args["labels"][folder_index]
            folder.mkdir(parents=True, exist_ok=True)
            image = _synthetic_image(rng, class_index, len(args["labels"]), image_size)
            image.save(folder / f"{folder.name}_{written[folder]}.png", format="PNG")
            written[folder] += 1
    count = sum(written.values())
    _write_json_atomically(root / "synthetic.json", {"format": SYNTHETIC_FORMAT, "args": args, "files": count})
    logger.info("Wrote %d synthetic images to %s", count, root)
    return root


# ------------------------------------------------------------------------------------------- source detection


def _detect_source(source):
    """`(kind, location)`: which layout `source` is, checked in the documented order."""
    path = Path(source).expanduser().absolute()
    if path.is_dir():
        if any(_is_class_folder_split(path / split) for split in SPLITS):
            return "official", path
        if (path / "info.json").is_file() and any((path / f"{split}.json").is_file() for split in SPLITS):
            return "emoset", path
        if (path / "ground_truth.txt").is_file() and (path / "images").is_dir():
            return "emotion6", path
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "disk", path
        return "hub", path  # a local folder `datasets` may read (parquet, csv, ...)
    if path.is_file():
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            return "manifest", path
        raise ValueError(f"{path}: a file that is not a manifest (expected {', '.join(MANIFEST_SUFFIXES)})")
    if isinstance(source, str) and HUB_ID.match(source):
        return "hub", source
    raise ValueError(f"dataset root not found: {path}")


def _is_class_folder_split(path):
    """Whether `path` is a split folder of the official layout (a folder holding class folders)."""
    return path.is_dir() and any(child.is_dir() and not child.name.startswith(".") for child in path.iterdir())


def _normalise_label(label, where):
    """`label` stripped and lower-cased; an empty label is an error naming `where`."""
    name = str(label).strip().lower() if label is not None else ""
    if not name:
        raise ValueError(f"{where}: empty label")
    return name


def _normalise_split(split, where):
    """`train`/`val`/`test` from a split name (`validation` -> `val`), or a `ValueError` naming `where`."""
    name = SPLIT_ALIASES.get(str(split).strip().lower())
    if name is None:
        raise ValueError(f"{where}: unknown split {split!r} (expected one of {', '.join(SPLIT_ALIASES)})")
    return name


# --------------------------------------------------------------------------------------------- local layouts


def _list_official(root):
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
            label = _normalise_label(class_dir.name, class_dir)
            records += [Record(file, label, file.relative_to(root).as_posix()) for file in files]
        if empty and records:
            raise ValueError(f"{split_dir}: class folder(s) {empty} hold no image files while other classes do")
        splits[split] = records
    return Listing(splits)


def _list_emoset(root):
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
    return Record(root / image_path, _normalise_label(row[0], where), image_path.as_posix())


def _emoset_emotions(info_path):
    """The emotion names declared in EmoSet's `info.json`, or None when it does not list them."""
    info = json.loads(info_path.read_text(encoding="utf-8"))
    label2idx = (info.get("label2idx") or {}).get("emotion")
    if isinstance(label2idx, dict) and label2idx:
        return [_normalise_label(name, info_path) for name in label2idx]
    idx2label = (info.get("idx2label") or {}).get("emotion")
    if isinstance(idx2label, dict) and idx2label:
        return [_normalise_label(name, info_path) for name in idx2label.values()]
    return None


def _list_emotion6(root):
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


def _list_manifest(path):
    """Records of a CSV/JSONL manifest (`path` or `image`, `label`, optional `split`), paths relative to its folder."""
    rows = _read_manifest_rows(path)
    has_split = any(row.get("split") not in (None, "") for _, row in rows)
    splits = {}
    for number, row in rows:
        where = f"{path} line {number}"
        image = row.get("path") or row.get("image")
        if not image or "label" not in row:
            raise ValueError(f"{where}: needs `path` (or `image`) and `label`, got keys {sorted(row)}")
        split = _normalise_split(row.get("split"), where) if has_split else UNSPLIT
        record = Record(path.parent / image, _normalise_label(row["label"], where), Path(image).as_posix())
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


# ------------------------------------------------------------------------------------- listing -> DatasetDict


def _from_listing(listing, label_names, val_fraction, seed, wanted=None):
    """Check labels and rows, drop unreadable images, derive missing splits, build the `DatasetDict`."""
    present = [record.label for records in listing.splits.values() for record in records]
    names = _resolve_label_names(label_names, listing.labels or present)
    index = {name: i for i, name in enumerate(names)}
    for records in listing.splits.values():
        for record in records:
            if record.label not in index:
                raise ValueError(f"label {record.label!r} of {record.path} is not one of the labels {names}")
    _check_not_empty({split: len(records) for split, records in listing.splits.items()})
    if wanted is None:
        splits = _derive_splits(_drop_unreadable(listing.splits), val_fraction, seed)
    else:
        derived = _derive_splits(listing.splits, val_fraction, seed)
        missing = sorted(set(wanted) - set(derived))
        if missing:
            raise ValueError(f"the dataset has no split {missing[0]!r}; it has {', '.join(sorted(derived))}")
        splits = _drop_unreadable({split: derived[split] for split in wanted})
    features = Features({"image": Image(), "label": ClassLabel(names=names), "id": Value("string")})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "image": [str(record.path) for record in splits[split]],
                    "label": [index[record.label] for record in splits[split]],
                    "id": [record.id for record in splits[split]],
                },
                features=features,
            )
            for split in SPLITS
            if split in splits
        }
    )


def _resolve_label_names(label_names, labels):
    """`label_names` normalised (order kept, no duplicates), else the canonical order of `labels`."""
    if label_names is None:
        return canonical_label_order(labels)
    names = [_normalise_label(name, "label_names") for name in label_names]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates or not names:
        raise ValueError(f"label_names must be non-empty and unique, got {list(label_names)}")
    return names


def _check_not_empty(sizes):
    """`ValueError` for a split with zero rows (`sizes`: split -> number of rows)."""
    if not sizes:
        raise ValueError("the dataset has no splits with images")
    for split, size in sizes.items():
        if size == 0:
            raise ValueError(f"split {split!r} has no images")


def _drop_unreadable(splits):
    """`splits` without records whose file does not load (one warning); a split or class left empty is an error."""
    paths = list(dict.fromkeys(record.path for records in splits.values() for record in records))
    reasons = _find_unreadable(paths)
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


def _find_unreadable(paths):
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


def _derive_splits(splits, val_fraction, seed):
    """Make the splits a dataset lacks: 80/10/10 from `UNSPLIT`, or a stratified val from train."""
    splits = dict(splits)
    if UNSPLIT in splits:
        if val_fraction + TEST_FRACTION >= 1:
            raise ValueError(f"val_fraction {val_fraction} + test fraction {TEST_FRACTION} must be below 1")
        splits["train"], splits["test"] = _split_records(splits.pop(UNSPLIT), TEST_FRACTION, seed)
        if val_fraction:
            splits["train"], splits["val"] = _split_records(splits["train"], val_fraction / (1 - TEST_FRACTION), seed)
    elif "train" in splits and "val" not in splits and val_fraction:
        splits["train"], splits["val"] = _split_records(splits["train"], val_fraction, seed)
    for split in [split for split, records in splits.items() if not records]:
        logger.warning("Derived split %r is empty (too few images per class): left out", split)
        del splits[split]
    return splits


def _split_records(records, fraction, seed):
    """`(kept, split_off)` record lists, stratified by label."""
    keep, split = stratified_split([record.label for record in records], fraction, seed)
    return [records[i] for i in keep], [records[i] for i in split]


# ---------------------------------------------------------------------------------- save_to_disk / Hub datasets


def _load_datasets(location, local, disk):
    """`{train|val|test: Dataset}` from a `save_to_disk` folder, a local folder or a Hub dataset id."""
    try:
        loaded = load_from_disk(str(location)) if disk else load_dataset(str(location))
    except (OSError, ValueError) as error:
        if local:
            what = f"{location}: no known layout and `datasets` cannot read it"
        else:
            what = f"{location!r} is no local path and cannot be loaded as a Hub dataset"
        raise ValueError(f"{what} (supported: {LAYOUTS}): {error}") from error
    if isinstance(loaded, Dataset):
        loaded = {"train": loaded}
    splits = {}
    for name, dataset in loaded.items():
        split = SPLIT_ALIASES.get(name.lower())
        if split is None:
            logger.warning("Ignoring split %r of %s (not train/val/test)", name, location)
        elif split in splits:
            raise ValueError(f"{location}: two splits map to {split!r}: {list(loaded)}")
        else:
            splits[split] = (name, dataset)
    if not splits:
        raise ValueError(f"{location}: no train/val/test split among {list(loaded)}")
    return splits


def _from_datasets(splits, root, label_names, label_column, image_column, val_fraction, seed):
    """The standard `DatasetDict` from `{split: (source_name, Dataset)}`; string path columns go the local way."""
    features = next(iter(splits.values()))[1].features
    image_col = _find_image_column(features, image_column)
    label_col = _find_label_column(features, label_column, image_col)
    for name, dataset in splits.values():
        missing = {image_col, label_col} - set(dataset.column_names)
        if missing:
            raise ValueError(f"split {name!r} lacks column(s) {sorted(missing)}: {dataset.column_names}")
    declared = features[label_col].names if isinstance(features[label_col], ClassLabel) else None
    labels = {split: _label_strings(dataset, label_col, name) for split, (name, dataset) in splits.items()}
    if not isinstance(features[image_col], Image):
        return _from_listing(_path_listing(splits, image_col, labels, root, declared), label_names, val_fraction, seed)
    names = _resolve_label_names(label_names, declared or [label for values in labels.values() for label in values])
    index = {name: i for i, name in enumerate(names)}
    for split, (name, _) in splits.items():
        for row, label in enumerate(labels[split]):
            if label not in index:
                raise ValueError(f"label {label!r} of row {name}/{row} is not one of the labels {names}")
    _check_not_empty({split: len(dataset) for split, (_, dataset) in splits.items()})
    result = {
        split: _standardise(dataset, image_col, [index[label] for label in labels[split]], name, names)
        for split, (name, dataset) in splits.items()
    }
    if "train" in result and "val" not in result and val_fraction:
        keep, val = stratified_split(list(result["train"]["label"]), val_fraction, seed)
        result["train"], result["val"] = result["train"].select(keep), result["train"].select(val)
    return DatasetDict({split: result[split] for split in SPLITS if split in result})


def _find_image_column(features, requested):
    """`requested`, else the first `Image` feature, else a column named image/img/path."""
    if requested is not None:
        if requested not in features:
            raise ValueError(f"image_column {requested!r} is not a column: {list(features)}")
        return requested
    for name, feature in features.items():
        if isinstance(feature, Image):
            return name
    for name in IMAGE_COLUMNS:
        if name in features:
            return name
    raise ValueError(f"no image column among {list(features)}: pass image_column=")


def _find_label_column(features, requested, image_col):
    """`requested`, else a column named label/labels/emotion, else the first `ClassLabel`."""
    if requested is not None:
        if requested not in features:
            raise ValueError(f"label_column {requested!r} is not a column: {list(features)}")
        return requested
    for name in LABEL_COLUMNS:
        if name in features and name != image_col:
            return name
    for name, feature in features.items():
        if isinstance(feature, ClassLabel):
            return name
    raise ValueError(f"no label column among {list(features)}: pass label_column=")


def _label_strings(dataset, column, split_name):
    """Normalised label names of every row: `ClassLabel` ints through their names, strings as they are."""
    feature = dataset.features[column]
    values = list(dataset[column])
    if isinstance(feature, ClassLabel):
        for row, value in enumerate(values):
            if value is None or value < 0:
                raise ValueError(f"row {split_name}/{row} has no label ({value!r})")
        return [_normalise_label(feature.names[value], f"row {split_name}") for value in values]
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return [_normalise_label(value, f"row {split_name}/{row}") for row, value in enumerate(values)]
    raise ValueError(
        f"label column {column!r} is {feature}: expected a ClassLabel or strings "
        "(cast integer labels with `cast_column(..., ClassLabel(names=[...]))`)"
    )


def _path_listing(splits, image_col, labels, root, declared):
    """A `Listing` for datasets whose image column holds file paths (relative to `root` when local)."""
    listing = {}
    for split, (name, dataset) in splits.items():
        paths = [Path(value) for value in dataset[image_col]]
        paths = [root / path if root is not None and not path.is_absolute() else path for path in paths]
        rows = enumerate(zip(paths, labels[split]))
        listing[split] = [Record(path, label, f"{name}/{row}") for row, (path, label) in rows]
    return Listing(listing, [_normalise_label(name, "ClassLabel") for name in declared] if declared else None)


def _standardise(dataset, image_col, label_ids, split_name, names):
    """`dataset` reduced to `image` (decoding `Image()`), `label` (`ClassLabel(names)`) and `id` (`split/row`)."""
    dataset = dataset.select_columns([image_col])
    if image_col != "image":
        dataset = dataset.rename_column(image_col, "image")
    if not dataset.features["image"].decode:
        dataset = dataset.cast_column("image", Image())
    dataset = dataset.add_column("label", label_ids, feature=ClassLabel(names=names))
    return dataset.add_column("id", [f"{split_name}/{row}" for row in range(len(dataset))], feature=Value("string"))


# ---------------------------------------------------------------------------------------------- synthetic data


def _synthetic_args(labels, per_class, image_size, label_noise, seed):
    """The arguments of `make_synthetic_dataset`, checked, as a JSON-ready dict."""
    labels = [str(label) for label in labels]
    per_class = [int(count) for count in per_class]
    if not labels or len(set(labels)) != len(labels) or any(not label or "/" in label for label in labels):
        raise ValueError(f"labels must be unique, non-empty folder names, got {labels}")
    if len(per_class) != 3 or min(per_class) < 0 or per_class[0] < 1:
        raise ValueError(f"per_class must be (train >= 1, val >= 0, test >= 0) counts, got {per_class}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    if not 0 <= label_noise < 1:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    return {"labels": labels, "per_class": per_class, "image_size": int(image_size),
            "label_noise": float(label_noise), "seed": int(seed)}  # fmt: skip


def _synthetic_is_complete(root, args):
    """Whether `root` holds a complete synthetic dataset written with `args`."""
    try:
        written = json.loads((root / "synthetic.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if written.get("format") != SYNTHETIC_FORMAT or written.get("args") != args:
        return False
    return sum(1 for split in SPLITS for _ in (root / split).glob("*/*.png")) == written.get("files")


def _clear_synthetic(root):
    """Remove an earlier (stale or partial) synthetic dataset; refuse to touch a folder holding anything else."""
    ours = {*SPLITS, "synthetic.json", "synthetic.json.tmp"}
    if root.is_dir():
        others = sorted(set(os.listdir(root)) - ours)
        if others:
            raise ValueError(f"{root} holds files that are not a synthetic dataset ({others[:5]}): use an empty folder")
        (root / "synthetic.json").unlink(missing_ok=True)
        for split in SPLITS:
            shutil.rmtree(root / split, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def _synthetic_plan(args, rng):
    """`[(split, folder_class_indices, true_class_indices)]`: train has `label_noise` of its folders wrong."""
    num_classes = len(args["labels"])
    plan = []
    for split, count in zip(SPLITS, args["per_class"]):
        classes = np.repeat(np.arange(num_classes), count)
        folders = classes.copy()
        if split == "train" and num_classes > 1:
            noisy = rng.choice(len(classes), size=round(args["label_noise"] * len(classes)), replace=False)
            folders[noisy] = (classes[noisy] + rng.integers(1, num_classes, size=len(noisy))) % num_classes
        plan.append((split, folders.tolist(), classes.tolist()))
    return plan


def _synthetic_image(rng, class_index, num_classes, image_size):
    """One RGB image of class `class_index`: the class hue, shaded by stripes of the class angle and period."""
    low, high = round(image_size * 5 / 6), round(image_size * 4 / 3)
    width = int(rng.integers(low, high + 1))
    height = width if rng.random() < 0.5 else int(rng.integers(low, high + 1))
    hue = (class_index / num_classes + rng.normal(0, 0.01)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.8, 1.0)) * 255 * rng.uniform(0.75, 1.0)  # brightness jitter
    angle = np.pi * class_index / num_classes + rng.normal(0, 0.05)
    period = image_size / 8 * (1 + class_index % 3)
    ys, xs = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 2 * np.pi)  # stripe position jitter
    stripes = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period + phase)
    shade = 0.7 + 0.3 * stripes  # (H, W) in [0.4, 1]
    pixels = shade[..., None] * colour + rng.normal(0, 8, (height, width, 3))
    return PILImage.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_json_atomically(path, payload):
    """Write `payload` as JSON to `path` via a temporary file and `os.replace`."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
