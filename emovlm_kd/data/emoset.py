"""EmoSet-118K as its authors distribute it (Yang et al., ICCV 2023; github JingyuanYY/EmoSet: README.md,
EmoSet.py and info.json checked):

    <root>/info.json                  {"emotion": {"label2idx": {"amusement": 0, "awe": 1, ...},
                                                   "idx2label": {"0": "amusement", ...}},
                                       "brightness": {...}, "colorfulness": {...}, "scene": {...}, "object": {...}, ...}
    <root>/{train,val,test}.json      [[emotion, image_id, image_path, annotation_path], ...]
    <root>/image/<emotion>/<emotion>_<n>.jpg
    <root>/annotation/<emotion>/<emotion>_<n>.json

The official loader reads `info["emotion"]["label2idx"][row[0]]`, `row[2]` and `row[3]`. Copies in circulation
(e.g. a Kaggle mirror read as `entry[1] == "image/amusement/amusement_12865.jpg"`) drop the image id, giving rows
`[emotion, image_path, annotation_path]`; both are read (the image path is always the second-to-last item).
"""

import json
from pathlib import Path

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
            rows = json.loads(file.read_text(encoding="utf-8"))
            splits[split] = [_emoset_record(root, row, f"{file} row {i}") for i, row in enumerate(rows)]
    return Listing(splits, labels)


def _emoset_record(root, row, where):
    """A record from `[emotion, image_id, image_path, annotation_path]` or `[emotion, image_path, annotation_path]`."""
    if not isinstance(row, (list, tuple)) or len(row) not in (3, 4):
        raise ValueError(
            f"{where}: expected [emotion, image_id, image_path, annotation_path] "
            f"or [emotion, image_path, annotation_path], got {row!r}"
        )
    image_path = Path(row[-2])
    return Record(root / image_path, normalise_label(row[0], where), image_path.as_posix())


def emoset_emotions(info_path):
    """The emotion names of `info["emotion"]["label2idx"]` (else `["idx2label"]`), in their index order."""
    info = json.loads(info_path.read_text(encoding="utf-8"))
    emotion = info.get("emotion") if isinstance(info, dict) else None
    label2idx = emotion.get("label2idx") if isinstance(emotion, dict) else None
    idx2label = emotion.get("idx2label") if isinstance(emotion, dict) else None
    if isinstance(label2idx, dict) and label2idx:
        names = [name for name, _ in sorted(label2idx.items(), key=lambda item: int(item[1]))]
    elif isinstance(idx2label, dict) and idx2label:
        names = [name for _, name in sorted(idx2label.items(), key=lambda item: int(item[0]))]
    else:
        keys = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise ValueError(
            f'{info_path}: no info["emotion"]["label2idx"] (nor ["idx2label"]) as in EmoSet-118K\'s info.json; '
            f"top-level keys: {keys}"
        )
    return [normalise_label(name, info_path) for name in names]
