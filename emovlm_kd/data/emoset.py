"""EmoSet-118K as its authors distribute it (Yang et al., ICCV 2023; github JingyuanYY/EmoSet: README.md,
EmoSet.py and info.json checked):

    <root>/info.json                  {"emotion": {"label2idx": {"amusement": 0, "awe": 1, ...},
                                                   "idx2label": {"0": "amusement", ...}},
                                       "brightness": {...}, "colorfulness": {...}, "scene": {...}, "object": {...}, ...}
    <root>/{train,val,test}.json      [[emotion, image_id, image_path, annotation_path], ...]
    <root>/image/<emotion>/<emotion>_<n>.jpg
    <root>/annotation/<emotion>/<emotion>_<n>.json

The official loader reads `info["emotion"]["label2idx"][row[0]]`, `row[2]` and `row[3]`. Copies in circulation
(e.g. a Kaggle mirror read as `entry[1] == "image/amusement/amusement_12865.jpg"`; the Dropbox download, github
JingyuanYY/EmoSet issue #4) drop the image id, giving rows `[emotion, image_path, annotation_path]`; both are read
(the image path is always the second-to-last item). The download's `info.json` is flat, `{"label2idx": {...},
"idx2label": {...}}` for the emotions alone (issue #2; the GitHub copy was later changed to the nested form): both
forms are read.

A row whose image path is absolute or climbs out of the dataset folder (`../`) is refused, naming the file and row:
a dataset's rows name its own files. An `info.json` or split file that is not JSON is refused naming the file.
"""

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from emovlm_kd.data.records import SPLITS, Listing, Record, normalise_label


def is_emoset(path):
    return (
        path.is_dir() and (path / "info.json").is_file() and any((path / f"{split}.json").is_file() for split in SPLITS)
    )


def read_emoset(root, options=None):
    """Records of EmoSet-118K: the label set from `info.json`, rows of `{train,val,test}.json` (3 or 4 items)."""
    labels = emoset_emotions(root / "info.json")
    splits = {}
    for split in SPLITS:
        file = root / f"{split}.json"
        if file.is_file():
            rows = read_json(file)
            if not isinstance(rows, list):
                raise ValueError(f"{file}: expected a JSON list of rows [emotion, image_id, image_path, "
                                 f"annotation_path], got a {type(rows).__name__}")  # fmt: skip
            splits[split] = [_emoset_record(root, row, f"{file} row {i}") for i, row in enumerate(rows)]
    return Listing(splits, labels)


def read_json(path):
    """The JSON content of `path`, or a one-line `ValueError` naming the file and the position of the error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}): not a JSON file") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno} column {error.colno}: {error.msg})") from None


def _emoset_record(root, row, where):
    """A record from `[emotion, image_id, image_path, annotation_path]` or `[emotion, image_path, annotation_path]`."""
    if not isinstance(row, (list, tuple)) or len(row) not in (3, 4):
        raise ValueError(
            f"{where}: expected [emotion, image_id, image_path, annotation_path] "
            f"or [emotion, image_path, annotation_path], got {row!r}"
        )
    if not isinstance(row[-2], str) or not row[-2].strip():
        raise ValueError(f"{where}: the image path must be a non-empty string, got {row[-2]!r}")
    image_path = Path(row[-2])
    if _leaves_root(row[-2]):
        raise ValueError(f"{where}: the image path {row[-2]!r} points outside the dataset folder (absolute or "
                         "'..'): rows must name files under the dataset folder")  # fmt: skip
    return Record(root / image_path, normalise_label(row[0], where), image_path.as_posix())


def _leaves_root(name):
    """Whether a row's path is absolute (POSIX or Windows, drive letters included) or has a `..` part."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return (posix.is_absolute() or bool(windows.drive) or windows.root != "" or ".." in posix.parts
            or ".." in windows.parts)  # fmt: skip


def emoset_emotions(info_path):
    """The emotion names of `info["emotion"]["label2idx"]` (else `["idx2label"]`), in their index order; the flat
    `info["label2idx"]` (`["idx2label"]`) of the download's info.json when there is no `"emotion"` entry."""
    info = read_json(info_path)
    emotion = info.get("emotion") if isinstance(info, dict) else None
    if emotion is None and isinstance(info, dict) and ("label2idx" in info or "idx2label" in info):
        emotion = info  # the flat form of the download (JingyuanYY/EmoSet issue #2)
    label2idx = emotion.get("label2idx") if isinstance(emotion, dict) else None
    idx2label = emotion.get("idx2label") if isinstance(emotion, dict) else None
    try:
        if isinstance(label2idx, dict) and label2idx:
            names = [name for name, _ in sorted(label2idx.items(), key=lambda item: int(item[1]))]
        elif isinstance(idx2label, dict) and idx2label:
            names = [name for _, name in sorted(idx2label.items(), key=lambda item: int(item[0]))]
        else:
            names = None
    except (TypeError, ValueError):
        raise ValueError(f'{info_path}: the emotion indices must be integers, as in EmoSet-118K\'s '
                         f'info["emotion"]["label2idx"] (or the flat "label2idx") {{"amusement": 0, ...}}') from None
    if names is None:
        keys = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise ValueError(
            f'{info_path}: no info["emotion"]["label2idx"] (nor ["idx2label"], nor a flat "label2idx") as in '
            f"EmoSet-118K's info.json; top-level keys: {keys}"
        )
    return [normalise_label(name, info_path) for name in names]
