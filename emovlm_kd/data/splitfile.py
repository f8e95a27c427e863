"""A split as a file, so that evaluation never sees a training image.

    {"train": [ids], "val": [ids], "test": [ids], "dataset": {"source": ..., "fingerprint": ..., ...}}

Training writes the split it used to `RUN/splits.json` and into the model folder (`RUN/model/splits.json`);
`emovlm-kd split` writes one to share; `--splits FILE` reuses one in `train`, `evaluate` and `table1`. The ids are the
dataset's `id` column, the same ones `predictions.jsonl` holds. The fingerprint covers every (id, label) of the
split, so a dataset whose files were removed or relabelled no longer matches it.
"""

import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path

from emovlm_kd.data.records import SPLITS
from emovlm_kd.errors import InputError
from emovlm_kd.folders import atomic_write_text

logger = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"


class SplitMismatchError(InputError):
    """The dataset does not hold the split's images (or holds them with other labels); a `ValueError`."""


def split_ids(dataset):
    """{split: [ids]} of a DatasetDict, in row order."""
    return {name: list(part["id"]) for name, part in dataset.items()}


def labelled_ids(dataset):
    """{id: label name} over every split of a DatasetDict."""
    pairs = {}
    for part in dataset.values():
        names = part.features["label"].names
        pairs.update({row_id: names[label] for row_id, label in zip(part["id"], part["label"])})
    return pairs


def fingerprint_split(ids_by_split, labels_by_id):
    """Hash of every split's (id, label), in order."""
    digest = hashlib.sha256()
    for name in sorted(ids_by_split):
        for row_id in ids_by_split[name]:
            digest.update(f"{name}|{row_id}|{labels_by_id[row_id]};".encode())
    return digest.hexdigest()[:16]


def split_record(dataset, source, **settings):
    """The file's content for a DatasetDict: its ids per split and where they came from."""
    ids = split_ids(dataset)
    info = {"source": str(source), "fingerprint": fingerprint_split(ids, labelled_ids(dataset)),
            "sizes": {k: len(v) for k, v in ids.items()}, **settings}
    return {**ids, "dataset": info}


def write_splits(path, record):
    return atomic_write_text(path, json.dumps(record, indent=1, ensure_ascii=False))


def read_splits(path):
    """A split file, checked: lists of ids for known splits, a train and a test split, no id in two splits."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--splits {path}: cannot read it: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"--splits {path}: expected a JSON object of id lists (train, val, test), got a "
                         f"{type(record).__name__}")  # fmt: skip
    names = [k for k in record if k != "dataset"]
    if set(names) - set(SPLITS) or not {"train", "test"} <= set(names):
        raise ValueError(f"--splits {path}: expected lists of ids under train, test (and val), got {names}")
    for name in names:
        ids = record[name]
        if not isinstance(ids, list):
            raise ValueError(f"--splits {path}: {name!r} must be a list of ids, got a {type(ids).__name__}")
        strays = [row_id for row_id in ids if not isinstance(row_id, str)]
        if strays:
            raise ValueError(f"--splits {path}: {name!r} must hold ids as strings, got {strays[0]!r}")
    if not isinstance(record.get("dataset", {}), dict):
        raise ValueError(f"--splits {path}: 'dataset' must be an object (source, fingerprint, ...)")
    seen = {}
    for name in names:
        for row_id in record[name]:
            if row_id in seen:
                raise ValueError(f"--splits {path}: id {row_id!r} is in both {seen[row_id]} and {name}")
            seen[row_id] = name
    return record


def apply_splits(dataset, record, where="the split file"):
    """The DatasetDict with exactly the record's splits and ids (in the record's order), from any split of
    `dataset`. `SplitMismatchError` when ids are missing or labels differ from the ones the record was made with."""
    from datasets import concatenate_datasets

    pool = concatenate_datasets(list(dataset.values())) if len(dataset) > 1 else next(iter(dataset.values()))
    row_of = {row_id: i for i, row_id in enumerate(pool["id"])}
    wanted = {k: v for k, v in record.items() if k != "dataset" and v}
    missing = [row_id for ids in wanted.values() for row_id in ids if row_id not in row_of]
    if missing:
        total = sum(len(v) for v in wanted.values())
        raise SplitMismatchError(
            f"the dataset no longer matches {where}: {len(missing)} of its {total} images are not in it "
            f"(e.g. {', '.join(map(repr, missing[:3]))}); use the dataset the split was made from, or another --splits"
        )
    from datasets import DatasetDict

    result = DatasetDict({name: pool.select([row_of[i] for i in ids]) for name, ids in wanted.items()})
    expected = record.get("dataset", {}).get("fingerprint")
    if expected and fingerprint_split(split_ids(result), labelled_ids(result)) != expected:
        raise SplitMismatchError(f"the dataset no longer matches {where}: the same images, other labels")
    return result


def cross_split_duplicates(dataset):
    """Groups of rows whose files have identical content but sit in different splits: [[(split, id), ...], ...]."""
    from datasets import Image

    by_hash = defaultdict(list)
    for name, part in dataset.items():
        raw = part.cast_column("image", Image(decode=False))
        for row_id, image in zip(part["id"], raw["image"]):
            data = image.get("bytes") or Path(image["path"]).read_bytes()
            by_hash[hashlib.sha256(data).hexdigest()].append((name, row_id))
    return [rows for rows in by_hash.values() if len({split for split, _ in rows}) > 1]


def check_leakage(dataset, strict=False):
    """Warn (or, `strict`, raise `ValueError`) naming the files whose content is identical across splits."""
    groups = cross_split_duplicates(dataset)
    if not groups:
        return groups
    shown = "; ".join(" = ".join(f"{split}:{row_id}" for split, row_id in rows) for rows in groups[:10])
    message = (f"{len(groups)} image(s) with identical content sit in more than one split: {shown}"
               + (" ..." if len(groups) > 10 else ""))
    if strict:
        raise ValueError(message + " (--leakage error)")
    logger.warning("%s", message)
    return groups
