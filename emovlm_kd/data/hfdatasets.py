"""`save_to_disk` folders, other folders `datasets` reads, and Hub datasets: their image and label columns found by
type or name and reduced to the standard `image`, `label`, `id` (string path columns go the local-file way)."""

import logging
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Image, Value, load_dataset, load_from_disk

from emovlm_kd.data.build import from_listing, resolve_label_names
from emovlm_kd.data.checks import check_not_empty, check_train_classes
from emovlm_kd.data.readers import LABELLED_LAYOUTS, READERS
from emovlm_kd.data.records import SPLIT_ALIASES, SPLITS, Listing, Record, normalise_label
from emovlm_kd.data.splits import stratified_split

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("label", "labels", "emotion")
IMAGE_COLUMNS = ("image", "img", "path")
LAYOUTS = ", ".join(reader.description for reader in READERS) + ", a save_to_disk folder or a Hub dataset id"


def load_datasets(location):
    """`{train|val|test: (source_name, Dataset)}` from a `save_to_disk` folder, a local folder or a Hub dataset id
    (`location`: a `Path` when local)."""
    local = isinstance(location, Path)
    disk = local and ((location / "dataset_dict.json").is_file() or (location / "state.json").is_file())
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


def from_datasets(splits, root, label_names, label_column, image_column, val_fraction, seed):
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
        return from_listing(_path_listing(splits, image_col, labels, root, declared), label_names, val_fraction, seed)
    names = resolve_label_names(label_names, declared or [label for values in labels.values() for label in values])
    index = {name: i for i, name in enumerate(names)}
    for split, (name, _) in splits.items():
        for row, label in enumerate(labels[split]):
            if label not in index:
                raise ValueError(f"label {label!r} of row {name}/{row} is not one of the labels {names}")
    check_not_empty({split: len(dataset) for split, (_, dataset) in splits.items()})
    result = {
        split: _standardise(dataset, image_col, [index[label] for label in labels[split]], name, names)
        for split, (name, dataset) in splits.items()
    }
    if "train" in result:
        check_train_classes([names[label] for label in result["train"]["label"]])
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
            raise ValueError(f"label column {requested!r} (--label-column) is not a column of the dataset, whose "
                             f"columns are {list(features)}")  # fmt: skip
        if requested == image_col:
            raise ValueError(f"label column {requested!r} (--label-column) is the image column")
        return requested
    for name in LABEL_COLUMNS:
        if name in features and name != image_col:
            return name
    for name, feature in features.items():
        if isinstance(feature, ClassLabel):
            return name
    others = [name for name in features if name != image_col]
    if not others:
        raise ValueError(f"the dataset has images but no labels (its only column is {image_col!r}); labels come "
                         f"with {LABELLED_LAYOUTS}")  # fmt: skip
    raise ValueError(f"no label column among {list(features)} (none named {', '.join(LABEL_COLUMNS)}, no ClassLabel): "
                     "name it with --label-column NAME (label_column= in Python)")  # fmt: skip


def _label_strings(dataset, column, split_name):
    """Normalised label names of every row: `ClassLabel` ints through their names, strings as they are."""
    feature = dataset.features[column]
    values = list(dataset[column])
    if isinstance(feature, ClassLabel):
        for row, value in enumerate(values):
            if value is None or value < 0:
                raise ValueError(f"row {split_name}/{row} has no label ({value!r})")
        return [normalise_label(feature.names[value], f"row {split_name}") for value in values]
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return [normalise_label(value, f"row {split_name}/{row}") for row, value in enumerate(values)]
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
    return Listing(listing, [normalise_label(name, "ClassLabel") for name in declared] if declared else None)


def _standardise(dataset, image_col, label_ids, split_name, names):
    """`dataset` reduced to `image` (decoding `Image()`), `label` (`ClassLabel(names)`) and `id` (`split/row`)."""
    dataset = dataset.select_columns([image_col])
    if image_col != "image":
        dataset = dataset.rename_column(image_col, "image")
    if not dataset.features["image"].decode:
        dataset = dataset.cast_column("image", Image())
    dataset = dataset.add_column("label", label_ids, feature=ClassLabel(names=names))
    return dataset.add_column("id", [f"{split_name}/{row}" for row in range(len(dataset))], feature=Value("string"))
